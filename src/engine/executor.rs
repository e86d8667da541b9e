//! Runs operations against one tenant database, and computes how to undo each one.
//!
//! Every operation runs in two phases. `prepare` checks preconditions and stores, in the tenant
//! database, whatever the operation is about to destroy (pre-images in `_dbshift_rollback`,
//! dropped collections moved aside); it returns the operations that undo it. `execute` then
//! changes the data. A failure at any point can therefore be undone exactly, from data that was
//! written before anything changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::{ClientSession, Collection, Database};

use super::bsonx::{self, and, filter_doc, top_field};
use super::model::*;
use super::rollback;
use super::tracking::DROPPED_PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The operation cannot run on this database as it is (a precondition failed).
    #[error("{0}")]
    Precondition(String),
    /// The operation's own input is wrong (found only at run time, e.g. a value that cannot convert).
    #[error("{0}")]
    Data(String),
    #[error("{action}: {}", super::describe(source))]
    Mongo {
        action: String,
        #[source]
        source: mongodb::error::Error,
    },
}

fn mongo(action: impl Into<String>) -> impl FnOnce(mongodb::error::Error) -> ExecError {
    let action = action.into();
    move |source| ExecError::Mongo { action, source }
}

fn data_err(e: String) -> ExecError {
    ExecError::Data(e)
}

/// Progress of long operations: (documents done, documents expected if known).
pub type Progress = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

/// The outcome of `prepare`.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The operation to execute (with run-time choices filled in, e.g. generated `_id`s).
    pub op: Operation,
    /// Operations that undo it, or why it cannot be undone.
    pub undo: Result<Vec<Operation>, String>,
    /// Nothing to do (e.g. the identical index already exists).
    pub skip: bool,
}

fn json(b: Bson) -> serde_json::Value {
    b.into_canonical_extjson()
}

async fn collection_exists(db: &Database, name: &str) -> Result<bool, ExecError> {
    let names = db
        .list_collection_names()
        .filter(doc! {"name": name})
        .await
        .map_err(mongo(format!("listing collections to find {name}")))?;
    Ok(!names.is_empty())
}

async fn index_specs(db: &Database, coll: &str) -> Result<Vec<Document>, ExecError> {
    if !collection_exists(db, coll).await? {
        return Ok(Vec::new());
    }
    let r = db.run_command(doc! {"listIndexes": coll}).await.map_err(mongo(format!("listing indexes of {coll}")))?;
    let batch = r.get_document("cursor").and_then(|c| c.get_array("firstBatch")).cloned().unwrap_or_default();
    Ok(batch.into_iter().filter_map(|b| b.as_document().cloned()).collect())
}

