//! Stopped runners and runners side by side, with the real binary:
//! - SIGKILL at random moments across a multi-step migration (the CLI's `up`, and `dbshift run`
//!   as a Job runs it); after each, the next run leaves the tenant exactly after (`up`) or
//!   exactly before (`down --to 0`), each migration applied at most once;
//! - SIGTERM: the runner stops at the next safe point, undoes, records and exits;
//! - two runners sharing hostname and PID (separate PID and UTS namespaces, as two
//!   hostNetwork pods on one node) and two `dbshift up` started at once: both succeed, every
//!   migration lands once;
//! - a lock holder whose renewals stall (a proxy holding the traffic): it waits for the next
//!   renewal and goes on when nobody took the lock, and stops when another runner did.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::Database;

use common::*;

const PREFS: &str = "up:\n  - addField: { collection: c, field: prefs, value: { news: false } }\n  - createIndex: { collection: c, keys: { code: 1 }, name: by_code }\n";
const SPLIT: &str = r#"up:
  - transform:
      collection: c
      batchSize: 250
      script: |
        (d) => { const [f, ...r] = d.name.split(' '); d.first = f; d.last = r.join(' '); delete d.name; return d; }
"#;
const CLEANUP: &str = "up:\n  - removeField: { collection: c, field: legacy }\n  - updateMany: { collection: c, filter: {}, update: { $inc: { v: 1 } } }\n  - insertDocuments: { collection: settings, documents: [ { _id: cfg, on: true } ] }\n";
const FILES: &[(&str, &str)] = &[
    ("20250101000000_prefs.yaml", PREFS),
    ("20250102000000_split.yaml", SPLIT),
    ("20250103000000_cleanup.yaml", CLEANUP),
];

const DOCS: i32 = 400;

async fn seed(db: &Database, n: i32) {
    let docs: Vec<Document> = (0..n)
        .map(|i| doc! {"_id": i, "name": format!("Ada{i} Lovelace{i}"), "legacy": {"x": i}, "code": format!("c{i}"), "v": 0})
        .collect();
    db.collection::<Document>("c").insert_many(docs).await.unwrap();
}

/// Where two states differ, briefly.
fn diff(a: &State, b: &State) -> String {
    let mut out = Vec::new();
    let names = |s: &State| s.iter().map(|(n, _, i)| format!("{n} {i:?}")).collect::<Vec<_>>();
    if names(a) != names(b) {
        out.push(format!("collections/indexes {:?} vs {:?}", names(a), names(b)));
    }
    for ((n, da, _), (_, db, _)) in a.iter().zip(b) {
        if da.len() != db.len() {
            out.push(format!("{n}: {} vs {} documents", da.len(), db.len()));
        }
        if let Some((x, y)) = da.iter().zip(db).find(|(x, y)| x != y) {
            out.push(format!("{n}: first difference {x:?} vs {y:?}"));
        }
    }
    out.join("; ")
}

/// Every user collection's documents (as field -> value maps: a field a rollback puts back
/// may come back at another position) and index names.
type State = Vec<(String, Vec<BTreeMap<String, Bson>>, Vec<String>)>;

async fn state(db: &Database) -> State {
    dump_db(db)
        .await
        .into_iter()
        .map(|(n, docs, idx)| {
            (n, docs.iter().map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).collect(), idx)
        })
        .collect()
}

async fn records(db: &Database) -> Vec<Document> {
    db.collection::<Document>("_dbshift_migrations").find(doc! {}).await.unwrap().try_collect().await.unwrap()
}

