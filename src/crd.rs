//! The `DatabaseMigration` custom resource (`dbshift.io/v1alpha1`, short name `dbm`).
//!
//! These types are the source of the CRD: `dbshift crd` prints it and `crds/` holds the
//! committed copy (a test fails when they differ). Every field's doc comment becomes the
//! description `kubectl explain` prints.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, SecurityContext, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A migration rolled across the tenant databases of one MongoDB: backed up, run as one
/// Kubernetes Job per tenant, validated, and rolled back per the failure policy.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "dbshift.io",
    version = "v1alpha1",
    kind = "DatabaseMigration",
    plural = "databasemigrations",
    shortname = "dbm",
    category = "dbshift",
    doc = "A migration rolled across the tenant databases of one MongoDB: backed up, run as one Kubernetes Job per tenant, validated, and rolled back per the failure policy.",
    namespaced,
    status = "DatabaseMigrationStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress.summary"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetVersion"}"#,
    printcolumn = r#"{"name":"Fleet","type":"string","jsonPath":".status.fleet.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseMigrationSpec {
    /// How to reach MongoDB: a key of a Secret in this namespace holding the connection string.
    /// The URI itself never appears in the resource, its status, events, logs or Job specs.
    pub connection: ConnectionSpec,
    /// Which tenant databases to migrate.
    pub tenants: TenantsSpec,
    /// Where the migration files come from (exactly one source).
    pub migrations: MigrationsSource,
    /// Version (`yyyyMMddHHmmss`) or id to migrate to. Latest when omitted; lower than a
    /// tenant's current version rolls that tenant back down to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{14}(_[a-z0-9_-]+)?$"))]
    pub target: Option<String>,
    /// Active profiles: migrations that list profiles run only when one of them is active.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// Plan only: each Job reports what would run, with document estimates, and writes nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Run even though migrations applied earlier were edited since (checksum differs).
    #[serde(default)]
    pub allow_changed: bool,
    /// Snapshots taken of each tenant before it is changed.
    #[serde(default)]
    pub backup: BackupSpec,
    /// How tenants are rolled out and what a failure does.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Overrides for the per-tenant Jobs.
    #[serde(default)]
    pub job_template: JobTemplateSpec,
    /// Finished runs whose Jobs (and their pods) and ConfigMaps are kept, the newest included;
    /// an older run's are deleted when a run ends (its snapshots and tracking records stay).
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub history_limit: u32,
    /// Start no new Jobs: running ones finish, then the run waits (phase `Suspended`) until
    /// this is false again and goes on where it stopped. Changing it never starts a new run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// `once` (default): the run ends and the resource waits for a change. `continuous`: after
    /// its run ends, the resource keeps re-resolving its tenants every `resyncInterval` and
    /// migrates those that appeared or fell behind its target (and the files a ConfigMap source
    /// gained) as small follow-up runs with the same rollout rules. Tenants that failed or were
    /// rolled back in this generation's runs are not retried until the resource changes.
    /// Changing it never starts a new run.
    #[serde(default, skip_serializing_if = "Mode::is_once")]
    pub mode: Mode,
    /// How often a `continuous` resource looks for new or behind tenants, and how often any
    /// resource's `status.fleet` is counted again: `30s`, `5m`, `2h` (10s to 24h, default 5m).
    /// Changing it never starts a new run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,5}(s|m|h)$"))]
    pub resync_interval: Option<String>,
}

/// Whether a resource follows its tenants after its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// One run per generation.
    #[default]
    Once,
    /// After the run, follow-up runs for tenants that appear or fall behind.
    Continuous,
}

impl Mode {
    pub fn is_once(&self) -> bool {
        *self == Mode::Once
    }
}

/// The default of `spec.resyncInterval`.
pub const DEFAULT_RESYNC: std::time::Duration = std::time::Duration::from_secs(300);

/// `spec.resyncInterval` read: `<n>s`, `<n>m` or `<n>h`, between 10 seconds and 24 hours.
pub fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("spec.resyncInterval {s:?} is not a duration like 30s, 5m or 2h (10s to 24h)");
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(bad()),
    };
    if !(10..=86_400).contains(&secs) {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs(secs))
}

fn default_history_limit() -> u32 {
    3
}

