//! The pre-image store ("rollback data" in records and docs): for every document a step
//! changes, what the fields it changed held before, and a hash of what they held after. Stored
//! in the tenant database before the change (or, in a transaction, with it).
//!
//! Each step has a collection of its own, `_dbshift_rb_<version>_<step>`. Its chunk documents
//! `{ _id: <n>, count, bson: BinData(0, ...) }` hold [`Entry`]s one BSON document after another
//! (the layout of a mongodump `.bson` file): a server stores one opaque binary value far more
//! cheaply than the same documents as an array, and the client never decodes what it only
//! puts back. Besides entries a store holds:
//! - `{ _id: <n>, void: [ids] }`: entries of writes that did not apply (without transactions,
//!   entries are stored before their writes; the ones whose document changed in between are
//!   voided);
//! - `from: <chunk>` on the chunks of a restore: which chunk of the store it restores was
//!   done, so an interrupted restore resumes where it stopped;
//! - `{ _id: <n + i>, cont: <n>, bson }`: the i-th part of chunk n, whose entries hold more
//!   than [`CHUNK_BYTES`] (a pre-image of a document near MongoDB's 16 MiB limit does not fit
//!   in one document beside anything else). Chunk n says how many parts it has (`parts`) and
//!   is stored after them; a part missing is damage, never a shorter chunk, and parts without
//!   their chunk (a runner killed while storing it, before its changes) are ignored.
//!
//! Putting entries back is field by field: the fields a step changed get their old values,
//! every other field keeps what the application wrote since. A changed field whose value is no
//! longer what the step wrote was changed again afterwards: a conflict. The pre-image wins
//! (that is what undo means), and the conflict is counted and its `_id` listed.

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::{ClientSession, Collection, Database};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};

use super::ops::{mongo, ExecError};
use super::tracking::ROLLBACK_PREFIX;

/// Bytes of entries per chunk document (a document must stay under the 16 MiB BSON limit): a
/// chunk holding more is stored in parts of this size.
pub const CHUNK_BYTES: usize = 8 << 20;

/// The layout of chunks (`v`); others are refused, never guessed at.
const FORMAT: i32 = 2;

/// A hash of what a document's changed fields held after the change.
pub type Hash = [u8; 16];

/// The collection that holds the pre-images of one step (`key` is `<version>_<step>`).
pub fn collection_name(key: &str) -> String {
    let k: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    format!("{ROLLBACK_PREFIX}{k}")
}

/// One document's change.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The document's `_id`.
    pub id: Bson,
    /// The top-level fields the change touched; `None`: the whole document.
    pub fields: Option<Vec<String>>,
    /// What they held before (only the fields present); `None`: the document did not exist.
    /// For whole-document entries, the whole document. It may hold more than `fields` (what
    /// recomputing the change needs); only `fields` are put back.
    pub pre: Option<RawDocumentBuf>,
    /// The hash of what they held after; `None` when the server computed the change and it is
    /// recomputed from `pre` when needed (see [`crate::engine::pass::Recompute`]).
    pub post: Option<Hash>,
    /// The document's top-level field names before the change, in order, when the whole
    /// document was read: putting the entry back restores the order too (fields the
    /// application added since go at the end), so an untouched document comes back byte for byte.
    pub order: Option<Vec<String>>,
}

