//! `removeField`: remove a field; its values are kept as pre-images.

use bson::doc;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{count, data_err, field_problem, filter_problem, restore, Recompute};
use super::{Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx::{and, filter_doc, top_field};
use crate::engine::pass::{self, FieldUpdate};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoveField {
    /// Collection name.
    pub collection: String,
    /// Field path (dots for nested fields).
    pub field: String,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

impl RemoveField {
    fn query(&self) -> Result<bson::Document, ExecError> {
        Ok(and(filter_doc(self.filter.as_ref()).map_err(data_err)?, doc! {&self.field: {"$exists": true}}))
    }

    /// Put the stored values back.
    fn undo(&self, key: &str) -> Vec<Operation> {
        let update = serde_json::json!({ "$unset": { &self.field: "" } });
        vec![restore(&self.collection, key, Some(Recompute::new(update, None)))]
    }
}

impl Op for RemoveField {
    const KIND: &'static str = "removeField";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn is_data_operation(&self) -> bool {
        true
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![field_problem(&self.field, "field"), filter_problem(self.filter.as_ref(), "filter")]
    }

    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::RemoveField(self.clone()), self.undo(key)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let mut planner = FieldUpdate {
            filter: self.query()?,
            update: doc! {"$unset": {&self.field: ""}}.into(),
            fields: vec![top_field(&self.field).to_string()],
            whole_pre: false,
        };
        let (key, query) = (x.key.to_string(), self.query()?);
        pass::forward(&mut x.pass(&self.collection), &key, query, &mut planner, true).await
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        count(db, &self.collection, self.query()?).await
    }
}