/// A MongoDB connection string kept in a Secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSpec {
    /// The Secret (in this namespace) and key holding the `mongodb://` or `mongodb+srv://` URI.
    pub secret_ref: SecretKeyRef,
}

/// A key of a Secret in the resource's own namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_uri_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_uri_key() -> String {
    "uri".into()
}

/// Tenant databases: explicit names, a pattern over the server's databases, or a registry
/// collection that lists them; then exclusions. Sources add up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantsSpec {
    /// Database names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// A regular expression matched against the server's database names (listDatabases);
    /// `admin`, `local`, `config` and the snapshot database never match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// A collection listing tenant databases, one document per tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<TenantRegistry>,
    /// Databases never migrated, whatever selected them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// A version (`yyyyMMddHHmmss`): a tenant with no tracking record yet (created from a
    /// current schema) is recorded as baselined up to it before it is migrated, instead of
    /// replaying every migration from the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{14}$"))]
    pub baseline: Option<String>,
}

/// A registry collection whose documents name tenant databases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantRegistry {
    /// Database holding the registry collection.
    pub database: String,
    /// The registry collection.
    pub collection: String,
    /// Field holding the tenant database name.
    #[serde(default = "default_registry_field")]
    pub field: String,
    /// Only registry documents matching this filter (MongoDB query, Extended JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub filter: Option<serde_json::Value>,
}

fn default_registry_field() -> String {
    "database".into()
}

/// Where the migration files come from. Exactly one field must be set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationsSource {
    /// A ConfigMap in this namespace whose keys are migration file names
    /// (`<version>_<slug>.yaml`) and whose values are the files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<LocalObjectRef>,
    /// Migration files written into the resource: file name to file content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<BTreeMap<String, String>>,
    /// An image holding a migrations directory, for sets larger than a ConfigMap's 1 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
}

/// An object in the resource's own namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Object name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Migration files inside a container image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// Image reference.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Directory of the migration files inside the image.
    #[serde(default = "default_image_path")]
    pub path: String,
}

fn default_image_path() -> String {
    "/migrations".into()
}

/// Snapshots of each tenant database before it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Take a snapshot of each tenant before migrating it (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where snapshots go. Default: a snapshot database in the same MongoDB, which needs no
    /// storage provisioner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<BackupDestination>,
    /// How many snapshots to keep per tenant (older ones are deleted).
    #[serde(default = "default_retention")]
    #[schemars(range(min = 1, max = 1000))]
    pub retention: u32,
}

impl Default for BackupSpec {
    fn default() -> Self {
        BackupSpec { enabled: true, destination: None, retention: default_retention() }
    }
}

fn yes() -> bool {
    true
}

fn default_retention() -> u32 {
    3
}

/// A snapshot destination. At most one field may be set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupDestination {
    /// A database in the same MongoDB that holds the snapshots (default `dbshift_snapshots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// A PersistentVolumeClaim in this namespace; snapshots are written as mongodump-layout
    /// directories under `<namespace>/<name>/<tenant>/<time>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<LocalClaimRef>,
}

/// A PersistentVolumeClaim in the resource's own namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalClaimRef {
    /// Claim name.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
}

/// How tenants are rolled out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Jobs running at once.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_parallel: u32,
    /// Tenants migrated first, one at a time; the others start only when all canaries succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canaries: Vec<String>,
    /// Failed tenants tolerated before the failure policy applies (0: the first failure).
    #[serde(default)]
    pub max_failures: u32,
    /// What happens once more than `maxFailures` tenants failed.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// Where a run waits for a person to approve it (phase `AwaitingApproval`):
    /// `beforeStart`, before its first Job; `afterCanaries`, once its canaries succeeded and
    /// before the other tenants. `dbshift approve NAME` approves the current run (annotation
    /// `dbshift.io/approve: <run id>`). Changing it never starts a new run.
    #[serde(default)]
    pub approval: Approval,
    /// Maintenance windows: migrations start only inside one (running Jobs finish; rollbacks
    /// are not held). Outside them the phase is `Waiting` and `status.nextWindowStart` says
    /// when the next opens. None: any time. Changing them never starts a new run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub windows: Vec<MaintenanceWindow>,
    /// Tenants each migration Job migrates, one after another, each under its own lock with
    /// its own snapshot, checks and records (1 to 1000, default 1: a Job per tenant). Canaries
    /// always get a Job each; `maxParallel` bounds Jobs, not tenants; a dry run uses 1. Inside a
    /// Job, a failure stops the tenants after it unless `onFailure` is `continue` or
    /// `maxFailures` is above 0. See docs/operator.md, "Tenants per Job".
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schemars(range(min = 1, max = 1000))]
    pub tenants_per_job: u32,
    /// With `tenantsPerJob` above 1: tenants a Job migrates at once (1 to 64, default 1, one
    /// after another). The server then sees up to `maxParallel` × this many tenants at once.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schemars(range(min = 1, max = 64))]
    pub parallel_per_job: u32,
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            max_parallel: 1,
            canaries: Vec::new(),
            max_failures: 0,
            on_failure: FailurePolicy::default(),
            approval: Approval::default(),
            windows: Vec::new(),
            tenants_per_job: 1,
            parallel_per_job: 1,
        }
    }
}

