//! Snapshots and restores: exact (byte-identical) data, indexes and options; damaged
//! snapshots refused before anything changes.

mod common;

use bson::{doc, oid::ObjectId, Binary, DateTime, Decimal128, Document};
use common::*;
use dbshift::backup::{self, RestoreOptions, SnapshotOptions};

async fn rich_db(prefix: &str) -> mongodb::Database {
    let db = fresh_db(prefix).await;
    db.run_command(
        doc! {"create": "orders", "validator": {"$jsonSchema": {"required": ["total"]}}, "validationLevel": "moderate"},
    )
    .await
    .unwrap();
    let docs: Vec<Document> = (0..2500)
        .map(|i| {
            doc! {
                "_id": ObjectId::new(),
                "n": i,
                "total": Decimal128::from_bytes([i as u8; 16]),
                "big": i as i64 * 1_000_000_007,
                "ratio": 1.0f64,
                "at": DateTime::from_millis(1_700_000_000_000 + i as i64),
                "blob": Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![i as u8; 10] },
                "tags": ["a", {"nested": [1, 2.5, null]}],
            }
        })
        .collect();
    db.collection::<Document>("orders").insert_many(docs).await.unwrap();
    db.run_command(doc! {"createIndexes": "orders", "indexes": [
        {"key": {"n": 1}, "name": "n_unique", "unique": true},
        {"key": {"at": 1}, "name": "ttl", "expireAfterSeconds": 2_000_000_000},
        {"key": {"big": -1, "n": 1}, "name": "compound", "partialFilterExpression": {"n": {"$gt": 5}}},
    ]})
    .await
    .unwrap();
    db.collection::<Document>("users")
        .insert_many(vec![doc! {"_id": "u1", "name": "Ann"}, doc! {"_id": "u2", "name": "Bo"}])
        .await
        .unwrap();
    db
}

async fn indexes(db: &mongodb::Database, coll: &str) -> Vec<Document> {
    let r = db.run_command(doc! {"listIndexes": coll}).await.unwrap();
    let mut v: Vec<Document> = r
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()
        .iter()
        .filter_map(|b| b.as_document().cloned())
        .collect();
    v.sort_by_key(|d| d.get_str("name").unwrap().to_string());
    v
}

async fn options(db: &mongodb::Database, coll: &str) -> Document {
    let r = db.run_command(doc! {"listCollections": 1, "filter": {"name": coll}}).await.unwrap();
    r.get_document("cursor").unwrap().get_array("firstBatch").unwrap()[0]
        .as_document()
        .unwrap()
        .get_document("options")
        .unwrap()
        .clone()
}

async fn round_trip(gzip: bool) {
    let db = rich_db(if gzip { "bk_gzip" } else { "bk_plain" }).await;
    let before_orders = dump_bytes(&db, "orders").await;
    let before_users = dump_bytes(&db, "users").await;
    let (before_idx, before_opts) = (indexes(&db, "orders").await, options(&db, "orders").await);
    let out = tempfile::tempdir().unwrap();
    let m =
        backup::snapshot(&db, out.path(), &SnapshotOptions { gzip, source: "test".into(), ..Default::default() }, None)
            .await
            .unwrap();
    assert_eq!(m.total_documents, 2502);
    assert_eq!(m.collections.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["orders", "users"]);
    let ext = if gzip { ".gz" } else { "" };
    assert!(out.path().join(db.name()).join(format!("orders.bson{ext}")).exists());
    assert!(out.path().join(db.name()).join(format!("orders.metadata.json{ext}")).exists());
    assert!(out.path().join(backup::MANIFEST).is_file());
    assert!(!out.path().join(format!("{}.tmp", backup::MANIFEST)).exists(), "the manifest was renamed into place");

    // Damage the database every way a migration could.
    db.collection::<Document>("orders").delete_many(doc! {"n": {"$lt": 100}}).await.unwrap();
    db.collection::<Document>("orders").update_many(doc! {}, doc! {"$set": {"ratio": 2}}).await.unwrap();
    db.run_command(doc! {"dropIndexes": "orders", "index": "compound"}).await.unwrap();
    db.collection::<Document>("users").drop().await.unwrap();
    db.collection::<Document>("newer").insert_one(doc! {"x": 1}).await.unwrap();

    let rep = backup::restore(&db, out.path(), &RestoreOptions::default(), None).await.unwrap();
    assert!(rep.collections.iter().all(|c| c.verified));
    assert_eq!(rep.dropped, vec!["newer".to_string()]);
    assert_eq!(dump_bytes(&db, "orders").await, before_orders, "byte-identical documents");
    assert_eq!(dump_bytes(&db, "users").await, before_users);
    assert_eq!(indexes(&db, "orders").await, before_idx);
    assert_eq!(options(&db, "orders").await, before_opts);
}

