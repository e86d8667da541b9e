//! `dbshift run`: one tenant, exactly as a Kubernetes Job runs it.
//!
//! Configuration comes from arguments or the environment ([`super::env`]: the operator sets
//! the variables and mounts the URI from a Secret and the migrations from a ConfigMap or an
//! image). The full details go to the tracking collection; a compact [`JobResult`] (at most
//! 4 KiB, the size of a pod's termination message) is written to `--result-file` and printed
//! as the last line of stdout.
//!
//! With `DBSHIFT_BACKUP`, a run that is about to change the tenant first snapshots it (under
//! the tenant lock, before the first change), and keeps the `DBSHIFT_BACKUP_RETENTION` newest
//! snapshots. `--rollback-run RUN` undoes what RUN applied from the engine's rollback data or,
//! when a migration of RUN cannot be undone that way, by restoring the snapshot RUN took.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use mongodb::Database;

use super::env;
use super::result::{BackupInfo, JobResult, RollbackHow};
use crate::backup::{Destination, Found, RestoreOptions, TakenSnapshot};
use crate::engine::runner::{Outcome, OutcomeState, RunError};
use crate::engine::tracking::{self, Record, State};
use crate::engine::{self, planner::Direction, runner, DownRequest, Migration, RunOptions, TenantReport, UpRequest};
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Target version: up to it, or down to it when it is below the current version. Default: latest.
    #[arg(long, env = env::TARGET)]
    pub target: Option<String>,
    /// Instead of migrating, roll back every migration that this run id applied.
    #[arg(long, env = env::ROLLBACK_RUN)]
    pub rollback_run: Option<String>,
    /// Plan only; write nothing.
    #[arg(long, env = env::DRY_RUN)]
    pub dry_run: bool,
    /// Run id recorded with each migration (the operator passes its run's id).
    #[arg(long, env = env::RUN_ID)]
    pub run_id: Option<String>,
    /// Run even though applied migrations changed since they were applied.
    #[arg(long, env = env::ALLOW_CHANGED)]
    pub allow_changed: bool,
    /// Where to write the compact result (skipped when its directory does not exist).
    #[arg(long, env = env::RESULT_FILE, default_value = "/dev/termination-log")]
    pub result_file: PathBuf,
    /// Snapshot the tenant before changing it: `database:<name>` (a database of the same server;
    /// `database` alone is dbshift_snapshots), `dir:<path>` (an existing directory) or `none`.
    #[arg(long, env = env::BACKUP, default_value = "none")]
    pub backup: String,
    /// How many snapshots of the tenant to keep there, newest first (0 keeps all).
    #[arg(long, env = env::BACKUP_RETENTION, default_value_t = 3)]
    pub backup_retention: usize,
    /// A tenant with no tracking record yet (created from a current schema) is first recorded
    /// as baselined up to this version, so it does not replay the history before it.
    #[arg(long, env = env::BASELINE)]
    pub baseline: Option<String>,
    /// Migrate these tenants one after another (a JSON list), each under its own lock, with
    /// its own snapshot, checks and record; each tenant's result is written to its own database
    /// (`_dbshift_results`), a summary to the result file.
    #[arg(long, env = env::BATCH)]
    pub batch: Option<String>,
    /// In a batch, go on after a tenant failed (default: stop at the first failure; the
    /// tenants after it are left untouched).
    #[arg(long, env = env::BATCH_KEEP_GOING)]
    pub batch_keep_going: bool,
    /// In a batch, how many tenants to migrate at once (each under its own lock).
    #[arg(long, env = env::BATCH_PARALLEL, default_value_t = 1)]
    pub batch_parallel: usize,
}

/// What a run needs besides its arguments (from the command line's global settings).
pub struct Settings {
    pub uri: Option<String>,
    pub dir: PathBuf,
    /// The tenants given: a run takes exactly one.
    pub tenants: Vec<String>,
    pub connect_timeout: Duration,
    pub options: RunOptions,
}

