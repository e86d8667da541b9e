//! The operator benchmark: one small migration (addField + a count check) across N tenant
//! databases (default 1,000), against one `dbshift up --tenants ... --parallel P` process
//! migrating the same number of tenants with the same migration, in the same run, on the same
//! cluster and server.
//!
//! Runs, each on freshly seeded tenants: the CLI, snapshots off and on (`up --backup`, the
//! runner's destination and retention); the operator for each shape `tenantsPerJob:parallelPerJob`
//! of DBSHIFT_BENCH_SHAPES (default `100:1,500:5`) with snapshots off, and the last shape with
//! snapshots on; and, on a smaller fleet (DBSHIFT_BENCH_TENANTS_ONE, default 200, against a CLI
//! run of that size), the default `tenantsPerJob: 1`. Each run's tenants (and snapshots) are
//! dropped after it, so every run meets a server of the same size. Reports wall time from
//! `kubectl apply` to `Succeeded` and its ratio to the CLI's, API requests per tenant (the API
//! server's own counter), the final status's bytes (and per tenant), the controller's API writes
//! and its peak memory (VmHWM, one controller process per run, up to the fleet count that
//! follows the run), and on stderr where each run's time went (Jobs created, pods running,
//! tenant results written, pods exited, Jobs finished) and its memory (sampled RSS by phase).
//!
//! Run with tests/bench/operator.sh, which starts the cluster, the database and the image.
//! Env: DBSHIFT_BENCH_KUBECONFIG, DBSHIFT_BENCH_MONGODB_URI, DBSHIFT_BENCH_RUNNER_IMAGE,
//! DBSHIFT_BENCH_TENANTS (1000), DBSHIFT_BENCH_PARALLEL (10), DBSHIFT_BENCH_SHAPES (100:1,500:5),
//! DBSHIFT_BENCH_TENANTS_ONE (200; 0 skips it), DBSHIFT_BENCH_SNAPSHOTS (1; 0 skips the runs with
//! snapshots), DBSHIFT_BENCH_DBSHIFT (the binary, default target/release/dbshift).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{watcher, WatchStreamExt};

use dbshift::crd::{DatabaseMigration, DatabaseMigrationSpec, Phase};

const MIGRATION: &str = "description: flag every customer\nup:\n  - addField: { collection: customers, field: flag, value: true }\nvalidate:\n  - count: { collection: customers, filter: { flag: { $exists: false } }, equals: 0 }\n";

fn env(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

async fn client() -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(env("DBSHIFT_BENCH_KUBECONFIG", "")).expect("kubeconfig");
    kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap()).unwrap()
}

/// Sum of `apiserver_request_total` (every request the API server answered).
async fn api_requests(c: &kube::Client) -> f64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = c.request_text(req).await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn namespace(c: &kube::Client, name: &str, uri: &str) {
    let nss: Api<Namespace> = Api::all(c.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    nss.create(&PostParams::default(), &ns).await.unwrap();
    let s: Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "mongo"}, "stringData": {"uri": uri}})).unwrap();
    Api::<Secret>::namespaced(c.clone(), name).create(&PostParams::default(), &s).await.unwrap();
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some("migrations".into()), ..Default::default() },
        data: Some(BTreeMap::from([("20250101000000_flag.yaml".to_string(), MIGRATION.to_string())])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(c.clone(), name).create(&PostParams::default(), &cm).await.unwrap();
}

async fn seed(mongo: &mongodb::Client, prefix: &str, n: usize) {
    let docs: Vec<Document> = (0..10).map(|i| doc! {"_id": i, "name": format!("customer {i}")}).collect();
    futures::stream::iter(0..n)
        .for_each_concurrent(16, |i| {
            let docs = docs.clone();
            async move {
                let db = mongo.database(&format!("{prefix}_{i:05}"));
                db.collection::<Document>("customers").drop().await.ok();
                db.collection::<Document>("customers").insert_many(docs).await.unwrap();
            }
        })
        .await;
}

