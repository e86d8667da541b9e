//! Writing a snapshot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bson::{doc, Bson, Document, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::Database;

use super::*;
use crate::engine::tracking::INTERNAL_PREFIX;

#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Only these collections (default: every collection except dbshift's own).
    pub collections: Vec<String>,
    pub gzip: bool,
    /// The URI's hosts are recorded as the source (never its credentials).
    pub source: String,
    /// Tracking collection (default `_dbshift_migrations`).
    pub tracking: String,
}

/// Progress: (collection, documents done, documents expected).
pub type SnapshotProgress<'a> = &'a (dyn Fn(&str, u64, u64) + Send + Sync);

fn open(path: &Path, gzip: bool) -> Result<Box<dyn Write + Send>, BackupError> {
    let f = std::fs::File::create(path).map_err(io(path))?;
    let w = std::io::BufWriter::with_capacity(1 << 20, f);
    Ok(if gzip { Box::new(flate2::write::GzEncoder::new(w, flate2::Compression::fast())) } else { Box::new(w) })
}

/// Write a snapshot of `db` into `out` (created if needed; must not already hold a snapshot).
pub async fn snapshot(
    db: &Database,
    out: &Path,
    opts: &SnapshotOptions,
    progress: SnapshotProgress<'_>,
) -> Result<Manifest, BackupError> {
    let started = Instant::now();
    let created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if out.join(MANIFEST).exists() {
        return Err(BackupError::Invalid(format!(
            "{} already holds a snapshot; choose an empty directory",
            out.display()
        )));
    }
    let dir = out.join(db.name());
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // The whole cursor: a database may hold more collections than one batch returns.
    let listing: Vec<Document> = db
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"type": "collection"}})
        .await
        .map_err(mongo("listing collections"))?
        .try_collect()
        .await
        .map_err(mongo("listing collections"))?;
    let mut infos: Vec<Document> = listing
        .into_iter()
        .filter(|c| {
            let name = c.get_str("name").unwrap_or_default();
            !name.starts_with("system.") && !name.starts_with(INTERNAL_PREFIX)
        })
        .collect();
    let scope = if opts.collections.is_empty() {
        "all"
    } else {
        for want in &opts.collections {
            if !infos.iter().any(|c| c.get_str("name").ok() == Some(want.as_str())) {
                return Err(BackupError::Invalid(format!("collection {want} does not exist in {}", db.name())));
            }
        }
        infos.retain(|c| opts.collections.iter().any(|w| c.get_str("name").ok() == Some(w.as_str())));
        "selected"
    };
    infos.sort_by(|a, b| a.get_str("name").unwrap_or_default().cmp(b.get_str("name").unwrap_or_default()));
    // Two collections at a time: a server serves two cursors faster than one after the other.
    let collections: Vec<CollectionManifest> = futures::stream::iter(infos)
        .map(|info| dump_collection(db, info, out, &dir, opts, progress))
        .buffered(2)
        .try_collect()
        .await?;
    let applied_migrations: Vec<String> = db
        .collection::<Document>(tracking_name(&opts.tracking))
        .distinct("_id", doc! {"state": "applied"})
        .await
        .map_err(mongo("reading the tracking collection"))?
        .into_iter()
        .filter_map(|b| b.as_str().map(str::to_string))
        .collect();
    let manifest = Manifest {
        applied_migrations,
        format: FORMAT.into(),
        database: db.name().to_string(),
        created_at,
        source: opts.source.clone(),
        gzip: opts.gzip,
        scope: scope.into(),
        total_documents: collections.iter().map(|c| c.documents).sum(),
        total_bytes: collections.iter().map(|c| c.bytes).sum(),
        collections,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let mpath = out.join(MANIFEST);
    std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).expect("serializable")).map_err(io(&mpath))?;
    Ok(manifest)
}

/// Write one collection: its metadata file and its documents, streamed through a bounded
/// queue to a writer thread (disk and hashing overlap the network).
async fn dump_collection(
    db: &Database,
    info: Document,
    out: &Path,
    dir: &Path,
    opts: &SnapshotOptions,
    progress: SnapshotProgress<'_>,
) -> Result<CollectionManifest, BackupError> {
    let ext = if opts.gzip { ".gz" } else { "" };
    let name = info.get_str("name").unwrap_or_default().to_string();
    let coll = db.collection::<RawDocumentBuf>(&name);
    let expected = coll.estimated_document_count().await.unwrap_or(0);
    let indexes: Vec<Bson> = db
        .run_command(doc! {"listIndexes": &name})
        .await
        .map_err(mongo(format!("listing indexes of {name}")))?
        .get_document("cursor")
        .and_then(|c| c.get_array("firstBatch"))
        .cloned()
        .unwrap_or_default();
    let mut meta = doc! {
        "indexes": indexes.clone(),
        "collectionName": &name,
        "type": "collection",
    };
    meta.insert("options", info.get_document("options").cloned().unwrap_or_default());
    if let Ok(Bson::Binary(b)) = info.get_document("info").map(|i| i.get("uuid").cloned().unwrap_or(Bson::Null)) {
        meta.insert("uuid", hex::encode(&b.bytes));
    }
    let meta_path = dir.join(format!("{name}.metadata.json{ext}"));
    let mut mw = open(&meta_path, opts.gzip)?;
    serde_json::to_writer(&mut mw, &Bson::Document(meta).into_canonical_extjson())
        .map_err(|e| io(&meta_path)(e.into()))?;
    mw.flush().map_err(io(&meta_path))?;
    drop(mw);

    // Reading (network) and writing (disk, maybe gzip) overlap through a bounded channel.
    let file = format!("{}/{name}.bson{ext}", db.name());
    let path: PathBuf = out.join(&file);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<RawDocumentBuf>>(4);
    let w_path = path.clone();
    let gzip = opts.gzip;
    let writer = std::thread::spawn(move || -> Result<(u64, u64, ContentHash), BackupError> {
        let mut w = open(&w_path, gzip)?;
        let (mut n, mut bytes, mut hash) = (0u64, 0u64, ContentHash::default());
        for batch in rx {
            for d in batch {
                let b = d.as_bytes();
                w.write_all(b).map_err(io(&w_path))?;
                hash.add(b);
                n += 1;
                bytes += b.len() as u64;
            }
        }
        w.flush().map_err(io(&w_path))?;
        Ok((n, bytes, hash))
    });
    let read = async {
        let mut cursor = coll.find(doc! {}).batch_size(2000).await.map_err(mongo(format!("reading {name}")))?;
        let mut batch = Vec::with_capacity(1000);
        let mut done = 0u64;
        while let Some(d) = cursor.try_next().await.map_err(mongo(format!("reading {name}")))? {
            batch.push(d);
            if batch.len() == 1000 {
                done += 1000;
                progress(&name, done, expected.max(done));
                if tx.send(std::mem::take(&mut batch)).is_err() {
                    break;
                }
            }
        }
        if !batch.is_empty() {
            done += batch.len() as u64;
            let _ = tx.send(batch);
        }
        progress(&name, done, expected.max(done));
        Ok::<(), BackupError>(())
    };
    let r = read.await;
    drop(tx);
    let (documents, bytes, hash) =
        writer.join().map_err(|_| BackupError::Invalid("snapshot writer panicked".into()))??;
    r?;
    Ok(CollectionManifest { name, file, documents, bytes, sha256: hash.hex(), indexes: indexes.len() })
}
