//! Snapshots kept in a database of the same server (by default `dbshift_snapshots`), so an
//! operator needs no volume and no object store.
//!
//! ```text
//! <db>.snapshots                    one manifest document per snapshot (see below)
//! <db>.<tenant>.<yyyyMMddTHHmmssZ>  the snapshot's documents, packed in chunks:
//!     { _id: { c: <collection>, n: <0, 1, ...> }, docs: [ <documents, byte for byte> ] }
//! ```
//! A manifest document:
//! ```text
//! { _id: "<tenant>.<yyyyMMddTHHmmssZ>", tenant, state: "writing" | "complete" | "deleting",
//!   runId, createdAt, updatedAt, completedAt, data: <the data collection>,
//!   manifest: { ...what dbshift-manifest.json holds, with each collection's options and indexes } }
//! ```
//! It is inserted (`writing`) before any data and set `complete` only after every chunk was
//! written; only complete snapshots are restored. A snapshot left `writing` (its writer died)
//! stops being refreshed (`updatedAt`, every 30 s) and is deleted by the next snapshot or
//! retention of the tenant once [`STALE_AFTER`] has passed. A chunk holds up to 1,000
//! documents or 8 MiB, so a snapshot costs one write per batch, not per document, and one
//! collection per snapshot whatever the number of collections snapshotted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{doc, Bson, DateTime, Document, RawArrayBuf, RawBsonRef, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::{Collection, Database};
use serde::Serialize;

use super::restore::{restore_from, RestoreProgress};
use super::snapshot::{write_snapshot, SnapshotProgress};
use super::*;
use crate::mongo::is_duplicate_key;

/// The database snapshots go to when none is named.
pub const DEFAULT_DATABASE: &str = crate::engine::tracking::SNAPSHOT_DATABASE;
/// The collection of manifest documents.
pub const MANIFESTS: &str = "snapshots";
/// An unfinished snapshot not refreshed for this long is abandoned, and deleted.
pub const STALE_AFTER: Duration = Duration::from_secs(300);
const HEARTBEAT: Duration = Duration::from_secs(30);
/// The largest document a server stores.
const MAX_BSON: usize = 16 * 1024 * 1024;

/// One snapshot, as listed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    pub id: String,
    pub tenant: String,
    /// `complete`, `writing` (being written, or abandoned) or `deleting`.
    pub state: String,
    /// RFC 3339, UTC, in milliseconds (fixed width: sorts as text).
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// `database:<db>/<id>`.
    pub location: String,
    pub scope: String,
    pub collections: usize,
    pub documents: u64,
    pub bytes: u64,
    pub sha256: String,
    pub duration_ms: u64,
}

/// A snapshot just taken.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Taken {
    /// The snapshot id (a database snapshot's `_id`, or a directory snapshot's `<tenant>/<name>`).
    pub id: String,
    /// `database:<db>/<id>` or `dir:<path>`.
    pub location: String,
    #[serde(flatten)]
    pub manifest: Manifest,
}

fn manifests(store: &Database) -> Collection<Document> {
    store.collection(MANIFESTS)
}

pub fn location(store: &str, id: &str) -> String {
    format!("database:{store}/{id}")
}

/// Whether `store` can hold snapshots of `tenant`.
pub fn check_store(store: &str, tenant: &str) -> Result<(), BackupError> {
    crate::tenants::check_db_name(store).map_err(|e| BackupError::Invalid(format!("snapshot database: {e}")))?;
    if store == tenant {
        return Err(BackupError::Invalid(format!(
            "{store} is the tenant itself: snapshots go to a database of their own (default {DEFAULT_DATABASE})"
        )));
    }
    if tenant == "system" {
        return Err(BackupError::Invalid(
            "a database named `system` cannot be snapshotted into a database (its data collection would be a \
             system collection); use a directory"
                .into(),
        ));
    }
    Ok(())
}