fn dbshift(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dbshift"));
    c.args(args).env_remove("DBSHIFT_MONGODB_URI").env_remove("DBSHIFT_TENANT").env("DBSHIFT_LOG", "warn");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// The runner to kill: `up` from the CLI, or `dbshift run` as a Job runs it.
fn runner(as_job: bool, dir: &str, tenant: &str, result: &str) -> Child {
    let uri = uri();
    if as_job {
        let envs = [
            ("DBSHIFT_MONGODB_URI", uri.as_str()),
            ("DBSHIFT_TENANT", tenant),
            ("DBSHIFT_DIR", dir),
            ("DBSHIFT_RUN_ID", "job-run"),
            ("DBSHIFT_RESULT_FILE", result),
        ];
        dbshift(&["run", "--lock-ttl", "3"], &envs).spawn().unwrap()
    } else {
        dbshift(&["up", "--lock-ttl", "3", "--dir", dir, "--tenant", tenant], &[("DBSHIFT_MONGODB_URI", uri.as_str())])
            .spawn()
            .unwrap()
    }
}

/// Run to the end (at most two minutes: a run that does not finish is a failure, with what
/// it printed).
fn finish(args: &[&str]) -> std::process::Output {
    let uri = uri();
    let child = dbshift(args, &[("DBSHIFT_MONGODB_URI", uri.as_str()), ("DBSHIFT_LOG", "info")]).spawn().unwrap();
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    let o = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(o) => o,
        Err(_) => {
            Command::new("kill").args(["-9", &pid]).status().unwrap();
            let o = rx.recv().unwrap();
            panic!("{args:?} did not finish in 2 minutes: {}", text(&o));
        }
    };
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    o
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_at_random_moments_the_next_run_leaves_it_exactly_before_or_after() {
    let dir = migrations(FILES);
    let d = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let result = out.path().join("result.json");
    let client = client().await;

    // What "before" and "after" are, and how long a whole run takes.
    let reference = client.database(&unique("kill_ref"));
    seed(&reference, DOCS).await;
    let before = state(&reference).await;
    let t0 = Instant::now();
    finish(&["up", "--dir", d, "--tenant", reference.name()]);
    let full = t0.elapsed();
    let after = state(&reference).await;
    assert_ne!(before, after);

    let mut found_interrupted = 0;
    let rounds = 20;
    for round in 0..rounds {
        let db = client.database(&unique("kill"));
        seed(&db, DOCS).await;
        let as_job = round % 2 == 1;
        let mut child = runner(as_job, d, db.name(), result.to_str().unwrap());
        // Anywhere from before it starts to just after it would have finished; every third
        // round once a migration is under way (the reference run's time was measured beside
        // the other tests: under other load, random moments may all miss the middle).
        let t = Instant::now();
        if round % 3 == 0 {
            while t.elapsed() < Duration::from_secs(60)
                && !records(&db).await.iter().any(|r| matches!(r.get_str("state"), Ok("applying")))
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 50)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % (full.as_millis() as u64 + 300))).await;
        }
        let at = t.elapsed();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if records(&db).await.iter().any(|r| matches!(r.get_str("state"), Ok("applying" | "rolling_back"))) {
            found_interrupted += 1;
        }
        // The next run waits for the dead runner's lock, undoes what it left, then goes on.
        let wait = ["--lock-wait", "60s"];
        let expect_after = round % 4 < 2;
        if expect_after {
            finish(&["up", "--dir", d, "--tenant", db.name(), wait[0], wait[1]]);
            let now = state(&db).await;
            assert!(
                now == after,
                "round {round} (killed after {at:?}, as a Job: {as_job}): not exactly after: {}",
                diff(&now, &after)
            );
            let recs = records(&db).await;
            assert_eq!(recs.len(), 3, "round {round}: {recs:?}");
            assert!(recs.iter().all(|r| r.get_str("state") == Ok("applied")), "round {round}: {recs:?}");
        } else {
            finish(&["down", "--to", "0", "--dir", d, "--tenant", db.name(), wait[0], wait[1]]);
            let now = state(&db).await;
            assert!(
                now == before,
                "round {round} (killed after {at:?}, as a Job: {as_job}): not exactly before: {}",
                diff(&now, &before)
            );
            let recs = records(&db).await;
            assert!(
                recs.iter().all(|r| matches!(r.get_str("state"), Ok("rolled_back" | "failed"))),
                "round {round}: {recs:?}"
            );
        }
        let names = db.list_collection_names().await.unwrap();
        assert!(!names.iter().any(|n| n.contains("scratch")), "round {round}: scratch left: {names:?}");
        db.drop().await.unwrap();
        eprintln!(
            "round {round}: killed after {at:?} (as a Job: {as_job}), then {}",
            if expect_after { "up" } else { "down" }
        );
    }
    eprintln!("{rounds} runners killed (a run takes {full:?}); {found_interrupted} left interrupted work, undone by the next run");
    assert!(found_interrupted >= 3, "too few kills landed in the middle of a migration ({found_interrupted})");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_at_a_safe_point_and_undoes_the_migration_in_progress() {
    let dir = migrations(&[("20250102000000_split.yaml", SPLIT)]);
    let d = dir.path().to_str().unwrap();
    let db = fresh_db("sigterm").await;
    // Enough batches (250 documents each) that the signal lands in the middle.
    seed(&db, 5000).await;
    let before = state(&db).await;
    let uri = uri();
    let mut child =
        dbshift(&["up", "--dir", d, "--tenant", db.name()], &[("DBSHIFT_MONGODB_URI", uri.as_str())]).spawn().unwrap();
    // Once the migration is under way (its first batch stored)...
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let names = db.list_collection_names().await.unwrap();
        if names.iter().any(|n| n.starts_with("_dbshift_rb_")) {
            break;
        }
        assert!(Instant::now() < deadline, "the migration never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    let stopped_in = signalled.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(state(&db).await, before, "not undone: {stderr}");
    let recs = records(&db).await;
    assert_eq!(recs[0].get_str("state"), Ok("failed"));
    assert!(recs[0].get_str("error").unwrap().contains("SIGTERM"), "{:?}", recs[0]);
    let locks = db.collection::<Document>("_dbshift_lock").count_documents(doc! {}).await.unwrap();
    assert_eq!(locks, 0, "the lock was released");
    eprintln!("stopped, undone and recorded {stopped_in:?} after SIGTERM");
}

/// Inside new PID and UTS namespaces with the same hostname: both runners are PID 1 on host
/// `node-1`, as two hostNetwork pods on one node.
fn in_namespaces(dir: &str, tenant: &str) -> Child {
    let uri = uri();
    let exe = env!("CARGO_BIN_EXE_dbshift");
    let script = format!("hostname node-1 && echo pid $$ && exec {exe} up --dir {dir} --tenant {tenant}");
    Command::new("unshare")
        .args(["--pid", "--uts", "--fork", "--kill-child", "sh", "-c", &script])
        .env("DBSHIFT_MONGODB_URI", uri)
        .env("DBSHIFT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) runs")
}

async fn both_succeed_and_each_migration_lands_once(children: Vec<Child>, db: &Database) -> Vec<String> {
    let mut outs = Vec::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        outs.push(text(&o));
    }
    let recs = records(db).await;
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert!(recs.iter().all(|r| r.get_str("state") == Ok("applied")), "{recs:?}");
    let docs = dump(db, "c").await;
    assert!(
        docs.iter().all(|d| d.get_i32("v") == Ok(1)),
        "a migration applied twice: {:?}",
        docs.iter().find(|d| d.get_i32("v") != Ok(1))
    );
    outs
}

