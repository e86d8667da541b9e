//! The operator on a real cluster: kube-apiserver, controller-manager, scheduler and a kubelet
//! running each tenant's Job in a container (containerd + runc) from the dbshift image, against
//! a real MongoDB wire server. tests/run.sh brings all of it up and sets:
//! - `DBSHIFT_TEST_KUBECONFIG`: the cluster;
//! - `DBSHIFT_TEST_MONGODB_URI`: a server the Job pods reach from the pod network (on the node's
//!   bridge address; no hostNetwork);
//! - `DBSHIFT_TEST_RUNNER_IMAGE`: the dbshift image imported into the node.
//!
//! Each test works in a namespace and tenant databases of its own, with its own controller
//! process (`dbshift controller --namespace ...`, run from the test binary's build). Every
//! namespace enforces the `restricted` Pod Security Standard, so on servers with Pod Security
//! admission (1.23+) the Jobs are admitted only if they meet it (1.20 ignores the label).

#![allow(clippy::needless_range_loop)] // tenants are numbered; indexing by number reads best

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;

use dbshift::crd::{DatabaseMigration, Phase, TenantPhase};

fn kubeconfig() -> String {
    std::env::var("DBSHIFT_TEST_KUBECONFIG")
        .expect("DBSHIFT_TEST_KUBECONFIG is not set: run tests/run.sh, which starts a local cluster")
}

fn runner_image() -> String {
    std::env::var("DBSHIFT_TEST_RUNNER_IMAGE").unwrap_or_else(|_| "dbshift:test".into())
}

async fn kube_client() -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig()).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
    kube::Client::try_from(cfg).expect("client")
}

/// One test's world: a namespace, a Secret with the URI, tenant databases, a controller.
struct Env {
    client: kube::Client,
    ns: String,
    mongo: mongodb::Client,
    prefix: String,
    controller: Option<Child>,
    /// The controller's /metrics port (127.0.0.1).
    metrics_port: u16,
    log: std::path::PathBuf,
}

const ADD_FLAG: &str = r#"
description: flag every customer
up:
  - addField: { collection: customers, field: flag, value: true }
"#;

const TOUCH_AND_UNIQUE: &str = r#"
description: count a visit, then make codes unique (fails where codes repeat)
up:
  - updateMany: { collection: customers, filter: {}, update: { $inc: { visits: 1 } } }
  - createIndex: { collection: customers, keys: { code: 1 }, name: code_unique, unique: true }
validate:
  - indexExists: { collection: customers, name: code_unique }
"#;

/// The two migrations most scenarios roll out.
const BOTH_MIGRATIONS: &[(&str, &str)] =
    &[("20250101000000_add_flag.yaml", ADD_FLAG), ("20250102000000_touch_unique.yaml", TOUCH_AND_UNIQUE)];

/// An irreversible data change: only the snapshot can undo it.
const IRREVERSIBLE: &str = r#"
description: upgrade every customer with a raw command (no rollback data)
up:
  - runCommand: { command: { update: customers, updates: [ { q: {}, u: { $set: { tier: gold } }, multi: true } ] } }
"#;

/// The server's minor version (1.x).
async fn server_minor(client: &kube::Client) -> u32 {
    client.apiserver_version().await.unwrap().minor.trim_end_matches('+').parse().unwrap()
}

/// Install the CRD as committed (server-side apply) and wait until it is served.
async fn ensure_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let minor = server_minor(client).await;
    let crd: CustomResourceDefinition = serde_json::from_value(dbshift::crd::crd_json_for(minor)).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch("databasemigrations.dbshift.io", &PatchParams::apply("dbshift-tests").force(), &Patch::Apply(&crd))
        .await
        .expect("apply the CRD");
    let cond = kube::runtime::conditions::is_crd_established();
    let wait = kube::runtime::wait::await_condition(api, "databasemigrations.dbshift.io", cond);
    tokio::time::timeout(Duration::from_secs(30), wait).await.expect("CRD established in time").unwrap();
}

impl Env {
    async fn new(name: &str) -> Env {
        let client = kube_client().await;
        ensure_crd(&client).await;
        let ns = format!("t-{name}-{:06x}", rand::random::<u32>() & 0xffffff);
        let nss: Api<Namespace> = Api::all(client.clone());
        let n: Namespace = serde_json::from_value(serde_json::json!({ "metadata": {
            "name": ns, "labels": { "pod-security.kubernetes.io/enforce": "restricted" }
        } }))
        .unwrap();
        nss.create(&PostParams::default(), &n).await.expect("namespace");
        let env = Env {
            client,
            ns: ns.clone(),
            mongo: common::client().await,
            prefix: format!("op{:06x}", rand::random::<u32>() & 0xffffff),
            controller: None,
            metrics_port: 0,
            log: std::env::temp_dir().join(format!("dbshift-controller-{ns}.log")),
        };
        env.secret("mongo", &common::uri()).await;
        env
    }

    fn tenant(&self, i: usize) -> String {
        format!("{}_t{i}", self.prefix)
    }

