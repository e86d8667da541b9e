//! Document passes: how every operation that changes documents changes them, exactly, while
//! the application keeps writing.
//!
//! A pass reads the documents to change with one cursor in `_id` order, a batch at a time.
//! For each document it plans a write that applies only if the document is still as it was
//! read, and an [`Entry`] for the step's pre-image store. Then, per batch:
//! - with transactions (a replica set): the writes, and the entries of the writes that applied,
//!   commit together or not at all. A write conflict (another writer, or the open transaction
//!   of a runner that was killed) retries the batch with backoff, for up to two minutes;
//! - without (a standalone server): the entries are stored first, then the writes, then the
//!   entries of the writes that did not apply are voided. A runner killed between the writes
//!   and the voiding leaves at most one batch whose entries may name writes that did not
//!   happen: see docs/engine.md.
//!
//! A write that did not apply means its document changed since it was read: it is read again
//! and planned again, up to [`MAX_ROUNDS`] times. No application write is overwritten with a
//! stale copy, and no document changes without its entry.
//!
//! Between batches a pass checks its [`Guard`]: a lost lock or a SIGTERM stops it before its
//! next write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::options::{
    DeleteOneModel, InsertManyOptions, InsertOneModel, InsertOneOptions, ReplaceOneModel, ReplaceOptions,
    UpdateModifications, UpdateOneModel, UpdateOptions, WriteModel,
};
use mongodb::{ClientSession, Database, Namespace};

use super::ops::{mongo, ExecError, Progress};
use super::preimages::{self, id_key, raw_id, Entry, Store};
use std::collections::{HashMap, HashSet};

/// What a server without transactions changes, said by `plan`, `up`, `down` and `run`.
pub const WITHOUT_TRANSACTIONS: &str = "this server runs without transactions (a standalone server; production \
MongoDB is a replica set). dbshift still stores every pre-image before its change and never overwrites a concurrent \
write, but a runner killed in the middle of a batch leaves up to one batch (1000 documents) whose writes it cannot \
tell landed or not: undoing them puts the pre-migration values back even where the application changed those \
fields after the crash (counted as conflicts when known), and `transaction: true` migrations run step by step. \
See docs/engine.md, \"Without transactions\".";

/// How many times a document that keeps changing under a pass is read and planned again.
pub const MAX_ROUNDS: usize = 10;
/// How long a batch retries write conflicts (longer than MongoDB's default transaction
/// lifetime, 60 s, so the open transaction of a killed runner has expired by then).
const CONFLICT_DEADLINE: Duration = Duration::from_secs(120);
/// Documents per batch (a transform's `batchSize` changes it).
pub const BATCH: usize = 1000;
/// Bytes of whole documents per batch: a batch ends at [`BATCH`] documents or once it holds
/// this much, whichever comes first, so collections of large documents (up to MongoDB's
/// 16 MiB) pass in small batches, in memory, through a transform's heap and into the pre-image
/// store alike (a single document larger than this is a batch of its own).
pub const BATCH_BYTES: usize = 16 << 20;

/// Where a batch ends: after `docs` documents, or `bytes` bytes of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub docs: usize,
    pub bytes: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching { docs: BATCH, bytes: BATCH_BYTES }
    }
}

impl Batching {
    /// Whether a batch of `n` documents holding `bytes` is full.
    fn full(&self, n: usize, bytes: usize) -> bool {
        n >= self.docs || bytes >= self.bytes
    }

    /// `docs` cut into batches.
    fn split(&self, docs: Vec<RawDocumentBuf>) -> Vec<Vec<RawDocumentBuf>> {
        let mut out = Vec::new();
        let (mut batch, mut bytes) = (Vec::new(), 0usize);
        for d in docs {
            bytes += d.as_bytes().len();
            batch.push(d);
            if self.full(batch.len(), bytes) {
                out.push(std::mem::take(&mut batch));
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            out.push(batch);
        }
        out
    }
}

/// Stops a pass before its next write: the lock was lost, or the process was asked to stop.
/// It also notes the sessions transactions run in, in the lease (see [`super::lock::Sessions`]).
#[derive(Clone, Default)]
pub struct Guard {
    lease: Option<super::lock::Standing>,
    sessions: Option<super::lock::Sessions>,
    stop: Option<Arc<AtomicBool>>,
}

impl Guard {
    /// A guard over a held lock and a stop request (e.g. SIGTERM).
    pub fn new(lease: Option<&super::lock::Lease>, stop: Option<Arc<AtomicBool>>) -> Self {
        Guard { lease: lease.map(|l| l.standing()), sessions: lease.map(|l| l.sessions()), stop }
    }

    /// A session for transactions, noted in the lease before it is used.
    pub async fn session(&self, db: &Database) -> Result<ClientSession, ExecError> {
        let session = db.client().start_session().await.map_err(mongo("starting a session"))?;
        if let Some(s) = &self.sessions {
            s.note(&session).await.map_err(mongo("noting the session in the lock"))?;
        }
        Ok(session)
    }

