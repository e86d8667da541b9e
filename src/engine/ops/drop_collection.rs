//! `dropCollection`: the collection is moved aside (renamed to `_dbshift_dropped_*`), not
//! dropped, and moved back on undo.

use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{mongo, Exec, ExecError, Op, Operation, Prepared, RenameCollection};
use crate::engine::tracking::DROPPED_PREFIX;

/// A collection name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CollectionRef {
    /// Collection name.
    pub collection: String,
}

/// Where a dropped collection is kept, for the step `key`.
pub(crate) fn aside_name(key: &str, coll: &str) -> String {
    let k: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("{DROPPED_PREFIX}{k}_{coll}")
}

async fn exists(db: &Database, name: &str) -> Result<bool, ExecError> {
    crate::mongo::collection_exists(db, name).await.map_err(mongo(format!("listing collections to find {name}")))
}

/// Rename within the tenant database.
pub(crate) async fn rename(db: &Database, from: &str, to: &str) -> Result<(), ExecError> {
    crate::mongo::rename_collection(db, from, to).await.map_err(mongo(format!("renaming collection {from} to {to}")))
}

impl CollectionRef {
    /// Move it back from where it was put aside.
    fn undo(&self, aside: String) -> Vec<Operation> {
        vec![Operation::RenameCollection(RenameCollection { from: aside, to: self.collection.clone() })]
    }
}

impl Op for CollectionRef {
    const KIND: &'static str = "dropCollection";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn check(&self) -> Vec<Option<String>> {
        Vec::new()
    }

    /// What runs is a rename to the side.
    async fn prepare(&self, db: &Database, key: &str) -> Result<Prepared, ExecError> {
        if !exists(db, &self.collection).await? {
            return Err(ExecError::Precondition(format!("collection {} does not exist", self.collection)));
        }
        let aside = aside_name(key, &self.collection);
        let op = Operation::RenameCollection(RenameCollection { from: self.collection.clone(), to: aside.clone() });
        Ok(Prepared::new(op, self.undo(aside)))
    }

    /// Only reached when undoing createCollection: the data goes aside, not away.
    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        if exists(x.db, &self.collection).await? {
            rename(x.db, &self.collection, &aside_name(x.key, &self.collection)).await?;
        }
        Ok(0)
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        super::count(db, &self.collection, bson::doc! {}).await
    }
}