    async fn secret(&self, name: &str, uri: &str) {
        let s: Secret = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name }, "stringData": { "uri": uri }
        }))
        .unwrap();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&s)).await.expect("secret");
    }

    async fn migrations(&self, name: &str, files: &[(&str, &str)]) {
        let data: BTreeMap<String, String> = files.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            data: Some(data),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.ns).create(&PostParams::default(), &cm).await.unwrap();
    }

    /// Customers with unique codes, or with one repeated code when `dup`.
    async fn seed(&self, i: usize, dup: bool) {
        let db = self.mongo.database(&self.tenant(i));
        let docs: Vec<Document> = (0..20)
            .map(|n| {
                let code = if dup && n >= 18 { "dup".to_string() } else { format!("c{n}") };
                doc! { "_id": n, "name": format!("customer {n} of {i}"), "code": code, "since": bson::DateTime::from_millis(1_700_000_000_000 + n as i64) }
            })
            .collect();
        db.collection::<Document>("customers").insert_many(docs).await.unwrap();
    }

    /// `n` plain customers.
    async fn seed_many(&self, i: usize, n: i32) {
        let db = self.mongo.database(&self.tenant(i));
        let docs: Vec<Document> = (0..n).map(|n| doc! { "_id": n, "name": format!("customer {n} of {i}") }).collect();
        db.collection::<Document>("customers").insert_many(docs).await.unwrap();
    }

    async fn customers(&self, i: usize) -> Vec<Vec<u8>> {
        common::dump_bytes(&self.mongo.database(&self.tenant(i)), "customers").await
    }

    async fn docs(&self, i: usize) -> Vec<Document> {
        common::dump(&self.mongo.database(&self.tenant(i)), "customers").await
    }

    async fn indexes(&self, i: usize) -> Vec<String> {
        let db = self.mongo.database(&self.tenant(i));
        db.collection::<Document>("customers").list_index_names().await.unwrap()
    }

    /// Tracking records of a tenant: (id, state).
    async fn records(&self, i: usize) -> Vec<(String, String)> {
        let db = self.mongo.database(&self.tenant(i));
        let docs = common::dump(&db, "_dbshift_migrations").await;
        docs.iter()
            .map(|d| {
                (d.get_str("_id").unwrap_or_default().to_string(), d.get_str("state").unwrap_or_default().to_string())
            })
            .collect()
    }

    fn start_controller(&mut self) {
        self.start_controller_with(&[]);
    }

    fn start_controller_with(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        self.metrics_port = port;
        let child = Command::new(env!("CARGO_BIN_EXE_dbshift"))
            .args(["controller", "--namespace", &self.ns, "--no-leader-election"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--runner-image", &runner_image()])
            .args(extra)
            .env("KUBECONFIG", kubeconfig())
            .env("DBSHIFT_LOG", "info,kube=warn")
            .env_remove("DBSHIFT_MONGODB_URI")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the controller");
        self.controller = Some(child);
    }

    fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Each pod's phase and what its containers wait on, and every node condition that is not
    /// as it should be (a node under DiskPressure leaves every Job's pod Pending): what a timed-out
    /// test needs to say why its Jobs never finished.
    async fn pods_report(&self) -> String {
        let mut out = Vec::new();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        match pods.list(&ListParams::default()).await {
            Ok(list) => {
                for p in list {
                    let st = p.status.clone().unwrap_or_default();
                    let waiting: Vec<String> = st
                        .init_container_statuses
                        .iter()
                        .flatten()
                        .chain(st.container_statuses.iter().flatten())
                        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
                        .map(|w| {
                            format!(
                                "{} {}",
                                w.reason.clone().unwrap_or_default(),
                                w.message.clone().unwrap_or_default()
                            )
                        })
                        .collect();
                    let unscheduled: Vec<String> = st
                        .conditions
                        .iter()
                        .flatten()
                        .filter(|c| c.status != "True")
                        .map(|c| format!("{}={} {}", c.type_, c.status, c.message.clone().unwrap_or_default()))
                        .collect();
                    out.push(format!(
                        "pod {}: {} {waiting:?} {unscheduled:?}",
                        p.name_any(),
                        st.phase.unwrap_or_default()
                    ));
                }
            }
            Err(e) => out.push(format!("pods: {e}")),
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        if let Ok(list) = nodes.list(&ListParams::default()).await {
            for n in list {
                for c in n.status.and_then(|s| s.conditions).unwrap_or_default() {
                    if (c.type_ == "Ready") != (c.status == "True") {
                        out.push(format!(
                            "node {}: {}={} {}",
                            n.metadata.name.clone().unwrap_or_default(),
                            c.type_,
                            c.status,
                            c.message.unwrap_or_default()
                        ));
                    }
                }
            }
        }
        out.join("\n")
    }

    fn dbms(&self) -> Api<DatabaseMigration> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn jobs_api(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn apply(&self, yaml: &str) {
        let dbm: DatabaseMigration = serde_yaml::from_str(yaml).unwrap();
        self.dbms().create(&PostParams::default(), &dbm).await.expect("create the DatabaseMigration");
    }

    /// A DatabaseMigration over tenants `0..n` of this test (by pattern), with overrides.
    fn resource(&self, name: &str, extra: &str) -> String {
        format!(
            r#"
apiVersion: dbshift.io/v1alpha1
kind: DatabaseMigration
metadata: {{ name: {name} }}
spec:
  connection: {{ secretRef: {{ name: mongo }} }}
  tenants: {{ pattern: "^{}_t" }}
  migrations: {{ configMapRef: {{ name: migrations }} }}
  jobTemplate: {{ imagePullPolicy: Never }}
{extra}
"#,
            self.prefix
        )
    }

    /// Wait until the resource's phase satisfies `done`.
    async fn wait_for(&self, name: &str, secs: u64, done: impl Fn(&DatabaseMigration) -> bool) -> DatabaseMigration {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(d) = self.dbms().get_opt(name).await.unwrap() {
                if done(&d) {
                    return d;
                }
                if Instant::now() > deadline {
                    panic!(
                        "timed out waiting on {}/{name}; status: {}\npods and node:\n{}\ncontroller log:\n{}",
                        self.ns,
                        serde_yaml::to_string(&d.status).unwrap(),
                        self.pods_report().await,
                        self.log_tail()
                    );
                }
            } else if Instant::now() > deadline {
                panic!("{}/{name} is gone", self.ns);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_final(&self, name: &str, secs: u64) -> DatabaseMigration {
        self.wait_for(name, secs, |d| {
            let st = d.status.as_ref();
            st.and_then(|s| s.phase).is_some_and(|p| matches!(p, Phase::Succeeded | Phase::Failed | Phase::RolledBack))
                && st.and_then(|s| s.observed_generation) == d.metadata.generation
        })
        .await
    }

    /// `dbshift wait NAME` as an init container runs it; its exit code.
    fn wait_cli(&self, name: &str) -> Option<i32> {
        let out = Command::new(env!("CARGO_BIN_EXE_dbshift"))
            .args(["wait", name, "--namespace", &self.ns, "--timeout", "30"])
            .env("KUBECONFIG", kubeconfig())
            .output()
            .unwrap();
        out.status.code()
    }

    /// A `dbshift` command against the cluster (approve, suspend, resume): exit code, stdout,
    /// stderr.
    fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_dbshift"))
            .args(args)
            .args(["-n", &self.ns])
            .env("KUBECONFIG", kubeconfig())
            .output()
            .unwrap();
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        (out.status.code(), text(out.stdout), text(out.stderr))
    }

    /// `kubectl dbshift ARGS -n NS` through the real kubectl, which finds the plugin as users
    /// install it: a `kubectl-dbshift` symlink to the binary on `PATH`.
    fn kubectl_plugin(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_dbshift"), dir.path().join("kubectl-dbshift")).unwrap();
        let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("kubectl")
            .arg("dbshift")
            .args(args)
            .args(["-n", &self.ns])
            .env("PATH", path)
            .env("KUBECONFIG", kubeconfig())
            .output()
            .expect("kubectl on PATH");
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        (out.status.code(), text(out.stdout), text(out.stderr))
    }

    /// Tenants `0..n` carrying the flag ADD_FLAG sets, in order.
    async fn flagged(&self, n: usize) -> Vec<bool> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(self.docs(i).await.iter().all(|d| d.get_bool("flag") == Ok(true)));
        }
        out
    }

    async fn jobs(&self) -> Vec<Job> {
        self.jobs_api().list(&ListParams::default()).await.unwrap().items
    }

    async fn event_reasons(&self) -> Vec<String> {
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_controller();
        let _ = Command::new("kubectl")
            .args(["--kubeconfig", &kubeconfig(), "delete", "namespace", &self.ns, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn tenant_entry<'a>(d: &'a DatabaseMigration, tenant: &str) -> &'a dbshift::crd::TenantStatus {
    let st = d.status.as_ref().unwrap();
    st.tenants.iter().find(|t| t.name == tenant).unwrap_or_else(|| panic!("no status entry for {tenant}"))
}

fn ready(d: &DatabaseMigration) -> String {
    let st = d.status.as_ref().unwrap();
    st.conditions.iter().find(|c| c.type_ == "Ready").map(|c| format!("{}/{}", c.status, c.reason)).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn five_tenants_happy_path() {
    let mut env = Env::new("happy").await;
    for i in 0..5 {
        env.seed(i, false).await;
    }
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    let canary = env.tenant(3);
    env.apply(&env.resource("happy", &format!("  rollout: {{ maxParallel: 2, canaries: [{canary}] }}"))).await;
    let d = env.wait_final("happy", 240).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
    assert_eq!(ready(&d), "True/Succeeded");
    let p = st.progress.clone().unwrap();
    assert_eq!((p.total, p.succeeded, p.failed, p.summary.as_str()), (5, 5, 0, "5/5"));
    assert_eq!(st.target_version.as_deref(), Some("20250102000000"));
    for i in 0..5 {
        let docs = env.docs(i).await;
        assert_eq!(docs.len(), 20);
        assert!(docs.iter().all(|d| d.get_bool("flag") == Ok(true) && d.get_i32("visits") == Ok(1)), "tenant {i}");
        assert!(env.indexes(i).await.contains(&"code_unique".to_string()));
        let e = tenant_entry(&d, &env.tenant(i));
        assert_eq!(e.phase, TenantPhase::Succeeded);
        assert_eq!(e.applied.len(), 2, "{e:?}");
        assert_eq!(e.applied[1].documents_affected, 20);
        assert_eq!(e.to_version.as_deref(), Some("20250102000000"));
        assert_eq!(e.validation.as_ref().map(|v| (v.checks, v.passed)), Some((1, 1)));
        let b = e.backup.as_ref().unwrap_or_else(|| panic!("no backup recorded for tenant {i}: {e:?}"));
        assert_eq!(b.documents, 20, "{b:?}");
        assert!(b.location.contains("dbshift_snapshots"), "{b:?}");
        assert_eq!(env.records(i).await.len(), 2);
    }
    // The canary ran first, alone: its Job finished before any other was created.
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 5);
    let created = |t: &str| {
        let j = jobs.iter().find(|j| j.annotations().get("dbshift.io/tenant").map(String::as_str) == Some(t)).unwrap();
        j.metadata.creation_timestamp.clone().unwrap().0
    };
    let canary_job = jobs.iter().find(|j| j.annotations()["dbshift.io/tenant"] == canary).unwrap();
    let canary_end = canary_job.status.as_ref().unwrap().completion_time.clone().unwrap().0;
    for i in (0..5).filter(|&i| i != 3) {
        assert!(created(&env.tenant(i)) >= canary_end, "tenant {i} started before the canary finished");
    }
    // Nothing secret in the Job specs or the events; every transition has an event.
    let specs = serde_json::to_string(&jobs).unwrap();
    assert!(!specs.contains("mongodb://"), "a Job spec holds the URI");
    let reasons = env.event_reasons().await;
    for r in ["RunStarted", "Migrating", "TenantSucceeded", "Succeeded"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} event in {reasons:?}");
    }
    assert_eq!(reasons.iter().filter(|r| *r == "TenantSucceeded").count(), 5);
    // An application's init container would now be released.
    assert_eq!(env.wait_cli("happy"), Some(0));
}

/// Four tenants, one at a time; the second one's codes repeat, so its second migration fails
/// half-way (after the `$inc`, at the unique index) and the engine undoes that migration.
async fn failing_tenant(policy: &str) -> (Env, DatabaseMigration, Vec<Vec<Vec<u8>>>) {
    let mut env = Env::new(&format!("fail-{policy}")).await;
    for i in 0..4 {
        env.seed(i, i == 1).await;
    }
    let mut before = Vec::new();
    for i in 0..4 {
        before.push(env.customers(i).await);
    }
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    env.apply(&env.resource("fail", &format!("  rollout: {{ maxParallel: 1, onFailure: {policy} }}"))).await;
    let d = env.wait_final("fail", 300).await;
    (env, d, before)
}

fn migrated(docs: &[Document]) -> bool {
    docs.iter().all(|d| d.get_bool("flag") == Ok(true) && d.get_i32("visits") == Ok(1))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_failure_under_rollback_restores_every_tenant() {
    let (env, d, before) = failing_tenant("rollback").await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::RolledBack), "{:?}\n{}", st.message, env.log_tail());
    assert_eq!(ready(&d), "False/RolledBack");
    for i in 0..4 {
        assert_eq!(env.customers(i).await, before[i], "tenant {i} is not exactly as before");
        assert!(!env.indexes(i).await.contains(&"code_unique".to_string()));
    }
    assert_eq!(tenant_entry(&d, &env.tenant(0)).phase, TenantPhase::RolledBack);
    assert_eq!(tenant_entry(&d, &env.tenant(1)).phase, TenantPhase::RolledBack);
    assert_eq!(tenant_entry(&d, &env.tenant(2)).phase, TenantPhase::Skipped);
    assert!(tenant_entry(&d, &env.tenant(1)).error.as_deref().unwrap_or_default().contains("code_unique"));
    assert!(env.records(0).await.iter().all(|(_, s)| s == "rolled_back"), "{:?}", env.records(0).await);
    assert!(env.records(2).await.is_empty());
}

/// A migration that fails (exit 1: undone) is not retried even where backoffLimit allows it:
/// the Job's podFailurePolicy fails it at once (1.26+). Kubernetes 1.20 drops the policy and
/// retries up to backoffLimit; each retry finds the same failure and undoes it, and the tenant
/// ends the same.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_failed_migration_fails_its_job_at_once_whatever_the_backoff_limit() {
    let mut env = Env::new("podfailure").await;
    env.seed(0, true).await;
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    let yaml = env
        .resource("fail", "  rollout: { onFailure: halt }")
        .replace("jobTemplate: { imagePullPolicy: Never }", "jobTemplate: { imagePullPolicy: Never, backoffLimit: 2 }");
    env.apply(&yaml).await;
    let d = env.wait_final("fail", 300).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Failed), "{:?}\n{}", st.message, env.log_tail());
    let t0 = env.docs(0).await;
    assert!(t0.iter().all(|d| d.get_bool("flag") == Ok(true) && !d.contains_key("visits")), "the failed one undone");
    assert!(tenant_entry(&d, &env.tenant(0)).error.as_deref().unwrap_or_default().contains("code_unique"));
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    let failed = job.status.as_ref().and_then(|s| s.failed).unwrap_or(0);
    let reason = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Failed" && c.status == "True"))
        .and_then(|c| c.reason.clone())
        .unwrap_or_default();
    let minor = server_minor(&env.client).await;
    if minor >= 26 {
        assert!(job.spec.as_ref().unwrap().pod_failure_policy.is_some(), "the server keeps the policy");
        assert_eq!((failed, reason.as_str()), (1, "PodFailurePolicy"), "one pod, failed by the policy");
    } else {
        assert!(job.spec.as_ref().unwrap().pod_failure_policy.is_none(), "1.{minor} drops the policy");
        assert_eq!((failed, reason.as_str()), (3, "BackoffLimitExceeded"), "retried up to backoffLimit");
    }
}