/// Every progress report: (collection, done, total).
type ProgressLog = std::sync::Arc<std::sync::Mutex<Vec<(String, u64, u64)>>>;

/// A progress reporter, and the log it writes to.
fn progress_log() -> (ProgressLog, impl Fn(&str, u64, u64) + Send + Sync) {
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    (log, move |c: &str, done: u64, total: u64| l.lock().unwrap().push((c.to_string(), done, total)))
}

/// The last report on `coll`, after checking no report had a known total below its count.
fn last_report(log: &[(String, u64, u64)], coll: &str) -> (u64, u64) {
    // 0: not counted yet (the count runs beside the reading).
    assert!(
        log.iter().all(|(_, done, total)| *total == 0 || total >= done),
        "a total below the documents done: {log:?}"
    );
    log.iter().rev().find(|(c, _, _)| c == coll).map(|(_, d, t)| (*d, *t)).expect("reported")
}

#[tokio::test]
async fn snapshot_and_restore_report_progress_to_the_end() {
    let db = rich_db("bk_progress").await;
    let out = tempfile::tempdir().unwrap();
    let (log, report) = progress_log();
    backup::snapshot(&db, out.path(), &SnapshotOptions::default(), Some(&report)).await.unwrap();
    assert_eq!(last_report(&log.lock().unwrap(), "orders"), (2500, 2500));
    assert_eq!(last_report(&log.lock().unwrap(), "users"), (2, 2));

    db.collection::<Document>("orders").delete_many(doc! {}).await.unwrap();
    let (log, report) = progress_log();
    backup::restore(&db, out.path(), &RestoreOptions::default(), Some(&report)).await.unwrap();
    assert_eq!(last_report(&log.lock().unwrap(), "orders"), (2500, 2500));
    assert_eq!(db.collection::<Document>("orders").count_documents(doc! {}).await.unwrap(), 2500);
}

#[tokio::test]
async fn snapshot_and_restore_are_exact() {
    round_trip(false).await;
}

#[tokio::test]
async fn gzip_snapshots_restore_exactly() {
    round_trip(true).await;
}

#[tokio::test]
async fn the_bson_files_are_in_mongodump_format() {
    let db = rich_db("bk_format").await;
    let out = tempfile::tempdir().unwrap();
    backup::snapshot(
        &db,
        out.path(),
        &SnapshotOptions { collections: vec!["users".into()], ..Default::default() },
        None,
    )
    .await
    .unwrap();
    let bytes = std::fs::read(out.path().join(db.name()).join("users.bson")).unwrap();
    // Concatenated BSON documents, each starting with its little-endian length.
    let mut docs = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let n = i32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        docs.push(bson::from_slice::<Document>(&rest[..n]).unwrap());
        rest = &rest[n..];
    }
    assert_eq!(docs.len(), 2);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join(db.name()).join("users.metadata.json")).unwrap())
            .unwrap();
    assert_eq!(meta["collectionName"], "users");
    assert_eq!(meta["indexes"][0]["name"], "_id_");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("dbshift-manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["scope"], "selected");
    assert_eq!(manifest["collections"][0]["documents"], 2);
}