    /// Before a write: not asked to stop, and the lock still held (waiting, when its last
    /// renewal is too old to be sure, for the next one to get through).
    pub async fn check(&self) -> Result<(), ExecError> {
        if self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            return Err(ExecError::Stopped("asked to stop (SIGTERM): stopped at a safe point".into()));
        }
        if let Some(lease) = &self.lease {
            if !lease.known() && !lease.confirm().await {
                return Err(ExecError::Stopped(
                    "the migration lock was lost (taken by another runner, or not renewed within its TTL); \
                     stopped before the next write to avoid two runners"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

/// What the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    /// Multi-document transactions (a replica set or a sharded cluster).
    pub transactions: bool,
    /// The `bulkWrite` command with per-write results (MongoDB 8.0, wire version 25).
    pub bulk: bool,
}

impl Server {
    pub async fn detect(db: &Database) -> Server {
        match db.run_command(doc! {"hello": 1}).await {
            Ok(h) => Server {
                transactions: h.contains_key("setName") || h.get_str("msg").ok() == Some("isdbgrid"),
                bulk: h.get_i32("maxWireVersion").unwrap_or(0) >= 25,
            },
            Err(_) => Server { transactions: false, bulk: false },
        }
    }
}

/// One document's planned change: its entry, the document as the plan read it, and the write
/// that makes it. The write applies only while the document is still as read: in a
/// transaction the batch reads it again first; without one, the write's filter says so.
#[derive(Debug, Clone)]
pub struct Planned {
    pub entry: Entry,
    /// The document as read (projected as the planner reads); `None`: it did not exist.
    pub read: Option<RawDocumentBuf>,
    pub write: Write,
}

#[derive(Debug, Clone)]
pub enum Write {
    /// Run `update` on the document while it still matches the operation's `filter` (and,
    /// without a transaction, while its `fields` still hold what was read).
    Update {
        filter: Document,
        update: UpdateModifications,
        fields: Vec<String>,
    },
    /// Replace it with `doc`.
    Replace {
        doc: RawDocumentBuf,
    },
    Delete,
    /// Insert `doc` (it must not exist).
    Insert {
        doc: Document,
    },
    /// Nothing to write.
    None,
}

/// `{_id: id}` with the operation's filter beside it. Top-level keys, not `$and`, where they
/// do not collide: servers find a document by `_id` fastest that way.
fn by_id(id: &Bson, filter: &Document) -> Document {
    let mut q = doc! {"_id": id.clone()};
    if filter.keys().any(|k| k == "_id") {
        q.insert("$and", vec![Bson::Document(filter.clone())]);
    } else {
        q.extend(filter.clone());
    }
    q
}

/// `$expr` that holds while a document is exactly `doc` (field order included).
fn unchanged(doc: &Document) -> Document {
    doc! {"_id": doc.get("_id").cloned().unwrap_or(Bson::Null), "$expr": {"$eq": ["$$ROOT", {"$literal": doc}]}}
}

/// Conditions that hold while the given top-level fields hold what `read` has (absent fields
/// absent), by type and value; arrays by length too (a query's `$eq` on an array also matches
/// an array holding it). Merged into `q` beside the keys already there (`$and` on a collision).
fn fields_unchanged(mut q: Document, fields: &[String], read: &Document) -> Document {
    let mut extra = Vec::new();
    for f in fields {
        let cond = match read.get(f) {
            Some(v) => {
                let mut c = doc! {"$eq": v.clone(), "$type": crate::engine::bsonx::type_name_mongo(v)};
                if let Bson::Array(a) = v {
                    c.insert("$size", a.len() as i64);
                }
                c
            }
            None => doc! {"$exists": false},
        };
        if q.contains_key(f) {
            extra.push(Bson::Document(doc! {f.clone(): cond}));
        } else {
            q.insert(f.clone(), cond);
        }
    }
    if !extra.is_empty() {
        q.insert("$and", extra);
    }
    q
}

/// Where a pass writes, and what it may rely on.
pub struct Pass<'a> {
    pub db: &'a Database,
    pub coll: &'a str,
    pub guard: &'a Guard,
    pub server: Server,
    /// The transaction of a `transaction: true` migration: everything runs in it, no batch commits.
    pub outer: Option<&'a mut ClientSession>,
    pub progress: Option<Progress>,
    /// Where a forward pass's batches end.
    pub batching: Batching,
    /// Write with `bypassDocumentValidation` (a restore into a collection with a validator:
    /// the state put back may be one the validator set since would refuse).
    pub bypass_validation: bool,
}

impl Pass<'_> {
    /// The `bypassDocumentValidation` option of each write: sent only when set (it needs the
    /// `bypassDocumentValidation` privilege of dbAdmin or restore).
    fn bypass(&self) -> Option<bool> {
        self.bypass_validation.then_some(true)
    }
}

/// How a batch's documents were read, to read them again the same way in its transaction.
#[derive(Clone, Copy, Default)]
struct Reading<'a> {
    /// The fields read (`None`: whole documents).
    projection: Option<&'a Document>,
    /// A forward pass's filter; `None`: the documents are found by `_id` alone (a restore).
    filter: Option<&'a Document>,
}

/// `{_id: {$gte: first, $lte: last}}` beside `filter`, when both bounds are of one kind a
/// range query compares (numbers, strings, ObjectIds, dates; a range only matches values of
/// its bounds' kind, so a batch of mixed kinds is found by `_id`s instead).
fn id_range(first: &Bson, last: &Bson, filter: &Document) -> Option<Document> {
    fn kind(b: &Bson) -> Option<u8> {
        match b {
            Bson::Int32(_) | Bson::Int64(_) => Some(1),
            Bson::Double(f) if !f.is_nan() => Some(1),
            Bson::String(_) => Some(2),
            Bson::ObjectId(_) => Some(3),
            Bson::DateTime(_) => Some(4),
            _ => None,
        }
    }
    if kind(first)? != kind(last)? {
        return None;
    }
    Some(by_id(&Bson::Document(doc! {"$gte": first.clone(), "$lte": last.clone()}), filter))
}

/// What a batch's commit did.
struct Committed {
    /// Per planned write: it applied.
    applied: Vec<bool>,
}

impl<'a> Pass<'a> {
    fn ns(&self) -> Namespace {
        Namespace { db: self.db.name().to_string(), coll: self.coll.to_string() }
    }

    /// The write of `p` as a bulk-write model: its filter by `_id` (and, without a
    /// transaction, the conditions that it is unchanged since read).
    fn model(&self, p: &Planned, checked: bool) -> Result<Option<WriteModel>, mongodb::error::Error> {
        let namespace = self.ns();
        let read = || p.read.as_ref().and_then(|r| Document::try_from(r.as_ref()).ok()).unwrap_or_default();
        let whole = |checked: bool| {
            if checked {
                doc! {"_id": p.entry.id.clone()}
            } else {
                unchanged(&read())
            }
        };
        Ok(Some(match &p.write {
            Write::Update { filter, update, fields } => {
                let q = by_id(&p.entry.id, filter);
                let q = if checked { q } else { fields_unchanged(q, fields, &read()) };
                UpdateOneModel::builder().namespace(namespace).filter(q).update(update.clone()).build().into()
            }
            Write::Replace { doc } => ReplaceOneModel::builder()
                .namespace(namespace)
                .filter(whole(checked))
                .replacement(
                    Document::try_from(doc.as_ref()).map_err(|e| mongodb::error::Error::custom(e.to_string()))?,
                )
                .build()
                .into(),
            Write::Delete => DeleteOneModel::builder().namespace(namespace).filter(whole(checked)).build().into(),
            Write::Insert { doc } => {
                InsertOneModel::builder().namespace(namespace).document(doc.clone()).build().into()
            }
            Write::None => return Ok(None),
        }))
    }

    /// Run the writes of `planned` where `go` says; per write, whether it applied. Inside
    /// `session` when given; `checked`: the documents were read again in it and are as the
    /// plans read them.
    async fn write_all(
        &self,
        planned: &[Planned],
        go: &[bool],
        checked: bool,
        mut session: Option<&mut ClientSession>,
    ) -> Result<Vec<bool>, mongodb::error::Error> {
        let mut applied = vec![false; planned.len()];
        for (i, p) in planned.iter().enumerate() {
            applied[i] = go[i] && matches!(p.write, Write::None);
        }
        let mut go = go.to_vec();
        if let (true, Some(s)) = (checked, session.as_deref_mut()) {
            self.swap_all(planned, &mut go, &mut applied, s).await?;
        }
        let mut models: Vec<(usize, WriteModel)> = Vec::new();
        for (i, p) in planned.iter().enumerate().filter(|(i, _)| go[*i]) {
            if let Some(m) = self.model(p, checked)? {
                models.push((i, m));
            }
        }
        if models.is_empty() {
            return Ok(applied);
        }
        if self.server.bulk {
            let index: Vec<usize> = models.iter().map(|(i, _)| *i).collect();
            let mut action =
                self.db.client().bulk_write(models.into_iter().map(|(_, m)| m)).ordered(false).verbose_results();
            if self.bypass_validation {
                action = action.bypass_document_validation(true);
            }
            let r = match session.as_deref_mut() {
                Some(s) => action.session(s).await?,
                None => action.await?,
            };
            for (k, &i) in index.iter().enumerate() {
                applied[i] = match &planned[i].write {
                    Write::Update { .. } | Write::Replace { .. } => {
                        r.update_results.get(&k).is_some_and(|u| u.matched_count == 1)
                    }
                    Write::Delete => r.delete_results.get(&k).is_some_and(|d| d.deleted_count == 1),
                    Write::Insert { .. } => r.insert_results.contains_key(&k),
                    Write::None => true,
                };
            }
            return Ok(applied);
        }
        // Servers before 8.0: one write at a time in a transaction, a few at once without.
        match session {
            Some(s) => {
                for (i, m) in &models {
                    applied[*i] = self.write_one(&planned[*i].write, m, Some(&mut *s)).await?;
                }
            }
            None => {
                // A few at once (no closure over the borrowed writes: see rust-lang/rust#110338).
                let mut queue: Vec<&(usize, WriteModel)> = models.iter().rev().collect();
                let mut running = futures::stream::FuturesUnordered::new();
                loop {
                    while running.len() < 16 {
                        let Some((i, m)) = queue.pop() else { break };
                        let (i, w) = (*i, &planned[*i].write);
                        running.push(async move { (i, self.write_one(w, m, None).await) });
                    }
                    match running.next().await {
                        Some((i, r)) => applied[i] = r?,
                        None => break,
                    }
                }
            }
        }
        Ok(applied)
    }

