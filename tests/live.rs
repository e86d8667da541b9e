//! Live safety: an application keeps writing — inserts, updates and deletes at a steady rate —
//! while `up` and then `down` run, for every operation that changes documents, on a server
//! with transactions (a replica set) and on a standalone server.
//!
//! The application owns one field (`counter`) and the documents it inserts or deletes; the
//! migration owns the others. After `up`: no acknowledged application write is lost, every
//! document the migration had to change is changed exactly once, nothing else is. After
//! `down`: every document is back as it was before the migration, field for field, with the
//! application's writes kept, and no conflict is reported (the application never touched the
//! migration's fields). A second test has the application change a migrated field: the
//! rollback reports exactly those documents as conflicts, and the pre-image wins.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::{Collection, Database};

use common::*;
use dbshift::engine::runner::{self, OutcomeState};
use dbshift::engine::{DownRequest, RunOptions, UpRequest};

const COLL: &str = "items";

/// What the application knows about one document: how it was inserted, its counter, whether
/// it deleted it. Only acknowledged writes count.
#[derive(Clone, Debug)]
struct Known {
    seed: Document,
    counter: i64,
    deleted: bool,
    /// Inserted by the application while the migration ran (it may or may not be migrated).
    late: bool,
}

type Model = Arc<Mutex<BTreeMap<i32, Known>>>;

/// The application: writes until stopped, about 150 times a second.
struct App {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl App {
    fn start(coll: Collection<Document>, model: Model, seed: fn(i32) -> Document, first_new: i32, late: bool) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut next = first_new;
            let mut writes = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(7));
            while !s.load(Ordering::SeqCst) {
                tick.tick().await;
                let live: Vec<i32> =
                    model.lock().unwrap().iter().filter(|(_, k)| !k.deleted).map(|(i, _)| *i).collect();
                if live.is_empty() {
                    continue;
                }
                let pick = live[rand::random::<u32>() as usize % live.len()];
                let roll = rand::random::<u32>() % 10;
                if roll < 6 {
                    if let Ok(r) = retry(|| coll.update_one(doc! {"_id": pick}, doc! {"$inc": {"counter": 1}})).await {
                        if r.matched_count == 1 {
                            model.lock().unwrap().get_mut(&pick).unwrap().counter += 1;
                            writes += 1;
                        }
                    }
                } else if roll < 8 {
                    let mut d = seed(next);
                    d.insert("counter", 0i64);
                    if retry(|| coll.insert_one(d.clone())).await.is_ok() {
                        model
                            .lock()
                            .unwrap()
                            .insert(next, Known { seed: seed(next), counter: 0, deleted: false, late });
                        writes += 1;
                    }
                    next += 1;
                } else if let Ok(r) = retry(|| coll.delete_one(doc! {"_id": pick})).await {
                    if r.deleted_count == 1 {
                        model.lock().unwrap().get_mut(&pick).unwrap().deleted = true;
                        writes += 1;
                    }
                }
            }
            writes
        });
        App { stop, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// An application retries a write that conflicted with a transaction, like a driver does.
async fn retry<T, F, Fut>(f: F) -> mongodb::error::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::IntoFuture<Output = mongodb::error::Result<T>>,
{
    let mut last = None;
    for _ in 0..20 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Err(last.unwrap())
}

/// One operation under test.
struct Case {
    name: &'static str,
    yaml: &'static str,
    /// A document as the application (and the seed) writes it, before the migration.
    seed: fn(i32) -> Document,
    /// What the migration makes of it (`None`: it deletes it); `Some(seed)` when it leaves it.
    migrated: fn(&Document) -> Option<Document>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "transform",
            yaml: r#"up:
  - transform:
      collection: items
      batchSize: 200
      script: |
        (d) => { const [f, ...r] = d.name.split(' '); d.firstName = f; d.lastName = r.join(' '); delete d.name; return d; }
"#,
            seed: |i| doc! {"_id": i, "name": format!("First{i} Last{i}"), "tag": i % 7},
            migrated: |s| {
                let i = s.get_i32("_id").unwrap();
                Some(doc! {"_id": i, "tag": i % 7, "firstName": format!("First{i}"), "lastName": format!("Last{i}")})
            },
        },
        Case {
            name: "updateMany with operators",
            yaml: "up:\n  - updateMany: { collection: items, filter: { plan: free }, update: { $set: { plan: basic }, $inc: { visits: 1 } } }\n",
            seed: |i| doc! {"_id": i, "plan": if i % 2 == 0 { "free" } else { "pro" }, "visits": 0},
            migrated: |s| {
                let mut d = s.clone();
                if s.get_str("plan") == Ok("free") {
                    d.insert("plan", "basic");
                    d.insert("visits", 1);
                }
                Some(d)
            },
        },
        Case {
            name: "updateMany with a pipeline",
            yaml: "up:\n  - updateMany: { collection: items, filter: {}, update: [ { $replaceWith: { $mergeObjects: [ \"$$ROOT\", { label: { $concat: [ \"$name\", \"!\" ] } } ] } } ] }\n",
            seed: |i| doc! {"_id": i, "name": format!("n{i}")},
            migrated: |s| {
                let mut d = s.clone();
                d.insert("label", format!("{}!", s.get_str("name").unwrap()));
                Some(d)
            },
        },
        Case {
            name: "removeField",
            yaml: "up:\n  - removeField: { collection: items, field: legacy }\n",
            seed: |i| doc! {"_id": i, "legacy": {"code": i, "list": [i, i + 1]}, "keep": true},
            migrated: |s| {
                let mut d = s.clone();
                d.remove("legacy");
                Some(d)
            },
        },
        Case {
            name: "renameField",
            yaml: "up:\n  - renameField: { collection: items, from: nm, to: fullName }\n",
            seed: |i| doc! {"_id": i, "nm": format!("x{i}")},
            migrated: |s| Some(doc! {"_id": s.get_i32("_id").unwrap(), "fullName": s.get_str("nm").unwrap()}),
        },
        Case {
            name: "convertType",
            yaml: "up:\n  - convertType: { collection: items, field: amount, to: double }\n",
            seed: |i| doc! {"_id": i, "amount": format!("{}.5", i)},
            migrated: |s| {
                let i = s.get_i32("_id").unwrap();
                Some(doc! {"_id": i, "amount": i as f64 + 0.5})
            },
        },
        Case {
            name: "deleteDocuments",
            yaml: "up:\n  - deleteDocuments: { collection: items, filter: { status: stale } }\n",
            seed: |i| doc! {"_id": i, "status": if i % 3 == 0 { "stale" } else { "live" }},
            migrated: |s| (s.get_str("status") != Ok("stale")).then(|| s.clone()),
        },
    ]
}

