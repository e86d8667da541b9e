//! The status the controller writes: pure functions from the run's state to
//! `DatabaseMigrationStatus`.
//!
//! Size: the status must stay far below etcd's 1.5 MiB object limit with 10,000 tenants. It
//! always carries the counts; per-tenant entries are capped at [`MAX_TENANT_ENTRIES`] and at
//! [`TENANT_ENTRIES_BYTES`] of JSON (each entry's texts cut to [`ENTRY_TEXT`] characters, its
//! migrations to [`ENTRY_MIGRATIONS`]), chosen by how much they need a reader's attention
//! (running, failed, rolled back, then succeeded, then pending). The full per-tenant record lives in each tenant's Job (labels, termination
//! message) and in the tracking collection of each tenant database. See docs/operator.md.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{
    AppliedMigration, BackupStatus, DatabaseMigrationStatus, Phase, Progress, TenantPhase, TenantStatus,
    ValidationStatus,
};

use super::frozen::FrozenRun;
use super::jobs::{job_name, Action};
use super::rollout::{Decision, Step, TenantView};
use crate::job::result::RollbackHow;

/// Per-tenant entries kept in the status, at most.
pub const MAX_TENANT_ENTRIES: usize = 1000;
/// Bytes of JSON the per-tenant entries may take together, at most (etcd takes objects up to
/// 1.5 MiB; the rest of the status, conditions and messages, stays far below the remainder).
/// Less when the resource's own spec is large (inline files): see [`entries_budget`].
pub const TENANT_ENTRIES_BYTES: usize = 512 << 10;

/// What the tenant entries may take beside a spec of `spec_bytes`: the object stays under
/// 1.4 MiB, with 100 KiB for metadata, conditions and messages.
pub fn entries_budget(spec_bytes: usize) -> usize {
    TENANT_ENTRIES_BYTES.min(((14 << 20) / 10usize).saturating_sub(spec_bytes + (100 << 10)))
}
/// Characters of each free text in an entry (an error, a rollback's outcome, a failed check).
pub const ENTRY_TEXT: usize = 400;
/// Migrations listed in an entry's `applied` (the newest; the tenant's tracking collection and
/// its Job's result have them all).
pub const ENTRY_MIGRATIONS: usize = 20;

/// `s` cut to `n` characters, marked.
fn cut(s: String, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s,
    }
}

/// The phase of one tenant, as shown in `status.tenants[].phase`.
pub fn tenant_phase(v: &TenantView, stopped: bool) -> TenantPhase {
    match (&v.rollback, &v.migrate) {
        (Step::Running, _) => TenantPhase::RollingBack,
        (Step::Done(o), _) if o.ok => TenantPhase::RolledBack,
        (Step::Done(_), _) => TenantPhase::RollbackFailed,
        (_, Step::NotStarted) if stopped => TenantPhase::Skipped,
        (_, Step::NotStarted) => TenantPhase::Pending,
        (_, Step::Running) => TenantPhase::Running,
        (_, Step::Done(o)) if o.ok && o.result.as_ref().is_some_and(|r| r.skipped) => TenantPhase::Skipped,
        (_, Step::Done(o)) if o.ok => TenantPhase::Succeeded,
        (_, Step::Done(_)) => TenantPhase::Failed,
    }
}

/// Lower sorts first: what a reader most needs to see.
fn attention(phase: TenantPhase) -> u8 {
    match phase {
        TenantPhase::RollbackFailed => 0,
        TenantPhase::Failed => 1,
        TenantPhase::Running | TenantPhase::RollingBack => 2,
        TenantPhase::RolledBack => 3,
        TenantPhase::Succeeded => 4,
        TenantPhase::Pending | TenantPhase::Skipped => 5,
    }
}