fn hash_bytes(parts: &[&[u8]]) -> Hash {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// The hash of a document's `fields` (or the whole document), or of its absence.
pub fn hash_of(doc: Option<&RawDocument>, fields: Option<&[String]>) -> Hash {
    match (doc, fields) {
        (None, _) => hash_bytes(&[b"absent"]),
        (Some(d), None) => hash_bytes(&[b"doc", d.as_bytes()]),
        (Some(d), Some(fs)) => {
            let mut parts: Vec<Vec<u8>> = Vec::with_capacity(fs.len());
            for f in fs {
                parts.push(match d.get(f) {
                    Ok(Some(v)) => element_bytes(f, v),
                    _ => format!("missing:{f}").into_bytes(),
                });
            }
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            hash_bytes(&refs)
        }
    }
}

/// A field's name and value as BSON bytes (a one-field document).
fn element_bytes(name: &str, v: RawBsonRef<'_>) -> Vec<u8> {
    let mut one = RawDocumentBuf::new();
    one.append(name, v.to_raw_bson());
    one.into_bytes()
}

/// Only `fields` of `doc` (those present), in the order given, with `_id`.
pub fn project(doc: &RawDocument, fields: &[String]) -> RawDocumentBuf {
    let mut out = RawDocumentBuf::new();
    if let Ok(Some(id)) = doc.get("_id") {
        out.append("_id", id.to_raw_bson());
    }
    for f in fields {
        if let Ok(Some(v)) = doc.get(f) {
            out.append(f.as_str(), v.to_raw_bson());
        }
    }
    out
}

/// The `_id` of a raw document.
pub fn raw_id(d: &RawDocument) -> Bson {
    match d.get("_id") {
        Ok(Some(v)) => v.to_raw_bson().try_into().unwrap_or(Bson::Null),
        _ => Bson::Null,
    }
}

/// An `_id` as bytes, type included: equal exactly when it is the same stored value (`Bson`'s
/// `==` holds a NaN `_id` different from itself, and such a document would never be found).
pub fn id_key(id: &Bson) -> Vec<u8> {
    bson::to_vec(&doc! {"": id.clone()}).unwrap_or_default()
}

/// The top-level fields that differ between two versions of a document (changed, added or
/// removed), in the order they appear (old first, then the new ones).
pub fn changed_fields(old: &RawDocument, new: &RawDocument) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in old.iter().flatten() {
        if k != "_id" && new.get(k).ok().flatten().map(|n| n.to_raw_bson()) != Some(v.to_raw_bson()) {
            out.push(k.to_string());
        }
    }
    for (k, _) in new.iter().flatten() {
        if k != "_id" && !matches!(old.get(k), Ok(Some(_))) {
            out.push(k.to_string());
        }
    }
    out
}

impl Entry {
    pub fn to_raw(&self) -> RawDocumentBuf {
        let mut d = doc! {"_id": self.id.clone()};
        if let Some(f) = &self.fields {
            d.insert("f", f.clone());
        }
        if let Some(o) = &self.order {
            d.insert("o", o.clone());
        }
        let mut raw = RawDocumentBuf::from_document(&d).expect("an entry is a document");
        if let Some(p) = &self.pre {
            raw.append("pre", p.clone());
        }
        if let Some(h) = &self.post {
            raw.append("h", bson::RawBson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: h.to_vec() }));
        }
        raw
    }

    pub fn from_raw(d: &RawDocument) -> Result<Entry, String> {
        let id = raw_id(d);
        let names = |key: &str| -> Result<Option<Vec<String>>, String> {
            match d.get_array(key) {
                Ok(a) => a
                    .into_iter()
                    .map(|v| v.ok().and_then(|v| v.as_str().map(str::to_string)))
                    .collect::<Option<Vec<_>>>()
                    .map(Some)
                    .ok_or_else(|| "a field name is not text".to_string()),
                Err(_) => Ok(None),
            }
        };
        let (fields, order) = (names("f")?, names("o")?);
        let pre = match d.get_document("pre") {
            Ok(p) => Some(p.to_raw_document_buf()),
            Err(_) => None,
        };
        let post = match d.get_binary("h") {
            Ok(b) if b.bytes.len() == 16 => {
                let mut h = [0u8; 16];
                h.copy_from_slice(b.bytes);
                Some(h)
            }
            Ok(_) => return Err("a hash is not 16 bytes".into()),
            Err(_) => None,
        };
        Ok(Entry { id, fields, pre, post, order })
    }

    /// The value of a touched field before the change, if it had one.
    fn pre_field(&self, f: &str) -> Option<bson::RawBson> {
        self.pre.as_ref().and_then(|p| p.get(f).ok().flatten()).map(|v| v.to_raw_bson())
    }
}

