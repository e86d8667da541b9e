//! Snapshots of a tenant database, in mongodump's directory layout, and exact restores.
//!
//! ```text
//! <out>/dbshift-manifest.json          counts, sizes, content hashes, time, source
//! <out>/<db>/<coll>.bson[.gz]          the documents, concatenated BSON (as mongodump writes them)
//! <out>/<db>/<coll>.metadata.json[.gz] options, indexes, uuid (canonical Extended JSON)
//! ```
//! A stock `mongorestore --dir <out>` can read it. Documents stream through a bounded
//! pipeline, so memory stays flat whatever the collection size.

mod restore;
mod snapshot;

pub use restore::{read_manifest, restore, RestoreOptions, RestoreReport};
pub use snapshot::{snapshot, SnapshotOptions};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "dbshift-manifest.json";
pub const FORMAT: &str = "dbshift-snapshot/v1";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{action}: {}", crate::engine::describe(source))]
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
    /// `all` (every collection but dbshift's own) or `selected`.
    pub scope: String,
    pub collections: Vec<CollectionManifest>,
    pub total_documents: u64,
    pub total_bytes: u64,
    pub duration_ms: u64,
    /// Migrations applied when the snapshot was taken (from the tracking collection). A restore
    /// marks migrations applied since then as rolled back, so records match the data.
    #[serde(default)]
    pub applied_migrations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectionManifest {
    pub name: String,
    /// Path of the BSON file, relative to the snapshot directory.
    pub file: String,
    pub documents: u64,
    /// Uncompressed BSON bytes.
    pub bytes: u64,
    /// Order-independent content hash (see [`ContentHash`]).
    pub sha256: String,
    pub indexes: usize,
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
        let mut carry = 0u128;
        for i in (0..4).rev() {
            let lane = u64::from_be_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let sum = self.lanes[i] as u128 + lane as u128 + carry;
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
    fn source_never_carries_credentials() {
        assert_eq!(describe_source("mongodb://user:s3cret@h1:27017,h2/admin?tls=true", "t1"), "h1:27017,h2/t1");
        assert_eq!(describe_source("mongodb://localhost", "t1"), "localhost/t1");
    }
}