#[tokio::test]
async fn a_damaged_snapshot_is_refused_and_nothing_changes() {
    let db = rich_db("bk_damaged").await;
    let out = tempfile::tempdir().unwrap();
    backup::snapshot(&db, out.path(), &SnapshotOptions::default(), None).await.unwrap();
    db.collection::<Document>("users").insert_one(doc! {"_id": "u3"}).await.unwrap();
    let now = dump_db(&db).await;
    // Flip one byte inside a document of users.bson.
    let f = out.path().join(db.name()).join("users.bson");
    let mut b = std::fs::read(&f).unwrap();
    let last = b.len() - 3;
    b[last] ^= 0x20;
    std::fs::write(&f, b).unwrap();
    let e = backup::restore(&db, out.path(), &RestoreOptions::default(), None).await.unwrap_err();
    assert!(
        e.to_string().contains("does not match the manifest") && e.to_string().contains("nothing was restored"),
        "{e}"
    );
    assert_eq!(dump_db(&db).await, now);
    let staging = |names: Vec<String>| names.into_iter().filter(|n| n.starts_with("_dbshift_restore_")).count();
    assert_eq!(staging(db.list_collection_names().await.unwrap()), 0, "no staging collection is left behind");
    // Cut short: orders (restored first) was already staged when users failed; it is untouched too.
    let b = std::fs::read(&f).unwrap();
    std::fs::write(&f, &b[..b.len() - 10]).unwrap();
    let e = backup::restore(&db, out.path(), &RestoreOptions::default(), None).await.unwrap_err();
    assert!(e.to_string().contains("truncated BSON") && e.to_string().contains("nothing was restored"), "{e}");
    assert_eq!(dump_db(&db).await, now);
    assert_eq!(staging(db.list_collection_names().await.unwrap()), 0);
    // Not a snapshot at all.
    let e =
        backup::restore(&db, tempfile::tempdir().unwrap().path(), &RestoreOptions::default(), None).await.unwrap_err();
    assert!(e.to_string().contains("is not a dbshift snapshot"), "{e}");
}

#[tokio::test]
async fn restore_into_another_database_and_selected_collections() {
    let db = rich_db("bk_other").await;
    let out = tempfile::tempdir().unwrap();
    backup::snapshot(&db, out.path(), &SnapshotOptions::default(), None).await.unwrap();
    let copy = fresh_db("bk_copy").await;
    copy.collection::<Document>("keep").insert_one(doc! {"k": 1}).await.unwrap();
    backup::restore(
        &copy,
        out.path(),
        &RestoreOptions { collections: vec!["users".into()], ..Default::default() },
        None,
    )
    .await
    .unwrap();
    assert_eq!(dump_bytes(&copy, "users").await, dump_bytes(&db, "users").await);
    assert_eq!(dump(&copy, "keep").await.len(), 1, "a selective restore leaves other collections alone");
    assert!(!copy.list_collection_names().await.unwrap().contains(&"orders".to_string()));
}

#[tokio::test]
async fn restoring_a_pre_migration_snapshot_records_the_migrations_as_rolled_back() {
    use dbshift::engine::tracking::{self, State};
    use dbshift::engine::{runner, RunOptions, UpRequest};
    let db = rich_db("bk_tracking").await;
    let dir = migrations(&[
        ("20250101000000_a.yaml", "up:\n  - addField: { collection: users, field: a, value: 1 }\n"),
        ("20250102000000_b.yaml", "up:\n  - removeField: { collection: users, field: name }\n"),
    ]);
    let m = load(dir.path());
    let opts = RunOptions::new("r1");
    runner::up(&db, "t", &m[..1], &UpRequest::default(), &opts).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let snap = backup::snapshot(&db, out.path(), &SnapshotOptions::default(), None).await.unwrap();
    assert_eq!(snap.applied_migrations, vec!["20250101000000_a".to_string()]);
    let users = dump_bytes(&db, "users").await;
    assert!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().ok);
    let rep = backup::restore(&db, out.path(), &RestoreOptions::default(), None).await.unwrap();
    assert_eq!(rep.rolled_back, vec!["20250102000000_b".to_string()]);
    assert_eq!(dump_bytes(&db, "users").await, users);
    let recs = tracking::load(&db, tracking::TRACKING).await.unwrap();
    assert_eq!(recs.iter().map(|r| r.state).collect::<Vec<_>>(), [State::Applied, State::RolledBack]);
    assert!(!db.list_collection_names().await.unwrap().iter().any(|n| n.starts_with("_dbshift_rb_20250102000000")));
    // The migration can be applied again on the restored data.
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert_eq!((r.ok, r.migrations.len()), (true, 1));
}

