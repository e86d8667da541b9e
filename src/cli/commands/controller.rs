//! `dbshift controller`: run the Kubernetes operator (see [`crate::controller`]).

use std::time::Duration;

use clap::Args;

use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Default image of the per-tenant Jobs (a resource's jobTemplate.image overrides it).
    #[arg(long, env = "DBSHIFT_RUNNER_IMAGE", default_value = concat!("dbshift:", env!("CARGO_PKG_VERSION")))]
    pub runner_image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DBSHIFT_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the HTTP server for /healthz, /readyz and /metrics.
    #[arg(long, env = "DBSHIFT_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Elect a leader with a Lease, so only one replica acts.
    #[arg(long, env = "DBSHIFT_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Shorthand for `--leader-election false` (a single replica, or a run outside the cluster).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "dbshift-controller")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Seconds a Lease lives without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// Seconds to wait for MongoDB when resolving tenants.
    #[arg(long, default_value_t = 5)]
    pub mongodb_timeout: u64,
    /// Log format.
    #[arg(long, env = "DBSHIFT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Privileges a resource's jobTemplate may ask for, comma-separated (default: none):
    /// hostNetwork, privileged, addCapabilities, privilegeEscalation, runAsRoot, unconfined.
    #[arg(long, env = "DBSHIFT_JOB_ALLOW", default_value = "")]
    pub job_allow: String,
}
pub async fn run(a: &ControllerArgs) -> Result<Exit, Failure> {
    let job_policy = crate::controller::pod_security::JobPolicy::parse(&a.job_allow)
        .map_err(|e| Failure::new(Exit::Invalid, format!("--job-allow (DBSHIFT_JOB_ALLOW): {e}")))?;
    let settings = crate::controller::Settings {
        runner_image: a.runner_image.clone(),
        // An empty DBSHIFT_WATCH_NAMESPACE means every namespace, like an absent one.
        namespace: a.namespace.clone().filter(|n| !n.is_empty()),
        listen: a.listen.clone(),
        leader_election: a.leader_election && !a.no_leader_election,
        lease_name: a.lease_name.clone(),
        lease_namespace: a.lease_namespace.clone(),
        lease_duration: Duration::from_secs(a.lease_seconds.max(3)),
        mongodb_timeout: Duration::from_secs(a.mongodb_timeout.max(1)),
        job_policy,
    };
    match crate::controller::run(&settings).await {
        Ok(()) => Ok(Exit::Ok),
        Err(message) => Err(Failure::new(Exit::Failed, message)),
    }
}