#[tokio::test(flavor = "multi_thread")]
async fn two_runners_with_the_same_hostname_and_pid_never_hold_the_lock_together() {
    if !Command::new("unshare").args(["--pid", "--uts", "--fork", "true"]).status().is_ok_and(|s| s.success()) {
        panic!("unshare --pid --uts needs root (tests/run.sh runs as root)");
    }
    let dir = migrations(FILES);
    let db = fresh_db("same_pid").await;
    seed(&db, DOCS).await;
    let d = dir.path().to_str().unwrap().to_string();
    let children = vec![in_namespaces(&d, db.name()), in_namespaces(&d, db.name())];
    let outs = both_succeed_and_each_migration_lands_once(children, &db).await;
    for o in &outs {
        assert!(o.starts_with("pid 1\n"), "not PID 1 in its namespace: {o}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_cli_runs_started_at_once_both_succeed() {
    let dir = migrations(FILES);
    let db = fresh_db("two_ci").await;
    seed(&db, DOCS).await;
    let d = dir.path().to_str().unwrap();
    let uri = uri();
    let start = || {
        dbshift(&["up", "--dir", d, "--tenant", db.name()], &[("DBSHIFT_MONGODB_URI", uri.as_str())]).spawn().unwrap()
    };
    let children = vec![start(), start()];
    both_succeed_and_each_migration_lands_once(children, &db).await;
}

/// A batch runner (`dbshift run` with `DBSHIFT_BATCH`, a Job of `tenantsPerJob` tenants)
/// SIGKILLed at moments spread across the batch. Right after the kill each tenant is one of:
/// done (its result is in its database, and it is exactly migrated), untouched (no record of
/// the run, byte for byte as before), or interrupted (a record of the run). The next batch
/// runner leaves every one exactly migrated, each migration applied once.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_killed_midway_leaves_each_tenant_done_untouched_or_for_the_next_runner() {
    let dir = migrations(FILES);
    let d = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let result = out.path().join("result.json");
    let client = client().await;
    let reference = client.database(&unique("kb_ref"));
    seed(&reference, DOCS).await;
    let before = state(&reference).await;
    let t0 = Instant::now();
    finish(&["up", "--dir", d, "--tenant", reference.name()]);
    let one = t0.elapsed();
    let after = state(&reference).await;

    let n = 4;
    let rounds = 6;
    let mut mixed = 0;
    let uri = uri();
    for round in 0..rounds {
        let dbs: Vec<Database> = (0..n).map(|i| client.database(&unique(&format!("kb{i}")))).collect();
        for db in &dbs {
            seed(db, DOCS).await;
        }
        let names: Vec<&str> = dbs.iter().map(|d| d.name()).collect();
        let batch = serde_json::to_string(&names).unwrap();
        let envs = |run: &'static str| {
            vec![
                ("DBSHIFT_MONGODB_URI", uri.clone()),
                ("DBSHIFT_BATCH", batch.clone()),
                ("DBSHIFT_DIR", d.to_string()),
                ("DBSHIFT_RUN_ID", run.to_string()),
                ("DBSHIFT_RESULT_FILE", result.to_str().unwrap().to_string()),
            ]
        };
        let e1 = envs("batch-run");
        let e1: Vec<(&str, &str)> = e1.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let started = Instant::now();
        let mut child = dbshift(&["run", "--lock-ttl", "3"], &e1).spawn().unwrap();
        // Spread over the batch by its progress, not by time (a loaded machine stretches the
        // first tenant, process start included, far more than the others): each round waits
        // for `k` tenants to report, then kills at once or a moment into the next tenant.
        let (k, into) = [(0, 0.5), (1, 0.0), (2, 0.0), (1, 0.3), (2, 0.3), (3, 0.0)][round];
        let deadline = Instant::now() + Duration::from_secs(120);
        if k == 0 {
            tokio::time::sleep(one.mul_f64(into)).await;
        } else {
            loop {
                let mut reported = 0;
                for db in &dbs {
                    reported += dbshift::job::batch::read(db, "batch-run", false).await.unwrap().is_some() as usize;
                }
                if reported >= k || child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "round {round}: the batch did not get to {k} tenants");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(one.mul_f64(into / n as f64)).await;
        }
        let at = started.elapsed();
        let _ = child.kill(); // it may have finished (the last round's kill can come after)
        child.wait().unwrap();
        let (mut done, mut untouched, mut interrupted) = (0, 0, 0);
        for db in &dbs {
            let result = dbshift::job::batch::read(db, "batch-run", false).await.unwrap();
            let mine = records(db).await.into_iter().any(|r| r.get_str("runId") == Ok("batch-run"));
            match (result, mine) {
                (Some(r), _) => {
                    assert!(r.ok, "round {round}: {r:?}");
                    assert!(state(db).await == after, "round {round}: {} reported done, not exactly after", db.name());
                    done += 1;
                }
                (None, false) => {
                    assert!(state(db).await == before, "round {round}: {} has no record, but changed", db.name());
                    untouched += 1;
                }
                (None, true) => interrupted += 1,
            }
        }
        if done > 0 && untouched > 0 {
            mixed += 1;
        }
        eprintln!(
            "round {round}: killed after {k} reported (+{into} of a tenant), at {at:?}: {done} done, {interrupted} interrupted, {untouched} untouched"
        );
        // The next batch runner (another run id, as a follow-up or a retried Job) finishes it.
        let e2 = envs("batch-next");
        let e2: Vec<(&str, &str)> = e2.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut c = dbshift(&["run", "--lock-wait", "60s"], &e2);
        c.env("DBSHIFT_LOG", "info");
        let o = c.output().unwrap();
        assert!(o.status.success(), "round {round}: {}", text(&o));
        let summary: dbshift::job::batch::BatchSummary =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
        assert_eq!((summary.ok, summary.failed, summary.not_started), (n, 0, 0), "round {round}");
        for db in &dbs {
            let now = state(db).await;
            assert!(now == after, "round {round}: {} not exactly after: {}", db.name(), diff(&now, &after));
            let recs = records(db).await;
            assert_eq!(recs.len(), 3, "round {round}: {recs:?}");
            assert!(recs.iter().all(|r| r.get_str("state") == Ok("applied")), "round {round}: {recs:?}");
            assert!(dbshift::job::batch::read(db, "batch-next", false).await.unwrap().unwrap().ok);
            db.drop().await.unwrap();
        }
    }
    assert!(mixed >= 2, "too few kills landed between tenants of the batch ({mixed} of {rounds})");
}

