//! Restoring a snapshot exactly, and proving it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bson::{doc, Bson, Document, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::Database;
use serde::Serialize;

use super::*;
use crate::engine::tracking::INTERNAL_PREFIX;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Only these collections of the snapshot (default: all of them).
    pub collections: Vec<String>,
    /// Tracking collection (default `_dbshift_migrations`).
    pub tracking: String,
    /// Recorded as `rolledBackBy` of the migrations the restore undoes (default: the restore of
    /// the snapshot taken at its time).
    pub rolled_back_by: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub database: String,
    pub snapshot_of: String,
    /// The restored snapshot's hash (see [`snapshot_hash`]); empty for snapshots of older versions.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub snapshot_sha256: String,
    pub collections: Vec<RestoredCollection>,
    /// Collections that were not in a whole-database snapshot and were dropped.
    pub dropped: Vec<String>,
    pub total_documents: u64,
    pub duration_ms: u64,
    /// Migrations applied after the snapshot was taken, now recorded as rolled back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rolled_back: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoredCollection {
    pub name: String,
    pub documents: u64,
    pub sha256: String,
    /// Count and content hash read back from the database equal the manifest's.
    pub verified: bool,
}

/// Progress: (collection, documents done, documents in the snapshot). `None` shows nothing.
pub type RestoreProgress<'a> = Option<&'a (dyn Fn(&str, u64, u64) + Send + Sync)>;

pub fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let path = from.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BackupError::Invalid(format!("{} is not a dbshift snapshot (no {MANIFEST})", from.display()))
        } else {
            io(&path)(e)
        }
    })?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| BackupError::Invalid(format!("{}: unreadable manifest: {e}", path.display())))?;
    if m.format != FORMAT {
        return Err(BackupError::Invalid(format!(
            "{}: unknown snapshot format {:?} (this dbshift reads {FORMAT})",
            path.display(),
            m.format
        )));
    }
    // The manifest is input like any other: its names decide which files are read.
    crate::tenants::check_db_name(&m.database)
        .map_err(|e| BackupError::Invalid(format!("{}: database: {e}", path.display())))?;
    let ext = if m.gzip { ".gz" } else { "" };
    for c in &m.collections {
        let expected = format!("{}/{}.bson{ext}", m.database, super::file_stem(&c.name));
        if c.file != expected {
            return Err(BackupError::Invalid(format!(
                "{}: collection {:?} is said to be in {:?}, not {expected:?}: refusing a file outside the snapshot's layout",
                path.display(),
                c.name,
                c.file
            )));
        }
    }
    Ok(m)
}

/// Read a `.bson` file document by document.
struct BsonReader {
    inner: Box<dyn Read + Send>,
    path: std::path::PathBuf,
}

impl BsonReader {
    fn open(path: &Path, gzip: bool) -> Result<Self, BackupError> {
        let f = std::fs::File::open(path).map_err(io(path))?;
        let r = std::io::BufReader::with_capacity(1 << 20, f);
        let inner: Box<dyn Read + Send> = if gzip { Box::new(flate2::read::GzDecoder::new(r)) } else { Box::new(r) };
        Ok(BsonReader { inner, path: path.to_path_buf() })
    }

    fn next(&mut self) -> Result<Option<RawDocumentBuf>, BackupError> {
        let mut len = [0u8; 4];
        match self.inner.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io(&self.path)(e)),
        }
        let n = i32::from_le_bytes(len);
        if !(5..=48 * 1024 * 1024).contains(&n) {
            return Err(BackupError::Invalid(format!("{}: corrupt BSON (document length {n})", self.path.display())));
        }
        let mut buf = vec![0u8; n as usize];
        buf[..4].copy_from_slice(&len);
        self.inner
            .read_exact(&mut buf[4..])
            .map_err(|e| BackupError::Invalid(format!("{}: truncated BSON: {e}", self.path.display())))?;
        RawDocumentBuf::from_bytes(buf)
            .map(Some)
            .map_err(|e| BackupError::Invalid(format!("{}: corrupt BSON: {e}", self.path.display())))
    }
}