/// Run one tenant and write its result. The exit code is the result's.
pub async fn run(s: Settings, a: &RunArgs) -> Exit {
    if let Some(batch) = &a.batch {
        return super::batch::run(s, a, batch).await;
    }
    let tenant = match s.tenants.as_slice() {
        [one] => one.clone(),
        [] => return finish(a, JobResult::failed("", "no tenant: set DBSHIFT_TENANT or pass --tenant", Exit::Invalid)),
        _ => return finish(a, JobResult::failed("", "`run` migrates exactly one tenant", Exit::Invalid)),
    };
    let r = one_tenant(&s, a, &tenant, None).await;
    finish(a, r)
}

/// What the tenants of a batch share: the migrations, loaded once, and one connection.
pub(super) struct Shared {
    pub migrations: Vec<Migration>,
    pub conn: crate::mongo::Connection,
}

/// One tenant's run, as its result (an error is a failed result, secrets redacted).
pub(super) async fn one_tenant(s: &Settings, a: &RunArgs, tenant: &str, shared: Option<&Shared>) -> JobResult {
    let taken = TakenSnapshot::default();
    let mut r = match run_tenant(s, a, tenant, &taken, shared).await {
        Ok(r) => r,
        Err(e) => {
            let redactor = s.uri.as_deref().map(crate::redact::Redactor::for_uri).unwrap_or_default();
            let mut r = JobResult::failed(tenant, &redactor.apply(&e.message), e.exit);
            if a.rollback_run.is_some() {
                r.dir = Direction::Down;
            }
            r
        }
    };
    // A snapshot taken is reported even when the run failed after it.
    r.backup = taken.get().map(|t| BackupInfo::from(&t));
    r
}

/// A run that could not even be configured: its result, written as any other.
pub fn failed(a: &RunArgs, tenants: &[String], f: Failure) -> Exit {
    let tenant = match tenants {
        [one] => one.as_str(),
        _ => "",
    };
    finish(a, JobResult::failed(tenant, &f.message, f.exit))
}

fn attention(message: String) -> Failure {
    Failure::new(Exit::NeedsAttention, message)
}

fn unreachable(e: mongodb::error::Error) -> Failure {
    Failure::new(Exit::Unreachable, format!("reading the tracking collection: {}", crate::mongo::describe(&e)))
}

/// The exit code a tenant's report means.
pub fn report_exit(r: &TenantReport) -> Exit {
    match &r.error {
        None if r.ok => Exit::Ok,
        _ if r.needs_attention() => Exit::NeedsAttention,
        _ => Exit::Failed,
    }
}

async fn run_tenant(
    s: &Settings,
    a: &RunArgs,
    tenant: &str,
    taken: &TakenSnapshot,
    shared: Option<&Shared>,
) -> Result<JobResult, Failure> {
    crate::tenants::check_tenant(tenant)?;
    let dest = Destination::parse(&a.backup).map_err(|e| {
        let f = Failure::from(e);
        Failure::new(f.exit, format!("DBSHIFT_BACKUP (--backup): {}", f.message))
    })?;
    if let Some(d) = &dest {
        d.check(tenant)?;
    }
    let (loaded, connected);
    let (migrations, conn) = match shared {
        Some(sh) => (&sh.migrations, &sh.conn),
        None => {
            loaded = engine::load_dir(&s.dir)?;
            let uri = s.uri.as_deref().ok_or_else(|| {
                Failure::invalid("no MongoDB URI: set DBSHIFT_MONGODB_URI or DBSHIFT_MONGODB_URI_FILE, or pass --uri")
            })?;
            connected = crate::mongo::connect_for_command(uri, s.connect_timeout).await?;
            (&loaded, &connected)
        }
    };
    let migrations = migrations.as_slice();
    let db = conn.client.database(tenant);
    if shared.is_none() && !crate::mongo::supports_transactions(&db).await {
        tracing::warn!("{}", engine::pass::WITHOUT_TRANSACTIONS);
    }
    let mut opts = s.options.clone();
    if let Some(id) = &a.run_id {
        opts.run_id = id.clone();
    }
    opts.dry_run = a.dry_run;
    opts.allow_changed = a.allow_changed;
    if let (Some(d), false) = (&dest, a.dry_run) {
        taken.arm(d, &conn.source, tenant, &mut opts);
    }
    let (report, rollback, restored) = match &a.rollback_run {
        Some(run) => rollback_run(&db, tenant, migrations, run, &opts, dest.as_ref()).await?,
        None => (migrate(&db, tenant, migrations, a, &opts).await?, None, None),
    };
    let mut r = JobResult::from_report(&report, report_exit(&report));
    r.rollback = rollback;
    r.restored = restored;
    if let (Some(d), true) = (&dest, report.ok && taken.get().is_some()) {
        d.retain_logged(&db, a.backup_retention).await;
    }
    Ok(r)
}