    /// The replacements and deletes among the writes of a checked transaction, as one `delete`
    /// of their `_id`s and one `insert` of the new versions: the same documents when it
    /// commits, and about twice as fast as a `replaceOne` each on SecantusDB (change streams
    /// see a delete and an insert for each replaced document). Marks them applied, not to go.
    async fn swap_all(
        &self,
        planned: &[Planned],
        go: &mut [bool],
        applied: &mut [bool],
        s: &mut ClientSession,
    ) -> Result<(), mongodb::error::Error> {
        let swap: Vec<usize> = (0..planned.len())
            .filter(|&i| go[i] && matches!(planned[i].write, Write::Replace { .. } | Write::Delete))
            .collect();
        if swap.is_empty() {
            return Ok(());
        }
        let ids: Vec<Bson> = swap.iter().map(|&i| planned[i].entry.id.clone()).collect();
        let parts: Vec<&Planned> = swap.iter().map(|&i| &planned[i]).collect();
        self.swap(&parts, doc! {"_id": {"$in": ids}}, s).await?;
        for i in swap {
            go[i] = false;
            applied[i] = true;
        }
        Ok(())
    }

    /// Delete the documents matching `q` (exactly those of `planned`, read in this transaction)
    /// and insert the new versions of the replaced ones.
    async fn swap(
        &self,
        planned: &[&Planned],
        q: Document,
        s: &mut ClientSession,
    ) -> Result<(), mongodb::error::Error> {
        let coll = self.db.collection::<Document>(self.coll);
        let deleted = coll.delete_many(q).session(&mut *s).await?.deleted_count;
        if deleted != planned.len() as u64 {
            // The transaction read them all a moment ago: a server that disagrees with itself.
            return Err(mongodb::error::Error::custom(format!(
                "the server deleted {deleted} of the {} documents it had just read in the same transaction",
                planned.len()
            )));
        }
        let docs: Vec<&RawDocumentBuf> = planned
            .iter()
            .filter_map(|p| match &p.write {
                Write::Replace { doc } => Some(doc),
                _ => None,
            })
            .collect();
        if !docs.is_empty() {
            let raw = coll.clone_with_type::<RawDocumentBuf>();
            let options = InsertManyOptions::builder().bypass_document_validation(self.bypass()).build();
            raw.insert_many(docs).with_options(options).session(&mut *s).await?;
        }
        Ok(())
    }

    /// One write (servers before 8.0), its filter taken from its bulk-write model.
    async fn write_one(
        &self,
        w: &Write,
        m: &WriteModel,
        session: Option<&mut ClientSession>,
    ) -> Result<bool, mongodb::error::Error> {
        let coll = self.db.collection::<Document>(self.coll);
        macro_rules! run {
            ($a:expr) => {
                match session {
                    Some(s) => $a.session(s).await,
                    None => $a.await,
                }
            };
        }
        let bypass = self.bypass();
        let update = UpdateOptions::builder().bypass_document_validation(bypass).build();
        let replace = ReplaceOptions::builder().bypass_document_validation(bypass).build();
        let insert = InsertOneOptions::builder().bypass_document_validation(bypass).build();
        Ok(match (w, m) {
            (Write::Update { update: u2, .. }, WriteModel::UpdateOne(u)) => {
                run!(coll.update_one(u.filter.clone(), u2.clone()).with_options(update))?.matched_count == 1
            }
            (Write::Replace { .. }, WriteModel::ReplaceOne(r)) => {
                run!(coll.replace_one(r.filter.clone(), r.replacement.clone()).with_options(replace))?.matched_count
                    == 1
            }
            (Write::Delete, WriteModel::DeleteOne(d)) => run!(coll.delete_one(d.filter.clone()))?.deleted_count == 1,
            (Write::Insert { doc }, _) => match run!(coll.insert_one(doc.clone()).with_options(insert)) {
                Ok(_) => true,
                Err(e) if crate::mongo::is_duplicate_key(&e) => false,
                Err(e) => return Err(e),
            },
            _ => true,
        })
    }

    /// Commit one batch: writes and entries, atomically where transactions exist.
    async fn commit(
        &mut self,
        store: &mut Store,
        planned: &[Planned],
        reading: Reading<'_>,
    ) -> Result<Committed, ExecError> {
        self.guard.check().await?;
        let writing = |coll: &str| mongo(format!("writing documents of {coll}"));
        if let Some(outer) = self.outer.take() {
            let r = async {
                let go = self.still_as_read(planned, reading, &mut *outer).await?;
                let applied = self.write_all(planned, &go, true, Some(&mut *outer)).await?;
                Ok::<_, mongodb::error::Error>(applied)
            }
            .await;
            let applied = match r {
                Ok(a) => a,
                Err(e) => {
                    self.outer = Some(outer);
                    return Err(writing(self.coll)(e));
                }
            };
            let stored = store.append(&applied_entries(planned, &applied), None, Some(&mut *outer)).await;
            self.outer = Some(outer);
            stored?;
            return Ok(Committed { applied });
        }
        if self.server.transactions {
            return self.commit_in_transaction(store, planned, reading).await;
        }
        // No transactions: entries first, then the writes (each conditional on its document
        // being as read), then void what did not apply. On a write error the writes that
        // applied are known from the partial result; the others are voided before the error
        // is returned.
        let all: Vec<Entry> =
            planned.iter().filter(|p| !matches!(p.write, Write::None)).map(|p| p.entry.clone()).collect();
        store.append(&all, None, None).await?;
        let go = vec![true; planned.len()];
        let applied = match self.write_all(planned, &go, false, None).await {
            Ok(a) => a,
            Err(e) => {
                let partial = partially_applied(&e, planned);
                let missed: Vec<Bson> =
                    planned.iter().zip(&partial).filter(|(_, a)| !**a).map(|(p, _)| p.entry.id.clone()).collect();
                store.void(missed).await?;
                return Err(writing(self.coll)(e));
            }
        };
        let missed: Vec<Bson> =
            planned.iter().zip(&applied).filter(|(_, a)| !**a).map(|(p, _)| p.entry.id.clone()).collect();
        store.void(missed).await?;
        Ok(Committed { applied })
    }

    /// Read the batch's documents again in the transaction: which are still as the plans read
    /// them (the others changed since, and are planned again). A forward pass's batch is read by
    /// its `_id` range and filter, cheaper than by `_id`s on SecantusDB; what that does not find
    /// (the document no longer matches, or the range cannot be told) is looked for by `_id`.
    async fn still_as_read(
        &self,
        planned: &[Planned],
        reading: Reading<'_>,
        s: &mut ClientSession,
    ) -> Result<Vec<bool>, mongodb::error::Error> {
        let ids: Vec<Bson> = planned.iter().map(|p| p.entry.id.clone()).collect();
        let range = match (reading.filter, ids.first(), ids.last()) {
            (Some(f), Some(first), Some(last)) => id_range(first, last, f),
            _ => None,
        };
        let mut now: HashMap<Vec<u8>, RawDocumentBuf> = HashMap::with_capacity(planned.len());
        if let Some(q) = range {
            let docs = self.read_in(q, reading.projection, s).await?;
            now.extend(docs.into_iter().map(|d| (id_key(&raw_id(&d)), d)));
        }
        let missing: Vec<Bson> = ids.into_iter().filter(|id| !now.contains_key(&id_key(id))).collect();
        if !missing.is_empty() {
            let docs = self.read_in(doc! {"_id": {"$in": missing}}, reading.projection, s).await?;
            now.extend(docs.into_iter().map(|d| (id_key(&raw_id(&d)), d)));
        }
        Ok(planned
            .iter()
            .map(|p| {
                let current = now.get(&id_key(&p.entry.id)).map(|d| d.as_bytes());
                current == p.read.as_ref().map(|r| r.as_bytes())
            })
            .collect())
    }

