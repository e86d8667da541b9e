//! `dbshift controller`: the Kubernetes operator.
//!
//! Reconcile is a pipeline: [`inputs`] checks the spec, the Secret, the files and the tenants;
//! [`plan`] freezes the run in a ConfigMap; [`rollout`] decides which per-tenant Jobs
//! ([`jobs`]) run next and applies the failure policy; [`status`] writes the outcome. Only
//! [`reconcile`] talks to the API server. [`pod_security`] decides what a jobTemplate may change
//! about the runner's pod. [`lease`] keeps a single active replica;
//! [`metrics`] serves `/metrics`, `/healthz` and `/readyz`.

pub mod act;
pub mod census;
pub mod frozen;
pub mod inputs;
pub mod jobs;
pub mod lease;
pub mod metrics;
pub mod observe;
pub mod pod_security;
pub mod reconcile;
pub mod report;
pub mod rollout;
pub mod status;
pub mod windows;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;

use crate::crd::DatabaseMigration;

/// Field manager of every write, and the `app.kubernetes.io/managed-by` value of children.
pub const MANAGER: &str = "dbshift-controller";
/// Finalizer that holds a deleted resource until its running Jobs finished.
pub const FINALIZER: &str = "dbshift.io/finalizer";

/// How the controller runs (from `dbshift controller`'s flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Default image of the per-tenant Jobs (a resource's jobTemplate.image overrides it).
    pub runner_image: String,
    /// Watch only this namespace (`None`: every namespace).
    pub namespace: Option<String>,
    /// Address of the HTTP server for /healthz, /readyz and /metrics.
    pub listen: String,
    /// Elect a leader with a Lease, so only one replica acts.
    pub leader_election: bool,
    pub lease_name: String,
    /// Namespace of the Lease (default: the client's namespace).
    pub lease_namespace: Option<String>,
    /// How long a Lease lives without renewal.
    pub lease_duration: Duration,
    /// How long to wait for MongoDB when resolving tenants.
    pub mongodb_timeout: Duration,
    /// The privileges a resource's jobTemplate may ask for.
    pub job_policy: pod_security::JobPolicy,
}

/// Settings the reconciler reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub runner_image: String,
    pub connect_timeout: Duration,
    /// Wait before retrying a run blocked by something that may appear (Secret, MongoDB).
    pub retry: Duration,
    /// The privileges a resource's jobTemplate may ask for.
    pub job_policy: pod_security::JobPolicy,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub config: Config,
    /// Every Job dbshift manages (metadata and status only).
    pub jobs: Store<Job>,
    pub recorder: Recorder,
    pub metrics: Arc<metrics::Metrics>,
    pub runs: Mutex<HashMap<String, observe::RunMemory>>,
    /// Failed reconciles in a row, per resource (for the retry's backoff).
    pub failures: Mutex<HashMap<String, u32>>,
    /// When this process started: Jobs that ended before are not announced again.
    pub started: Timestamp,
}

/// Why a reconcile failed: the step that failed, with its own error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Observe(#[from] observe::ObserveError),
    #[error(transparent)]
    Act(#[from] act::ActError),
    /// Not a failure: a deleted resource keeps its finalizer until its running Jobs end.
    #[error("{0}")]
    Waiting(String),
    /// The finalizer helper could not name its patch (an object without a name).
    #[error("the finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// For the `reconcile_errors` metric and logs.
    fn label(&self) -> &'static str {
        match self {
            Error::Observe(observe::ObserveError::Lost(_)) => "RunLost",
            Error::Observe(_) | Error::Act(act::ActError::Kube { .. }) => "KubernetesError",
            Error::Act(act::ActError::Timeout(_)) => "Timeout",
            Error::Act(act::ActError::TooLarge(_)) => "PlanTooLarge",
            Error::Act(act::ActError::NotOurs(_)) => "ConfigMapConflict",
            Error::Act(act::ActError::PodRefused(_)) => "PodRefused",
            Error::Waiting(_) => "Waiting",
            Error::Finalizer(_) => "FinalizerError",
        }
    }
}

/// A failed reconcile is retried after [`backoff`] of the failures in a row.
fn error_policy(dbm: Arc<DatabaseMigration>, e: &Error, ctx: Arc<Context>) -> Requeue {
    use kube::ResourceExt;
    let key = reconcile::key(&dbm);
    let n = {
        let mut f = ctx.failures.lock().expect("lock");
        let n = f.entry(key).or_insert(0);
        *n += 1;
        *n
    };
    let wait = backoff(n, rand::random::<f64>());
    tracing::warn!(resource = %dbm.name_any(), error = %e, failures = n, retry_in = ?wait, "reconcile failed; retrying");
    ctx.metrics.reconcile_errors.get_or_create(&metrics::ReasonLabel { reason: e.label().into() }).inc();
    Requeue::requeue(wait)
}