fn index_spec(o: &CreateIndex) -> Result<Document, ExecError> {
    let keys = bsonx::map_to_doc(&o.keys).map_err(data_err)?;
    let name = o.name.clone().unwrap_or_else(|| {
        keys.iter()
            .map(|(k, v)| {
                format!(
                    "{k}_{}",
                    match v {
                        Bson::String(s) => s.clone(),
                        other => other.to_string(),
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("_")
    });
    let mut spec = doc! {"key": keys, "name": name};
    if o.unique {
        spec.insert("unique", true);
    }
    if o.sparse {
        spec.insert("sparse", true);
    }
    if let Some(s) = o.expire_after_seconds {
        spec.insert("expireAfterSeconds", s as i64);
    }
    if let Some(p) = &o.partial_filter_expression {
        spec.insert("partialFilterExpression", bsonx::to_doc(p).map_err(data_err)?);
    }
    Ok(spec)
}

/// Compare two index definitions, ignoring server-added fields and number types.
fn same_index(a: &Document, b: &Document) -> bool {
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

fn restore(collection: &str, key: &str, mode: RestoreMode, unset: Vec<String>) -> Operation {
    Operation::RestorePreimages(RestorePreimages {
        collection: collection.to_string(),
        key: key.to_string(),
        mode,
        unset,
    })
}

/// Phase one: check preconditions, store what will be destroyed, and work out the undo.
pub async fn prepare(db: &Database, op: &Operation, key: &str) -> Result<Prepared, ExecError> {
    let ok = |undo: Vec<Operation>| Ok(Prepared { op: op.clone(), undo: Ok(undo), skip: false });
    match op {
        Operation::AddField(o) => {
            let value = bsonx::to_bson(&o.value).map_err(data_err)?;
            let top = top_field(&o.field).to_string();
            // Documents that already hold the value are not touched by `up`, but the undo
            // (unset where field == value) would reach them: keep them as they are.
            rollback::capture(db, &o.collection, doc! {&o.field: value.clone()}, Some(std::slice::from_ref(&top)), key)
                .await?;
            let mut unset = doc! {};
            unset.insert(&o.field, "");
            ok(vec![
                Operation::UpdateMany(UpdateMany {
                    collection: o.collection.clone(),
                    filter: serde_json::json!({ &o.field: json(value) }),
                    update: serde_json::json!({ "$unset": { &o.field: "" } }),
                }),
                restore(&o.collection, key, RestoreMode::Fields, vec![top]),
            ])
        }
        Operation::RemoveField(o) => {
            let q = and(filter_doc(o.filter.as_ref()).map_err(data_err)?, doc! {&o.field: {"$exists": true}});
            let top = top_field(&o.field).to_string();
            rollback::capture(db, &o.collection, q, Some(std::slice::from_ref(&top)), key).await?;
            ok(vec![restore(&o.collection, key, RestoreMode::Fields, vec![top])])
        }
        Operation::RenameField(o) => {
            let (tf, tt) = (top_field(&o.from).to_string(), top_field(&o.to).to_string());
            let fields: Vec<String> = if tf == tt { vec![tf.clone()] } else { vec![tf.clone(), tt.clone()] };
            // Documents that already have `to`: the rename overwrites it, and the reverse rename
            // must not move it. Keep both fields of those documents.
            rollback::capture(db, &o.collection, doc! {&o.to: {"$exists": true}}, Some(&fields), key).await?;
            ok(vec![
                Operation::UpdateMany(UpdateMany {
                    collection: o.collection.clone(),
                    filter: serde_json::json!({ &o.to: { "$exists": true }, &o.from: { "$exists": false } }),
                    update: serde_json::json!({ "$rename": { &o.to: &o.from } }),
                }),
                restore(&o.collection, key, RestoreMode::Fields, fields),
            ])
        }
        Operation::ConvertType(o) => {
            let top = top_field(&o.field).to_string();
            rollback::capture(db, &o.collection, convert_query(o)?, Some(std::slice::from_ref(&top)), key).await?;
            ok(vec![restore(&o.collection, key, RestoreMode::Fields, vec![top])])
        }
        Operation::CreateIndex(o) => {
            let spec = index_spec(o)?;
            let name = spec.get_str("name").unwrap_or_default().to_string();
            let existing = index_specs(db, &o.collection).await?;
            if let Some(e) = existing.iter().find(|e| e.get_str("name").ok() == Some(name.as_str())) {
                if same_index(e, &spec) {
                    return Ok(Prepared { op: op.clone(), undo: Ok(vec![]), skip: true });
                }
                return Err(ExecError::Precondition(format!(
                    "index {name} already exists on {} with a different definition ({e}); drop it first or choose another name",
                    o.collection
                )));
            }
            ok(vec![Operation::DropIndex(DropIndex { collection: o.collection.clone(), name })])
        }
        Operation::DropIndex(o) => {
            let existing = index_specs(db, &o.collection).await?;
            let Some(spec) = existing.into_iter().find(|e| e.get_str("name").ok() == Some(o.name.as_str())) else {
                return Err(ExecError::Precondition(format!("index {} does not exist on {}", o.name, o.collection)));
            };
            let mut spec = spec;
            spec.remove("v");
            spec.remove("ns");
            let mut cmd = serde_json::Map::new();
            cmd.insert("createIndexes".into(), serde_json::Value::String(o.collection.clone()));
            cmd.insert("indexes".into(), serde_json::Value::Array(vec![json(Bson::Document(spec))]));
            ok(vec![Operation::RunCommand(RunCommand { command: cmd })])
        }
        Operation::CreateCollection(o) => {
            if collection_exists(db, &o.collection).await? {
                return Err(ExecError::Precondition(format!("collection {} already exists", o.collection)));
            }
            ok(vec![Operation::DropCollection(CollectionRef { collection: o.collection.clone() })])
        }
        Operation::DropCollection(o) => {
            if !collection_exists(db, &o.collection).await? {
                return Err(ExecError::Precondition(format!("collection {} does not exist", o.collection)));
            }
            let aside = aside_name(key, &o.collection);
            Ok(Prepared {
                op: Operation::RenameCollection(RenameCollection { from: o.collection.clone(), to: aside.clone() }),
                undo: Ok(vec![Operation::RenameCollection(RenameCollection { from: aside, to: o.collection.clone() })]),
                skip: false,
            })
        }
        Operation::RenameCollection(o) => {
            if !collection_exists(db, &o.from).await? {
                return Err(ExecError::Precondition(format!("collection {} does not exist", o.from)));
            }
            if collection_exists(db, &o.to).await? {
                return Err(ExecError::Precondition(format!(
                    "cannot rename {} to {}: {} already exists",
                    o.from, o.to, o.to
                )));
            }
            ok(vec![Operation::RenameCollection(RenameCollection { from: o.to.clone(), to: o.from.clone() })])
        }
        Operation::InsertDocuments(o) => {
            let mut docs = Vec::new();
            let mut ids = Vec::new();
            for d in &o.documents {
                let mut d = bsonx::map_to_doc(d).map_err(data_err)?;
                if !d.contains_key("_id") {
                    let mut with_id = doc! {"_id": bson::oid::ObjectId::new()};
                    with_id.extend(d);
                    d = with_id;
                }
                ids.push(d.get("_id").cloned().unwrap_or(Bson::Null));
                match json(Bson::Document(d)) {
                    serde_json::Value::Object(m) => docs.push(m),
                    _ => unreachable!(),
                }
            }
            Ok(Prepared {
                op: Operation::InsertDocuments(InsertDocuments { collection: o.collection.clone(), documents: docs }),
                undo: Ok(vec![Operation::DeleteDocuments(DeleteDocuments {
                    collection: o.collection.clone(),
                    filter: serde_json::json!({ "_id": { "$in": json(Bson::Array(ids)) } }),
                })]),
                skip: false,
            })
        }
        Operation::DeleteDocuments(o) => {
            rollback::capture(db, &o.collection, bsonx::to_doc(&o.filter).map_err(data_err)?, None, key).await?;
            ok(vec![restore(&o.collection, key, RestoreMode::Replace, vec![])])
        }
        Operation::UpdateMany(o) => {
            let filter = bsonx::to_doc(&o.filter).map_err(data_err)?;
            match touched_fields(&o.update) {
                // Only the top-level fields the update can touch are kept and put back.
                Some(fields) => {
                    rollback::capture(db, &o.collection, filter, Some(&fields), key).await?;
                    ok(vec![restore(&o.collection, key, RestoreMode::Fields, fields)])
                }
                // Any field may change: whole pre-images go back.
                None => {
                    rollback::capture(db, &o.collection, filter, None, key).await?;
                    ok(vec![restore(&o.collection, key, RestoreMode::Replace, vec![])])
                }
            }
        }
        // Pre-images of the documents a transform changes are written while it runs, before
        // the changed documents are merged back.
        Operation::Transform(o) => ok(vec![restore(&o.collection, key, RestoreMode::Replace, vec![])]),
        Operation::RunCommand(_) => Ok(Prepared {
            op: op.clone(),
            undo: Err("runCommand has no automatic inverse; give the migration an explicit `down`".into()),
            skip: false,
        }),
        Operation::RestorePreimages(_) => Ok(Prepared {
            op: op.clone(),
            undo: Err("putting rollback data back cannot itself be undone".into()),
            skip: false,
        }),
    }
}

fn aside_name(key: &str, coll: &str) -> String {
    let k: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("{DROPPED_PREFIX}{k}_{coll}")
}

/// The top-level fields an update can change, when that can be told from the update itself:
/// update operators (`$set`, `$inc`, `$unset`, `$rename`, `$push`, ...) and pipelines made only of
/// `$set` / `$addFields` / `$unset` stages. `None` when any field may change.
fn touched_fields(update: &serde_json::Value) -> Option<Vec<String>> {
    let mut fields: Vec<String> = Vec::new();
    let mut add = |path: &str| {
        let top = top_field(path).to_string();
        if !fields.contains(&top) {
            fields.push(top);
        }
    };
    match update {
        serde_json::Value::Object(ops) => {
            for (op, args) in ops {
                let args = args.as_object()?;
                for (path, value) in args {
                    add(path);
                    if op == "$rename" {
                        add(value.as_str()?);
                    }
                }
            }
        }
        serde_json::Value::Array(stages) => {
            for stage in stages {
                let (name, args) = stage.as_object()?.iter().next()?;
                match (name.as_str(), args) {
                    ("$set" | "$addFields", serde_json::Value::Object(m)) => m.keys().for_each(|k| add(k)),
                    ("$unset", serde_json::Value::String(f)) => add(f),
                    ("$unset", serde_json::Value::Array(fs)) => {
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

fn convert_query(o: &ConvertType) -> Result<Document, ExecError> {
    let type_cond = match o.from {
        Some(from) => doc! {"$type": from.mongo_name()},
        None => doc! {"$exists": true, "$ne": null, "$not": {"$type": o.to.mongo_name()}},
    };
    Ok(and(filter_doc(o.filter.as_ref()).map_err(data_err)?, doc! {&o.field: type_cond}))
}

/// Run a session-aware driver action: inside the transaction when there is one.
macro_rules! in_session {
    ($action:expr, $session:expr) => {
        match $session {
            Some(s) => $action.session(&mut **s).await,
            None => $action.await,
        }
    };
}

/// Phase two: change the data. Returns the number of documents affected.
pub async fn execute(
    db: &Database,
    prepared: &Prepared,
    key: &str,
    mut session: Option<&mut ClientSession>,
    progress: Option<Progress>,
) -> Result<u64, ExecError> {
    if prepared.skip {
        return Ok(0);
    }
    let coll = |name: &str| -> Collection<Document> { db.collection(name) };
    let s = &mut session;
    match &prepared.op {
        Operation::AddField(o) => {
            let value = bsonx::to_bson(&o.value).map_err(data_err)?;
            let q = and(filter_doc(o.filter.as_ref()).map_err(data_err)?, doc! {&o.field: {"$exists": false}});
            let r = in_session!(coll(&o.collection).update_many(q, doc! {"$set": {&o.field: value}}), s)
                .map_err(mongo(format!("adding {} to {}", o.field, o.collection)))?;
            Ok(r.modified_count)
        }
        Operation::RemoveField(o) => {
            let q = and(filter_doc(o.filter.as_ref()).map_err(data_err)?, doc! {&o.field: {"$exists": true}});
            let r = in_session!(coll(&o.collection).update_many(q, doc! {"$unset": {&o.field: ""}}), s)
                .map_err(mongo(format!("removing {} from {}", o.field, o.collection)))?;
            Ok(r.modified_count)
        }
        Operation::RenameField(o) => {
            let q = and(filter_doc(o.filter.as_ref()).map_err(data_err)?, doc! {&o.from: {"$exists": true}});
            let r = in_session!(coll(&o.collection).update_many(q, doc! {"$rename": {&o.from: &o.to}}), s)
                .map_err(mongo(format!("renaming {} to {} in {}", o.from, o.to, o.collection)))?;
            Ok(r.modified_count)
        }
        Operation::ConvertType(o) => {
            let q = convert_query(o)?;
            let input = format!("${}", o.field);
            let mut convert = doc! {"input": &input, "to": o.to.mongo_name()};
            match o.on_error {
                OnConvertError::SetNull => convert.insert("onError", Bson::Null),
                OnConvertError::Keep => convert.insert("onError", &input),
                // No onError: the server stops at the first value it cannot convert (and the
                // step is undone from its pre-images), with no second pass over the collection.
                OnConvertError::Fail => None,
            };
            let pipeline = vec![doc! {"$set": {&o.field: {"$convert": convert}}}];
            let r = in_session!(coll(&o.collection).update_many(q.clone(), pipeline), s);
            match r {
                Ok(r) => Ok(r.modified_count),
                Err(e) if o.on_error == OnConvertError::Fail && error_code(&e) == Some(CONVERSION_FAILURE) => {
                    Err(conversion_failure(&coll(&o.collection), o, q).await)
                }
                Err(e) => Err(mongo(format!("converting {} in {} to {}", o.field, o.collection, o.to.mongo_name()))(e)),
            }
        }
        Operation::CreateIndex(o) => {
            let spec = index_spec(o)?;
            db.run_command(doc! {"createIndexes": &o.collection, "indexes": [spec]})
                .await
                .map_err(mongo(format!("creating an index on {}", o.collection)))?;
            Ok(0)
        }
        Operation::DropIndex(o) => {
            match db.run_command(doc! {"dropIndexes": &o.collection, "index": &o.name}).await {
                Ok(_) => Ok(0),
                // Undoing a createIndex that never completed.
                Err(e) if error_code(&e) == Some(27) => Ok(0),
                Err(e) => Err(mongo(format!("dropping index {} of {}", o.name, o.collection))(e)),
            }
        }
        Operation::CreateCollection(o) => {
            let mut cmd = doc! {"create": &o.collection};
            let schema = o.json_schema.as_ref().map(bsonx::to_doc).transpose().map_err(data_err)?;
            let other = o.validator.as_ref().map(bsonx::to_doc).transpose().map_err(data_err)?;
            let validator = match (schema, other) {
                (Some(s), Some(v)) => Some(doc! {"$and": [{"$jsonSchema": s}, v]}),
                (Some(s), None) => Some(doc! {"$jsonSchema": s}),
                (None, v) => v,
            };
            if let Some(v) = validator {
                cmd.insert("validator", v);
            }
            if let Some(l) = o.validation_level {
                cmd.insert("validationLevel", serde_json::to_value(l).unwrap().as_str().unwrap());
            }
            if let Some(a) = o.validation_action {
                cmd.insert("validationAction", serde_json::to_value(a).unwrap().as_str().unwrap());
            }
            db.run_command(cmd).await.map_err(mongo(format!("creating collection {}", o.collection)))?;
            Ok(0)
        }
        Operation::DropCollection(o) => {
            // Only reached when undoing createCollection: the data goes aside, not away.
            if !collection_exists(db, &o.collection).await? {
                return Ok(0);
            }
            let aside = aside_name(key, &o.collection);
            rename_collection(db, &o.collection, &aside).await?;
            Ok(0)
        }
        Operation::RenameCollection(o) => {
            rename_collection(db, &o.from, &o.to).await?;
            Ok(0)
        }
        Operation::InsertDocuments(o) => {
            let docs: Vec<Document> =
                o.documents.iter().map(bsonx::map_to_doc).collect::<Result<_, _>>().map_err(data_err)?;
            let r = in_session!(coll(&o.collection).insert_many(docs), s)
                .map_err(mongo(format!("inserting documents into {}", o.collection)))?;
            Ok(r.inserted_ids.len() as u64)
        }
        Operation::DeleteDocuments(o) => {
            let q = bsonx::to_doc(&o.filter).map_err(data_err)?;
            let r = in_session!(coll(&o.collection).delete_many(q), s)
                .map_err(mongo(format!("deleting documents from {}", o.collection)))?;
            Ok(r.deleted_count)
        }
        Operation::UpdateMany(o) => {
            let q = bsonx::to_doc(&o.filter).map_err(data_err)?;
            let r = match &o.update {
                serde_json::Value::Array(stages) => {
                    let p: Vec<Document> =
                        stages.iter().map(bsonx::to_doc).collect::<Result<_, _>>().map_err(data_err)?;
                    in_session!(coll(&o.collection).update_many(q, p), s)
                }
                u => in_session!(coll(&o.collection).update_many(q, bsonx::to_doc(u).map_err(data_err)?), s),
            }
            .map_err(mongo(format!("updating documents of {}", o.collection)))?;
            Ok(r.modified_count)
        }
        Operation::Transform(o) => run_transform(db, o, key, progress).await,
        Operation::RunCommand(o) => {
            let cmd = bsonx::map_to_doc(&o.command).map_err(data_err)?;
            let name = cmd.keys().next().cloned().unwrap_or_default();
            db.run_command(cmd).await.map_err(mongo(format!("running command {name}")))?;
            Ok(0)
        }
        Operation::RestorePreimages(r) => rollback::restore(db, r).await,
    }
}

/// The server's code for a `$convert` without `onError` that met a value it cannot convert.
const CONVERSION_FAILURE: i32 = 241;

/// Which values stopped a `convertType` (`onError: fail`): how many, and one example. Looked
/// up outside any transaction (the failure aborted it); the values that failed are unchanged.
async fn conversion_failure(coll: &Collection<Document>, o: &ConvertType, q: Document) -> ExecError {
    let input = format!("${}", o.field);
    let fails =
        doc! {"$expr": {"$eq": [{"$convert": {"input": &input, "to": o.to.mongo_name(), "onError": null}}, null]}};
    let q = and(q, fails);
    let found = async {
        let example = coll.find_one(q.clone()).await?;
        let n = coll.count_documents(q).await?;
        Ok::<_, mongodb::error::Error>((n, example))
    }
    .await;
    match found {
        Ok((n, Some(d))) => ExecError::Data(format!(
            "{n} value(s) of {} in {} cannot be converted to {}, e.g. {} in the document with _id {} \
             (set `onError: keep` or `onError: setNull` to allow this)",
            o.field,
            o.collection,
            o.to.mongo_name(),
            d.get(&o.field).map(|v| v.to_string()).unwrap_or_else(|| "(nested)".into()),
            d.get("_id").map(|v| v.to_string()).unwrap_or_default()
        )),
        _ => ExecError::Data(format!(
            "a value of {} in {} cannot be converted to {} (set `onError: keep` or `onError: setNull` to allow this)",
            o.field,
            o.collection,
            o.to.mongo_name()
        )),
    }
}

pub fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

async fn rename_collection(db: &Database, from: &str, to: &str) -> Result<(), ExecError> {
    let name = db.name();
    db.client()
        .database("admin")
        .run_command(
            doc! {"renameCollection": format!("{name}.{from}"), "to": format!("{name}.{to}"), "dropTarget": false},
        )
        .await
        .map_err(mongo(format!("renaming collection {from} to {to}")))?;
    Ok(())
}

/// `transform`: read in batches, run the script on a thread of its own, write back cheaply.
///
/// Only changed documents are written. Their pre-images go to the step's rollback data
/// (packed chunks), then the new versions replace them a batch at a time (see
/// [`rollback::replace_documents`]: one transaction per batch where the server has them,
/// which costs a server far less than one update per document). Reading, JavaScript and
/// writing overlap, with at most two batches in flight between each stage.
async fn run_transform(db: &Database, o: &Transform, key: &str, progress: Option<Progress>) -> Result<u64, ExecError> {
    let source = db.collection::<RawDocumentBuf>(&o.collection);
    let filter = filter_doc(o.filter.as_ref()).map_err(data_err)?;
    let batch_size = o.batch_size.unwrap_or(1000).max(1) as usize;
    // Counted beside the reading, and only for a progress report.
    let count = progress.as_ref().map(|_| super::count::BackgroundCount::start(&source, Some(filter.clone())));
    let total = || count.as_ref().and_then(super::count::BackgroundCount::get);
    let txn = super::runner::supports_transactions(db).await;

    type Changes = (Vec<RawDocumentBuf>, Vec<RawDocumentBuf>);
    let (to_js, mut js_in) = tokio::sync::mpsc::channel::<Vec<RawDocumentBuf>>(2);
    let (js_out, mut from_js) = tokio::sync::mpsc::channel::<Result<Changes, String>>(2);
    let script = o.script.clone();
    let js = std::thread::Builder::new()
        .name("dbshift-transform".into())
        .spawn(move || {
            let t = match super::transform::Transformer::new(&script) {
                Ok(t) => t,
                Err(e) => {
                    let _ = js_out.blocking_send(Err(e));
                    return;
                }
            };
            let mut busy = Duration::ZERO;
            while let Some(docs) = js_in.blocking_recv() {
                let started = Instant::now();
                let r = t.run_batch(&docs).map(|outs| {
                    let (mut pre, mut new) = (Vec::new(), Vec::new());
                    for (old, out) in docs.into_iter().zip(outs) {
                        if let Some(n) = out {
                            new.push(n);
                            pre.push(old);
                        }
                    }
                    (pre, new)
                });
                busy += started.elapsed();
                let failed = r.is_err();
                if js_out.blocking_send(r).is_err() || failed {
                    break;
                }
            }
            tracing::debug!(script_seconds = busy.as_secs_f64(), "transform: time spent in the script");
        })
        .map_err(|e| ExecError::Data(format!("cannot start the transform thread: {e}")))?;

    let mut store = rollback::Writer::create(db, key).await?;
    let (db_w, target) = (db.clone(), source.clone());
    let writer = tokio::spawn(async move {
        let (mut changed, mut storing, mut writing) = (0u64, Duration::ZERO, Duration::ZERO);
        while let Some(batch) = from_js.recv().await {
            let (pre, new) = batch.map_err(ExecError::Data)?;
            changed += new.len() as u64;
            // Pre-images are stored before their documents change.
            let t = Instant::now();
            for p in &pre {
                store.push(p).await?;
            }
            store.sync().await?;
            storing += t.elapsed();
            let t = Instant::now();
            rollback::replace_documents(&db_w, &target, new, txn, false).await?;
            writing += t.elapsed();
        }
        tracing::debug!(
            rollback_seconds = storing.as_secs_f64(),
            write_seconds = writing.as_secs_f64(),
            "transform: time spent storing pre-images and writing documents"
        );
        Ok::<u64, ExecError>(changed)
    });

    let read = async {
        let mut cursor = source
            .find(filter)
            .batch_size(batch_size as u32)
            .await
            .map_err(mongo(format!("reading {}", o.collection)))?;
        let mut batch = Vec::with_capacity(batch_size);
        let mut done = 0u64;
        while let Some(d) = cursor.try_next().await.map_err(mongo(format!("reading {}", o.collection)))? {
            batch.push(d);
            if batch.len() == batch_size {
                done += batch.len() as u64;
                if to_js.send(std::mem::replace(&mut batch, Vec::with_capacity(batch_size))).await.is_err() {
                    return Ok(()); // the script failed; the writer reports why
                }
                if let Some(p) = &progress {
                    p(done, total());
                }
            }
        }
        if !batch.is_empty() {
            done += batch.len() as u64;
            let _ = to_js.send(batch).await;
        }
        if let Some(p) = &progress {
            p(done, total());
        }
        Ok::<(), ExecError>(())
    };
    let read_result = read.await;
    drop(to_js);
    let written = writer.await.map_err(|e| ExecError::Data(format!("transform writer stopped: {e}")))?;
    let _ = js.join();
    read_result?;
    written
}

/// How many documents an operation would touch (for plans), when that can be known cheaply.
pub async fn estimate(db: &Database, op: &Operation) -> Result<Option<u64>, ExecError> {
    let count = |c: &str, q: Document| {
        let c = db.collection::<Document>(c);
        async move { c.count_documents(q).await.map(Some).map_err(mongo("counting documents for the plan")) }
    };
    match op {
        Operation::AddField(o) => {
            count(
                &o.collection,
                and(filter_doc(o.filter.as_ref()).map_err(data_err)?, doc! {&o.field: {"$exists": false}}),
            )
            .await
        }
        Operation::RemoveField(o) => {
            count(
                &o.collection,
                and(filter_doc(o.filter.as_ref()).map_err(data_err)?, doc! {&o.field: {"$exists": true}}),
            )
            .await
        }
        Operation::RenameField(o) => {
            count(
                &o.collection,
                and(filter_doc(o.filter.as_ref()).map_err(data_err)?, doc! {&o.from: {"$exists": true}}),
            )
            .await
        }
        Operation::ConvertType(o) => count(&o.collection, convert_query(o)?).await,
        Operation::DeleteDocuments(o) => count(&o.collection, bsonx::to_doc(&o.filter).map_err(data_err)?).await,
        Operation::UpdateMany(o) => count(&o.collection, bsonx::to_doc(&o.filter).map_err(data_err)?).await,
        Operation::Transform(o) => count(&o.collection, filter_doc(o.filter.as_ref()).map_err(data_err)?).await,
        Operation::InsertDocuments(o) => Ok(Some(o.documents.len() as u64)),
        Operation::DropCollection(o) => count(&o.collection, doc! {}).await,
        _ => Ok(None),
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
