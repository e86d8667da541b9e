//! Human and JSON output. JSON goes to stdout as one document; human text to stdout, progress
//! to stderr (only when it is a terminal).

use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Arc, Mutex};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::backup::{Manifest, RestoreReport};
use crate::engine::model::Operation;
use crate::engine::planner::{Direction, Entry, Standing};
use crate::engine::runner::{Observer, Outcome, OutcomeState};
use crate::engine::validate::CheckResult;
use crate::engine::{Migration, TenantReport};
use crate::exit::Failure;
use crate::redact::Redactor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

type Results<T> = [(String, Result<T, Failure>)];

/// Results as JSON: `{ command, ok, tenants: [ { tenant, ok, result | error } ] }`.
pub(crate) fn print_json<T: Serialize>(
    command: &str,
    results: &Results<T>,
    ok: impl Fn(&T) -> bool,
    redactor: &Redactor,
) {
    let tenants: Vec<serde_json::Value> = results
        .iter()
        .map(|(t, r)| match r {
            Ok(v) => json!({ "tenant": t, "ok": ok(v), "result": v }),
            Err(e) => {
                json!({ "tenant": t, "ok": false, "error": redactor.apply(&e.message), "exitCode": e.exit.code() })
            }
        })
        .collect();
    let all_ok = tenants.iter().all(|t| t["ok"] == json!(true));
    let doc = json!({ "command": command, "ok": all_ok, "tenants": tenants });
    println!("{}", redactor.apply(&serde_json::to_string_pretty(&doc).expect("serializable")));
}

pub(crate) fn print_error(tenant: &str, e: &Failure, redactor: &Redactor) {
    println!("{tenant}: error: {}", redactor.apply(&e.message));
}

pub fn print_created(out: Output, path: &Path) {
    match out {
        Output::Json => println!("{}", json!({ "command": "new", "ok": true, "created": path })),
        Output::Human => println!("created {}", path.display()),
    }
}

pub fn print_lint(out: Output, migrations: &[Migration], reviews: &[crate::engine::risk::Review], strict: bool) {
    let open: usize = reviews.iter().map(|r| r.warnings.len()).sum();
    let acked: usize = reviews.iter().map(|r| r.acknowledged.len()).sum();
    match out {
        Output::Json => {
            let list: Vec<_> = migrations
                .iter()
                .zip(reviews)
                .map(|(m, r)| {
                    json!({ "id": m.id(), "file": m.path, "checksum": m.checksum, "operations": m.file.up.len(),
                            "warnings": r.warnings, "acknowledged": r.acknowledged })
                })
                .collect();
            let ok = !(strict && open > 0);
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({ "command": "lint", "ok": ok, "warnings": open, "migrations": list })
                )
                .expect("json")
            );
        }
        Output::Human => {
            for (m, r) in migrations.iter().zip(reviews) {
                println!(
                    "ok  {}  ({} operation(s){})",
                    m.id(),
                    m.file.up.len(),
                    if m.file.down.is_some() { ", explicit down" } else { "" }
                );
                for w in &r.warnings {
                    println!("  warn {} step {} ({}): {}", w.code, w.step, w.what, w.message);
                    println!(
                        "       what to do: {}; or acknowledge it: {{ code: {}, step: {}, reason: ... }}",
                        w.fix, w.code, w.step
                    );
                }
                for w in &r.acknowledged {
                    println!("  acknowledged {} step {} ({})", w.code, w.step, w.what);
                }
            }
            println!("{} migration file(s) are valid; {open} risk warning(s), {acked} acknowledged", migrations.len());
        }
    }
}

pub fn print_status(out: Output, results: &Results<Vec<Entry>>, redactor: &Redactor) {
    if out == Output::Json {
        return print_json(
            "status",
            results,
            |e| e.iter().all(|e| matches!(e.standing, Standing::Applied | Standing::Skipped | Standing::Baselined)),
            redactor,
        );
    }
    for (tenant, r) in results {
        let entries = match r {
            Ok(e) => e,
            Err(e) => {
                print_error(tenant, e, redactor);
                continue;
            }
        };
        let count = |s: Standing| entries.iter().filter(|e| e.standing == s).count();
        println!(
            "{tenant}: {} applied, {}{} pending, {} changed, {} missing from files{}",
            count(Standing::Applied),
            match count(Standing::Baselined) {
                0 => String::new(),
                n => format!("{n} baselined, "),
            },
            count(Standing::Pending),
            count(Standing::Changed),
            count(Standing::Missing),
            match count(Standing::Interrupted) {
                0 => String::new(),
                n => format!(", {n} interrupted"),
            }
        );
        for e in entries {
            let (mark, what) = match e.standing {
                Standing::Applied => (
                    "  applied ",
                    format!("{} (batch {})", e.applied_at.clone().unwrap_or_default(), e.batch.unwrap_or(0)),
                ),
                Standing::Pending => (
                    "  pending ",
                    e.last_error.as_ref().map(|m| format!("last attempt failed: {m}")).unwrap_or_default(),
                ),
                Standing::Changed => ("! changed ", "the file changed after it was applied".into()),
                Standing::Missing => ("? missing ", "applied here, but no file has this id (drift)".into()),
                Standing::Skipped => ("  skipped ", "not active under the current profiles".into()),
                Standing::Baselined => (
                    "  baselined",
                    format!(
                        "{} (recorded by dbshift baseline; made by other means, never undone)",
                        e.applied_at.clone().unwrap_or_default()
                    ),
                ),
                Standing::Interrupted => (
                    "! interrupted",
                    "a runner stopped in the middle of it; the next up or down undoes that first".into(),
                ),
            };
            let ooo = if e.out_of_order { " [older than an applied migration]" } else { "" };
            println!("  {mark} {}  {}{ooo}", e.id, what);
            for c in &e.prechecks {
                let verdict = if c.passed { "passed" } else { "FAILED" };
                println!("      pre-check {} on {}: {verdict} - {}", c.check, c.collection, c.message);
            }
        }
    }
}