/// One tenant's entry: the `i`-th of the plan.
pub fn tenant_status(plan: &FrozenRun, resource: &str, i: usize, v: &TenantView, stopped: bool) -> TenantStatus {
    let tenant = plan.tenants[i].as_str();
    let phase = tenant_phase(v, stopped);
    let mut s = TenantStatus { name: tenant.to_string(), phase, ..Default::default() };
    if v.migrate != Step::NotStarted {
        // A batch's Job is named after its first tenant.
        s.job = Some(job_name(resource, &plan.run_id, &plan.tenants[plan.batch_start(i)], Action::Migrate));
    }
    if let Step::Done(o) = &v.migrate {
        if let Some(r) = &o.result {
            s.from_version = r.from.clone();
            s.to_version = r.to.clone();
            s.applied = r
                .done
                .iter()
                .map(|(id, ms, docs)| AppliedMigration { id: id.clone(), duration_ms: *ms, documents_affected: *docs })
                .collect();
            let extra = s.applied.len().saturating_sub(ENTRY_MIGRATIONS);
            s.applied.drain(..extra);
            if r.checks.0 > 0 {
                s.validation = Some(ValidationStatus {
                    checks: r.checks.0 as u32,
                    passed: r.checks.1 as u32,
                    failed: r.failed_checks.iter().take(5).map(|c| cut(c.clone(), ENTRY_TEXT)).collect(),
                });
            }
            if r.pre.0 > 0 {
                s.precheck = Some(ValidationStatus {
                    checks: r.pre.0 as u32,
                    passed: r.pre.1 as u32,
                    failed: r.failed_pre.iter().take(5).map(|c| cut(c.clone(), ENTRY_TEXT)).collect(),
                });
            }
            s.backup = r.backup.as_ref().map(|b| BackupStatus {
                location: b.at.clone(),
                documents: b.docs,
                size_bytes: b.bytes,
                sha256: b.sha256.clone(),
            });
            s.error = r.error.clone();
        } else {
            s.error = o.error.clone();
        }
    }
    match &v.rollback {
        Step::NotStarted => {}
        Step::Running => s.rollback = Some("running".into()),
        Step::Done(o) => {
            let how = o.result.as_ref().and_then(|r| r.rollback);
            s.rollback = Some(match (o.ok, how) {
                (true, Some(RollbackHow::Snapshot)) => "restored from the snapshot taken before the run".into(),
                (true, _) => "rolled back with the rollback data stored by the run".into(),
                (false, _) => {
                    let why = o.result.as_ref().and_then(|r| r.error.clone()).or_else(|| o.error.clone());
                    format!("rollback failed: {}", why.unwrap_or_default())
                }
            });
        }
    }
    s.error = s.error.map(|e| cut(e, ENTRY_TEXT));
    s.rollback = s.rollback.map(|e| cut(e, ENTRY_TEXT));
    s
}

/// Tenant counts.
pub fn progress(views: &[TenantView], stopped: bool) -> Progress {
    let mut p = Progress { total: views.len() as u32, ..Default::default() };
    for v in views {
        match tenant_phase(v, stopped) {
            TenantPhase::Succeeded => p.succeeded += 1,
            TenantPhase::Failed | TenantPhase::RollbackFailed => p.failed += 1,
            TenantPhase::Running | TenantPhase::RollingBack => p.running += 1,
            TenantPhase::RolledBack => p.rolled_back += 1,
            TenantPhase::Pending => p.pending += 1,
            TenantPhase::Skipped => p.skipped += 1,
        }
    }
    p.summary = format!("{}/{}", p.succeeded, p.total);
    p
}

/// Set a condition, keeping `lastTransitionTime` when its status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let since = match previous.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.clone(),
    };
    let c = Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.chars().take(1000).collect(),
        observed_generation: Some(generation),
        last_transition_time: since,
    };
    match previous {
        Some(i) => conditions[i] = c,
        None => conditions.push(c),
    }
}

/// The three conditions for a phase: Ready (what Flux and Argo CD read), Reconciling, Stalled.
pub fn conditions_for(
    previous: &[Condition],
    phase: Phase,
    reason: &str,
    message: &str,
    stalled: bool,
    generation: i64,
    now: &Time,
) -> Vec<Condition> {
    let mut c = previous.to_vec();
    let ready = phase == Phase::Succeeded;
    // A run held for a person is not being reconciled until they act.
    let active = (phase == Phase::Pending || phase.is_active()) && !phase.is_held() && !stalled;
    set_condition(&mut c, "Ready", ready, reason, message, generation, now);
    set_condition(&mut c, "Reconciling", active, reason, message, generation, now);
    set_condition(&mut c, "Stalled", stalled, reason, message, generation, now);
    c
}

/// Reason of a phase, for conditions and Events.
pub fn reason(phase: Phase) -> &'static str {
    phase.as_str()
}