/// What putting one entry back does to its document.
#[derive(Debug, Clone, PartialEq)]
pub enum Restore {
    /// The document is already as the entry wants it.
    Unchanged,
    /// Write this version (replacing the current one, or inserting it if there is none).
    Write(RawDocumentBuf),
    /// Delete the document.
    Delete,
}

/// Put an entry back onto the current version of its document (`post`: the hash of what the
/// change wrote, when known). Returns the write and whether it overrode a later change.
pub fn restore(entry: &Entry, current: Option<&RawDocument>, post: Option<Hash>) -> Result<(Restore, bool), String> {
    let now = hash_of(current, entry.fields.as_deref());
    let conflict = post.is_some_and(|p| p != now);
    match (&entry.fields, current) {
        // A document the change created: it goes (already gone: nothing to override).
        (None, _) if entry.pre.is_none() => {
            Ok(if current.is_some() { (Restore::Delete, conflict) } else { (Restore::Unchanged, false) })
        }
        (None, Some(c)) if Some(c.as_bytes()) == entry.pre.as_ref().map(|p| p.as_bytes()) => {
            Ok((Restore::Unchanged, false))
        }
        (None, _) => Ok((Restore::Write(entry.pre.clone().expect("checked above")), conflict)),
        // Deleted since by the application: it stays deleted (its other fields are gone, and
        // the application's delete is a later write like any other).
        (Some(_), None) => Ok((Restore::Unchanged, false)),
        (Some(fields), Some(c)) => {
            let mut d = Document::try_from(c).map_err(|e| format!("the current document cannot be read: {e}"))?;
            for f in fields {
                match entry.pre_field(f) {
                    Some(v) => {
                        let v: Bson = v.try_into().map_err(|e| format!("a pre-image cannot be read: {e}"))?;
                        d.insert(f.clone(), v);
                    }
                    None => {
                        d.remove(f);
                    }
                }
            }
            if let Some(order) = &entry.order {
                d = in_order(d, order);
            }
            let raw =
                RawDocumentBuf::from_document(&d).map_err(|e| format!("a restored document cannot be written: {e}"))?;
            if raw.as_bytes() == c.as_bytes() {
                return Ok((Restore::Unchanged, false));
            }
            Ok((Restore::Write(raw), conflict))
        }
    }
}

/// `d`'s fields in `order` first, then the others as they are.
fn in_order(mut d: Document, order: &[String]) -> Document {
    let mut out = Document::new();
    if let Some(id) = d.remove("_id") {
        out.insert("_id", id);
    }
    for k in order {
        if let Some(v) = d.remove(k) {
            out.insert(k.clone(), v);
        }
    }
    out.extend(d);
    out
}

/// The top-level field names of a document, in order (without `_id`).
pub fn field_order(d: &RawDocument) -> Vec<String> {
    d.iter().flatten().map(|(k, _)| k.to_string()).filter(|k| k != "_id").collect()
}

/// One step's store.
pub struct Store {
    coll: Collection<Document>,
    /// The next chunk number.
    next: i64,
}

/// A chunk read back.
pub struct Chunk {
    pub n: i64,
    pub entries: Vec<Entry>,
    /// For a restore's chunks: the chunk of the store it restored.
    pub from: Option<i64>,
}

impl Store {
    /// The store of `key`, emptied (what an earlier attempt left is dropped).
    pub async fn create(db: &Database, key: &str) -> Result<Store, ExecError> {
        let coll = db.collection::<Document>(&collection_name(key));
        coll.drop().await.map_err(mongo("clearing old rollback data"))?;
        Ok(Store { coll, next: 0 })
    }

