//! Taking a snapshot: the same code whatever the [`Sink`]; the directory sink is here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bson::{doc, Bson, Document, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::Database;

use super::*;
use crate::engine::count::BackgroundCount;
use crate::engine::tracking::INTERNAL_PREFIX;

#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Only these collections (default: every collection except dbshift's own).
    pub collections: Vec<String>,
    /// Directory snapshots only: compress files with gzip.
    pub gzip: bool,
    /// The URI's hosts are recorded as the source (never its credentials).
    pub source: String,
    /// Tracking collection (default `_dbshift_migrations`).
    pub tracking: String,
    /// The run taking the snapshot, recorded in the manifest.
    pub run_id: Option<String>,
}

/// Progress: (collection, documents done, documents expected). Expected is 0 while the count
/// is not known yet (it runs beside the reading); the last report of a collection has done ==
/// expected. `None` shows nothing, and then nothing is counted (on some servers a count is a
/// full scan).
pub type SnapshotProgress<'a> = Option<&'a (dyn Fn(&str, u64, u64) + Send + Sync)>;

/// Write a snapshot of `db` into the directory `out` (created if needed; must not already hold
/// a snapshot). The manifest is written last: a directory without one is an unfinished snapshot.
pub async fn snapshot(
    db: &Database,
    out: &Path,
    opts: &SnapshotOptions,
    progress: SnapshotProgress<'_>,
) -> Result<Manifest, BackupError> {
    if out.join(MANIFEST).exists() {
        return Err(BackupError::Invalid(format!(
            "{} already holds a snapshot; choose an empty directory",
            out.display()
        )));
    }
    let dir = out.join(db.name());
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let sink = DirSink { out: out.to_path_buf(), dir, db: db.name().to_string(), gzip: opts.gzip };
    let manifest = write_snapshot(db, &sink, opts, progress).await?;
    let text = serde_json::to_vec_pretty(&manifest).expect("serializable");
    let (out, files) = (out.to_path_buf(), sink.dir);
    tokio::task::spawn_blocking(move || write_manifest(&out, &files, &text))
        .await
        .map_err(|e| BackupError::Invalid(format!("writing the manifest stopped: {e}")))??;
    Ok(manifest)
}

/// Store the manifest durably and all at once: written to a temporary file, synced, renamed
/// into place, then the directories synced (`files`, which lists the collection files, `out`,
/// and the directory holding `out`, which may be new too). After a crash the snapshot either
/// has its whole manifest, and every file it lists (each synced when written), or reads as
/// unfinished.
fn write_manifest(out: &Path, files: &Path, text: &[u8]) -> Result<(), BackupError> {
    let (tmp, path) = (out.join(format!("{MANIFEST}.tmp")), out.join(MANIFEST));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(text).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    for d in [files, out, parent] {
        std::fs::File::open(d).and_then(|d| d.sync_all()).map_err(io(d))?;
    }
    Ok(())
}

/// Snapshot `db` into `sink`: every collection (or the selected ones), then the migrations
/// applied at the time. Returns the manifest; storing it is the caller's last step.
pub(crate) async fn write_snapshot<S: Sink>(
    db: &Database,
    sink: &S,
    opts: &SnapshotOptions,
    progress: SnapshotProgress<'_>,
) -> Result<Manifest, BackupError> {
    let started = Instant::now();
    let created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
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
        Scope::All
    } else {
        for want in &opts.collections {
            if !infos.iter().any(|c| c.get_str("name").ok() == Some(want.as_str())) {
                return Err(BackupError::Invalid(format!("collection {want} does not exist in {}", db.name())));
            }
        }
        infos.retain(|c| opts.collections.iter().any(|w| c.get_str("name").ok() == Some(w.as_str())));
        Scope::Selected
    };
    infos.sort_by(|a, b| a.get_str("name").unwrap_or_default().cmp(b.get_str("name").unwrap_or_default()));
    // Two collections at a time: a server serves two cursors faster than one after the other.
    let collections: Vec<CollectionManifest> = futures::stream::iter(infos)
        .map(|info| dump_collection(db, sink, info, progress))
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
    Ok(Manifest {
        applied_migrations,
        format: FORMAT.into(),
        database: db.name().to_string(),
        created_at,
        source: opts.source.clone(),
        gzip: opts.gzip,
        scope,
        total_documents: collections.iter().map(|c| c.documents).sum(),
        total_bytes: collections.iter().map(|c| c.bytes).sum(),
        sha256: snapshot_hash(&collections),
        collections,
        duration_ms: started.elapsed().as_millis() as u64,
        run_id: opts.run_id.clone(),
    })
}

