//! `dbshift import migrate-mongo`: adopt databases migrated with migrate-mongo. Each tenant's
//! `changelog` collection lists the files migrate-mongo applied; each is mapped to a dbshift
//! migration (by a mapping file, or by its timestamp) and recorded as `baselined`, changing no
//! data. A tenant with a file that maps to nothing gets nothing recorded, and says which.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bson::Document;
use clap::{Args, Subcommand};
use futures::TryStreamExt;

use crate::cli::commands::baseline::{self, Baselined};
use crate::cli::fleet::{self, for_each_tenant, worst};
use crate::cli::Global;
use crate::engine::{runner, Migration};
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub from: ImportFrom,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ImportFrom {
    /// migrate-mongo's changelog (its `changelog` collection in each tenant database).
    MigrateMongo(MigrateMongoArgs),
}

#[derive(Args, Debug, Clone)]
pub struct MigrateMongoArgs {
    /// The changelog collection (migrate-mongo's `changelogCollectionName`).
    #[arg(long, default_value = "changelog")]
    pub changelog: String,
    /// A YAML map from migrate-mongo file names to dbshift migrations (version or id). Files it
    /// does not name are matched by their leading 14-digit timestamp.
    #[arg(long)]
    pub mapping: Option<PathBuf>,
}

/// The dbshift migration a migrate-mongo file name maps to.
fn map_one(file: &str, mapping: &BTreeMap<String, String>, migrations: &[Migration]) -> Option<String> {
    let find = |key: &str| migrations.iter().find(|m| m.version == key || m.id() == key).map(|m| m.id());
    if let Some(to) = mapping.get(file) {
        return find(to);
    }
    let stamp: String = file.chars().take_while(|c| c.is_ascii_digit()).collect();
    (stamp.len() == 14).then(|| find(&stamp)).flatten()
}

pub async fn run(g: &Global, a: &ImportArgs) -> Result<Exit, Failure> {
    let ImportFrom::MigrateMongo(mm) = &a.from;
    let mapping: BTreeMap<String, String> = match &mm.mapping {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Failure::invalid(format!("cannot read the mapping file {}: {e}", p.display())))?;
            serde_yaml::from_str(&text).map_err(|e| {
                Failure::invalid(format!(
                    "{}: not a map of migrate-mongo file names to dbshift migrations: {e}",
                    p.display()
                ))
            })?
        }
        None => BTreeMap::new(),
    };
    let f = fleet::start(g).await?;
    if let Some((file, to)) =
        mapping.iter().find(|(_, to)| !f.migrations.iter().any(|m| m.version == **to || m.id() == **to))
    {
        return Err(Failure::invalid(format!(
            "the mapping names {to} for {file}: no migration file has that version or id"
        )));
    }
    let opts = fleet::run_options(g, Arc::new(runner::Quiet))?;
    let results = for_each_tenant(&f.tenants, g.parallel, |t| {
        let (db, m, o, map, coll) = (f.conn.client.database(&t), &f.migrations, &opts, &mapping, &mm.changelog);
        async move {
            let unreachable = |e: mongodb::error::Error| {
                Failure::new(Exit::Unreachable, format!("reading {coll}: {}", crate::mongo::describe(&e)))
            };
            let docs: Vec<Document> =
                db.collection::<Document>(coll).find(bson::doc! {}).await.map_err(unreachable)?.try_collect().await.map_err(unreachable)?;
            if docs.is_empty() {
                return Err(Failure::invalid(format!("{t} has no migrate-mongo changelog (collection {coll} is empty or missing)")));
            }
            let mut ids = Vec::new();
            let mut unmapped = Vec::new();
            for d in &docs {
                let file = d.get_str("fileName").unwrap_or_default();
                match map_one(file, map, m) {
                    Some(id) => ids.push(id),
                    None => unmapped.push(if file.is_empty() { "(an entry without fileName)".to_string() } else { file.to_string() }),
                }
            }
            if !unmapped.is_empty() {
                return Err(Failure::invalid(format!(
                    "{} migrate-mongo file(s) map to no dbshift migration, so nothing was recorded: {} (name them in --mapping)",
                    unmapped.len(),
                    unmapped.join(", ")
                )));
            }
            Ok(Baselined { baselined: runner::baseline_ids(&db, &t, m, &ids, o).await? })
        }
    })
    .await;
    let (done, nothing) = ("imported {n} migration(s) as baselined", "nothing to import (already in effect)");
    baseline::print(g.output, "import", &results, &f.conn.redactor, done, nothing);
    Ok(worst(&results, |_| Exit::Ok))
}