    /// Create the store's collection if it is missing, before transactions of their own write to
    /// it (two creating it at once conflict). Not for a migration's own transaction: a
    /// collection created after it started cannot be written in it.
    pub async fn ensure(&self, db: &Database) -> Result<(), ExecError> {
        match db.create_collection(self.coll.name()).await {
            Err(e) if crate::mongo::error_code(&e) != Some(crate::mongo::code::NAMESPACE_EXISTS) => {
                Err(mongo("creating the rollback data collection")(e))
            }
            _ => Ok(()),
        }
    }

    /// The store of `key` as it is, to append to or read.
    pub async fn open(db: &Database, key: &str) -> Result<Store, ExecError> {
        let coll = db.collection::<Document>(&collection_name(key));
        let last = coll
            .find_one(doc! {})
            .sort(doc! {"_id": -1})
            .await
            .map_err(mongo("reading rollback data"))?
            .and_then(|d| d.get_i64("_id").ok());
        Ok(Store { coll, next: last.map_or(0, |n| n + 1) })
    }

    pub fn name(&self) -> &str {
        self.coll.name()
    }

    /// Where the next chunk goes (to [`Store::reset`] to, when a transaction that stored a
    /// chunk aborts).
    pub fn mark(&self) -> i64 {
        self.next
    }

    pub fn reset(&mut self, mark: i64) {
        self.next = mark;
    }

    /// Store entries as one chunk (inside the transaction when given). `from`: for a restore,
    /// the chunk it restores (stored even with no entries, as progress).
    pub async fn append(
        &mut self,
        entries: &[Entry],
        from: Option<i64>,
        session: Option<&mut ClientSession>,
    ) -> Result<i64, ExecError> {
        let mut bytes = Vec::new();
        for e in entries {
            bytes.extend_from_slice(e.to_raw().as_bytes());
        }
        let n = self.next;
        let binary = |b: &[u8]| Binary { subtype: BinarySubtype::Generic, bytes: b.to_vec() };
        let parts: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(CHUNK_BYTES).collect() };
        let mut chunk = doc! {
            "_id": n,
            "v": FORMAT,
            "count": entries.len() as i64,
            "bson": binary(parts[0]),
        };
        if parts.len() > 1 {
            chunk.insert("parts", parts.len() as i32);
        }
        if let Some(f) = from {
            chunk.insert("from", f);
        }
        // The parts first, the chunk last: a runner killed in between (without transactions)
        // leaves parts of no chunk, which are ignored, never a chunk missing a part.
        let mut docs: Vec<Document> = parts
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, part)| doc! {"_id": n + i as i64, "v": FORMAT, "cont": n, "bson": binary(part)})
            .collect();
        docs.push(chunk);
        let mut session = session;
        for d in docs {
            let insert = self.coll.insert_one(d);
            match session.as_deref_mut() {
                Some(s) => insert.session(s).await,
                None => insert.await,
            }
            .map_err(mongo("storing rollback data"))?;
        }
        self.next += parts.len() as i64;
        Ok(n)
    }

    /// Void entries whose writes did not apply.
    pub async fn void(&mut self, ids: Vec<Bson>) -> Result<(), ExecError> {
        if ids.is_empty() {
            return Ok(());
        }
        let n = self.next;
        self.coll
            .insert_one(doc! {"_id": n, "v": FORMAT, "void": ids})
            .await
            .map_err(mongo("storing rollback data"))?;
        self.next += 1;
        Ok(())
    }

    /// Every chunk of entries, newest first, without the voided entries: read one stored
    /// document at a time, so a store of many gigabytes is never held in memory at once (one
    /// chunk, with its parts, is; at most [`CHUNK_BYTES`] times its parts).
    pub fn chunks_newest_first(&self) -> Chunks<'_> {
        Chunks { store: self, below: None, voided: HashSet::new(), parts: HashMap::new() }
    }

    /// The chunks of the store it restores that a restore stored in this one (`from`), done.
    pub async fn restored_from(&self) -> Result<HashSet<i64>, ExecError> {
        let reading = || mongo(format!("reading rollback data in {}", self.coll.name()));
        let marks: Vec<Document> = self
            .coll
            .find(doc! {"from": {"$exists": true}, "cont": {"$exists": false}})
            .projection(doc! {"from": 1})
            .await
            .map_err(reading())?
            .try_collect()
            .await
            .map_err(reading())?;
        marks
            .iter()
            .map(|m| m.get_i64("from").map_err(|_| self.damaged("a restore's progress mark is not a chunk number")))
            .collect()
    }

    fn damaged(&self, why: &str) -> ExecError {
        ExecError::Data(format!("the rollback data in {} is damaged: {why}", self.coll.name()))
    }
}

