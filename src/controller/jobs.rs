//! The per-tenant Jobs: names, labels, the pod spec, and what a finished Job says.
//!
//! Pure functions: they take the plan and return objects, and are tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, SecretVolumeSource, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::{Digest, Sha256};

use super::frozen::{trim_name, FrozenRun};
use super::pod_security::{merged_context, RUNNER_UID};
use crate::backup::Destination;
use crate::crd::PullPolicy;
use crate::job::{env, JobResult};
use crate::redact::tenant_values;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "dbshift";
pub const LABEL_MIGRATION: &str = "dbshift.io/migration";
pub const LABEL_RUN: &str = "dbshift.io/run";
pub const LABEL_ACTION: &str = "dbshift.io/action";
pub const LABEL_TENANT: &str = "dbshift.io/tenant";
pub const ANNOTATION_TENANT: &str = "dbshift.io/tenant";
/// On a batch's Job (`tenantsPerJob` above 1): how many tenants it migrates, the first being
/// [`ANNOTATION_TENANT`].
pub const ANNOTATION_BATCH: &str = "dbshift.io/batch";
/// On every runner pod: the pod stays until the controller has read its result (its
/// termination message). An evicted or deleted pod would otherwise be gone, with the tenant's
/// report, before the controller sees its Job end.
pub const POD_FINALIZER: &str = "dbshift.io/runner-result";

/// Where the runner container finds things.
pub const MIGRATIONS_DIR: &str = "/migrations";
pub const URI_DIR: &str = "/var/run/dbshift/connection";
pub const BACKUP_DIR: &str = "/var/run/dbshift/backups";
/// Where the init container of an image source copies the files to.
const COPY_DIR: &str = "/var/run/dbshift/migrations";
/// Seconds a stopped runner has to undo and record the migration in progress.
pub const DEFAULT_GRACE_SECONDS: i64 = 300;

/// What a tenant's Job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Migrate to the target (snapshot first).
    Migrate,
    /// Roll back what the run applied (rollback data, or the run's snapshot).
    Rollback,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Migrate => "migrate",
            Action::Rollback => "rollback",
        }
    }

    pub fn from_label(s: &str) -> Option<Self> {
        match s {
            "migrate" => Some(Action::Migrate),
            "rollback" => Some(Action::Rollback),
            _ => None,
        }
    }
}

/// `<resource name, cut>-<hash of run, tenant, action>`: stable across restarts, unique per
/// run, tenant and action, and short enough for the `job-name` label of the Job's pods.
pub fn job_name(resource: &str, run_id: &str, tenant: &str, action: Action) -> String {
    let mut h = Sha256::new();
    h.update(run_id.as_bytes());
    h.update([0]);
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(action.label().as_bytes());
    let hash = hex::encode(&h.finalize()[..6]);
    let suffix = match action {
        Action::Migrate => "m",
        Action::Rollback => "rb",
    };
    format!("{}-{hash}-{suffix}", trim_name(resource, 36))
}

/// Whether a string may be a label value.
pub fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && (s.is_empty()
            || (s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))))
}

/// Settings of the controller that shape every Job.
#[derive(Debug, Clone)]
pub struct JobDefaults {
    /// Runner image when the resource names none.
    pub image: String,
}

/// The Job that runs `dbshift run` for one tenant.
pub fn build_job(
    plan: &FrozenRun,
    resource: &str,
    namespace: &str,
    owner: OwnerReference,
    tenant: &str,
    action: Action,
    defaults: &JobDefaults,
) -> Job {
    build_batch_job(plan, resource, namespace, owner, &[tenant.to_string()], action, defaults)
}