fn read_metadata(path: &Path, gzip: bool) -> Result<Document, BackupError> {
    let mut text = Vec::new();
    BsonReader::open(path, gzip)?.inner.read_to_end(&mut text).map_err(io(path))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| BackupError::Invalid(format!("{}: {e}", path.display())))?;
    match Bson::try_from(v) {
        Ok(Bson::Document(d)) => Ok(d),
        _ => Err(BackupError::Invalid(format!("{}: not a metadata document", path.display()))),
    }
}

/// Check every collection's stored documents against the manifest before anything is changed.
async fn verify_source<S: Source>(src: &S, wanted: &[&CollectionManifest]) -> Result<(), BackupError> {
    let m = src.manifest();
    if !m.sha256.is_empty() && snapshot_hash(&m.collections) != m.sha256 {
        return Err(BackupError::Invalid(format!(
            "the manifest of the snapshot of {} is inconsistent (its collection hashes do not add up to its \
             sha256 {}); nothing was restored",
            m.database, m.sha256
        )));
    }
    for c in wanted {
        let (mut n, mut hash) = (0u64, ContentHash::default());
        let mut batches = src.batches(c);
        while let Some(batch) = batches.try_next().await? {
            for d in &batch {
                hash.add(d.as_bytes());
                n += 1;
            }
        }
        if n != c.documents || hash.hex() != c.sha256 {
            return Err(BackupError::Invalid(format!(
                "{} does not match the manifest ({n} documents, hash {}; manifest: {} documents, hash {}); nothing was restored",
                src.place(c),
                hash.hex(),
                c.documents,
                c.sha256
            )));
        }
    }
    Ok(())
}

/// Say so in an error raised before anything changed.
fn nothing_restored(e: BackupError) -> BackupError {
    const NOTHING: &str = "nothing was restored";
    match e {
        BackupError::Invalid(m) if !m.contains(NOTHING) => BackupError::Invalid(format!("{m}; {NOTHING}")),
        e @ BackupError::Io { .. } => BackupError::Invalid(format!("{e}; {NOTHING}")),
        other => other,
    }
}

/// Read a restored collection back and compare it with its manifest entry.
async fn verify_restored(
    coll: mongodb::Collection<RawDocumentBuf>,
    c: CollectionManifest,
) -> Result<RestoredCollection, BackupError> {
    let mut cursor = coll.find(doc! {}).batch_size(2000).await.map_err(mongo(format!("verifying {}", c.name)))?;
    let (mut n, mut hash) = (0u64, ContentHash::default());
    while cursor.advance().await.map_err(mongo(format!("verifying {}", c.name)))? {
        hash.add(cursor.current().as_bytes());
        n += 1;
    }
    if n != c.documents || hash.hex() != c.sha256 {
        return Err(BackupError::Verify(format!(
            "{}: {n} documents with hash {} after restore, the snapshot has {} with hash {}",
            c.name,
            hash.hex(),
            c.documents,
            c.sha256
        )));
    }
    Ok(RestoredCollection { name: c.name, documents: n, sha256: c.sha256, verified: true })
}

/// After a whole-database restore, migrations applied since the snapshot no longer have any
/// effect: record them as rolled back (by this restore) and drop their now-stale rollback data.
async fn reconcile_tracking(db: &Database, m: &Manifest, tracking: &str, by: &str) -> Result<Vec<String>, BackupError> {
    let records = db.collection::<Document>(tracking);
    let since = doc! {"state": "applied", "_id": {"$nin": &m.applied_migrations}};
    let ids: Vec<String> = records
        .distinct("_id", since.clone())
        .await
        .map_err(mongo("reading the tracking collection"))?
        .into_iter()
        .filter_map(|b| b.as_str().map(str::to_string))
        .collect();
    if ids.is_empty() {
        return Ok(ids);
    }
    let by = if by.is_empty() { format!("restore of the snapshot taken {}", m.created_at) } else { by.to_string() };
    records
        .update_many(
            since,
            doc! {"$set": {"state": "rolled_back", "rolledBackAt": bson::DateTime::now(), "rolledBackBy": by}},
        )
        .await
        .map_err(mongo("recording the restore in the tracking collection"))?;
    for id in &ids {
        let version = id.split('_').next().unwrap_or(id);
        crate::engine::preimages::forget(db, &format!("{version}_"))
            .await
            .map_err(|e| BackupError::Invalid(format!("dropping stale rollback data of {id}: {e}")))?;
    }
    Ok(ids)
}

