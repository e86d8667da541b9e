//! `_restorePreimages` (internal, never written in a file): put back what a step stored in
//! its pre-image store. It is how lossy operations are undone.

use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Exec, ExecError, Op, Operation, Prepared};
use crate::engine::preimages;

/// How stored pre-images are written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RestoreMode {
    /// Put back the stored top-level fields, leave the others.
    Fields,
    /// Replace the whole document (re-inserting it if it is gone).
    Replace,
}

/// Internal undo step: documents stored in a step's pre-image store before a lossy operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestorePreimages {
    /// Collection the documents belong to.
    pub collection: String,
    /// The step key of the pre-image store (`<version>_<step>`).
    pub key: String,
    /// How to write them back.
    pub mode: RestoreMode,
    /// Fields to remove first (fields the operation added that the pre-images do not hold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unset: Vec<String>,
}

impl Op for RestorePreimages {
    const KIND: &'static str = "restorePreimages";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![Some("is internal to dbshift and cannot be written in a file".into())]
    }

    async fn prepare(&self, _db: &Database, _key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::irreversible(
            Operation::RestorePreimages(self.clone()),
            "putting rollback data back cannot itself be undone",
        ))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        preimages::restore(x.db, self).await
    }
}
