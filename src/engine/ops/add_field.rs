//! `addField`: set a field to a default value where it is missing.

use bson::doc;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{count, data_err, field_problem, filter_problem, in_session, json, mongo, restore};
use super::{Exec, ExecError, Op, Operation, Prepared, RestoreMode, UpdateMany};
use crate::engine::bsonx::{self, and, filter_doc, top_field};
use crate::engine::preimages;

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

    /// Unset the field where it holds the value, then put back the documents that held the
    /// value before `up` (it did not touch them).
    fn undo(&self, value: bson::Bson, key: &str) -> Vec<Operation> {
        vec![
            Operation::UpdateMany(UpdateMany {
                collection: self.collection.clone(),
                filter: serde_json::json!({ &self.field: json(value) }),
                update: serde_json::json!({ "$unset": { &self.field: "" } }),
            }),
            restore(&self.collection, key, RestoreMode::Fields, vec![top_field(&self.field).to_string()]),
        ]
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

    async fn prepare(&self, db: &Database, key: &str) -> Result<Prepared, ExecError> {
        let value = bsonx::to_bson(&self.value).map_err(data_err)?;
        let top = top_field(&self.field).to_string();
        // Documents that already hold the value are not touched by `up`, but the undo
        // (unset where field == value) would reach them: keep them as they are.
        preimages::capture(db, &self.collection, doc! {&self.field: value.clone()}, Some(&[top]), key).await?;
        Ok(Prepared::new(Operation::AddField(self.clone()), self.undo(value, key)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let value = bsonx::to_bson(&self.value).map_err(data_err)?;
        let coll = x.db.collection::<bson::Document>(&self.collection);
        let s = &mut x.session;
        let r = in_session!(coll.update_many(self.query()?, doc! {"$set": {&self.field: value}}), s)
            .map_err(mongo(format!("adding {} to {}", self.field, self.collection)))?;
        Ok(r.modified_count)
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        count(db, &self.collection, self.query()?).await
    }
}