/// The Job that runs `dbshift run` for a batch of tenants (one after another), named, labelled
/// and annotated after its first; a batch of one is [`build_job`]'s Job.
pub fn build_batch_job(
    plan: &FrozenRun,
    resource: &str,
    namespace: &str,
    owner: OwnerReference,
    tenants: &[String],
    action: Action,
    defaults: &JobDefaults,
) -> Job {
    let tenant = tenants.first().map(String::as_str).unwrap_or_default();
    let t = &plan.spec.job_template;
    let labels = job_labels(&plan.run_id, resource, tenant, action);
    let mut annotations = BTreeMap::from([(ANNOTATION_TENANT.to_string(), tenant.to_string())]);
    if tenants.len() > 1 {
        annotations.insert(ANNOTATION_BATCH.to_string(), tenants.len().to_string());
    }
    let files = Files::of(plan, namespace, resource);
    let container = Container {
        name: "runner".into(),
        image: Some(t.image.clone().unwrap_or_else(|| defaults.image.clone())),
        image_pull_policy: t.image_pull_policy.map(pull_policy),
        args: Some(vec!["run".into()]),
        env: Some(runner_env(plan, tenants, action)),
        volume_mounts: Some(files.mounts),
        resources: t.resources.clone(),
        security_context: Some(merged_context(t.security_context.as_ref())),
        termination_message_path: Some("/dev/termination-log".into()),
        termination_message_policy: Some("File".into()),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        init_containers: (!files.init_containers.is_empty()).then_some(files.init_containers),
        restart_policy: Some("Never".into()),
        // Time to undo the migration in progress when the pod is stopped (see job::run).
        termination_grace_period_seconds: Some(t.termination_grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECONDS)),
        // The runner talks to MongoDB only; it gets no Kubernetes credentials.
        automount_service_account_token: Some(false),
        service_account_name: t.service_account_name.clone(),
        host_network: t.host_network.then_some(true),
        dns_policy: t.host_network.then(|| "ClusterFirstWithHostNet".to_string()),
        node_selector: (!t.node_selector.is_empty()).then(|| t.node_selector.clone()),
        tolerations: (!t.tolerations.is_empty()).then(|| t.tolerations.clone()),
        security_context: Some(PodSecurityContext {
            // Unset only where the operator allows runAsRoot and the template asks for it.
            run_as_non_root: (merged_context(t.security_context.as_ref()).run_as_non_root != Some(false))
                .then_some(true),
            fs_group: Some(RUNNER_UID),
            ..Default::default()
        }),
        volumes: Some(files.volumes),
        ..Default::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(resource, &plan.run_id, tenant, action)),
            namespace: Some(namespace.into()),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(t.backoff_limit.unwrap_or(0)),
            pod_failure_policy: Some(pod_failure_policy()),
            active_deadline_seconds: t.active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    finalizers: Some(vec![POD_FINALIZER.into()]),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// Which failed pods a Job retries (within `backoffLimit`, default 0) and which end it at once
/// (Kubernetes 1.26+; older servers drop the field and count every failure):
/// - a pod evicted or preempted (`DisruptionTarget`): counted, so retried where backoffLimit
///   allows (its runner undid what it started; another pod may succeed);
/// - the runner exiting 1 (a migration or check failed, undone), 2 (invalid input: files, an
///   edited applied migration, a refused change) or 5 (an undo was incomplete): the Job fails at
///   once, as running it again cannot help or must not happen;
/// - anything else (3: MongoDB unreachable, 4: tenant locked, killed, out of memory): counted.
pub fn pod_failure_policy() -> PodFailurePolicy {
    use crate::exit::Exit;
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "Count".into(),
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: Some("True".into()),
                }]),
                ..Default::default()
            },
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some("runner".into()),
                    operator: "In".into(),
                    values: [Exit::Failed, Exit::Invalid, Exit::NeedsAttention].map(|e| i32::from(e.code())).to_vec(),
                }),
                ..Default::default()
            },
        ],
    }
}

/// The labels of a tenant's Job and its pods (names that are not label values are left out:
/// the tenant is always in the annotation).
fn job_labels(run_id: &str, resource: &str, tenant: &str, action: Action) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (MANAGED_BY.to_string(), MANAGER.to_string()),
        ("app.kubernetes.io/name".to_string(), "dbshift-runner".to_string()),
        (LABEL_RUN.to_string(), run_id.to_string()),
        (LABEL_ACTION.to_string(), action.label().to_string()),
    ]);
    if is_label_value(resource) {
        labels.insert(LABEL_MIGRATION.into(), resource.into());
    }
    if is_label_value(tenant) {
        labels.insert(LABEL_TENANT.into(), tenant.into());
    }
    labels
}

/// Whether a batch goes on after a failed tenant: the policy would start more tenants
/// (`onFailure: continue`, or failures tolerated by `maxFailures`).
pub fn keeps_going(plan: &FrozenRun) -> bool {
    let r = &plan.spec.rollout;
    r.on_failure == crate::crd::FailurePolicy::Continue || r.max_failures > 0
}