/// Snapshot one collection: its metadata, then its documents, read in batches and handed to
/// the sink through a bounded queue, so reading and writing overlap and memory stays flat.
async fn dump_collection<S: Sink>(
    db: &Database,
    sink: &S,
    info: Document,
    progress: SnapshotProgress<'_>,
) -> Result<CollectionManifest, BackupError> {
    let name = info.get_str("name").unwrap_or_default().to_string();
    let coll = db.collection::<RawDocumentBuf>(&name);
    // Counted beside the reading, for the progress report only.
    let expected = progress.map(|_| BackgroundCount::start(&coll, None));
    let report = |done: u64, total: u64| {
        if let Some(p) = progress {
            p(&name, done, if total == 0 { 0 } else { total.max(done) });
        }
    };
    let indexes: Vec<Bson> = db
        .run_command(doc! {"listIndexes": &name})
        .await
        .map_err(mongo(format!("listing indexes of {name}")))?
        .get_document("cursor")
        .and_then(|c| c.get_array("firstBatch"))
        .cloned()
        .unwrap_or_default();
    let index_count = indexes.len();
    let mut meta = doc! {
        "indexes": indexes,
        "collectionName": &name,
        "type": "collection",
    };
    meta.insert("options", info.get_document("options").cloned().unwrap_or_default());
    if let Ok(Bson::Binary(b)) = info.get_document("info").map(|i| i.get("uuid").cloned().unwrap_or(Bson::Null)) {
        meta.insert("uuid", hex::encode(&b.bytes));
    }
    let opened = sink.collection(&name, &meta).await?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<RawDocumentBuf>>(4);
    let read = async {
        let tx = tx;
        let mut cursor = coll.find(doc! {}).batch_size(2000).await.map_err(mongo(format!("reading {name}")))?;
        let (mut batch, mut size, mut done) = (Vec::with_capacity(BATCH_DOCS), 0usize, 0u64);
        while let Some(d) = cursor.try_next().await.map_err(mongo(format!("reading {name}")))? {
            let len = d.as_bytes().len();
            if !batch.is_empty() && (batch.len() == BATCH_DOCS || size + len > BATCH_BYTES) {
                done += batch.len() as u64;
                size = 0;
                report(done, expected.as_ref().and_then(BackgroundCount::get).unwrap_or(0));
                if tx.send(std::mem::take(&mut batch)).await.is_err() {
                    return Ok(()); // the writer stopped; its error is the one reported
                }
            }
            size += len;
            batch.push(d);
        }
        if !batch.is_empty() {
            done += batch.len() as u64;
            let _ = tx.send(batch).await;
        }
        report(done, done);
        Ok::<(), BackupError>(())
    };
    let write = async {
        let mut w = opened.writer;
        let (mut n, mut bytes, mut hash) = (0u64, 0u64, ContentHash::default());
        while let Some(batch) = rx.recv().await {
            // Hashed on a thread of its own: inline, it held up the reading of the cursor.
            let (batch, part) = tokio::task::spawn_blocking(move || {
                let mut part = ContentHash::default();
                batch.iter().for_each(|d| part.add(d.as_bytes()));
                (batch, part)
            })
            .await
            .map_err(|e| BackupError::Invalid(format!("hashing {name} stopped: {e}")))?;
            hash.merge(&part);
            n += batch.len() as u64;
            bytes += batch.iter().map(|d| d.as_bytes().len() as u64).sum::<u64>();
            w.write(batch).await?;
        }
        w.finish().await?;
        Ok::<_, BackupError>((n, bytes, hash))
    };
    let (r, w) = futures::join!(read, write);
    let (documents, bytes, hash) = w?;
    r?;
    Ok(CollectionManifest {
        name,
        file: opened.file,
        documents,
        bytes,
        sha256: hash.hex(),
        indexes: index_count,
        metadata: opened.metadata,
    })
}

