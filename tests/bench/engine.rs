//! Engine benchmark: every figure is a ratio against a baseline measured in the same run, on
//! the same server and the same data. Run it with `tests/bench/run.sh` (which installs the
//! baselines and the fast Rust build of the test server), or `cargo bench --bench engine`.
//!
//! - declarative operations vs the raw driver doing the same work in the same consistency mode
//!   (the same reads of what is kept, the same updates, the same pre-images), with the ratio to
//!   the single bare command beside it;
//! - `transform` (split a name in two) vs migrate-mongo's idiomatic cursor + bulkWrite(1000),
//!   with the peak memory of both processes;
//! - snapshot vs a raw cursor read, restore vs raw `insert_many`, of the same collections.
//!
//! Sizes: DBSHIFT_BENCH_DOCS (default 100000) and DBSHIFT_BENCH_TRANSFORM_DOCS (200000).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Document, RawDocumentBuf};
use dbshift::engine::{load_dir, runner, RunOptions, UpRequest};
use futures::TryStreamExt;
use mongodb::options::{UpdateModifications, UpdateOneModel, WriteModel};
use mongodb::{Client, Database};

/// The server process, and the data directory it must outlive.
struct Server(Child, #[allow(dead_code)] Option<tempfile::TempDir>);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> (Server, String, String) {
    let (bin, kind) = match std::env::var("SECANTUSD_RS") {
        Ok(p) if Path::new(&p).exists() => (p, "SecantusDB (Rust build)"),
        _ => {
            let home = std::env::var("HOME").unwrap_or_default();
            (
                format!("{home}/.cache/dbshift/secantus-0.7.0b3/bin/secantusd-py"),
                "SecantusDB (Python build; absolute times are slow, ratios still hold)",
            )
        }
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // The Rust build stores data with WiredTiger in a directory (it has no in-memory mode). In
    // memory (/dev/shm) where there is one: on disk, the machine's I/O made ratios swing by 20%.
    let data = bin.ends_with("-rs").then(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap()
    });
    let storage = data.as_ref().map(|d| d.path().display().to_string()).unwrap_or_else(|| ":memory:".into());
    let child = Command::new(&bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--storage-path",
            &storage,
            "--log-level",
            "WARNING",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (Server(child, data), format!("mongodb://127.0.0.1:{port}"), kind.to_string())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn seed(db: &Database, coll: &str, n: usize) {
    let c = db.collection::<Document>(coll);
    c.drop().await.unwrap();
    let mut i = 0;
    while i < n {
        let batch: Vec<Document> = (i..(i + 10_000).min(n))
            .map(|j| {
                doc! {"_id": j as i64, "name": format!("First{j} Last{j}"), "age": format!("{}", j % 90), "email": format!("user{j}@example.com"),
                "plan": if j % 3 == 0 { "pro" } else { "free" }, "visits": (j % 1000) as i32, "tags": ["a", "b"]}
            })
            .collect();
        c.insert_many(batch).await.unwrap();
        i += 10_000;
    }
}

/// Copy a collection server-side into another database (fresh data for each measurement).
async fn copy(client: &Client, from: (&str, &str), to: (&str, &str)) {
    client.database(to.0).drop().await.unwrap();
    client
        .database(from.0)
        .collection::<Document>(from.1)
        .aggregate(vec![doc! {"$out": {"db": to.0, "coll": to.1}}])
        .await
        .unwrap();
}

/// Repetitions of each measurement (DBSHIFT_BENCH_REPS, default 5); the median is reported.
fn reps() -> usize {
    env_usize("DBSHIFT_BENCH_REPS", 5).max(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Row {
    name: String,
    baseline: String,
    base_s: f64,
    ours_s: f64,
    target: String,
    pass: bool,
    note: String,
}

/// One declarative operation and what the raw driver does to match it.
struct Case {
    name: &'static str,
    /// The operation, as written in a migration file.
    op: &'static str,
    /// The documents it changes, and the top-level fields whose values it reads first.
    filter: Document,
    fields: &'static [&'static str],
    /// The update (operators or a pipeline), as one bare command and per document.
    update: UpdateModifications,
    /// The filter is run again after the pass (for documents that arrived behind the cursor).
    catch_up: bool,
}

fn cases() -> Vec<Case> {
    let convert = vec![doc! {"$set": {"age": {"$convert": {"input": "$age", "to": "int", "onError": "$age"}}}}];
    vec![
        Case {
            name: "addField",
            op: "addField: { collection: people, field: status, value: active }",
            filter: doc! {"status": {"$exists": false}},
            fields: &["status"],
            update: UpdateModifications::Document(doc! {"$set": {"status": "active"}}),
            catch_up: true,
        },
        Case {
            name: "removeField",
            op: "removeField: { collection: people, field: email }",
            filter: doc! {"email": {"$exists": true}},
            fields: &["email"],
            update: UpdateModifications::Document(doc! {"$unset": {"email": ""}}),
            catch_up: true,
        },
        Case {
            name: "renameField",
            op: "renameField: { collection: people, from: email, to: contact }",
            filter: doc! {"email": {"$exists": true}},
            fields: &["email", "contact"],
            update: UpdateModifications::Document(doc! {"$rename": {"email": "contact"}}),
            catch_up: true,
        },
        Case {
            name: "convertType",
            op: "convertType: { collection: people, field: age, from: string, to: int }",
            filter: doc! {"age": {"$type": "string"}},
            fields: &["age"],
            update: UpdateModifications::Pipeline(convert),
            catch_up: true,
        },
        Case {
            name: "updateMany",
            op: "updateMany: { collection: people, filter: { plan: pro }, update: { $inc: { visits: 1 } } }",
            filter: doc! {"plan": "pro"},
            fields: &["visits"],
            update: UpdateModifications::Document(doc! {"$inc": {"visits": 1}}),
            catch_up: false,
        },
    ]
}

/// The bare command: one `updateMany`, no pre-images, no check against concurrent writes.
async fn bare(db: &Database, c: &Case) {
    db.collection::<Document>("people").update_many(c.filter.clone(), c.update.clone()).await.unwrap();
}

/// The raw driver doing the work dbshift does, in the same consistency mode, written plainly.
/// With transactions: read the `_id`s to change in order, and per batch of 1,000 one
/// transaction that reads the batch's `_id` range (the fields to keep), runs the update once
/// over the same range, and stores the pre-images as one binary chunk. Without: read the
/// documents (the fields to keep), and per batch the chunk first, then each update by `_id`,
/// conditional on the fields read. Then the filter once more.
async fn same_work(client: &Client, db: &Database, c: &Case, transactions: bool) {
    let coll = db.collection::<RawDocumentBuf>("people");
    let store = db.collection::<Document>("raw_preimages");
    let mut projection = doc! {"_id": 1};
    for f in c.fields {
        projection.insert(*f, 1);
    }
    let ns = mongodb::Namespace { db: db.name().into(), coll: "people".into() };
    let mut cursor = coll
        .find(c.filter.clone())
        .sort(doc! {"_id": 1})
        .projection(if transactions {
            doc! {"_id": 1}
        } else {
            projection.clone()
        })
        .batch_size(1000)
        .await
        .unwrap();
    let mut chunk = 0i64;
    let mut batch: Vec<RawDocumentBuf> = Vec::with_capacity(1000);
    let chunk_of = |chunk: i64, docs: &[RawDocumentBuf]| {
        let bytes: Vec<u8> = docs.iter().flat_map(|d| d.as_bytes().to_vec()).collect();
        doc! {"_id": chunk, "count": docs.len() as i32, "bson": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes }}
    };
    loop {
        let next = cursor.try_next().await.unwrap();
        let end = next.is_none();
        batch.extend(next);
        if batch.len() < 1000 && !end {
            continue;
        }
        if batch.is_empty() {
            break;
        }
        let ids: Vec<bson::Bson> =
            batch.iter().map(|d| d.get("_id").unwrap().unwrap().to_raw_bson().try_into().unwrap()).collect();
        if transactions {
            let mut q = doc! {"_id": {"$gte": ids[0].clone(), "$lte": ids[ids.len() - 1].clone()}};
            q.extend(c.filter.clone());
            let mut s = client.start_session().await.unwrap();
            s.start_transaction().await.unwrap();
            let mut again = coll.find(q.clone()).projection(projection.clone()).session(&mut s).await.unwrap();
            let again: Vec<RawDocumentBuf> = again.stream(&mut s).try_collect().await.unwrap();
            assert_eq!(again.len(), batch.len(), "nobody else writes here");
            let r = db.collection::<Document>("people").update_many(q, c.update.clone()).session(&mut s).await.unwrap();
            assert_eq!(r.matched_count as usize, again.len());
            store.insert_one(chunk_of(chunk, &again)).session(&mut s).await.unwrap();
            s.commit_transaction().await.unwrap();
        } else {
            let models: Vec<WriteModel> = ids
                .iter()
                .zip(&batch)
                .map(|(id, read)| {
                    let mut q = doc! {"_id": id.clone()};
                    q.extend(c.filter.clone());
                    let read = Document::try_from(read.as_ref()).unwrap();
                    for f in c.fields {
                        match read.get(*f) {
                            Some(v) => q.insert(*f, doc! {"$eq": v.clone()}),
                            None => q.insert(*f, doc! {"$exists": false}),
                        };
                    }
                    let m = UpdateOneModel::builder().namespace(ns.clone()).filter(q).update(c.update.clone());
                    WriteModel::from(m.build())
                })
                .collect();
            store.insert_one(chunk_of(chunk, &batch)).await.unwrap();
            client.bulk_write(models).ordered(false).verbose_results().await.unwrap();
        }
        chunk += 1;
        batch.clear();
        if end {
            break;
        }
    }
    if c.catch_up {
        assert!(coll.find_one(c.filter.clone()).await.unwrap().is_none());
    }
}

async fn declarative(client: &Client, n: usize, rows: &mut Vec<Row>) {
    seed(&client.database("bench_seed"), "people", n).await;
    let transactions = dbshift::mongo::supports_transactions(&client.database("bench_seed")).await;
    let mode = if transactions { "a transaction per batch" } else { "no transactions" };
    for c in cases() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("20250101000000_bench.yaml"), format!("up:\n  - {}\n", c.op)).unwrap();
        let migrations = load_dir(dir.path()).unwrap();
        let (mut bare_s, mut same_s, mut ours) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps() {
            // Rotate which side goes first, so drift in the machine's state favours none.
            for k in 0..3 {
                let side = (rep + k) % 3;
                let db = client.database(["bench_bare", "bench_raw", "bench_dbshift"][side]);
                copy(client, ("bench_seed", "people"), (db.name(), "people")).await;
                let t = Instant::now();
                match side {
                    0 => bare(&db, &c).await,
                    1 => same_work(client, &db, &c, transactions).await,
                    _ => {
                        let opts = RunOptions::new(format!("bench-{rep}"));
                        let r = runner::up(&db, "bench", &migrations, &UpRequest::default(), &opts).await.unwrap();
                        assert!(r.ok, "{}: {:?}", c.name, r.error);
                    }
                }
                [&mut bare_s, &mut same_s, &mut ours][side].push(t.elapsed().as_secs_f64());
            }
        }
        let (b, w, o) = (median(bare_s), median(same_s), median(ours));
        rows.push(Row {
            name: format!("{} ({n} docs)", c.name),
            baseline: format!("raw driver, same work ({mode})"),
            base_s: w,
            ours_s: o,
            target: "<= 1.05x".into(),
            pass: o / w <= 1.05,
            note: format!("{:.2}x the bare updateMany ({b:.3} s); dbshift includes lock, record and plan", o / b),
        });
    }
}

