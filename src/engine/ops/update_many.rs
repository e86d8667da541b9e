//! `updateMany`: update operators or an aggregation-pipeline update. The top-level fields it
//! can touch are kept as pre-images (whole documents when any field may change).

use bson::Document;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{count, data_err, filter_problem, in_session, mongo, restore};
use super::{Exec, ExecError, Op, Operation, Prepared, RestoreMode};
use crate::engine::bsonx::{self, top_field};
use crate::engine::preimages;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateMany {
    /// Collection name.
    pub collection: String,
    /// Documents matching this filter are updated (required; use `{}` for all).
    pub filter: Json,
    /// Update operators (`{ $set: {...} }`) or an aggregation pipeline (a list of stages).
    pub update: Json,
}

/// The top-level fields an update can change, when that can be told from the update itself:
/// update operators (`$set`, `$inc`, `$unset`, `$rename`, `$push`, ...) and pipelines made only of
/// `$set` / `$addFields` / `$unset` stages. `None` when any field may change.
pub(crate) fn touched_fields(update: &Json) -> Option<Vec<String>> {
    let mut fields: Vec<String> = Vec::new();
    let mut add = |path: &str| {
        let top = top_field(path).to_string();
        if !fields.contains(&top) {
            fields.push(top);
        }
    };
    match update {
        Json::Object(ops) => {
            for (op, args) in ops {
                for (path, value) in args.as_object()? {
                    add(path);
                    if op == "$rename" {
                        add(value.as_str()?);
                    }
                }
            }
        }
        Json::Array(stages) => {
            for stage in stages {
                let (name, args) = stage.as_object()?.iter().next()?;
                match (name.as_str(), args) {
                    ("$set" | "$addFields", Json::Object(m)) => m.keys().for_each(|k| add(k)),
                    ("$unset", Json::String(f)) => add(f),
                    ("$unset", Json::Array(fs)) => {
                        for f in fs {
                            add(f.as_str()?);
                        }
                    }
                    _ => return None,
                }
            }
        }
        _ => return None,
    }
    (!fields.is_empty() && !fields.iter().any(|f| f == "_id")).then_some(fields)
}

impl UpdateMany {
    fn query(&self) -> Result<Document, ExecError> {
        bsonx::to_doc(&self.filter).map_err(data_err)
    }

    /// Put back the stored fields (or whole documents).
    fn undo(&self, key: &str, fields: Option<Vec<String>>) -> Vec<Operation> {
        match fields {
            Some(f) => vec![restore(&self.collection, key, RestoreMode::Fields, f)],
            None => vec![restore(&self.collection, key, RestoreMode::Replace, vec![])],
        }
    }
}

impl Op for UpdateMany {
    const KIND: &'static str = "updateMany";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn is_data_operation(&self) -> bool {
        true
    }

    fn check(&self) -> Vec<Option<String>> {
        let mut p = vec![filter_problem(Some(&self.filter), "filter")];
        match &self.update {
            Json::Array(stages) => {
                if stages.is_empty() {
                    p.push(Some("`update` pipeline is empty".into()));
                }
                for (i, s) in stages.iter().enumerate() {
                    p.push(bsonx::to_doc(s).err().map(|e| format!("`update[{i}]`: {e}")));
                }
            }
            Json::Object(m) => {
                if m.is_empty() || !m.keys().all(|k| k.starts_with('$')) {
                    p.push(Some(
                        "`update` must contain only update operators such as `$set` (a replacement document is not allowed)"
                            .into(),
                    ));
                }
                p.push(filter_problem(Some(&self.update), "update"));
            }
            _ => p.push(Some("`update` must be a mapping of update operators or a list of pipeline stages".into())),
        }
        p
    }

    async fn prepare(&self, db: &Database, key: &str) -> Result<Prepared, ExecError> {
        // Only the top-level fields the update can touch are kept and put back; when any
        // field may change, whole pre-images.
        let fields = touched_fields(&self.update);
        preimages::capture(db, &self.collection, self.query()?, fields.as_deref(), key).await?;
        Ok(Prepared::new(Operation::UpdateMany(self.clone()), self.undo(key, fields)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let q = self.query()?;
        let coll = x.db.collection::<Document>(&self.collection);
        let s = &mut x.session;
        let r = match &self.update {
            Json::Array(stages) => {
                let p: Vec<Document> = stages.iter().map(bsonx::to_doc).collect::<Result<_, _>>().map_err(data_err)?;
                in_session!(coll.update_many(q, p), s)
            }
            u => in_session!(coll.update_many(q, bsonx::to_doc(u).map_err(data_err)?), s),
        }
        .map_err(mongo(format!("updating documents of {}", self.collection)))?;
        Ok(r.modified_count)
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        count(db, &self.collection, self.query()?).await
    }
}

#[cfg(test)]
mod tests {
    use super::touched_fields;
    use serde_json::json;

    #[test]
    fn fields_an_update_touches() {
        let f = |v| touched_fields(&v);
        assert_eq!(
            f(json!({"$set": {"a.b": 1, "c": 2}, "$inc": {"n": 1}})),
            Some(vec!["a".into(), "c".into(), "n".into()])
        );
        assert_eq!(f(json!({"$rename": {"x": "y.z"}})), Some(vec!["x".into(), "y".into()]));
        assert_eq!(f(json!({"$push": {"tags.$[]": "t"}})), Some(vec!["tags".into()]));
        assert_eq!(
            f(json!([{"$set": {"label": "x"}}, {"$unset": ["old", "older.x"]}])),
            Some(vec!["label".into(), "old".into(), "older".into()])
        );
        assert_eq!(f(json!([{"$replaceWith": {"a": 1}}])), None, "any field may change");
        assert_eq!(f(json!([{"$project": {"a": 1}}])), None);
    }
}