// ---- Snapshots kept in a database ----

use dbshift::backup::database;

async fn raw(db: &mongodb::Database, coll: &str) -> Vec<Vec<u8>> {
    raw_bytes(db, coll).await
}

async fn manifest_doc(store: &mongodb::Database, id: &str) -> Option<Document> {
    store.collection::<Document>("snapshots").find_one(doc! {"_id": id}).await.unwrap()
}

async fn collections(db: &mongodb::Database) -> Vec<String> {
    let mut v = db.list_collection_names().await.unwrap();
    v.sort();
    v
}

#[tokio::test]
async fn database_snapshots_restore_byte_identical_documents_indexes_and_options() {
    let db = rich_db("bkdb_exact").await;
    let store = fresh_db("bkdb_store").await;
    let before = (raw(&db, "orders").await, raw(&db, "users").await);
    let (before_idx, before_opts) = (indexes(&db, "orders").await, options(&db, "orders").await);
    let opts = SnapshotOptions { source: "h/x".into(), run_id: Some("run-7".into()), ..Default::default() };
    let t = database::snapshot_to_database(&db, &store, &opts, None).await.unwrap();
    assert!(t.id.starts_with(&format!("{}.", db.name())), "{}", t.id);
    assert_eq!(t.location, format!("database:{}/{}", store.name(), t.id));
    assert_eq!((t.manifest.total_documents, t.manifest.run_id.as_deref()), (2502, Some("run-7")));
    assert_eq!(t.manifest.sha256, backup::snapshot_hash(&t.manifest.collections));

    // The layout: a manifest document, and one data collection of chunks.
    let m = manifest_doc(&store, &t.id).await.unwrap();
    assert_eq!((m.get_str("state").unwrap(), m.get_str("tenant").unwrap()), ("complete", db.name()));
    assert_eq!((m.get_str("runId").unwrap(), m.get_str("data").unwrap()), ("run-7", t.id.as_str()));
    let stored = m.get_document("manifest").unwrap();
    assert_eq!(stored.get_i64("totalDocuments").unwrap(), 2502);
    let orders = &stored.get_array("collections").unwrap()[0].as_document().unwrap().clone();
    assert_eq!(orders.get_str("name").unwrap(), "orders");
    assert_eq!(orders.get_document("metadata").unwrap().get_array("indexes").unwrap().len(), 4);
    assert_eq!(collections(&store).await, vec![t.id.clone(), "snapshots".to_string()]);
    let chunks = store.collection::<Document>(&t.id);
    assert_eq!(chunks.count_documents(doc! {"_id.c": "orders"}).await.unwrap(), 3, "1,000 documents a chunk");
    let first = chunks.find_one(doc! {"_id": {"c": "users", "n": 0i64}}).await.unwrap().unwrap();
    assert_eq!(first.get_array("docs").unwrap().len(), 2);

    // Damage, then restore.
    db.collection::<Document>("orders").delete_many(doc! {"n": {"$lt": 100}}).await.unwrap();
    db.collection::<Document>("orders").update_many(doc! {}, doc! {"$set": {"ratio": 2}}).await.unwrap();
    db.run_command(doc! {"dropIndexes": "orders", "index": "compound"}).await.unwrap();
    db.collection::<Document>("users").drop().await.unwrap();
    db.collection::<Document>("newer").insert_one(doc! {"x": 1}).await.unwrap();
    let rep = database::restore_from_database(&db, &store, &t.id, &RestoreOptions::default(), None).await.unwrap();
    assert!(rep.collections.iter().all(|c| c.verified));
    assert_eq!((rep.dropped.clone(), rep.snapshot_sha256.clone()), (vec!["newer".to_string()], t.manifest.sha256));
    assert_eq!((raw(&db, "orders").await, raw(&db, "users").await), before, "byte-identical documents");
    assert_eq!(indexes(&db, "orders").await, before_idx);
    assert_eq!(options(&db, "orders").await, before_opts);
}

