//! What keeps a tenant database safe: checksums, the lock, undo on failure, validation,
//! profiles, batches, transactions and unreachable servers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document};
use common::*;
use dbshift::engine::lock::{Lease, LockError};
use dbshift::engine::pass::Guard;
use dbshift::engine::tracking::{self, State};
use dbshift::engine::{runner, DownRequest, RunOptions, UpRequest};

const ADD: &str = "up:\n  - addField: { collection: items, field: color, value: red }\n";
const RENAME: &str = "up:\n  - renameField: { collection: items, from: name, to: title }\n";

async fn seeded(prefix: &str, n: i32) -> mongodb::Database {
    let db = fresh_db(prefix).await;
    let docs: Vec<Document> = (0..n).map(|i| doc! {"_id": i, "name": format!("item {i}"), "qty": i, "sku": if i == n - 1 { "x".to_string() } else { format!("{i}") }}).collect();
    db.collection::<Document>("items").insert_many(docs).await.unwrap();
    db
}

#[tokio::test]
async fn editing_an_applied_migration_is_refused_unless_allowed() {
    let db = seeded("safe_checksum", 5).await;
    let dir = migrations(&[("20250101000000_add.yaml", ADD)]);
    let opts = RunOptions::new("r1");
    assert!(runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &opts).await.unwrap().ok);
    std::fs::write(dir.path().join("20250101000000_add.yaml"), ADD.replace("red", "blue")).unwrap();
    std::fs::write(dir.path().join("20250102000000_rename.yaml"), RENAME).unwrap();
    let m = load(dir.path());
    let before = dump_db(&db).await;
    let e = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("20250101000000_add") && msg.contains("20250101000000_add.yaml") && msg.contains("checksum"),
        "{msg}"
    );
    assert_eq!(dump_db(&db).await, before, "a refused run changes nothing");
    let allowed = UpRequest { allow_changed: true, ..Default::default() };
    let r = runner::up(&db, "t", &m, &allowed, &opts).await.unwrap();
    assert!(r.ok);
    assert_eq!(r.migrations.len(), 1, "only the new migration runs");
}

#[tokio::test]
async fn a_failure_mid_migration_leaves_the_database_exactly_as_before() {
    let db = seeded("safe_midfail", 50).await;
    db.run_command(doc! {"createIndexes": "items", "indexes": [{"key": {"qty": 1}, "name": "by_qty"}]}).await.unwrap();
    // Four steps change data, indexes and collections; the fifth fails (sku "x" is not a number).
    let yaml = r#"description: fails at step 5
up:
  - addField: { collection: items, field: color, value: red }
  - removeField: { collection: items, field: qty }
  - dropIndex: { collection: items, name: by_qty }
  - createCollection: { collection: audit }
  - convertType: { collection: items, field: sku, to: int }
"#;
    let dir = migrations(&[("20250101000000_fail.yaml", yaml)]);
    let m = load(dir.path());
    let before = dump_db(&db).await;
    let before_bytes = dump_bytes(&db, "items").await;
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &RunOptions::new("r1")).await.unwrap();
    assert!(!r.ok);
    let err = r.error.unwrap();
    assert!(
        err.contains("step 5 (convertType)") && err.contains("cannot be converted") && err.contains("_id 49"),
        "{err}"
    );
    assert!(err.contains("every change of this migration was undone"), "{err}");
    assert_eq!(dump_db(&db).await, before);
    // Field order aside, documents are the same; here every field was restored in place.
    let after = dump(&db, "items").await;
    assert_eq!(after.len(), before_bytes.len());
    let recs = tracking::load(&db, tracking::TRACKING).await.unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].state, State::Failed);
    assert!(recs[0].error.as_deref().unwrap().contains("step 5"));
    // Nothing is "dirty": fixing the file and running again just works.
    std::fs::write(dir.path().join("20250101000000_fail.yaml"), yaml.replace("to: int }", "to: int, onError: keep }"))
        .unwrap();
    let r = runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &RunOptions::new("r2")).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
}

#[tokio::test]
async fn a_unique_index_that_cannot_be_built_fails_cleanly() {
    // Two items share a name: the index fails after the `$inc` ran, and both are undone.
    let db = seeded("safe_unique", 10).await;
    db.collection::<Document>("items").update_one(doc! {"_id": 1}, doc! {"$set": {"name": "item 0"}}).await.unwrap();
    let yaml = "up:\n  - updateMany: { collection: items, filter: {}, update: { $inc: { qty: 1 } } }\n  - createIndex: { collection: items, keys: { name: 1 }, name: name_unique, unique: true }\n";
    let dir = migrations(&[("20250101000000_unique.yaml", yaml)]);
    let before = dump_bytes(&db, "items").await;
    let r = runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &RunOptions::new("r1")).await.unwrap();
    let err = r.error.unwrap();
    assert!(err.contains("step 2 (createIndex)") && err.contains("every change of this migration was undone"), "{err}");
    assert!(!err.contains("UNDO INCOMPLETE"), "{err}");
    assert!(err.len() < 600, "the error should be a sentence, not a driver dump: {err}");
    assert_eq!(dump_bytes(&db, "items").await, before);
}

