//! `addField`: set a field to a default value where it is missing.

use bson::doc;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{count, data_err, field_problem, filter_problem, restore, Recompute};
use super::{Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx::{self, and, filter_doc, top_field};
use crate::engine::pass::{self, FieldUpdate};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddField {
    /// Collection name.
    pub collection: String,
    /// Field path (dots for nested fields).
    pub field: String,
    /// Default value (any YAML / Extended JSON value).
    pub value: Json,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

impl AddField {
    /// Documents `up` changes: those of the filter that lack the field.
    fn query(&self) -> Result<bson::Document, ExecError> {
        Ok(and(filter_doc(self.filter.as_ref()).map_err(data_err)?, doc! {&self.field: {"$exists": false}}))
    }

    fn update(&self) -> Result<bson::Document, ExecError> {
        Ok(doc! {"$set": {&self.field: bsonx::to_bson(&self.value).map_err(data_err)?}})
    }

    /// Put back the documents it changed: the field goes again, other fields stay.
    fn undo(&self, key: &str) -> Vec<Operation> {
        let update = serde_json::json!({ "$set": { &self.field: &self.value } });
        vec![restore(&self.collection, key, Some(Recompute::new(update, None)))]
    }
}

impl Op for AddField {
    const KIND: &'static str = "addField";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn is_data_operation(&self) -> bool {
        true
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![
            field_problem(&self.field, "field"),
            bsonx::to_bson(&self.value).err().map(|e| format!("`value`: {e}")),
            filter_problem(self.filter.as_ref(), "filter"),
        ]
    }

    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::AddField(self.clone()), self.undo(key)))
    }

    /// Only documents still missing the field when they are written change (one the application
    /// gave the field meanwhile is left as it is).
    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let mut planner = FieldUpdate {
            filter: self.query()?,
            update: self.update()?.into(),
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