pub fn print_schema_status(
    out: Output,
    results: &Results<crate::cli::commands::status::WithSchema>,
    redactor: &Redactor,
) {
    if out == Output::Json {
        return print_json("status", results, |w| w.drift.is_empty(), redactor);
    }
    let plain: Vec<(String, Result<Vec<Entry>, Failure>)> = results
        .iter()
        .map(|(t, r)| (t.clone(), r.as_ref().map(|w| w.migrations.clone()).map_err(Clone::clone)))
        .collect();
    print_status(out, &plain, redactor);
    for (tenant, r) in results {
        let Ok(w) = r else { continue };
        if w.drift.is_empty() {
            println!("{tenant}: schema as the applied migrations left it (indexes and validators)");
        }
        for d in &w.drift {
            let what = if d.name.is_empty() { d.what.to_string() } else { format!("{} {}", d.what, d.name) };
            let by = d
                .migration
                .as_ref()
                .map(|m| format!(" (set by {m})"))
                .unwrap_or_else(|| " (no migration made it)".into());
            println!("{tenant}: drift: {} {what} on {}{by}", d.kind, d.collection);
        }
        if !w.unchecked.is_empty() {
            println!("{tenant}: not followed (runCommand): {}", w.unchecked.join(", "));
        }
    }
}

fn describe(op: &Operation) -> String {
    match op.collection() {
        Some(c) => format!("{} on {c}", op.kind()),
        None => op.kind().to_string(),
    }
}

pub fn print_reports(out: Output, command: &str, results: &Results<TenantReport>, redactor: &Redactor) {
    if out == Output::Json {
        return print_json(command, results, |r| r.ok, redactor);
    }
    let (mut ok, mut failed, mut skipped) = (0, 0, 0);
    for (tenant, r) in results {
        let report = match r {
            Ok(r) => r,
            Err(e) => {
                failed += 1;
                print_error(tenant, e, redactor);
                continue;
            }
        };
        if report.skipped {
            skipped += 1;
        } else if report.ok {
            ok += 1;
        } else {
            failed += 1;
        }
        for c in &report.prechecks {
            let verdict = if c.passed { "passed" } else { "FAILED" };
            println!(
                "{tenant}: pre-check {} of {} on {}: {verdict} - {}",
                c.check, c.migration, c.collection, c.message
            );
        }
        if let Some(at) = &report.snapshot {
            println!("{tenant}: snapshot taken before the change: {at}");
        }
        if report.migrations.is_empty() {
            match (&report.error, &report.skip_reason) {
                (_, Some(why)) => println!("{tenant}: SKIPPED (onPrecheckFailure: skip): {}", redactor.apply(why)),
                (Some(e), None) if !report.prechecks.is_empty() => println!("{tenant}: FAILED: {}", redactor.apply(e)),
                _ => println!(
                    "{tenant}: nothing to do (at {})",
                    report.from_version.as_deref().unwrap_or("no migration")
                ),
            }
            continue;
        }
        for m in &report.migrations {
            match m.state {
                OutcomeState::Planned => {
                    let verb = if m.direction == Direction::Up { "would apply" } else { "would roll back" };
                    println!("{tenant}: {verb} {}", m.id);
                    for (i, s) in m.steps.iter().enumerate() {
                        let est = m
                            .estimates
                            .get(i)
                            .copied()
                            .flatten()
                            .map(|n| format!(" (~{n} documents)"))
                            .unwrap_or_default();
                        println!(
                            "    {}. {}{}{est}",
                            i + 1,
                            s.op,
                            s.collection.as_ref().map(|c| format!(" on {c}")).unwrap_or_default()
                        );
                    }
                }
                OutcomeState::Failed => {
                    println!("{tenant}: FAILED {}: {}", m.id, redactor.apply(m.error.as_deref().unwrap_or("")))
                }
                state => println!(
                    "{tenant}: {} {} in {} ms ({} documents)",
                    if state == OutcomeState::Applied { "applied" } else { "rolled back" },
                    m.id,
                    m.duration_ms,
                    m.documents_affected
                ),
            }
            for c in &m.validation {
                println!(
                    "    check {} on {}: {} - {}",
                    c.check,
                    c.collection,
                    if c.passed { "passed" } else { "FAILED" },
                    c.message
                );
            }
        }
    }
    if results.len() > 1 {
        let skipped = if skipped > 0 { format!(", {skipped} skipped by pre-checks") } else { String::new() };
        println!("{} tenant(s): {ok} ok, {failed} failed{skipped}", results.len());
    }
}

