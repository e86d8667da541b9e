//! `renameField`: rename a field; a `to` it overwrites is kept as a pre-image.

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
pub struct RenameField {
    /// Collection name.
    pub collection: String,
    /// Current field path.
    pub from: String,
    /// New field path.
    pub to: String,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

impl RenameField {
    fn query(&self) -> Result<bson::Document, ExecError> {
        Ok(and(filter_doc(self.filter.as_ref()).map_err(data_err)?, doc! {&self.from: {"$exists": true}}))
    }

    /// The top-level fields a rename can change.
    fn fields(&self) -> Vec<String> {
        let (tf, tt) = (top_field(&self.from).to_string(), top_field(&self.to).to_string());
        if tf == tt {
            vec![tf]
        } else {
            vec![tf, tt]
        }
    }

    /// Put both fields back as they were.
    fn undo(&self, key: &str) -> Vec<Operation> {
        let update = serde_json::json!({ "$rename": { &self.from: &self.to } });
        vec![restore(&self.collection, key, Some(Recompute::new(update, None)))]
    }
}

impl Op for RenameField {
    const KIND: &'static str = "renameField";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn is_data_operation(&self) -> bool {
        true
    }

    fn check(&self) -> Vec<Option<String>> {
        let mut p = vec![field_problem(&self.from, "from"), field_problem(&self.to, "to")];
        if self.from == self.to {
            p.push(Some("`from` and `to` are the same".into()));
        } else if self.to.starts_with(&format!("{}.", self.from)) || self.from.starts_with(&format!("{}.", self.to)) {
            p.push(Some("`from` and `to` cannot be a path and its parent".into()));
        }
        p.push(filter_problem(self.filter.as_ref(), "filter"));
        p
    }

    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::RenameField(self.clone()), self.undo(key)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let mut planner = FieldUpdate {
            filter: self.query()?,
            update: doc! {"$rename": {&self.from: &self.to}}.into(),
            fields: self.fields(),
            whole_pre: false,
        };
        let (key, query) = (x.key.to_string(), self.query()?);
        pass::forward(&mut x.pass(&self.collection), &key, query, &mut planner, true).await
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        count(db, &self.collection, self.query()?).await
    }
}