    /// The documents matching `q`, read in the session's transaction.
    async fn read_in(
        &self,
        q: Document,
        projection: Option<&Document>,
        s: &mut ClientSession,
    ) -> Result<Vec<RawDocumentBuf>, mongodb::error::Error> {
        let coll = self.db.collection::<RawDocumentBuf>(self.coll);
        let mut find = coll.find(q);
        if let Some(p) = projection {
            find = find.projection(p.clone());
        }
        let mut cursor = find.session(&mut *s).await?;
        let mut out = Vec::new();
        while let Some(d) = cursor.next(&mut *s).await {
            out.push(d?);
        }
        Ok(out)
    }

    /// One transaction for the batch; retried on a write conflict with backoff. A part that
    /// keeps conflicting (the application writing its documents all the time) is split in
    /// halves: smaller transactions are shorter, and conflict less.
    async fn commit_in_transaction(
        &self,
        store: &mut Store,
        planned: &[Planned],
        reading: Reading<'_>,
    ) -> Result<Committed, ExecError> {
        let started = Instant::now();
        let mut session = self.guard.session(self.db).await?;
        let mut applied = vec![false; planned.len()];
        // Parts of the batch still to commit, first one first: (start, end).
        let mut parts = vec![(0, planned.len())];
        while let Some((lo, hi)) = parts.pop() {
            let part = &planned[lo..hi];
            let mut wait = Duration::from_millis(50);
            for attempt in 1.. {
                let mark = store.mark();
                let e = match self.try_transaction(&mut session, store, part, reading).await {
                    Ok(a) => {
                        applied[lo..hi].copy_from_slice(&a);
                        break;
                    }
                    Err(e) => e,
                };
                let _ = session.abort_transaction().await;
                // The chunk number was not used: the transaction aborted.
                store.reset(mark);
                if !conflict(&e) || started.elapsed() > CONFLICT_DEADLINE {
                    return Err(mongo(format!("writing documents of {}", self.coll))(e));
                }
                self.guard.check().await?;
                if attempt >= 3 && part.len() > 1 {
                    let mid = lo + part.len() / 2;
                    parts.push((mid, hi));
                    parts.push((lo, mid));
                    break;
                }
                tracing::debug!(error = %crate::mongo::describe(&e), "write conflict; retrying the batch");
                let jitter = Duration::from_millis(rand::random::<u64>() % 50);
                tokio::time::sleep(wait + jitter).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
        Ok(Committed { applied })
    }

    async fn try_transaction(
        &self,
        session: &mut ClientSession,
        store: &mut Store,
        planned: &[Planned],
        reading: Reading<'_>,
    ) -> Result<Vec<bool>, mongodb::error::Error> {
        session.start_transaction().await?;
        let go = self.still_as_read(planned, reading, session).await?;
        let applied = self.write_all(planned, &go, true, Some(&mut *session)).await?;
        let entries = applied_entries(planned, &applied);
        store.append(&entries, None, Some(&mut *session)).await.map_err(as_driver_error)?;
        commit(session).await?;
        Ok(applied)
    }

    /// A batch of a forward pass read, planned and written in one transaction, for planners
    /// that plan from the documents alone ([`Planner::pure`]): read the documents of the
    /// batch's `_id` range that match the filter (the pre-images), plan them, write (one update
    /// over the same range and filter for a [`Planner::one_update`]; otherwise the planned
    /// writes), store the entries, commit. Snapshot isolation makes the read and the writes see
    /// the same documents, and a document another writer changes after the read fails the
    /// transaction with a write conflict (retried), so this is as exact as reading first and
    /// writing each document only while it is as read, with one read and one write less.
    /// `ids`: the batch, in `_id` order. Returns the documents changed, and the `_id`s of the
    /// batch it did not read (they no longer match, or the range could not find them) or could
    /// not write (a range cannot bound `_id`s of mixed kinds; it kept conflicting): those are
    /// read again and written one document at a time.
    async fn batch_in_transaction<P: Planner>(
        &self,
        store: &tokio::sync::Mutex<&mut Store>,
        planner: &tokio::sync::Mutex<&mut P>,
        filter: &Document,
        ids: Vec<Bson>,
    ) -> Result<(u64, Vec<Bson>), ExecError> {
        let (Some(first), Some(last)) = (ids.first(), ids.last()) else { return Ok((0, ids)) };
        let Some(q) = id_range(first, last, filter) else { return Ok((0, ids)) };
        self.guard.check().await?;
        let mut session = self.guard.session(self.db).await?;
        let mut wait = Duration::from_millis(50);
        for _attempt in 1..=3 {
            let e = match self.try_batch(&mut session, store, planner, filter, &q).await {
                Ok(Some((n, read))) => {
                    let read: HashSet<Vec<u8>> = read.iter().map(id_key).collect();
                    return Ok((n, ids.into_iter().filter(|id| !read.contains(&id_key(id))).collect()));
                }
                Ok(None) => break,
                Err(e) => e,
            };
            // A chunk number a transaction took is not used again (the numbers need not be
            // contiguous): another batch may have taken the next one meanwhile.
            let _ = session.abort_transaction().await;
            let e = match e {
                Failed::Driver(e) if conflict(&e) => e,
                Failed::Driver(e) => return Err(mongo(format!("writing documents of {}", self.coll))(e)),
                Failed::Plan(e) => return Err(e),
            };
            self.guard.check().await?;
            tracing::debug!(error = %crate::mongo::describe(&e), "write conflict; retrying the batch");
            tokio::time::sleep(wait + Duration::from_millis(rand::random::<u64>() % 50)).await;
            wait *= 2;
        }
        Ok((0, ids))
    }

    /// Whether batches of `planner` are read and written in one transaction each.
    fn batchwise<P: Planner>(&self, planner: &P) -> bool {
        self.server.transactions && self.outer.is_none() && planner.pure()
    }

    async fn try_batch<P: Planner>(
        &self,
        session: &mut ClientSession,
        store: &tokio::sync::Mutex<&mut Store>,
        planner: &tokio::sync::Mutex<&mut P>,
        filter: &Document,
        q: &Document,
    ) -> Result<Option<(u64, Vec<Bson>)>, Failed> {
        session.start_transaction().await?;
        let (projection, update) = {
            let p = planner.lock().await;
            (p.projection(), p.one_update().filter(|(f, _)| *f == filter).map(|(_, u)| u.clone()))
        };
        let docs = self.read_in(q.clone(), projection.as_ref(), session).await?;
        let read: Vec<Bson> = docs.iter().map(|d| raw_id(d)).collect();
        let planned = planner.lock().await.plan(docs).await.map_err(Failed::Plan)?;
        match update {
            Some(update) => {
                let coll = self.db.collection::<Document>(self.coll);
                let r = coll.update_many(q.clone(), update.clone()).session(&mut *session).await?;
                if r.matched_count != planned.len() as u64 {
                    // The update saw other documents than the read of the same transaction.
                    tracing::warn!(
                        read = planned.len(),
                        matched = r.matched_count,
                        "the server's update matched other documents than its read in the same transaction"
                    );
                    let _ = session.abort_transaction().await;
                    return Ok(None);
                }
            }
            _ if planned.len() == read.len()
                && planned.iter().all(|p| matches!(p.write, Write::Replace { .. } | Write::Delete)) =>
            {
                // Every document read is replaced or deleted: they go by the range, cheaper than
                // by their `_id`s on SecantusDB.
                self.swap(&planned.iter().collect::<Vec<_>>(), q.clone(), session).await?;
            }
            _ => {
                let applied = self.write_all(&planned, &vec![true; planned.len()], true, Some(&mut *session)).await?;
                if applied.iter().any(|a| !a) {
                    let _ = session.abort_transaction().await;
                    return Ok(None);
                }
            }
        }
        let entries = applied_entries(&planned, &vec![true; planned.len()]);
        store.lock().await.append(&entries, None, Some(&mut *session)).await.map_err(Failed::Plan)?;
        commit(session).await?;
        Ok(Some((entries.len() as u64, read)))
    }

    /// Plan, commit, and plan again what did not apply, until every document is changed or
    /// [`MAX_ROUNDS`] is reached. `from`: the chunk a restore finishes with this batch (its
    /// progress is stored once the batch settled). Returns how many writes applied.
    async fn settle<R: Replanner>(
        &mut self,
        store: &mut Store,
        mut planned: Vec<Planned>,
        reading: Reading<'_>,
        from: Option<i64>,
        replanner: &mut R,
    ) -> Result<u64, ExecError> {
        let mut applied_total = 0u64;
        for round in 1..=MAX_ROUNDS {
            let c = self.commit(store, &planned, reading).await?;
            applied_total +=
                planned.iter().zip(&c.applied).filter(|(p, a)| **a && !matches!(p.write, Write::None)).count() as u64;
            let missed: Vec<Bson> =
                planned.iter().zip(&c.applied).filter(|(_, a)| !**a).map(|(p, _)| p.entry.id.clone()).collect();
            if missed.is_empty() {
                if let Some(n) = from {
                    let session = self.outer.as_deref_mut();
                    store.append(&[], Some(n), session).await?;
                }
                return Ok(applied_total);
            }
            if round == MAX_ROUNDS {
                let shown: Vec<String> = missed.iter().take(10).map(|i| i.to_string()).collect();
                return Err(ExecError::Data(format!(
                    "{} document(s) of {} changed every time they were read ({MAX_ROUNDS} times), so this step never \
                     changed them: _id {}",
                    missed.len(),
                    self.coll,
                    shown.join(", ")
                )));
            }
            tracing::debug!(
                documents = missed.len(),
                round,
                "documents changed since they were read; reading them again"
            );
            planned = replanner.replan(self.db, self.coll, missed).await?;
        }
        unreachable!("the loop returns")
    }
}

/// Plans again the documents whose writes did not apply (they changed since they were read).
#[allow(async_fn_in_trait)]
trait Replanner {
    async fn replan(&mut self, db: &Database, coll: &str, ids: Vec<Bson>) -> Result<Vec<Planned>, ExecError>;
}

/// A forward pass reads them again (those that no longer match are left alone) and plans.
struct ReadAgain<'p, P> {
    filter: Document,
    planner: &'p mut P,
}

impl<P: Planner> ReadAgain<'_, P> {
    /// The documents of `ids` that still match the filter, in `_id` order.
    async fn read(&mut self, db: &Database, coll: &str, ids: Vec<Bson>) -> Result<Vec<RawDocumentBuf>, ExecError> {
        let q = doc! {"$and": [self.filter.clone(), {"_id": {"$in": ids}}]};
        let c = db.collection::<RawDocumentBuf>(coll);
        let mut find = c.find(q).sort(doc! {"_id": 1});
        if let Some(p) = self.planner.projection() {
            find = find.projection(p);
        }
        let reading = || mongo("reading changed documents again");
        find.await.map_err(reading())?.try_collect().await.map_err(reading())
    }
}

impl<P: Planner> Replanner for ReadAgain<'_, P> {
    async fn replan(&mut self, db: &Database, coll: &str, ids: Vec<Bson>) -> Result<Vec<Planned>, ExecError> {
        let again = self.read(db, coll, ids).await?;
        self.planner.plan(again).await
    }
}

/// A restore plans putting back the same entries onto their current versions.
struct RestoreAgain<'e> {
    entries: &'e [Entry],
    posts: &'e [Option<preimages::Hash>],
}