/// The status of a run in progress or finished. `generation`: the resource's generation this
/// run carries out (the plan's, or a later one that changed only what steers a run).
#[allow(clippy::too_many_arguments)]
pub fn run_status(
    previous: &DatabaseMigrationStatus,
    plan: &FrozenRun,
    generation: i64,
    resource: &str,
    views: &[TenantView],
    decision: &Decision,
    budget: usize,
    now: &Time,
) -> DatabaseMigrationStatus {
    let mut entries: Vec<TenantStatus> = plan
        .tenants
        .iter()
        .zip(views)
        .enumerate()
        .map(|(i, (_, v))| tenant_status(plan, resource, i, v, decision.stopped || decision.finished))
        .collect();
    entries.sort_by_key(|e| attention(e.phase));
    entries.truncate(MAX_TENANT_ENTRIES);
    let mut bytes = 0;
    let fit = entries
        .iter()
        .take_while(|e| {
            bytes += serde_json::to_vec(e).map_or(usize::MAX / 2, |v| v.len() + 1);
            bytes <= budget
        })
        .count();
    entries.truncate(fit);
    // Readers find a tenant faster in plan order.
    let order: std::collections::HashMap<&str, usize> =
        plan.tenants.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    entries.sort_by_key(|e| order.get(e.name.as_str()).copied().unwrap_or(usize::MAX));

    let mut message = decision.message.clone();
    if entries.len() < views.len() {
        message.push_str(&format!(
            " ({} of {} tenants listed; every tenant's Job is labelled {}={})",
            entries.len(),
            views.len(),
            super::jobs::LABEL_RUN,
            plan.run_id
        ));
    }
    let started_at = if previous.run_id.as_deref() == Some(&plan.run_id) { previous.started_at.clone() } else { None };
    let finished_at = match (decision.finished, &previous.finished_at) {
        (false, _) => None,
        (true, Some(t)) if previous.run_id.as_deref() == Some(&plan.run_id) => Some(t.clone()),
        (true, _) => Some(now.clone()),
    };
    let phase = decision.phase;
    DatabaseMigrationStatus {
        observed_generation: Some(generation),
        phase: Some(phase),
        conditions: conditions_for(&previous.conditions, phase, reason(phase), &message, false, generation, now),
        run_id: Some(plan.run_id.clone()),
        target_version: plan.target.clone(),
        progress: Some(progress(views, decision.stopped || decision.finished)),
        started_at: started_at.or_else(|| Some(now.clone())),
        finished_at,
        message: Some(message),
        next_window_start: None,
        tenants: entries,
        fleet: previous.fleet.clone(),
    }
}

/// `status.message` when the resource is being deleted, or its spec changed during the run
/// (`changed`: a change that makes a new run, to `generation`).
pub fn message_override(
    decision: &Decision,
    plan: &FrozenRun,
    generation: i64,
    changed: bool,
    deleting: bool,
    running: usize,
) -> Option<String> {
    let m = &decision.message;
    if deleting {
        Some(format!("deleting: {running} running Job(s) finish first; {m}"))
    } else if changed && !decision.finished {
        // The run keeps the spec it started with; the change gets a run of its own after it.
        Some(format!(
            "{m} (the spec changed to generation {generation} during run {}: it applies when this run ends)",
            plan.run_id
        ))
    } else {
        None
    }
}

/// The status as it is, now describing `generation` too (a change that needs no new run).
pub fn observed(previous: &DatabaseMigrationStatus, generation: i64) -> DatabaseMigrationStatus {
    let mut s = previous.clone();
    s.observed_generation = Some(generation);
    for c in &mut s.conditions {
        c.observed_generation = Some(generation);
    }
    s
}

/// The status of a resource whose run cannot start (yet): bad input, or something missing.
pub fn blocked_status(
    previous: &DatabaseMigrationStatus,
    generation: i64,
    reason: &str,
    message: &str,
    stalled: bool,
    now: &Time,
) -> DatabaseMigrationStatus {
    let phase = if stalled { Phase::Failed } else { Phase::Pending };
    DatabaseMigrationStatus {
        observed_generation: Some(generation),
        phase: Some(phase),
        conditions: conditions_for(&previous.conditions, phase, reason, message, stalled, generation, now),
        message: Some(message.to_string()),
        fleet: previous.fleet.clone(),
        ..Default::default()
    }
}

