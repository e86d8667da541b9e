//! `dbshift run`: one tenant, exactly as a Kubernetes Job runs it.
//!
//! Configuration comes from arguments or the environment (the operator sets `DBSHIFT_*`
//! variables and mounts the URI from a Secret and the migrations from a ConfigMap or an
//! image). The full details go to the tracking collection; a compact result (at most 4 KiB,
//! the size of a pod's termination message) is written to `--result-file` and printed as the
//! last line of stdout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::{connect, load, run_options, CliError, Exit, Global};
use crate::engine::{self, plan::Direction, runner, DownRequest, UpRequest};

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
    /// The snapshot taken before the tenant changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupResult>,
    /// How a rollback run undid the run: `data` (rollback data) or `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
}

/// Where a snapshot went and what it holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupResult {
    pub loc: String,
    pub docs: u64,
    pub bytes: u64,
    pub sha: String,
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
    match run_inner(g, a, &tenant).await {
        Ok(r) => finish(a, r),
        Err(e) => {
            let redactor = g.uri.as_deref().map(crate::redact::Redactor::for_uri).unwrap_or_default();
            finish(a, JobResult::failed(&tenant, &redactor.apply(&e.message), e.exit))
        }
    }
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

async fn run_inner(g: &Global, a: &RunArgs, tenant: &str) -> Result<JobResult, CliError> {
    crate::tenants::check_db_name(tenant)?;
    let migrations = load(&g.dir)?;
    let conn = connect(g.uri.as_deref(), Duration::from_secs(g.connect_timeout)).await?;
    let db = conn.client.database(tenant);
    let mut opts = run_options(g, Arc::new(runner::Quiet))?;
    if let Some(id) = &a.run_id {
        opts.run_id = id.clone();
    }
    opts.dry_run = a.dry_run;
    opts.allow_changed = a.allow_changed;
    let report = if let Some(run) = &a.rollback_run {
        runner::down(&db, tenant, &migrations, &DownRequest::Run(run.clone()), &opts).await?
    } else {
        let records = engine::tracking::load(&db, &opts.tracking).await.map_err(|e| CliError {
            exit: Exit::Unreachable,
            message: format!("reading the tracking collection: {e}"),
        })?;
        match engine::plan::direction_for(&records, a.target.as_deref()) {
            Direction::Down => {
                runner::down(&db, tenant, &migrations, &DownRequest::To(a.target.clone().unwrap_or_default()), &opts)
                    .await?
            }
            Direction::Up => {
                let req = UpRequest { target: a.target.clone(), only: None, allow_changed: a.allow_changed };
                runner::up(&db, tenant, &migrations, &req, &opts).await?
            }
        }
    };
    let code = super::report_exit(&report);
    Ok(JobResult::from_report(&report, code))
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
        let s = r.to_compact_json();
        assert!(s.len() <= MAX_RESULT, "{}", s.len());
        let back: JobResult = serde_json::from_str(&s).unwrap();
        assert_eq!(back.done.len() + back.more, 500);
        assert!(back.more > 0);
    }
}
