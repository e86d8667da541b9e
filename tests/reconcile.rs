//! The reconcile driver against a scripted API server: every request the controller makes is
//! seen here in order, checked (method, path, body) and answered, the way kube-rs's
//! controller-rs tests its reconciler. No cluster: the Job store is fed by the test, and the
//! tenants are resolved on the real MongoDB wire server (tests/common).
//!
//! What these tests pin down: a new run freezes its plan before anything else, records each
//! launch in the status before creating the Job, reads a finished Job's pods once, announces
//! a tenant's end before the status that counts it, continues the same run after a restart
//! without creating a Job twice, lets running Jobs finish on deletion, and applies each failure
//! policy.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

use dbshift::controller::{metrics::Metrics, reconcile::reconcile, Config, Context, MANAGER};
use dbshift::crd::{DatabaseMigration, DatabaseMigrationStatus, Phase, TenantPhase};

const NS: &str = "shop";
const NAME: &str = "add-flag";
const UID: &str = "5e1f0c2a-0000-4000-8000-000000000001";

/// One request the controller made, waiting for its answer.
struct Call {
    method: String,
    path: String,
    query: String,
    body: Value,
    reply: SendResponse<Response<Body>>,
}

impl Call {
    fn answer(self, code: u16, body: Value) {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.reply.send_response(Response::builder().status(code).body(Body::from(bytes)).unwrap());
    }

    /// Answer a create or patch with the object it sent (what an API server returns).
    fn echo(self) {
        let body = self.body.clone();
        self.answer(200, body)
    }

    fn already_exists(self) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                            "message": "already exists", "code": 409});
        self.answer(409, status)
    }
}

/// The scripted API server.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    /// Every request body seen, to check that no secret ever left the controller.
    seen: Vec<String>,
}

impl ApiServer {
    async fn next(&mut self) -> Call {
        let (req, reply) = tokio::time::timeout(Duration::from_secs(20), self.handle.next_request())
            .await
            .expect("the controller made no further request")
            .expect("the client is gone");
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        self.seen.push(String::from_utf8_lossy(&bytes).into_owned());
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        Call {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            body,
            reply,
        }
    }

    /// The next request must be `method path`.
    async fn expect(&mut self, method: &str, path: &str) -> Call {
        let c = self.next().await;
        assert_eq!((c.method.as_str(), c.path.as_str()), (method, path), "unexpected request (query {})", c.query);
        c
    }

    /// An Event with this reason (events.k8s.io/v1), answered.
    async fn event(&mut self, reason: &str) -> Value {
        let c = self.expect("POST", &format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")).await;
        assert_eq!(c.body["reason"], reason, "{}", c.body);
        let body = c.body.clone();
        c.echo();
        body
    }

    /// The status apply, answered; returns the status written.
    async fn status(&mut self) -> DatabaseMigrationStatus {
        let c = self.expect("PATCH", &format!("{}/status", resource_path())).await;
        assert!(c.query.contains(&format!("fieldManager={MANAGER}")) && c.query.contains("force=true"), "{}", c.query);
        let st: DatabaseMigrationStatus = serde_json::from_value(c.body["status"].clone()).unwrap();
        let mut obj = resource(st.clone());
        obj.metadata.resource_version = Some("2".into());
        c.answer(200, serde_json::to_value(obj).unwrap());
        st
    }

    /// A Job create, answered; returns the Job.
    async fn job(&mut self) -> Job {
        let c = self.expect("POST", &format!("/apis/batch/v1/namespaces/{NS}/jobs")).await;
        let job: Job = serde_json::from_value(c.body.clone()).unwrap();
        c.echo();
        job
    }

    /// The list of a finished Job's pods, answered with a runner that wrote `result`; then the
    /// pod's finalizer is released (a JSON patch that tests it first).
    async fn pods(&mut self, job: &Job, exit_code: i32, result: Value) {
        let c = self.expect("GET", &format!("/api/v1/namespaces/{NS}/pods")).await;
        let name = job.metadata.name.clone().unwrap();
        assert!(c.query.contains(&format!("job-name%3D{name}")), "{}", c.query);
        let pod = json!({
            "metadata": { "name": format!("{name}-x"), "namespace": NS,
                          "finalizers": ["batch.kubernetes.io/job-tracking", "dbshift.io/runner-result"] },
            "status": { "phase": if exit_code == 0 { "Succeeded" } else { "Failed" }, "containerStatuses": [{
                "name": "runner", "image": "dbshift:test", "imageID": "", "ready": false, "restartCount": 0,
                "state": { "terminated": { "exitCode": exit_code, "message": result.to_string() } }
            }]}
        });
        c.answer(200, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod.clone()]}));
        let c = self.expect("PATCH", &format!("/api/v1/namespaces/{NS}/pods/{name}-x")).await;
        assert_eq!(
            c.body,
            json!([
                { "op": "test", "path": "/metadata/finalizers/1", "value": "dbshift.io/runner-result" },
                { "op": "remove", "path": "/metadata/finalizers/1" },
            ])
        );
        c.answer(200, pod);
    }

    /// The list of a batch Job's pods while it still runs (its tenants all reported): the
    /// one pod is released, running.
    async fn running_pod_released(&mut self, job: &Job) {
        let c = self.expect("GET", &format!("/api/v1/namespaces/{NS}/pods")).await;
        let name = job.metadata.name.clone().unwrap();
        assert!(c.query.contains(&format!("job-name%3D{name}")), "{}", c.query);
        let pod = json!({
            "metadata": { "name": format!("{name}-x"), "namespace": NS,
                          "finalizers": ["batch.kubernetes.io/job-tracking", "dbshift.io/runner-result"] },
            "status": { "phase": "Running" }
        });
        c.answer(200, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod.clone()]}));
        let c = self.expect("PATCH", &format!("/api/v1/namespaces/{NS}/pods/{name}-x")).await;
        assert_eq!(c.body[1], json!({ "op": "remove", "path": "/metadata/finalizers/1" }));
        c.answer(200, pod);
    }

    /// The lists of runner pods a deleted resource releases (none left).
    async fn no_pods_left(&mut self, selectors: &[&str]) {
        for sel in selectors {
            let c = self.expect("GET", &format!("/api/v1/namespaces/{NS}/pods")).await;
            assert!(c.query.contains(sel), "{}", c.query);
            c.answer(200, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}));
        }
    }

    /// The dry-run create of a runner pod (admission's verdict on the run's pods), answered
    /// with `code` and `body` (the pod itself when `body` is null).
    async fn pod_dry_run(&mut self, code: u16, body: Value) -> Value {
        let c = self.expect("POST", &format!("/api/v1/namespaces/{NS}/pods")).await;
        assert!(c.query.contains("dryRun=All"), "a dry run only: {}", c.query);
        let pod = c.body.clone();
        assert_eq!(pod["spec"]["containers"][0]["name"], "runner", "{pod}");
        if body.is_null() {
            c.echo()
        } else {
            c.answer(code, body)
        }
        pod
    }

    /// Nothing more is asked.
    async fn idle(&mut self) {
        if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(300), self.handle.next_request()).await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

