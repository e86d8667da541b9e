//! The `dbshift` command line: one file per subcommand in [`commands`], over a shared
//! per-tenant driver ([`fleet`]: connect, select tenants, run on each, print, worst exit).
//! The same binary runs inside each Kubernetes Job (`dbshift run`, see [`crate::job`]) and
//! as the operator (`dbshift controller`).

mod cluster;
mod commands;
mod fleet;
mod output;
mod plugin;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::exit::{Exit, Failure};
use crate::job::env;
use crate::redact::Redactor;

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
    #[arg(long, env = env::MONGODB_URI, hide_env_values = true, global = true)]
    pub uri: Option<String>,
    /// A file holding the MongoDB connection string (e.g. a mounted Secret), used when --uri is not given.
    #[arg(long, env = env::MONGODB_URI_FILE, global = true)]
    pub uri_file: Option<PathBuf>,
    /// Directory of migration files.
    #[arg(long, env = env::DIR, default_value = "migrations", global = true)]
    pub dir: PathBuf,
    /// A tenant database (repeat, or separate with commas).
    #[arg(long = "tenant", env = env::TENANT, value_delimiter = ',', global = true)]
    pub tenant: Vec<String>,
    /// Every database whose name matches this regular expression (found with listDatabases).
    #[arg(long = "tenants", value_name = "REGEX", global = true)]
    pub tenants: Option<String>,
    /// Databases to leave out (repeat, or separate with commas).
    #[arg(long, value_delimiter = ',', global = true)]
    pub exclude: Vec<String>,
    /// Active profiles: migrations with `profiles` run only when one of them is active.
    #[arg(long = "profile", env = env::PROFILES, value_delimiter = ',', global = true)]
    pub profiles: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human", global = true)]
    pub output: Output,
    /// Tracking collection in each tenant database (must start with `_dbshift`).
    #[arg(long, default_value = crate::engine::tracking::TRACKING, global = true)]
    pub tracking_collection: String,
    /// Seconds to wait for MongoDB before giving up on an attempt (3 attempts are made).
    #[arg(long, default_value_t = 10, global = true)]
    pub connect_timeout: u64,
    /// How many tenants to work on at once.
    #[arg(long, default_value_t = 1, global = true)]
    pub parallel: usize,
    /// Seconds a tenant lock lives without renewal (a crashed runner's lock expires after this).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(3..=86_400), global = true)]
    pub lock_ttl: u64,
    /// How long to wait for a tenant another runner holds, then take it and plan again
    /// (`10m`, `90s`, `0` to fail at once).
    #[arg(long, env = env::LOCK_WAIT, default_value = "10m", value_parser = parse_wait, global = true)]
    pub lock_wait: std::time::Duration,
    /// The JavaScript heap of each transform whose file sets no `memoryLimit` (16Mi to 16Gi).
    #[arg(long, env = env::SCRIPT_MEMORY, default_value = "256Mi", value_parser = parse_memory, global = true)]
    pub script_memory: usize,
}

fn parse_memory(s: &str) -> Result<usize, String> {
    crate::engine::script::parse_memory(s.trim())
}