/// A batch stops at its first failure (the tenants after it untouched, no result), unless
/// told to keep going; a failed tenant's own changes are undone by the engine.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_stops_at_its_first_failure_unless_told_to_keep_going() {
    const UNIQUE: &str = "up:\n  - addField: { collection: c, field: flag, value: true }\n  - createIndex: { collection: c, keys: { code: 1 }, name: code_unique, unique: true }\n";
    let dir = migrations(&[("20250101000000_unique.yaml", UNIQUE)]);
    let d = dir.path().to_str().unwrap();
    let client = client().await;
    let uri = uri();
    // Keep-going also with three tenants at once (parallelPerJob): each tenant as alone.
    for (keep_going, at_once) in [(false, "1"), (true, "1"), (true, "3")] {
        let dbs: Vec<Database> = (0..3).map(|i| client.database(&unique(&format!("kf{i}")))).collect();
        for (i, db) in dbs.iter().enumerate() {
            seed(db, 20).await;
            if i == 1 {
                // Two customers share a code: the unique index fails on this tenant.
                db.collection::<Document>("c")
                    .update_one(doc! {"_id": 1}, doc! {"$set": {"code": "c0"}})
                    .await
                    .unwrap();
            }
        }
        let before: Vec<State> = futures::future::join_all(dbs.iter().map(state)).await;
        let names: Vec<&str> = dbs.iter().map(|d| d.name()).collect();
        let batch = serde_json::to_string(&names).unwrap();
        let mut envs = vec![
            ("DBSHIFT_MONGODB_URI", uri.as_str()),
            ("DBSHIFT_BATCH", batch.as_str()),
            ("DBSHIFT_DIR", d),
            ("DBSHIFT_RUN_ID", "batch-fail"),
            ("DBSHIFT_RESULT_FILE", "/nonexistent/result"),
        ];
        if keep_going {
            envs.push(("DBSHIFT_BATCH_KEEP_GOING", "true"));
        }
        envs.push(("DBSHIFT_BATCH_PARALLEL", at_once));
        let o = dbshift(&["run"], &envs).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let summary: dbshift::job::batch::BatchSummary =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
        let results: Vec<Option<bool>> =
            futures::future::join_all(dbs.iter().map(|db| async move {
                dbshift::job::batch::read(db, "batch-fail", false).await.unwrap().map(|r| r.ok)
            }))
            .await;
        assert_eq!(state(&dbs[1]).await, before[1], "the failed tenant's changes are undone");
        assert!(summary.first_failure.as_deref().unwrap().starts_with(dbs[1].name()), "{summary:?}");
        if keep_going {
            assert_eq!((summary.ok, summary.failed, summary.not_started), (2, 1, 0));
            assert_eq!(results, [Some(true), Some(false), Some(true)]);
        } else {
            assert_eq!((summary.ok, summary.failed, summary.not_started), (1, 1, 1));
            assert_eq!(results, [Some(true), Some(false), None]);
            assert_eq!(state(&dbs[2]).await, before[2], "the tenant after the failure is untouched");
            assert!(records(&dbs[2]).await.is_empty());
        }
        for db in &dbs {
            db.drop().await.unwrap();
        }
    }
}

