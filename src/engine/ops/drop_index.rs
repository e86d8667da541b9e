//! `dropIndex`: drop an index by name; its definition is kept to re-create it.

use bson::{doc, Bson};
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{json, mongo, Exec, ExecError, Op, Operation, Prepared, RunCommand};
use crate::mongo::{code, error_code};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DropIndex {
    /// Collection name.
    pub collection: String,
    /// Index name.
    pub name: String,
}

impl DropIndex {
    /// Re-create the index from the definition it had.
    fn undo(&self, mut spec: bson::Document) -> Vec<Operation> {
        spec.remove("v");
        spec.remove("ns");
        let mut cmd = serde_json::Map::new();
        cmd.insert("createIndexes".into(), serde_json::Value::String(self.collection.clone()));
        cmd.insert("indexes".into(), serde_json::Value::Array(vec![json(Bson::Document(spec))]));
        vec![Operation::RunCommand(RunCommand { command: cmd })]
    }
}

impl Op for DropIndex {
    const KIND: &'static str = "dropIndex";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![(self.name == "_id_").then(|| "the `_id_` index cannot be dropped".to_string())]
    }

    async fn prepare(&self, db: &Database, _key: &str) -> Result<Prepared, ExecError> {
        let existing = crate::mongo::list_indexes(db, &self.collection)
            .await
            .map_err(mongo(format!("listing indexes of {}", self.collection)))?;
        let Some(spec) = existing.into_iter().find(|e| e.get_str("name").ok() == Some(self.name.as_str())) else {
            return Err(ExecError::Precondition(format!("index {} does not exist on {}", self.name, self.collection)));
        };
        Ok(Prepared::new(Operation::DropIndex(self.clone()), self.undo(spec)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        match x.db.run_command(doc! {"dropIndexes": &self.collection, "index": &self.name}).await {
            Ok(_) => Ok(0),
            // Undoing a createIndex that never completed.
            Err(e) if error_code(&e) == Some(code::INDEX_NOT_FOUND) => Ok(0),
            Err(e) => Err(mongo(format!("dropping index {} of {}", self.name, self.collection))(e)),
        }
    }
}
