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

/// The validator a `$jsonSchema` and another query make together (both must hold; an empty
/// query adds nothing), if either is given.
pub(crate) fn combined_validator(
    json_schema: Option<&Json>,
    validator: Option<&Json>,
) -> Result<Option<bson::Document>, ExecError> {
    let schema = json_schema.map(bsonx::to_doc).transpose().map_err(data_err)?;
    let other = validator.map(bsonx::to_doc).transpose().map_err(data_err)?;
    Ok(match (schema, other) {
        (Some(s), Some(v)) if !v.is_empty() => Some(doc! {"$and": [{"$jsonSchema": s}, v]}),
        (Some(s), _) => Some(doc! {"$jsonSchema": s}),
        (None, v) => v,
    })
}

/// Add the validation options given to a `create` or `collMod` command.
pub(crate) fn with_validation(
    mut cmd: bson::Document,
    validator: Option<bson::Document>,
    level: Option<ValidationLevel>,
    action: Option<ValidationAction>,
) -> bson::Document {
    if let Some(v) = validator {
        cmd.insert("validator", v);
    }
    if let Some(l) = level {
        cmd.insert("validationLevel", l.as_str());
    }
    if let Some(a) = action {
        cmd.insert("validationAction", a.as_str());
    }
    cmd
}

impl CreateCollection {
    /// The `create` command.
    pub(crate) fn command(&self) -> Result<bson::Document, ExecError> {
        let validator = combined_validator(self.json_schema.as_ref(), self.validator.as_ref())?;
        let cmd = doc! {"create": &self.collection};
        Ok(with_validation(cmd, validator, self.validation_level, self.validation_action))
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