#[tokio::test]
async fn failed_validation_undoes_the_migration_and_reports_each_check() {
    let db = seeded("safe_validate", 10).await;
    let yaml = r#"up:
  - addField: { collection: items, field: color, value: red }
validate:
  - count: { collection: items, filter: { color: red }, equals: 10 }
  - count: { collection: items, filter: { color: { $exists: false } }, max: 0 }
  - indexExists: { collection: items, name: by_color }
  - jsonSchema: { collection: items, schema: { required: [color] } }
  - aggregate: { collection: items, description: no item without a name, pipeline: [ { $match: { name: { $exists: false } } } ] }
"#;
    let dir = migrations(&[("20250101000000_v.yaml", yaml)]);
    let before = dump_db(&db).await;
    let r = runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &RunOptions::new("r")).await.unwrap();
    assert!(!r.ok);
    let v = &r.migrations[0].validation;
    assert_eq!(v.len(), 5);
    assert_eq!(v.iter().map(|c| c.passed).collect::<Vec<_>>(), [true, true, false, true, true]);
    assert!(v[2].message.contains("by_color does not exist"), "{}", v[2].message);
    assert_eq!(dump_db(&db).await, before);
}

#[tokio::test]
async fn two_concurrent_runners_never_migrate_one_tenant_at_once() {
    let db = seeded("safe_lock", 3000).await;
    let yaml = r#"up:
  - transform: { collection: items, script: "(d) => { d.n = (d.n || 0) + 1; return d; }" }
"#;
    let dir = migrations(&[("20250101000000_t.yaml", yaml)]);
    let m = Arc::new(load(dir.path()));
    let mut handles = Vec::new();
    for i in 0..2 {
        let (db, m) = (db.clone(), m.clone());
        handles.push(tokio::spawn(async move {
            let mut o = RunOptions::new(format!("run-{i}"));
            o.owner = format!("host/{i}");
            runner::up(&db, "t", &m, &UpRequest::default(), &o).await
        }));
    }
    let mut applied = 0;
    let mut locked = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(r) if r.ok && r.migrations.len() == 1 => applied += 1,
            Ok(r) if r.ok && r.migrations.is_empty() => {} // ran after the other finished
            Err(runner::RunError::Lock(LockError::Held { owner, .. })) => {
                assert!(owner.starts_with("host/"));
                locked += 1
            }
            other => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(applied, 1, "exactly one runner applies the migration");
    assert!(locked <= 1);
    // Every document was transformed exactly once.
    let docs = dump(&db, "items").await;
    assert!(docs.iter().all(|d| d.get_i32("n") == Ok(1)), "{:?}", docs.iter().find(|d| d.get_i32("n") != Ok(1)));
}

#[tokio::test]
async fn a_dead_holders_lock_expires_by_itself() {
    let db = fresh_db("safe_lock_expiry").await;
    let held = Lease::acquire(&db, "crashed/1", "run-a", Duration::from_secs(2), Duration::ZERO).await.unwrap();
    std::mem::forget(held); // the holder "dies": no release, no renewal task stopped cleanly
    let e = Lease::acquire(&db, "other/2", "run-b", Duration::from_secs(2), Duration::ZERO).await.err().unwrap();
    assert!(e.to_string().contains("crashed/1"), "{e}");
    // The renewal task of a forgotten lease still runs in this process; a real crash stops it.
    // Simulate the crash by expiring the lease as the clock would.
    db.collection::<Document>(tracking::LOCK)
        .update_one(doc! {}, doc! {"$set": {"expiresAt": bson::DateTime::from_millis(0), "owner": "crashed/gone"}})
        .await
        .unwrap();
    let l = Lease::acquire(&db, "other/2", "run-b", Duration::from_secs(2), Duration::ZERO).await.unwrap();
    l.release().await.unwrap();
    assert_eq!(db.collection::<Document>(tracking::LOCK).count_documents(doc! {}).await.unwrap(), 0);
}