#[tokio::test]
async fn long_tenant_and_collection_names_fit() {
    let c = client().await;
    let tenant = format!("{}_{}", unique("bkdb_long"), "t".repeat(40));
    let db = c.database(&tenant);
    let long = "c".repeat(150);
    db.collection::<Document>(&long).insert_many((0..3).map(|i| doc! {"_id": i, "v": "x"})).await.unwrap();
    let store = fresh_db("bkdb_store").await;
    let t = database::snapshot_to_database(&db, &store, &SnapshotOptions::default(), None).await.unwrap();
    let before = raw(&db, &long).await;
    db.collection::<Document>(&long).delete_many(doc! {}).await.unwrap();
    database::restore_from_database(&db, &store, &t.id, &RestoreOptions::default(), None).await.unwrap();
    assert_eq!(raw(&db, &long).await, before);
}

#[tokio::test]
async fn retention_keeps_the_newest_complete_snapshots_of_each_tenant() {
    let db = fresh_db("bkdb_keep").await;
    let other = fresh_db("bkdb_keep_other").await;
    let store = fresh_db("bkdb_store").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        db.collection::<Document>("items").insert_one(doc! {"_id": i}).await.unwrap();
        ids.push(database::snapshot_to_database(&db, &store, &SnapshotOptions::default(), None).await.unwrap().id);
    }
    other.collection::<Document>("items").insert_one(doc! {"_id": 1}).await.unwrap();
    let kept_other =
        database::snapshot_to_database(&other, &store, &SnapshotOptions::default(), None).await.unwrap().id;
    // Taken within the same second: ids stay unique.
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 4, "{ids:?}");
    let mut deleted = database::retain(&store, db.name(), 2).await.unwrap();
    deleted.sort();
    let mut oldest = ids[..2].to_vec();
    oldest.sort();
    assert_eq!(deleted, oldest);
    let left: Vec<String> = database::list(&store, Some(db.name())).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(left, vec![ids[3].clone(), ids[2].clone()], "newest first");
    let mut want = vec!["snapshots".to_string(), ids[2].clone(), ids[3].clone(), kept_other.clone()];
    want.sort();
    assert_eq!(collections(&store).await, want, "the data of deleted snapshots is dropped");
    assert_eq!(database::newest(&store, db.name(), None).await.unwrap(), Some(ids[3].clone()));
    // The newest one restores the last state.
    db.collection::<Document>("items").delete_many(doc! {}).await.unwrap();
    database::restore_from_database(&db, &store, &ids[3], &RestoreOptions::default(), None).await.unwrap();
    assert_eq!(dump(&db, "items").await.len(), 4);
}

