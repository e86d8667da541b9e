//! `createCollection`: a new collection, optionally with a validator; undone by moving it aside.

use bson::doc;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{data_err, filter_problem, mongo, CollectionRef, Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCollection {
    /// Collection name.
    pub collection: String,
    /// A `$jsonSchema` document used as the collection's validator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<Json>,
    /// Any other validator query (combined with `jsonSchema` when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<Json>,
    /// `strict` (default) or `moderate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_level: Option<ValidationLevel>,
    /// `error` (default) or `warn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_action: Option<ValidationAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValidationLevel {
    Off,
    Strict,
    Moderate,
}

impl ValidationLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            ValidationLevel::Off => "off",
            ValidationLevel::Strict => "strict",
            ValidationLevel::Moderate => "moderate",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValidationAction {
    Error,
    Warn,
}

impl ValidationAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ValidationAction::Error => "error",
            ValidationAction::Warn => "warn",
        }
    }
}

impl CreateCollection {
    /// The `create` command.
    pub(crate) fn command(&self) -> Result<bson::Document, ExecError> {
        let mut cmd = doc! {"create": &self.collection};
        let schema = self.json_schema.as_ref().map(bsonx::to_doc).transpose().map_err(data_err)?;
        let other = self.validator.as_ref().map(bsonx::to_doc).transpose().map_err(data_err)?;
        let validator = match (schema, other) {
            (Some(s), Some(v)) => Some(doc! {"$and": [{"$jsonSchema": s}, v]}),
            (Some(s), None) => Some(doc! {"$jsonSchema": s}),
            (None, v) => v,
        };
        if let Some(v) = validator {
            cmd.insert("validator", v);
        }
        if let Some(l) = self.validation_level {
            cmd.insert("validationLevel", l.as_str());
        }
        if let Some(a) = self.validation_action {
            cmd.insert("validationAction", a.as_str());
        }
        Ok(cmd)
    }

    /// Move it aside (what was written into it meanwhile is kept there).
    fn undo(&self) -> Vec<Operation> {
        vec![Operation::DropCollection(CollectionRef { collection: self.collection.clone() })]
    }
}

impl Op for CreateCollection {
    const KIND: &'static str = "createCollection";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![
            filter_problem(self.json_schema.as_ref(), "jsonSchema"),
            filter_problem(self.validator.as_ref(), "validator"),
        ]
    }

    async fn prepare(&self, db: &Database, _key: &str) -> Result<Prepared, ExecError> {
        let exists = crate::mongo::collection_exists(db, &self.collection)
            .await
            .map_err(mongo(format!("listing collections to find {}", self.collection)))?;
        if exists {
            return Err(ExecError::Precondition(format!("collection {} already exists", self.collection)));
        }
        Ok(Prepared::new(Operation::CreateCollection(self.clone()), self.undo()))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        x.db.run_command(self.command()?).await.map_err(mongo(format!("creating collection {}", self.collection)))?;
        Ok(0)
    }
}
