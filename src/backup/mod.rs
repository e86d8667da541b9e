//! Snapshots of a tenant database and exact restores, kept in a directory or in a database.
//!
//! A directory snapshot is in mongodump's layout (a stock `mongorestore --dir <out>` reads it):
//! ```text
//! <out>/dbshift-manifest.json          counts, sizes, content hashes, time, source
//! <out>/<db>/<coll>.bson[.gz]          the documents, concatenated BSON (as mongodump writes them)
//! <out>/<db>/<coll>.metadata.json[.gz] options, indexes, uuid (canonical Extended JSON)
//! ```
//! A database snapshot (see [`database`]) keeps the same manifest in a document of
//! `<snapshot db>.snapshots` and the documents, packed in chunks, in one collection per snapshot.
//!
//! Taking and restoring a snapshot is the same code for both: [`Sink`] is where a snapshot's
//! documents go, [`Source`] where a restore reads them. Documents stream through a bounded
//! pipeline in batches, so memory stays flat whatever the collection size.

pub mod database;
mod destination;
mod restore;
mod snapshot;

pub use database::{SnapshotInfo, Taken, DEFAULT_DATABASE};
pub use destination::{Destination, Found, TakenSnapshot};
pub use restore::{read_manifest, restore, RestoreOptions, RestoreReport};
pub use snapshot::{snapshot, SnapshotOptions};

use std::future::Future;

use bson::{Document, RawDocumentBuf};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "dbshift-manifest.json";
pub const FORMAT: &str = "dbshift-snapshot/v1";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{action}: {}", crate::mongo::describe(source))]
    Mongo {
        action: String,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("restore verification failed: {0}")]
    Verify(String),
}

/// The tracking collection to read: the given name, or the default.
pub(crate) fn tracking_name(name: &str) -> &str {
    if name.is_empty() {
        crate::engine::tracking::TRACKING
    } else {
        name
    }
}

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.display().to_string(), source }
}

pub(crate) fn mongo(action: impl Into<String>) -> impl FnOnce(mongodb::error::Error) -> BackupError {
    let action = action.into();
    move |source| BackupError::Mongo { action, source }
}

/// Which collections a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every collection but dbshift's own: a restore also drops collections created since.
    All,
    /// The collections named when it was taken.
    Selected,
}

/// What a snapshot holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: String,
    pub database: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Where it came from: hosts and database, never credentials.
    pub source: String,
    pub gzip: bool,
    pub scope: Scope,
    pub collections: Vec<CollectionManifest>,
    pub total_documents: u64,
    pub total_bytes: u64,
    pub duration_ms: u64,
    /// Migrations applied when the snapshot was taken (from the tracking collection). A restore
    /// marks migrations applied since then as rolled back, so records match the data.
    #[serde(default)]
    pub applied_migrations: Vec<String>,
    /// The run that took it (`dbshift run` records its run id), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The hash of the whole snapshot (see [`snapshot_hash`]). Empty in snapshots of older versions.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