fn resource_path() -> String {
    format!("/apis/dbshift.io/v1alpha1/namespaces/{NS}/databasemigrations/{NAME}")
}

const ADD_FLAG: &str = "up:\n  - addField: { collection: customers, field: flag, value: true }\n";

fn tenants() -> Vec<String> {
    (0..3).map(|i| format!("rc_t{i}")).collect()
}

/// The resource, with the finalizer and the given status.
fn resource_with(rollout: Value, status: DatabaseMigrationStatus) -> DatabaseMigration {
    let mut d: DatabaseMigration = serde_json::from_value(json!({
        "apiVersion": "dbshift.io/v1alpha1",
        "kind": "DatabaseMigration",
        "metadata": { "name": NAME, "namespace": NS, "uid": UID, "generation": 1, "resourceVersion": "1",
                      "finalizers": ["dbshift.io/finalizer"] },
        "spec": {
            "connection": { "secretRef": { "name": "mongo", "key": "uri" } },
            "tenants": { "names": tenants() },
            "migrations": { "inline": { "20250101000000_add_flag.yaml": ADD_FLAG } },
            "rollout": rollout,
        }
    }))
    .unwrap();
    d.status = Some(status);
    d
}

fn resource(status: DatabaseMigrationStatus) -> DatabaseMigration {
    resource_with(json!({ "maxParallel": 2 }), status)
}

/// A controller's context on the scripted API server, with a Job store the test feeds.
fn context() -> (Arc<Context>, ApiServer, Writer<Job>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, NS);
    let (store, writer) = reflector::store::<Job>();
    let ctx = Context {
        client: client.clone(),
        config: Config {
            runner_image: "dbshift:test".into(),
            connect_timeout: Duration::from_secs(5),
            retry: Duration::from_secs(30),
            job_policy: Default::default(),
        },
        jobs: store,
        recorder: Recorder::new(client, Reporter { controller: MANAGER.into(), instance: Some("test".into()) }),
        metrics: Arc::new(Metrics::default()),
        runs: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
        started: Timestamp::now(),
    };
    (Arc::new(ctx), ApiServer { handle, seen: Vec::new() }, writer)
}

/// A reconcile running on the scripted API server; the test answers its requests, then
/// [`Running::done`] checks it asks nothing more and returns what it wants next.
struct Running(tokio::task::JoinHandle<Result<Requeue, dbshift::controller::Error>>);

fn reconcile_on(ctx: &Arc<Context>, dbm: DatabaseMigration) -> Running {
    Running(tokio::spawn(reconcile(Arc::new(dbm), ctx.clone())))
}

impl Running {
    async fn done(self, api: &mut ApiServer) -> Requeue {
        api.idle().await;
        self.0.await.unwrap().expect("reconcile succeeded")
    }
}

/// The Secret with the test server's URI.
async fn secret(api: &mut ApiServer) {
    let c = api.expect("GET", &format!("/api/v1/namespaces/{NS}/secrets/mongo")).await;
    let uri = base64(common::uri().as_bytes());
    c.answer(
        200,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mongo", "namespace": NS},
                          "data": {"uri": uri}}),
    );
}

fn base64(b: &[u8]) -> String {
    use std::fmt::Write;
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.write_char(T[(n >> (18 - 6 * i) & 63) as usize] as char).unwrap();
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// What a new run writes, in order: the frozen files and plan, RunStarted, the status naming
/// the first launches, the Jobs, then the Migrating Event. Returns (plan ConfigMap, status, Jobs).
async fn start(ctx: &Arc<Context>, api: &mut ApiServer, rollout: Value) -> (Value, DatabaseMigrationStatus, Vec<Job>) {
    let n = rollout["maxParallel"].as_u64().unwrap_or(1).min(3) as usize;
    let run = reconcile_on(ctx, resource_with(rollout, DatabaseMigrationStatus::default()));
    secret(api).await;
    api.pod_dry_run(200, Value::Null).await;
    let files = api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await;
    assert!(files.body["data"]["20250101000000_add_flag.yaml"].is_string(), "{}", files.body);
    files.echo();
    let plan = api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await;
    let plan_cm = plan.body.clone();
    assert_eq!(plan_cm["metadata"]["ownerReferences"][0]["uid"], UID);
    plan.echo();
    api.event("RunStarted").await;
    let st = api.status().await;
    let mut jobs = Vec::new();
    for _ in 0..n {
        jobs.push(api.job().await);
    }
    api.event("Migrating").await;
    assert_eq!(run.done(api).await, Requeue::requeue(Duration::from_secs(60)));
    (plan_cm, st, jobs)
}

/// The Job as the store sees it once it ended.
fn finished(job: &Job, ok: bool) -> Job {
    let mut j = job.clone();
    let cond = if ok { "Complete" } else { "Failed" };
    j.status = Some(
        serde_json::from_value(json!({
            "conditions": [{ "type": cond, "status": "True", "lastTransitionTime": Timestamp::now().to_string() }]
        }))
        .unwrap(),
    );
    j
}

fn put(writer: &mut Writer<Job>, job: &Job) {
    writer.apply_watcher_event(&watcher::Event::Apply(job.clone()));
}

fn env_of(job: &Job) -> HashMap<String, String> {
    let c = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect()
}

fn result(tenant: &str, ok: bool, applied: bool) -> Value {
    let done = if applied { json!([["20250101000000_add_flag", 12, 20]]) } else { json!([]) };
    let error =
        if ok { Value::Null } else { json!("step 1 (addField): boom; every change of this migration was undone") };
    json!({"v": 1, "tenant": tenant, "ok": ok, "dir": "up", "done": done, "checks": [0, 0],
           "code": if ok { 0 } else { 1 }, "error": error})
}

fn entry(st: &DatabaseMigrationStatus, tenant: &str) -> TenantPhase {
    st.tenants.iter().find(|t| t.name == tenant).map(|t| t.phase).unwrap_or_else(|| panic!("{tenant} not listed"))
}

fn time(t: Timestamp) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t)
}