/// The status of a run whose plan is lost: it ends Failed (Stalled, reason `RunLost`), keeping
/// what was last known of its tenants.
pub fn lost_status(
    previous: &DatabaseMigrationStatus,
    generation: i64,
    message: &str,
    now: &Time,
) -> DatabaseMigrationStatus {
    let phase = Phase::Failed;
    // The generation the run carried out: a change made during it still starts its own run.
    let generation = previous.observed_generation.unwrap_or(generation);
    DatabaseMigrationStatus {
        observed_generation: Some(generation),
        phase: Some(phase),
        conditions: conditions_for(&previous.conditions, phase, "RunLost", message, true, generation, now),
        message: Some(message.to_string()),
        finished_at: Some(now.clone()),
        ..previous.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::jobs::Outcome;
    use crate::controller::rollout::decide;
    use crate::job::JobResult;

    fn now() -> Time {
        Time("2026-11-21T10:00:00Z".parse().unwrap())
    }

    fn plan(n: usize) -> FrozenRun {
        let mut p: FrozenRun = serde_yaml::from_str(
            r#"
runId: r
generation: 4
target: "20250105000000"
tenants: []
canaries: 0
spec:
  connection: { secretRef: { name: s } }
  tenants: { names: [x] }
  migrations: { configMapRef: { name: m } }
  rollout: { maxParallel: 5 }
"#,
        )
        .unwrap();
        p.tenants = (0..n).map(|i| format!("tenant_{i:05}_with_a_long_descriptive_name")).collect();
        p
    }

    fn ok() -> Step {
        Step::Done(std::sync::Arc::new(Outcome {
            ok: true,
            ran: true,
            error: None,
            result: Some(JobResult {
                v: 1,
                ok: true,
                from: Some("20250101000000".into()),
                to: Some("20250105000000".into()),
                done: vec![("20250105000000_add_preferences".into(), 1234, 56789)],
                checks: (3, 3),
                ..Default::default()
            }),
        }))
    }

    #[test]
    fn ten_thousand_tenants_fit_in_an_object() {
        let p = plan(10_000);
        // The status of these views, and its size in JSON.
        let status_of = |views: &[TenantView], budget: usize| {
            let d = decide(&p, views, Default::default());
            let s =
                run_status(&DatabaseMigrationStatus::default(), &p, 4, "add-preferences", views, &d, budget, &now());
            let size = serde_json::to_string(&s).unwrap().len();
            (s, size)
        };
        let mut views = vec![TenantView { migrate: ok(), rollback: Step::NotStarted, job_running: false }; 10_000];
        // A thousand failures with the longest errors a result carries, and escapes that grow
        // in JSON.
        for v in views.iter_mut().skip(9_000) {
            let error = "\"é\u{1}".repeat(2000);
            v.migrate =
                Step::Done(std::sync::Arc::new(Outcome { ok: false, ran: true, result: None, error: Some(error) }));
        }
        let (s, size) = status_of(&views, TENANT_ENTRIES_BYTES);
        assert!(size < 700_000, "status is {size} bytes");
        let listed = s.tenants.len();
        assert!((100..MAX_TENANT_ENTRIES).contains(&listed), "{listed} entries");
        // Failures are listed first; the counts cover everyone.
        assert!(s.tenants.iter().all(|t| t.phase == TenantPhase::Failed));
        assert!(s.tenants.iter().all(|t| t.error.as_ref().unwrap().chars().count() <= ENTRY_TEXT + 3));
        let prog = s.progress.unwrap();
        assert_eq!((prog.total, prog.succeeded, prog.failed), (10_000, 9_000, 1_000));
        assert_eq!(prog.summary, "9000/10000");
        assert!(s.message.unwrap().contains(&format!("{listed} of 10000 tenants listed")));

        // Ten thousand successes, each with many migrations: the same bounds.
        let many: Vec<(String, i64, i64)> =
            (0..200).map(|i| (format!("2025010100{i:04}_a_long_migration_name"), 1, 2)).collect();
        let views = vec![
            TenantView {
                migrate: Step::Done(std::sync::Arc::new(Outcome {
                    ok: true,
                    ran: true,
                    error: None,
                    result: Some(JobResult { v: 1, ok: true, done: many, checks: (0, 0), ..Default::default() }),
                })),
                rollback: Step::NotStarted,
                job_running: false,
            };
            10_000
        ];
        let (s, size) = status_of(&views, TENANT_ENTRIES_BYTES);
        assert!(size < 700_000, "status is {size} bytes");
        assert!(s.tenants.iter().all(|t| t.applied.len() == ENTRY_MIGRATIONS));
        // Beside a spec of 1 MB (inline files), the entries give way.
        let budget = entries_budget(1_000_000);
        let (_, size) = status_of(&views, budget);
        assert!(size + 1_000_000 < 1_400_000, "status is {size} bytes");
    }

    #[test]
    fn conditions_keep_their_transition_time() {
        let t0 = now();
        let c = conditions_for(&[], Phase::Migrating, "Migrating", "m", false, 1, &t0);
        let t1 = Time("2026-11-21T11:00:00Z".parse().unwrap());
        let c2 = conditions_for(&c, Phase::Migrating, "Migrating", "m2", false, 1, &t1);
        let ready = c2.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.last_transition_time, t0);
        let c3 = conditions_for(&c2, Phase::Succeeded, "Succeeded", "done", false, 1, &t1);
        let ready = c3.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), &ready.last_transition_time), ("True", &t1));
        let rec = c3.iter().find(|c| c.type_ == "Reconciling").unwrap();
        assert_eq!(rec.status, "False");
    }

    #[test]
    fn a_tenant_entry_carries_what_its_job_reported() {
        let p = plan(1);
        let v = TenantView { migrate: ok(), rollback: Step::NotStarted, job_running: false };
        let s = tenant_status(&p, "add-preferences", 0, &v, false);
        assert_eq!(s.phase, TenantPhase::Succeeded);
        assert_eq!(s.applied[0].documents_affected, 56789);
        assert_eq!(s.validation.unwrap().passed, 3);
        assert_eq!(s.to_version.as_deref(), Some("20250105000000"));
        assert!(s.job.unwrap().starts_with("add-preferences-"));
    }
}