/// A file being written, maybe gzipped.
pub(crate) enum FileOut {
    Plain(std::io::BufWriter<std::fs::File>),
    Gzip(flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>),
}

impl FileOut {
    pub(crate) fn create(path: &Path, gzip: bool) -> Result<Self, BackupError> {
        let f = std::fs::File::create(path).map_err(io(path))?;
        let w = std::io::BufWriter::with_capacity(1 << 20, f);
        Ok(if gzip {
            FileOut::Gzip(flate2::write::GzEncoder::new(w, flate2::Compression::fast()))
        } else {
            FileOut::Plain(w)
        })
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            FileOut::Plain(w) => w.write_all(b),
            FileOut::Gzip(w) => w.write_all(b),
        }
    }

    /// Write everything out (the gzip trailer too) and sync it to disk.
    fn finish(self) -> std::io::Result<()> {
        let w = match self {
            FileOut::Plain(w) => w,
            FileOut::Gzip(g) => g.finish()?,
        };
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    }
}

/// A directory snapshot: `<out>/<db>/<coll>.bson[.gz]` and `<coll>.metadata.json[.gz]`.
struct DirSink {
    out: PathBuf,
    dir: PathBuf,
    db: String,
    gzip: bool,
}

struct DirWriter {
    file: Option<FileOut>,
    path: PathBuf,
}

impl Sink for DirSink {
    type Writer = DirWriter;

    async fn collection(&self, name: &str, meta: &Document) -> Result<Opened<DirWriter>, BackupError> {
        let ext = if self.gzip { ".gz" } else { "" };
        let stem = super::file_stem(name);
        let meta_path = self.dir.join(format!("{stem}.metadata.json{ext}"));
        let text = serde_json::to_vec(&Bson::Document(meta.clone()).into_canonical_extjson()).expect("serializable");
        let gzip = self.gzip;
        tokio::task::spawn_blocking(move || {
            let mut mw = FileOut::create(&meta_path, gzip)?;
            mw.write_all(&text).and_then(|_| mw.finish()).map_err(io(&meta_path))
        })
        .await
        .map_err(|e| BackupError::Invalid(format!("writing the metadata of {name} stopped: {e}")))??;
        let file = format!("{}/{stem}.bson{ext}", self.db);
        let path = self.out.join(&file);
        let writer = DirWriter { file: Some(FileOut::create(&path, self.gzip)?), path };
        Ok(Opened { writer, file, metadata: None })
    }
}

impl DirWriter {
    /// Run blocking file work off the async threads.
    async fn with_file<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut FileOut) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, BackupError> {
        let mut file = self.file.take().ok_or_else(|| BackupError::Invalid("the snapshot file was closed".into()))?;
        let (file, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut file);
            (file, r)
        })
        .await
        .map_err(|e| BackupError::Invalid(format!("the snapshot writer stopped: {e}")))?;
        self.file = Some(file);
        r.map_err(io(&self.path))
    }
}

impl CollectionWriter for DirWriter {
    async fn write(&mut self, batch: Vec<RawDocumentBuf>) -> Result<(), BackupError> {
        self.with_file(move |f| batch.iter().try_for_each(|d| f.write_all(d.as_bytes()))).await
    }

    async fn finish(mut self) -> Result<(), BackupError> {
        let file = self.file.take().ok_or_else(|| BackupError::Invalid("the snapshot file was closed".into()))?;
        tokio::task::spawn_blocking(move || file.finish())
            .await
            .map_err(|e| BackupError::Invalid(format!("the snapshot writer stopped: {e}")))?
            .map_err(io(&self.path))
    }
}