/// A real Prometheus (Debian's `prometheus`), scraping one controller every second and
/// evaluating the chart's alert rules (charts/dbshift/files/alerts.yaml, the run deadline set to
/// 1 s), killed with its test.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16, namespace: &str) -> Prometheus {
        let bin = which("prometheus").expect("prometheus is not installed (tests/support/cluster/install.sh node)");
        let dir = tempfile::tempdir().unwrap();
        let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/dbshift/files/alerts.yaml"))
            .unwrap()
            .replace("RUN_DEADLINE_SECONDS", "1");
        std::fs::write(dir.path().join("alerts.yaml"), rules).unwrap();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [alerts.yaml]\n\
             scrape_configs:\n  - job_name: dbshift\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n\
             \x20       labels: {{ namespace: {namespace}, pod: controller }}\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .current_dir(dir.path())
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus { child, port, _dir: dir }
    }

    /// An instant query's result vector (`/api/v1/query`).
    async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let q = percent_encoding::utf8_percent_encode(q, percent_encoding::NON_ALPHANUMERIC);
        let Ok(mut sock) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else { return Vec::new() };
        // HTTP/1.0: a whole body, never chunked.
        let req = format!("GET /api/v1/query?query={q} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        sock.read_to_string(&mut out).await.unwrap();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_ne!(v["status"], "error", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query's single sample, waiting up to `secs` for `ok` to hold.
    async fn wait_for(&self, q: &str, secs: u64, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.query(q).await;
            let v = r.first().and_then(|s| s["value"][1].as_str()).and_then(|v| v.parse::<f64>().ok());
            if let Some(v) = v.filter(|v| ok(*v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "{q}: {r:?} after {secs} s");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The controller's metrics, scraped by a real Prometheus through a failing run: the series
/// the alerts and the dashboard read are there with the run's figures, the chart's alerts for a
/// failed run and for a run past its deadline fire, and every dashboard query answers.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_real_prometheus_scrapes_the_controller_and_the_chart_alerts_fire() {
    let mut env = Env::new("prometheus").await;
    for i in 0..2 {
        env.seed(i, i == 1).await;
    }
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    let prom = Prometheus::start(env.metrics_port, &env.ns);
    // Scraped before anything happens: the counters start at 0, so the failure is an increase.
    prom.wait_for(r#"dbshift_runs_total{result="Failed"}"#, 60, |v| v == 0.0).await;
    env.apply(&env.resource("fail", "  rollout: { maxParallel: 1, onFailure: halt }")).await;
    let d = env.wait_final("fail", 300).await;
    assert_eq!(d.status.unwrap().phase, Some(Phase::Failed));
    prom.wait_for(r#"dbshift_runs_total{result="Failed"}"#, 30, |v| v == 1.0).await;
    prom.wait_for(r#"dbshift_tenant_runs_total{outcome="Succeeded"}"#, 30, |v| v == 1.0).await;
    prom.wait_for(r#"dbshift_tenant_runs_total{outcome="Failed"}"#, 30, |v| v == 1.0).await;
    prom.wait_for("dbshift_tenant_duration_seconds_count", 30, |v| v == 2.0).await;
    prom.wait_for(r#"sum(dbshift_api_writes_total{reason="job"})"#, 30, |v| v >= 2.0).await;
    let firing = r#"ALERTS{alertname="DbshiftRunFailed", alertstate="firing"}"#;
    prom.wait_for(firing, 30, |v| v == 1.0).await;
    // The run went on for seconds, past the 1 s deadline given to the rule, and its series is
    // gone now that it ended.
    let stuck = format!(
        r#"max_over_time(ALERTS{{alertname="DbshiftRunStuck", resource="fail", resource_namespace="{}"}}[10m])"#,
        env.ns
    );
    prom.wait_for(&stuck, 30, |v| v == 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !prom.query("dbshift_run_started_timestamp_seconds").await.is_empty() {
        assert!(Instant::now() < deadline, "the run's start series stays after its end");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(prom.query(r#"ALERTS{alertname="DbshiftRollbackFailed"}"#).await.is_empty());
    // Every dashboard query is one Prometheus answers, and the run's figures are in them.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/dbshift/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut answered = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let q = t["expr"].as_str().unwrap().replace("$__rate_interval", "10m");
            answered += usize::from(!prom.query(&q).await.is_empty());
        }
    }
    assert!(answered >= 6, "{answered} dashboard queries returned series");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_failure_under_halt_stops_the_rollout() {
    let (env, d, before) = failing_tenant("halt").await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Failed), "{:?}\n{}", st.message, env.log_tail());
    assert!(migrated(&env.docs(0).await), "tenant 0 keeps its migration");
    // Tenant 1: the first migration stays, the failed one was undone by the engine.
    let t1 = env.docs(1).await;
    assert!(t1.iter().all(|d| d.get_bool("flag") == Ok(true) && !d.contains_key("visits")));
    assert_eq!(env.records(1).await.iter().filter(|(_, s)| s == "applied").count(), 1);
    for i in 2..4 {
        assert_eq!(env.customers(i).await, before[i], "tenant {i} was not to be touched");
        assert_eq!(tenant_entry(&d, &env.tenant(i)).phase, TenantPhase::Skipped);
    }
    assert_eq!(st.progress.as_ref().unwrap().failed, 1);
    // `dbshift wait` gives up on a failed run instead of holding the application forever.
    assert_eq!(env.wait_cli("fail"), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_failure_under_continue_migrates_the_others() {
    let (env, d, _) = failing_tenant("continue").await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Failed), "{:?}\n{}", st.message, env.log_tail());
    for i in [0, 2, 3] {
        assert!(migrated(&env.docs(i).await), "tenant {i}");
        assert_eq!(tenant_entry(&d, &env.tenant(i)).phase, TenantPhase::Succeeded);
    }
    assert_eq!(tenant_entry(&d, &env.tenant(1)).phase, TenantPhase::Failed);
    let p = st.progress.unwrap();
    assert_eq!((p.succeeded, p.failed), (3, 1));
}

/// A transform slow enough on 5,000 documents (50 per batch) that a pod can be evicted in the
/// middle of it.
const UPPER: &str = r#"
up:
  - transform:
      collection: customers
      batchSize: 50
      script: |
        (d) => { d.name = d.name.toUpperCase(); return d; }
"#;

/// Three tenants, one at a time. While tenant 1's migration runs (its record says `applying`),
/// its pod is evicted through the Eviction API, as a node drain does: the runner gets SIGTERM,
/// stops at a safe point, undoes the migration, records it and exits. The policy decides the rest.
///
/// Kubernetes before 1.26 (no Job tracking finalizers) does not count a deleted pod as a
/// failure: the Job starts another pod at once, which waits for the tenant's lock while the
/// first undoes, then migrates it. There the tenant ends migrated exactly once and every
/// policy sees a success: checked here, and `None` is returned.
async fn evicted_tenant(policy: &str) -> Option<(Env, DatabaseMigration, Vec<Vec<Vec<u8>>>)> {
    let mut env = Env::new(&format!("evict-{policy}")).await;
    let mut before = Vec::new();
    for i in 0..3 {
        env.seed_many(i, if i == 1 { 5000 } else { 20 }).await;
        before.push(env.customers(i).await);
    }
    env.migrations("migrations", &[("20250101000000_upper.yaml", UPPER)]).await;
    env.start_controller();
    env.apply(&env.resource("evict", &format!("  rollout: {{ maxParallel: 1, onFailure: {policy} }}"))).await;
    let records = env.mongo.database(&env.tenant(1)).collection::<Document>("_dbshift_migrations");
    let deadline = Instant::now() + Duration::from_secs(240);
    while records.count_documents(doc! {"state": "applying"}).await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "tenant 1 never started migrating\n{}", env.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let lp = ListParams::default().labels(&format!("dbshift.io/tenant={}", env.tenant(1)));
    let pod = pods.list(&lp).await.unwrap().items.into_iter().next().expect("tenant 1's pod");
    pods.evict(&pod.name_any(), &kube::api::EvictParams::default()).await.expect("evict");
    let d = env.wait_final("evict", 300).await;
    let minor = server_minor(&env.client).await;
    if minor < 26 {
        let st = d.status.clone().unwrap();
        assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
        for i in 0..3 {
            assert!(upper(&env.docs(i).await), "tenant {i} is migrated");
            assert_eq!(env.records(i).await.len(), 1, "tenant {i}: one record");
            assert_eq!(env.records(i).await[0].1, "applied");
        }
        let t1 = common::dump(&env.mongo.database(&env.tenant(1)), "_dbshift_migrations").await;
        // The second pod changed every document from the original: the first one's work was undone.
        assert_eq!(t1[0].get_i64("documentsAffected"), Ok(5000), "{t1:?}");
        return None;
    }
    // The evicted tenant undid its own migration and says why.
    assert_eq!(env.customers(1).await, before[1], "tenant 1 is not exactly as before\n{}", env.log_tail());
    let rec = common::dump(&env.mongo.database(&env.tenant(1)), "_dbshift_migrations").await;
    assert!(rec.iter().all(|r| r.get_str("state") == Ok("failed")), "{rec:?}");
    assert!(rec[0].get_str("error").unwrap_or_default().contains("SIGTERM"), "{rec:?}");
    let locks = common::dump(&env.mongo.database(&env.tenant(1)), "_dbshift_lock").await;
    assert!(locks.is_empty(), "the lock was released: {locks:?}");
    Some((env, d, before))
}

fn upper(docs: &[Document]) -> bool {
    !docs.is_empty() && docs.iter().all(|d| d.get_str("name").is_ok_and(|n| n.starts_with("CUSTOMER")))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn an_evicted_pod_under_halt_leaves_its_tenant_as_before_and_stops() {
    let Some((env, d, before)) = evicted_tenant("halt").await else { return };
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Failed), "{:?}\n{}", st.message, env.log_tail());
    assert!(upper(&env.docs(0).await), "tenant 0 keeps its migration");
    assert_eq!(tenant_entry(&d, &env.tenant(0)).phase, TenantPhase::Succeeded);
    let t1 = tenant_entry(&d, &env.tenant(1));
    assert_eq!(t1.phase, TenantPhase::Failed);
    assert!(t1.error.as_deref().unwrap_or_default().contains("SIGTERM"), "{t1:?}");
    assert_eq!(env.customers(2).await, before[2], "tenant 2 was not to be touched");
    assert_eq!(tenant_entry(&d, &env.tenant(2)).phase, TenantPhase::Skipped);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn an_evicted_pod_under_continue_leaves_its_tenant_as_before_and_migrates_the_others() {
    let Some((env, d, _)) = evicted_tenant("continue").await else { return };
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Failed), "{:?}\n{}", st.message, env.log_tail());
    for i in [0, 2] {
        assert!(upper(&env.docs(i).await), "tenant {i}");
        assert_eq!(tenant_entry(&d, &env.tenant(i)).phase, TenantPhase::Succeeded);
    }
    assert_eq!(tenant_entry(&d, &env.tenant(1)).phase, TenantPhase::Failed);
    let p = st.progress.unwrap();
    assert_eq!((p.succeeded, p.failed), (2, 1));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn an_evicted_pod_under_rollback_leaves_every_tenant_as_before() {
    let Some((env, d, before)) = evicted_tenant("rollback").await else { return };
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::RolledBack), "{:?}\n{}", st.message, env.log_tail());
    for i in 0..3 {
        assert_eq!(env.customers(i).await, before[i], "tenant {i} is not exactly as before");
    }
    assert_eq!(tenant_entry(&d, &env.tenant(0)).phase, TenantPhase::RolledBack);
    assert_eq!(tenant_entry(&d, &env.tenant(2)).phase, TenantPhase::Skipped);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_rollback_through_the_snapshot_is_byte_identical() {
    let mut env = Env::new("snap").await;
    for i in 0..3 {
        env.seed(i, i == 2).await;
    }
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(env.customers(i).await);
    }
    env.migrations(
        "migrations",
        &[("20250101000000_gold.yaml", IRREVERSIBLE), ("20250102000000_touch_unique.yaml", TOUCH_AND_UNIQUE)],
    )
    .await;
    env.start_controller();
    env.apply(&env.resource("snap", "  rollout: { maxParallel: 1, onFailure: rollback }")).await;
    let d = env.wait_final("snap", 300).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::RolledBack), "{:?}\n{}", st.message, env.log_tail());
    for i in 0..3 {
        assert_eq!(env.customers(i).await, before[i], "tenant {i} differs from before the run");
        let e = tenant_entry(&d, &env.tenant(i));
        assert!(e.rollback.as_deref().unwrap_or_default().contains("snapshot"), "tenant {i}: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_controller_killed_at_random_moments_applies_nothing_twice() {
    let mut env = Env::new("kill").await;
    for i in 0..6 {
        env.seed(i, false).await;
    }
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.apply(&env.resource("kill", "  rollout: { maxParallel: 2 }")).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut kills = 0;
    loop {
        env.start_controller();
        let d = env.dbms().get("kill").await.unwrap();
        if d.status.as_ref().and_then(|s| s.phase) == Some(Phase::Succeeded) {
            break;
        }
        assert!(Instant::now() < deadline, "no success after {kills} kills\n{}", env.log_tail());
        if kills < 8 {
            tokio::time::sleep(Duration::from_millis(300 + rand::random::<u64>() % 3000)).await;
            env.kill_controller();
            kills += 1;
        } else {
            env.wait_final("kill", 240).await;
        }
    }
    let d = env.wait_final("kill", 60).await;
    assert_eq!(d.status.as_ref().unwrap().phase, Some(Phase::Succeeded), "{}", env.log_tail());
    for i in 0..6 {
        // `$inc` applied twice would show 2.
        assert!(migrated(&env.docs(i).await), "tenant {i}: {:?}", env.docs(i).await.first());
        let recs = env.records(i).await;
        assert_eq!(recs.len(), 2, "tenant {i}: {recs:?}");
        assert!(recs.iter().all(|(_, s)| s == "applied"));
    }
    assert_eq!(env.jobs().await.len(), 6, "one Job per tenant");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn an_invalid_spec_is_reported_and_touches_nothing() {
    let mut env = Env::new("invalid").await;
    env.seed(0, false).await;
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller();
    let yaml = env.resource("bad", "").replace(&format!("^{}_t", env.prefix), "^tenant_(");
    env.apply(&yaml).await;
    let d = env.wait_final("bad", 60).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(ready(&d), "False/InvalidSpec");
    assert!(st.message.unwrap().contains("spec.tenants.pattern"));
    assert!(st.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True"));
    assert!(env.jobs().await.is_empty());
    assert!(env.records(0).await.is_empty());

    // A jobTemplate asking for a privileged pod: refused, naming the field; no Job, no change.
    let before = env.customers(0).await;
    let yaml = env.resource("privileged", "").replace(
        "jobTemplate: { imagePullPolicy: Never }",
        "jobTemplate: { imagePullPolicy: Never, securityContext: { runAsUser: 1000, privileged: true } }",
    );
    env.apply(&yaml).await;
    let d = env.wait_final("privileged", 60).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(ready(&d), "False/JobTemplateRefused");
    let msg = st.message.unwrap();
    assert!(msg.contains("spec.jobTemplate.securityContext.privileged") && msg.contains("jobPolicy.allow"), "{msg}");
    assert!(env.jobs().await.is_empty());
    assert_eq!(env.customers(0).await, before);
}

/// The operator's policy allows hostNetwork, the namespace's Pod Security level does not: the
/// run is blocked before anything is created, with admission's reason (servers with Pod
/// Security admission, 1.25+; 1.20 admits the pod).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_namespace_refusing_the_runner_pods_blocks_the_run_at_once() {
    let mut env = Env::new("podrefused").await;
    let minor = server_minor(&env.client).await;
    if minor < 25 {
        eprintln!("no Pod Security admission on 1.{minor}: nothing to refuse");
        return;
    }
    env.seed(0, false).await;
    let before = env.customers(0).await;
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller_with(&["--job-allow", "hostNetwork"]);
    let yaml = env.resource("hostnet", "").replace(
        "jobTemplate: { imagePullPolicy: Never }",
        "jobTemplate: { imagePullPolicy: Never, hostNetwork: true }",
    );
    env.apply(&yaml).await;
    let d = env
        .wait_for("hostnet", 60, |d| {
            d.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == "PodRefused"))
        })
        .await;
    let st = d.status.clone().unwrap();
    assert_eq!(ready(&d), "False/PodRefused");
    assert_eq!(st.phase, Some(Phase::Pending), "retried: the namespace's labels may change");
    let msg = st.message.unwrap();
    assert!(msg.contains("violates PodSecurity") && msg.contains("hostNetwork"), "{msg}");
    assert!(env.jobs().await.is_empty(), "no Job");
    let cms = Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns).list(&ListParams::default()).await.unwrap();
    let names: Vec<String> =
        cms.items.iter().map(|c| c.name_any()).filter(|n| n.contains("-plan") || n.contains("-files")).collect();
    assert!(names.is_empty(), "no run ConfigMap: {names:?}");
    assert!(env.event_reasons().await.contains(&"PodRefused".to_string()));
    assert_eq!(env.customers(0).await, before);
    assert!(env.records(0).await.is_empty());
}

/// The cross-field rules, at admission on 1.25+ (the CRD's CEL rules: `kubectl apply` fails,
/// naming the field, and nothing is stored) and by the controller on older servers (stored,
/// then `InvalidSpec` naming the same field, and no Job).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn cross_field_rules_are_checked_at_admission_or_by_the_controller() {
    let mut env = Env::new("cel").await;
    env.seed(0, false).await;
    let before = env.customers(0).await;
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller();
    let t0 = env.tenant(0);
    let pattern = format!("tenants: {{ pattern: \"^{}_t\" }}", env.prefix);
    let base = env.resource("x", "");
    let cases = [
        (
            "two-sources",
            base.replace(
                "configMapRef: { name: migrations }",
                "configMapRef: { name: migrations }, inline: { a.yaml: x }",
            ),
            "spec.migrations must set exactly one",
        ),
        ("no-tenants", base.replace(&pattern, "tenants: { exclude: [x] }"), "spec.tenants selects nothing"),
        ("admin", base.replace(&pattern, "tenants: { names: [admin] }"), "spec.tenants"),
        (
            "canary",
            base.replace(&pattern, &format!("tenants: {{ names: [{t0}] }}\n  rollout: {{ canaries: [other] }}")),
            "spec.rollout.canaries",
        ),
        (
            "destinations",
            base.replace(
                "jobTemplate:",
                "backup: { destination: { database: snaps, persistentVolumeClaim: { claimName: c } } }\n  jobTemplate:",
            ),
            "spec.backup.destination",
        ),
    ];
    let cel = server_minor(&env.client).await >= dbshift::crd::FIRST_WITH_CEL;
    for (name, yaml, field) in cases {
        let yaml = yaml.replace("metadata: { name: x }", &format!("metadata: {{ name: {name} }}"));
        let dbm: DatabaseMigration = serde_yaml::from_str(&yaml).unwrap();
        let created = env.dbms().create(&PostParams::default(), &dbm).await;
        if cel {
            match created {
                Err(kube::Error::Api(e)) => {
                    assert_eq!(e.code, 422, "{name}: {e:?}");
                    assert!(e.message.contains(field), "{name}: the message names {field}: {}", e.message);
                }
                other => panic!("{name}: admitted: {other:?}"),
            }
            assert!(env.dbms().get_opt(name).await.unwrap().is_none(), "{name}: nothing stored");
        } else {
            created.unwrap_or_else(|e| panic!("{name}: {e}"));
            let d = env.wait_final(name, 60).await;
            assert_eq!(ready(&d), "False/InvalidSpec", "{name}");
            let msg = d.status.unwrap().message.unwrap_or_default();
            assert!(msg.contains(field), "{name}: the status names {field}: {msg}");
        }
    }
    assert!(env.jobs().await.is_empty());
    assert_eq!(env.customers(0).await, before);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_malformed_migration_file_is_reported_with_its_line() {
    let mut env = Env::new("malformed").await;
    env.seed(0, false).await;
    let before = env.customers(0).await;
    let broken = "description: broken\nup:\n  - addField: { collection: customers, field: flag }\n  - frobnicate: {}\n";
    env.migrations("migrations", &[("20250101000000_broken.yaml", broken)]).await;
    env.start_controller();
    env.apply(&env.resource("broken", "")).await;
    let d = env.wait_final("broken", 60).await;
    let st = d.status.clone().unwrap();
    assert_eq!(ready(&d), "False/InvalidMigrations");
    let msg = st.message.unwrap();
    assert!(msg.contains("20250101000000_broken.yaml:"), "{msg}");
    assert!(env.jobs().await.is_empty());
    assert_eq!(env.customers(0).await, before);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn mongodb_unreachable_waits_and_recovers() {
    let mut env = Env::new("unreachable").await;
    env.seed(0, false).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    env.secret("mongo", &format!("mongodb://127.0.0.1:{closed}/?serverSelectionTimeoutMS=1000")).await;
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller();
    env.apply(&env.resource("down", "")).await;
    let d = env
        .wait_for("down", 90, |d| {
            d.status.as_ref().and_then(|s| s.message.as_deref()).is_some_and(|m| m.contains("reach"))
        })
        .await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Pending));
    assert_eq!(ready(&d), "False/MongoUnreachable");
    assert!(st.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "False"));
    assert!(env.jobs().await.is_empty());
    // The server comes back (here: the Secret is fixed); the run proceeds by itself.
    env.secret("mongo", &common::uri()).await;
    let d = env.wait_final("down", 180).await;
    assert_eq!(d.status.unwrap().phase, Some(Phase::Succeeded));
    assert!(env.docs(0).await.iter().all(|d| d.get_bool("flag") == Ok(true)));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn deleting_mid_run_lets_the_running_job_finish_and_starts_no_other() {
    let mut env = Env::new("delete").await;
    for i in 0..3 {
        env.seed(i, false).await;
    }
    let before2 = env.customers(2).await;
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller();
    env.apply(&env.resource("del", "  rollout: { maxParallel: 1 }")).await;
    env.wait_for("del", 120, |d| d.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.running == 1))
        .await;
    env.dbms().delete("del", &DeleteParams::default()).await.unwrap();
    // Held by the finalizer while its Job runs, then gone.
    let deadline = Instant::now() + Duration::from_secs(120);
    while env.dbms().get_opt("del").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the resource was never released\n{}", env.log_tail());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let migrated_count = {
        let mut n = 0;
        for i in 0..3 {
            if env.docs(i).await.iter().all(|d| d.get_bool("flag") == Ok(true)) {
                n += 1;
            }
        }
        n
    };
    assert!(migrated_count <= 2, "at most the running tenant (and one launched with it) finished");
    assert!(migrated_count >= 1, "the running Job was allowed to finish");
    assert_eq!(env.customers(2).await, before2, "the last tenant was never started");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_dry_run_writes_nothing() {
    let mut env = Env::new("dry").await;
    for i in 0..2 {
        env.seed(i, false).await;
    }
    let mut before = Vec::new();
    for i in 0..2 {
        before.push(env.customers(i).await);
    }
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller();
    env.apply(&env.resource("dry", "  dryRun: true\n  rollout: { maxParallel: 2 }")).await;
    let d = env.wait_final("dry", 180).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}", st.message);
    assert!(st.message.unwrap().contains("dry run"));
    for i in 0..2 {
        assert_eq!(env.customers(i).await, before[i]);
        let names = env.mongo.database(&env.tenant(i)).list_collection_names().await.unwrap();
        assert_eq!(names, vec!["customers".to_string()], "tenant {i} gained collections");
    }
    let snaps = env.mongo.database("dbshift_snapshots").list_collection_names().await.unwrap();
    assert!(!snaps.iter().any(|n| n.contains(&env.prefix)), "a dry run took a snapshot: {snaps:?}");
    // An application waiting on it is not released against an unmigrated database.
    assert_eq!(env.wait_cli("dry"), Some(1));
}

