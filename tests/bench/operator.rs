//! The operator benchmark: one small migration across N tenant databases (default 1,000).
//!
//! Baseline, measured in the same run: the same Jobs (built by the same code, same image, same
//! work: snapshot, migrate, validate) created directly by a minimal driver that keeps
//! `parallel` of them running, with no operator. Then the operator does it from `kubectl apply`
//! to `Succeeded`. Reports wall times and their ratio, API requests per tenant (from the API
//! server's own counters, for both), the controller's writes per tenant state change (from its
//! metrics), and the controller's peak memory (VmHWM).
//!
//! Run with tests/bench/operator.sh, which starts the cluster, the database and the image.
//! Env: DBSHIFT_BENCH_KUBECONFIG, DBSHIFT_BENCH_MONGODB_URI, DBSHIFT_BENCH_RUNNER_IMAGE,
//! DBSHIFT_BENCH_TENANTS (1000), DBSHIFT_BENCH_PARALLEL (10), DBSHIFT_BENCH_DBSHIFT (the
//! controller binary, default target/release/dbshift).

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{watcher, WatchStreamExt};

use dbshift::controller::frozen::FrozenRun;
use dbshift::controller::jobs::{build_job, job_phase, Action, JobDefaults, JobPhase};
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

/// The baseline: the same Jobs, `parallel` at a time, from a minimal driver.
async fn baseline(c: &kube::Client, ns: &str, tenants: Vec<String>, parallel: usize, image: &str) -> Duration {
    let mut plan = FrozenRun {
        run_id: "bench-baseline".into(),
        generation: 1,
        target: Some("20250101000000".into()),
        tenants: tenants.clone(),
        canaries: 0,
        files_config_map: Some("migrations".into()),
        spec: spec("unused", parallel as u32, image),
        spec_digest: None,
    };
    plan.spec.job_template.image = Some(image.into());
    let jobs: Api<Job> = Api::namespaced(c.clone(), ns);
    let owner = OwnerReference::default();
    let make = |t: &str| {
        let mut j =
            build_job(&plan, "baseline", ns, owner.clone(), t, Action::Migrate, &JobDefaults { image: image.into() });
        j.metadata.owner_references = None;
        j
    };
    let cfg = watcher::Config::default().labels("dbshift.io/run=bench-baseline");
    let mut events = Box::pin(watcher(jobs.clone(), cfg).default_backoff().applied_objects());
    let start = Instant::now();
    let mut next = 0;
    while next < parallel.min(tenants.len()) {
        jobs.create(&PostParams::default(), &make(&tenants[next])).await.unwrap();
        next += 1;
    }
    let mut finished = HashSet::new();
    while finished.len() < tenants.len() {
        let Some(Ok(j)) = events.next().await else { continue };
        if let JobPhase::Finished(ok) = job_phase(&j) {
            assert!(ok, "baseline Job {} failed", j.metadata.name.clone().unwrap_or_default());
            if finished.insert(j.metadata.name.clone().unwrap_or_default()) && next < tenants.len() {
                jobs.create(&PostParams::default(), &make(&tenants[next])).await.unwrap();
                next += 1;
            }
        }
    }
    start.elapsed()
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
    let parallel: usize = env("DBSHIFT_BENCH_PARALLEL", "10").parse().unwrap();
    let image = env("DBSHIFT_BENCH_RUNNER_IMAGE", "dbshift:bench");
    let uri = env("DBSHIFT_BENCH_MONGODB_URI", "");
    let bin = env("DBSHIFT_BENCH_DBSHIFT", "target/release/dbshift");
    let c = client().await;
    let mongo = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let tag = format!("{:04x}", rand::random::<u16>());
    let (pa, po) = (format!("bba{tag}"), format!("bbo{tag}"));
    eprintln!("seeding 2 x {n} tenant databases");
    seed(&mongo, &pa, n).await;
    seed(&mongo, &po, n).await;
    let (nsa, nso) = (format!("bench-base-{tag}"), format!("bench-op-{tag}"));
    namespace(&c, &nsa, &uri).await;
    namespace(&c, &nso, &uri).await;

    eprintln!("baseline: {n} Jobs, {parallel} at a time, no operator");
    let tenants: Vec<String> = (0..n).map(|i| format!("{pa}_{i:05}")).collect();
    let r0 = api_requests(&c).await;
    let base = baseline(&c, &nsa, tenants, parallel, &image).await;
    let base_requests = api_requests(&c).await - r0;

    eprintln!("operator: the same through a DatabaseMigration");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut ctl = Command::new(&bin)
        .args(["controller", "--namespace", &nso, "--no-leader-election", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--runner-image", &image])
        .env("KUBECONFIG", env("DBSHIFT_BENCH_KUBECONFIG", ""))
        .env("DBSHIFT_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the controller");
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
    let dbms: Api<DatabaseMigration> = Api::namespaced(c.clone(), &nso);
    let r1 = api_requests(&c).await;
    let dbm = DatabaseMigration::new("bench", spec(&po, parallel as u32, &image));
    let start = Instant::now();
    dbms.create(&PostParams::default(), &dbm).await.unwrap();
    loop {
        let d = dbms.get("bench").await.unwrap();
        match d.status.as_ref().and_then(|s| s.phase) {
            Some(Phase::Succeeded) => break,
            Some(Phase::Failed | Phase::RolledBack) => panic!("the run failed: {:?}", d.status.unwrap().message),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    let op = start.elapsed();
    let op_requests = api_requests(&c).await - r1;
    let m = get_metrics();
    let writes = metric_sum(&m, "dbshift_api_writes_total");
    let peak = peak_kib(ctl.id());
    let _ = ctl.kill();
    let _ = ctl.wait();

    let ratio = op.as_secs_f64() / base.as_secs_f64();
    // Two state changes per tenant: started, finished.
    let writes_per_change = writes / (2.0 * n as f64);
    println!("operator benchmark: {n} tenants, maxParallel {parallel}");
    println!("| | baseline (Jobs created directly) | operator | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| wall time, apply to Succeeded | {:.1} s | {:.1} s | {ratio:.2}x | <= 1.2x |",
        base.as_secs_f64(),
        op.as_secs_f64()
    );
    println!(
        "| API requests per tenant (all clients) | {:.1} | {:.1} | {:.2}x | |",
        base_requests / n as f64,
        op_requests / n as f64,
        op_requests / base_requests
    );
    println!("| controller API writes per tenant state change | | {writes_per_change:.2} | | <= 5 |");
    println!("| controller peak memory (VmHWM) | | {:.1} MiB | | < 64 MiB |", peak as f64 / 1024.0);
    let json = serde_json::json!({
        "tenants": n, "parallel": parallel, "baseline_s": base.as_secs_f64(), "operator_s": op.as_secs_f64(),
        "ratio": ratio, "baseline_requests": base_requests, "operator_requests": op_requests,
        "writes_per_state_change": writes_per_change, "controller_peak_kib": peak,
    });
    std::fs::write("target/bench-operator.json", serde_json::to_string_pretty(&json).unwrap()).ok();
    for ns in [nsa, nso] {
        let _ = Command::new("kubectl")
            .args(["--kubeconfig", &env("DBSHIFT_BENCH_KUBECONFIG", ""), "delete", "ns", &ns, "--wait=false"])
            .stdout(Stdio::null())
            .status();
    }
}