/// Snapshot `db` into the database `store` (see the module documentation).
pub async fn snapshot_to_database(
    db: &Database,
    store: &Database,
    opts: &SnapshotOptions,
    progress: SnapshotProgress<'_>,
) -> Result<Taken, BackupError> {
    check_store(store.name(), db.name())?;
    if opts.gzip {
        return Err(BackupError::Invalid("gzip applies to directory snapshots only".into()));
    }
    let tenant = db.name();
    // Best effort: listing and retention work without the index, only slower.
    let _ = store
        .run_command(doc! {"createIndexes": MANIFESTS, "indexes": [
            {"key": {"tenant": 1, "createdAt": -1}, "name": "tenant_createdAt"},
        ]})
        .await;
    if let Err(e) = cleanup_abandoned(store, tenant).await {
        tracing::warn!(tenant, error = %e, "could not delete abandoned snapshots");
    }
    let base = format!("{tenant}.{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"));
    let id = reserve(store, tenant, &base, opts.run_id.as_deref()).await?;
    let result = async {
        let data = store.collection::<RawDocumentBuf>(&id);
        // Nothing can be there (deletions drop data before the manifest), but be sure.
        data.drop().await.map_err(mongo(format!("preparing {id}")))?;
        let sink =
            DbSink { data, manifests: manifests(store), id: id.clone(), beat: Arc::new(Mutex::new(Instant::now())) };
        let manifest = write_snapshot(db, &sink, opts, progress).await?;
        let stored =
            bson::to_document(&manifest).map_err(|e| BackupError::Invalid(format!("manifest of {id}: {e}")))?;
        let now = DateTime::now();
        let done = manifests(store)
            .update_one(
                doc! {"_id": &id, "state": "writing"},
                doc! {"$set": {"state": "complete", "completedAt": now, "updatedAt": now, "manifest": stored}},
            )
            .await
            .map_err(mongo(format!("completing snapshot {id}")))?;
        if done.matched_count == 0 {
            return Err(BackupError::Invalid(format!(
                "snapshot {id} was deleted while it was written (taken for abandoned: it was not refreshed for {} s)",
                STALE_AFTER.as_secs()
            )));
        }
        Ok(manifest)
    }
    .await;
    match result {
        Ok(manifest) => Ok(Taken { location: location(store.name(), &id), id, manifest }),
        Err(e) => {
            if let Err(d) = delete(store, &id).await {
                tracing::warn!(snapshot = %id, error = %d, "could not delete an unfinished snapshot");
            }
            Err(e)
        }
    }
}

/// Insert the manifest document (`writing`) under a free id: `base`, else `base-2`, `base-3`...
async fn reserve(store: &Database, tenant: &str, base: &str, run_id: Option<&str>) -> Result<String, BackupError> {
    for k in 1..=100 {
        let id = if k == 1 { base.to_string() } else { format!("{base}-{k}") };
        let now = DateTime::now();
        let mut d =
            doc! {"_id": &id, "tenant": tenant, "state": "writing", "createdAt": now, "updatedAt": now, "data": &id};
        if let Some(r) = run_id {
            d.insert("runId", r);
        }
        match manifests(store).insert_one(d).await {
            Ok(_) => return Ok(id),
            Err(e) if is_duplicate_key(&e) => continue,
            Err(e) => return Err(mongo(format!("registering a snapshot in {}", store.name()))(e)),
        }
    }
    Err(BackupError::Invalid(format!("no free snapshot id for {base} in {}", store.name())))
}

struct DbSink {
    data: Collection<RawDocumentBuf>,
    manifests: Collection<Document>,
    id: String,
    /// When `updatedAt` was last refreshed.
    beat: Arc<Mutex<Instant>>,
}

struct DbWriter {
    data: Collection<RawDocumentBuf>,
    manifests: Collection<Document>,
    id: String,
    beat: Arc<Mutex<Instant>>,
    name: String,
    next: i64,
}

impl Sink for DbSink {
    type Writer = DbWriter;