/// A weekly maintenance window, in a time zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    /// The days it opens on (it may close the next day: see `end`).
    #[schemars(length(min = 1, max = 7))]
    pub days: Vec<Weekday>,
    /// When it opens, `HH:MM` (24-hour clock, local time of `timeZone`).
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// When it closes, `HH:MM` or `24:00`; at or before `start`, the next day.
    #[schemars(regex(pattern = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"))]
    pub end: String,
    /// An IANA time zone, e.g. `Europe/Berlin` (default `UTC`).
    #[serde(default = "utc")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".into()
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// Where a run waits for approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Approval {
    /// Never: the run goes on by itself.
    #[default]
    None,
    /// Before the run's first Job.
    BeforeStart,
    /// Once the canaries succeeded, before the other tenants (with no canaries: before the
    /// first Job).
    AfterCanaries,
}

/// The annotation that approves a run: its value is the run id (`status.runId`). An approval
/// naming another run is ignored.
pub const APPROVE_ANNOTATION: &str = "dbshift.io/approve";

impl DatabaseMigrationSpec {
    /// The spec without the fields that steer a run in progress (`suspend`,
    /// `rollout.approval`, `rollout.windows`, `mode`, `resyncInterval`): two specs equal here describe the same run, so changing only those
    /// fields never starts a new one.
    pub fn run_defining(&self) -> DatabaseMigrationSpec {
        let mut s = self.clone();
        s.suspend = false;
        s.rollout.approval = Approval::None;
        s.rollout.windows.clear();
        s.mode = Mode::Once;
        s.resync_interval = None;
        s
    }

    /// `spec.resyncInterval`, or its default (checked by the controller before a run starts).
    pub fn resync(&self) -> std::time::Duration {
        self.resync_interval.as_deref().and_then(|s| parse_interval(s).ok()).unwrap_or(DEFAULT_RESYNC)
    }
}

fn one() -> u32 {
    1
}

/// What a failure does to the rest of the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FailurePolicy {
    /// Stop starting Jobs and roll back every tenant this run changed.
    #[default]
    Rollback,
    /// Stop starting Jobs; leave migrated tenants as they are.
    Halt,
    /// Keep going with the other tenants.
    Continue,
}

/// Overrides for the per-tenant Jobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTemplateSpec {
    /// Runner image (default: the controller's configured runner image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Run the Job's pod in the node's network namespace (for a MongoDB reachable only from the
    /// node). Refused unless the operator allows `hostNetwork` (Helm value jobPolicy.allow).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
    /// Resources of the runner container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Service account of the Job's pod (it needs no Kubernetes API access).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Node selector of the Job's pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the Job's pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Security context of the runner container, merged field by field into the defaults
    /// (non-root, read-only root filesystem, no privilege escalation, all capabilities dropped,
    /// RuntimeDefault seccomp). privileged, added capabilities, privilege escalation, root and
    /// unconfined profiles are refused unless the operator allows them (Helm value
    /// jobPolicy.allow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// The JavaScript heap of each transform whose file sets no `memoryLimit` (`512Mi`, `1Gi`;
    /// 16Mi to 16Gi; default 256Mi). Leave the runner container's memory limit room for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_memory: Option<String>,
    /// Seconds a tenant's Job may run before Kubernetes stops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Retries of a failed Job pod (default 0: a failure is reported, not retried blindly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit: Option<i32>,
    /// Seconds a runner asked to stop (its pod deleted, evicted, or past its deadline) has to
    /// undo the migration in progress and record it before it is killed (default 300). A runner
    /// killed before that leaves the undo to the next runner on the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// Image pull policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The observed state of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseMigrationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the run is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready` (what Flux and Argo CD read), `Reconciling` and `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Identifies this run in Jobs, tracking records and snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The version being migrated to (resolved from the files when `target` is omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Tenant counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// When the run started and finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// A sentence about the run's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Outside every maintenance window: when the next one opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window_start: Option<Time>,
    /// Per-tenant detail (see docs: capped so the resource stays small with many tenants).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<TenantStatus>,
    /// Every selected tenant as its database stands, counted from its tracking collection after
    /// each run and every `resyncInterval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
}

