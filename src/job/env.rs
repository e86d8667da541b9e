//! The environment of a runner pod: every variable `dbshift run` reads. The controller sets
//! them on each Job; the CLI's flags read the same names.

/// The MongoDB connection string (never set by the controller: it mounts a file).
pub const MONGODB_URI: &str = "DBSHIFT_MONGODB_URI";
/// A file holding the connection string (the mounted Secret key).
pub const MONGODB_URI_FILE: &str = "DBSHIFT_MONGODB_URI_FILE";
/// The tenant database the Job migrates.
pub const TENANT: &str = "DBSHIFT_TENANT";
/// A batch (`spec.rollout.tenantsPerJob` above 1): the tenant databases the Job migrates one
/// after another, as a JSON list. Each tenant's result goes to its own database
/// ([`super::batch::RESULTS`]), not the termination message.
pub const BATCH: &str = "DBSHIFT_BATCH";
/// In a batch, go on with the next tenant after one failed (`onFailure: continue`, or
/// `maxFailures` above 0); otherwise the batch stops at its first failure.
pub const BATCH_KEEP_GOING: &str = "DBSHIFT_BATCH_KEEP_GOING";
/// In a batch, tenants migrated at once (`spec.rollout.parallelPerJob`; default 1).
pub const BATCH_PARALLEL: &str = "DBSHIFT_BATCH_PARALLEL";
/// The directory of migration files (a mounted ConfigMap, or files copied from an image).
pub const DIR: &str = "DBSHIFT_DIR";
/// The operator run the Job belongs to (recorded with each migration and snapshot).
pub const RUN_ID: &str = "DBSHIFT_RUN_ID";
/// Target version: up to it, or down to it when below the current version. Absent: latest.
pub const TARGET: &str = "DBSHIFT_TARGET";
/// Undo everything this run id applied, instead of migrating.
pub const ROLLBACK_RUN: &str = "DBSHIFT_ROLLBACK_RUN";
/// Plan only; write nothing.
pub const DRY_RUN: &str = "DBSHIFT_DRY_RUN";
/// Run even though applied migrations changed since they were applied.
pub const ALLOW_CHANGED: &str = "DBSHIFT_ALLOW_CHANGED";
/// Active profiles, comma-separated.
pub const PROFILES: &str = "DBSHIFT_PROFILES";
/// `dbshift run`: a tenant without any tracking record is first baselined to this version.
pub const BASELINE: &str = "DBSHIFT_BASELINE";
/// Where to snapshot the tenant before changing it: a [`crate::backup::Destination`].
pub const BACKUP: &str = "DBSHIFT_BACKUP";
/// How many snapshots of the tenant to keep there.
pub const BACKUP_RETENTION: &str = "DBSHIFT_BACKUP_RETENTION";
/// Where the runner writes its [`super::JobResult`] (default: the termination message).
pub const RESULT_FILE: &str = "DBSHIFT_RESULT_FILE";
/// How long to wait for a tenant another runner holds (`10m`, `30s`, `0`).
pub const LOCK_WAIT: &str = "DBSHIFT_LOCK_WAIT";
/// The JavaScript heap of transforms without a `memoryLimit` (`256Mi`, `1Gi`).
pub const SCRIPT_MEMORY: &str = "DBSHIFT_SCRIPT_MEMORY";
/// The pod's name (from the downward API): names the lock owner in place of the hostname.
pub const POD_NAME: &str = "DBSHIFT_POD_NAME";
/// Log filter (`info`, `debug`, ...) and format (`json` or text).
pub const LOG: &str = "DBSHIFT_LOG";
pub const LOG_FORMAT: &str = "DBSHIFT_LOG_FORMAT";
