//! `dbshift run`: one tenant, exactly as a Kubernetes Job runs it.
//!
//! Configuration comes from arguments or the environment (the operator sets `DBSHIFT_*`
//! variables and mounts the URI from a Secret and the migrations from a ConfigMap or an
//! image). The full details go to the tracking collection; a compact result (at most 4 KiB,
//! the size of a pod's termination message) is written to `--result-file` and printed as the
//! last line of stdout.
//!
//! With `DBSHIFT_BACKUP`, a run that is about to change the tenant first snapshots it (under
//! the tenant lock, before the first change), and keeps the `DBSHIFT_BACKUP_RETENTION` newest
//! snapshots. `--rollback-run RUN` undoes what RUN applied from the engine's rollback data or,
//! when a migration of RUN cannot be undone that way, by restoring the snapshot RUN took.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use mongodb::Database;
use serde::{Deserialize, Serialize};

use super::{connect, load, run_options, CliError, Exit, Global};
use crate::backup::{Destination, RestoreOptions, SnapshotOptions, Taken};
use crate::engine::lock::Lease;
use crate::engine::runner::{BeforeChange, Outcome, RunError};
use crate::engine::tracking::{self, State};
use crate::engine::{self, planner::Direction, runner, DownRequest, Migration, RunOptions, TenantReport, UpRequest};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Target version: up to it, or down to it when it is below the current version. Default: latest.
    #[arg(long, env = "DBSHIFT_TARGET")]
    pub target: Option<String>,
    /// Instead of migrating, roll back every migration that this run id applied.
    #[arg(long, env = "DBSHIFT_ROLLBACK_RUN")]
    pub rollback_run: Option<String>,
    /// Plan only; write nothing.
    #[arg(long, env = "DBSHIFT_DRY_RUN")]
    pub dry_run: bool,
    /// Run id recorded with each migration (the operator passes its run's id).
    #[arg(long, env = "DBSHIFT_RUN_ID")]
    pub run_id: Option<String>,
    /// Run even though applied migrations changed since they were applied.
    #[arg(long, env = "DBSHIFT_ALLOW_CHANGED")]
    pub allow_changed: bool,
    /// Where to write the compact result (skipped when its directory does not exist).
    #[arg(long, env = "DBSHIFT_RESULT_FILE", default_value = "/dev/termination-log")]
    pub result_file: PathBuf,
    /// Snapshot the tenant before changing it: `database:<name>` (a database of the same server;
    /// `database` alone is dbshift_snapshots), `dir:<path>` (an existing directory) or `none`.
    #[arg(long, env = "DBSHIFT_BACKUP", default_value = "none")]
    pub backup: String,
    /// How many snapshots of the tenant to keep there, newest first (0 keeps all).
    #[arg(long, env = "DBSHIFT_BACKUP_RETENTION", default_value_t = 3)]
    pub backup_retention: usize,
}

/// The snapshot a run took before changing the tenant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupInfo {
    /// `database:<db>/<snapshot id>` or `dir:<path>`.
    pub at: String,
    pub docs: u64,
    pub bytes: u64,
    /// The whole snapshot's hash: SHA-256 over its collections' names and content hashes.
    pub sha256: String,
    pub ms: u64,
}

impl From<&Taken> for BackupInfo {
    fn from(t: &Taken) -> Self {
        BackupInfo {
            at: t.location.clone(),
            docs: t.manifest.total_documents,
            bytes: t.manifest.total_bytes,
            sha256: t.manifest.sha256.clone(),
            ms: t.manifest.duration_ms,
        }
    }
}