/// Exponential backoff for the `n`th failure in a row: 5 s, 10 s, 20 s, ... up to 5 minutes,
/// each within 20% either way (`jitter` in 0..1), so many resources failing at once do not
/// retry in step.
pub fn backoff(n: u32, jitter: f64) -> Duration {
    let base = (5.0 * 2f64.powi(n.saturating_sub(1).min(16) as i32)).min(300.0);
    Duration::from_secs_f64(base * (0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
}

/// Fail fast, with the fix, when the CRD is not installed.
async fn check_crd(dbms: &Api<DatabaseMigration>) -> Result<(), String> {
    match dbms.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(ae)) if ae.code == 404 => Err(
            "the DatabaseMigration CRD is not installed: `dbshift crd | kubectl apply -f -` (or install the Helm chart)"
                .into(),
        ),
        Err(other) => Err(format!("cannot list DatabaseMigrations: {other}")),
    }
}

/// Wait for leadership (a standby replica is healthy and ready; it just does not act).
async fn elect(client: &Client, args: &Settings, identity: &str, health: &metrics::Health) -> Option<lease::Elector> {
    if !args.leader_election {
        return None;
    }
    let ns = args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    let e = lease::Elector::new(
        Api::<Lease>::namespaced(client.clone(), &ns),
        &args.lease_name,
        identity,
        args.lease_duration,
    );
    health.ready.store(true, Ordering::Relaxed);
    e.acquire().await;
    health.ready.store(false, Ordering::Relaxed);
    Some(e)
}

/// The store of every Job dbshift manages, kept by a watch; ready once listed.
async fn job_store(jobs_api: &Api<Job>, selector: &str) -> Result<Store<Job>, String> {
    let (store, writer) = reflector::store();
    let job_events = watcher(jobs_api.clone(), watcher::Config::default().labels(selector))
        .default_backoff()
        .modify(|j: &mut Job| {
            // The store keeps what decisions need: names, labels, owners, status.
            j.metadata.managed_fields = None;
            j.spec = None;
        })
        .reflect(writer)
        .applied_objects();
    tokio::spawn(job_events.for_each(|_| futures::future::ready(())));
    store.wait_until_ready().await.map_err(|e| format!("the Job watch stopped: {e}"))?;
    Ok(store)
}

/// Run the controller until SIGTERM/SIGINT, or until leadership is lost.
pub async fn run(args: &Settings) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot configure a Kubernetes client (in-cluster or KUBECONFIG): {e}"))?;
    let (dbms, jobs_api): (Api<DatabaseMigration>, Api<Job>) = match &args.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    check_crd(&dbms).await?;

    let metrics = Arc::new(metrics::Metrics::default());
    let health = Arc::new(metrics::Health::default());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tokio::spawn(metrics::serve(listener, metrics.clone(), health.clone()));

    let identity = std::env::var("POD_NAME")
        .ok()
        .or_else(|| hostname::get().ok().map(|h| h.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "dbshift".into());
    let elector = elect(&client, args, &identity, &health).await;
    let selector = format!("{}={}", jobs::MANAGED_BY, jobs::MANAGER);
    // Everything from here on acts: it runs only while the Lease is held, renewed from the
    // moment it was won (listing the Jobs may take longer than the Lease lives).
    let work = async {
        let ctx = Arc::new(Context {
            client: client.clone(),
            config: Config {
                runner_image: args.runner_image.clone(),
                connect_timeout: args.mongodb_timeout,
                retry: Duration::from_secs(30),
                job_policy: args.job_policy.clone(),
            },
            jobs: job_store(&jobs_api, &selector).await?,
            recorder: Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance: Some(identity) }),
            metrics,
            runs: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            started: Timestamp::now(),
        });
        health.ready.store(true, Ordering::Relaxed);
        tracing::info!(runner_image = %args.runner_image, namespace = ?args.namespace, "controller started");
        Controller::new(dbms, watcher::Config::default())
            .owns(jobs_api.clone(), watcher::Config::default().labels(&selector))
            .shutdown_on_signal()
            .run(reconcile::reconcile, error_policy, ctx)
            .for_each(|r| {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "reconcile");
                }
                futures::future::ready(())
            })
            .await;
        Ok::<(), String>(())
    };
    match &elector {
        Some(e) => {
            tokio::select! {
                r = work => { e.release().await; r }
                _ = e.hold() => Err("lost the leader Lease; exiting so that only one replica acts".into()),
            }
        }
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_five_minutes() {
        assert_eq!(backoff(1, 0.5), Duration::from_secs(5));
        assert_eq!(backoff(2, 0.5), Duration::from_secs(10));
        assert_eq!(backoff(4, 0.5), Duration::from_secs(40));
        assert_eq!(backoff(40, 0.5), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX, 1.0), Duration::from_secs(360));
        assert_eq!(backoff(1, 0.0), Duration::from_secs(4));
    }
}