/// A file's pre-check (`unique` on the codes, `onPrecheckFailure: skip`) finds the tenant whose
/// codes repeat before anything changes: its Job leaves it untouched (no tracking record, no
/// snapshot) and it ends Skipped with the failed check in its status entry and an Event; the
/// others migrate, and the run succeeds.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_tenant_failing_a_precheck_is_skipped_untouched() {
    let mut env = Env::new("precheck").await;
    for i in 0..3 {
        env.seed(i, i == 1).await;
    }
    let before = env.customers(1).await;
    let file = format!(
        "{TOUCH_AND_UNIQUE}precheck:\n  - unique: {{ collection: customers, keys: {{ code: 1 }} }}\nonPrecheckFailure: skip\n"
    );
    env.migrations("migrations", &[("20250102000000_touch_unique.yaml", &file)]).await;
    env.start_controller();
    env.apply(&env.resource("pre", "  rollout: { maxParallel: 2 }")).await;
    let d = env.wait_final("pre", 240).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
    assert!(
        st.message.as_deref().unwrap().contains("2/3 tenant(s) migrated, 1 skipped by pre-checks"),
        "{:?}",
        st.message
    );
    let p = st.progress.clone().unwrap();
    assert_eq!((p.succeeded, p.skipped, p.failed, p.pending), (2, 1, 0, 0));
    let e = tenant_entry(&d, &env.tenant(1));
    assert_eq!(e.phase, TenantPhase::Skipped);
    let pre = e.precheck.clone().unwrap();
    assert_eq!((pre.checks, pre.passed), (1, 0));
    assert!(pre.failed[0].contains("value(s) of code repeat"), "{pre:?}");
    assert!(e.backup.is_none(), "a snapshot was taken of a skipped tenant");
    assert_eq!(env.customers(1).await, before, "the skipped tenant changed");
    let colls = env.mongo.database(&env.tenant(1)).list_collection_names().await.unwrap();
    assert_eq!(colls, vec!["customers".to_string()], "tracking or rollback data on the skipped tenant");
    for i in [0, 2] {
        assert!(env.indexes(i).await.contains(&"code_unique".to_string()), "tenant {i}");
        assert_eq!(tenant_entry(&d, &env.tenant(i)).precheck.as_ref().map(|p| p.passed), Some(1));
    }
    assert!(env.event_reasons().await.iter().any(|r| r == "TenantSkipped"));
}

