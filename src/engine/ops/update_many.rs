//! `updateMany`: update operators or an aggregation-pipeline update. The top-level fields it
//! can touch are kept as pre-images (whole documents when any field may change).

use bson::Document;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use mongodb::options::UpdateModifications;

use super::{count, data_err, filter_problem, restore, Recompute};
use super::{Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx::{self, top_field};
use crate::engine::pass::{self, FieldUpdate, Pipeline, Rewritten};

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

    fn modifications(&self) -> Result<UpdateModifications, ExecError> {
        Ok(match &self.update {
            Json::Array(stages) => UpdateModifications::Pipeline(self.stages(stages)?),
            u => UpdateModifications::Document(bsonx::to_doc(u).map_err(data_err)?),
        })
    }

    fn stages(&self, stages: &[Json]) -> Result<Vec<Document>, ExecError> {
        stages.iter().map(bsonx::to_doc).collect::<Result<_, _>>().map_err(data_err)
    }

    /// Whether the update reads fields it does not write (a pipeline), or the filter (a
    /// positional `$` update): then whole documents are kept, to recompute it.
    fn reads_other_fields(&self) -> bool {
        self.update.is_array() || self.update.to_string().contains(".$")
    }

    /// Put back the fields it changed, whatever else changed since.
    fn undo(&self, key: &str) -> Vec<Operation> {
        let recompute = touched_fields(&self.update).map(|_| {
            let positional = self.update.to_string().contains(".$");
            Recompute::new(self.update.clone(), positional.then(|| self.filter.clone()))
        });
        vec![restore(&self.collection, key, recompute)]
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

    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::UpdateMany(self.clone()), self.undo(key)))
    }

    /// Each document changes only while what the update reads is as it was read. An update
    /// that may change any field is evaluated on the documents as read (`$documents`) and
    /// written whole, so undoing it knows which fields each document's change touched.
    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let (key, q) = (x.key.to_string(), self.query()?);
        match touched_fields(&self.update) {
            Some(fields) => {
                let whole_pre = self.reads_other_fields();
                let mut planner = FieldUpdate { filter: q.clone(), update: self.modifications()?, fields, whole_pre };
                pass::forward(&mut x.pass(&self.collection), &key, q, &mut planner, false).await
            }
            None => {
                let stages = match &self.update {
                    Json::Array(stages) => self.stages(stages)?,
                    _ => return Err(ExecError::Data("an update that may change any field is a pipeline".into())),
                };
                let db = x.db.clone();
                let mut planner = Rewritten { rewrite: Pipeline { db: &db, stages } };
                pass::forward(&mut x.pass(&self.collection), &key, q, &mut planner, false).await
            }
        }
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