/// Reads a store's chunks newest first (see [`Store::chunks_newest_first`]). Each step fetches
/// the next stored document below the last one by `_id` (no cursor is held open while the
/// caller writes, so none can time out).
pub struct Chunks<'a> {
    store: &'a Store,
    /// The `_id` of the last document read.
    below: Option<i64>,
    /// Entries voided by documents read so far (voids name entries stored before them, and
    /// everything read so far was stored after what comes next).
    voided: HashSet<Vec<u8>>,
    /// Parts read so far whose chunk is still to come, by their own number.
    parts: HashMap<i64, (i64, Vec<u8>)>,
}

impl Chunks<'_> {
    pub async fn next(&mut self) -> Result<Option<Chunk>, ExecError> {
        let store = self.store;
        loop {
            let filter = match self.below {
                Some(b) => doc! {"_id": {"$lt": b}},
                None => doc! {},
            };
            let Some(c) = store
                .coll
                .find_one(filter)
                .sort(doc! {"_id": -1})
                .await
                .map_err(mongo(format!("reading rollback data in {}", store.coll.name())))?
            else {
                // Parts left here belong to a chunk whose storing did not finish (see
                // `Store::append`): its changes were never made.
                return Ok(None);
            };
            let n = c.get_i64("_id").map_err(|_| store.damaged("a chunk has no number"))?;
            self.below = Some(n);
            if let Some(chunk) = self.read(n, c)? {
                return Ok(Some(chunk));
            }
        }
    }

    /// One stored document: a chunk, or what a chunk needs (a void, a part).
    fn read(&mut self, n: i64, mut c: Document) -> Result<Option<Chunk>, ExecError> {
        let store = self.store;
        if c.get_i32("v") != Ok(FORMAT) {
            return Err(store.damaged(
                "it is not in the layout this dbshift writes (it was written by another version, or changed by hand)",
            ));
        }
        if let Ok(ids) = c.get_array("void") {
            self.voided.extend(ids.iter().map(id_key));
            return Ok(None);
        }
        let own = match c.remove("bson") {
            Some(Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes })) => bytes,
            _ => return Err(store.damaged("no pre-images in the chunk")),
        };
        if let Ok(head) = c.get_i64("cont") {
            self.parts.insert(n, (head, own));
            return Ok(None);
        }
        let count = c.get_i32("parts").unwrap_or(1);
        if !(1..=4096).contains(&count) {
            return Err(store.damaged(&format!("chunk {n} claims {count} parts")));
        }
        let mut bytes = own;
        for i in 1..count as i64 {
            match self.parts.remove(&(n + i)) {
                Some((head, b)) if head == n => bytes.extend_from_slice(&b),
                _ => return Err(store.damaged(&format!("part {i} of chunk {n} is missing"))),
            }
        }
        let mut entries = Vec::new();
        for raw in split_documents(&bytes).map_err(|e| store.damaged(&e))? {
            let e = Entry::from_raw(&raw).map_err(|e| store.damaged(&e))?;
            if !self.voided.contains(&id_key(&e.id)) {
                entries.push(e);
            }
        }
        Ok(Some(Chunk { n, entries, from: c.get_i64("from").ok() }))
    }
}