/// The compact result of one tenant's run. Field names are short: it must fit in 4 KiB.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    /// Format version.
    pub v: u32,
    pub tenant: String,
    pub ok: bool,
    /// `up` or `down`.
    pub dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Migrations done: [id, milliseconds, documents].
    #[serde(default)]
    pub done: Vec<(String, i64, i64)>,
    /// How many more were done than listed (the list is cut to stay small).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub more: usize,
    /// Checks run and passed.
    #[serde(default)]
    pub checks: (usize, usize),
    /// Failed checks, cut short: "migration: check on collection: message".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_checks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process exit code.
    pub code: u8,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The snapshot taken before the run changed the tenant (with `DBSHIFT_BACKUP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupInfo>,
    /// How `--rollback-run` undid the run: `data` (rollback data) or `snapshot` (a restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
    /// The snapshot a `snapshot` rollback restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Largest result written (a termination message holds 4096 bytes).
pub const MAX_RESULT: usize = 4000;

fn cut(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

impl JobResult {
    /// Serialize, shortening lists and messages until it fits.
    pub fn to_compact_json(&self) -> String {
        let mut r = self.clone();
        r.error = r.error.map(|e| cut(&e, 1500));
        r.failed_checks = r.failed_checks.iter().take(5).map(|c| cut(c, 200)).collect();
        loop {
            let s = serde_json::to_string(&r).expect("serializable");
            if s.len() <= MAX_RESULT || (r.done.is_empty() && r.failed_checks.is_empty()) {
                return if s.len() <= MAX_RESULT { s } else { cut(&s, MAX_RESULT) };
            }
            if !r.failed_checks.is_empty() {
                r.failed_checks.pop();
            } else {
                r.done.pop();
                r.more += 1;
            }
        }
    }

    fn from_report(rep: &engine::TenantReport, code: Exit) -> Self {
        let checks: Vec<_> = rep.migrations.iter().flat_map(|m| m.validation.iter()).collect();
        JobResult {
            v: 1,
            tenant: rep.tenant.clone(),
            ok: rep.ok,
            dir: if rep.direction == Direction::Up { "up".into() } else { "down".into() },
            from: rep.from_version.clone(),
            to: rep.to_version.clone(),
            done: rep
                .migrations
                .iter()
                .filter(|m| m.state != "failed")
                .map(|m| (m.id.clone(), m.duration_ms, m.documents_affected))
                .collect(),
            more: 0,
            checks: (checks.len(), checks.iter().filter(|c| c.passed).count()),
            failed_checks: checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| format!("{}: {} on {}: {}", c.migration, c.check, c.collection, c.message))
                .collect(),
            error: rep.error.clone(),
            code: code as u8,
            dry_run: rep.dry_run,
            ..Default::default()
        }
    }
}

pub async fn run(g: &Global, a: &RunArgs) -> Result<Exit, CliError> {
    let tenant = match g.tenant.as_slice() {
        [one] => one.clone(),
        [] => return finish(a, JobResult::failed("", "no tenant: set DBSHIFT_TENANT or pass --tenant", Exit::Invalid)),
        _ => return finish(a, JobResult::failed("", "`run` migrates exactly one tenant", Exit::Invalid)),
    };
    let taken = Snapshots::default();
    let mut r = match run_inner(g, a, &tenant, &taken).await {
        Ok(r) => r,
        Err(e) => {
            let redactor = g.uri.as_deref().map(crate::redact::Redactor::for_uri).unwrap_or_default();
            let mut r = JobResult::failed(&tenant, &redactor.apply(&e.message), e.exit);
            if a.rollback_run.is_some() {
                r.dir = "down".into();
            }
            r
        }
    };
    // A snapshot taken is reported even when the run failed after it.
    r.backup = taken.info.lock().expect("lock").take();
    finish(a, r)
}

impl JobResult {
    fn failed(tenant: &str, error: &str, code: Exit) -> Self {
        JobResult {
            v: 1,
            tenant: tenant.into(),
            ok: false,
            dir: "up".into(),
            error: Some(error.into()),
            code: code as u8,
            ..Default::default()
        }
    }
}

/// What the snapshot hook took, or why it failed (the runner only passes on its message).
#[derive(Default, Clone)]
struct Snapshots {
    info: Arc<Mutex<Option<BackupInfo>>>,
    failed: Arc<Mutex<Option<Exit>>>,
}

impl Snapshots {
    /// A hook that snapshots the tenant into `dest` before the runner changes it.
    fn hook(&self, dest: Destination, opts: SnapshotOptions) -> BeforeChange {
        let me = self.clone();
        Arc::new(move |db: Database| {
            let (me, dest, opts) = (me.clone(), dest.clone(), opts.clone());
            Box::pin(async move {
                match dest.take(&db, &opts).await {
                    Ok(t) => {
                        *me.info.lock().expect("lock") = Some(BackupInfo::from(&t));
                        Ok(())
                    }
                    Err(e) => {
                        let e = CliError::from(e);
                        *me.failed.lock().expect("lock") = Some(e.exit);
                        Err(format!("the snapshot before the run failed, so nothing was changed: {}", e.message))
                    }
                }
            })
        })
    }

    /// A runner error, with the exit code of a failed snapshot.
    fn error(&self, e: RunError) -> CliError {
        match e {
            RunError::BeforeChange(message) => {
                CliError { exit: self.failed.lock().expect("lock").unwrap_or(Exit::Failed), message }
            }
            e => e.into(),
        }
    }
}

fn attention(message: String) -> CliError {
    CliError { exit: Exit::NeedsAttention, message }
}

async fn run_inner(g: &Global, a: &RunArgs, tenant: &str, snaps: &Snapshots) -> Result<JobResult, CliError> {
    crate::tenants::check_db_name(tenant)?;
    let dest = Destination::parse(&a.backup)?;
    if let Some(d) = &dest {
        d.check(tenant)?;
    }
    let migrations = load(&g.dir)?;
    let conn = connect(g.uri.as_deref(), Duration::from_secs(g.connect_timeout)).await?;
    let db = conn.client.database(tenant);
    let mut opts = run_options(g, Arc::new(runner::Quiet))?;
    if let Some(id) = &a.run_id {
        opts.run_id = id.clone();
    }
    opts.dry_run = a.dry_run;
    opts.allow_changed = a.allow_changed;
    if let (Some(d), false) = (&dest, a.dry_run) {
        let so = SnapshotOptions {
            source: format!("{}/{tenant}", conn.source),
            tracking: opts.tracking.clone(),
            run_id: Some(opts.run_id.clone()),
            ..Default::default()
        };
        opts.before_change = Some(snaps.hook(d.clone(), so));
    }
    let (report, rollback, restored) = if let Some(run) = &a.rollback_run {
        rollback_run(&db, tenant, &migrations, run, &opts, dest.as_ref(), snaps).await?
    } else {
        let records = tracking::load(&db, &opts.tracking).await.map_err(|e| CliError {
            exit: Exit::Unreachable,
            message: format!("reading the tracking collection: {e}"),
        })?;
        let report = match engine::planner::direction_for(&records, a.target.as_deref()) {
            Direction::Down => {
                let req = DownRequest::To(a.target.clone().unwrap_or_default());
                runner::down(&db, tenant, &migrations, &req, &opts).await
            }
            Direction::Up => {
                let req = UpRequest { target: a.target.clone(), only: None, allow_changed: a.allow_changed };
                runner::up(&db, tenant, &migrations, &req, &opts).await
            }
        };
        (report.map_err(|e| snaps.error(e))?, None, None)
    };
    let code = super::report_exit(&report);
    let mut r = JobResult::from_report(&report, code);
    r.rollback = rollback.map(str::to_string);
    r.restored = restored;
    if let (Some(d), true) = (&dest, report.ok && snaps.info.lock().expect("lock").is_some()) {
        match d.retain(&db, a.backup_retention).await {
            Ok(deleted) if !deleted.is_empty() => tracing::info!(?deleted, "deleted older snapshots"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not delete older snapshots"),
        }
    }
    Ok(r)
}

fn latest_applied(records: &[tracking::Record]) -> Option<String> {
    records.iter().filter(|r| r.state == State::Applied).map(|r| r.version.clone()).max()
}

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
    snaps: &Snapshots,
) -> Result<(TenantReport, Option<&'static str>, Option<String>), CliError> {
    let unreachable = |e: mongodb::error::Error| CliError {
        exit: Exit::Unreachable,
        message: format!("reading the tracking collection: {e}"),
    };
    let records = tracking::load(db, &opts.tracking).await.map_err(unreachable)?;
    let mine: Vec<&tracking::Record> =
        records.iter().filter(|r| r.state == State::Applied && r.run_id == run).collect();
    let irreversible: Vec<String> = mine.iter().filter_map(|r| r.down_ops().err()).collect();
    if irreversible.is_empty() {
        let report = runner::down(db, tenant, migrations, &DownRequest::Run(run.to_string()), opts)
            .await
            .map_err(|e| snaps.error(e))?;
        let how = (!report.migrations.is_empty()).then_some("data");
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
    // The snapshot predates every migration applied since: restoring it must undo only RUN's.
    let later = |records: &[tracking::Record]| -> Vec<String> {
        records
            .iter()
            .filter(|r| r.state == State::Applied && r.run_id != run)
            .filter(|r| !found.manifest.applied_migrations.contains(&r.id))
            .map(|r| format!("{} (run {})", r.id, r.run_id))
            .collect()
    };
    let blocking = later(&records);
    if !blocking.is_empty() {
        return Err(attention(format!(
            "run {run} cannot be rolled back from rollback data ({why}), and restoring the snapshot it took \
             ({}) would also undo {}, applied since by other runs; roll those back first. Nothing was changed",
            found.location,
            blocking.join(", ")
        )));
    }
    let from_version = latest_applied(&records);
    let planned: Vec<Outcome> = mine.iter().map(|r| rolled_back(&r.id, 0, "planned")).collect();
    if opts.dry_run {
        let report = TenantReport {
            tenant: tenant.into(),
            ok: true,
            direction: Direction::Down,
            dry_run: true,
            from_version: from_version.clone(),
            to_version: from_version,
            migrations: planned,
            error: None,
        };
        return Ok((report, Some("snapshot"), Some(found.location)));
    }
    let lease = Lease::acquire(db, &opts.owner, &opts.run_id, opts.lock_ttl).await.map_err(RunError::from)?;
    let result = async {
        // Again under the lock: another runner may have changed the tenant meanwhile.
        let records = tracking::load(db, &opts.tracking).await.map_err(unreachable)?;
        if !records.iter().any(|r| r.state == State::Applied && r.run_id == run) {
            return Ok(None);
        }
        let blocking = later(&records);
        if !blocking.is_empty() {
            return Err(attention(format!(
                "{} was applied by another run meanwhile; nothing was changed",
                blocking.join(", ")
            )));
        }
        if let Some(hook) = &opts.before_change {
            hook(db.clone()).await.map_err(|e| snaps.error(RunError::BeforeChange(e)))?;
        }
        let ro = RestoreOptions {
            tracking: opts.tracking.clone(),
            rolled_back_by: opts.run_id.clone(),
            ..Default::default()
        };
        let rep = dest.restore(db, &found, &ro).await?;
        Ok(Some(rep))
    }
    .await;
    let released = lease.release().await;
    let restored = result?;
    if let Err(e) = released {
        tracing::warn!(error = %e, "could not release the lock");
    }
    let records = tracking::load(db, &opts.tracking).await.map_err(unreachable)?;
    let Some(rep) = restored else {
        // Rolled back by someone else in the meantime: nothing left to do.
        let v = latest_applied(&records);
        let report = TenantReport {
            tenant: tenant.into(),
            ok: true,
            direction: Direction::Down,
            dry_run: false,
            from_version: v.clone(),
            to_version: v,
            migrations: vec![],
            error: None,
        };
        return Ok((report, None, None));
    };
    let report = TenantReport {
        tenant: tenant.into(),
        ok: true,
        direction: Direction::Down,
        dry_run: false,
        from_version,
        to_version: latest_applied(&records),
        migrations: rep.rolled_back.iter().map(|id| rolled_back(id, 0, "rolled_back")).collect(),
        error: None,
    };
    Ok((report, Some("snapshot"), Some(found.location)))
}

fn rolled_back(id: &str, ms: i64, state: &str) -> Outcome {
    Outcome {
        id: id.to_string(),
        direction: Direction::Down,
        state: state.into(),
        duration_ms: ms,
        documents_affected: 0,
        steps: vec![],
        validation: vec![],
        error: None,
        estimates: vec![],
    }
}

fn finish(a: &RunArgs, r: JobResult) -> Result<Exit, CliError> {
    let line = r.to_compact_json();
    if a.result_file.parent().is_some_and(|p| p.exists()) {
        if let Err(e) = std::fs::write(&a.result_file, &line) {
            tracing::warn!(file = %a.result_file.display(), error = %e, "could not write the result file");
        }
    }
    println!("{line}");
    Ok(match r.code {
        0 => Exit::Ok,
        1 => Exit::Failed,
        2 => Exit::Invalid,
        3 => Exit::Unreachable,
        4 => Exit::Locked,
        _ => Exit::NeedsAttention,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_fit_a_termination_message() {
        let mut r = JobResult { v: 1, tenant: "t".into(), ok: false, dir: "up".into(), code: 1, ..Default::default() };
        for i in 0..500 {
            r.done.push((format!("20250101{i:06}_a_rather_long_migration_name"), 12345, 67890));
        }
        r.error = Some("x".repeat(10_000));
        r.failed_checks = vec!["y".repeat(1000); 20];
        r.backup = Some(BackupInfo {
            at: format!("database:dbshift_snapshots/{}.20250101T120000Z-2", "t".repeat(63)),
            docs: u64::MAX >> 1,
            bytes: u64::MAX >> 1,
            sha256: "f".repeat(64),
            ms: 123_456,
        });
        r.rollback = Some("snapshot".into());
        r.restored = r.backup.as_ref().map(|b| b.at.clone());
        let s = r.to_compact_json();
        assert!(s.len() <= MAX_RESULT, "{}", s.len());
        let back: JobResult = serde_json::from_str(&s).unwrap();
        assert_eq!(back.done.len() + back.more, 500);
        assert!(back.more > 0);
        assert_eq!((back.backup, back.rollback, back.restored), (r.backup, r.rollback, r.restored));
    }

    #[test]
    fn new_fields_are_optional_and_the_old_ones_unchanged() {
        let old = r#"{"v":1,"tenant":"t","ok":true,"dir":"up","done":[["a",1,2]],"checks":[0,0],"code":0}"#;
        let r: JobResult = serde_json::from_str(old).unwrap();
        assert_eq!(r.to_compact_json(), old, "without a backup or rollback, the result is as before");
        let with = JobResult {
            backup: Some(BackupInfo { at: "dir:/b/t/x".into(), docs: 1, bytes: 2, sha256: "ab".into(), ms: 3 }),
            rollback: Some("data".into()),
            ..r
        };
        assert_eq!(
            with.to_compact_json(),
            r#"{"v":1,"tenant":"t","ok":true,"dir":"up","done":[["a",1,2]],"checks":[0,0],"code":0,"backup":{"at":"dir:/b/t/x","docs":1,"bytes":2,"sha256":"ab","ms":3},"rollback":"data"}"#
        );
    }
}