impl Replanner for RestoreAgain<'_> {
    async fn replan(&mut self, db: &Database, coll: &str, ids: Vec<Bson>) -> Result<Vec<Planned>, ExecError> {
        let ids: HashSet<Vec<u8>> = ids.iter().map(id_key).collect();
        let (mut es, mut ps) = (Vec::new(), Vec::new());
        for (e, p) in self.entries.iter().zip(self.posts) {
            if ids.contains(&id_key(&e.id)) {
                es.push(e.clone());
                ps.push(*p);
            }
        }
        // Conflicts were counted when the entries were first planned.
        plan_restore(db, coll, &es, &ps, &mut Restored::default()).await
    }
}

/// A write conflict: the batch may succeed if tried again. Not an unknown commit result: the
/// transaction may have committed, and running it again would apply a non-idempotent change
/// (`$inc`) twice; [`commit`] asks again for the commit itself instead.
///
/// SecantusDB reports a write conflict its storage engine finds at commit as InternalError
/// (code 1) where MongoDB says WriteConflict; without an unknown-result label the transaction
/// did not commit, so running it again is as safe as after a conflict.
fn conflict(e: &mongodb::error::Error) -> bool {
    !e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT)
        && (e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
            || matches!(
                crate::mongo::error_code(e),
                Some(crate::mongo::code::WRITE_CONFLICT | crate::mongo::code::INTERNAL_ERROR)
            ))
}