/// The selected tenants as their databases stand (read from their tracking collections).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetStatus {
    /// When they were counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_at: Option<Time>,
    /// Tenants selected now.
    pub tenants: u32,
    /// At the target: nothing of it is pending.
    pub at_target: u32,
    /// Behind the target: new tenants, tenants with pending migrations, and tenants a runner
    /// stopped on mid-way. In `continuous` mode they get a follow-up run.
    pub behind: u32,
    /// Of `behind`: tenants whose migration failed or was rolled back in this generation's runs;
    /// they are not retried until the resource changes.
    #[serde(default)]
    pub held: u32,
    /// Past the target (migrated beyond it by other means); never rolled down automatically.
    #[serde(default)]
    pub ahead: u32,
    /// Tenants whose indexes or validators differ from what their migrations left
    /// (`dbshift status --schema` lists the differences). Not counted for an image source.
    #[serde(default)]
    pub drifted: u32,
    /// Tenants per version in effect (the newest applied or baselined), `none` for a tenant
    /// with no record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionCount>,
    /// `continuous` mode: when the tenants are looked at next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_resync: Option<Time>,
    /// Why the last count failed, when it did (the counts above are from before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `<at target>/<tenants> at target`, with the behind, drifted and held counts, for the printer column.
    pub summary: String,
}

/// How many tenants stand at one version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionCount {
    pub version: String,
    pub tenants: u32,
}

/// Phase of a run. Snapshots and checks happen inside each tenant's Job, so they show per
/// tenant, not as phases of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Waiting to start (inputs missing or being checked).
    Pending,
    /// Tenant Jobs are running.
    Migrating,
    Succeeded,
    Failed,
    /// The failure policy `rollback` is undoing what the run applied.
    RollingBack,
    RolledBack,
    /// The run waits for `dbshift approve` (spec.rollout.approval); no Job runs.
    AwaitingApproval,
    /// spec.suspend: no new Job starts; running ones finish.
    Suspended,
    /// Outside every maintenance window (spec.rollout.windows): no migration starts until the
    /// next opens (`status.nextWindowStart`).
    Waiting,
}

impl Phase {
    /// The name written in the status, conditions and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Migrating => "Migrating",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::RollingBack => "RollingBack",
            Phase::RolledBack => "RolledBack",
            Phase::AwaitingApproval => "AwaitingApproval",
            Phase::Suspended => "Suspended",
            Phase::Waiting => "Waiting",
        }
    }

    /// The run is under way (Jobs may be running, or it waits to go on): it continues.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Phase::Migrating | Phase::RollingBack | Phase::AwaitingApproval | Phase::Suspended | Phase::Waiting
        )
    }

    /// The run waits: for a person (approval, or the resource to be resumed) or for its window.
    pub fn is_held(self) -> bool {
        matches!(self, Phase::AwaitingApproval | Phase::Suspended | Phase::Waiting)
    }

    /// The run is over.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::RolledBack)
    }
}

/// Where one tenant stands in a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum TenantPhase {
    /// Not started yet.
    #[default]
    Pending,
    /// Its Job runs.
    Running,
    Succeeded,
    /// Its migration failed (its own changes were undone by the runner).
    Failed,
    /// Its rollback Job runs (failure policy `rollback`).
    RollingBack,
    RolledBack,
    /// The rollback failed: the tenant needs attention.
    RollbackFailed,
    /// Not migrated, and will not be: the run stopped first, or a pre-check failed under
    /// `onPrecheckFailure: skip` (the tenant is untouched).
    Skipped,
}