    async fn collection(&self, name: &str, meta: &Document) -> Result<Opened<DbWriter>, BackupError> {
        let writer = DbWriter {
            data: self.data.clone(),
            manifests: self.manifests.clone(),
            id: self.id.clone(),
            beat: self.beat.clone(),
            name: name.to_string(),
            next: 0,
        };
        Ok(Opened { writer, file: String::new(), metadata: Some(meta.clone()) })
    }
}

impl CollectionWriter for DbWriter {
    async fn write(&mut self, batch: Vec<RawDocumentBuf>) -> Result<(), BackupError> {
        let single = if batch.len() == 1 { batch[0].as_bytes().len() } else { 0 };
        let mut docs = RawArrayBuf::new();
        for d in batch {
            docs.push(d);
        }
        let mut id = RawDocumentBuf::new();
        id.append("c", self.name.as_str());
        id.append("n", self.next);
        let mut chunk = RawDocumentBuf::new();
        chunk.append("_id", id);
        chunk.append("docs", docs);
        if chunk.as_bytes().len() > MAX_BSON {
            return Err(BackupError::Invalid(format!(
                "a document of {} is {single} bytes, too close to MongoDB's 16 MiB limit to be kept in a database \
                 snapshot; use a directory snapshot",
                self.name
            )));
        }
        self.data.insert_one(chunk).await.map_err(mongo(format!("writing {} into snapshot {}", self.name, self.id)))?;
        self.next += 1;
        let due = {
            let mut b = self.beat.lock().expect("lock");
            let due = b.elapsed() >= HEARTBEAT;
            if due {
                *b = Instant::now();
            }
            due
        };
        if due {
            self.manifests
                .update_one(doc! {"_id": &self.id}, doc! {"$set": {"updatedAt": DateTime::now()}})
                .await
                .map_err(mongo(format!("refreshing snapshot {}", self.id)))?;
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), BackupError> {
        Ok(())
    }
}

/// A complete database snapshot, opened for a restore.
pub(crate) struct DbSource {
    data: Collection<RawDocumentBuf>,
    manifest: Manifest,
    id: String,
    store: String,
}

impl Source for DbSource {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn place(&self, c: &CollectionManifest) -> String {
        format!("collection {} of snapshot {} (database {})", c.name, self.id, self.store)
    }

    fn metadata(&self, c: &CollectionManifest) -> Result<Document, BackupError> {
        c.metadata.clone().ok_or_else(|| {
            BackupError::Invalid(format!("snapshot {}: the manifest has no metadata for {}", self.id, c.name))
        })
    }