/// Commit the session's transaction. A commit whose result is unknown (the connection dropped,
/// the primary stepped down) is asked for again, as MongoDB's drivers specify: committing is
/// idempotent, running the transaction again is not.
async fn commit(session: &mut ClientSession) -> Result<(), mongodb::error::Error> {
    let mut wait = Duration::from_millis(100);
    for attempt in 1.. {
        match session.commit_transaction().await {
            Err(e) if e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT) && attempt < 6 => {
                tracing::debug!(error = %crate::mongo::describe(&e), "commit result unknown; committing again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            r => return r,
        }
    }
    unreachable!("the loop returns")
}

/// Why a batch's transaction failed: the server (a conflict is retried), or planning it.
enum Failed {
    Driver(mongodb::error::Error),
    Plan(ExecError),
}

impl From<mongodb::error::Error> for Failed {
    fn from(e: mongodb::error::Error) -> Self {
        Failed::Driver(e)
    }
}

/// An error met inside a transaction, as the driver's (so conflicts are still told apart).
fn as_driver_error(e: ExecError) -> mongodb::error::Error {
    match e {
        ExecError::Mongo { source, .. } => source,
        other => mongodb::error::Error::custom(other.to_string()),
    }
}

/// Which writes of a bulk write that failed applied anyway (none when it tells nothing).
fn partially_applied(e: &mongodb::error::Error, planned: &[Planned]) -> Vec<bool> {
    use mongodb::error::{ErrorKind, PartialBulkWriteResult};
    let mut out = vec![false; planned.len()];
    if let ErrorKind::BulkWrite(b) = e.kind.as_ref() {
        if let Some(PartialBulkWriteResult::Verbose(r)) = &b.partial_result {
            // Indexes count the writes that were sent (those with a write).
            let sent: Vec<usize> = (0..planned.len()).filter(|i| !matches!(planned[*i].write, Write::None)).collect();
            for (k, &i) in sent.iter().enumerate() {
                out[i] = r.update_results.get(&k).is_some_and(|u| u.matched_count == 1)
                    || r.delete_results.get(&k).is_some_and(|d| d.deleted_count == 1)
                    || r.insert_results.contains_key(&k);
            }
        }
    }
    out
}

/// Entries of the writes that applied (a planned `Write::None` changes nothing: no entry).
fn applied_entries(planned: &[Planned], applied: &[bool]) -> Vec<Entry> {
    planned
        .iter()
        .zip(applied)
        .filter(|(p, a)| **a && !matches!(p.write, Write::None))
        .map(|(p, _)| p.entry.clone())
        .collect()
}

/// How an operation turns the documents it read into writes.
#[allow(async_fn_in_trait)]
pub trait Planner {
    /// The fields to read (`None`: whole documents).
    fn projection(&self) -> Option<Document>;
    /// Plan the writes of a batch. Documents that need no change get no write.
    async fn plan(&mut self, docs: Vec<RawDocumentBuf>) -> Result<Vec<Planned>, ExecError>;
    /// `(filter, update)` when every write it plans is `update` on a document matching `filter`:
    /// then a batch written in one transaction is one update over its `_id` range.
    fn one_update(&self) -> Option<(&Document, &UpdateModifications)> {
        None
    }
    /// It plans from nothing but the documents it is given, so a batch can be read, planned
    /// and written in one transaction ([`Pass::batch_in_transaction`]).
    fn pure(&self) -> bool {
        false
    }
}

/// A forward pass: change every document of `pass.coll` matching `filter` as `planner` says,
/// storing entries under `key`. `catch_up`: a changed document no longer matches the filter,
/// so after the pass the filter is run again (up to 3 times) for documents that arrived behind
/// the cursor while it ran. Returns how many documents changed.
pub async fn forward<P: Planner>(
    pass: &mut Pass<'_>,
    key: &str,
    filter: Document,
    planner: &mut P,
    catch_up: bool,
) -> Result<u64, ExecError> {
    let mut store = Store::create(pass.db, key).await?;
    let mut changed = 0u64;
    for _ in 0..if catch_up { 4 } else { 1 } {
        let (seen, n) = match pass.outer.is_some() {
            true => forward_in_transaction(pass, &mut store, &filter, planner).await?,
            false => forward_with_cursor(pass, &mut store, &filter, planner).await?,
        };
        changed += n;
        if seen == 0 {
            break;
        }
    }
    Ok(changed)
}

/// One scan with a cursor, a batch at a time. Returns (documents read, changed).
async fn forward_with_cursor<P: Planner>(
    pass: &mut Pass<'_>,
    store: &mut Store,
    filter: &Document,
    planner: &mut P,
) -> Result<(u64, u64), ExecError> {
    if pass.batchwise(planner) {
        return forward_batchwise(pass, store, filter, planner).await;
    }
    let name = pass.coll.to_string();
    let reading = || mongo(format!("reading {name}"));
    let coll = pass.db.collection::<RawDocumentBuf>(pass.coll);
    let batching = pass.batching;
    let mut find = coll.find(filter.clone()).sort(doc! {"_id": 1}).batch_size(batching.docs.min(BATCH) as u32);
    if let Some(p) = planner.projection() {
        find = find.projection(p);
    }
    let mut cursor = find.await.map_err(reading())?;
    let (mut seen, mut changed) = (0u64, 0u64);
    let (mut batch, mut bytes) = (Vec::new(), 0usize);
    loop {
        let next = cursor.try_next().await.map_err(reading())?;
        let end = next.is_none();
        if let Some(d) = next {
            bytes += d.as_bytes().len();
            batch.push(d);
        }
        if !batching.full(batch.len(), bytes) && !end {
            continue;
        }
        bytes = 0;
        if batch.is_empty() {
            break;
        }
        seen += batch.len() as u64;
        changed += forward_batch(pass, store, filter, planner, std::mem::take(&mut batch)).await?;
        if let Some(p) = &pass.progress {
            p(seen, None);
        }
        if end {
            break;
        }
    }
    Ok((seen, changed))
}

/// How many batches are in flight at once in a batchwise scan.
const IN_FLIGHT: usize = 2;

/// One scan of a [`Pass::batchwise`] planner: the cursor reads `_id`s on a task of its own,
/// and each batch is read, planned and written in its own transaction, [`IN_FLIGHT`] at a
/// time (while the server writes one, the next is read and planned: ranges do not overlap, so
/// they never conflict with each other). What a batch's transaction did not change, or could
/// not, is written one document at a time after the scan. Returns (documents read, changed).
async fn forward_batchwise<P: Planner>(
    pass: &mut Pass<'_>,
    store: &mut Store,
    filter: &Document,
    planner: &mut P,
) -> Result<(u64, u64), ExecError> {
    store.ensure(pass.db).await?;
    let name = pass.coll.to_string();
    let reading = || mongo(format!("reading {name}"));
    let (tx, mut batches) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let (coll, f) = (pass.db.collection::<RawDocumentBuf>(pass.coll), filter.clone());
    // Batches end by bytes too: the cursor asks the server for each document's size along with
    // its `_id` ($bsonSize, MongoDB 4.4+). The whole document's, even where the pass reads some
    // fields only: an overestimate, never an underestimate (those fields may be most of it).
    let batching = pass.batching;
    let reader = AbortOnDrop(tokio::spawn(async move {
        let projection = doc! {"_id": 1, "s": {"$bsonSize": "$$ROOT"}};
        let find =
            coll.find(f).sort(doc! {"_id": 1}).projection(projection).batch_size(batching.docs.min(BATCH) as u32);
        let mut cursor = match find.await {
            Ok(c) => c,
            Err(e) => return drop(tx.send(Err(e)).await),
        };
        let (mut batch, mut bytes) = (Vec::new(), 0usize);
        loop {
            match cursor.try_next().await {
                Ok(Some(d)) => {
                    bytes += d.get("s").ok().flatten().and_then(|s| s.as_i32()).unwrap_or(0).max(0) as usize;
                    batch.push(d);
                    if batching.full(batch.len(), bytes) {
                        bytes = 0;
                        if tx.send(Ok(std::mem::take(&mut batch))).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) if batch.is_empty() => return,
                Ok(None) => return drop(tx.send(Ok(batch)).await),
                Err(e) => return drop(tx.send(Err(e)).await),
            }
        }
    }));
    let (mut seen, mut changed) = (0u64, 0u64);
    // What the batches' transactions left, batch by batch: each stays within its batch's bounds.
    let mut later: Vec<Vec<Bson>> = Vec::new();
    {
        let shared = (&*pass, tokio::sync::Mutex::new(&mut *store), tokio::sync::Mutex::new(&mut *planner));
        let mut running = futures::stream::FuturesOrdered::new();
        let mut more = true;
        loop {
            tokio::select! {
                b = batches.recv(), if more && running.len() < IN_FLIGHT => match b {
                    Some(Ok(docs)) => {
                        seen += docs.len() as u64;
                        let ids: Vec<Bson> = docs.iter().map(|d| raw_id(d)).collect();
                        running.push_back(shared.0.batch_in_transaction(&shared.1, &shared.2, filter, ids));
                    }
                    Some(Err(e)) => return Err(reading()(e)),
                    None => more = false,
                },
                Some(r) = running.next() => {
                    let (n, rest) = r?;
                    changed += n;
                    if !rest.is_empty() {
                        later.push(rest);
                    }
                    if let Some(p) = &shared.0.progress {
                        p(seen, None);
                    }
                }
                else => break,
            }
        }
    }
    drop(reader);
    for ids in later {
        let docs = ReadAgain { filter: filter.clone(), planner: &mut *planner }.read(pass.db, pass.coll, ids).await?;
        changed += forward_batch(pass, store, filter, planner, docs).await?;
    }
    Ok((seen, changed))
}

/// A task stopped when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Inside a migration's own transaction (`transaction: true`): read in it, then change.
async fn forward_in_transaction<P: Planner>(
    pass: &mut Pass<'_>,
    store: &mut Store,
    filter: &Document,
    planner: &mut P,
) -> Result<(u64, u64), ExecError> {
    let coll = pass.db.collection::<RawDocumentBuf>(pass.coll);
    let mut find = coll.find(filter.clone()).sort(doc! {"_id": 1});
    if let Some(p) = planner.projection() {
        find = find.projection(p);
    }
    let name = pass.coll.to_string();
    let reading = || mongo(format!("reading {name}"));
    let s = pass.outer.as_deref_mut().expect("in a transaction");
    let mut cursor = find.session(&mut *s).await.map_err(reading())?;
    let mut docs = Vec::new();
    while let Some(d) = cursor.next(&mut *s).await {
        docs.push(d.map_err(reading())?);
    }
    drop(cursor);
    let seen = docs.len() as u64;
    let mut changed = 0;
    for batch in pass.batching.split(docs) {
        changed += forward_batch(pass, store, filter, planner, batch).await?;
    }
    Ok((seen, changed))
}

/// Plan and settle one batch of a forward pass, writing each document only while it is as read.
async fn forward_batch<P: Planner>(
    pass: &mut Pass<'_>,
    store: &mut Store,
    filter: &Document,
    planner: &mut P,
    docs: Vec<RawDocumentBuf>,
) -> Result<u64, ExecError> {
    let planned: Vec<Planned> = planner.plan(docs).await?;
    if planned.is_empty() {
        return Ok(0);
    }
    let projection = planner.projection();
    let reading = Reading { projection: projection.as_ref(), filter: Some(filter) };
    pass.settle(store, planned, reading, None, &mut ReadAgain { filter: filter.clone(), planner }).await
}

/// Insert documents that must not exist yet. `skip_existing`: those whose `_id` exists are
/// left alone and returned; otherwise an existing `_id` fails the step before anything is
/// written. Returns (inserted, skipped `_id`s).
pub async fn insert(
    pass: &mut Pass<'_>,
    key: &str,
    docs: Vec<Document>,
    skip_existing: bool,
) -> Result<(u64, Vec<Bson>), ExecError> {
    let mut store = Store::create(pass.db, key).await?;
    let coll = pass.db.collection::<Document>(pass.coll);
    let mut todo = docs;
    let mut skipped = Vec::new();
    let mut inserted = 0u64;
    for _ in 0..MAX_ROUNDS {
        let ids: Vec<Bson> = todo.iter().map(|d| d.get("_id").cloned().unwrap_or(Bson::Null)).collect();
        let existing: Vec<Bson> = coll
            .find(doc! {"_id": {"$in": ids}})
            .projection(doc! {"_id": 1})
            .await
            .map_err(mongo("looking for existing documents"))?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(mongo("looking for existing documents"))?
            .into_iter()
            .filter_map(|d| d.get("_id").cloned())
            .collect();
        if !existing.is_empty() && !skip_existing {
            let shown: Vec<String> = existing.iter().take(10).map(|i| i.to_string()).collect();
            return Err(ExecError::Precondition(format!(
                "{} document(s) to insert into {} already exist (_id {}); nothing was inserted. Give them other `_id`s, \
                 or set `onConflict: skip` to leave existing documents alone",
                existing.len(),
                pass.coll,
                shown.join(", ")
            )));
        }
        let existing: HashSet<Vec<u8>> = existing.iter().map(id_key).collect();
        todo.retain(|d| {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            if existing.contains(&id_key(&id)) {
                skipped.push(id);
                false
            } else {
                true
            }
        });
        let planned: Vec<Planned> = todo
            .iter()
            .map(|d| {
                let raw = RawDocumentBuf::from_document(d).expect("a document");
                Planned {
                    entry: Entry {
                        id: d.get("_id").cloned().unwrap_or(Bson::Null),
                        fields: None,
                        pre: None,
                        post: Some(preimages::hash_of(Some(&raw), None)),
                        order: None,
                    },
                    read: None,
                    write: Write::Insert { doc: d.clone() },
                }
            })
            .collect();
        if planned.is_empty() {
            break;
        }
        let ids_only = doc! {"_id": 1};
        let c = pass.commit(&mut store, &planned, Reading { projection: Some(&ids_only), filter: None }).await?;
        inserted += c.applied.iter().filter(|a| **a).count() as u64;
        // Not inserted: an `_id` that appeared in the meantime. Look again.
        let done: HashSet<Vec<u8>> =
            planned.iter().zip(&c.applied).filter(|(_, a)| **a).map(|(p, _)| id_key(&p.entry.id)).collect();
        todo.retain(|d| !done.contains(&id_key(d.get("_id").unwrap_or(&Bson::Null))));
        if todo.is_empty() {
            break;
        }
    }
    Ok((inserted, skipped))
}

/// How a restore learns what a change wrote, when the entries do not say (the server computed
/// it): the change is applied again to the pre-images, in a scratch collection.
#[derive(Debug, Clone)]
pub struct Recompute {
    pub update: UpdateModifications,
    /// The filter the change ran with (for positional `$` updates).
    pub filter: Document,
}

/// What a restore did.
#[derive(Debug, Default, Clone)]
pub struct Restored {
    pub written: u64,
    /// Documents whose changed fields were changed again since (the pre-image won).
    pub conflicts: u64,
    /// Their `_id`s (the first 100).
    pub conflict_ids: Vec<Bson>,
}

const LISTED_CONFLICTS: usize = 100;

/// Put back the entries stored under `from_key`, newest first, into `pass.coll`, storing what
/// it overwrites under `key` (so the restore itself can be undone) and its progress (so an
/// interrupted restore resumes where it stopped).
pub async fn restore(
    pass: &mut Pass<'_>,
    key: &str,
    from_key: &str,
    recompute: Option<&Recompute>,
) -> Result<Restored, ExecError> {
    let source = Store::open(pass.db, from_key).await?;
    let mut own = Store::open(pass.db, key).await?;
    // Progress: the chunks of `from_key` done by an earlier, interrupted attempt.
    let done = own.restored_from().await?;
    let mut out = Restored::default();
    let mut chunks = source.chunks_newest_first();
    while let Some(chunk) = chunks.next().await? {
        if done.contains(&chunk.n) {
            continue;
        }
        let mut entries = chunk.entries;
        entries.reverse();
        let posts = match recompute {
            Some(r) if entries.iter().any(|e| e.post.is_none()) => recompute_posts(pass, key, &entries, r).await?,
            _ => entries.iter().map(|e| e.post).collect(),
        };
        let planned = plan_restore(pass.db, pass.coll, &entries, &posts, &mut out).await?;
        let mut again = RestoreAgain { entries: &entries, posts: &posts };
        out.written += pass.settle(&mut own, planned, Reading::default(), Some(chunk.n), &mut again).await?;
    }
    Ok(out)
}

/// Read the current versions of the entries' documents and plan putting the entries back.
async fn plan_restore(
    db: &Database,
    coll: &str,
    entries: &[Entry],
    posts: &[Option<preimages::Hash>],
    out: &mut Restored,
) -> Result<Vec<Planned>, ExecError> {
    let ids: Vec<Bson> = entries.iter().map(|e| e.id.clone()).collect();
    let current: Vec<RawDocumentBuf> = db
        .collection::<RawDocumentBuf>(coll)
        .find(doc! {"_id": {"$in": ids}})
        .await
        .map_err(mongo(format!("reading {coll}")))?
        .try_collect()
        .await
        .map_err(mongo(format!("reading {coll}")))?;
    let current: HashMap<Vec<u8>, RawDocumentBuf> = current.into_iter().map(|d| (id_key(&raw_id(&d)), d)).collect();
    let find = |id: &Bson| current.get(&id_key(id));
    let mut planned = Vec::with_capacity(entries.len());
    for (e, post) in entries.iter().zip(posts) {
        let now = find(&e.id);
        let (r, conflict) = preimages::restore(e, now.map(|d| d.as_ref()), *post).map_err(ExecError::Data)?;
        if conflict {
            out.conflicts += 1;
            if out.conflict_ids.len() < LISTED_CONFLICTS {
                out.conflict_ids.push(e.id.clone());
            }
        }
        // The restore's own entry: what it overwrites, to undo it.
        let own_pre = match (&e.fields, now) {
            (_, None) => None,
            (Some(f), Some(d)) => Some(preimages::project(d, f)),
            (None, Some(d)) => Some(d.clone()),
        };
        let write = match (&r, now) {
            (preimages::Restore::Unchanged, _) => Write::None,
            (preimages::Restore::Delete, Some(_)) => Write::Delete,
            (preimages::Restore::Delete, None) => Write::None,
            (preimages::Restore::Write(new), Some(_)) => Write::Replace { doc: new.clone() },
            (preimages::Restore::Write(new), None) => Write::Insert { doc: to_doc(new)? },
        };
        let after = match &r {
            preimages::Restore::Unchanged => now.map(|d| d.to_raw_document_buf()),
            preimages::Restore::Delete => None,
            preimages::Restore::Write(new) => Some(new.clone()),
        };
        let entry = Entry {
            id: e.id.clone(),
            fields: e.fields.clone(),
            pre: own_pre,
            post: Some(preimages::hash_of(after.as_deref(), e.fields.as_deref())),
            order: now.map(|d| preimages::field_order(d)),
        };
        planned.push(Planned { entry, read: now.map(|d| d.to_raw_document_buf()), write });
    }
    Ok(planned)
}

fn to_doc(d: &bson::RawDocument) -> Result<Document, ExecError> {
    Document::try_from(d).map_err(|e| ExecError::Data(format!("a document cannot be read: {e}")))
}

/// What the change wrote, for entries that do not say: apply it again to their pre-images in
/// a scratch collection of the tenant database.
async fn recompute_posts(
    pass: &Pass<'_>,
    key: &str,
    entries: &[Entry],
    r: &Recompute,
) -> Result<Vec<Option<preimages::Hash>>, ExecError> {
    let name = format!("{}_scratch", preimages::collection_name(key));
    let scratch = pass.db.collection::<RawDocumentBuf>(&name);
    let fail = || mongo("recomputing what a change wrote");
    scratch.drop().await.map_err(fail())?;
    let pres: Vec<RawDocumentBuf> = entries.iter().filter_map(|e| e.pre.clone()).collect();
    if !pres.is_empty() {
        scratch.insert_many(&pres).await.map_err(fail())?;
        scratch.clone_with_type::<Document>().update_many(r.filter.clone(), r.update.clone()).await.map_err(fail())?;
    }
    let after: Vec<RawDocumentBuf> = scratch.find(doc! {}).await.map_err(fail())?.try_collect().await.map_err(fail())?;
    scratch.drop().await.map_err(fail())?;
    Ok(entries
        .iter()
        .map(|e| {
            e.post.or_else(|| {
                let now = after.iter().find(|d| id_key(&raw_id(d)) == id_key(&e.id));
                Some(preimages::hash_of(now.map(|d| d.as_ref()), e.fields.as_deref()))
            })
        })
        .collect())
}

/// Planner of the operations the server computes, that touch known top-level fields
/// (addField, removeField, renameField, convertType, updateMany with operators or `$set` /
/// `$unset` stages): each document is updated only while those fields, and the operation's
/// filter, still hold what was read.
pub struct FieldUpdate {
    pub filter: Document,
    pub update: UpdateModifications,
    pub fields: Vec<String>,
    /// Read (and keep as the pre-image) whole documents: what recomputing the change needs when
    /// it reads other fields (pipelines, positional `$` updates).
    pub whole_pre: bool,
}

impl Planner for FieldUpdate {
    fn projection(&self) -> Option<Document> {
        if self.whole_pre {
            return None;
        }
        let mut p = doc! {"_id": 1};
        for f in &self.fields {
            p.insert(f.clone(), 1);
        }
        Some(p)
    }

    fn one_update(&self) -> Option<(&Document, &UpdateModifications)> {
        Some((&self.filter, &self.update))
    }

    fn pure(&self) -> bool {
        true
    }

    async fn plan(&mut self, docs: Vec<RawDocumentBuf>) -> Result<Vec<Planned>, ExecError> {
        Ok(docs
            .into_iter()
            .map(|d| {
                let only = if self.whole_pre { d.clone() } else { preimages::project(&d, &self.fields) };
                Planned {
                    entry: Entry {
                        id: raw_id(&d),
                        fields: Some(self.fields.clone()),
                        pre: Some(only),
                        post: None,
                        order: None,
                    },
                    read: Some(d),
                    write: Write::Update {
                        filter: self.filter.clone(),
                        update: self.update.clone(),
                        fields: self.fields.clone(),
                    },
                }
            })
            .collect())
    }
}

/// Planner of whole-document deletes: each document is deleted only while it is exactly as
/// read; its entry is the whole document.
pub struct Delete;

impl Planner for Delete {
    fn projection(&self) -> Option<Document> {
        None
    }

    fn pure(&self) -> bool {
        true
    }

    async fn plan(&mut self, docs: Vec<RawDocumentBuf>) -> Result<Vec<Planned>, ExecError> {
        Ok(docs
            .into_iter()
            .map(|d| Planned {
                entry: Entry {
                    id: raw_id(&d),
                    fields: None,
                    pre: Some(d.clone()),
                    post: Some(preimages::hash_of(None, None)),
                    order: None,
                },
                read: Some(d),
                write: Write::Delete,
            })
            .collect())
    }
}

/// Documents, and their new versions (`None`: leave it as it is).
pub type NewVersions = (Vec<RawDocumentBuf>, Vec<Option<RawDocumentBuf>>);

/// Computes new versions of whole documents.
#[allow(async_fn_in_trait)]
pub trait Rewrite {
    /// Takes the documents and gives them back, with their new versions.
    async fn rewrite(&mut self, docs: Vec<RawDocumentBuf>) -> Result<NewVersions, ExecError>;
}

/// Planner of changes computed whole (transform, updateMany pipelines that may change any
/// field): each changed document is replaced only while it is exactly as read; its entry holds
/// the top-level fields that differ, so undoing it leaves every other field as it is then.
pub struct Rewritten<W> {
    pub rewrite: W,
}

impl<W: Rewrite> Planner for Rewritten<W> {
    fn projection(&self) -> Option<Document> {
        None
    }

    /// A script or a pipeline computes each new version from its document alone.
    fn pure(&self) -> bool {
        true
    }

    async fn plan(&mut self, docs: Vec<RawDocumentBuf>) -> Result<Vec<Planned>, ExecError> {
        let (docs, new) = self.rewrite.rewrite(docs).await?;
        let mut out = Vec::new();
        for (old, new) in docs.into_iter().zip(new) {
            let Some(new) = new else { continue };
            let fields = preimages::changed_fields(&old, &new);
            if fields.is_empty() {
                continue;
            }
            out.push(Planned {
                entry: Entry {
                    id: raw_id(&old),
                    pre: Some(preimages::project(&old, &fields)),
                    post: Some(preimages::hash_of(Some(&new), Some(&fields))),
                    order: Some(preimages::field_order(&old)),
                    fields: Some(fields),
                },
                write: Write::Replace { doc: new },
                read: Some(old),
            });
        }
        Ok(out)
    }
}

/// An update pipeline evaluated by the server on the documents as read (`$documents`), without
/// writing: what the update would make of them.
pub struct Pipeline<'a> {
    pub db: &'a Database,
    pub stages: Vec<Document>,
}

impl Rewrite for Pipeline<'_> {
    async fn rewrite(&mut self, docs: Vec<RawDocumentBuf>) -> Result<NewVersions, ExecError> {
        let new = self.evaluate(&docs).await?;
        Ok((docs, new))
    }
}