#[tokio::test]
async fn an_interrupted_snapshot_is_never_restored_and_is_cleaned_up() {
    let db = rich_db("bkdb_crash").await;
    let store = fresh_db("bkdb_store").await;
    let good = database::snapshot_to_database(&db, &store, &SnapshotOptions::default(), None).await.unwrap();
    // A writer that died half-way: its manifest still says `writing`, some chunks are there.
    let old = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 3_600_000);
    let newer = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 60_000);
    let crashed = format!("{}.29990101T000000Z", db.name());
    store
        .collection::<Document>("snapshots")
        .insert_one(doc! {"_id": &crashed, "tenant": db.name(), "state": "writing", "createdAt": newer, "updatedAt": old, "data": &crashed})
        .await
        .unwrap();
    store
        .collection::<Document>(&crashed)
        .insert_one(doc! {"_id": {"c": "users", "n": 0i64}, "docs": [{"_id": "u1"}]})
        .await
        .unwrap();
    // One still being written (refreshed recently) is left alone.
    let busy = format!("{}.29990101T000001Z", db.name());
    store
        .collection::<Document>("snapshots")
        .insert_one(doc! {"_id": &busy, "tenant": db.name(), "state": "writing", "createdAt": newer, "updatedAt": bson::DateTime::now(), "data": &busy})
        .await
        .unwrap();

    assert_eq!(database::newest(&store, db.name(), None).await.unwrap(), Some(good.id.clone()), "only complete ones");
    let now = dump_db(&db).await;
    let e = database::restore_from_database(&db, &store, &crashed, &RestoreOptions::default(), None).await.unwrap_err();
    assert!(e.to_string().contains("is not complete (state writing)"), "{e}");
    assert_eq!(dump_db(&db).await, now, "nothing changed");
    let states: Vec<String> = database::list(&store, None).await.unwrap().into_iter().map(|s| s.state).collect();
    assert_eq!(states, ["writing", "writing", "complete"]);

    // The next snapshot of the tenant deletes the abandoned one (manifest and data), not the busy one.
    let next = database::snapshot_to_database(&db, &store, &SnapshotOptions::default(), None).await.unwrap();
    assert!(manifest_doc(&store, &crashed).await.is_none());
    assert!(!collections(&store).await.contains(&crashed));
    assert!(manifest_doc(&store, &busy).await.is_some());
    let left: Vec<String> = database::list(&store, None).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(left, vec![busy, next.id, good.id]);
}

#[tokio::test]
async fn a_failed_snapshot_leaves_nothing_behind() {
    let db = rich_db("bkdb_fail").await;
    let store = fresh_db("bkdb_store").await;
    let opts = SnapshotOptions { collections: vec!["nope".into()], ..Default::default() };
    let e = database::snapshot_to_database(&db, &store, &opts, None).await.unwrap_err();
    assert!(e.to_string().contains("collection nope does not exist"), "{e}");
    assert_eq!(store.collection::<Document>("snapshots").count_documents(doc! {}).await.unwrap(), 0);
    assert_eq!(collections(&store).await, vec!["snapshots".to_string()]);
    // The tenant itself is refused as a destination.
    let e = database::snapshot_to_database(&db, &db, &SnapshotOptions::default(), None).await.unwrap_err();
    assert!(e.to_string().contains("is the tenant itself"), "{e}");
}

#[tokio::test]
async fn a_damaged_database_snapshot_is_refused_and_nothing_changes() {
    let db = rich_db("bkdb_damaged").await;
    let store = fresh_db("bkdb_store").await;
    let t = database::snapshot_to_database(&db, &store, &SnapshotOptions::default(), None).await.unwrap();
    db.collection::<Document>("users").insert_one(doc! {"_id": "u3"}).await.unwrap();
    let now = dump_db(&db).await;
    store
        .collection::<Document>(&t.id)
        .update_one(doc! {"_id": {"c": "users", "n": 0i64}}, doc! {"$set": {"docs.0.name": "Eve"}})
        .await
        .unwrap();
    let e = database::restore_from_database(&db, &store, &t.id, &RestoreOptions::default(), None).await.unwrap_err();
    assert!(
        e.to_string().contains("collection users of snapshot") && e.to_string().contains("nothing was restored"),
        "{e}"
    );
    assert_eq!(dump_db(&db).await, now);
    let e = database::restore_from_database(&db, &store, "nope.1", &RestoreOptions::default(), None).await.unwrap_err();
    assert!(e.to_string().contains("no snapshot nope.1 in database"), "{e}");
    assert_eq!(dump_db(&db).await, now);
}