/// The runner's environment: the contract of [`crate::job::env`].
fn runner_env(plan: &FrozenRun, tenants: &[String], action: Action) -> Vec<EnvVar> {
    let spec = &plan.spec;
    let var = |k: &str, v: &str| EnvVar { name: k.into(), value: Some(v.into()), ..Default::default() };
    // The lock owner names the pod (two pods on one node share the hostname).
    let pod_name = EnvVar {
        name: env::POD_NAME.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), api_version: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let who = match tenants {
        [one] => var(env::TENANT, one),
        many => var(env::BATCH, &serde_json::to_string(many).expect("serializable")),
    };
    let mut env = vec![
        pod_name,
        who,
        var(env::RUN_ID, &plan.run_id),
        var(env::DIR, MIGRATIONS_DIR),
        var(env::MONGODB_URI_FILE, &format!("{URI_DIR}/uri")),
        var(env::LOG_FORMAT, "json"),
        var(env::LOG, "info"),
    ];
    if let Some(target) = &plan.target {
        env.push(var(env::TARGET, target));
    }
    if !spec.profiles.is_empty() {
        env.push(var(env::PROFILES, &spec.profiles.join(",")));
    }
    if spec.allow_changed {
        env.push(var(env::ALLOW_CHANGED, "true"));
    }
    if let Some(b) = &spec.tenants.baseline {
        env.push(var(env::BASELINE, b));
    }
    // A failure inside a batch is the failure policy's as much as one of a Job of its own:
    // the tenants after it start only where the policy would start them.
    if tenants.len() > 1 && keeps_going(plan) {
        env.push(var(env::BATCH_KEEP_GOING, "true"));
    }
    if tenants.len() > 1 && spec.rollout.parallel_per_job > 1 {
        env.push(var(env::BATCH_PARALLEL, &spec.rollout.parallel_per_job.to_string()));
    }
    match action {
        Action::Migrate if spec.dry_run => env.push(var(env::DRY_RUN, "true")),
        Action::Migrate => {}
        Action::Rollback => env.push(var(env::ROLLBACK_RUN, &plan.run_id)),
    }
    if let Some(dest) = backup_destination(plan) {
        env.push(var(env::BACKUP, &dest.to_string()));
        env.push(var(env::BACKUP_RETENTION, &spec.backup.retention.to_string()));
    }
    if let Some(m) = &spec.job_template.script_memory {
        env.push(var(env::SCRIPT_MEMORY, m));
    }
    env
}

/// Where the runner snapshots the tenant (none for a dry run or with backups off).
fn backup_destination(plan: &FrozenRun) -> Option<Destination> {
    let b = &plan.spec.backup;
    if !b.enabled || plan.spec.dry_run {
        return None;
    }
    let d = b.destination.as_ref();
    Some(match d.and_then(|d| d.persistent_volume_claim.as_ref()) {
        // The claim is mounted at the resource's own sub-directory (created by the kubelet).
        Some(_) => Destination::Dir(BACKUP_DIR.into()),
        None => Destination::Database(
            d.and_then(|d| d.database.clone()).unwrap_or_else(|| crate::backup::DEFAULT_DATABASE.into()),
        ),
    })
}

/// The pod's files: the URI from the Secret, a writable /tmp, the migrations (a ConfigMap, or
/// an image's files copied by an init container) and the backup claim.
struct Files {
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
    init_containers: Vec<Container>,
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(read_only), ..Default::default() }
}

