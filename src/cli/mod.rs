//! The `dbshift` command line. The same binary runs inside each Kubernetes Job (`dbshift run`).

mod output;
pub mod run;
mod snapshots;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;

use crate::backup::{self, BackupError};
use crate::engine::{self, loader, lock::LockError, runner::RunError, DownRequest, Migration, RunOptions, UpRequest};
use crate::mongo::ConnectError;
use crate::redact::Redactor;
use crate::tenants::{TenantError, TenantSelector};

pub use output::Output;

#[derive(Parser, Debug)]
#[command(
    name = "dbshift",
    version,
    about = "MongoDB migrations for multi-tenant databases: plan, apply, roll back, validate, snapshot",
    after_help = "Exit codes: 0 success, 1 a migration or check failed (its changes were undone), 2 invalid input \
                  (files, arguments, changed migrations), 3 MongoDB unreachable or erroring, 4 a tenant is locked by \
                  another runner, 5 an undo was incomplete and the database needs attention."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// MongoDB connection string. Never printed or logged.
    #[arg(long, env = "DBSHIFT_MONGODB_URI", hide_env_values = true, global = true)]
    pub uri: Option<String>,
    /// A file holding the MongoDB connection string (e.g. a mounted Secret), used when --uri is not given.
    #[arg(long, env = "DBSHIFT_MONGODB_URI_FILE", global = true)]
    pub uri_file: Option<PathBuf>,
    /// Directory of migration files.
    #[arg(long, env = "DBSHIFT_DIR", default_value = "migrations", global = true)]
    pub dir: PathBuf,
    /// A tenant database (repeat, or separate with commas).
    #[arg(long = "tenant", env = "DBSHIFT_TENANT", value_delimiter = ',', global = true)]
    pub tenant: Vec<String>,
    /// Every database whose name matches this regular expression (found with listDatabases).
    #[arg(long = "tenants", value_name = "REGEX", global = true)]
    pub tenants: Option<String>,
    /// Databases to leave out (repeat, or separate with commas).
    #[arg(long, value_delimiter = ',', global = true)]
    pub exclude: Vec<String>,
    /// Active profiles: migrations with `profiles` run only when one of them is active.
    #[arg(long = "profile", env = "DBSHIFT_PROFILES", value_delimiter = ',', global = true)]
    pub profiles: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human", global = true)]
    pub output: Output,
    /// Tracking collection in each tenant database (must start with `_dbshift`).
    #[arg(long, default_value = engine::tracking::TRACKING, global = true)]
    pub tracking_collection: String,
    /// Seconds to wait for MongoDB before giving up on an attempt (3 attempts are made).
    #[arg(long, default_value_t = 10, global = true)]
    pub connect_timeout: u64,
    /// How many tenants to work on at once.
    #[arg(long, default_value_t = 1, global = true)]
    pub parallel: usize,
    /// Seconds a tenant lock lives without renewal (a crashed runner's lock expires after this).
    #[arg(long, default_value_t = 60, global = true)]
    pub lock_ttl: u64,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new migration file `<now>_<slug>.yaml` in the migrations directory.
    New {
        /// Short name: lowercase letters, digits, `_` or `-`.
        slug: String,
        /// Recorded as the migration's author.
        #[arg(long, env = "DBSHIFT_AUTHOR")]
        author: Option<String>,
    },
    /// Per tenant: applied, pending, changed since applied (checksum), and applied but missing from the files (drift).
    Status,
    /// What `up` would do, on which tenants, with estimated document counts. Writes nothing.
    Plan(UpArgs),
    /// Apply pending migrations.
    Up(UpArgs),
    /// Roll back applied migrations (default: the last one).
    Down(DownArgs),
    /// Run the checks of every applied migration.
    Validate,
    /// Write a snapshot of each tenant database to `<out>/<tenant>/` (mongodump layout plus a manifest),
    /// or into a database of the same server (--into-database).
    Backup {
        /// Directory to write into.
        #[arg(long, required_unless_present = "into_database", conflicts_with = "into_database")]
        out: Option<PathBuf>,
        /// Only these collections (repeat).
        #[arg(long = "collection")]
        collections: Vec<String>,
        /// Compress files with gzip.
        #[arg(long, conflicts_with = "into_database")]
        gzip: bool,
        /// Keep the snapshots in this database of the same server (alone: dbshift_snapshots).
        #[arg(long, value_name = "DB", num_args = 0..=1, default_missing_value = backup::DEFAULT_DATABASE)]
        into_database: Option<String>,
        /// With --into-database: then keep only the N newest complete snapshots of each tenant.
        #[arg(long, value_name = "N", requires = "into_database")]
        keep: Option<usize>,
    },
    /// Bring tenant databases back to a snapshot exactly, and verify counts and hashes.
    Restore {
        /// A snapshot directory, or a directory of per-tenant snapshots written by `backup`.
        #[arg(long, required_unless_present = "from_database", conflicts_with = "from_database")]
        from: Option<PathBuf>,
        /// Only these collections (repeat).
        #[arg(long = "collection")]
        collections: Vec<String>,
        /// Restore from snapshots kept in this database (alone: dbshift_snapshots): the newest
        /// complete snapshot of each tenant, or --snapshot.
        #[arg(long, value_name = "DB", num_args = 0..=1, default_missing_value = backup::DEFAULT_DATABASE)]
        from_database: Option<String>,
        /// With --from-database: this snapshot (an id listed by `dbshift snapshots`).
        #[arg(long, value_name = "ID", requires = "from_database")]
        snapshot: Option<String>,
    },
    /// List the snapshots kept in a database (by `backup --into-database`, or `run` with DBSHIFT_BACKUP).
    Snapshots {
        /// The snapshot database.
        #[arg(long, value_name = "DB", default_value = backup::DEFAULT_DATABASE)]
        database: String,
    },
    /// Check migration files without touching any database.
    Lint,
    /// Print the JSON Schema of migration files.
    Schema,
    /// Print the DatabaseMigration CustomResourceDefinition (YAML), as committed under crds/.
    Crd,
    /// Run one tenant's migration as a Kubernetes Job does, and write a compact result.
    Run(run::RunArgs),
    /// Run the Kubernetes operator (in-cluster config, or KUBECONFIG outside a cluster).
    Controller(crate::controller::ControllerArgs),
    /// Wait until a DatabaseMigration succeeded (for an application's init container).
    Wait(crate::controller::wait::WaitArgs),
}

