//! `transform`: a JavaScript function run over every document (matching a filter), in
//! batches. A changed document is written only while it is exactly as the script saw it (one
//! changed meanwhile is read and run again); its entry holds the top-level fields the script
//! changed, so undoing it leaves the application's later writes to other fields in place.

use std::time::{Duration, Instant};

use bson::RawDocumentBuf;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{count, data_err, filter_problem, restore};
use super::{Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx::filter_doc;
use crate::engine::pass::{self, NewVersions, Rewrite, Rewritten};
use crate::engine::script;

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
    /// Documents per batch (default 1000; 1 to 100000). A batch also ends once it holds
    /// 16 MiB of documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub batch_size: Option<u32>,
    /// The script's JavaScript heap, as Kubernetes writes memory (`512Mi`, `1Gi`; 16Mi to
    /// 16Gi). Default: the runner's `--script-memory` (DBSHIFT_SCRIPT_MEMORY), 256Mi unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
}

/// The largest `batchSize`: a batch crosses into the script as one string.
const MAX_BATCH: u32 = 100_000;

impl Transform {
    /// Replace the changed documents with their stored pre-images.
    fn undo(&self, key: &str) -> Vec<Operation> {
        vec![restore(&self.collection, key, None)]
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
            self.batch_size
                .filter(|b| !(1..=MAX_BATCH).contains(b))
                .map(|b| format!("`batchSize` must be between 1 and {MAX_BATCH} (it is {b})")),
            self.memory_limit
                .as_deref()
                .and_then(|m| script::parse_memory(m).err())
                .map(|e| format!("`memoryLimit`: {e}")),
            script::compile_check(&self.script).err().map(|e| format!("`script`: {e}")),
        ]
    }

    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::Transform(self.clone()), self.undo(key)))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let filter = filter_doc(self.filter.as_ref()).map_err(data_err)?;
        let memory = match &self.memory_limit {
            Some(m) => script::parse_memory(m).map_err(|e| ExecError::Data(format!("`memoryLimit`: {e}")))?,
            None => script::default_memory(),
        };
        let mut planner = Rewritten { rewrite: Script::start(&self.script, memory)? };
        let key = x.key.to_string();
        let mut pass = x.pass(&self.collection);
        pass.batching.docs = self.batch_size.map_or(pass::BATCH, |b| b.clamp(1, MAX_BATCH) as usize);
        pass::forward(&mut pass, &key, filter, &mut planner, false).await
    }

    async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
        count(db, &self.collection, filter_doc(self.filter.as_ref()).map_err(data_err)?).await
    }
}

/// The script, on a thread of its own (QuickJS runtimes stay on the thread that made them):
/// batches go in, each document's new version (or none) comes out.
struct Script {
    to_js: Option<tokio::sync::mpsc::Sender<Vec<RawDocumentBuf>>>,
    from_js: tokio::sync::mpsc::Receiver<Result<NewVersions, String>>,
    /// The error that stopped the script: said again to every batch after it (two batches are
    /// in flight; the other must not report only that the script stopped).
    failed: Option<String>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Script {
    fn start(source: &str, memory: usize) -> Result<Script, ExecError> {
        let (to_js, mut batches) = tokio::sync::mpsc::channel::<Vec<RawDocumentBuf>>(1);
        let (out, from_js) = tokio::sync::mpsc::channel(1);
        let source = source.to_string();
        let thread = std::thread::Builder::new()
            .name("dbshift-transform".into())
            .spawn(move || {
                let t = match script::Transformer::new(&source, memory) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = out.blocking_send(Err(e));
                        return;
                    }
                };
                let mut busy = Duration::ZERO;
                while let Some(docs) = batches.blocking_recv() {
                    let started = Instant::now();
                    let r = t.run_batch(&docs).map(|new| (docs, new));
                    busy += started.elapsed();
                    let failed = r.is_err();
                    if out.blocking_send(r).is_err() || failed {
                        break;
                    }
                }
                tracing::debug!(script_seconds = busy.as_secs_f64(), "transform: time spent in the script");
            })
            .map_err(|e| ExecError::Data(format!("cannot start the transform thread: {e}")))?;
        Ok(Script { to_js: Some(to_js), from_js, thread: Some(thread), failed: None })
    }
}

impl Rewrite for Script {
    async fn rewrite(&mut self, docs: Vec<RawDocumentBuf>) -> Result<NewVersions, ExecError> {
        if let Some(e) = &self.failed {
            return Err(ExecError::Data(e.clone()));
        }
        let stopped = || ExecError::Data("the transform script stopped".into());
        self.to_js.as_ref().ok_or_else(stopped)?.send(docs).await.map_err(|_| stopped())?;
        let r = self.from_js.recv().await.ok_or_else(stopped)?;
        r.map_err(|e| {
            self.failed = Some(e.clone());
            ExecError::Data(e)
        })
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.to_js.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