/// Drop a run's tenants and snapshots, so every run meets a server of the same size.
async fn drop_fleet(mongo: &mongodb::Client, prefix: &str, n: usize) {
    futures::stream::iter(0..n)
        .for_each_concurrent(16, |i| async move {
            mongo.database(&format!("{prefix}_{i:05}")).drop().await.ok();
        })
        .await;
    mongo.database("dbshift_snapshots").drop().await.ok();
}

fn spec(prefix: &str, parallel: u32, image: &str) -> DatabaseMigrationSpec {
    serde_yaml::from_str(&format!(
        r#"
connection: {{ secretRef: {{ name: mongo }} }}
tenants: {{ pattern: "^{prefix}_" }}
migrations: {{ configMapRef: {{ name: migrations }} }}
rollout: {{ maxParallel: {parallel} }}
jobTemplate: {{ image: "{image}", imagePullPolicy: Never, hostNetwork: true }}
"#
    ))
    .unwrap()
}

/// The baseline: one CLI process migrating the tenants `^prefix_`, `parallel` at a time (with
/// `snapshots`, each snapshotted first, as the runner does).
fn cli(bin: &str, uri: &str, prefix: &str, parallel: usize, snapshots: bool) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("20250101000000_flag.yaml"), MIGRATION).unwrap();
    let start = Instant::now();
    let o = Command::new(bin)
        .args(["up", "--tenants", &format!("^{prefix}_"), "--parallel", &parallel.to_string()])
        .args(["--dir", dir.path().to_str().unwrap(), "--output", "json"])
        // The runner's default destination and retention (spec.backup).
        .args(if snapshots { &["--backup", "database:dbshift_snapshots", "--backup-retention", "3"][..] } else { &[] })
        .env("DBSHIFT_MONGODB_URI", uri)
        .env("DBSHIFT_LOG", "warn")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let took = start.elapsed();
    assert!(o.status.success(), "the CLI run failed: {}", String::from_utf8_lossy(&o.stderr));
    took
}

/// A controller process, stopped when dropped (a run that panics leaves none behind).
struct Stop(Option<std::process::Child>);

impl Stop {
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one operator run measured.
struct Run {
    secs: f64,
    requests: f64,
    status_bytes: usize,
    writes: f64,
    peak_kib: u64,
    timeline: Timeline,
    memory: Memory,
}

/// The controller's resident memory through a run, sampled every 50 ms (KiB, seconds after
/// the apply), to say where its peak comes from.
#[derive(Default)]
struct Memory {
    samples: Vec<(f64, u64)>,
    /// The controller's CPU time (user + system, clock ticks of 10 ms) at each sample.
    cpu: Vec<(f64, u64)>,
    /// When the status first counted the fleet after the run (the census that follows it).
    counted: Option<f64>,
}

impl Memory {
    fn summary(&self, succeeded: f64, first_job: f64) -> String {
        let mib = |k: u64| k as f64 / 1024.0;
        let max_in = |a: f64, b: f64| {
            self.samples.iter().filter(|(t, _)| *t >= a && *t <= b).map(|(_, k)| *k).max().unwrap_or(0)
        };
        let idle = self.samples.iter().filter(|(t, _)| *t < 0.0).map(|(_, k)| *k).max().unwrap_or(0);
        let counted = self.counted.unwrap_or(f64::NAN);
        let ticks_at = |t: f64| self.cpu.iter().filter(|(at, _)| *at <= t).map(|(_, c)| *c).max().unwrap_or(0);
        let cpu = (ticks_at(succeeded) - ticks_at(0.0)) as f64 / 100.0;
        format!(
            "controller RSS: {:.1} MiB before the apply; max {:.1} MiB until the first Job (the plan); \
             max {:.1} MiB from then to Succeeded; max {:.1} MiB from Succeeded to the fleet counted after the \
             run ({counted:.2} s); controller CPU from the apply to Succeeded {cpu:.2} s ({:.0}% of one core)",
            mib(idle),
            mib(max_in(0.0, first_job)),
            mib(max_in(first_job, succeeded)),
            mib(max_in(succeeded, f64::INFINITY)),
            100.0 * cpu / succeeded,
        )
    }
}

/// Sample `pid`'s VmRSS (KiB) and CPU time (user + system ticks) every 50 ms until `stop`,
/// times relative to `origin`.
fn sample_rss(
    pid: u32,
    origin: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(f64, u64, u64)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let kib =
                s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
            // /proc/PID/stat: after the command, field 0 is the state; utime and stime are 11 and 12.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            let tick = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            let ticks = tick(11) + tick(12);
            if let Some(k) = kib {
                out.push((origin.elapsed().as_secs_f64(), k, ticks));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        out
    })
}

