//! `transform`: a JavaScript function run over every document (matching a filter), in
//! batches; changed documents' pre-images are stored before they are written back.

use std::time::{Duration, Instant};

use bson::RawDocumentBuf;
use futures::TryStreamExt;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{count, data_err, filter_problem, mongo, restore, Progress};
use super::{Exec, ExecError, Op, Operation, Prepared, RestoreMode};
use crate::engine::bsonx::filter_doc;
use crate::engine::count::BackgroundCount;
use crate::engine::{preimages, script};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Transform {
    /// Collection name.
    pub collection: String,
    /// A JavaScript function `(doc) => { ...; return doc; }`. Returning null or undefined
    /// leaves the document unchanged. `_id` cannot be changed.
    pub script: String,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
    /// Documents per batch (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
}

impl Transform {
    /// Replace the changed documents with their stored pre-images.
    fn undo(&self, key: &str) -> Vec<Operation> {
        vec![restore(&self.collection, key, RestoreMode::Replace, vec![])]
    }
}

impl Op for Transform {
    const KIND: &'static str = "transform";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![
            filter_problem(self.filter.as_ref(), "filter"),
            (self.batch_size == Some(0)).then(|| "`batchSize` must be at least 1".to_string()),
            script::compile_check(&self.script).err().map(|e| format!("`script`: {e}")),
        ]
    }

    /// Pre-images of the documents a transform changes are written while it runs, before
    /// the changed documents are written back.
    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::Transform(self.clone()), self.undo(key)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        run(x.db, self, x.key, x.progress.clone()).await
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        count(db, &self.collection, filter_doc(self.filter.as_ref()).map_err(data_err)?).await
    }
}

/// Changed documents from the script: (pre-images, new versions).
type Changes = (Vec<RawDocumentBuf>, Vec<RawDocumentBuf>);

/// The script's thread: batches in, changed documents out.
fn start_script(
    source: String,
    mut batches: tokio::sync::mpsc::Receiver<Vec<RawDocumentBuf>>,
    out: tokio::sync::mpsc::Sender<Result<Changes, String>>,
) -> Result<std::thread::JoinHandle<()>, ExecError> {
    std::thread::Builder::new()
        .name("dbshift-transform".into())
        .spawn(move || {
            let t = match script::Transformer::new(&source) {
                Ok(t) => t,
                Err(e) => {
                    let _ = out.blocking_send(Err(e));
                    return;
                }
            };
            let mut busy = Duration::ZERO;
            while let Some(docs) = batches.blocking_recv() {
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
                if out.blocking_send(r).is_err() || failed {
                    break;
                }
            }
            tracing::debug!(script_seconds = busy.as_secs_f64(), "transform: time spent in the script");
        })
        .map_err(|e| ExecError::Data(format!("cannot start the transform thread: {e}")))
}

/// Read in batches, run the script on a thread of its own, write back cheaply.
///
/// Only changed documents are written. Their pre-images go to the step's pre-image store
/// (packed chunks), then the new versions replace them a batch at a time (see
/// [`preimages::replace_documents`]: one transaction per batch where the server has them,
/// which costs a server far less than one update per document). Reading, JavaScript and
/// writing overlap, with at most two batches in flight between each stage.
async fn run(db: &Database, o: &Transform, key: &str, progress: Option<Progress>) -> Result<u64, ExecError> {
    let source = db.collection::<RawDocumentBuf>(&o.collection);
    let filter = filter_doc(o.filter.as_ref()).map_err(data_err)?;
    let batch_size = o.batch_size.unwrap_or(1000).max(1) as usize;
    // Counted beside the reading, and only for a progress report.
    let count = progress.as_ref().map(|_| BackgroundCount::start(&source, Some(filter.clone())));
    let total = || count.as_ref().and_then(BackgroundCount::get);
    let txn = crate::mongo::supports_transactions(db).await;

    let (to_js, js_in) = tokio::sync::mpsc::channel::<Vec<RawDocumentBuf>>(2);
    let (js_out, mut from_js) = tokio::sync::mpsc::channel::<Result<Changes, String>>(2);
    let js = start_script(o.script.clone(), js_in, js_out)?;

    let mut store = preimages::Writer::create(db, key).await?;
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
            preimages::replace_documents(&db_w, &target, new, txn, false).await?;
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
        let reading = || mongo(format!("reading {}", o.collection));
        let mut cursor = source.find(filter).batch_size(batch_size as u32).await.map_err(reading())?;
        let mut batch = Vec::with_capacity(batch_size);
        let mut done = 0u64;
        while let Some(d) = cursor.try_next().await.map_err(reading())? {
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