#[derive(Args, Debug, Clone, Default)]
pub struct UpArgs {
    /// Apply up to and including this version (or id).
    #[arg(long)]
    pub to: Option<String>,
    /// Apply only this migration (version or id).
    #[arg(long)]
    pub only: Option<String>,
    /// Show what would run; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run even though applied migrations changed since they were applied.
    #[arg(long)]
    pub allow_changed: bool,
}

#[derive(Args, Debug, Clone)]
#[group(id = "which", multiple = false)]
pub struct DownArgs {
    /// Roll back every migration above this version (`0` for all).
    #[arg(long, group = "which")]
    pub to: Option<String>,
    /// Roll back the last N migrations.
    #[arg(long, group = "which")]
    pub steps: Option<usize>,
    /// Roll back the last batch (everything the last `up` applied).
    #[arg(long, group = "which")]
    pub batch: bool,
    /// Roll back only this migration.
    #[arg(long, group = "which")]
    pub only: Option<String>,
    /// Show what would be rolled back; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub use crate::exit::Exit;

/// An error for the user: a message and an exit code.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

impl CliError {
    pub fn invalid(m: impl Into<String>) -> Self {
        CliError { exit: Exit::Invalid, message: m.into() }
    }
}

impl From<loader::LoadError> for CliError {
    fn from(e: loader::LoadError) -> Self {
        CliError::invalid(e.to_string().trim_end().to_string())
    }
}

impl From<TenantError> for CliError {
    fn from(e: TenantError) -> Self {
        let exit = if matches!(e, TenantError::List(_)) { Exit::Unreachable } else { Exit::Invalid };
        CliError { exit, message: e.to_string() }
    }
}

impl From<RunError> for CliError {
    fn from(e: RunError) -> Self {
        let exit = match &e {
            RunError::Plan(_) => Exit::Invalid,
            RunError::Lock(LockError::Held { .. }) => Exit::Locked,
            RunError::Lock(LockError::Mongo(_)) | RunError::Mongo { .. } => Exit::Unreachable,
            RunError::Exec(engine::ops::ExecError::Mongo { .. }) => Exit::Unreachable,
            RunError::Exec(_) => Exit::Failed,
            RunError::BeforeChange(_) => Exit::Failed,
        };
        CliError { exit, message: e.to_string() }
    }
}

impl From<BackupError> for CliError {
    fn from(e: BackupError) -> Self {
        let exit = match &e {
            BackupError::Mongo { .. } => Exit::Unreachable,
            BackupError::Invalid(_) => Exit::Invalid,
            BackupError::Io { .. } => Exit::Invalid,
            BackupError::Verify(_) => Exit::NeedsAttention,
        };
        CliError { exit, message: e.to_string() }
    }
}

/// Entry point of the binary.
pub async fn main() -> ExitCode {
    let mut cli = Cli::parse();
    init_logging(&cli.command);
    if let (None, Some(file)) = (&cli.global.uri, &cli.global.uri_file) {
        match std::fs::read_to_string(file) {
            Ok(uri) => cli.global.uri = Some(uri.trim().to_string()),
            Err(e) => {
                eprintln!("error: cannot read the MongoDB URI from {}: {e}", file.display());
                return ExitCode::from(Exit::Invalid as u8);
            }
        }
    }
    let redactor = cli.global.uri.as_deref().map(Redactor::for_uri).unwrap_or_default();
    match dispatch(cli).await {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {}", redactor.apply(&e.message));
            ExitCode::from(e.exit as u8)
        }
    }
}