/// Bring `db` back to the snapshot in the directory `from` (see [`restore_from`]).
pub async fn restore(
    db: &Database,
    from: &Path,
    opts: &RestoreOptions,
    progress: RestoreProgress<'_>,
) -> Result<RestoreReport, BackupError> {
    let src = DirSource { manifest: read_manifest(from)?, from: from.to_path_buf() };
    restore_from(db, &src, opts, progress).await
}

/// Bring `db` back to a snapshot: every snapshotted collection gets exactly the snapshot's
/// documents, options and indexes; for a whole-database snapshot, collections created since are
/// dropped (dbshift's own `_dbshift*` collections are left alone). The stored documents are
/// checked against the manifest first (nothing changes if they differ), and every restored
/// collection is read back and checked again.
pub(crate) async fn restore_from<S: Source>(
    db: &Database,
    src: &S,
    opts: &RestoreOptions,
    progress: RestoreProgress<'_>,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let m = src.manifest();
    for want in &opts.collections {
        if !m.collections.iter().any(|c| &c.name == want) {
            return Err(BackupError::Invalid(format!("collection {want} is not in the snapshot of {}", m.database)));
        }
    }
    let wanted: Vec<&CollectionManifest> =
        m.collections.iter().filter(|c| opts.collections.is_empty() || opts.collections.contains(&c.name)).collect();
    let checked = Instant::now();
    verify_source(src, &wanted).await.map_err(nothing_restored)?;
    tracing::debug!(seconds = checked.elapsed().as_secs_f64(), "restore: snapshot checked against its manifest");
    let metas: Vec<Document> = wanted.iter().map(|c| src.metadata(c)).collect::<Result<_, _>>()?;

    let whole = m.scope == Scope::All && opts.collections.is_empty();
    let dropped = if whole { drop_created_since(db, m).await? } else { Vec::new() };
    // Largest first: each collection is read back while the next (smaller) one is written.
    let mut order: Vec<(&CollectionManifest, Document)> = wanted.iter().copied().zip(metas).collect();
    order.sort_by_key(|(c, _)| std::cmp::Reverse(c.documents));
    let (mut restored, mut checks) = (Vec::new(), tokio::task::JoinSet::new());
    for (c, meta) in order {
        let coll = write_collection(db, src, c, &meta, progress).await?;
        // Read back and compare with the manifest, while the next collection is written.
        checks.spawn(verify_restored(coll, c.clone()));
        while let Some(r) = checks.try_join_next() {
            restored.push(r.map_err(|e| BackupError::Verify(format!("the check of a collection stopped: {e}")))??);
        }
    }
    while let Some(r) = checks.join_next().await {
        restored.push(r.map_err(|e| BackupError::Verify(format!("the check of a collection stopped: {e}")))??);
    }
    restored.sort_by_key(|r| wanted.iter().position(|c| c.name == r.name));
    let rolled_back = if whole {
        reconcile_tracking(db, m, tracking_name(&opts.tracking), &opts.rolled_back_by).await?
    } else {
        Vec::new()
    };
    Ok(RestoreReport {
        rolled_back,
        database: db.name().to_string(),
        snapshot_of: m.database.clone(),
        snapshot_sha256: m.sha256.clone(),
        total_documents: restored.iter().map(|c| c.documents).sum(),
        collections: restored,
        dropped,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// A whole-database restore first drops the collections created since the snapshot.
async fn drop_created_since(db: &Database, m: &Manifest) -> Result<Vec<String>, BackupError> {
    let mut dropped = Vec::new();
    for n in db.list_collection_names().await.map_err(mongo("listing collections"))? {
        if !n.starts_with(INTERNAL_PREFIX) && !n.starts_with("system.") && !m.collections.iter().any(|c| c.name == n) {
            db.collection::<Document>(&n).drop().await.map_err(mongo(format!("dropping {n}")))?;
            dropped.push(n);
        }
    }
    Ok(dropped)
}

/// Re-create one collection: its options, its documents (two inserts in flight), its indexes.
async fn write_collection<S: Source>(
    db: &Database,
    src: &S,
    c: &CollectionManifest,
    meta: &Document,
    progress: RestoreProgress<'_>,
) -> Result<mongodb::Collection<RawDocumentBuf>, BackupError> {
    let coll = db.collection::<RawDocumentBuf>(&c.name);
    coll.drop().await.map_err(mongo(format!("dropping {}", c.name)))?;
    let options = meta.get_document("options").cloned().unwrap_or_default();
    let mut create = doc! {"create": &c.name};
    create.extend(options);
    db.run_command(create).await.map_err(mongo(format!("creating {}", c.name)))?;

    // Two inserts in flight: the server works on one while the next is read and sent.
    let mut done = 0u64;
    let written = Instant::now();
    src.batches(c)
        .map_ok(|batch| {
            let n = batch.len() as u64;
            let coll = coll.clone();
            async move {
                coll.insert_many(batch)
                    .ordered(false)
                    .bypass_document_validation(true)
                    .await
                    .map(|_| n)
                    .map_err(mongo(format!("inserting into {}", c.name)))
            }
        })
        .try_buffered(2)
        .try_for_each(|n| {
            done += n;
            if let Some(p) = progress {
                p(&c.name, done, c.documents);
            }
            futures::future::ready(Ok(()))
        })
        .await?;
    tracing::debug!(collection = %c.name, seconds = written.elapsed().as_secs_f64(), "restore: documents written");
    let indexes: Vec<Document> = meta
        .get_array("indexes")
        .map(|a| a.iter().filter_map(|b| b.as_document().cloned()).collect())
        .unwrap_or_default();
    let indexes: Vec<Document> = indexes
        .into_iter()
        .filter(|i| i.get_str("name").ok() != Some("_id_"))
        .map(|mut i| {
            i.remove("ns");
            i
        })
        .collect();
    if !indexes.is_empty() {
        db.run_command(doc! {"createIndexes": &c.name, "indexes": indexes})
            .await
            .map_err(mongo(format!("creating indexes of {}", c.name)))?;
    }
    Ok(coll)
}

/// A directory snapshot.
struct DirSource {
    from: PathBuf,
    manifest: Manifest,
}

impl Source for DirSource {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn place(&self, c: &CollectionManifest) -> String {
        format!("{}: the file", c.file)
    }

    fn metadata(&self, c: &CollectionManifest) -> Result<Document, BackupError> {
        let ext = if self.manifest.gzip { ".gz" } else { "" };
        let stem = super::file_stem(&c.name);
        let path = self.from.join(&self.manifest.database).join(format!("{stem}.metadata.json{ext}"));
        read_metadata(&path, self.manifest.gzip)
    }

    /// A thread reads the file and hands batches over through a bounded queue.
    fn batches<'a>(&'a self, c: &'a CollectionManifest) -> BoxStream<'a, Result<Vec<RawDocumentBuf>, BackupError>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<RawDocumentBuf>, BackupError>>(4);
        let path = self.from.join(&c.file);
        let gzip = self.manifest.gzip;
        std::thread::spawn(move || {
            let mut r = match BsonReader::open(&path, gzip) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            let (mut batch, mut size) = (Vec::with_capacity(BATCH_DOCS), 0usize);
            loop {
                match r.next() {
                    Ok(Some(d)) => {
                        let len = d.as_bytes().len();
                        if !batch.is_empty() && (batch.len() == BATCH_DOCS || size + len > BATCH_BYTES) {
                            size = 0;
                            if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                                return; // the restore stopped reading
                            }
                        }
                        size += len;
                        batch.push(d);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.blocking_send(Ok(batch));
            }
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) }).boxed()
    }
}
