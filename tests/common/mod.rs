//! Shared test support: a real MongoDB wire-protocol server (SecantusDB) and helpers.
//!
//! Each test binary uses the server named by `DBSHIFT_TEST_MONGODB_URI` (tests/run.sh starts
//! one), or starts its own from the cached venv (`tests/support/secantus.sh install`), which
//! stops when the test process exits. Every test works in databases of its own.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use futures::TryStreamExt;
use mongodb::{Client, Database};

static URI: OnceLock<String> = OnceLock::new();

fn secantusd() -> PathBuf {
    if let Ok(p) = std::env::var("DBSHIFT_SECANTUSD") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cache = std::env::var("DBSHIFT_CACHE").unwrap_or_else(|_| format!("{home}/.cache/dbshift"));
    PathBuf::from(cache).join("secantus-0.7.0b3/bin/secantusd-py")
}

/// The URI of the test server (started on first use): a one-node replica set, so it has
/// transactions, like production MongoDB.
pub fn uri() -> String {
    URI.get_or_init(|| match std::env::var("DBSHIFT_TEST_MONGODB_URI") {
        Ok(u) => u,
        Err(_) => start_server(&[]),
    })
    .clone()
}

static STANDALONE: OnceLock<String> = OnceLock::new();

/// A standalone server of this test process (no replica set, so no transactions: what a
/// laptop often runs).
pub fn standalone_uri() -> String {
    STANDALONE.get_or_init(|| start_server(&["--standalone"])).clone()
}

/// Start SecantusDB from the cached install on a free port; it stops when this process exits.
fn start_server(extra: &[&str]) -> String {
    let bin = secantusd();
    assert!(bin.exists(), "{} is missing: run tests/support/secantus.sh install (tests/run.sh does)", bin.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // A watchdog shell stops the server when this test process is gone.
    let script = format!(
        "{} --host 127.0.0.1 --port {port} --storage-path :memory: {} >/dev/null 2>&1 & s=$!; \
         while kill -0 {} 2>/dev/null; do sleep 1; done; kill $s",
        bin.display(),
        extra.join(" "),
        std::process::id()
    );
    // The watchdog outlives this call on purpose; it is reaped when the test process exits.
    #[allow(clippy::zombie_processes)]
    Command::new("sh").arg("-c").arg(script).stdin(Stdio::null()).spawn().expect("start SecantusDB");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "SecantusDB did not start on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    format!("mongodb://127.0.0.1:{port}")
}

pub async fn client() -> Client {
    Client::with_uri_str(uri()).await.expect("client")
}

/// A database name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// A fresh database of its own.
pub async fn fresh_db(prefix: &str) -> Database {
    client().await.database(&unique(prefix))
}

/// Every document of a collection, sorted by `_id` (as the server orders them).
pub async fn dump(db: &Database, coll: &str) -> Vec<Document> {
    db.collection::<Document>(coll).find(doc! {}).sort(doc! {"_id": 1}).await.unwrap().try_collect().await.unwrap()
}

/// Exact bytes of every document, sorted by `_id`.
pub async fn dump_bytes(db: &Database, coll: &str) -> Vec<Vec<u8>> {
    dump(db, coll).await.iter().map(|d| bson::to_vec(d).unwrap()).collect()
}

/// Exact bytes of every document as the server returns them (no re-encoding), sorted by `_id`.
pub async fn raw_bytes(db: &Database, coll: &str) -> Vec<Vec<u8>> {
    db.collection::<bson::RawDocumentBuf>(coll)
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.as_bytes().to_vec())
        .collect()
}

/// Every user collection (not dbshift's own) with its documents and index names.
pub async fn dump_db(db: &Database) -> Vec<(String, Vec<Document>, Vec<String>)> {
    let mut names: Vec<String> =
        db.list_collection_names().await.unwrap().into_iter().filter(|n| !n.starts_with("_dbshift")).collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let docs = dump(db, &n).await;
        let mut idx: Vec<String> = db.collection::<Document>(&n).list_index_names().await.unwrap();
        idx.sort();
        out.push((n, docs, idx));
    }
    out
}

/// A temporary migrations directory with the given files.
pub fn migrations(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

pub fn load(dir: &Path) -> Vec<dbshift::engine::Migration> {
    dbshift::engine::load_dir(dir).unwrap()
}

/// Run the dbshift binary.
pub fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dbshift"));
    c.args(args)
        .env_remove("DBSHIFT_MONGODB_URI")
        .env_remove("DBSHIFT_TENANT")
        .env_remove("DBSHIFT_DIR")
        .env("NO_COLOR", "1");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run dbshift")
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The JSON a command printed on stdout (`--output json`).
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}