/// `spec.rollout.windows`: outside every window the run freezes but starts no Job (phase
/// Waiting, `status.nextWindowStart` the next opening, in UTC here); a window covering now,
/// set on the live resource, lets the same run go on.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_run_outside_its_maintenance_windows_waits_for_the_next() {
    let mut env = Env::new("window").await;
    for i in 0..2 {
        env.seed(i, false).await;
    }
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller();
    // A daily window opening in two hours (UTC), for an hour.
    let now = k8s_openapi::jiff::Timestamp::now();
    let hhmm = |t: k8s_openapi::jiff::Timestamp| t.strftime("%H:%M").to_string();
    let opens = now + k8s_openapi::jiff::SignedDuration::from_hours(2);
    let closes = now + k8s_openapi::jiff::SignedDuration::from_hours(3);
    let window = |start: &str, end: &str| {
        format!("{{ days: [Mon, Tue, Wed, Thu, Fri, Sat, Sun], start: \"{start}\", end: \"{end}\", timeZone: UTC }}")
    };
    let rollout = format!("  rollout: {{ maxParallel: 2, windows: [{}] }}", window(&hhmm(opens), &hhmm(closes)));
    env.apply(&env.resource("win", &rollout)).await;
    let d = env.wait_for("win", 120, |d| phase(d) == Some(Phase::Waiting)).await;
    let st = d.status.clone().unwrap();
    let next = st.next_window_start.clone().expect("nextWindowStart").0;
    let expected = opens.strftime("%Y-%m-%dT%H:%M").to_string();
    assert_eq!(next.strftime("%Y-%m-%dT%H:%M").to_string(), expected, "{:?}", st.message);
    assert!(st.message.as_deref().unwrap().contains("outside the maintenance windows"), "{:?}", st.message);
    assert_eq!(ready(&d), "False/Waiting");
    assert!(env.jobs().await.is_empty(), "a Job started outside the window");
    assert_eq!(env.flagged(2).await, [false, false]);
    let run = st.run_id.clone().unwrap();

    // Open all day: the same run goes on.
    let patch = serde_json::json!({ "spec": { "rollout": { "windows": [
        { "days": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], "start": "00:00", "end": "24:00" }
    ] } } });
    env.dbms().patch("win", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let d = env.wait_final("win", 180).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
    assert_eq!(st.run_id.as_deref(), Some(run.as_str()), "a window change started a new run");
    assert!(st.next_window_start.is_none());
    assert_eq!(env.flagged(2).await, [true, true]);
}

/// `spec.tenants.baseline`: a tenant with no tracking record (created from a current schema)
/// is baselined to that version by its Job and gets only what came after; a tenant with a
/// history is migrated as usual.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_new_tenant_is_baselined_not_replayed() {
    let mut env = Env::new("baseline").await;
    for i in 0..2 {
        env.seed(i, false).await;
    }
    // Tenant 1 has a history: the first migration, applied by dbshift from a laptop.
    let dir = common::migrations(BOTH_MIGRATIONS);
    let o = common::cli(
        &["up", "--to", "20250101000000", "--dir", dir.path().to_str().unwrap(), "--tenant", &env.tenant(1)],
        &[("DBSHIFT_MONGODB_URI", &common::uri())],
    );
    assert!(o.status.success(), "{}", common::text(&o));
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    let spec = format!(
        "  tenants: {{ pattern: \"^{}_t\", baseline: \"20250101000000\" }}\n  rollout: {{ maxParallel: 2 }}",
        env.prefix
    );
    // The resource's own tenants block replaces the default one.
    let yaml = env.resource("base", &spec).replace(&format!("  tenants: {{ pattern: \"^{}_t\" }}\n", env.prefix), "");
    env.apply(&yaml).await;
    let d = env.wait_final("base", 240).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
    let states = |r: Vec<(String, String)>| r.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
    assert_eq!(states(env.records(0).await), ["baselined", "applied"]);
    assert_eq!(states(env.records(1).await), ["applied", "applied"]);
    let new = env.docs(0).await;
    assert!(
        new.iter().all(|d| d.get("flag").is_none() && d.get_i32("visits") == Ok(1)),
        "tenant 0 replayed migration 1"
    );
    assert!(migrated(&env.docs(1).await));
    assert_eq!(tenant_entry(&d, &env.tenant(0)).from_version.as_deref(), Some("20250101000000"));
}