/// A duration such as `10m`, `90s` or `0`, up to a day.
fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    let d = if s.trim() == "0" {
        std::time::Duration::ZERO
    } else {
        humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (write e.g. 10m, 90s or 0)"))?
    };
    if d > std::time::Duration::from_secs(86_400) {
        return Err("at most a day (24h)".into());
    }
    Ok(d)
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new migration file `<now>_<slug>.yaml` in the migrations directory.
    New(commands::new::NewArgs),
    /// Per tenant: applied, pending, changed since applied (checksum), and applied but missing from the files (drift);
    /// with --schema, indexes and validators that differ from what the applied migrations left.
    Status(commands::status::StatusArgs),
    /// What `up` would do, on which tenants, with estimated document counts. Writes nothing.
    Plan(commands::up::UpArgs),
    /// Apply pending migrations.
    Up(commands::up::UpArgs),
    /// Roll back applied migrations (default: the last one).
    Down(commands::down::DownArgs),
    /// Record the migrations up to a version as applied, changing nothing (databases migrated by other means).
    Baseline(commands::baseline::BaselineArgs),
    /// Adopt databases another migration tool migrated: record its applied migrations as baselined.
    Import(commands::import::ImportArgs),
    /// Run the checks of every applied migration.
    Validate,
    /// Write a snapshot of each tenant database to `<out>/<tenant>/` (mongodump layout plus a manifest),
    /// or into a database of the same server (--into-database).
    Backup(commands::backup::BackupArgs),
    /// Bring tenant databases back to a snapshot exactly, and verify counts and hashes.
    Restore(commands::restore::RestoreArgs),
    /// List the snapshots kept in a database (by `backup --into-database`, or `run` with DBSHIFT_BACKUP).
    Snapshots(commands::snapshots::SnapshotsArgs),
    /// Check migration files without touching any database, and warn about risky steps.
    Lint(commands::lint::LintArgs),
    /// Print the JSON Schema of migration files.
    Schema,
    /// Print the DatabaseMigration CustomResourceDefinition (YAML), as committed under crds/.
    Crd,
    /// Run one tenant's migration as a Kubernetes Job does, and write a compact result.
    Run(crate::job::RunArgs),
    /// Run the Kubernetes operator (in-cluster config, or KUBECONFIG outside a cluster).
    Controller(commands::controller::ControllerArgs),
    /// Wait until a DatabaseMigration succeeded (for an application's init container).
    Wait(commands::wait::WaitArgs),
    /// Approve the current run of a DatabaseMigration waiting at its approval gate.
    Approve(commands::approve::ApproveArgs),
    /// Suspend a DatabaseMigration: no new Job starts, running ones finish.
    Suspend(commands::suspend::SuspendArgs),
    /// Resume a suspended DatabaseMigration where its run stopped.
    Resume(commands::suspend::SuspendArgs),
}

/// Entry point of the binary (run as `kubectl-dbshift`, the kubectl plugin).
pub async fn main() -> ExitCode {
    if plugin::invoked() {
        return plugin::main().await;
    }
    crate::redact::install_panic_hook();
    let mut cli = Cli::parse();
    init_logging(&cli.command);
    if let (None, Some(file)) = (&cli.global.uri, &cli.global.uri_file) {
        match std::fs::read_to_string(file) {
            Ok(uri) => cli.global.uri = Some(uri.trim().to_string()),
            Err(e) => {
                eprintln!("error: cannot read the MongoDB URI from {}: {e}", file.display());
                return Exit::Invalid.into();
            }
        }
    }
    let redactor = cli.global.uri.as_deref().map(Redactor::for_uri).unwrap_or_default();
    let result = dispatch(cli).await;
    crate::mongo::shutdown_command_clients().await;
    match result {
        Ok(code) => code.into(),
        Err(e) => {
            eprintln!("error: {}", redactor.apply(&e.message));
            e.exit.into()
        }
    }
}

fn init_logging(command: &Command) {
    let (default, json) = match command {
        Command::Controller(a) => ("info", a.log_format == "json"),
        _ => ("warn", std::env::var(env::LOG_FORMAT).is_ok_and(|v| v == "json")),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env(env::LOG)
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| default.into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { b.json().try_init() } else { b.try_init() };
}

async fn dispatch(cli: Cli) -> Result<Exit, Failure> {
    use commands::*;
    let g = &cli.global;
    crate::engine::script::set_default_memory(g.script_memory);
    match &cli.command {
        Command::New(a) => new::run(g, a),
        Command::Lint(a) => lint::run(g, a),
        Command::Schema => schema::run(),
        Command::Crd => crd::run(),
        Command::Status(a) => status::run(g, a).await,
        Command::Plan(a) => up::run(g, a, true).await,
        Command::Up(a) => up::run(g, a, a.dry_run).await,
        Command::Down(a) => down::run(g, a).await,
        Command::Baseline(a) => baseline::run(g, a).await,
        Command::Import(a) => import::run(g, a).await,
        Command::Validate => validate::run(g).await,
        Command::Backup(a) => backup::run(g, a).await,
        Command::Restore(a) => restore::run(g, a).await,
        Command::Snapshots(a) => snapshots::run(g, a).await,
        Command::Run(a) => Ok(run::run(g, a).await),
        Command::Controller(a) => controller::run(a).await,
        Command::Wait(a) => Ok(wait::run(a).await),
        Command::Approve(a) => approve::run(a).await,
        Command::Suspend(a) => suspend::run(a, true).await,
        Command::Resume(a) => suspend::run(a, false).await,
    }
}