/// A document without the application's field, as a sorted map (a field a rollback puts back
/// comes back at the end of a document: values and types must match, not positions).
fn content(d: &Document) -> BTreeMap<String, Bson> {
    d.iter().filter(|(k, _)| *k != "counter").map(|(k, v)| (k.clone(), v.clone())).collect()
}

async fn all(db: &Database) -> BTreeMap<i32, Document> {
    dump(db, COLL).await.into_iter().map(|d| (d.get_i32("_id").unwrap(), d)).collect()
}

async fn seeded(db: &Database, case: &Case, n: i32) -> Model {
    let docs: Vec<Document> = (0..n)
        .map(|i| {
            let mut d = (case.seed)(i);
            d.insert("counter", 0i64);
            d
        })
        .collect();
    db.collection::<Document>(COLL).insert_many(docs).await.unwrap();
    let model = (0..n).map(|i| (i, Known { seed: (case.seed)(i), counter: 0, deleted: false, late: false })).collect();
    Arc::new(Mutex::new(model))
}

/// Up then down of one case with the application writing all along; asserts both states.
async fn live(uri: &str, case: &Case, n: i32) {
    let client = mongodb::Client::with_uri_str(uri).await.unwrap();
    let db = client.database(&unique("live"));
    let coll = db.collection::<Document>(COLL);
    let model = seeded(&db, case, n).await;
    let dir = migrations(&[("20250101000000_live.yaml", case.yaml)]);
    let m = load(dir.path());
    let opts = RunOptions::new("live");

    let app = App::start(coll.clone(), model.clone(), case.seed, 1_000_000, true);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    let during_up = app.stop().await;
    assert!(r.ok, "{}: up failed: {:?}", case.name, r.error);
    let now = all(&db).await;
    let known = model.lock().unwrap().clone();
    let (mut migrated_seen, mut writes_checked) = (0, 0);
    for (id, k) in &known {
        let doc = now.get(id);
        let expected = (case.migrated)(&k.seed);
        match (k.deleted, &expected, doc) {
            (true, _, None) => {}
            (true, _, Some(d)) => panic!("{}: {id} was deleted by the application but exists: {d}", case.name),
            (false, None, None) => migrated_seen += 1,
            (false, None, Some(d)) if k.late => assert_eq!(content(d), content(&k.seed), "{}: {id}", case.name),
            (false, None, Some(d)) => panic!("{}: {id} should have been deleted by the migration: {d}", case.name),
            (false, Some(_), None) => panic!("{}: {id} is gone, but nobody deleted it", case.name),
            (false, Some(e), Some(d)) => {
                assert_eq!(d.get_i64("counter"), Ok(k.counter), "{}: {id} lost an application write: {d}", case.name);
                writes_checked += 1;
                if content(d) == content(e) {
                    migrated_seen += 1;
                } else {
                    // Only a document inserted while the migration ran may be left as it was.
                    assert!(
                        k.late && content(d) == content(&k.seed),
                        "{}: {id} is neither migrated nor as inserted: {d}",
                        case.name
                    );
                }
            }
        }
    }
    let initial_to_change = (0..n).filter(|i| (case.migrated)(&known[i].seed).as_ref() != Some(&known[i].seed)).count();
    assert!(migrated_seen >= initial_to_change.min(1), "{}: nothing was migrated", case.name);
    assert!(during_up > 20, "{}: the application barely wrote during up ({during_up})", case.name);

    let app = App::start(coll.clone(), model.clone(), case.seed, 2_000_000, false);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap();
    let during_down = app.stop().await;
    assert!(r.ok, "{}: down failed: {:?}", case.name, r.error);
    assert_eq!(r.migrations[0].state, OutcomeState::RolledBack);
    assert!(r.migrations[0].conflicts.is_none(), "{}: conflicts {:?}", case.name, r.migrations[0].conflicts);
    let now = all(&db).await;
    let known = model.lock().unwrap().clone();
    for (id, k) in &known {
        match (k.deleted, now.get(id)) {
            (true, None) => {}
            (true, Some(d)) => panic!("{}: {id} was deleted by the application but came back: {d}", case.name),
            (false, None) => panic!("{}: {id} is missing after down", case.name),
            (false, Some(d)) => {
                assert_eq!(content(d), content(&k.seed), "{}: {id} is not as before the migration", case.name);
                assert_eq!(d.get_i64("counter"), Ok(k.counter), "{}: {id} lost an application write", case.name);
            }
        }
    }
    assert_eq!(now.len(), known.values().filter(|k| !k.deleted).count(), "{}: documents nobody wrote", case.name);
    eprintln!(
        "{}: {n} documents, {during_up} application writes during up, {during_down} during down, {writes_checked} counters checked",
        case.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_transactions_no_application_write_is_lost_and_down_is_exact() {
    for case in cases() {
        live(&uri(), &case, 600).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_transactions_no_application_write_is_lost_and_down_is_exact() {
    for case in cases() {
        live(&standalone_uri(), &case, 150).await;
    }
}

/// The application changes a field the migration wrote; the rollback puts the pre-image back
/// and reports exactly those documents.
#[tokio::test]
async fn a_field_changed_again_after_the_migration_is_a_reported_conflict() {
    let db = fresh_db("live_conflict").await;
    let case = &cases()[0];
    seeded(&db, case, 300).await;
    let dir = migrations(&[("20250101000000_live.yaml", case.yaml)]);
    let m = load(dir.path());
    let opts = RunOptions::new("live");
    assert!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().ok);
    let coll = db.collection::<Document>(COLL);
    let changed: Vec<i32> = (0..300).filter(|i| i % 30 == 0).collect();
    coll.update_many(doc! {"_id": {"$in": &changed}}, doc! {"$set": {"firstName": "Changed"}}).await.unwrap();
    // And a field the migration never touched, on every document: no conflict.
    coll.update_many(doc! {}, doc! {"$set": {"counter": 9i64}}).await.unwrap();
    let r = runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    let c = r.migrations[0].conflicts.clone().expect("conflicts reported");
    assert_eq!(c.count, changed.len() as u64);
    let mut ids: Vec<String> = changed.iter().map(|i| i.to_string()).collect();
    ids.sort();
    let mut got = c.ids.clone();
    got.sort();
    assert_eq!(got, ids);
    let now = all(&db).await;
    for (id, d) in &now {
        assert_eq!(content(d), content(&(case.seed)(*id)), "{id}: the pre-image wins");
        assert_eq!(d.get_i64("counter"), Ok(9), "{id}");
    }
    let rec = db.collection::<Document>("_dbshift_migrations").find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(rec.get_document("conflicts").unwrap().get_i64("count"), Ok(changed.len() as i64));
}

/// `plan`, `up` and `down` on a standalone server say what that changes; on a replica set
/// they do not.
#[tokio::test]
async fn a_server_without_transactions_is_named_in_plan_up_and_down() {
    let dir = migrations(&[("20250101000000_live.yaml", cases()[0].yaml)]);
    let d = dir.path().to_str().unwrap();
    for (uri, standalone) in [(standalone_uri(), true), (uri(), false)] {
        let c = mongodb::Client::with_uri_str(&uri).await.unwrap();
        let db = c.database(&unique("live_warn"));
        seeded(&db, &cases()[0], 10).await;
        for cmd in [vec!["plan"], vec!["up"], vec!["down", "--to", "0"]] {
            let mut args = cmd.clone();
            args.extend(["--dir", d, "--tenant", db.name()]);
            let o = cli(&args, &[("DBSHIFT_MONGODB_URI", &uri)]);
            assert!(o.status.success(), "{cmd:?}: {}", text(&o));
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(
                stderr.contains("warning: this server runs without transactions"),
                standalone,
                "{cmd:?}: {stderr}"
            );
        }
        let left = db.collection::<Document>(COLL).find(doc! {"firstName": {"$exists": true}}).await.unwrap();
        assert_eq!(left.try_collect::<Vec<_>>().await.unwrap().len(), 0, "down undid up");
    }
}