/// `spec.mode: continuous`: after its run, the resource follows its tenants. Tenants that
/// appear (one new, one migrated halfway by hand) get a follow-up run of their own with the
/// same rules; one whose migration fails there is held, not retried at every resync; the
/// status counts tenants per version and the drifted ones, in `kubectl get dbm` too.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_continuous_resource_follows_new_and_behind_tenants() {
    let mut env = Env::new("follow").await;
    for i in 0..2 {
        env.seed(i, false).await;
    }
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    let spec = "  mode: continuous\n  resyncInterval: 10s\n  rollout: { maxParallel: 2, onFailure: continue }";
    env.apply(&env.resource("fol", spec)).await;
    let d = env.wait_final("fol", 240).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
    let root = st.run_id.clone().unwrap();
    // The census after the run: both at the target.
    let d = env
        .wait_for("fol", 60, |d| d.status.as_ref().and_then(|s| s.fleet.as_ref()).is_some_and(|f| f.tenants == 2))
        .await;
    let f = d.status.unwrap().fleet.unwrap();
    assert_eq!((f.at_target, f.behind, f.held, f.drifted), (2, 0, 0, 0), "{f:?}");
    assert_eq!(f.versions.iter().map(|v| (v.version.as_str(), v.tenants)).collect::<Vec<_>>(), [("20250102000000", 2)]);
    assert!(f.next_resync.is_some());

    // Three tenants appear: one migrated to the first version from a laptop, one new, one new
    // whose codes repeat (the unique index fails there).
    for i in 2..5 {
        env.seed(i, i == 4).await;
    }
    let dir = common::migrations(BOTH_MIGRATIONS);
    let o = common::cli(
        &["up", "--to", "20250101000000", "--dir", dir.path().to_str().unwrap(), "--tenant", &env.tenant(2)],
        &[("DBSHIFT_MONGODB_URI", &common::uri())],
    );
    assert!(o.status.success(), "{}", common::text(&o));
    let untouched: Vec<Vec<Vec<u8>>> = vec![env.customers(0).await, env.customers(1).await];
    let follow = format!("{root}-f1");
    let d = env
        .wait_for("fol", 300, |d| {
            let st = d.status.as_ref();
            st.and_then(|s| s.run_id.as_deref()) == Some(follow.as_str())
                && st.and_then(|s| s.phase).is_some_and(Phase::is_final)
        })
        .await;
    let st = d.status.clone().unwrap();
    // The follow-up migrated only the three, each under the same rules as the first run.
    let prog = st.progress.clone().unwrap();
    assert_eq!((prog.total, prog.succeeded, prog.failed), (3, 2, 1), "{:?}", st.message);
    assert_eq!(st.phase, Some(Phase::Failed));
    let states = |r: Vec<(String, String)>| r.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
    assert_eq!(states(env.records(2).await), ["applied", "applied"]);
    assert!(migrated(&env.docs(2).await) && migrated(&env.docs(3).await));
    assert_eq!(states(env.records(4).await), ["applied", "failed"]);
    assert_eq!(vec![env.customers(0).await, env.customers(1).await], untouched, "the first run's tenants");
    let jobs = env.jobs().await;
    let of_follow = jobs.iter().filter(|j| j.labels().get("dbshift.io/run") == Some(&follow)).count();
    assert_eq!(of_follow, 3);

    // The next counts: the failed tenant is held, and no second follow-up starts for it.
    let finished = st.finished_at.clone().unwrap().0;
    let d = env
        .wait_for("fol", 90, |d| {
            d.status
                .as_ref()
                .and_then(|s| s.fleet.as_ref())
                .and_then(|f| f.counted_at.as_ref())
                .is_some_and(|t| t.0.duration_since(finished).as_secs() >= 12)
        })
        .await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.run_id.as_deref(), Some(follow.as_str()), "no follow-up for a held tenant");
    let f = st.fleet.unwrap();
    assert_eq!((f.tenants, f.at_target, f.behind, f.held), (5, 4, 1, 1), "{f:?}");
    assert_eq!(
        f.versions.iter().map(|v| (v.version.as_str(), v.tenants)).collect::<Vec<_>>(),
        [("20250102000000", 4), ("20250101000000", 1)]
    );
    assert_eq!(f.summary, "4/5 at target, 1 behind (1 held)");
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig(), "get", "dbm", "fol", "-n", &env.ns])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("FLEET") && table.contains("4/5 at target"), "{table}");

    // A tenant changed by hand: its index dropped. The next count finds it drifted.
    env.mongo.database(&env.tenant(0)).collection::<Document>("customers").drop_index("code_unique").await.unwrap();
    let d = env
        .wait_for("fol", 60, |d| d.status.as_ref().and_then(|s| s.fleet.as_ref()).is_some_and(|f| f.drifted == 1))
        .await;
    assert!(d.status.unwrap().fleet.unwrap().summary.ends_with("1 drifted"));
    assert!(env.event_reasons().await.contains(&"TenantsDrifted".to_string()));
    assert_eq!(env.dbms().get("fol").await.unwrap().status.unwrap().run_id.as_deref(), Some(follow.as_str()));
}

/// `spec.rollout.tenantsPerJob: 2`: the canary alone, then Jobs of two tenants each, at most
/// `maxParallel` Jobs at once. A failure inside a batch is that tenant's (under `continue` the
/// batch goes on); every tenant's result reaches the status from its own database.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn batches_of_tenants_per_job_report_each_tenant() {
    let mut env = Env::new("batch").await;
    for i in 0..5 {
        env.seed(i, i == 3).await;
    }
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    let rollout = format!(
        "  rollout: {{ maxParallel: 2, canaries: [{}], tenantsPerJob: 2, onFailure: continue }}",
        env.tenant(0)
    );
    env.apply(&env.resource("bat", &rollout)).await;
    let d = env.wait_final("bat", 300).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Failed), "{:?}\n{}", st.message, env.log_tail());
    let p = st.progress.clone().unwrap();
    assert_eq!((p.total, p.succeeded, p.failed, p.skipped), (5, 4, 1, 0), "{:?}", st.message);
    // Three Jobs: the canary, then (1, 2) and (3, 4).
    let jobs = env.jobs().await;
    let mut firsts: Vec<String> =
        jobs.iter().map(|j| j.annotations().get("dbshift.io/tenant").cloned().unwrap_or_default()).collect();
    firsts.sort();
    assert_eq!(firsts, [env.tenant(0), env.tenant(1), env.tenant(3)]);
    let states = |r: Vec<(String, String)>| r.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
    for i in [0, 1, 2, 4] {
        assert_eq!(states(env.records(i).await), ["applied", "applied"], "tenant {i}");
        assert!(migrated(&env.docs(i).await), "tenant {i}");
        let e = tenant_entry(&d, &env.tenant(i));
        assert_eq!(e.phase, dbshift::crd::TenantPhase::Succeeded, "tenant {i}: {e:?}");
        assert_eq!(e.applied.len(), 2, "tenant {i}: the result from its database: {e:?}");
        assert_eq!(e.validation.as_ref().map(|v| (v.checks, v.passed)), Some((1, 1)), "tenant {i}");
        assert!(e.backup.as_ref().is_some_and(|b| b.documents == 20), "tenant {i}: {e:?}");
    }
    assert_eq!(states(env.records(3).await), ["applied", "failed"]);
    let failed = tenant_entry(&d, &env.tenant(3));
    assert_eq!(failed.phase, dbshift::crd::TenantPhase::Failed);
    assert!(
        failed.error.as_deref().is_some_and(|e| e.contains("code_unique") || e.contains("duplicate")),
        "{failed:?}"
    );
    // Both tenants of a batch name its Job.
    assert_eq!(tenant_entry(&d, &env.tenant(4)).job, failed.job);
    // Every runner pod is let go (a batch's while it still ran, once its tenants all reported):
    // none keeps the controller's finalizer, whether the run ended before or after it exited.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: Vec<String> = pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| p.finalizers().iter().any(|f| f == "dbshift.io/runner-result"))
            .map(|p| p.name_any())
            .collect();
        if held.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "pods still held by the controller: {held:?}\n{}", env.log_tail());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reasons = env.event_reasons().await;
    assert!(
        reasons.contains(&"TenantsFailed".to_string()) && reasons.contains(&"TenantsSucceeded".to_string()),
        "{reasons:?}"
    );
}

fn phase(d: &DatabaseMigration) -> Option<Phase> {
    d.status.as_ref().and_then(|s| s.phase)
}