/// Up to the target, or down to it when it is below the current version.
async fn migrate(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    a: &RunArgs,
    opts: &RunOptions,
) -> Result<TenantReport, Failure> {
    let records = tracking::load(db, &opts.tracking).await.map_err(unreachable)?;
    let report = match engine::planner::direction_for(&records, a.target.as_deref()) {
        Direction::Down => {
            let req = DownRequest::To(a.target.clone().unwrap_or_default());
            runner::down(db, tenant, migrations, &req, opts).await
        }
        Direction::Up => {
            let req = UpRequest { target: a.target.clone(), only: None, allow_changed: a.allow_changed };
            // A new tenant (no record) is baselined by `up`, under its lock, after its pre-checks.
            let mut opts = opts.clone();
            opts.baseline_new = a.baseline.clone();
            runner::up(db, tenant, migrations, &req, &opts).await
        }
    };
    Ok(report?)
}

fn latest_applied(records: &[Record]) -> Option<String> {
    records.iter().filter(|r| r.state.in_effect()).map(|r| r.version.clone()).max()
}

/// What a rollback did: the report, how, and which snapshot it restored.
type RolledBack = (TenantReport, Option<RollbackHow>, Option<String>);

/// `--rollback-run RUN`: undo what RUN applied. From the engine's rollback data when every
/// migration of RUN has an exact down; else by restoring the snapshot RUN took of this tenant
/// (found in `dest`), which also records RUN's migrations as rolled back. Neither: exit 5,
/// with nothing changed.
async fn rollback_run(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    run: &str,
    opts: &RunOptions,
    dest: Option<&Destination>,
) -> Result<RolledBack, Failure> {
    let records = tracking::load(db, &opts.tracking).await.map_err(unreachable)?;
    let mine: Vec<&Record> = records.iter().filter(|r| r.state == State::Applied && r.run_id == run).collect();
    let irreversible: Vec<String> = mine.iter().filter_map(|r| r.down_ops().err()).collect();
    if irreversible.is_empty() {
        let report = runner::down(db, tenant, migrations, &DownRequest::Run(run.to_string()), opts).await?;
        let how = (!report.migrations.is_empty()).then_some(RollbackHow::Data);
        return Ok((report, how, None));
    }
    let why = irreversible.join("; ");
    let Some(dest) = dest else {
        return Err(attention(format!(
            "run {run} cannot be rolled back from rollback data ({why}), and no backup destination is set \
             (DBSHIFT_BACKUP), so there is no snapshot to restore; nothing was changed"
        )));
    };
    let found = dest.find_by_run(db, run).await?.ok_or_else(|| {
        attention(format!(
            "run {run} cannot be rolled back from rollback data ({why}), and {dest} holds no complete snapshot of \
             {tenant} taken by run {run}; nothing was changed"
        ))
    })?;
    let blocking = applied_since(&records, run, &found);
    if !blocking.is_empty() {
        return Err(attention(format!(
            "run {run} cannot be rolled back from rollback data ({why}), and restoring the snapshot it took \
             ({}) would also undo {}, applied since by other runs; roll those back first. Nothing was changed",
            found.location,
            blocking.join(", ")
        )));
    }
    let from_version = latest_applied(&records);
    if opts.dry_run {
        let planned = mine.iter().map(|r| rolled_back(&r.id, OutcomeState::Planned)).collect();
        let report = down_report(tenant, true, from_version.clone(), from_version, planned);
        return Ok((report, Some(RollbackHow::Snapshot), Some(found.location)));
    }
    let tenant_name = tenant.to_string();
    let (recovered, restored) = runner::with_lock(db, &tenant_name, opts, || async {
        Ok(restore_snapshot_locked(db, run, opts, dest, &found).await)
    })
    .await?;
    let restored = match restored {
        Some(r) => r?,
        // Interrupted work could not be undone: say so, change nothing else.
        None => {
            let mut report = down_report(tenant, false, from_version.clone(), from_version, recovered);
            report.ok = false;
            report.error = report.migrations.iter().find_map(|m| m.error.clone());
            return Ok((report, None, None));
        }
    };
    let to_version = latest_applied(&tracking::load(db, &opts.tracking).await.map_err(unreachable)?);
    Ok(match restored {
        Some(ids) => {
            let mut outs = recovered;
            outs.extend(ids.iter().map(|id| rolled_back(id, OutcomeState::RolledBack)));
            (
                down_report(tenant, false, from_version, to_version, outs),
                Some(RollbackHow::Snapshot),
                Some(found.location),
            )
        }
        // Rolled back by someone else in the meantime: nothing left to do.
        None => (down_report(tenant, false, to_version.clone(), to_version, recovered), None, None),
    })
}