/// Tenant counts, Velero-style.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub total: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub running: u32,
    pub pending: u32,
    pub rolled_back: u32,
    /// Not migrated and left untouched: a pre-check failed under `onPrecheckFailure: skip`, or
    /// the run stopped before them.
    #[serde(default)]
    pub skipped: u32,
    /// `succeeded/total`, for the printer column.
    pub summary: String,
}

/// One tenant's part of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// Database name.
    pub name: String,
    /// Where the tenant stands.
    pub phase: TenantPhase,
    /// The tenant's Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<String>,
    /// Migrations done: id, milliseconds, documents affected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<AppliedMigration>,
    /// The snapshot taken before the tenant changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
    /// Checks run / passed, and the failed ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationStatus>,
    /// Pre-checks run / passed before anything changed, and the failed ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precheck: Option<ValidationStatus>,
    /// How the tenant was rolled back, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedMigration {
    pub id: String,
    pub duration_ms: i64,
    pub documents_affected: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// Where the snapshot is (database and prefix, or claim and path).
    pub location: String,
    pub documents: u64,
    pub size_bytes: u64,
    /// Content hash over the snapshot's collections.
    pub sha256: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationStatus {
    pub checks: u32,
    pub passed: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

/// A free-form object (a MongoDB filter) kept as written.
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
}

/// The CRD as YAML, as committed under `crds/`. Enum lists never contain `null`
/// (Kubernetes 1.20 rejects such a CRD; newer servers accept either).
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crd_json()).expect("serializable")
}

/// The CRD as JSON, with its admission-time validation rules.
pub fn crd_json() -> serde_json::Value {
    use kube::CustomResourceExt;
    let mut v = serde_json::to_value(DatabaseMigration::crd()).expect("serializable");
    strip_null_enums(&mut v);
    add_validations(&mut v);
    v
}

/// The CRD for a server of minor version `minor` (1.x): without the CEL rules before 1.25,
/// which does not know `x-kubernetes-validations` (server-side apply and kubectl's schema
/// check refuse the field there). The controller checks the same rules itself either way.
pub fn crd_json_for(minor: u32) -> serde_json::Value {
    let mut v = crd_json();
    if minor < FIRST_WITH_CEL {
        strip_key(&mut v, VALIDATIONS);
    }
    v
}

/// The first Kubernetes minor version whose CRDs take CEL rules by default (1.25, beta).
pub const FIRST_WITH_CEL: u32 = 25;

const VALIDATIONS: &str = "x-kubernetes-validations";

/// The cross-field rules the API server checks when a resource is written (Kubernetes 1.25+),
/// as `(path of the schema, rule, message)`: the same rules as the controller's own checks
/// (controller::inputs::check_spec), which older servers rely on alone. Each message names
/// the field.
const RULES: &[(&str, &str, &str)] = &[
    (
        "spec.migrations",
        "(has(self.configMapRef) ? 1 : 0) + (has(self.inline) ? 1 : 0) + (has(self.image) ? 1 : 0) == 1",
        "spec.migrations must set exactly one of configMapRef, inline, image",
    ),
    (
        "spec.tenants",
        "(has(self.names) && size(self.names) > 0) || has(self.pattern) || has(self.registry)",
        "spec.tenants selects nothing: set names, pattern or registry",
    ),
    (
        "spec.tenants",
        "!has(self.names) || self.names.all(n, !(n in ['admin', 'config', 'local', 'dbshift_snapshots']))",
        "spec.tenants.names: admin, config, local and dbshift_snapshots are never tenants",
    ),
    (
        "spec",
        "!has(self.rollout) || !has(self.rollout.canaries) || has(self.tenants.pattern) || has(self.tenants.registry) \
         || self.rollout.canaries.all(c, has(self.tenants.names) && c in self.tenants.names)",
        "spec.rollout.canaries must be among spec.tenants.names when names are the only tenant source",
    ),
    (
        "spec",
        "!(has(self.mode) && self.mode == 'continuous' && has(self.dryRun) && self.dryRun)",
        "spec.mode continuous with spec.dryRun would plan the same tenants again at every resync: set one of them",
    ),
    (
        "spec.backup.destination",
        "!(has(self.database) && has(self.persistentVolumeClaim))",
        "spec.backup.destination: set database or persistentVolumeClaim, not both",
    ),
    (
        "spec.tenants.registry",
        "size(self.collection) > 0 && (!has(self.field) || size(self.field) > 0)",
        "spec.tenants.registry needs a collection and a field",
    ),
];