#[tokio::test]
async fn a_new_run_freezes_its_plan_and_records_launches_before_creating_jobs() {
    let (ctx, mut api, _writer) = context();
    // Without the finalizer, the first reconcile adds it and nothing else.
    let mut bare = resource(DatabaseMigrationStatus::default());
    bare.metadata.finalizers = None;
    let run = reconcile_on(&ctx, bare);
    let c = api.expect("PATCH", &resource_path()).await;
    assert_eq!(
        c.body,
        json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": ["dbshift.io/finalizer"] },
        ]),
        "kube's finalizer helper: a JSON patch that fails if someone else changed the list meanwhile"
    );
    c.answer(200, serde_json::to_value(resource(DatabaseMigrationStatus::default())).unwrap());
    assert_eq!(run.done(&mut api).await, Requeue::await_change());

    let (plan_cm, st, jobs) = start(&ctx, &mut api, json!({ "maxParallel": 2 })).await;
    let plan: Value = serde_json::from_str(plan_cm["data"]["plan.json"].as_str().unwrap()).unwrap();
    assert_eq!(plan["tenants"], json!(tenants()));
    assert_eq!(st.phase, Some(Phase::Migrating));
    assert_eq!(st.run_id.as_deref(), plan["runId"].as_str());
    // The status written before the creates names exactly the Jobs created.
    let recorded: Vec<&str> = st.tenants.iter().filter_map(|t| t.job.as_deref()).collect();
    let created: Vec<String> = jobs.iter().map(|j| j.metadata.name.clone().unwrap()).collect();
    assert_eq!(recorded, created);
    let phases = (entry(&st, "rc_t0"), entry(&st, "rc_t1"), entry(&st, "rc_t2"));
    assert_eq!(phases, (TenantPhase::Running, TenantPhase::Running, TenantPhase::Pending));
    let e = env_of(&jobs[0]);
    assert_eq!((e["DBSHIFT_TENANT"].as_str(), e["DBSHIFT_RUN_ID"].as_str()), ("rc_t0", st.run_id.as_deref().unwrap()));
    assert_eq!(jobs[0].metadata.owner_references.as_ref().unwrap()[0].uid, UID);
    // The URI went nowhere: not in a ConfigMap, a status, a Job or an Event.
    let uri = common::uri();
    assert!(api.seen.iter().all(|b| !b.contains(&uri)), "a request carried the MongoDB URI");
}

#[tokio::test]
async fn a_finished_job_is_read_once_and_announced_before_the_status_counts_it() {
    let (ctx, mut api, mut writer) = context();
    let (_, st, jobs) = start(&ctx, &mut api, json!({ "maxParallel": 2 })).await;
    put(&mut writer, &finished(&jobs[0], true));
    put(&mut writer, &jobs[1]);
    let run = reconcile_on(&ctx, resource(st));
    api.pods(&jobs[0], 0, result("rc_t0", true, true)).await;
    let ev = api.event("TenantSucceeded").await;
    assert_eq!(ev["related"]["name"], jobs[0].metadata.name.clone().unwrap().as_str(), "related to its Job");
    let st = api.status().await;
    let third = api.job().await;
    run.done(&mut api).await;
    assert_eq!(entry(&st, "rc_t0"), TenantPhase::Succeeded);
    assert_eq!(st.tenants[0].applied[0].documents_affected, 20);
    assert_eq!(env_of(&third)["DBSHIFT_TENANT"], "rc_t2");
    put(&mut writer, &third);

    // Nothing changed since: no pod is read again, nothing is written.
    reconcile_on(&ctx, resource(st)).done(&mut api).await;
}

#[tokio::test]
async fn a_restarted_controller_continues_the_same_run_without_creating_a_job_twice() {
    let (ctx, mut api, _) = context();
    let (plan_cm, st, jobs) = start(&ctx, &mut api, json!({ "maxParallel": 2 })).await;
    // A new process: empty memory. The store has the first Job, which ended before the
    // restart (its Event is not sent again); the second was recorded in the status, but its
    // create was lost.
    let (ctx2, mut api2, mut writer2) = context();
    let mut ended_before = finished(&jobs[0], true);
    ended_before.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_transition_time =
        Some(time("2020-01-01T00:00:00Z".parse().unwrap()));
    put(&mut writer2, &ended_before);
    let run_id = st.run_id.clone().unwrap();
    let run = reconcile_on(&ctx2, resource(st));
    let c = api2.expect("GET", &format!("/api/v1/namespaces/{NS}/configmaps/{run_id}-plan")).await;
    c.answer(200, plan_cm);
    api2.pods(&jobs[0], 0, result("rc_t0", true, true)).await;
    let st = api2.status().await;
    // The third tenant starts; then the lost Job is created again (it exists after all: harmless).
    let third = api2.job().await;
    let again = api2.expect("POST", &format!("/apis/batch/v1/namespaces/{NS}/jobs")).await;
    assert_eq!(again.body["metadata"]["name"], jobs[1].metadata.name.clone().unwrap().as_str());
    again.already_exists();
    run.done(&mut api2).await;
    assert_eq!(env_of(&third)["DBSHIFT_TENANT"], "rc_t2");
    assert_eq!(entry(&st, "rc_t0"), TenantPhase::Succeeded);
    assert_eq!(ctx2.runs.lock().unwrap().len(), 1, "the run is remembered again");
}

