//! Post-migration checks, each reported on its own.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::Database;
use serde::Serialize;

use super::bsonx;
use super::model::*;

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    /// The migration the check belongs to.
    pub migration: String,
    pub check: String,
    pub collection: String,
    pub passed: bool,
    /// What was found, in a sentence.
    pub message: String,
}

const EXAMPLES: i64 = 3;

/// The `_id`s of example documents, each cut to 64 characters: a check's message is written to
/// status and Events, readable by anyone who may view the resource, so it names documents by
/// `_id` only, never by their other values.
fn ids(docs: &[Document]) -> String {
    docs.iter()
        .map(|d| match d.get("_id") {
            Some(v) => {
                let s = v.to_string();
                match s.char_indices().nth(64) {
                    Some((end, _)) => format!("{}...", &s[..end]),
                    None => s,
                }
            }
            None => "(a result without _id)".to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Run one check. Errors reaching the server are returned as failed checks with the reason.
pub async fn run_check(db: &Database, migration: &str, check: &Check) -> CheckResult {
    let (passed, message) = match evaluate(db, check).await {
        Ok(r) => r,
        Err(e) => (false, format!("could not run the check: {e}")),
    };
    CheckResult {
        migration: migration.to_string(),
        check: check.kind().to_string(),
        collection: check.collection().to_string(),
        passed,
        message,
    }
}

async fn evaluate(db: &Database, check: &Check) -> Result<(bool, String), String> {
    let coll = db.collection::<Document>(check.collection());
    let e = |e: mongodb::error::Error| crate::mongo::describe(&e);
    match check {
        Check::Count(c) => {
            let f = bsonx::filter_doc(c.filter.as_ref())?;
            let n = coll.count_documents(f).await.map_err(e)?;
            let mut wrong = Vec::new();
            if let Some(x) = c.equals.filter(|x| n != *x) {
                wrong.push(format!("expected exactly {x}"));
            }
            if let Some(x) = c.max.filter(|x| n > *x) {
                wrong.push(format!("expected at most {x}"));
            }
            if let Some(x) = c.min.filter(|x| n < *x) {
                wrong.push(format!("expected at least {x}"));
            }
            Ok(if wrong.is_empty() {
                (true, format!("{n} document(s)"))
            } else {
                (false, format!("{n} document(s), {}", wrong.join(", ")))
            })
        }
        Check::IndexExists(c) => {
            let specs = crate::mongo::list_indexes(db, &c.collection).await.map_err(e)?;
            let found = match (&c.name, &c.keys) {
                (Some(n), _) => specs.iter().any(|s| s.get_str("name").ok() == Some(n.as_str())),
                (None, Some(k)) => {
                    let want = bsonx::map_to_doc(k)?;
                    specs.iter().any(|s| {
                        s.get_document("key")
                            .map(|key| {
                                key.len() == want.len()
                                    && key
                                        .iter()
                                        .zip(want.iter())
                                        .all(|((a, av), (b, bv))| a == b && num(av) == num(bv))
                            })
                            .unwrap_or(false)
                    })
                }
                (None, None) => false,
            };
            let what = c.name.clone().unwrap_or_else(|| {
                format!("{:?}", c.keys.as_ref().map(|k| serde_json::Value::Object(k.clone()).to_string()))
            });
            Ok(if found {
                (true, format!("index {what} exists"))
            } else {
                (false, format!("index {what} does not exist"))
            })
        }
        Check::JsonSchema(c) => {
            let schema = bsonx::to_doc(&c.schema)?;
            let q = bsonx::and(bsonx::filter_doc(c.filter.as_ref())?, doc! {"$nor": [{"$jsonSchema": schema}]});
            let n = coll.count_documents(q.clone()).await.map_err(e)?;
            if n == 0 {
                return Ok((true, "every document matches the schema".into()));
            }
            let sample: Vec<Document> = coll
                .find(q)
                .limit(EXAMPLES)
                .projection(doc! {"_id": 1})
                .await
                .map_err(e)?
                .try_collect()
                .await
                .map_err(e)?;
            Ok((false, format!("{n} document(s) do not match the schema, e.g. _id {}", ids(&sample))))
        }
        Check::Aggregate(c) => {
            let pipeline: Vec<Document> = c.pipeline.iter().map(bsonx::to_doc).collect::<Result<_, _>>()?;
            let mut cursor = coll.aggregate(pipeline).await.map_err(e)?;
            let mut found = Vec::new();
            let mut n = 0u64;
            while let Some(d) = cursor.try_next().await.map_err(e)? {
                n += 1;
                if found.len() < EXAMPLES as usize {
                    found.push(d);
                }
            }
            let what = c.description.clone().unwrap_or_else(|| "the aggregation".into());
            Ok(if n == 0 {
                (true, format!("{what}: no violations"))
            } else {
                (false, format!("{what}: {n} violation(s), e.g. _id {}", ids(&found)))
            })
        }
        Check::Unique(c) => {
            let names: Vec<&str> = c.keys.keys().map(String::as_str).collect();
            let (groups, examples) = duplicates(&coll, &c.keys, 1000).await.map_err(e)?;
            Ok(if groups == 0 {
                (true, format!("no two documents share {}", names.join(", ")))
            } else {
                let count = if groups >= 1000 { "at least 1000".to_string() } else { groups.to_string() };
                let names = names.join(", ");
                let message = format!(
                    "{count} value(s) of {names} repeat (a unique index on them would fail), e.g. _id {}",
                    ids(&examples)
                );
                (false, message)
            })
        }
    }
}

/// Groups of documents sharing the values of `keys`, at most `limit` counted: (groups found,
/// example `_id`s).
async fn duplicates(
    coll: &mongodb::Collection<Document>,
    keys: &serde_json::Map<String, serde_json::Value>,
    limit: i64,
) -> Result<(u64, Vec<Document>), mongodb::error::Error> {
    let mut group = Document::new();
    for (i, k) in keys.keys().enumerate() {
        // A missing field and null are one value to a unique index.
        group.insert(format!("k{i}"), doc! {"$ifNull": [format!("${k}"), Bson::Null]});
    }
    let pipeline = vec![
        doc! {"$group": {"_id": group, "n": {"$sum": 1}, "ids": {"$push": "$_id"}}},
        doc! {"$match": {"n": {"$gt": 1}}},
        doc! {"$limit": limit},
        doc! {"$project": {"_id": 0, "ids": {"$slice": ["$ids", 2]}}},
    ];
    let found: Vec<Document> = coll.aggregate(pipeline).allow_disk_use(true).await?.try_collect().await?;
    let mut examples = Vec::new();
    for g in &found {
        for id in g.get_array("ids").cloned().unwrap_or_default() {
            if examples.len() < EXAMPLES as usize {
                examples.push(doc! {"_id": id});
            }
        }
    }
    Ok((found.len() as u64, examples))
}

fn num(b: &Bson) -> String {
    match b {
        Bson::Int32(v) => v.to_string(),
        Bson::Int64(v) => v.to_string(),
        Bson::Double(v) => (*v as i64).to_string(),
        other => other.to_string(),
    }
}
