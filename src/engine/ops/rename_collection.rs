//! `renameCollection`: rename within the database; undone by renaming back.

use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::drop_collection::rename;
use super::{collection_problem, mongo, Exec, ExecError, Op, Operation, Prepared};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenameCollection {
    /// Current collection name.
    pub from: String,
    /// New collection name (must not exist).
    pub to: String,
}

impl RenameCollection {
    fn undo(&self) -> Vec<Operation> {
        vec![Operation::RenameCollection(RenameCollection { from: self.to.clone(), to: self.from.clone() })]
    }
}

impl Op for RenameCollection {
    const KIND: &'static str = "renameCollection";

    fn collection(&self) -> Option<&str> {
        Some(&self.from)
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![collection_problem(&self.to), (self.from == self.to).then(|| "`from` and `to` are the same".to_string())]
    }

    async fn prepare(&self, db: &Database, _key: &str) -> Result<Prepared, ExecError> {
        let exists = |name: &str| {
            let name = name.to_string();
            async move {
                crate::mongo::collection_exists(db, &name)
                    .await
                    .map_err(mongo(format!("listing collections to find {name}")))
            }
        };
        if !exists(&self.from).await? {
            return Err(ExecError::Precondition(format!("collection {} does not exist", self.from)));
        }
        if exists(&self.to).await? {
            return Err(ExecError::Precondition(format!(
                "cannot rename {} to {}: {} already exists",
                self.from, self.to, self.to
            )));
        }
        Ok(Prepared::new(Operation::RenameCollection(self.clone()), self.undo()))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        rename(x.db, &self.from, &self.to).await?;
        Ok(0)
    }
}