#[tokio::test]
async fn deletion_lets_running_jobs_finish_starts_nothing_then_releases_the_finalizer() {
    let (ctx, mut api, mut writer) = context();
    let (_, st, jobs) = start(&ctx, &mut api, json!({ "maxParallel": 1 })).await;
    put(&mut writer, &jobs[0]);
    let mut deleting = resource_with(json!({ "maxParallel": 1 }), st);
    deleting.metadata.deletion_timestamp = Some(time(Timestamp::now()));
    let run = reconcile_on(&ctx, deleting.clone());
    let st = api.status().await;
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(10)), "it waits for the running Job");
    assert!(st.message.clone().unwrap().starts_with("deleting: 1 running Job(s) finish first"), "{st:?}");

    // The Job ends: nothing new starts, the run ends, the finalizer goes.
    put(&mut writer, &finished(&jobs[0], true));
    deleting.status = Some(st);
    let run = reconcile_on(&ctx, deleting);
    api.pods(&jobs[0], 0, result("rc_t0", true, true)).await;
    api.event("TenantSucceeded").await;
    let st = api.status().await;
    assert_eq!(st.phase, Some(Phase::Failed), "deleted before every tenant ran");
    assert_eq!((entry(&st, "rc_t1"), entry(&st, "rc_t2")), (TenantPhase::Skipped, TenantPhase::Skipped));
    api.event("Failed").await;
    api.no_pods_left(&["dbshift.io%2Fmigration%3Dadd-flag", "dbshift.io%2Frun%3D"]).await;
    let c = api.expect("PATCH", &resource_path()).await;
    assert_eq!(c.body, removes_the_finalizer());
    c.answer(200, serde_json::to_value(resource(st.clone())).unwrap());
    assert_eq!(run.done(&mut api).await, Requeue::await_change());
}

/// kube's finalizer helper removes ours by its index, testing it first.
fn removes_the_finalizer() -> Value {
    json!([
        { "op": "test", "path": "/metadata/finalizers/0", "value": "dbshift.io/finalizer" },
        { "op": "remove", "path": "/metadata/finalizers/0" },
    ])
}

/// Deleting while the plan cannot be read: an API error keeps the finalizer (the reconcile
/// fails and is retried); a plan that is gone waits for the run's running Jobs, then lets go.
#[tokio::test]
async fn deletion_keeps_the_finalizer_while_the_plan_cannot_be_read() {
    let (ctx, mut api, _) = context();
    let (_, st, jobs) = start(&ctx, &mut api, json!({ "maxParallel": 1 })).await;
    let run_id = st.run_id.clone().unwrap();
    let mut deleting = resource_with(json!({ "maxParallel": 1 }), st);
    deleting.metadata.deletion_timestamp = Some(time(Timestamp::now()));
    // A new process (the plan is not in memory) while the first Job runs.
    let (ctx, mut api, mut writer) = context();
    put(&mut writer, &jobs[0]);
    let plan_path = format!("/api/v1/namespaces/{NS}/configmaps/{run_id}-plan");
    let run = reconcile_on(&ctx, deleting.clone());
    api.expect("GET", &plan_path).await.answer(
        500,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcdserver: request timed out",
               "reason": "InternalError", "code": 500}),
    );
    let r = tokio::time::timeout(Duration::from_secs(10), run.0).await.expect("the reconcile ended");
    assert!(r.unwrap().is_err(), "a transient error fails the reconcile");
    api.idle().await;
    let gone = || {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found", "reason": "NotFound",
               "code": 404})
    };
    let run = reconcile_on(&ctx, deleting.clone());
    api.expect("GET", &plan_path).await.answer(404, gone());
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(10)), "it waits for the running Job");
    // The Job ends: the finalizer goes.
    put(&mut writer, &finished(&jobs[0], true));
    let run = reconcile_on(&ctx, deleting.clone());
    api.expect("GET", &plan_path).await.answer(404, gone());
    api.no_pods_left(&["dbshift.io%2Fmigration%3Dadd-flag", "dbshift.io%2Frun%3D"]).await;
    let c = api.expect("PATCH", &resource_path()).await;
    assert_eq!(c.body, removes_the_finalizer());
    c.answer(200, serde_json::to_value(&deleting).unwrap());
    assert_eq!(run.done(&mut api).await, Requeue::await_change());
}

/// A restarted controller finds the active run's plan ConfigMap gone: retrying cannot bring it
/// back, so the run ends Failed with reason RunLost in the status and an Event (the last known
/// tenants kept), nothing is created, and the resource waits for a change.
#[tokio::test]
async fn a_lost_plan_ends_the_run_and_says_so() {
    let (ctx, mut api, _) = context();
    let (_, st, _jobs) = start(&ctx, &mut api, json!({ "maxParallel": 1 })).await;
    let run_id = st.run_id.clone().unwrap();
    let (ctx, mut api, _) = context();
    let run = reconcile_on(&ctx, resource_with(json!({ "maxParallel": 1 }), st.clone()));
    api.expect("GET", &format!("/api/v1/namespaces/{NS}/configmaps/{run_id}-plan")).await.answer(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found", "reason": "NotFound",
               "code": 404}),
    );
    let lost = api.status().await;
    assert_eq!(lost.phase, Some(Phase::Failed));
    let ready = lost.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "RunLost"));
    assert!(lost.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True"));
    let message = lost.message.clone().unwrap();
    assert!(message.contains(&format!("{run_id}-plan")) && message.contains("is gone"), "{message}");
    assert_eq!(lost.tenants, st.tenants, "what was known of the tenants stays");
    api.event("RunLost").await;
    api.no_pods_left(&["dbshift.io%2Fmigration%3Dadd-flag", "dbshift.io%2Frun%3D"]).await;
    assert_eq!(run.done(&mut api).await, Requeue::await_change());
    assert_eq!(lost.observed_generation, st.observed_generation, "the run's generation, not a later one");
}