/// A TCP proxy to the test server that can hold all traffic (a stalled network or server):
/// bytes read while held are delivered when released. Threads, so it needs no runtime.
struct Stall {
    port: u16,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Stall {
    fn to(uri: &str) -> Stall {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let target = uri.trim_start_matches("mongodb://").split(['/', '?']).next().unwrap().to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(AtomicBool::new(false));
        let h = held.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&target) else { continue };
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let held = h.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            while held.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Stall { port, held }
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    fn hold(&self, on: bool) {
        self.held.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A lock holder whose renewals stall past what it can be sure of: before its next write it
/// waits for a renewal to get through, and goes on if the lease still names it (nobody can
/// have written meanwhile); if another runner took the expired lease during the stall, it
/// stops. Before, any stall longer than 9/10 of the TTL failed the migration (CI saw it once
/// with `--lock-ttl 3` on a loaded machine).
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_lock_renewal_waits_and_goes_on_unless_another_runner_took_the_lock() {
    use dbshift::engine::lock::Lease;
    use dbshift::engine::pass::Guard;
    let stall = Stall::to(&uri());
    let through = mongodb::Client::with_uri_str(stall.uri()).await.unwrap();
    let direct = client().await;
    let ttl = Duration::from_secs(3);
    let owner_of = |db: Database| async move {
        let l = db.collection::<Document>("_dbshift_lock").find_one(doc! {}).await.unwrap();
        l.and_then(|l| l.get_str("owner").ok().map(str::to_string))
    };

    // Nobody takes it: the holder waits out the stall and goes on, still the owner.
    let name = unique("stall_kept");
    let db = through.database(&name);
    let lease = Lease::acquire(&db, "holder", "r1", ttl, Duration::ZERO).await.unwrap();
    let guard = Guard::new(Some(&lease), None);
    stall.hold(true);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!lease.standing().known(), "a renewal got through a held proxy");
    let release = tokio::spawn({
        let held = stall.held.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            held.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let t = Instant::now();
    guard.check().await.expect("the lease was still the holder's");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(700), "it did not wait for the renewal: {waited:?}");
    assert!(lease.standing().known());
    release.await.unwrap();
    assert_eq!(owner_of(direct.database(&name)).await.as_deref(), Some("holder"));
    lease.release().await.unwrap();
    direct.database(&name).drop().await.unwrap();

    // Another runner takes the expired lease during the stall: the holder stops.
    let name = unique("stall_taken");
    let db = through.database(&name);
    let lease = Lease::acquire(&db, "holder", "r1", ttl, Duration::ZERO).await.unwrap();
    let guard = Guard::new(Some(&lease), None);
    stall.hold(true);
    let other = Lease::acquire(&direct.database(&name), "other", "r2", ttl, Duration::from_secs(20)).await.unwrap();
    stall.hold(false);
    let e = guard.check().await.expect_err("the holder went on after another runner took the lock");
    assert!(e.to_string().contains("lock was lost"), "{e}");
    assert!(!lease.standing().known());
    assert_eq!(owner_of(direct.database(&name)).await.as_deref(), Some("other"));
    drop(lease);
    other.release().await.unwrap();
    direct.database(&name).drop().await.unwrap();
}