/// Wall time and peak RSS (KiB) of a command, via GNU time.
fn timed(cmd: &mut Command) -> (f64, u64) {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let mut full = Command::new("/usr/bin/time");
    full.arg("-f").arg("%e %M").arg("-o").arg(out_file.path()).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            full.env(k, v);
        }
    }
    if let Some(d) = cmd.get_current_dir() {
        full.current_dir(d);
    }
    let t = Instant::now();
    let o = full.output().unwrap();
    let wall = t.elapsed().as_secs_f64();
    assert!(
        o.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(out_file.path()).unwrap();
    let rss = text.split_whitespace().last().and_then(|v| v.parse().ok()).unwrap_or(0);
    (wall, rss)
}

async fn transform(client: &Client, uri: &str, n: usize, rows: &mut Vec<Row>) {
    let Ok(mm) = std::env::var("MIGRATE_MONGO") else {
        println!("transform: skipped (MIGRATE_MONGO not set; tests/bench/run.sh sets it)");
        return;
    };
    seed(&client.database("bench_t_seed"), "people", n).await;
    // migrate-mongo, idiomatic: a cursor and bulkWrite batches of 1,000.
    let mm_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(mm_dir.path().join("migrations")).unwrap();
    std::fs::write(
        mm_dir.path().join("migrate-mongo-config.js"),
        format!(
            "module.exports = {{ mongodb: {{ url: '{uri}', databaseName: 'bench_t_mm', options: {{}} }}, migrationsDir: 'migrations', \
             changelogCollectionName: 'changelog', migrationFileExtension: '.js', useFileHash: false, moduleSystem: 'commonjs' }};"
        ),
    )
    .unwrap();
    std::fs::write(
        mm_dir.path().join("migrations/20250101000000-split.js"),
        r#"module.exports = {
  async up(db) {
    const people = db.collection('people');
    let ops = [];
    for await (const doc of people.find({ name: { $type: 'string' } })) {
      const [first, ...rest] = doc.name.split(' ');
      ops.push({ updateOne: { filter: { _id: doc._id }, update: { $set: { firstName: first, lastName: rest.join(' ') }, $unset: { name: '' } } } });
      if (ops.length === 1000) { await people.bulkWrite(ops, { ordered: false }); ops = []; }
    }
    if (ops.length) await people.bulkWrite(ops, { ordered: false });
  },
  async down() {}
};
"#,
    )
    .unwrap();
    let ours_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        ours_dir.path().join("20250101000000_split.yaml"),
        "up:\n  - transform:\n      collection: people\n      filter: { name: { $type: string } }\n      script: \"(doc) => { const [first, ...rest] = doc.name.split(' '); doc.firstName = first; doc.lastName = rest.join(' '); delete doc.name; return doc; }\"\n",
    )
    .unwrap();
    let (mut base, mut ours, mut base_rss, mut ours_rss) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..reps().min(3) {
        copy(client, ("bench_t_seed", "people"), ("bench_t_mm", "people")).await;
        let (w, rss) = timed(Command::new(&mm).arg("up").current_dir(mm_dir.path()));
        base.push(w);
        base_rss = base_rss.max(rss);
        copy(client, ("bench_t_seed", "people"), ("bench_t_dbshift", "people")).await;
        let (w, rss) = timed(
            Command::new(env!("CARGO_BIN_EXE_dbshift"))
                .args(["up", "--tenant", "bench_t_dbshift", "--dir"])
                .arg(ours_dir.path())
                .env("DBSHIFT_MONGODB_URI", uri),
        );
        ours.push(w);
        ours_rss = ours_rss.max(rss);
    }
    // Both did the same thing.
    let a = client
        .database("bench_t_mm")
        .collection::<Document>("people")
        .find_one(doc! {"_id": (n / 2) as i64})
        .await
        .unwrap()
        .unwrap();
    let b = client
        .database("bench_t_dbshift")
        .collection::<Document>("people")
        .find_one(doc! {"_id": (n / 2) as i64})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a, b, "migrate-mongo and dbshift disagree");
    let (b, o) = (median(base), median(ours));
    rows.push(Row {
        name: format!("transform ({n} docs)"),
        baseline: "migrate-mongo, cursor + bulkWrite(1000)".into(),
        base_s: b,
        ours_s: o,
        target: "<= 0.5x".into(),
        pass: o / b <= 0.5,
        note: format!("peak RSS: dbshift {} MiB, migrate-mongo {} MiB", ours_rss / 1024, base_rss / 1024),
    });
    rows.push(Row {
        name: "transform peak memory".into(),
        baseline: "64 MiB".into(),
        base_s: 64.0,
        ours_s: ours_rss as f64 / 1024.0,
        target: "<= 1.0x".into(),
        pass: ours_rss <= 64 * 1024,
        note: "MiB, whole dbshift process".into(),
    });
}