/// The plan's ConfigMap has a predictable name: one that this resource does not own, or whose
/// jobTemplate asks for a privileged pod, is not followed (no Job is built from it).
#[tokio::test]
async fn a_plan_someone_else_wrote_is_not_followed() {
    let (ctx, mut api, _) = context();
    let (plan_cm, st, _jobs) = start(&ctx, &mut api, json!({ "maxParallel": 1 })).await;
    let run_id = st.run_id.clone().unwrap();
    let mut privileged = plan_cm.clone();
    let text = privileged["data"]["plan.json"].as_str().unwrap().to_string();
    let mut plan: Value = serde_json::from_str(&text).unwrap();
    plan["spec"]["jobTemplate"] = json!({ "securityContext": { "privileged": true } });
    privileged["data"]["plan.json"] = Value::String(plan.to_string());
    let mut unowned = plan_cm.clone();
    unowned["metadata"]["ownerReferences"] = json!([]);
    for (cm, why) in [(unowned, "is not this resource's"), (privileged, "securityContext.privileged")] {
        let (ctx, mut api, _) = context();
        let run = reconcile_on(&ctx, resource_with(json!({ "maxParallel": 1 }), st.clone()));
        api.expect("GET", &format!("/api/v1/namespaces/{NS}/configmaps/{run_id}-plan")).await.answer(200, cm);
        let lost = api.status().await;
        let message = lost.message.clone().unwrap();
        assert_eq!(lost.phase, Some(Phase::Failed));
        assert!(message.contains(why), "{message}");
        api.event("RunLost").await;
        api.no_pods_left(&["dbshift.io%2Fmigration%3Dadd-flag", "dbshift.io%2Frun%3D"]).await;
        assert_eq!(run.done(&mut api).await, Requeue::await_change(), "and no Job was created");
    }
}

/// A namespace whose Pod Security level refuses the runner pods: the run is blocked before
/// anything is created (no ConfigMap, no Job), with the admission's own words in the status and
/// an Event, and retried (the namespace's labels may change); an RBAC that does not let the
/// controller create pods skips the check and the run starts.
#[tokio::test]
async fn a_namespace_that_refuses_the_runner_pods_blocks_the_run_before_anything_is_created() {
    let (ctx, mut api, _) = context();
    let run = reconcile_on(&ctx, resource_with(json!({ "maxParallel": 1 }), DatabaseMigrationStatus::default()));
    secret(&mut api).await;
    let psa = "pods \"x\" is forbidden: violates PodSecurity \"restricted:latest\": seccompProfile (pod or container \
               \"runner\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")";
    let refused = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": psa,
                         "reason": "Forbidden", "code": 403});
    api.pod_dry_run(403, refused).await;
    let st = api.status().await;
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "PodRefused"));
    let message = st.message.clone().unwrap_or_else(|| ready.message.clone());
    assert!(message.contains("violates PodSecurity") && message.contains("no Job was created"), "{message}");
    let event = api.event("PodRefused").await;
    assert!(event["note"].as_str().unwrap().contains("seccompProfile"), "{event}");
    assert_eq!(run.done(&mut api).await, Requeue::requeue(ctx.config.retry), "retried, nothing created");

    // No verdict on the pods: the controller may not create pods (RBAC), or a webhook cannot
    // take dry runs. The check is skipped and the run starts.
    let rbac = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                      "message": "pods is forbidden: User \"system:serviceaccount:dbshift-system:dbshift\" cannot create \
                                  resource \"pods\" in API group \"\" in the namespace \"shop\""});
    let webhook = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest", "code": 400,
                         "message": "admission webhook \"policy.example.com\" does not support dry run"});
    for (code, body) in [(403, rbac), (400, webhook)] {
        let (ctx, mut api, _) = context();
        let run = reconcile_on(&ctx, resource_with(json!({ "maxParallel": 1 }), DatabaseMigrationStatus::default()));
        secret(&mut api).await;
        api.pod_dry_run(code, body).await;
        api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
        api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
        api.event("RunStarted").await;
        api.status().await;
        api.job().await;
        api.event("Migrating").await;
        assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(60)), "{code}");
    }
}

/// Tenant 0 failed after applying part of the run; tenant 1 succeeded. The reconcile that
/// sees it reads both pods and announces both ends first; what it does next is the policy's.
async fn after_a_failure(rollout: &Value) -> (Arc<Context>, ApiServer, Writer<Job>, Running) {
    let (ctx, mut api, mut writer) = context();
    let (_, st, jobs) = start(&ctx, &mut api, rollout.clone()).await;
    put(&mut writer, &finished(&jobs[0], false));
    put(&mut writer, &finished(&jobs[1], true));
    let run = reconcile_on(&ctx, resource_with(rollout.clone(), st));
    api.pods(&jobs[0], 1, result("rc_t0", false, true)).await;
    api.pods(&jobs[1], 0, result("rc_t1", true, true)).await;
    api.event("TenantFailed").await;
    api.event("TenantSucceeded").await;
    (ctx, api, writer, run)
}

#[tokio::test]
async fn on_failure_rollback_rolls_back_every_tenant_the_run_changed() {
    let rollout = json!({ "maxParallel": 2, "onFailure": "rollback" });
    let (ctx, mut api, mut writer, run) = after_a_failure(&rollout).await;
    let st = api.status().await;
    let rb = [api.job().await, api.job().await];
    api.event("RollingBack").await;
    run.done(&mut api).await;
    assert_eq!(st.phase, Some(Phase::RollingBack));
    assert_eq!(entry(&st, "rc_t2"), TenantPhase::Skipped);
    for (j, t) in rb.iter().zip(["rc_t0", "rc_t1"]) {
        assert!(j.metadata.name.as_ref().unwrap().ends_with("-rb"));
        assert_eq!(env_of(j)["DBSHIFT_TENANT"], t);
        assert_eq!(env_of(j)["DBSHIFT_ROLLBACK_RUN"], st.run_id.clone().unwrap());
        put(&mut writer, &finished(j, true));
    }
    let run = reconcile_on(&ctx, resource_with(rollout, st));
    for (j, t) in rb.iter().zip(["rc_t0", "rc_t1"]) {
        let mut r = result(t, true, true);
        r["dir"] = json!("down");
        r["rollback"] = json!("data");
        api.pods(j, 0, r).await;
    }
    api.event("TenantRolledBack").await;
    api.event("TenantRolledBack").await;
    let st = api.status().await;
    api.event("RolledBack").await;
    // Next: the fleet is counted as the run left it.
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(1)));
    assert_eq!(st.phase, Some(Phase::RolledBack));
    assert_eq!((entry(&st, "rc_t0"), entry(&st, "rc_t1")), (TenantPhase::RolledBack, TenantPhase::RolledBack));
}