impl Pipeline<'_> {
    async fn evaluate(&mut self, docs: &[RawDocumentBuf]) -> Result<Vec<Option<RawDocumentBuf>>, ExecError> {
        let input: Vec<Document> = docs.iter().map(|d| to_doc(d)).collect::<Result<_, _>>()?;
        let mut pipeline = vec![doc! {"$documents": input}];
        pipeline.extend(self.stages.iter().cloned());
        let fail = || mongo("evaluating the update pipeline");
        let out: Vec<Document> =
            self.db.aggregate(pipeline).await.map_err(fail())?.try_collect().await.map_err(fail())?;
        if out.len() != docs.len() {
            return Err(ExecError::Data(format!(
                "the update pipeline made {} document(s) of {}: only stages that keep one document each \
                 ($set, $unset, $project, $replaceWith, ...) can update",
                out.len(),
                docs.len()
            )));
        }
        out.iter()
            .zip(docs)
            .map(|(n, old)| {
                if n.get("_id") != old.get("_id").ok().flatten().and_then(|v| v.to_raw_bson().try_into().ok()).as_ref()
                {
                    return Err(ExecError::Data("the update pipeline changed a document's _id".into()));
                }
                RawDocumentBuf::from_document(n).map(Some).map_err(|e| ExecError::Data(e.to_string()))
            })
            .collect()
    }
}