/// `spec.rollout.approval: afterCanaries`: the canary migrates, then the run waits for a
/// person (phase AwaitingApproval, Ready=False naming the run, an Event) with no other Job; an
/// approval naming another run changes nothing; `dbshift approve` lets the others go.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_run_held_for_approval_goes_on_when_dbshift_approve_names_it() {
    let mut env = Env::new("approve").await;
    for i in 0..3 {
        env.seed(i, false).await;
    }
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller();
    let canary = env.tenant(0);
    let rollout = format!("  rollout: {{ maxParallel: 2, canaries: [{canary}], approval: afterCanaries }}");
    env.apply(&env.resource("gate", &rollout)).await;
    let d = env.wait_for("gate", 180, |d| phase(d) == Some(Phase::AwaitingApproval)).await;
    let st = d.status.clone().unwrap();
    let run = st.run_id.clone().unwrap();
    assert_eq!(ready(&d), "False/AwaitingApproval");
    let cond = |t: &str| st.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
    assert!(cond("Ready").message.contains(&run), "{:?}", cond("Ready"));
    assert_eq!(cond("Reconciling").status, "False", "a run waiting for a person is not reconciling");
    assert_eq!(env.flagged(3).await, [true, false, false], "only the canary ran");
    assert_eq!(env.jobs().await.len(), 1);
    assert!(env.event_reasons().await.iter().any(|r| r == "AwaitingApproval"));
    // As a platform team sees it, through kubectl's plugin mechanism.
    let (code, table, err) = env.kubectl_plugin(&["status", "gate"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(table.contains(&format!("{}/gate: AwaitingApproval, 1/3 tenant(s), run {run}", env.ns)), "{table}");
    assert!(table.lines().any(|l| l.starts_with(&canary) && l.contains("Succeeded")), "{table}");
    let (_, json, _) = env.kubectl_plugin(&["status", "gate", "-o", "json"]);
    let obj: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(obj["status"]["phase"], "AwaitingApproval");
    assert_eq!(obj["kind"], "DatabaseMigration");

    // What the approver looked at is what they approve: another run id approves nothing.
    let (code, _, err) = env.cli(&["approve", "gate", "--run", "gate-g7-other"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("the current run of {}/gate is {run}", env.ns)), "{err}");
    // An annotation naming another run (a stale approval) is ignored.
    let stale = serde_json::json!({ "metadata": { "annotations": { "dbshift.io/approve": "gate-g0-stale" } } });
    env.dbms().patch("gate", &PatchParams::default(), &Patch::Merge(&stale)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let d = env.dbms().get("gate").await.unwrap();
    assert_eq!(phase(&d), Some(Phase::AwaitingApproval));
    assert_eq!(env.jobs().await.len(), 1);
    assert_eq!(env.flagged(3).await, [true, false, false]);

    let (code, out, err) = env.cli(&["approve", "gate"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("approved run {run} of {}/gate (it was AwaitingApproval)", env.ns)), "{out}");
    let (code, out, err) = env.kubectl_plugin(&["wait", "gate", "--timeout", "180"]);
    assert_eq!(code, Some(0), "kubectl dbshift wait: {out}{err}");
    let d = env.wait_final("gate", 30).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
    assert_eq!(st.run_id.as_deref(), Some(run.as_str()), "the approval started no new run");
    // `-o json` prints the resource as the wait saw it last, and nothing else on stdout.
    let (code, json, err) = env.kubectl_plugin(&["wait", "gate", "--timeout", "30", "-o", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let obj: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(obj["status"]["phase"], "Succeeded");
    assert_eq!(env.flagged(3).await, [true, true, true]);
    assert_eq!(env.jobs().await.len(), 3);
    assert_eq!(d.annotations().get("dbshift.io/approve"), Some(&run));
    let (code, _, err) = env.cli(&["approve", "gate"]);
    assert_eq!(code, Some(2), "a finished run has nothing to approve: {err}");
    assert!(err.contains("is over (Succeeded)"), "{err}");
}

/// `dbshift suspend` mid-run: the running Job finishes, no other starts (phase Suspended,
/// tenants not reached untouched); `dbshift resume` goes on in the same run. Suspending and
/// resuming a finished run starts nothing either.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_run_held_by_suspend_starts_no_job_until_resumed() {
    let mut env = Env::new("suspend").await;
    for i in 0..4 {
        env.seed(i, false).await;
    }
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    env.start_controller();
    env.apply(&env.resource("pause", "  rollout: { maxParallel: 1 }")).await;
    let d = env
        .wait_for("pause", 120, |d| d.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.running == 1))
        .await;
    let run = d.status.unwrap().run_id.unwrap();
    let (code, out, err) = env.cli(&["suspend", "pause"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let d = env
        .wait_for("pause", 120, |d| {
            phase(d) == Some(Phase::Suspended)
                && d.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.running == 0)
        })
        .await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.run_id.as_deref(), Some(run.as_str()));
    assert_eq!(st.observed_generation, d.metadata.generation, "the suspension is observed, in the same run");
    assert_eq!(ready(&d), "False/Suspended");
    // The Job running when it was suspended finished (and at most the one started just before
    // the suspension was seen); nothing more starts.
    let started = env.jobs().await.len();
    assert!((1..=2).contains(&started), "{started} Jobs");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(env.jobs().await.len(), started, "a Job started while suspended");
    let flags = env.flagged(4).await;
    assert_eq!(flags.iter().filter(|f| **f).count(), started, "{flags:?}");
    assert_eq!(env.cli(&["suspend", "pause"]).1.trim(), format!("{}/pause is already suspended", env.ns));

    let (code, out, err) = env.kubectl_plugin(&["resume", "pause", "-o", "json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let said: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((said["action"].as_str(), said["name"].as_str()), (Some("resume"), Some("pause")), "{out}");
    let d = env.wait_final("pause", 180).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
    assert_eq!(st.run_id.as_deref(), Some(run.as_str()), "resuming started no new run");
    assert_eq!(env.flagged(4).await, [true; 4]);
    assert_eq!(env.jobs().await.len(), 4);
    assert!(!d.spec.suspend && st.observed_generation == Some(3));

    // A finished run, suspended and resumed: observed, nothing runs again.
    for verb in ["suspend", "resume"] {
        assert_eq!(env.cli(&[verb, "pause"]).0, Some(0));
    }
    let d = env.wait_for("pause", 60, |d| d.status.as_ref().and_then(|s| s.observed_generation) == Some(5)).await;
    assert_eq!(d.status.unwrap().run_id.as_deref(), Some(run.as_str()));
    assert_eq!(env.jobs().await.len(), 4);
}

/// The controller as users run it: installed from the Helm chart (rendered by tests/run.sh into
/// `DBSHIFT_TEST_CHART_MANIFEST`, release `e2e` in namespace `dbshift-e2e`, watching only that
/// namespace), running in a pod of the cluster with its chart RBAC and a leader Lease.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn the_controller_installed_from_the_chart_migrates_in_the_cluster() {
    let manifest = std::env::var("DBSHIFT_TEST_CHART_MANIFEST")
        .expect("DBSHIFT_TEST_CHART_MANIFEST is not set: run tests/run.sh, which renders the chart");
    let client = kube_client().await;
    ensure_crd(&client).await;
    let ns = "dbshift-e2e";
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig(), "apply", "--server-side", "--force-conflicts", "-f", &manifest])
        .output()
        .unwrap();
    assert!(out.status.success(), "installing the chart: {}", String::from_utf8_lossy(&out.stderr));
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = deployments
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|d| d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0) >= 1);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "the controller Deployment never became ready");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // It holds its Lease.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), ns);
    let held = leases
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .any(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).is_some_and(|h| h.starts_with("e2e-")));
    assert!(held, "no Lease held by the controller pod");

    let mongo = common::client().await;
    let prefix = format!("e2e{:06x}", rand::random::<u32>() & 0xffffff);
    for i in 0..3 {
        let docs: Vec<Document> = (0..10).map(|n| doc! {"_id": n, "code": format!("c{n}")}).collect();
        mongo.database(&format!("{prefix}_t{i}")).collection::<Document>("customers").insert_many(docs).await.unwrap();
    }
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "mongo" }, "stringData": { "uri": common::uri() }
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch("mongo", &PatchParams::apply("test").force(), &Patch::Apply(&secret))
        .await
        .unwrap();
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta { name: Some(format!("{prefix}-migrations")), ..Default::default() },
        data: Some(BTreeMap::from([("20250101000000_add_flag.yaml".to_string(), ADD_FLAG.to_string())])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), ns).create(&PostParams::default(), &cm).await.unwrap();
    let dbm: DatabaseMigration = serde_yaml::from_str(&format!(
        r#"
apiVersion: dbshift.io/v1alpha1
kind: DatabaseMigration
metadata: {{ name: {prefix} }}
spec:
  connection: {{ secretRef: {{ name: mongo }} }}
  tenants: {{ pattern: "^{prefix}_t" }}
  migrations: {{ configMapRef: {{ name: {prefix}-migrations }} }}
  rollout: {{ maxParallel: 2 }}
  jobTemplate: {{ imagePullPolicy: Never }}
"#
    ))
    .unwrap();
    let dbms: Api<DatabaseMigration> = Api::namespaced(client.clone(), ns);
    dbms.create(&PostParams::default(), &dbm).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let d = loop {
        let d = dbms.get(&prefix).await.unwrap();
        if d.status.as_ref().and_then(|s| s.phase).is_some_and(|p| matches!(p, Phase::Succeeded | Phase::Failed)) {
            break d;
        }
        assert!(Instant::now() < deadline, "no result: {:?}", d.status);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(d.status.as_ref().unwrap().phase, Some(Phase::Succeeded), "{:?}", d.status);
    for i in 0..3 {
        let docs = common::dump(&mongo.database(&format!("{prefix}_t{i}")), "customers").await;
        assert!(docs.iter().all(|d| d.get_bool("flag") == Ok(true)), "tenant {i}");
    }
    // The in-cluster controller did it: its log names the run.
    let logs = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig(), "-n", ns, "logs", "deployment/e2e-dbshift", "--tail=200"])
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains(&prefix) && logs.contains("run starts"), "controller logs:\n{logs}");
    assert!(!logs.contains("mongodb://"), "the URI leaked into the logs");
    // Uninstall the controller (the CRD stays: other tests use it).
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig(), "-n", ns, "delete", "deployment", "e2e-dbshift", "--wait=true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A leader whose clock is an hour behind keeps renewing its Lease (its renewTime always lies
/// in the past): a follower must not take it over, because what counts is that the record
/// changes, seen on the follower's own clock. Once the renewals stop, it takes over within
/// the Lease's duration (plus one poll).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_leader_with_a_skewed_clock_keeps_its_lease() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    let env = Env::new("skew").await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let skewed = || MicroTime(Timestamp::now() - SignedDuration::from_hours(1));
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "skewed" },
        "spec": { "holderIdentity": "leader-behind", "leaseDurationSeconds": 3, "renewTime": skewed() }
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let renewing = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(700)).await;
                let mut l = leases.get("skewed").await.unwrap();
                l.spec.as_mut().unwrap().renew_time = Some(skewed());
                let _ = leases.replace("skewed", &PostParams::default(), &l).await;
            }
        })
    };
    let follower =
        dbshift::controller::lease::Elector::new(leases.clone(), "skewed", "follower", Duration::from_secs(3));
    let took = tokio::time::timeout(Duration::from_secs(9), follower.acquire()).await;
    assert!(took.is_err(), "the follower took the Lease of a leader that keeps renewing");
    assert_eq!(leases.get("skewed").await.unwrap().spec.unwrap().holder_identity.as_deref(), Some("leader-behind"));
    renewing.abort();
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), follower.acquire()).await.expect("taken over once renewals stop");
    assert!(t.elapsed() >= Duration::from_secs(2), "taken over before the Lease's duration: {:?}", t.elapsed());
    assert_eq!(leases.get("skewed").await.unwrap().spec.unwrap().holder_identity.as_deref(), Some("follower"));
}

/// Two controllers with leader election on one Lease: only the leader acts; when it dies, the
/// other takes over and finishes the run without applying anything twice.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn leader_election_hands_over_when_the_leader_dies() {
    let env = Env::new("leader").await;
    for i in 0..4 {
        env.seed(i, false).await;
    }
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    let start = |who: &str| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!("dbshift-{}-{who}.log", env.ns))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_dbshift"))
            .args(["controller", "--namespace", &env.ns, "--lease-namespace", &env.ns, "--lease-seconds", "6"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--runner-image", &runner_image()])
            .env("KUBECONFIG", kubeconfig())
            .env("POD_NAME", who)
            .env("DBSHIFT_LOG", "info,kube=warn")
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut a = start("replica-a");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = start("replica-b");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let holder = || async { leases.get_opt("dbshift-controller").await.unwrap().and_then(|l| l.spec?.holder_identity) };
    assert_eq!(holder().await.as_deref(), Some("replica-a"));
    env.apply(&env.resource("lead", "  rollout: { maxParallel: 1 }")).await;
    env.wait_for("lead", 120, |d| {
        d.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.succeeded >= 1)
    })
    .await;
    let _ = a.kill();
    let _ = a.wait();
    let d = env.wait_final("lead", 180).await;
    assert_eq!(holder().await.as_deref(), Some("replica-b"));
    assert_eq!(d.status.as_ref().unwrap().phase, Some(Phase::Succeeded), "{:?}", d.status);
    for i in 0..4 {
        assert!(migrated(&env.docs(i).await), "tenant {i}");
        assert_eq!(env.records(i).await.len(), 2);
    }
    let _ = b.kill();
    let _ = b.wait();
}