#[tokio::test]
async fn on_failure_halt_starts_nothing_more() {
    let (_ctx, mut api, _writer, run) = after_a_failure(&json!({ "maxParallel": 2, "onFailure": "halt" })).await;
    let st = api.status().await;
    api.event("Failed").await;
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(1)));
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(entry(&st, "rc_t2"), TenantPhase::Skipped);
}

#[tokio::test]
async fn on_failure_continue_migrates_the_others() {
    let (_ctx, mut api, _writer, run) =
        after_a_failure(&json!({ "maxParallel": 2, "onFailure": "continue", "maxFailures": 0 })).await;
    let st = api.status().await;
    let third = api.job().await;
    run.done(&mut api).await;
    assert_eq!(st.phase, Some(Phase::Migrating));
    assert_eq!(entry(&st, "rc_t0"), TenantPhase::Failed);
    assert_eq!(env_of(&third)["DBSHIFT_TENANT"], "rc_t2");
}

/// The last run's plan, asked for by the census (which tenants it had), answered: gone.
async fn plan_gone(api: &mut ApiServer, run: &str) {
    let c = api.expect("GET", &format!("/api/v1/namespaces/{NS}/configmaps/{run}-plan")).await;
    c.answer(
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
    );
}

/// `mode: continuous`, once the run is over: the controller counts the tenants on the server
/// and starts a follow-up run (`<run id>-f1`) for the one that is behind, only that one, with
/// the same rules; the status written with it carries the counts.
#[tokio::test]
async fn a_continuous_resource_follows_only_the_tenants_behind() {
    let (ctx, mut api, _writer) = context();
    let p = common::unique("fo");
    let names: Vec<String> = (0..3).map(|i| format!("{p}_{i}")).collect();
    // Tenants 0 and 1 are at the target (migrated from a laptop); tenant 2 is new.
    let dir = common::migrations(&[("20250101000000_add_flag.yaml", ADD_FLAG)]);
    for t in &names[..2] {
        let o = common::cli(
            &["up", "--dir", dir.path().to_str().unwrap(), "--tenant", t],
            &[("DBSHIFT_MONGODB_URI", &common::uri())],
        );
        assert!(o.status.success(), "{}", common::text(&o));
    }
    let root = "add-flag-g1-5e1f0c";
    // The run ended more than an interval ago: a follow-up may start.
    let ended = time(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60));
    let finished = DatabaseMigrationStatus {
        observed_generation: Some(1),
        phase: Some(Phase::Succeeded),
        run_id: Some(root.into()),
        finished_at: Some(ended.clone()),
        ..Default::default()
    };
    let mut d = resource_with(json!({ "maxParallel": 2 }), finished);
    d.spec.tenants.names = names.clone();
    d.spec.mode = dbshift::crd::Mode::Continuous;
    d.spec.resync_interval = Some("10s".into());
    let run = reconcile_on(&ctx, d);
    secret(&mut api).await;
    plan_gone(&mut api, root).await;
    api.pod_dry_run(200, Value::Null).await;
    api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
    let plan = api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await;
    let frozen: Value = serde_json::from_str(plan.body["data"]["plan.json"].as_str().unwrap()).unwrap();
    plan.echo();
    assert_eq!(frozen["runId"], format!("{root}-f1"));
    assert_eq!(frozen["tenants"], json!([names[2]]), "only the tenant behind");
    let note = api.event("RunStarted").await;
    assert!(note["note"].as_str().unwrap().starts_with("follow-up run"), "{note}");
    let st = api.status().await;
    assert_eq!(st.run_id.as_deref(), Some(format!("{root}-f1").as_str()));
    assert_eq!(st.phase, Some(Phase::Migrating));
    let f = st.fleet.clone().expect("the counts travel with the follow-up's status");
    assert_eq!((f.tenants, f.at_target, f.behind, f.held), (3, 2, 1, 0), "{f:?}");
    assert_eq!(
        f.versions.iter().map(|v| (v.version.as_str(), v.tenants)).collect::<Vec<_>>(),
        [("20250101000000", 2), ("none", 1)]
    );
    assert!(f.next_resync.is_some() && f.counted_at.is_some());
    let job = api.job().await;
    assert_eq!(env_of(&job)["DBSHIFT_TENANT"], names[2]);
    assert_eq!(env_of(&job)["DBSHIFT_RUN_ID"], format!("{root}-f1"));
    api.event("Migrating").await;
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(60)));

    // Once mode: the same finished resource is only counted (no follow-up), then looked at
    // again after the interval.
    let mut once = resource_with(
        json!({ "maxParallel": 2 }),
        DatabaseMigrationStatus {
            observed_generation: Some(1),
            phase: Some(Phase::Succeeded),
            run_id: Some(root.into()),
            finished_at: Some(ended),
            ..Default::default()
        },
    );
    once.spec.tenants.names = names.clone();
    once.spec.resync_interval = Some("10s".into());
    let run = reconcile_on(&ctx, once);
    secret(&mut api).await;
    plan_gone(&mut api, root).await;
    let st = api.status().await;
    assert_eq!(st.run_id.as_deref(), Some(root), "no follow-up in once mode");
    let f = st.fleet.unwrap();
    assert_eq!((f.at_target, f.behind, f.next_resync.is_none()), (2, 1, true), "{f:?}");
    assert_eq!(f.summary, "2/3 at target, 1 behind");
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(10)));

    // The follow-up ended and left its tenant behind without a record (its Job never ran):
    // held, so no second follow-up starts for it at every resync.
    let follow = format!("{root}-f1");
    let mut after = resource_with(
        json!({ "maxParallel": 2 }),
        DatabaseMigrationStatus {
            observed_generation: Some(1),
            phase: Some(Phase::Succeeded),
            run_id: Some(follow.clone()),
            finished_at: Some(time(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60))),
            ..Default::default()
        },
    );
    after.spec.tenants.names = names.clone();
    after.spec.mode = dbshift::crd::Mode::Continuous;
    after.spec.resync_interval = Some("10s".into());
    let run = reconcile_on(&ctx, after);
    secret(&mut api).await;
    let c = api.expect("GET", &format!("/api/v1/namespaces/{NS}/configmaps/{follow}-plan")).await;
    c.answer(
        200,
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": format!("{follow}-plan"), "namespace": NS,
                          "ownerReferences": [{ "apiVersion": "dbshift.io/v1alpha1", "kind": "DatabaseMigration",
                                                "name": NAME, "uid": UID, "controller": true }] },
            "data": { "plan.json": serde_json::to_string(&frozen).unwrap() }
        }),
    );
    let st = api.status().await;
    assert_eq!(st.run_id.as_deref(), Some(follow.as_str()), "no second follow-up for a held tenant");
    let f = st.fleet.unwrap();
    assert_eq!((f.behind, f.held), (1, 1), "{f:?}");
    run.done(&mut api).await;
}