fn init_logging(command: &Command) {
    let (default, json) = match command {
        Command::Controller(a) => ("info", a.log_format == "json"),
        _ => ("warn", std::env::var("DBSHIFT_LOG_FORMAT").is_ok_and(|v| v == "json")),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DBSHIFT_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| default.into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { b.json().try_init() } else { b.try_init() };
}

pub use crate::mongo::Connection;

impl From<ConnectError> for CliError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Invalid(message) => CliError { exit: Exit::Invalid, message },
            ConnectError::Unreachable(message) => CliError { exit: Exit::Unreachable, message },
        }
    }
}

/// Connect to the server the URI names (it must be given).
pub async fn connect(uri: Option<&str>, timeout: Duration) -> Result<Connection, CliError> {
    let uri = uri.ok_or_else(|| {
        CliError::invalid("no MongoDB URI: pass --uri, or set DBSHIFT_MONGODB_URI or DBSHIFT_MONGODB_URI_FILE")
    })?;
    Ok(crate::mongo::connect(uri, timeout).await?)
}

fn selector(g: &Global, default_db: Option<String>) -> TenantSelector {
    TenantSelector {
        names: g.tenant.clone(),
        pattern: g.tenants.clone(),
        exclude: g.exclude.clone(),
        default: default_db,
    }
}

fn load(dir: &Path) -> Result<Vec<Migration>, CliError> {
    Ok(loader::load_dir(dir)?)
}

/// Files first (bad files change nothing and need no server), then the connection and tenants.
async fn start(g: &Global) -> Result<(Vec<Migration>, Connection, Vec<String>), CliError> {
    let migrations = load(&g.dir)?;
    let conn = connect(g.uri.as_deref(), Duration::from_secs(g.connect_timeout)).await?;
    let tenants = selector(g, conn.default_db.clone()).resolve(&conn.client).await?;
    Ok((migrations, conn, tenants))
}

fn run_options(g: &Global, observer: Arc<dyn engine::runner::Observer>) -> Result<RunOptions, CliError> {
    if !g.tracking_collection.starts_with(engine::tracking::INTERNAL_PREFIX) {
        return Err(CliError::invalid(format!(
            "--tracking-collection must start with `{}`",
            engine::tracking::INTERNAL_PREFIX
        )));
    }
    let mut o = RunOptions::new(new_run_id());
    o.tracking = g.tracking_collection.clone();
    o.profiles = g.profiles.clone();
    o.lock_ttl = Duration::from_secs(g.lock_ttl.max(3));
    o.observer = observer;
    Ok(o)
}