pub fn print_validation(out: Output, results: &Results<Vec<CheckResult>>, redactor: &Redactor) {
    if out == Output::Json {
        return print_json("validate", results, |c| c.iter().all(|c| c.passed), redactor);
    }
    for (tenant, r) in results {
        match r {
            Ok(checks) if checks.is_empty() => {
                println!("{tenant}: no checks (no applied migration has `validate`)")
            }
            Ok(checks) => {
                let failed = checks.iter().filter(|c| !c.passed).count();
                println!("{tenant}: {} check(s), {failed} failed", checks.len());
                for c in checks {
                    println!(
                        "  {} {} {} on {}: {}",
                        if c.passed { "passed" } else { "FAILED" },
                        c.migration,
                        c.check,
                        c.collection,
                        c.message
                    );
                }
            }
            Err(e) => print_error(tenant, e, redactor),
        }
    }
}

pub fn print_backups(out: Output, dir: &Path, results: &Results<Manifest>, redactor: &Redactor) {
    if out == Output::Json {
        return print_json("backup", results, |_| true, redactor);
    }
    for (tenant, r) in results {
        match r {
            Ok(m) => println!(
                "{tenant}: snapshot of {} collection(s), {} documents, {} bytes in {} ms -> {}",
                m.collections.len(),
                m.total_documents,
                m.total_bytes,
                m.duration_ms,
                dir.join(tenant).display()
            ),
            Err(e) => print_error(tenant, e, redactor),
        }
    }
}

pub fn print_restores(out: Output, results: &Results<RestoreReport>, redactor: &Redactor) {
    if out == Output::Json {
        return print_json("restore", results, |r| r.collections.iter().all(|c| c.verified), redactor);
    }
    for (tenant, r) in results {
        match r {
            Ok(rep) => print_restored(tenant, "", rep),
            Err(e) => print_error(tenant, e, redactor),
        }
    }
}

/// What one tenant's restore did; `from` names the snapshot (or is empty).
pub(crate) fn print_restored(tenant: &str, from: &str, rep: &RestoreReport) {
    println!(
        "{tenant}: restored {from}{} collection(s), {} documents in {} ms; counts and hashes verified",
        rep.collections.len(),
        rep.total_documents,
        rep.duration_ms
    );
    if !rep.dropped.is_empty() {
        println!("  dropped collections not in the snapshot: {}", rep.dropped.join(", "));
    }
    if !rep.rolled_back.is_empty() {
        println!("  recorded as rolled back (applied after the snapshot): {}", rep.rolled_back.join(", "));
    }
}

/// Progress for migrations: a line per migration, a bar for long operations (terminal only).
struct Progress {
    bar: Mutex<Option<ProgressBar>>,
    tty: bool,
}

impl Observer for Progress {
    fn step_started(&self, tenant: &str, id: &str, step: usize, op: &Operation) {
        if !self.tty {
            return;
        }
        let mut bar = self.bar.lock().expect("lock");
        if let Some(b) = bar.take() {
            b.finish_and_clear();
        }
        let b = ProgressBar::new_spinner();
        b.set_style(ProgressStyle::with_template("{spinner} {msg} {pos}/{len} [{elapsed}]").expect("template"));
        b.set_message(format!("{tenant}: {id} step {} ({})", step + 1, describe(op)));
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        *bar = Some(b);
    }
    fn progress(&self, done: u64, total: Option<u64>) {
        if let Some(b) = self.bar.lock().expect("lock").as_ref() {
            if let Some(t) = total {
                b.set_length(t.max(done));
            }
            b.set_position(done);
        }
    }
    fn shows_progress(&self) -> bool {
        self.tty
    }
    fn migration_finished(&self, _tenant: &str, _outcome: &Outcome) {
        if let Some(b) = self.bar.lock().expect("lock").take() {
            b.finish_and_clear();
        }
    }
}

pub fn observer(out: Output, _tenants: usize) -> Arc<dyn Observer> {
    Arc::new(Progress { bar: Mutex::new(None), tty: out == Output::Human && std::io::stderr().is_terminal() })
}

/// Progress of snapshots and restores: (collection, documents done, documents expected; 0 while
/// not counted yet).
pub type TransferProgress = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// A progress bar on a terminal; `None` elsewhere (nothing shown, nothing counted for it).
pub fn transfer_progress(out: Output) -> Option<TransferProgress> {
    if out != Output::Human || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} documents [{elapsed}]").expect("template"));
    Some(Arc::new(move |coll, done, total| {
        bar.set_message(coll.to_string());
        // Expected 0 with documents done: not counted yet.
        let counted = total > 0 || done == 0;
        bar.set_length(if counted { total } else { done });
        bar.set_position(done);
        if counted && done >= total {
            bar.finish_and_clear();
            bar.reset();
        }
    }))
}