/// A run held at its gate with no Job running is superseded by a changed spec: an Event says
/// so, and the new generation's run starts at once (here without a gate, so its Jobs start).
#[tokio::test]
async fn a_changed_spec_supersedes_a_run_held_at_its_gate() {
    let (ctx, mut api, _writer) = context();
    let gated = json!({ "maxParallel": 2, "approval": "beforeStart" });
    let run = reconcile_on(&ctx, resource_with(gated, DatabaseMigrationStatus::default()));
    secret(&mut api).await;
    api.pod_dry_run(200, Value::Null).await;
    api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
    let plan = api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await;
    let plan_cm = plan.body.clone();
    plan.echo();
    api.event("RunStarted").await;
    let st = api.status().await;
    assert_eq!(st.phase, Some(Phase::AwaitingApproval));
    api.event("AwaitingApproval").await;
    run.done(&mut api).await;
    let held = st.run_id.clone().unwrap();

    // Generation 2: the gate is gone and the spec changed (the gate alone only steers the same
    // run). A restarted controller: the plan is read back first.
    let mut changed = resource_with(json!({ "maxParallel": 3 }), st);
    changed.metadata.generation = Some(2);
    ctx.runs.lock().unwrap().clear();
    let run = reconcile_on(&ctx, changed);
    let c = api.expect("GET", &format!("/api/v1/namespaces/{NS}/configmaps/{held}-plan")).await;
    c.answer(200, plan_cm);
    let note = api.event("RunSuperseded").await;
    assert!(
        note["note"].as_str().unwrap().contains(&format!("run {held} was held (AwaitingApproval) with 0 of 3")),
        "{note}"
    );
    secret(&mut api).await;
    api.pod_dry_run(200, Value::Null).await;
    api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
    let plan = api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await;
    let frozen: Value = serde_json::from_str(plan.body["data"]["plan.json"].as_str().unwrap()).unwrap();
    plan.echo();
    assert_eq!(frozen["generation"], 2);
    // The Recorder sends a second RunStarted of the same resource as a series (a PATCH).
    let c = api.next().await;
    assert!(
        c.method == "PATCH" && c.path.starts_with(&format!("/apis/events.k8s.io/v1/namespaces/{NS}/events/")),
        "{}",
        c.path
    );
    c.echo();
    let st = api.status().await;
    assert_eq!(st.phase, Some(Phase::Migrating));
    assert_ne!(st.run_id.as_deref(), Some(held.as_str()));
    assert_eq!(st.observed_generation, Some(2));
    for _ in 0..3 {
        api.job().await;
    }
    api.event("Migrating").await;
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(60)));
}

/// A batch Job (`tenantsPerJob: 3`) whose pod was killed mid-batch: the controller reads each
/// tenant's outcome from its database. One wrote its result (succeeded); one has a tracking
/// record of the run but no result (the runner was on it: failed, interrupted); one has
/// nothing (never started: failed, untouched, since no tenant failure stopped the batch).
#[tokio::test]
async fn a_killed_batch_reports_each_tenant_from_its_database() {
    use dbshift::engine::tracking::{self, Record, State};
    let (ctx, mut api, mut writer) = context();
    let p = common::unique("kb");
    let names: Vec<String> = (0..3).map(|i| format!("{p}_{i}")).collect();
    let mut d = resource_with(json!({ "maxParallel": 2, "tenantsPerJob": 3, "onFailure": "halt" }), Default::default());
    d.spec.tenants.names = names.clone();
    let run = reconcile_on(&ctx, d.clone());
    secret(&mut api).await;
    api.pod_dry_run(200, Value::Null).await;
    api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
    api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
    api.event("RunStarted").await;
    let st = api.status().await;
    let job = api.job().await;
    api.event("Migrating").await;
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(60)));
    // One Job for the three, with the batch in its environment.
    assert_eq!(env_of(&job)["DBSHIFT_BATCH"], serde_json::to_string(&names).unwrap());
    assert!(!env_of(&job).contains_key("DBSHIFT_TENANT"));
    assert!(st.tenants.iter().all(|t| t.phase == TenantPhase::Running && t.job == job.metadata.name));
    let run_id = st.run_id.clone().unwrap();

    // What the killed runner left: tenant 0 done and reported, tenant 1 mid-way, tenant 2 nothing.
    let mongo = common::client().await;
    let ok = dbshift::job::JobResult {
        v: 1,
        tenant: names[0].clone(),
        ok: true,
        done: vec![("20250101000000_add_flag".into(), 5, 20)],
        ..Default::default()
    };
    dbshift::job::batch::write(&mongo.database(&names[0]), &run_id, false, &ok).await.unwrap();
    let dir = common::migrations(&[("20250101000000_add_flag.yaml", ADD_FLAG)]);
    let m = dbshift::engine::load_dir(dir.path()).unwrap();
    let rec = Record::of(&m[0], State::Applying, 1, &run_id, "pod".into());
    tracking::save(&mongo.database(&names[1]), tracking::TRACKING, &rec).await.unwrap();
    mongo
        .database(&names[2])
        .collection::<bson::Document>("customers")
        .insert_one(bson::doc! {"_id": 1})
        .await
        .unwrap();

    put(&mut writer, &finished(&job, false));
    let run =
        reconcile_on(&ctx, resource_with(json!({ "maxParallel": 2, "tenantsPerJob": 3, "onFailure": "halt" }), st));
    api.pods(&job, 137, json!("")).await;
    secret(&mut api).await;
    let ev = api.event("TenantsFailed").await;
    let note = ev["note"].as_str().unwrap();
    assert!(
        note.starts_with(&format!("batch of 3 tenant(s) from {}: 1 succeeded, 0 skipped, 2 failed", names[0])),
        "{note}"
    );
    let st = api.status().await;
    api.event("Failed").await;
    run.done(&mut api).await;
    let by = |i: usize| st.tenants.iter().find(|t| t.name == names[i]).unwrap().clone();
    assert_eq!(by(0).phase, TenantPhase::Succeeded);
    assert_eq!(by(0).applied[0].documents_affected, 20, "the result from the tenant's database");
    assert_eq!(by(1).phase, TenantPhase::Failed);
    assert!(by(1).error.unwrap().contains("stopped before it reported"));
    assert_eq!(by(2).phase, TenantPhase::Failed);
    assert!(by(2).error.unwrap().contains("not started") && by(2).job == by(0).job);
    assert_eq!(st.phase, Some(Phase::Failed));
    for t in &names {
        mongo.database(t).drop().await.unwrap();
    }
}