impl Files {
    fn of(plan: &FrozenRun, namespace: &str, resource: &str) -> Files {
        let spec = &plan.spec;
        let mut f = Files {
            volumes: vec![
                Volume { name: "connection".into(), secret: Some(uri_secret(spec)), ..Default::default() },
                Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
            ],
            mounts: vec![mount("connection", URI_DIR, true), mount("tmp", "/tmp", false)],
            init_containers: Vec::new(),
        };
        match (&plan.files_config_map, &spec.migrations.image) {
            (Some(cm), _) => {
                f.mounts.push(mount("migrations", MIGRATIONS_DIR, true));
                f.volumes.push(Volume {
                    name: "migrations".into(),
                    config_map: Some(ConfigMapVolumeSource { name: cm.clone(), ..Default::default() }),
                    ..Default::default()
                });
            }
            (None, Some(img)) => {
                f.mounts.push(mount("migrations", MIGRATIONS_DIR, true));
                f.volumes.push(Volume {
                    name: "migrations".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                });
                f.init_containers.push(copy_files(spec, img));
            }
            (None, None) => {}
        }
        let claim = spec.backup.destination.as_ref().and_then(|d| d.persistent_volume_claim.as_ref());
        if let (Some(c), Some(Destination::Dir(_))) = (claim, backup_destination(plan)) {
            f.mounts.push(VolumeMount {
                sub_path: Some(format!("{namespace}/{resource}")),
                ..mount("backups", BACKUP_DIR, false)
            });
            f.volumes.push(Volume {
                name: "backups".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: c.claim_name.clone(),
                    read_only: Some(false),
                }),
                ..Default::default()
            });
        }
        f
    }
}

/// The URI, as the one file `uri` of the Secret's key.
fn uri_secret(spec: &crate::crd::DatabaseMigrationSpec) -> SecretVolumeSource {
    SecretVolumeSource {
        secret_name: Some(spec.connection.secret_ref.name.clone()),
        items: Some(vec![KeyToPath {
            key: spec.connection.secret_ref.key.clone(),
            path: "uri".into(),
            ..Default::default()
        }]),
        // Group-readable: the pod's fsGroup lets the unprivileged runner read it.
        default_mode: Some(0o440),
        optional: Some(false),
        ..Default::default()
    }
}

/// The migrations image only has to hold the files and `cp`; this init container copies them
/// into a volume the runner reads, mounted elsewhere than the image's own directory (which it
/// would hide).
fn copy_files(spec: &crate::crd::DatabaseMigrationSpec, img: &crate::crd::ImageSource) -> Container {
    let t = &spec.job_template;
    Container {
        name: "migrations".into(),
        image: Some(img.image.clone()),
        image_pull_policy: t.image_pull_policy.map(pull_policy),
        command: Some(vec!["cp".into(), "-R".into(), format!("{}/.", img.path.trim_end_matches('/')), COPY_DIR.into()]),
        volume_mounts: Some(vec![mount("migrations", COPY_DIR, false)]),
        security_context: Some(merged_context(t.security_context.as_ref())),
        resources: t.resources.clone(),
        ..Default::default()
    }
}

fn pull_policy(p: PullPolicy) -> String {
    match p {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
    .into()
}

/// Where a Job is.
#[derive(Debug, Clone, PartialEq)]
pub enum JobPhase {
    Running,
    /// Finished: `true` when it succeeded.
    Finished(bool),
}

/// Read a Job's phase from its conditions (`Complete` / `Failed`).
pub fn job_phase(job: &Job) -> JobPhase {
    let conds = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    for c in conds.into_iter().flatten() {
        if c.status == "True" {
            match c.type_.as_str() {
                "Complete" => return JobPhase::Finished(true),
                "Failed" => return JobPhase::Finished(false),
                _ => {}
            }
        }
    }
    JobPhase::Running
}

/// What one tenant's Job reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    /// The runner container started (if not, nothing can have been applied).
    pub ran: bool,
    /// The runner's result, when it wrote one.
    pub result: Option<JobResult>,
    /// Why it failed, when the result does not say (killed, deadline, image missing...).
    pub error: Option<String>,
}

/// A result is the runner's word: whatever runner wrote it (or whoever wrote a batch result
/// into a tenant database), no tenant values go further.
pub fn sanitized(mut r: JobResult) -> JobResult {
    r.error = r.error.map(|e| tenant_values(&e));
    r.failed_checks = r.failed_checks.iter().map(|c| tenant_values(c)).collect();
    r.failed_pre = r.failed_pre.iter().map(|c| tenant_values(c)).collect();
    r
}