/// Migrations applied by other runs that a restore of `found` would also undo.
fn applied_since(records: &[Record], run: &str, found: &Found) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.state == State::Applied && r.run_id != run)
        .filter(|r| !found.manifest.applied_migrations.contains(&r.id))
        .map(|r| format!("{} (run {})", r.id, r.run_id))
        .collect()
}

/// Under the lock: check again, take the pre-change snapshot, restore `found`. Returns the
/// migrations recorded as rolled back, or `None` when RUN left nothing applied meanwhile.
async fn restore_snapshot_locked(
    db: &Database,
    run: &str,
    opts: &RunOptions,
    dest: &Destination,
    found: &Found,
) -> Result<Option<Vec<String>>, Failure> {
    // Again under the lock: another runner may have changed the tenant meanwhile.
    let records = tracking::load(db, &opts.tracking).await.map_err(unreachable)?;
    if !records.iter().any(|r| r.state == State::Applied && r.run_id == run) {
        return Ok(None);
    }
    let blocking = applied_since(&records, run, found);
    if !blocking.is_empty() {
        return Err(attention(format!(
            "{} was applied by another run meanwhile; nothing was changed",
            blocking.join(", ")
        )));
    }
    if let Some(hook) = &opts.before_change {
        hook(db.clone()).await.map_err(|e| Failure::from(RunError::BeforeChange(e)))?;
    }
    let ro =
        RestoreOptions { tracking: opts.tracking.clone(), rolled_back_by: opts.run_id.clone(), ..Default::default() };
    Ok(Some(dest.restore(db, found, &ro).await?.rolled_back))
}

fn down_report(
    tenant: &str,
    dry_run: bool,
    from_version: Option<String>,
    to_version: Option<String>,
    migrations: Vec<Outcome>,
) -> TenantReport {
    TenantReport {
        tenant: tenant.into(),
        ok: true,
        direction: Direction::Down,
        dry_run,
        from_version,
        to_version,
        migrations,
        error: None,
        prechecks: Vec::new(),
        skipped: false,
        skip_reason: None,
        snapshot: None,
    }
}

fn rolled_back(id: &str, state: OutcomeState) -> Outcome {
    Outcome::new(id, Direction::Down, state)
}

/// Write the result where the controller reads it, and print it.
pub(super) fn finish(a: &RunArgs, r: JobResult) -> Exit {
    let line = r.to_compact_json();
    // The result leaves out tenant values (what a script threw, a duplicate key); the pod's log
    // keeps the whole error, for whoever may read logs.
    if let Some(e) = r.error.as_deref().filter(|e| !line.contains(&serde_json::to_string(e).unwrap_or_default())) {
        tracing::error!(error = %e, "the run failed (whole error; the result shows it without tenant values)");
    }
    result_line(a, &line);
    Exit::from_code(r.code)
}

/// Write `line` to the result file (skipped when its directory does not exist), and print it.
pub(super) fn result_line(a: &RunArgs, line: &str) {
    if a.result_file.parent().is_some_and(|p| p.exists()) {
        if let Err(e) = std::fs::write(&a.result_file, line) {
            tracing::warn!(file = %a.result_file.display(), error = %e, "could not write the result file");
        }
    }
    println!("{line}");
}