/// A batch Job whose every tenant wrote a successful result is done for the rollout while its
/// pod still exits (seconds on a real cluster): the controller looks at the batch's results
/// while it runs (every second: no Kubernetes event says a tenant finished), takes the outcomes
/// once all succeeded, releases the running pod, announces the batch and ends the run, the Job
/// still Running. With a result missing, or a failed one (it may be a runner stopped by an
/// eviction whose Job retries the batch), it only looks again: the Job's end decides.
#[tokio::test]
async fn a_batch_that_reported_in_full_ends_the_run_before_its_job_ends() {
    let (ctx, mut api, mut writer) = context();
    let p = common::unique("eb");
    let names: Vec<String> = (0..3).map(|i| format!("{p}_{i}")).collect();
    let rollout = json!({ "maxParallel": 2, "tenantsPerJob": 3, "parallelPerJob": 2, "onFailure": "halt" });
    let mut d = resource_with(rollout.clone(), Default::default());
    d.spec.tenants.names = names.clone();
    let run = reconcile_on(&ctx, d.clone());
    secret(&mut api).await;
    api.pod_dry_run(200, Value::Null).await;
    api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
    api.expect("POST", &format!("/api/v1/namespaces/{NS}/configmaps")).await.echo();
    api.event("RunStarted").await;
    let st = api.status().await;
    let job = api.job().await;
    api.event("Migrating").await;
    run.done(&mut api).await;
    let run_id = st.run_id.clone().unwrap();
    put(&mut writer, &job); // running: no condition

    let mongo = common::client().await;
    let report = |i: usize, ok: bool| dbshift::job::JobResult {
        v: 1,
        tenant: names[i].clone(),
        ok,
        done: if ok { vec![("20250101000000_add_flag".into(), 5, 20)] } else { vec![] },
        error: (!ok).then(|| "step 1 (addField): boom; every change of this migration was undone".into()),
        ..Default::default()
    };
    // No result yet: looked at again in a second.
    let mut d = resource_with(rollout.clone(), st.clone());
    d.spec.tenants.names = names.clone();
    let run = reconcile_on(&ctx, d);
    secret(&mut api).await; // the results' connection, kept for the run
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(1)), "looked at again in a moment");

    // The last two (parallelPerJob) decide: one of them has no result yet, but results came
    // in, so the batch's end is near: looked at again sooner.
    for i in [0, 2] {
        dbshift::job::batch::write(&mongo.database(&names[i]), &run_id, false, &report(i, true)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut d = resource_with(rollout.clone(), st.clone());
    d.spec.tenants.names = names.clone();
    let run = reconcile_on(&ctx, d);
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_millis(200)), "its end is near");

    // All three reported, one failed (a runner stopped mid-tenant writes that too): not taken,
    // and no sooner look helps.
    dbshift::job::batch::write(&mongo.database(&names[1]), &run_id, false, &report(1, false)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut d = resource_with(rollout.clone(), st.clone());
    d.spec.tenants.names = names.clone();
    let run = reconcile_on(&ctx, d);
    assert_eq!(run.done(&mut api).await, Requeue::requeue(Duration::from_secs(1)), "a failure waits for the Job's end");

    // The batch retried in a new pod, all three succeeded: the outcomes, at once.
    dbshift::job::batch::write(&mongo.database(&names[1]), &run_id, false, &report(1, true)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut d = resource_with(rollout.clone(), st.clone());
    d.spec.tenants.names = names.clone();
    let run = reconcile_on(&ctx, d);
    api.running_pod_released(&job).await;
    let ev = api.event("TenantsSucceeded").await;
    assert!(ev["note"].as_str().unwrap().contains("3 succeeded, 0 skipped, 0 failed"), "{}", ev["note"]);
    let st = api.status().await;
    api.event("Succeeded").await;
    run.done(&mut api).await;
    assert!(names.iter().all(|n| entry(&st, n) == TenantPhase::Succeeded), "{:?}", st.tenants);
    assert_eq!(st.phase, Some(Phase::Succeeded), "{:?}", st.message);
    let store = ctx.jobs.state();
    assert!(store.iter().any(|j| j.metadata.name == job.metadata.name && j.status.is_none()), "the Job had not ended");
    for t in &names {
        mongo.database(t).drop().await.unwrap();
    }
}