/// A runner that dies inside a transaction leaves it open on the server. The next holder of the
/// lock ends it at once (its sessions are noted in the lease), instead of waiting for the
/// server to expire it: the dead runner's write never lands and blocks nobody.
#[tokio::test]
async fn the_next_holder_ends_a_dead_holders_open_transaction() {
    let db = fresh_db("safe_lock_sessions").await;
    let coll = db.collection::<Document>("items");
    coll.insert_one(doc! {"_id": 1, "v": 0}).await.unwrap();
    let held = Lease::acquire(&db, "crashed/1", "run-a", Duration::from_secs(2), Duration::ZERO).await.unwrap();
    let mut s = Guard::new(Some(&held), None).session(&db).await.unwrap();
    s.start_transaction().await.unwrap();
    coll.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 1}}).session(&mut s).await.unwrap();
    std::mem::forget(held);
    db.collection::<Document>(tracking::LOCK)
        .update_one(doc! {}, doc! {"$set": {"expiresAt": bson::DateTime::from_millis(0), "owner": "crashed/gone"}})
        .await
        .unwrap();
    let next = Lease::acquire(&db, "next/2", "run-b", Duration::from_secs(5), Duration::ZERO).await.unwrap();
    // Well inside the server's transaction lifetime (60 s), the document is free again.
    let write = coll.update_one(doc! {"_id": 1}, doc! {"$inc": {"v": 10}});
    tokio::time::timeout(Duration::from_secs(20), write).await.expect("the dead transaction was ended").unwrap();
    assert!(s.commit_transaction().await.is_err(), "the dead runner's transaction cannot commit");
    assert_eq!(coll.find_one(doc! {"_id": 1}).await.unwrap().unwrap().get_i32("v"), Ok(10));
    next.release().await.unwrap();
}

#[tokio::test]
async fn a_held_lock_is_renewed_while_its_holder_runs() {
    let db = fresh_db("safe_lock_renew").await;
    let l = Lease::acquire(&db, "me/1", "r", Duration::from_secs(3), Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        Lease::acquire(&db, "you/2", "r2", Duration::from_secs(3), Duration::ZERO).await.is_err(),
        "renewal kept it"
    );
    assert!(l.standing().known(), "still known to be held");
    l.release().await.unwrap();
}

#[tokio::test]
async fn profiles_select_migrations() {
    let db = seeded("safe_profiles", 3).await;
    let dir = migrations(&[
        ("20250101000000_all.yaml", ADD),
        ("20250102000000_dev.yaml", "profiles: [dev, test]\nup:\n  - insertDocuments: { collection: items, documents: [ { _id: 100, name: fixture } ] }\n"),
    ]);
    let m = load(dir.path());
    let mut opts = RunOptions::new("r");
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert_eq!(r.migrations.len(), 1);
    assert_eq!(db.collection::<Document>("items").count_documents(doc! {"_id": 100}).await.unwrap(), 0);
    opts.profiles = vec!["dev".into()];
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert_eq!(r.migrations.len(), 1);
    assert_eq!(db.collection::<Document>("items").count_documents(doc! {"_id": 100}).await.unwrap(), 1);
}

#[tokio::test]
async fn down_batch_rolls_back_the_whole_last_release() {
    let db = seeded("safe_batch", 5).await;
    let dir = migrations(&[("20250101000000_add.yaml", ADD)]);
    let opts = RunOptions::new("r");
    runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &opts).await.unwrap();
    let after_first = dump_db(&db).await;
    std::fs::write(dir.path().join("20250102000000_rename.yaml"), RENAME).unwrap();
    std::fs::write(
        dir.path().join("20250103000000_idx.yaml"),
        "up:\n  - createIndex: { collection: items, keys: { title: 1 } }\n",
    )
    .unwrap();
    let m = load(dir.path());
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert_eq!(r.migrations.len(), 2);
    let r = runner::down(&db, "t", &m, &DownRequest::LastBatch, &opts).await.unwrap();
    assert!(r.ok);
    assert_eq!(
        r.migrations.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(),
        ["20250103000000_idx", "20250102000000_rename"]
    );
    assert_eq!(dump_db(&db).await, after_first);
    let recs = tracking::load(&db, tracking::TRACKING).await.unwrap();
    assert_eq!(
        recs.iter().map(|r| r.state).collect::<Vec<_>>(),
        [State::Applied, State::RolledBack, State::RolledBack]
    );
    // Rolled-back migrations are pending again.
    assert_eq!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().migrations.len(), 2);
}

#[tokio::test]
async fn records_carry_what_ran_where() {
    let db = seeded("safe_record", 7).await;
    let dir = migrations(&[("20250101000000_add.yaml", &format!("description: colour\nauthor: ann\n{ADD}"))]);
    runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &RunOptions::new("run-42")).await.unwrap();
    let r = &tracking::load(&db, tracking::TRACKING).await.unwrap()[0];
    assert_eq!((r.description.as_str(), r.author.as_str(), r.run_id.as_str(), r.batch), ("colour", "ann", "run-42", 1));
    assert_eq!(r.documents_affected, 7);
    assert_eq!(r.steps[0].documents_affected, 7);
    assert_eq!(r.checksum.len(), 64);
    assert!(r.down.is_some());
}