/// Split concatenated BSON documents.
fn split_documents(mut bytes: &[u8]) -> Result<Vec<RawDocumentBuf>, String> {
    let mut docs = Vec::new();
    while !bytes.is_empty() {
        let len = bytes
            .get(..4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .filter(|&l| l >= 5 && l as usize <= bytes.len())
            .ok_or("a pre-image is cut short")? as usize;
        let (doc, rest) = bytes.split_at(len);
        docs.push(RawDocumentBuf::from_bytes(doc.to_vec()).map_err(|e| format!("a pre-image is not valid BSON: {e}"))?);
        bytes = rest;
    }
    Ok(docs)
}

/// Drop the stores of steps whose keys start with `prefix` (e.g. `<version>_` for a whole
/// migration, `<version>_d` for the steps of its rollback).
pub async fn forget(db: &Database, prefix: &str) -> Result<(), ExecError> {
    let start = collection_name(prefix);
    for name in db.list_collection_names().await.map_err(mongo("listing rollback data"))? {
        if name.starts_with(&start) {
            db.collection::<Document>(&name).drop().await.map_err(mongo(format!("dropping {name}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_keys_are_equal_exactly_for_the_same_stored_value() {
        assert_eq!(id_key(&Bson::Double(f64::NAN)), id_key(&Bson::Double(f64::NAN)), "NaN is one _id");
        assert_ne!(id_key(&Bson::Int32(1)), id_key(&Bson::Int64(1)));
        assert_eq!(id_key(&Bson::Document(doc! {"a": 1})), id_key(&Bson::Document(doc! {"a": 1})));
        assert_ne!(id_key(&Bson::Document(doc! {"a": 1, "b": 2})), id_key(&Bson::Document(doc! {"b": 2, "a": 1})));
    }

    fn raw(d: Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&d).unwrap()
    }

    #[test]
    fn chunks_split_back_into_their_documents() {
        let docs = [doc! {"_id": 1, "a": "x"}, doc! {"_id": 2, "b": [1, 2]}];
        let mut bytes = Vec::new();
        for d in &docs {
            bytes.extend(bson::to_vec(d).unwrap());
        }
        let back: Vec<Document> = split_documents(&bytes).unwrap().iter().map(|d| d.to_document().unwrap()).collect();
        assert_eq!(back, docs);
        assert!(split_documents(&bytes[..bytes.len() - 1]).unwrap_err().contains("cut short"));
    }

    #[test]
    fn entries_round_trip() {
        let e = Entry {
            id: Bson::Int32(7),
            fields: Some(vec!["a".into(), "b".into()]),
            pre: Some(raw(doc! {"a": 1})),
            post: Some([3; 16]),
            order: Some(vec!["b".into(), "a".into()]),
        };
        assert_eq!(Entry::from_raw(&e.to_raw()).unwrap(), e);
        let whole = Entry { id: Bson::String("x".into()), fields: None, pre: None, post: None, order: None };
        assert_eq!(Entry::from_raw(&whole.to_raw()).unwrap(), whole);
    }

    #[test]
    fn fields_go_back_and_later_writes_to_other_fields_stay() {
        // removeField of `a`; since, the application set `n` and the document gained `z`.
        let pre = raw(doc! {"_id": 1, "a": {"deep": [1, 2]}});
        let after = raw(doc! {"_id": 1, "n": 1});
        let fields = vec!["a".to_string()];
        let e = Entry {
            id: Bson::Int32(1),
            fields: Some(fields.clone()),
            pre: Some(project(&pre, &fields)),
            post: Some(hash_of(Some(&after), Some(&fields))),
            order: None,
        };
        let now = raw(doc! {"_id": 1, "n": 2, "z": true});
        let (r, conflict) = restore(&e, Some(&now), e.post).unwrap();
        assert!(!conflict);
        assert_eq!(r, Restore::Write(raw(doc! {"_id": 1, "n": 2, "z": true, "a": {"deep": [1, 2]}})));
        // Restored already: nothing to do, and no conflict.
        let (again, conflict) = restore(&e, Some(&raw(doc! {"_id": 1, "n": 2, "a": {"deep": [1, 2]}})), None).unwrap();
        assert_eq!((again, conflict), (Restore::Unchanged, false));
    }

    #[test]
    fn a_field_changed_again_is_a_conflict_and_the_pre_image_wins() {
        let fields = vec!["name".to_string()];
        let e = Entry {
            id: Bson::Int32(1),
            fields: Some(fields.clone()),
            pre: Some(raw(doc! {"name": "Ada"})),
            post: Some(hash_of(Some(&raw(doc! {"_id": 1, "name": "ADA"})), Some(&fields))),
            order: None,
        };
        let (r, conflict) = restore(&e, Some(&raw(doc! {"_id": 1, "name": "Grace"})), e.post).unwrap();
        assert!(conflict);
        assert_eq!(r, Restore::Write(raw(doc! {"_id": 1, "name": "Ada"})));
        // Deleted by the application since: it stays deleted (a later write like any other).
        assert_eq!(restore(&e, None, e.post).unwrap(), (Restore::Unchanged, false));
    }

    #[test]
    fn whole_documents_are_inserted_deleted_or_replaced() {
        let gone = Entry {
            id: Bson::Int32(1),
            fields: None,
            pre: Some(raw(doc! {"_id": 1, "a": 1})),
            post: Some(hash_of(None, None)),
            order: None,
        };
        assert_eq!(restore(&gone, None, gone.post).unwrap(), (Restore::Write(raw(doc! {"_id": 1, "a": 1})), false));
        // Inserted again by the application meanwhile: the pre-image wins.
        let (r, conflict) = restore(&gone, Some(&raw(doc! {"_id": 1, "b": 2})), gone.post).unwrap();
        assert_eq!((r, conflict), (Restore::Write(raw(doc! {"_id": 1, "a": 1})), true));
        let created = Entry {
            id: Bson::Int32(2),
            fields: None,
            pre: None,
            post: Some(hash_of(Some(&raw(doc! {"_id": 2})), None)),
            order: None,
        };
        assert_eq!(restore(&created, Some(&raw(doc! {"_id": 2})), created.post).unwrap(), (Restore::Delete, false));
        assert_eq!(restore(&created, None, created.post).unwrap(), (Restore::Unchanged, false));
    }

    #[test]
    fn with_the_field_order_an_untouched_document_comes_back_byte_for_byte() {
        let old = raw(doc! {"_id": 1, "name": "A B", "score": 2.5, "big": 9_007_199_254_740_993i64});
        let new = raw(doc! {"_id": 1, "score": 2.5, "big": 9_007_199_254_740_993i64, "first": "A", "last": "B"});
        let fields = changed_fields(&old, &new);
        let e = Entry {
            id: Bson::Int32(1),
            pre: Some(project(&old, &fields)),
            post: Some(hash_of(Some(&new), Some(&fields))),
            order: Some(field_order(&old)),
            fields: Some(fields),
        };
        assert_eq!(restore(&e, Some(&new), e.post).unwrap(), (Restore::Write(old.clone()), false));
        // A field the application added since stays, at the end.
        let later = raw(
            doc! {"_id": 1, "score": 2.5, "big": 9_007_199_254_740_993i64, "first": "A", "last": "B", "seen": true},
        );
        let back = raw(doc! {"_id": 1, "name": "A B", "score": 2.5, "big": 9_007_199_254_740_993i64, "seen": true});
        assert_eq!(restore(&e, Some(&later), e.post).unwrap(), (Restore::Write(back), false));
    }

    #[test]
    fn changed_fields_are_found_in_order() {
        let old = raw(doc! {"_id": 1, "name": "A B", "keep": 1, "gone": true});
        let new = raw(doc! {"_id": 1, "keep": 1, "first": "A", "name": "A B x"});
        assert_eq!(changed_fields(&old, &new), ["name", "gone", "first"]);
    }
}