/// A collection's name as it appears in file names: percent-encoded as mongodump escapes
/// names (everything but letters, digits and `-._~!$&'()*+,;=:@`), so `/`, `\`, `%` and
/// control characters never reach the file system and a name can never leave the snapshot
/// directory. mongorestore decodes it back. Ordinary names are unchanged.
pub fn file_stem(collection: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'!')
        .remove(b'$')
        .remove(b'&')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')')
        .remove(b'*')
        .remove(b'+')
        .remove(b',')
        .remove(b';')
        .remove(b'=')
        .remove(b':')
        .remove(b'@');
    let stem = utf8_percent_encode(collection, KEEP).to_string();
    // `.` and `..` alone are directory names.
    match stem.as_str() {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => stem,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectionManifest {
    pub name: String,
    /// Directory snapshots: the BSON file, relative to the snapshot directory.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
    pub documents: u64,
    /// Uncompressed BSON bytes.
    pub bytes: u64,
    /// Order-independent content hash (see [`ContentHash`]).
    pub sha256: String,
    pub indexes: usize,
    /// Database snapshots: options, indexes and uuid, as a directory snapshot's
    /// `<coll>.metadata.json` holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Document>,
}

/// The hash of a whole snapshot: the SHA-256 of one line per collection, in name order, each
/// `<name> NUL <content hash in hex> LF`. Equal hashes mean equal collections with equal documents.
pub fn snapshot_hash(collections: &[CollectionManifest]) -> String {
    let mut sorted: Vec<&CollectionManifest> = collections.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for c in sorted {
        h.update(c.name.as_bytes());
        h.update([0]);
        h.update(c.sha256.as_bytes());
        h.update([b'\n']);
    }
    hex::encode(h.finalize())
}

/// Documents travel in batches of at most this many documents...
pub(crate) const BATCH_DOCS: usize = 1000;
/// ... or this many bytes (a single larger document travels alone).
pub(crate) const BATCH_BYTES: usize = 8 << 20;

/// Where a snapshot is written. The snapshot code lists collections, reads and hashes their
/// documents; a sink only stores what it is given.
pub(crate) trait Sink: Sync {
    type Writer: CollectionWriter;
    /// Start storing one collection, given its metadata (options, indexes, uuid).
    fn collection(
        &self,
        name: &str,
        meta: &Document,
    ) -> impl Future<Output = Result<Opened<Self::Writer>, BackupError>> + Send;
}

/// A sink's answer to [`Sink::collection`].
pub(crate) struct Opened<W> {
    pub writer: W,
    /// The file written, for a directory snapshot's manifest.
    pub file: String,
    /// Metadata to keep in the manifest (when the sink does not store it itself).
    pub metadata: Option<Document>,
}

/// Stores one collection's documents, a batch at a time.
pub(crate) trait CollectionWriter: Send {
    fn write(&mut self, batch: Vec<RawDocumentBuf>) -> impl Future<Output = Result<(), BackupError>> + Send;
    /// Every batch was written: make it durable.
    fn finish(self) -> impl Future<Output = Result<(), BackupError>> + Send;
}

/// Where a restore reads a snapshot from.
pub(crate) trait Source: Sync {
    fn manifest(&self) -> &Manifest;
    /// Where a collection's documents are kept, for messages.
    fn place(&self, c: &CollectionManifest) -> String;
    /// The collection's metadata (options, indexes).
    fn metadata(&self, c: &CollectionManifest) -> Result<Document, BackupError>;
    /// The collection's documents, exactly as snapshotted, in batches.
    fn batches<'a>(&'a self, c: &'a CollectionManifest) -> BoxStream<'a, Result<Vec<RawDocumentBuf>, BackupError>>;
}

/// A hash of a set of documents that does not depend on their order: the SHA-256 of each
/// document's exact bytes, summed as 256-bit integers. Two collections have the same hash
/// when they hold byte-identical documents, whatever order a server returns them in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentHash {
    lanes: [u64; 4],
}

impl ContentHash {
    pub fn add(&mut self, doc: &[u8]) {
        let h = Sha256::digest(doc);
        let lanes = std::array::from_fn(|i| u64::from_be_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes")));
        self.merge(&ContentHash { lanes });
    }
    /// Add the documents counted in another hash.
    pub fn merge(&mut self, other: &ContentHash) {
        let mut carry = 0u128;
        for i in (0..4).rev() {
            let sum = self.lanes[i] as u128 + other.lanes[i] as u128 + carry;
            self.lanes[i] = sum as u64;
            carry = sum >> 64;
        }
    }

    pub fn hex(&self) -> String {
        self.lanes.iter().map(|l| format!("{l:016x}")).collect()
    }
}

/// Hosts and database of a MongoDB URI, without user, password or options.
pub fn describe_source(uri: &str, db: &str) -> String {
    let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or(uri);
    let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let hosts = rest.split(['/', '?']).next().unwrap_or_default();
    format!("{hosts}/{db}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hashes_of_parts_merge_into_the_hash_of_the_whole() {
        let docs: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 7 + i as usize]).collect();
        let mut whole = ContentHash::default();
        docs.iter().for_each(|d| whole.add(d));
        let (mut a, mut b) = (ContentHash::default(), ContentHash::default());
        docs[..20].iter().for_each(|d| a.add(d));
        docs[20..].iter().for_each(|d| b.add(d));
        a.merge(&b);
        assert_eq!(a, whole);
    }

    #[test]
    fn content_hash_ignores_order_but_not_content() {
        let (a, b, c) = (b"one".as_slice(), b"two".as_slice(), b"tw0".as_slice());
        let mut x = ContentHash::default();
        x.add(a);
        x.add(b);
        let mut y = ContentHash::default();
        y.add(b);
        y.add(a);
        let mut z = ContentHash::default();
        z.add(a);
        z.add(c);
        assert_eq!(x.hex(), y.hex());
        assert_ne!(x.hex(), z.hex());
        assert_eq!(x.hex().len(), 64);
    }

    #[test]
    fn the_snapshot_hash_covers_names_and_contents_in_any_order() {
        let c = |name: &str, sha: &str| CollectionManifest {
            name: name.into(),
            file: String::new(),
            documents: 1,
            bytes: 1,
            sha256: sha.into(),
            indexes: 1,
            metadata: None,
        };
        let a = snapshot_hash(&[c("a", "11"), c("b", "22")]);
        assert_eq!(a, snapshot_hash(&[c("b", "22"), c("a", "11")]));
        assert_ne!(a, snapshot_hash(&[c("a", "22"), c("b", "11")]));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn source_never_carries_credentials() {
        assert_eq!(describe_source("mongodb://user:s3cret@h1:27017,h2/admin?tls=true", "t1"), "h1:27017,h2/t1");
        assert_eq!(describe_source("mongodb://localhost", "t1"), "localhost/t1");
    }
}
