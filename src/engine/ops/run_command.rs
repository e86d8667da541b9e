//! `runCommand`: the escape hatch. Not invertible: a migration using it needs a `down`.

use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{data_err, mongo, Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunCommand {
    /// The command document, e.g. `{ collMod: orders, validationLevel: moderate }`.
    pub command: serde_json::Map<String, Json>,
}

impl Op for RunCommand {
    const KIND: &'static str = "runCommand";

    fn collection(&self) -> Option<&str> {
        None
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![
            self.command.is_empty().then(|| "`command` is empty".to_string()),
            bsonx::map_to_doc(&self.command).err().map(|e| format!("`command`: {e}")),
        ]
    }

    async fn prepare(&self, _db: &Database, _key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::irreversible(
            Operation::RunCommand(self.clone()),
            "runCommand has no automatic inverse; give the migration an explicit `down`",
        ))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let cmd = bsonx::map_to_doc(&self.command).map_err(data_err)?;
        let name = cmd.keys().next().cloned().unwrap_or_default();
        x.db.run_command(cmd).await.map_err(mongo(format!("running command {name}")))?;
        Ok(0)
    }
}