async fn snapshots(client: &Client, n: usize, rows: &mut Vec<Row>) {
    seed(&client.database("bench_s"), "people", n).await;
    seed(&client.database("bench_s"), "orders", n / 2).await;
    let db = client.database("bench_s");
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    let mut all: Vec<(String, Vec<RawDocumentBuf>)> = Vec::new();
    for rep in 0..reps() {
        let t = Instant::now();
        let mut docs = Vec::new();
        for c in ["orders", "people"] {
            let v: Vec<RawDocumentBuf> = db
                .collection::<RawDocumentBuf>(c)
                .find(doc! {})
                .batch_size(2000)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            docs.push((c.to_string(), v));
        }
        base.push(t.elapsed().as_secs_f64());
        if rep == 0 {
            all = docs;
        }
        let out = tempfile::tempdir().unwrap();
        let t = Instant::now();
        dbshift::backup::snapshot(&db, out.path(), &Default::default(), None).await.unwrap();
        ours.push(t.elapsed().as_secs_f64());
    }
    let (b, o) = (median(base), median(ours));
    rows.push(Row {
        name: format!("snapshot ({} docs)", n + n / 2),
        baseline: "raw cursor read".into(),
        base_s: b,
        ours_s: o,
        target: "<= 1.11x (>= 0.9x speed)".into(),
        pass: o / b <= 1.0 / 0.9,
        note: "dbshift also writes the files and hashes every document".into(),
    });
    let out = tempfile::tempdir().unwrap();
    dbshift::backup::snapshot(&db, out.path(), &Default::default(), None).await.unwrap();
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    for rep in 0..reps() {
        for side in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let target = client.database("bench_r_raw");
                target.drop().await.unwrap();
                let t = Instant::now();
                for (c, docs) in &all {
                    for chunk in docs.chunks(1000) {
                        target
                            .collection::<RawDocumentBuf>(c)
                            .insert_many(chunk.to_vec())
                            .ordered(false)
                            .await
                            .unwrap();
                    }
                }
                base.push(t.elapsed().as_secs_f64());
            } else {
                let target = client.database("bench_r_dbshift");
                target.drop().await.unwrap();
                let t = Instant::now();
                dbshift::backup::restore(&target, out.path(), &Default::default(), None).await.unwrap();
                ours.push(t.elapsed().as_secs_f64());
            }
        }
    }
    let (b, o) = (median(base), median(ours));
    rows.push(Row {
        name: format!("restore ({} docs)", n + n / 2),
        baseline: "raw insert_many(1000), from memory".into(),
        base_s: b,
        ours_s: o,
        target: "<= 1.11x (>= 0.9x speed)".into(),
        pass: o / b <= 1.0 / 0.9,
        note: "dbshift also checks the files first and reads everything back to verify".into(),
    });
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("engine benchmark: not run under `cargo test` (use tests/bench/run.sh)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (_server, uri, kind) = start_server();
        let client = Client::with_uri_str(&uri).await.unwrap();
        let n = env_usize("DBSHIFT_BENCH_DOCS", 100_000);
        let nt = env_usize("DBSHIFT_BENCH_TRANSFORM_DOCS", 200_000);
        println!("server: {kind}");
        let mut rows = Vec::new();
        let only = std::env::var("DBSHIFT_BENCH_ONLY").unwrap_or_default();
        if only.is_empty() || only.contains("declarative") {
            declarative(&client, n, &mut rows).await;
        }
        if only.is_empty() || only.contains("transform") {
            transform(&client, &uri, nt, &mut rows).await;
        }
        if only.is_empty() || only.contains("snapshot") {
            snapshots(&client, n, &mut rows).await;
        }
        println!("\n{:<32} {:<40} {:>10} {:>10} {:>8}  {:<24}", "case", "baseline", "baseline", "dbshift", "ratio", "target");
        for r in &rows {
            println!(
                "{:<32} {:<40} {:>10.3} {:>10.3} {:>7.2}x  {:<24} {}  {}",
                r.name,
                r.baseline,
                r.base_s,
                r.ours_s,
                r.ours_s / r.base_s,
                r.target,
                if r.pass { "met" } else { "MISSED" },
                r.note
            );
        }
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!({"case": r.name, "baseline": r.baseline, "baselineSeconds": r.base_s, "dbshiftSeconds": r.ours_s, "ratio": r.ours_s / r.base_s, "target": r.target, "met": r.pass, "note": r.note}))
            .collect();
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-engine.json");
        std::fs::write(&path, serde_json::to_string_pretty(&serde_json::json!({"server": kind, "results": json})).unwrap()).unwrap();
        println!("\nwritten to {}", path.display());
    });
}
