//! `createIndex`: compound, unique, TTL and partial indexes; undone by dropping the index
//! (an identical existing index is left alone).

use bson::{doc, Bson, Document};
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{data_err, filter_problem, mongo, DropIndex, Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateIndex {
    /// Collection name.
    pub collection: String,
    /// Index keys in order, e.g. `{ tenant: 1, createdAt: -1 }`.
    pub keys: serde_json::Map<String, Json>,
    /// Index name (default: MongoDB's generated name, e.g. `tenant_1_createdAt_-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Reject duplicate keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unique: bool,
    /// Skip documents that lack the indexed field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sparse: bool,
    /// TTL index: delete documents this many seconds after the date in the (single) key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after_seconds: Option<u32>,
    /// Partial index: only documents matching this filter are indexed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_filter_expression: Option<Json>,
}

impl CreateIndex {
    /// The index specification as `createIndexes` takes it.
    pub(crate) fn spec(&self) -> Result<Document, ExecError> {
        let keys = bsonx::map_to_doc(&self.keys).map_err(data_err)?;
        let name = self.name.clone().unwrap_or_else(|| {
            keys.iter()
                .map(|(k, v)| match v {
                    Bson::String(s) => format!("{k}_{s}"),
                    other => format!("{k}_{other}"),
                })
                .collect::<Vec<_>>()
                .join("_")
        });
        let mut spec = doc! {"key": keys, "name": name};
        if self.unique {
            spec.insert("unique", true);
        }
        if self.sparse {
            spec.insert("sparse", true);
        }
        if let Some(s) = self.expire_after_seconds {
            spec.insert("expireAfterSeconds", s as i64);
        }
        if let Some(p) = &self.partial_filter_expression {
            spec.insert("partialFilterExpression", bsonx::to_doc(p).map_err(data_err)?);
        }
        Ok(spec)
    }

    fn undo(&self, name: String) -> Vec<Operation> {
        vec![Operation::DropIndex(DropIndex { collection: self.collection.clone(), name })]
    }
}

/// Compare two index definitions, ignoring server-added fields and number types.
pub(crate) fn same_index(a: &Document, b: &Document) -> bool {
    let norm = |d: &Document| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = d
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "v" | "ns" | "background"))
            .map(|(k, v)| {
                let v = match v {
                    Bson::Document(d) => {
                        d.iter().map(|(k, v)| format!("{k}:{}", num_str(v))).collect::<Vec<_>>().join(",")
                    }
                    other => num_str(other),
                };
                (k.clone(), v)
            })
            .collect();
        v.sort();
        v
    };
    norm(a) == norm(b)
}

fn num_str(b: &Bson) -> String {
    match b {
        Bson::Int32(v) => v.to_string(),
        Bson::Int64(v) => v.to_string(),
        Bson::Double(v) if v.fract() == 0.0 => (*v as i64).to_string(),
        other => other.to_string(),
    }
}

impl Op for CreateIndex {
    const KIND: &'static str = "createIndex";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn check(&self) -> Vec<Option<String>> {
        let mut p = Vec::new();
        if self.keys.is_empty() {
            p.push(Some("`keys` is empty".into()));
        }
        for (k, v) in &self.keys {
            let ok = matches!(v.as_i64(), Some(1) | Some(-1))
                || matches!(v.as_str(), Some("2dsphere") | Some("2d") | Some("text") | Some("hashed"));
            if !ok {
                p.push(Some(format!(
                    "key `{k}`: direction must be 1, -1, \"2dsphere\", \"2d\", \"text\" or \"hashed\""
                )));
            }
            if k.is_empty() || k.starts_with('$') {
                p.push(Some(format!("key `{k}` is not a valid field path")));
            }
        }
        if self.expire_after_seconds.is_some() && self.keys.len() != 1 {
            p.push(Some("a TTL index (`expireAfterSeconds`) must have exactly one key".into()));
        }
        p.push(filter_problem(self.partial_filter_expression.as_ref(), "partialFilterExpression"));
        if self.name.as_deref() == Some("") {
            p.push(Some("`name` is empty".into()));
        }
        p
    }

    async fn prepare(&self, db: &Database, _key: &str) -> Result<Prepared, ExecError> {
        let spec = self.spec()?;
        let name = spec.get_str("name").unwrap_or_default().to_string();
        let existing = crate::mongo::list_indexes(db, &self.collection)
            .await
            .map_err(mongo(format!("listing indexes of {}", self.collection)))?;
        if let Some(e) = existing.iter().find(|e| e.get_str("name").ok() == Some(name.as_str())) {
            if same_index(e, &spec) {
                return Ok(Prepared::skip(Operation::CreateIndex(self.clone())));
            }
            return Err(ExecError::Precondition(format!(
                "index {name} already exists on {} with a different definition ({e}); drop it first or choose another name",
                self.collection
            )));
        }
        Ok(Prepared::new(Operation::CreateIndex(self.clone()), self.undo(name)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        x.db.run_command(doc! {"createIndexes": &self.collection, "indexes": [self.spec()?]})
            .await
            .map_err(mongo(format!("creating an index on {}", self.collection)))?;
        Ok(0)
    }
}