#[tokio::test]
async fn transaction_migrations_commit_or_leave_nothing() {
    let db = seeded("safe_txn", 5).await;
    db.run_command(doc! {"createIndexes": "items", "indexes": [{"key": {"code": 1}, "name": "code", "unique": true, "sparse": true}]}).await.unwrap();
    let yaml = r#"transaction: true
up:
  - updateMany: { collection: items, filter: {}, update: { $set: { checked: true } } }
  - insertDocuments: { collection: items, documents: [ { _id: 100, code: A }, { _id: 101, code: A } ] }
"#;
    let dir = migrations(&[("20250101000000_txn.yaml", yaml)]);
    let before = dump_db(&db).await;
    let r = runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &RunOptions::new("r")).await.unwrap();
    assert!(!r.ok);
    assert!(r.error.as_deref().unwrap().contains("transaction was aborted"), "{:?}", r.error);
    assert_eq!(dump_db(&db).await, before);
    std::fs::write(dir.path().join("20250101000000_txn.yaml"), yaml.replace("code: A } ]", "code: B } ]")).unwrap();
    let r = runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &RunOptions::new("r")).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(db.collection::<Document>("items").count_documents(doc! {"checked": true}).await.unwrap(), 5);
    assert_eq!(db.collection::<Document>("items").count_documents(doc! {}).await.unwrap(), 7);
}

#[tokio::test]
async fn a_transform_that_throws_changes_nothing() {
    let db = seeded("safe_transform_throw", 1500).await;
    let yaml = "up:\n  - transform: { collection: items, script: \"(d) => { if (d._id === 1200) throw new Error('bad row'); d.x = 1; return d; }\" }\n";
    let dir = migrations(&[("20250101000000_t.yaml", yaml)]);
    let before = dump_bytes(&db, "items").await;
    let r = runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &RunOptions::new("r")).await.unwrap();
    let e = r.error.unwrap();
    assert!(e.contains("_id 1200") && e.contains("bad row"), "{e}");
    assert_eq!(dump_bytes(&db, "items").await, before);
    // Undone completely: the failed step's pre-images are dropped, and the record says so.
    let names = db.list_collection_names().await.unwrap();
    assert!(!names.iter().any(|n| n.starts_with("_dbshift_rb_")), "{names:?}");
    let rec = db.collection::<Document>("_dbshift_migrations").find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!((rec.get_str("state"), rec.get("rollbackData")), (Ok("failed"), None), "{rec}");
}

#[tokio::test]
async fn lossy_operations_over_several_chunks_are_undone_exactly() {
    // 1,100 documents: the rollback data of each step spans two chunks.
    let db = seeded("safe_batches", 1100).await;
    let before = dump_db(&db).await;
    let yaml = r#"up:
  - removeField: { collection: items, field: qty }
  - updateMany: { collection: items, filter: {}, update: { $set: { touched: true } } }
  - deleteDocuments: { collection: items, filter: { _id: { $lt: 100 } } }
  - convertType: { collection: items, field: sku, to: int }
"#;
    let dir = migrations(&[("20250101000000_batches.yaml", yaml)]);
    let r = runner::up(&db, "t", &load(dir.path()), &UpRequest::default(), &RunOptions::new("r")).await.unwrap();
    // The last document's sku ("x") cannot be converted: the fourth step fails after the others
    // changed every document, and everything is undone from the stored chunks.
    let err = r.error.unwrap();
    assert!(err.contains("step 4 (convertType)") && err.contains("undone"), "{err}");
    assert_eq!(dump_db(&db).await, before);
    // Without the bad value the same migration applies, and down restores it all.
    db.collection::<Document>("items").update_one(doc! {"_id": 1099}, doc! {"$set": {"sku": "1099"}}).await.unwrap();
    let before = dump_db(&db).await;
    let m = load(dir.path());
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &RunOptions::new("r2")).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    let steps: Vec<i64> = r.migrations[0].steps.iter().map(|s| s.documents_affected).collect();
    assert_eq!(steps, [1100, 1100, 100, 1000]);
    assert_eq!(db.collection::<Document>("items").count_documents(doc! {"sku": {"$type": "int"}}).await.unwrap(), 1000);
    assert!(runner::down(&db, "t", &m, &DownRequest::Steps(1), &RunOptions::new("r3")).await.unwrap().ok);
    assert_eq!(dump_db(&db).await, before);
}