/// When, after the apply, each Job and its pod were first seen in each state (by watches
/// started before the apply, so sub-second, unlike the API's one-second timestamps).
#[derive(Default)]
struct Timeline {
    created: BTreeMap<String, f64>,
    running: BTreeMap<String, f64>,
    /// The pod seen Succeeded or Failed (its runner exited and the kubelet said so).
    exited: BTreeMap<String, f64>,
    /// The Job's status counting its pod (`succeeded` or `failed`; the controller acts on its
    /// `Complete` / `Failed` condition, set with it or after it).
    finished: BTreeMap<String, f64>,
    /// The first and last tenant result written (`_dbshift_results`; batches only).
    results: Option<(f64, f64)>,
}

impl Timeline {
    /// Where the wall time went: the controller's work before the first Job, pod start-up
    /// (Job created to its pod running), the runners' work (running to exited), the Job
    /// controller's (pod exited to Job finished), and the controller's after the last Job.
    fn summary(&self, total: f64) -> String {
        let first_created = self.created.values().cloned().fold(f64::INFINITY, f64::min);
        let last_created = self.created.values().cloned().fold(0.0, f64::max);
        let last_finished = self.finished.values().cloned().fold(0.0, f64::max);
        let last_exited = self.exited.values().cloned().fold(0.0, f64::max);
        let spans = |from: &BTreeMap<String, f64>, to: &BTreeMap<String, f64>| {
            let mut v: Vec<f64> = from.iter().filter_map(|(k, a)| Some(to.get(k)? - a)).collect();
            if v.is_empty() {
                return "none seen before Succeeded".to_string();
            }
            v.sort_by(|a, b| a.total_cmp(b));
            let med = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
            let max = v.last().copied().unwrap_or(f64::NAN);
            format!("median {med:.2} s, max {max:.2} s")
        };
        let results = match self.results {
            Some((a, b)) => format!("tenant results written from {a:.2} s to {b:.2} s; "),
            None => String::new(),
        };
        // The watches stop at Succeeded: a batch run can end before its pods' exits are seen.
        let at = |m: &BTreeMap<String, f64>, v: f64, what: &str| {
            if m.is_empty() {
                format!("{what} none before Succeeded")
            } else {
                format!("{what} {v:.2} s ({} of {})", m.len(), self.created.len())
            }
        };
        format!(
            "{} Jobs; apply to first Job {first_created:.2} s; first to last Job created {:.2} s; \
             Job created to pod running: {}; pod running to pod exited: {}; pod exited to Job \
             counting it: {}; {results}{}; {}; Succeeded {total:.2} s",
            self.created.len(),
            last_created - first_created,
            spans(&self.created, &self.running),
            spans(&self.running, &self.exited),
            spans(&self.exited, &self.finished),
            at(&self.exited, last_exited, "last pod seen exited"),
            at(&self.finished, last_finished, "last Job seen counting its pod"),
        )
    }
}

