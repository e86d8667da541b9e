//! `dbshift schema`: the JSON Schema of migration files (committed as docs/migration.schema.json).

use crate::exit::{Exit, Failure};

pub fn run() -> Result<Exit, Failure> {
    print!("{}", migration_schema());
    Ok(Exit::Ok)
}

/// The JSON Schema of migration files, generated from the file format's types.
pub fn migration_schema() -> String {
    let schema = schemars::schema_for!(crate::engine::model::MigrationFile);
    serde_json::to_string_pretty(&schema).expect("serializable") + "\n"
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_schema_matches_the_types() {
        let committed = include_str!("../../../docs/migration.schema.json");
        assert!(
            committed == super::migration_schema(),
            "docs/migration.schema.json is stale: run `cargo run -- schema > docs/migration.schema.json`"
        );
    }
}