/// Tenants from a registry collection (plus names, minus exclusions), resolved on the server.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn tenants_resolve_from_a_registry_collection() {
    let mongo = common::client().await;
    let reg = common::unique("registry");
    let docs = vec![
        doc! {"_id": 1, "database": "tenant_r1", "active": true},
        doc! {"_id": 2, "database": "tenant_r2", "active": false},
        doc! {"_id": 3, "database": "tenant_r3", "active": true},
    ];
    mongo.database(&reg).collection::<Document>("tenants").insert_many(docs).await.unwrap();
    let yaml = format!(
        "connection: {{ secretRef: {{ name: m }} }}\ntenants: {{ names: [tenant_x], exclude: [tenant_r3], registry: {{ database: {reg}, collection: tenants, filter: {{ active: true }} }} }}\nmigrations: {{ inline: {{}} }}"
    );
    let dbm = DatabaseMigration::new("r", serde_yaml::from_str(&yaml).unwrap());
    let conn = dbshift::controller::inputs::connect(&common::uri(), Duration::from_secs(5)).await.unwrap();
    let t = dbshift::controller::inputs::resolve_tenants(&dbm, &conn).await.unwrap();
    assert_eq!(t, vec!["tenant_r1".to_string(), "tenant_x".to_string()]);
    // A registry entry that is not a database name is an error naming the registry.
    mongo.database(&reg).collection::<Document>("tenants").insert_one(doc! {"_id": 4, "active": true}).await.unwrap();
    let e = dbshift::controller::inputs::resolve_tenants(&dbm, &conn).await.unwrap_err();
    assert!(e.permanent && e.message.contains("tenants"), "{e}");
}

/// Migration sets larger than a ConfigMap come in an image: an init container copies them
/// from the image (anything with `cp`, here busybox) into a volume the runner reads.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn migrations_from_an_image_are_copied_in_by_an_init_container() {
    let cluster = std::env::var("DBSHIFT_TEST_CLUSTER_DIR")
        .expect("DBSHIFT_TEST_CLUSTER_DIR is not set: run tests/run.sh, which starts the cluster");
    let mut env = Env::new("image").await;
    env.seed(0, false).await;
    let dir = common::migrations(&[("20250101000000_add_flag.yaml", ADD_FLAG)]);
    let file = dir.path().join("20250101000000_add_flag.yaml");
    let tag = format!("localhost/dbshift-test/migrations:{}", env.prefix);
    let tar = dir.path().join("image.tar");
    let built = Command::new("tests/support/cluster/busybox-image.sh")
        .args(["-t", &tag, "-o", tar.to_str().unwrap()])
        .arg(format!("{}=/migrations/20250101000000_add_flag.yaml", file.display()))
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let loaded =
        Command::new("tests/support/cluster/load-image.sh").args([&cluster, tar.to_str().unwrap()]).output().unwrap();
    assert!(loaded.status.success(), "{}", String::from_utf8_lossy(&loaded.stderr));
    env.start_controller();
    let yaml = env.resource("img", "").replace(
        "migrations: { configMapRef: { name: migrations } }",
        &format!("migrations: {{ image: {{ image: \"{tag}\", path: /migrations }} }}"),
    );
    env.apply(&yaml).await;
    let d = env.wait_final("img", 180).await;
    assert_eq!(d.status.as_ref().unwrap().phase, Some(Phase::Succeeded), "{:?}\n{}", d.status, env.log_tail());
    assert!(env.docs(0).await.iter().all(|d| d.get_bool("flag") == Ok(true)));
    assert_eq!(env.records(0).await, vec![("20250101000000_add_flag".to_string(), "applied".to_string())]);
}

/// A spec changed while its run is in progress does not change that run: the run finishes as
/// planned (here: to the first version), then the new generation gets a run of its own.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn a_spec_changed_mid_run_waits_for_the_run_to_end() {
    let mut env = Env::new("respec").await;
    for i in 0..3 {
        env.seed(i, false).await;
    }
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    env.apply(&env.resource("respec", "  target: \"20250101000000\"\n  rollout: { maxParallel: 1 }")).await;
    env.wait_for("respec", 120, |d| {
        d.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.running == 1)
    })
    .await;
    let patch = serde_json::json!({ "spec": { "target": "20250102000000" } });
    env.dbms().patch("respec", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let d = env.wait_final("respec", 240).await;
    let st = d.status.clone().unwrap();
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}\n{}", st.message, env.log_tail());
    assert_eq!(st.observed_generation, Some(2));
    assert!(st.run_id.as_deref().unwrap().contains("-g2-"), "{:?}", st.run_id);
    for i in 0..3 {
        let recs = common::dump(&env.mongo.database(&env.tenant(i)), "_dbshift_migrations").await;
        let run_of = |id: &str| {
            recs.iter()
                .find(|r| r.get_str("_id") == Ok(id))
                .and_then(|r| r.get_str("runId").ok())
                .unwrap_or("")
                .to_string()
        };
        // The first version came from the first run, frozen; the second from the run of generation 2.
        assert!(run_of("20250101000000_add_flag").contains("-g1-"), "tenant {i}: {recs:?}");
        assert!(run_of("20250102000000_touch_unique").contains("-g2-"), "tenant {i}: {recs:?}");
        assert!(migrated(&env.docs(i).await));
    }
}

/// Three runs of one resource with `historyLimit: 2`: when the third ends, the first run's Jobs,
/// their pods and its ConfigMaps are gone, the last two runs' are kept, and the tenants'
/// tracking records of every run stay.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn runs_beyond_the_history_limit_leave_no_jobs_or_config_maps() {
    let mut env = Env::new("history").await;
    env.seed(0, false).await;
    env.migrations("migrations", BOTH_MIGRATIONS).await;
    env.start_controller();
    let mut run_ids = Vec::new();
    for (generation, target) in [(1, "20250101000000"), (2, "20250102000000"), (3, "20250101000000")] {
        if generation == 1 {
            env.apply(&env.resource("history", &format!("  target: \"{target}\"\n  historyLimit: 2"))).await;
        } else {
            let patch = serde_json::json!({ "spec": { "target": target } });
            env.dbms().patch("history", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        }
        let d = env
            .wait_for("history", 240, |d| {
                d.status
                    .as_ref()
                    .is_some_and(|s| s.observed_generation == Some(generation) && s.phase.is_some_and(Phase::is_final))
            })
            .await;
        let st = d.status.unwrap();
        assert_eq!(st.phase, Some(Phase::Succeeded), "run {generation}: {:?}\n{}", st.message, env.log_tail());
        run_ids.push(st.run_id.unwrap());
    }
    let run_of = |labels: &BTreeMap<String, String>| labels.get("dbshift.io/run").cloned().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs: Vec<String> = env.jobs().await.iter().map(|j| run_of(j.labels())).collect();
        let pods = Api::<Pod>::namespaced(env.client.clone(), &env.ns).list(&ListParams::default()).await.unwrap();
        let pods: Vec<String> = pods.items.iter().map(|p| run_of(p.labels())).collect();
        let cms = Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns).list(&ListParams::default()).await.unwrap();
        let cms: Vec<String> = cms.items.iter().map(|c| c.name_any()).filter(|n| n.starts_with("history-")).collect();
        let first_gone = !jobs.contains(&run_ids[0])
            && !pods.contains(&run_ids[0])
            && !cms.iter().any(|n| n.starts_with(&run_ids[0]));
        if first_gone {
            for kept in &run_ids[1..] {
                assert!(jobs.contains(kept), "run {kept}'s Job stays: {jobs:?}");
                assert!(cms.contains(&format!("{kept}-plan")), "run {kept}'s plan stays: {cms:?}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "run {} left jobs {jobs:?} pods {pods:?} config maps {cms:?}", run_ids[0]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The tenant's records still say which run did what (generation 3 rolled back the second).
    let recs = common::dump(&env.mongo.database(&env.tenant(0)), "_dbshift_migrations").await;
    assert!(recs.iter().any(|r| r.get_str("runId").is_ok_and(|id| id == run_ids[0])), "{recs:?}");
}

/// Snapshots into a PersistentVolumeClaim: written by each Job under `<namespace>/<name>/`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a cluster: set DBSHIFT_TEST_KUBECONFIG (tests/run.sh starts one and runs these)"]
async fn snapshots_go_to_a_persistent_volume_claim() {
    let mut env = Env::new("pvc").await;
    env.seed(0, false).await;
    env.migrations("migrations", &[("20250101000000_add_flag.yaml", ADD_FLAG)]).await;
    // No provisioner here: a hostPath volume, bound by hand. The runner (uid 65532) writes into it.
    let host = tempfile::tempdir().unwrap();
    let sub = host.path().join(&env.ns).join("pvc");
    std::fs::create_dir_all(&sub).unwrap();
    for d in [host.path().to_path_buf(), host.path().join(&env.ns), sub.clone()] {
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": { "name": env.ns },
        "spec": {
            "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"], "storageClassName": "manual",
            "hostPath": { "path": host.path() }, "persistentVolumeReclaimPolicy": "Retain",
            "claimRef": { "namespace": env.ns, "name": "snapshots" }
        }
    }))
    .unwrap();
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(env.client.clone());
    pvs.create(&PostParams::default(), &pv).await.unwrap();
    let pvc: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "snapshots" },
        "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": "manual", "volumeName": env.ns,
                  "resources": { "requests": { "storage": "1Gi" } } }
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
    env.start_controller();
    env.apply(&env.resource("pvc", "  backup: { destination: { persistentVolumeClaim: { claimName: snapshots } } }"))
        .await;
    let d = env.wait_final("pvc", 180).await;
    assert_eq!(d.status.as_ref().unwrap().phase, Some(Phase::Succeeded), "{:?}\n{}", d.status, env.log_tail());
    let e = tenant_entry(&d, &env.tenant(0));
    let b = e.backup.as_ref().expect("backup recorded");
    assert_eq!(b.documents, 20);
    assert!(b.location.starts_with("dir:"), "{b:?}");
    let manifests: Vec<_> = walk(&sub).into_iter().filter(|p| p.ends_with("dbshift-manifest.json")).collect();
    assert_eq!(manifests.len(), 1, "snapshot files under {}: {:?}", sub.display(), walk(&sub));
    let _ = pvs.delete(&env.ns, &DeleteParams::default()).await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