/// Watch the namespace's Jobs and pods from `start` on, filling in `t`; the watches stop when
/// the returned handles are aborted.
fn watch_timeline(
    c: &kube::Client,
    ns: &str,
    start: Instant,
    t: std::sync::Arc<std::sync::Mutex<Timeline>>,
) -> [tokio::task::JoinHandle<()>; 2] {
    let jobs: Api<Job> = Api::namespaced(c.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
    let tj = t.clone();
    let on_jobs = tokio::spawn(async move {
        let mut s = Box::pin(watcher(jobs, watcher::Config::default()).default_backoff().applied_objects());
        while let Some(Ok(j)) = s.next().await {
            let now = start.elapsed().as_secs_f64();
            let name = j.metadata.name.clone().unwrap_or_default();
            let mut t = tj.lock().unwrap();
            t.created.entry(name.clone()).or_insert(now);
            let done = j.status.as_ref().is_some_and(|s| s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0) > 0);
            if done {
                t.finished.entry(name).or_insert(now);
            }
        }
    });
    let on_pods = tokio::spawn(async move {
        let mut s = Box::pin(watcher(pods, watcher::Config::default()).default_backoff().applied_objects());
        while let Some(Ok(p)) = s.next().await {
            let now = start.elapsed().as_secs_f64();
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            let running = phase.is_some_and(|p| p != "Pending");
            let exited = phase.is_some_and(|p| p == "Succeeded" || p == "Failed");
            let job = p.metadata.labels.as_ref().and_then(|l| l.get("job-name")).cloned();
            if let (true, Some(job)) = (running, job) {
                let mut t = t.lock().unwrap();
                t.running.entry(job.clone()).or_insert(now);
                if exited {
                    t.exited.entry(job).or_insert(now);
                }
            }
        }
    });
    [on_jobs, on_pods]
}