pub fn new_run_id() -> String {
    format!("cli-{}-{:08x}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), rand::random::<u32>())
}

/// Run `f` on every tenant, `parallel` at a time, keeping tenant order in the results.
async fn for_each_tenant<T, F, Fut>(tenants: &[String], parallel: usize, f: F) -> Vec<(String, Result<T, CliError>)>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, CliError>>,
{
    futures::stream::iter(tenants.iter().cloned().map(|t| {
        let fut = f(t.clone());
        async move { (t, fut.await) }
    }))
    .buffered(parallel.max(1))
    .collect()
    .await
}

async fn dispatch(cli: Cli) -> Result<Exit, CliError> {
    let g = &cli.global;
    let out = g.output;
    match &cli.command {
        Command::New { slug, author } => {
            let now = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
            let file = format!("{now}_{slug}.yaml");
            loader::parse_file_name(&file).map_err(|e| CliError::invalid(format!("slug {slug:?}: {e}")))?;
            std::fs::create_dir_all(&g.dir).map_err(|e| CliError::invalid(format!("{}: {e}", g.dir.display())))?;
            let path = g.dir.join(&file);
            if path.exists() {
                return Err(CliError::invalid(format!("{} already exists", path.display())));
            }
            std::fs::write(&path, loader::scaffold(slug, author.as_deref().unwrap_or("")))
                .map_err(|e| CliError::invalid(format!("{}: {e}", path.display())))?;
            // Editors that read `$schema` (the scaffold points at it) validate and complete files.
            let schema = g.dir.join("migration.schema.json");
            if !schema.exists() {
                std::fs::write(&schema, migration_schema())
                    .map_err(|e| CliError::invalid(format!("{}: {e}", schema.display())))?;
            }
            output::print_created(out, &path);
            Ok(Exit::Ok)
        }
        Command::Lint => {
            let migrations = load(&g.dir)?;
            output::print_lint(out, &migrations);
            Ok(Exit::Ok)
        }
        Command::Schema => {
            print!("{}", migration_schema());
            Ok(Exit::Ok)
        }
        Command::Crd => {
            print!("{}", crate::crd::crd_yaml());
            Ok(Exit::Ok)
        }
        Command::Controller(a) => match crate::controller::run(a).await {
            Ok(()) => Ok(Exit::Ok),
            Err(message) => Err(CliError { exit: Exit::Failed, message }),
        },
        Command::Wait(a) => Ok(match crate::controller::wait::run(a).await {
            0 => Exit::Ok,
            1 => Exit::Failed,
            _ => Exit::Unreachable,
        }),
        Command::Status => {
            let (migrations, conn, tenants) = start(g).await?;
            let opts = run_options(g, Arc::new(engine::runner::Quiet))?;
            let results = for_each_tenant(&tenants, g.parallel, |t| {
                let (db, m, o) = (conn.client.database(&t), &migrations, &opts);
                async move { Ok(engine::runner::status(&db, m, o).await?) }
            })
            .await;
            output::print_status(out, &results, &conn.redactor);
            Ok(worst(&results, |_| Exit::Ok))
        }
        Command::Plan(a) | Command::Up(a) => {
            let dry = a.dry_run || matches!(cli.command, Command::Plan(_));
            let (migrations, conn, tenants) = start(g).await?;
            let observer = output::observer(out, tenants.len());
            let mut opts = run_options(g, observer)?;
            opts.dry_run = dry;
            opts.allow_changed = a.allow_changed;
            let req = UpRequest { target: a.to.clone(), only: a.only.clone(), allow_changed: a.allow_changed };
            let results = for_each_tenant(&tenants, g.parallel, |t| {
                let (db, m, o, r) = (conn.client.database(&t), &migrations, &opts, &req);
                async move { Ok(engine::runner::up(&db, &t, m, r, o).await?) }
            })
            .await;
            output::print_reports(out, if dry { "plan" } else { "up" }, &results, &conn.redactor);
            Ok(worst(&results, report_exit))
        }
        Command::Down(a) => {
            let (migrations, conn, tenants) = start(g).await?;
            let mut opts = run_options(g, output::observer(out, tenants.len()))?;
            opts.dry_run = a.dry_run;
            let req = if let Some(t) = &a.to {
                DownRequest::To(t.clone())
            } else if let Some(n) = a.steps {
                DownRequest::Steps(n)
            } else if a.batch {
                DownRequest::LastBatch
            } else if let Some(o) = &a.only {
                DownRequest::Only(o.clone())
            } else {
                DownRequest::Steps(1)
            };
            let results = for_each_tenant(&tenants, g.parallel, |t| {
                let (db, m, o, r) = (conn.client.database(&t), &migrations, &opts, &req);
                async move { Ok(engine::runner::down(&db, &t, m, r, o).await?) }
            })
            .await;
            output::print_reports(out, "down", &results, &conn.redactor);
            Ok(worst(&results, report_exit))
        }
        Command::Validate => {
            let (migrations, conn, tenants) = start(g).await?;
            let opts = run_options(g, Arc::new(engine::runner::Quiet))?;
            let results = for_each_tenant(&tenants, g.parallel, |t| {
                let (db, m, o) = (conn.client.database(&t), &migrations, &opts);
                async move { Ok(engine::runner::validate(&db, m, o).await?) }
            })
            .await;
            output::print_validation(out, &results, &conn.redactor);
            Ok(worst(&results, |checks| if checks.iter().all(|c| c.passed) { Exit::Ok } else { Exit::Failed }))
        }
        Command::Snapshots { database } => snapshots::list(g, database).await,
        Command::Backup { out: None, into_database, collections, keep, .. } => {
            snapshots::backup(g, into_database.as_deref().unwrap_or(backup::DEFAULT_DATABASE), collections, *keep).await
        }
        Command::Restore { from: None, from_database, collections, snapshot } => {
            let store = from_database.as_deref().unwrap_or(backup::DEFAULT_DATABASE);
            snapshots::restore(g, store, snapshot.as_deref(), collections).await
        }
        Command::Backup { out: Some(dir), collections, gzip, .. } => {
            let conn = connect(g.uri.as_deref(), Duration::from_secs(g.connect_timeout)).await?;
            let tenants = selector(g, conn.default_db.clone()).resolve(&conn.client).await?;
            let progress = output::transfer_progress(out);
            let results = for_each_tenant(&tenants, g.parallel, |t| {
                let db = conn.client.database(&t);
                let opts = backup::SnapshotOptions {
                    collections: collections.clone(),
                    gzip: *gzip,
                    source: format!("{}/{t}", conn.source),
                    tracking: g.tracking_collection.clone(),
                    ..Default::default()
                };
                let target = dir.join(&t);
                let p = progress.clone();
                async move { Ok(backup::snapshot(&db, &target, &opts, p.as_deref()).await?) }
            })
            .await;
            output::print_backups(out, dir, &results, &conn.redactor);
            Ok(worst(&results, |_| Exit::Ok))
        }
        Command::Restore { from: Some(from), collections, .. } => {
            let conn = connect(g.uri.as_deref(), Duration::from_secs(g.connect_timeout)).await?;
            let plan = restore_plan(from, g)?;
            let progress = output::transfer_progress(out);
            let results = for_each_tenant(&plan.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(), g.parallel, |t| {
                let db = conn.client.database(&t);
                let src = plan.iter().find(|(n, _)| n == &t).map(|(_, p)| p.clone()).expect("planned");
                let opts = backup::RestoreOptions {
                    collections: collections.clone(),
                    tracking: g.tracking_collection.clone(),
                    ..Default::default()
                };
                let p = progress.clone();
                async move { Ok(backup::restore(&db, &src, &opts, p.as_deref()).await?) }
            })
            .await;
            output::print_restores(out, &results, &conn.redactor);
            Ok(worst(&results, |_| Exit::Ok))
        }
        Command::Run(a) => run::run(g, a).await,
    }
}

/// The JSON Schema of migration files (committed as docs/migration.schema.json).
pub fn migration_schema() -> String {
    let schema = schemars::schema_for!(engine::model::MigrationFile);
    serde_json::to_string_pretty(&schema).expect("serializable") + "\n"
}

/// Which snapshot goes to which database: `--from` is one snapshot (restored into the one
/// tenant given, or the database it was taken from), or a directory of per-tenant snapshots.
fn restore_plan(from: &Path, g: &Global) -> Result<Vec<(String, PathBuf)>, CliError> {
    if from.join(backup::MANIFEST).exists() {
        let m = backup::read_manifest(from)?;
        let target = match g.tenant.as_slice() {
            [] => m.database.clone(),
            [one] => one.clone(),
            _ => return Err(CliError::invalid("one snapshot can be restored into one tenant: give a single --tenant")),
        };
        crate::tenants::check_db_name(&target)?;
        return Ok(vec![(target, from.to_path_buf())]);
    }
    let entries = std::fs::read_dir(from).map_err(|e| CliError::invalid(format!("{}: {e}", from.display())))?;
    let sel = selector(g, None);
    let re = sel.validate()?;
    let mut plan = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.join(backup::MANIFEST).exists() {
            let m = backup::read_manifest(&p)?;
            let chosen = (g.tenant.is_empty() && re.is_none())
                || g.tenant.contains(&m.database)
                || re.as_ref().is_some_and(|r| r.is_match(&m.database));
            if chosen && !g.exclude.contains(&m.database) {
                plan.push((m.database.clone(), p));
            }
        }
    }
    if plan.is_empty() {
        return Err(CliError::invalid(format!("{} holds no snapshot for the selected tenants", from.display())));
    }
    plan.sort();
    Ok(plan)
}

fn report_exit(r: &engine::TenantReport) -> Exit {
    match &r.error {
        None if r.ok => Exit::Ok,
        Some(e) if e.contains("UNDO INCOMPLETE") => Exit::NeedsAttention,
        _ => Exit::Failed,
    }
}

/// The most serious exit code over all tenants.
fn worst<T>(results: &[(String, Result<T, CliError>)], ok: impl Fn(&T) -> Exit) -> Exit {
    Exit::worst(results.iter().map(|(_, r)| match r {
        Ok(v) => ok(v),
        Err(e) => e.exit,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_schema_matches_the_types() {
        let committed = include_str!("../../docs/migration.schema.json");
        assert!(
            committed == super::migration_schema(),
            "docs/migration.schema.json is stale: run `cargo run -- schema > docs/migration.schema.json`"
        );
    }
}