/// Most explicit tenant names a resource lists (more: a pattern or a registry), and most
/// canaries: CEL's cost limit needs lists of known size.
pub const MAX_NAMES: usize = 10_000;
pub const MAX_CANARIES: usize = 10;

fn add_validations(crd: &mut serde_json::Value) {
    let root = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for (path, rule, message) in RULES {
        let node = path.split('.').fold(&mut *root, |n, key| &mut n["properties"][key]);
        assert!(node.get("type").is_some(), "no schema at {path}");
        let list = node.as_object_mut().expect("an object schema").entry(VALIDATIONS).or_insert_with(|| json!([]));
        list.as_array_mut().expect("a list").push(json!({ "rule": rule, "message": message }));
    }
    // Database names (the rules compare them; their bounds keep the rules' cost known).
    for (path, max) in [
        ("spec.tenants.names", MAX_NAMES),
        ("spec.tenants.exclude", MAX_NAMES),
        ("spec.rollout.canaries", MAX_CANARIES),
    ] {
        let node = path.split('.').fold(&mut *root, |n, key| &mut n["properties"][key]);
        node["maxItems"] = json!(max);
        node["items"]["maxLength"] = json!(63);
    }
}

fn strip_key(v: &mut serde_json::Value, key: &str) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove(key);
            m.values_mut().for_each(|x| strip_key(x, key));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip_key(x, key)),
        _ => {}
    }
}

fn strip_null_enums(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Array(e)) = m.get_mut("enum") {
                e.retain(|x| !x.is_null());
            }
            for (_, x) in m.iter_mut() {
                strip_null_enums(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_null_enums),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!("../crds/databasemigration.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/databasemigration.yaml is stale: run `cargo run -- crd > crds/databasemigration.yaml`"
        );
    }

    #[test]
    fn cel_rules_only_for_servers_that_know_them() {
        let with = serde_json::to_string(&crd_json_for(32)).unwrap();
        assert_eq!(with.matches(VALIDATIONS).count(), 5, "one block per schema with rules");
        assert_eq!(with.matches("\"rule\"").count(), RULES.len());
        let without = serde_json::to_string(&crd_json_for(20)).unwrap();
        assert!(!without.contains(VALIDATIONS));
        assert!(without.contains("\"maxItems\":10000"), "the bounds stay: 1.20 knows them");
    }

    #[test]
    fn no_null_in_enum_lists() {
        let crd = crd_yaml();
        assert!(!crd.contains("- null"), "a null enum value makes Kubernetes 1.20 reject the CRD");
    }

    #[test]
    fn the_minimal_resource_of_the_issue_parses_with_defaults() {
        let yaml = r#"
apiVersion: dbshift.io/v1alpha1
kind: DatabaseMigration
metadata: { name: add-preferences, namespace: shop }
spec:
  connection: { secretRef: { name: shop-mongo, key: uri } }
  tenants: { pattern: "^tenant_", exclude: [tenant_internal] }
  migrations: { configMapRef: { name: shop-migrations } }
  target: "20250105000000"
  dryRun: false
  backup: { enabled: true }
  rollout: { maxParallel: 2, canaries: [tenant_acme], maxFailures: 0, onFailure: rollback }
  jobTemplate: { image: "dbshift:dev", imagePullPolicy: IfNotPresent }
"#;
        let dbm: DatabaseMigration = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(dbm.spec.rollout.on_failure, FailurePolicy::Rollback);
        assert_eq!(dbm.spec.rollout.max_parallel, 2);
        assert_eq!(dbm.spec.backup.retention, 3);
        assert_eq!(dbm.spec.connection.secret_ref.key, "uri");
        assert_eq!(dbm.spec.job_template.image.as_deref(), Some("dbshift:dev"));
        assert_eq!(dbm.spec.job_template.image_pull_policy, Some(PullPolicy::IfNotPresent));
    }
}