/// One operator run from apply to Succeeded, with a controller of its own.
#[allow(clippy::too_many_arguments)]
async fn operator(
    c: &kube::Client,
    mongo: &mongodb::Client,
    uri: &str,
    bin: &str,
    image: &str,
    n: usize,
    parallel: u32,
    per_job: u32,
    in_job: u32,
    snapshots: bool,
) -> Run {
    let tag = format!("{:04x}", rand::random::<u16>());
    let prefix = format!("bbo{tag}");
    seed(mongo, &prefix, n).await;
    let ns = format!("bench-op-{tag}");
    namespace(c, &ns, uri).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ctl = Command::new(bin)
        .args(["controller", "--namespace", &ns, "--no-leader-election", "--listen", &format!("127.0.0.1:{port}")])
        // The runner pods reach the server on 127.0.0.1: the node's network.
        .args(["--runner-image", image, "--job-allow", "hostNetwork"])
        .env("KUBECONFIG", env("DBSHIFT_BENCH_KUBECONFIG", ""))
        // DBSHIFT_BENCH_CONTROLLER_LOG=dbshift=debug shows each look at a running batch.
        .env("DBSHIFT_LOG", env("DBSHIFT_BENCH_CONTROLLER_LOG", "warn"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the controller");
    let mut ctl = Stop(Some(ctl));
    let metrics_url = format!("127.0.0.1:{port}");
    let get_metrics = || {
        let out = Command::new("curl").args(["-s", &format!("http://{metrics_url}/metrics")]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_metrics().is_empty() {
        assert!(Instant::now() < deadline, "the controller did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dbms: Api<DatabaseMigration> = Api::namespaced(c.clone(), &ns);
    let r1 = api_requests(c).await;
    let mut s = spec(&prefix, parallel, image);
    s.rollout.tenants_per_job = per_job;
    s.rollout.parallel_per_job = in_job;
    s.backup.enabled = snapshots;
    let dbm = DatabaseMigration::new("bench", s);
    let timeline = std::sync::Arc::new(std::sync::Mutex::new(Timeline::default()));
    let origin = Instant::now();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_rss(ctl.0.as_ref().map_or(0, |c| c.id()), origin, sampling.clone());
    let watches = watch_timeline(c, &ns, origin, timeline.clone());
    tokio::time::sleep(Duration::from_millis(500)).await; // the watches' first lists
    let start = Instant::now();
    let wall = std::time::SystemTime::now();
    dbms.create(&PostParams::default(), &dbm).await.unwrap();
    let status = loop {
        let d = dbms.get("bench").await.unwrap();
        match d.status.as_ref().and_then(|s| s.phase) {
            Some(Phase::Succeeded) => break d.status.unwrap(),
            Some(Phase::Failed | Phase::RolledBack) => panic!("the run failed: {:?}", d.status.unwrap().message),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let secs = start.elapsed().as_secs_f64();
    watches.iter().for_each(|w| w.abort());
    let requests = api_requests(c).await - r1;
    let writes = metric_sum(&get_metrics(), "dbshift_api_writes_total");
    // The controller counts the fleet right after the run (every tenant read again): its memory
    // then is part of the run's peak.
    let deadline = Instant::now() + Duration::from_secs(120);
    let counted = loop {
        let d = dbms.get("bench").await.unwrap();
        if d.status.as_ref().and_then(|s| s.fleet.as_ref()).and_then(|f| f.counted_at.as_ref()).is_some() {
            break Some(start.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let peak_kib = peak_kib(ctl.0.as_ref().map_or(0, |c| c.id()));
    sampling.store(true, std::sync::atomic::Ordering::SeqCst);
    let offset0 = start.duration_since(origin).as_secs_f64();
    let sampled = sampler.join().unwrap();
    let samples = sampled.iter().map(|(t, k, _)| (t - offset0, *k)).collect();
    let cpu = sampled.iter().map(|(t, _, c)| (t - offset0, *c)).collect();
    let memory = Memory { samples, cpu, counted };
    ctl.stop();
    let _ = Command::new("kubectl")
        .args(["--kubeconfig", &env("DBSHIFT_BENCH_KUBECONFIG", ""), "delete", "ns", &ns, "--wait=false"])
        .stdout(Stdio::null())
        .status();
    let status_bytes = serde_json::to_vec(&status).unwrap().len();
    let mut timeline = std::mem::take(&mut *timeline.lock().unwrap());
    let offset = start.duration_since(origin).as_secs_f64();
    if per_job > 1 {
        timeline.results = result_times(mongo, &prefix, n, wall).await;
    }
    drop_fleet(mongo, &prefix, n).await;
    for m in [&mut timeline.created, &mut timeline.running, &mut timeline.exited, &mut timeline.finished] {
        m.values_mut().for_each(|v| *v -= offset);
    }
    Run { secs, requests, status_bytes, writes, peak_kib, timeline, memory }
}

/// When the first and last tenant result was written, in seconds after `wall`.
async fn result_times(
    mongo: &mongodb::Client,
    prefix: &str,
    n: usize,
    wall: std::time::SystemTime,
) -> Option<(f64, f64)> {
    let at: Vec<f64> = futures::stream::iter(0..n)
        .map(|i| async move {
            let db = mongo.database(&format!("{prefix}_{i:05}"));
            let d = db.collection::<Document>(dbshift::job::batch::RESULTS).find_one(doc! {}).await.ok()??;
            let t = d.get_datetime("at").ok()?.to_system_time();
            Some(t.duration_since(wall).map(|d| d.as_secs_f64()).unwrap_or(0.0))
        })
        .buffer_unordered(16)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    let first = at.iter().cloned().fold(f64::INFINITY, f64::min);
    let last = at.iter().cloned().fold(0.0, f64::max);
    (!at.is_empty()).then_some((first, last))
}

fn peak_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // built by `cargo test --all-targets`; runs only under `cargo bench`
    }
    let n: usize = env("DBSHIFT_BENCH_TENANTS", "1000").parse().unwrap();
    let n1: usize = env("DBSHIFT_BENCH_TENANTS_ONE", "200").parse().unwrap();
    let parallel: usize = env("DBSHIFT_BENCH_PARALLEL", "10").parse().unwrap();
    // tenantsPerJob:parallelPerJob, each one run with snapshots off; the last also with them on.
    let shapes: Vec<(u32, u32)> = env("DBSHIFT_BENCH_SHAPES", "100:1,500:5")
        .split(',')
        .map(|x| {
            let (a, b) = x.split_once(':').expect("DBSHIFT_BENCH_SHAPES: tenantsPerJob:parallelPerJob,...");
            (a.trim().parse().unwrap(), b.trim().parse().unwrap())
        })
        .collect();
    let snapshots = env("DBSHIFT_BENCH_SNAPSHOTS", "1") != "0";
    let image = env("DBSHIFT_BENCH_RUNNER_IMAGE", "dbshift:bench");
    let uri = env("DBSHIFT_BENCH_MONGODB_URI", "");
    let bin = env("DBSHIFT_BENCH_DBSHIFT", "target/release/dbshift");
    let c = client().await;
    let mongo = mongodb::Client::with_uri_str(&uri).await.unwrap();

    let cli_on = |count: usize, snapshots: bool| {
        let (mongo, uri, bin) = (mongo.clone(), uri.clone(), bin.clone());
        async move {
            let prefix = format!("bbc{:04x}", rand::random::<u16>());
            seed(&mongo, &prefix, count).await;
            eprintln!("CLI: dbshift up over {count} tenants, --parallel {parallel}, snapshots {snapshots}");
            let took = cli(&bin, &uri, &prefix, parallel, snapshots);
            drop_fleet(&mongo, &prefix, count).await;
            took
        }
    };
    let base = cli_on(n, false).await.as_secs_f64();
    let base_snap = if snapshots { cli_on(n, true).await.as_secs_f64() } else { 0.0 };
    let mut rows: Vec<(String, usize, f64, Run)> = Vec::new();
    for &(per_job, in_job) in &shapes {
        eprintln!("operator: {n} tenants, tenantsPerJob {per_job}, parallelPerJob {in_job}, snapshots off");
        let r = operator(&c, &mongo, &uri, &bin, &image, n, parallel as u32, per_job, in_job, false).await;
        rows.push((format!("tenantsPerJob {per_job}, parallelPerJob {in_job}, snapshots off"), n, base, r));
    }
    if let (true, Some(&(per_job, in_job))) = (snapshots, shapes.last()) {
        eprintln!("operator: {n} tenants, tenantsPerJob {per_job}, parallelPerJob {in_job}, snapshots on");
        let r = operator(&c, &mongo, &uri, &bin, &image, n, parallel as u32, per_job, in_job, true).await;
        rows.push((format!("tenantsPerJob {per_job}, parallelPerJob {in_job}, snapshots on"), n, base_snap, r));
    }
    if n1 > 0 {
        let base1 = cli_on(n1, false).await.as_secs_f64();
        eprintln!("operator: {n1} tenants, tenantsPerJob 1, snapshots off");
        let r = operator(&c, &mongo, &uri, &bin, &image, n1, parallel as u32, 1, 1, false).await;
        rows.push(("tenantsPerJob 1 (default), snapshots off".to_string(), n1, base1, r));
    }

    println!("operator benchmark: maxParallel {parallel}; baseline: one `dbshift up --parallel {parallel}` process");
    println!("| run | tenants | CLI | operator | ratio | API requests / tenant | status bytes (/ tenant) | controller writes / tenant | controller peak |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for (name, count, cli_s, r) in &rows {
        let ratio = r.secs / cli_s;
        println!(
            "| {name} | {count} | {cli_s:.1} s | {:.1} s | {ratio:.2}x | {:.1} | {} ({:.0}) | {:.2} | {:.1} MiB |",
            r.secs,
            r.requests / *count as f64,
            r.status_bytes,
            r.status_bytes as f64 / *count as f64,
            r.writes / *count as f64,
            r.peak_kib as f64 / 1024.0
        );
        eprintln!("  {name}: {}", r.timeline.summary(r.secs));
        let first_job = r.timeline.created.values().cloned().fold(f64::INFINITY, f64::min);
        eprintln!("  {name}: {}", r.memory.summary(r.secs, first_job));
        json.push(serde_json::json!({
            "run": name, "tenants": count, "parallel": parallel, "cli_s": cli_s, "operator_s": r.secs, "ratio": ratio,
            "api_requests": r.requests, "status_bytes": r.status_bytes, "controller_writes": r.writes,
            "controller_peak_kib": r.peak_kib, "timeline": r.timeline.summary(r.secs),
            "memory": r.memory.summary(r.secs, r.timeline.created.values().cloned().fold(f64::INFINITY, f64::min)),
        }));
    }
    std::fs::write("target/bench-operator.json", serde_json::to_string_pretty(&json).unwrap()).ok();
}
