//! `deleteDocuments`: delete what a filter matches; the documents are kept as pre-images.

use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{count, data_err, filter_problem, restore};
use super::{Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx;
use crate::engine::pass::{self, Delete};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteDocuments {
    /// Collection name.
    pub collection: String,
    /// Documents matching this filter are deleted (required; use `{}` for all).
    pub filter: Json,
}

impl DeleteDocuments {
    fn query(&self) -> Result<bson::Document, ExecError> {
        bsonx::to_doc(&self.filter).map_err(data_err)
    }

    /// Re-insert the stored documents.
    fn undo(&self, key: &str) -> Vec<Operation> {
        vec![restore(&self.collection, key, None)]
    }
}

impl Op for DeleteDocuments {
    const KIND: &'static str = "deleteDocuments";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn is_data_operation(&self) -> bool {
        true
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![filter_problem(Some(&self.filter), "filter")]
    }

    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::DeleteDocuments(self.clone()), self.undo(key)))
    }

    /// A document changed since it was read is read again first; one that no longer matches
    /// is left alone.
    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let key = x.key.to_string();
        pass::forward(&mut x.pass(&self.collection), &key, self.query()?, &mut Delete, true).await
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        count(db, &self.collection, self.query()?).await
    }
}