    fn batches<'a>(&'a self, c: &'a CollectionManifest) -> BoxStream<'a, Result<Vec<RawDocumentBuf>, BackupError>> {
        // A range of `_id`s: the `_id` index serves it, whatever else the snapshot holds.
        let filter = doc! {"_id": {"$gte": {"c": &c.name, "n": 0i64}, "$lte": {"c": &c.name, "n": i64::MAX}}};
        let action = format!("reading {} of snapshot {}", c.name, self.id);
        // Chunks are large (up to 8 MiB): a few at a time keeps memory flat.
        let find = self.data.find(filter).sort(doc! {"_id": 1}).batch_size(2);
        let a2 = action.clone();
        futures::stream::once(async move { find.await.map_err(mongo(a2)) })
            .map_ok(move |cursor| {
                let action = action.clone();
                cursor
                    .map_err(move |e| mongo(action.clone())(e))
                    .and_then(|chunk| futures::future::ready(unpack(&chunk)))
            })
            .try_flatten()
            .boxed()
    }
}

/// The documents of a chunk, byte for byte.
fn unpack(chunk: &RawDocumentBuf) -> Result<Vec<RawDocumentBuf>, BackupError> {
    let bad = |why: String| BackupError::Invalid(format!("a snapshot chunk is damaged: {why}"));
    let docs = chunk.get_array("docs").map_err(|e| bad(e.to_string()))?;
    docs.into_iter()
        .map(|e| match e {
            Ok(RawBsonRef::Document(d)) => Ok(d.to_raw_document_buf()),
            Ok(other) => Err(bad(format!("an element is a {:?}, not a document", other.element_type()))),
            Err(e) => Err(bad(e.to_string())),
        })
        .collect()
}

/// Open a complete snapshot for a restore.
pub(crate) async fn open(store: &Database, id: &str) -> Result<DbSource, BackupError> {
    let d = manifests(store)
        .find_one(doc! {"_id": id})
        .await
        .map_err(mongo(format!("reading snapshot {id}")))?
        .ok_or_else(|| {
            BackupError::Invalid(format!(
                "no snapshot {id} in database {} (`dbshift snapshots --database {}` lists them)",
                store.name(),
                store.name()
            ))
        })?;
    let state = d.get_str("state").unwrap_or("?");
    if state != "complete" {
        return Err(BackupError::Invalid(format!(
            "snapshot {id} in database {} is not complete (state {state}): it is being written or deleted, or its \
             writer died; only complete snapshots are restored",
            store.name()
        )));
    }
    let manifest: Manifest = d
        .get_document("manifest")
        .ok()
        .and_then(|m| bson::from_document(m.clone()).ok())
        .ok_or_else(|| BackupError::Invalid(format!("snapshot {id}: unreadable manifest")))?;
    if manifest.format != FORMAT {
        return Err(BackupError::Invalid(format!(
            "snapshot {id}: unknown snapshot format {:?} (this dbshift reads {FORMAT})",
            manifest.format
        )));
    }
    let data = d.get_str("data").unwrap_or(id);
    Ok(DbSource { data: store.collection(data), manifest, id: id.to_string(), store: store.name().to_string() })
}

/// The manifest of a complete snapshot.
pub async fn manifest(store: &Database, id: &str) -> Result<Manifest, BackupError> {
    Ok(open(store, id).await?.manifest)
}

/// Restore the snapshot `id` of `store` into `db`, exactly and verified (see [`restore`](super::restore)).
pub async fn restore_from_database(
    db: &Database,
    store: &Database,
    id: &str,
    opts: &RestoreOptions,
    progress: RestoreProgress<'_>,
) -> Result<RestoreReport, BackupError> {
    let src = open(store, id).await?;
    restore_from(db, &src, opts, progress).await
}

fn info(store: &str, d: &Document) -> SnapshotInfo {
    let id = d.get_str("_id").unwrap_or_default().to_string();
    let m = d.get_document("manifest").ok();
    let num = |k: &str| match m.and_then(|m| m.get(k)) {
        Some(Bson::Int64(n)) => *n as u64,
        Some(Bson::Int32(n)) => *n as u64,
        _ => 0,
    };
    let text = |k: &str| m.and_then(|m| m.get_str(k).ok()).unwrap_or_default().to_string();
    SnapshotInfo {
        location: location(store, &id),
        tenant: d.get_str("tenant").unwrap_or_default().to_string(),
        state: d.get_str("state").unwrap_or("?").to_string(),
        created_at: d
            .get_datetime("createdAt")
            .ok()
            .and_then(|t| chrono::DateTime::from_timestamp_millis(t.timestamp_millis()))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default(),
        run_id: d.get_str("runId").ok().map(str::to_string),
        scope: text("scope"),
        collections: m.and_then(|m| m.get_array("collections").ok()).map_or(0, |c| c.len()),
        documents: num("totalDocuments"),
        bytes: num("totalBytes"),
        sha256: text("sha256"),
        duration_ms: num("durationMs"),
        id,
    }
}

/// Snapshots in `store` (of one tenant, or all), by tenant, newest first.
pub async fn list(store: &Database, tenant: Option<&str>) -> Result<Vec<SnapshotInfo>, BackupError> {
    let filter = tenant.map(|t| doc! {"tenant": t}).unwrap_or_default();
    // Without each collection's metadata: listings stay small.
    let docs: Vec<Document> = manifests(store)
        .find(filter)
        .projection(doc! {"manifest.collections.metadata": 0, "manifest.appliedMigrations": 0})
        .await
        .map_err(mongo(format!("listing the snapshots in {}", store.name())))?
        .try_collect()
        .await
        .map_err(mongo(format!("listing the snapshots in {}", store.name())))?;
    let mut out: Vec<SnapshotInfo> = docs.iter().map(|d| info(store.name(), d)).collect();
    out.sort_by(|a, b| a.tenant.cmp(&b.tenant).then(b.created_at.cmp(&a.created_at)).then(b.id.cmp(&a.id)));
    Ok(out)
}

/// The newest complete snapshot of `tenant` (taken by `run_id`, if given).
pub async fn newest(store: &Database, tenant: &str, run_id: Option<&str>) -> Result<Option<String>, BackupError> {
    let mut filter = doc! {"tenant": tenant, "state": "complete"};
    if let Some(r) = run_id {
        filter.insert("runId", r);
    }
    let d = manifests(store)
        .find_one(filter)
        .sort(doc! {"createdAt": -1, "_id": -1})
        .projection(doc! {"_id": 1})
        .await
        .map_err(mongo(format!("looking for snapshots of {tenant} in {}", store.name())))?;
    Ok(d.and_then(|d| d.get_str("_id").ok().map(str::to_string)))
}

/// Delete a snapshot: marked `deleting`, its data dropped, then its manifest.
pub async fn delete(store: &Database, id: &str) -> Result<(), BackupError> {
    let m = manifests(store);
    let d = m.find_one(doc! {"_id": id}).await.map_err(mongo(format!("reading snapshot {id}")))?;
    let data = d.as_ref().and_then(|d| d.get_str("data").ok()).unwrap_or(id).to_string();
    m.update_one(doc! {"_id": id}, doc! {"$set": {"state": "deleting", "updatedAt": DateTime::now()}})
        .await
        .map_err(mongo(format!("deleting snapshot {id}")))?;
    store.collection::<Document>(&data).drop().await.map_err(mongo(format!("deleting snapshot {id}")))?;
    m.delete_one(doc! {"_id": id}).await.map_err(mongo(format!("deleting snapshot {id}")))?;
    Ok(())
}

/// Delete the tenant's snapshots that are not complete and were not refreshed for [`STALE_AFTER`].
pub async fn cleanup_abandoned(store: &Database, tenant: &str) -> Result<Vec<String>, BackupError> {
    let cutoff = DateTime::from_millis(DateTime::now().timestamp_millis() - STALE_AFTER.as_millis() as i64);
    let ids: Vec<String> = manifests(store)
        .find(doc! {"tenant": tenant, "state": {"$ne": "complete"}, "updatedAt": {"$lt": cutoff}})
        .projection(doc! {"_id": 1})
        .await
        .map_err(mongo("looking for abandoned snapshots"))?
        .try_collect::<Vec<Document>>()
        .await
        .map_err(mongo("looking for abandoned snapshots"))?
        .iter()
        .filter_map(|d| d.get_str("_id").ok().map(str::to_string))
        .collect();
    for id in &ids {
        tracing::info!(snapshot = %id, "deleting an abandoned snapshot");
        delete(store, id).await?;
    }
    Ok(ids)
}

/// Keep the `keep` newest complete snapshots of `tenant` (0 keeps all); delete older ones and
/// abandoned ones. Returns the deleted ids.
pub async fn retain(store: &Database, tenant: &str, keep: usize) -> Result<Vec<String>, BackupError> {
    let mut deleted = cleanup_abandoned(store, tenant).await?;
    if keep == 0 {
        return Ok(deleted);
    }
    let complete: Vec<SnapshotInfo> =
        list(store, Some(tenant)).await?.into_iter().filter(|s| s.state == "complete").collect();
    for s in complete.iter().skip(keep) {
        delete(store, &s.id).await?;
        deleted.push(s.id.clone());
    }
    Ok(deleted)
}
