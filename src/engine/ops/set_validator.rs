//! `setValidator`: change an existing collection's validator, `validationLevel` and
//! `validationAction` (`collMod`); undone by putting back the options it had before, which
//! `prepare` reads and keeps in the undo.

use bson::{doc, Bson, Document};
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::create_collection::{combined_validator, with_validation};
use super::{filter_problem, json, mongo, Exec, ExecError, Op, Operation, Prepared};
use super::{ValidationAction, ValidationLevel};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetValidator {
    /// An existing collection.
    pub collection: String,
    /// A `$jsonSchema` document: the new validator (with `validator`, both must hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<Json>,
    /// Any other validator query; `{}` removes the validator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<Json>,
    /// `off`, `moderate` (existing invalid documents may stay invalid) or `strict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_level: Option<ValidationLevel>,
    /// `error` (refuse invalid writes) or `warn` (log them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_action: Option<ValidationAction>,
}

/// A collection's validation options as the server reports them (absent: the defaults).
#[derive(Debug, Clone, PartialEq)]
struct Options {
    validator: Option<Document>,
    level: Option<String>,
    action: Option<String>,
}

impl Options {
    fn of(info: &Document) -> Options {
        let o = info.get_document("options").cloned().unwrap_or_default();
        Options {
            validator: o.get_document("validator").ok().cloned(),
            level: o.get_str("validationLevel").ok().map(str::to_string),
            action: o.get_str("validationAction").ok().map(str::to_string),
        }
    }
}

impl SetValidator {
    /// The validator it sets, if it sets one.
    pub(crate) fn new_validator(&self) -> Result<Option<Document>, ExecError> {
        combined_validator(self.json_schema.as_ref(), self.validator.as_ref())
    }

    /// The `collMod` command.
    fn command(&self) -> Result<Document, ExecError> {
        let cmd = doc! {"collMod": &self.collection};
        Ok(with_validation(cmd, self.new_validator()?, self.validation_level, self.validation_action))
    }

    /// Whether the collection already has every option this sets.
    fn already(&self, now: &Options) -> Result<bool, ExecError> {
        let validator = match self.new_validator()? {
            None => true,
            Some(v) if v.is_empty() => now.validator.as_ref().is_none_or(Document::is_empty),
            Some(v) => now.validator.as_ref() == Some(&v),
        };
        let level = self.validation_level.is_none_or(|l| now.level.as_deref().unwrap_or("strict") == l.as_str());
        let action = self.validation_action.is_none_or(|a| now.action.as_deref().unwrap_or("error") == a.as_str());
        Ok(validator && level && action)
    }

    /// The options put back: every one this changes, as it was (an absent validator is `{}`,
    /// absent level and action are the server's defaults, `strict` and `error`).
    fn undo(&self, before: &Options) -> Result<Operation, ExecError> {
        fn parse<T: serde::de::DeserializeOwned>(
            coll: &str,
            s: &Option<String>,
            default: &str,
        ) -> Result<T, ExecError> {
            let value = s.clone().unwrap_or_else(|| default.into());
            serde_json::from_value(Json::String(value.clone())).map_err(|_| {
                ExecError::Precondition(format!(
                    "collection {coll} has validation option `{value}`, which setValidator cannot put back: change it with runCommand (collMod) and a down"
                ))
            })
        }
        let coll = self.collection.as_str();
        let sets_validator = self.json_schema.is_some() || self.validator.is_some();
        Ok(Operation::SetValidator(SetValidator {
            collection: self.collection.clone(),
            json_schema: None,
            validator: sets_validator.then(|| json(Bson::Document(before.validator.clone().unwrap_or_default()))),
            validation_level: self.validation_level.map(|_| parse(coll, &before.level, "strict")).transpose()?,
            validation_action: self.validation_action.map(|_| parse(coll, &before.action, "error")).transpose()?,
        }))
    }
}

impl Op for SetValidator {
    const KIND: &'static str = "setValidator";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn check(&self) -> Vec<Option<String>> {
        let nothing = self.json_schema.is_none()
            && self.validator.is_none()
            && self.validation_level.is_none()
            && self.validation_action.is_none();
        vec![
            nothing.then(|| {
                "setValidator changes nothing: give jsonSchema, validator, validationLevel or validationAction".into()
            }),
            filter_problem(self.json_schema.as_ref(), "jsonSchema"),
            filter_problem(self.validator.as_ref(), "validator"),
        ]
    }

    async fn prepare(&self, db: &Database, _key: &str) -> Result<Prepared, ExecError> {
        let info = crate::mongo::collection_info(db, &self.collection)
            .await
            .map_err(mongo(format!("reading the options of collection {}", self.collection)))?;
        let Some(info) = info else {
            return Err(ExecError::Precondition(format!(
                "collection {} does not exist (setValidator changes an existing one; createCollection makes one with a validator)",
                self.collection
            )));
        };
        if info.get_str("type").is_ok_and(|t| t != "collection") {
            return Err(ExecError::Precondition(format!(
                "{} is a {}, not a collection",
                self.collection,
                info.get_str("type").unwrap_or("?")
            )));
        }
        let before = Options::of(&info);
        let op = Operation::SetValidator(self.clone());
        if self.already(&before)? {
            return Ok(Prepared::skip(op));
        }
        Ok(Prepared::new(op, vec![self.undo(&before)?]))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        x.db.run_command(self.command()?)
            .await
            .map_err(mongo(format!("changing the validator of collection {}", self.collection)))?;
        Ok(0)
    }
}
