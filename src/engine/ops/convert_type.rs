//! `convertType`: convert a field's values to another BSON type; the previous values are
//! kept as pre-images.

use bson::{doc, Bson, Document};
use mongodb::{Collection, Database};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{count, data_err, field_problem, filter_problem, mongo, restore, Recompute};
use super::{Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx::{and, filter_doc, top_field};
use crate::engine::pass::{self, FieldUpdate};
use crate::mongo::{code, error_code};

/// Target BSON types for `convertType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BsonType {
    String,
    Int,
    Long,
    Double,
    Decimal,
    Bool,
    Date,
    ObjectId,
}

impl BsonType {
    /// The name MongoDB's `$convert` and `$type` use.
    pub fn mongo_name(self) -> &'static str {
        match self {
            BsonType::String => "string",
            BsonType::Int => "int",
            BsonType::Long => "long",
            BsonType::Double => "double",
            BsonType::Decimal => "decimal",
            BsonType::Bool => "bool",
            BsonType::Date => "date",
            BsonType::ObjectId => "objectId",
        }
    }
}

/// What `convertType` does with a value that cannot be converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnConvertError {
    /// Stop the migration (and undo it) at the first value that cannot be converted.
    #[default]
    Fail,
    /// Leave such values as they are.
    Keep,
    /// Set such values to null.
    SetNull,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConvertType {
    /// Collection name.
    pub collection: String,
    /// Field path (dots for nested fields).
    pub field: String,
    /// The type to convert to.
    pub to: BsonType,
    /// Convert only values currently of this type (default: any type other than `to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<BsonType>,
    /// What to do with values that cannot be converted.
    #[serde(default)]
    pub on_error: OnConvertError,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

impl ConvertType {
    /// The documents whose value is to convert.
    fn query(&self) -> Result<Document, ExecError> {
        let type_cond = match self.from {
            Some(from) => doc! {"$type": from.mongo_name()},
            None => doc! {"$exists": true, "$ne": null, "$not": {"$type": self.to.mongo_name()}},
        };
        Ok(and(filter_doc(self.filter.as_ref()).map_err(data_err)?, doc! {&self.field: type_cond}))
    }

    /// The conversion, as an update pipeline.
    fn pipeline(&self) -> Vec<Document> {
        let input = format!("${}", self.field);
        let mut convert = doc! {"input": &input, "to": self.to.mongo_name()};
        match self.on_error {
            OnConvertError::SetNull => convert.insert("onError", Bson::Null),
            OnConvertError::Keep => convert.insert("onError", &input),
            // No onError: the server stops at the first value it cannot convert (and the
            // step is undone from its pre-images).
            OnConvertError::Fail => None,
        };
        vec![doc! {"$set": {&self.field: {"$convert": convert}}}]
    }

    /// Put the stored values back.
    fn undo(&self, key: &str) -> Vec<Operation> {
        let update = serde_json::Value::Array(
            self.pipeline().into_iter().map(|d| Bson::Document(d).into_canonical_extjson()).collect(),
        );
        vec![restore(&self.collection, key, Some(Recompute::new(update, None)))]
    }

    /// Which values stopped a conversion (`onError: fail`): how many, and one example. Looked
    /// up outside any transaction (the failure aborted it); the values that failed are unchanged.
    async fn failure(&self, coll: &Collection<Document>, q: Document) -> ExecError {
        let input = format!("${}", self.field);
        let fails = doc! {"$expr": {"$eq": [{"$convert": {"input": &input, "to": self.to.mongo_name(), "onError": null}}, null]}};
        let q = and(q, fails);
        let found = async {
            let example = coll.find_one(q.clone()).await?;
            let n = coll.count_documents(q).await?;
            Ok::<_, mongodb::error::Error>((n, example))
        }
        .await;
        let to = self.to.mongo_name();
        let hint = "(set `onError: keep` or `onError: setNull` to allow this)";
        match found {
            Ok((n, Some(d))) => ExecError::Data(format!(
                "{n} value(s) of {} in {} cannot be converted to {to}, e.g. a {} in the document with _id {} {hint}",
                self.field,
                self.collection,
                // Its type, not its value: the message goes to status and Events.
                d.get(&self.field).map(crate::engine::bsonx::type_name_mongo).unwrap_or("nested value"),
                d.get("_id").map(|v| v.to_string()).unwrap_or_default()
            )),
            _ => ExecError::Data(format!(
                "a value of {} in {} cannot be converted to {to} {hint}",
                self.field, self.collection
            )),
        }
    }
}

impl Op for ConvertType {
    const KIND: &'static str = "convertType";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn is_data_operation(&self) -> bool {
        true
    }

    fn check(&self) -> Vec<Option<String>> {
        let mut p = vec![field_problem(&self.field, "field")];
        if self.from == Some(self.to) {
            p.push(Some("`from` and `to` are the same type".into()));
        }
        p.push(filter_problem(self.filter.as_ref(), "filter"));
        p
    }

    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::ConvertType(self.clone()), self.undo(key)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let q = self.query()?;
        let mut planner = FieldUpdate {
            filter: q.clone(),
            update: self.pipeline().into(),
            fields: vec![top_field(&self.field).to_string()],
            whole_pre: false,
        };
        // Converted values no longer match: run again for documents that arrived meanwhile
        // (not with `keep`, whose unconvertible values would match every time).
        let catch_up = self.on_error != OnConvertError::Keep;
        let key = x.key.to_string();
        match pass::forward(&mut x.pass(&self.collection), &key, q.clone(), &mut planner, catch_up).await {
            Err(ExecError::Mongo { source, .. })
                if self.on_error == OnConvertError::Fail && error_code(&source) == Some(code::CONVERSION_FAILURE) =>
            {
                Err(self.failure(&x.db.collection(&self.collection), q).await)
            }
            Err(ExecError::Mongo { source, .. }) => {
                Err(mongo(format!("converting {} in {} to {}", self.field, self.collection, self.to.mongo_name()))(
                    source,
                ))
            }
            r => r,
        }
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        count(db, &self.collection, self.query()?).await
    }
}
