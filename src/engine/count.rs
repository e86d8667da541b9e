//! Document counts for progress reports, fetched beside the work instead of before it.
//!
//! A `count` is O(1) on mongod, but some servers (SecantusDB among them) scan the collection
//! for it: 29 ms per 100,000 documents, measured, which was a sixth of a snapshot. Progress
//! is the only use of these counts, so the data never waits for them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bson::Document;
use mongodb::Collection;

/// A count running in the background; [`BackgroundCount::get`] is `None` until it is known
/// (or if it failed: a progress report without a total is no reason to stop the work).
pub struct BackgroundCount {
    value: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

const UNKNOWN: u64 = u64::MAX;

impl BackgroundCount {
    /// Count the documents matching `filter`, or estimate the whole collection's without one.
    pub fn start<T: Send + Sync + 'static>(coll: &Collection<T>, filter: Option<Document>) -> BackgroundCount {
        let value = Arc::new(AtomicU64::new(UNKNOWN));
        let (coll, slot) = (coll.clone_with_type::<Document>(), value.clone());
        let task = tokio::spawn(async move {
            let n = match filter {
                Some(f) if !f.is_empty() => coll.count_documents(f).await,
                _ => coll.estimated_document_count().await,
            };
            if let Ok(n) = n {
                slot.store(n, Ordering::Relaxed);
            }
        });
        BackgroundCount { value, task }
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.value.load(Ordering::Relaxed)).filter(|&n| n != UNKNOWN)
    }
}

impl Drop for BackgroundCount {
    fn drop(&mut self) {
        self.task.abort();
    }
}