/// The outcome of a finished Job, from its pods' termination messages.
pub fn outcome(job: &Job, pods: &[Pod]) -> Outcome {
    let succeeded = job_phase(job) == JobPhase::Finished(true);
    // The newest terminated runner container (a Job with retries has several pods).
    let mut best: Option<(String, i32, Option<String>, Option<String>)> = None;
    for p in pods {
        let statuses = p.status.as_ref().and_then(|s| s.container_statuses.as_ref());
        for cs in statuses.into_iter().flatten().filter(|c| c.name == "runner") {
            if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) {
                let at = t.finished_at.as_ref().map(|f| f.0.to_string()).unwrap_or_default();
                if best.as_ref().is_none_or(|b| at >= b.0) {
                    best = Some((at, t.exit_code, t.message.clone(), t.reason.clone()));
                }
            }
        }
    }
    if let Some((_, code, message, reason)) = best {
        let parsed = message.as_deref().and_then(|m| serde_json::from_str::<JobResult>(m.trim()).ok()).map(sanitized);
        return match parsed {
            Some(r) => Outcome { ok: succeeded && r.ok, ran: true, error: None, result: Some(r) },
            None => Outcome {
                ok: succeeded,
                ran: true,
                result: None,
                error: (!succeeded).then(|| {
                    let mut e = format!("the runner exited with code {code}");
                    if let Some(r) = reason.filter(|r| r != "Error" && r != "Completed") {
                        e.push_str(&format!(" ({r})"));
                    }
                    if let Some(m) = message.filter(|m| !m.trim().is_empty()) {
                        e.push_str(&format!(": {}", tenant_values(&m.trim().chars().take(300).collect::<String>())));
                    }
                    e
                }),
            },
        };
    }
    // The runner never finished: a failed init container, or the Job's own condition, says why.
    for p in pods {
        let inits = p.status.as_ref().and_then(|s| s.init_container_statuses.as_ref());
        for cs in inits.into_iter().flatten() {
            if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()).filter(|t| t.exit_code != 0) {
                let message = t.message.as_deref().map(|m| format!(": {}", m.trim())).unwrap_or_default();
                return Outcome {
                    ok: false,
                    ran: false,
                    result: None,
                    error: Some(format!("init container {} exited with code {}{message}", cs.name, t.exit_code)),
                };
            }
        }
    }
    let reason = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Failed" && c.status == "True"))
        .map(|c| format!("{}: {}", c.reason.clone().unwrap_or_default(), c.message.clone().unwrap_or_default()));
    let ran = pods.iter().any(|p| {
        let statuses = p.status.as_ref().and_then(|s| s.container_statuses.as_ref());
        statuses
            .into_iter()
            .flatten()
            .any(|c| c.name == "runner" && c.state.as_ref().is_some_and(|s| s.waiting.is_none()))
    });
    Outcome {
        ok: succeeded,
        ran,
        result: None,
        error: (!succeeded)
            .then(|| format!("the Job failed before the runner finished ({})", reason.unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::frozen::FrozenRun;

    fn plan(yaml: &str) -> FrozenRun {
        serde_yaml::from_str(yaml).unwrap()
    }

    const PLAN: &str = r#"
runId: shop-g2-abc123
generation: 2
target: "20250105000000"
tenants: [tenant_acme, tenant_b]
canaries: 1
filesConfigMap: shop-g2-abc123-files
spec:
  connection: { secretRef: { name: shop-mongo, key: uri } }
  tenants: { pattern: "^tenant_" }
  migrations: { configMapRef: { name: shop-migrations } }
  profiles: [staging]
  jobTemplate: { image: "dbshift:dev", imagePullPolicy: IfNotPresent, hostNetwork: true }
"#;

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "dbshift.io/v1alpha1".into(),
            kind: "DatabaseMigration".into(),
            name: "shop".into(),
            uid: "u".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn env(job: &Job) -> BTreeMap<String, String> {
        let c = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect()
    }

    #[test]
    fn job_names_are_stable_unique_and_short() {
        let a = job_name("add-preferences", "r1", "tenant_a", Action::Migrate);
        assert_eq!(a, job_name("add-preferences", "r1", "tenant_a", Action::Migrate));
        assert_ne!(a, job_name("add-preferences", "r1", "tenant_b", Action::Migrate));
        assert_ne!(a, job_name("add-preferences", "r2", "tenant_a", Action::Migrate));
        assert_ne!(a, job_name("add-preferences", "r1", "tenant_a", Action::Rollback));
        let long = job_name(&"x".repeat(253), "r1", "t", Action::Rollback);
        assert!(long.len() <= 52, "{long}");
    }

    #[test]
    fn the_job_carries_references_never_the_uri() {
        let p = plan(PLAN);
        let job =
            build_job(&p, "shop", "ns", owner(), "tenant_b", Action::Migrate, &JobDefaults { image: "d:1".into() });
        let yaml = serde_yaml::to_string(&job).unwrap();
        assert!(!yaml.contains("mongodb://"));
        let e = env(&job);
        assert_eq!(e["DBSHIFT_TENANT"], "tenant_b");
        assert_eq!(e["DBSHIFT_RUN_ID"], "shop-g2-abc123");
        assert_eq!(e["DBSHIFT_TARGET"], "20250105000000");
        assert_eq!(e["DBSHIFT_PROFILES"], "staging");
        assert_eq!(e["DBSHIFT_BACKUP"], "database:dbshift_snapshots");
        assert_eq!(e["DBSHIFT_MONGODB_URI_FILE"], "/var/run/dbshift/connection/uri");
        assert!(!e.contains_key("DBSHIFT_DRY_RUN"));
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.host_network, Some(true));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("dbshift:dev"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_RUN], "shop-g2-abc123");
        assert_eq!(labels[LABEL_TENANT], "tenant_b");
        assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(0));
        let meta = job.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
        assert_eq!(meta.finalizers, Some(vec![POD_FINALIZER.to_string()]), "a pod stays until its result is read");
    }

    #[test]
    fn rollback_and_dry_run_jobs() {
        let mut p = plan(PLAN);
        let d = JobDefaults { image: "d:1".into() };
        let rb = build_job(&p, "shop", "ns", owner(), "tenant_b", Action::Rollback, &d);
        assert_eq!(env(&rb)["DBSHIFT_ROLLBACK_RUN"], "shop-g2-abc123");
        p.spec.dry_run = true;
        let dry = build_job(&p, "shop", "ns", owner(), "tenant_b", Action::Migrate, &d);
        let e = env(&dry);
        assert_eq!(e["DBSHIFT_DRY_RUN"], "true");
        assert!(!e.contains_key("DBSHIFT_BACKUP"), "a dry run takes no snapshot");
    }

    #[test]
    fn image_sources_copy_files_in_an_init_container() {
        let mut p = plan(PLAN);
        p.files_config_map = None;
        p.spec.migrations = serde_yaml::from_str("image: { image: 'shop-migrations:3', path: /m/ }").unwrap();
        let job = build_job(&p, "shop", "ns", owner(), "tenant_b", Action::Migrate, &JobDefaults { image: "d".into() });
        let pod = job.spec.unwrap().template.spec.unwrap();
        let init = &pod.init_containers.unwrap()[0];
        assert_eq!(init.image.as_deref(), Some("shop-migrations:3"));
        assert_eq!(init.command.as_ref().unwrap()[2], "/m/.");
    }

    fn pod_with(message: &str, code: i32) -> Pod {
        serde_yaml::from_str(&format!(
            r#"
metadata: {{ name: p }}
status:
  containerStatuses:
  - name: runner
    image: x
    imageID: ""
    ready: false
    restartCount: 0
    state: {{ terminated: {{ exitCode: {code}, reason: Error, message: '{message}' }} }}
"#
        ))
        .unwrap()
    }

    fn job_with(cond: &str) -> Job {
        serde_yaml::from_str(&format!(
            "metadata: {{ name: j }}\nstatus: {{ conditions: [ {{ type: {cond}, status: 'True' }} ] }}"
        ))
        .unwrap()
    }

    #[test]
    fn outcomes_come_from_the_termination_message() {
        let ok =
            r#"{"v":1,"tenant":"t","ok":true,"dir":"up","done":[["20250101000000_a",5,10]],"checks":[1,1],"code":0}"#;
        let o = outcome(&job_with("Complete"), &[pod_with(ok, 0)]);
        assert!(o.ok);
        assert_eq!(o.result.unwrap().done[0].2, 10);

        let o = outcome(&job_with("Failed"), &[pod_with("killed", 137)]);
        assert!(!o.ok);
        assert!(o.error.unwrap().contains("code 137"));

        let o = outcome(&job_with("Failed"), &[]);
        assert!(o.error.unwrap().contains("before the runner finished"));
    }
}
