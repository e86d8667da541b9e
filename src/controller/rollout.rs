//! The rollout decision: which Jobs to start next and where the run stands.
//!
//! A pure function of the plan and of what each tenant's Jobs did, so it is tested from YAML
//! fixtures without a cluster, and so a restarted controller decides exactly as before.

use crate::crd::{Approval, FailurePolicy, Phase};

use super::frozen::FrozenRun;
use super::jobs::{Action, Outcome};

/// One Job's progress, as far as the controller knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Step {
    #[default]
    NotStarted,
    /// Launched (recorded in status, or seen running).
    Running,
    Done(std::sync::Arc<Outcome>),
}

impl Step {
    pub fn ok(&self) -> bool {
        matches!(self, Step::Done(o) if o.ok)
    }
    pub fn failed(&self) -> bool {
        matches!(self, Step::Done(o) if !o.ok)
    }
}

/// A tenant's Jobs in this run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantView {
    pub migrate: Step,
    pub rollback: Step,
    /// Its migration's Job has not ended, even if its outcome is known (a batch whose every
    /// tenant reported, its pod still exiting): `maxParallel` counts the Job until it ends.
    pub job_running: bool,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Jobs to start: tenant index and action.
    pub launch: Vec<(usize, Action)>,
    pub phase: Phase,
    /// The run is over; nothing more will start.
    pub finished: bool,
    /// Whether the failure policy has been triggered (no more migrations start).
    pub stopped: bool,
    /// A sentence for `status.message`.
    pub message: String,
}

/// Whether a tenant migrated by this run needs its rollback Job.
fn needs_rollback(v: &TenantView) -> bool {
    match &v.migrate {
        Step::Done(o) => match &o.result {
            // The engine already undid a failed migration itself; only what was applied
            // before it (or by a successful run) has to be rolled back.
            Some(r) => !r.done.is_empty(),
            // No result: if the runner started and died, anything may have been applied;
            // if it never started (an init container or the image failed), nothing was.
            None => o.ran,
        },
        _ => false,
    }
}

/// What the live resource says about starting Jobs now. Read at every reconcile, never frozen
/// with the plan: a person steers a run in progress with these.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gates {
    /// The resource is being deleted: nothing starts, the run ends once its Jobs did.
    pub deleting: bool,
    /// `spec.suspend`: nothing starts (migrations or rollbacks); running Jobs finish.
    pub suspended: bool,
    /// `spec.rollout.approval`.
    pub approval: Approval,
    /// The approval annotation names this run.
    pub approved: bool,
    /// `spec.rollout.windows` now: outside them no migration starts (rollbacks do).
    pub window: super::windows::Now,
}

impl Gates {
    /// Nothing at all may start.
    fn closed(&self) -> bool {
        self.deleting || self.suspended
    }
}

/// What every part of the decision looks at.
struct Tally<'a> {
    plan: &'a FrozenRun,
    gates: Gates,
    views: &'a [TenantView],
    canaries: usize,
    max_parallel: usize,
    /// Tenants whose migration runs.
    running: usize,
    /// Migration Jobs running (batches with a running tenant; one per tenant by default).
    running_jobs: usize,
    failures: usize,
}

/// Decide the next step.
pub fn decide(plan: &FrozenRun, views: &[TenantView], gates: Gates) -> Decision {
    let rollout = &plan.spec.rollout;
    let t = Tally {
        plan,
        gates,
        views,
        canaries: plan.canaries.min(views.len()),
        max_parallel: rollout.max_parallel.max(1) as usize,
        running: views.iter().filter(|v| v.migrate == Step::Running).count(),
        running_jobs: plan
            .batch_starts()
            .filter(|&b| {
                plan.batch(b).any(|i| views.get(i).is_some_and(|v| v.migrate == Step::Running || v.job_running))
            })
            .count(),
        failures: views.iter().filter(|v| v.migrate.failed()).count(),
    };
    let canary_failed = views[..t.canaries].iter().any(|v| v.migrate.failed());
    let over_budget = t.failures > rollout.max_failures as usize;
    if canary_failed || (over_budget && rollout.on_failure != FailurePolicy::Continue) {
        let why = if canary_failed {
            "a canary tenant failed".to_string()
        } else {
            format!("{} tenant(s) failed (maxFailures {})", t.failures, rollout.max_failures)
        };
        return apply_policy(&t, &why);
    }
    migrate(&t)
}

/// Where the approval gate stands: `true` while it keeps the next migrations from starting.
/// A gate once passed stays passed (a tenant past it started), whatever the annotation
/// says later.
fn awaiting_approval(t: &Tally<'_>, canaries_done: bool) -> bool {
    let started = |v: &TenantView| v.migrate != Step::NotStarted;
    match t.gates.approval {
        _ if t.gates.approved => false,
        Approval::None => false,
        Approval::BeforeStart => !t.views.iter().any(started),
        Approval::AfterCanaries => canaries_done && !t.views[t.canaries..].iter().any(started),
    }
}

/// No failure policy applies: start what may start, canaries first.
fn migrate(t: &Tally<'_>) -> Decision {
    let (views, canaries, total) = (t.views, t.canaries, t.views.len());
    let deleting = t.gates.deleting;
    let mut launch = Vec::new();
    let canaries_done = views[..canaries].iter().all(|v| v.migrate.ok());
    let awaiting = awaiting_approval(t, canaries_done);
    let outside = t.gates.window != super::windows::Now::Open;
    if !t.gates.closed() && !awaiting && !outside {
        if !canaries_done {
            // Canaries go one at a time, in order.
            if !views[..canaries].iter().any(|v| v.migrate == Step::Running) {
                if let Some(i) = views[..canaries].iter().position(|v| v.migrate == Step::NotStarted) {
                    launch.push((i, Action::Migrate));
                }
            }
        } else {
            // maxParallel bounds Jobs: a batch (tenantsPerJob) is one, named after its first.
            let free = t.max_parallel.saturating_sub(t.running_jobs);
            let plan = t.plan;
            launch.extend(
                plan.batch_starts()
                    .filter(|&b| b >= canaries && b < total)
                    .filter(|&b| plan.batch(b).all(|i| views.get(i).is_none_or(|v| v.migrate == Step::NotStarted)))
                    .take(free)
                    .map(|b| (b, Action::Migrate)),
            );
        }
    }
    let done = views.iter().filter(|v| matches!(v.migrate, Step::Done(_))).count();
    let in_flight = t.running + launch.iter().map(|(b, _)| t.plan.batch(*b).len()).sum::<usize>();
    let decision =
        |phase, finished, stopped, message| Decision { launch: launch.clone(), phase, finished, stopped, message };
    if done == total {
        let skipped = views
            .iter()
            .filter(|v| matches!(&v.migrate, Step::Done(o) if o.ok && o.result.as_ref().is_some_and(|r| r.skipped)))
            .count();
        let (succeeded, failures) = (total - t.failures - skipped, t.failures);
        let skipped =
            if skipped > 0 { format!(", {skipped} skipped by pre-checks (untouched)") } else { String::new() };
        return if failures == 0 {
            let message = if t.plan.spec.dry_run {
                format!("dry run: {total} tenant(s) planned, nothing written")
            } else {
                format!("{succeeded}/{total} tenant(s) migrated{skipped}")
            };
            decision(Phase::Succeeded, true, false, message)
        } else {
            let max = t.plan.spec.rollout.max_failures;
            let message = format!(
                "{succeeded}/{total} tenant(s) migrated, {failures} failed (tolerated: maxFailures {max}){skipped}"
            );
            decision(Phase::Failed, true, false, message)
        };
    }
    if deleting && in_flight == 0 {
        return decision(Phase::Failed, true, true, format!("deleted after {done}/{total} tenant(s)"));
    }
    if t.gates.suspended && !deleting {
        let message = format!(
            "suspended (spec.suspend): {done}/{total} tenant(s) done, {} running Job(s) finish, no new Job starts",
            t.running
        );
        return decision(Phase::Suspended, false, false, message);
    }
    if awaiting && !deleting && t.running == 0 {
        let run = &t.plan.run_id;
        let message = if done == 0 {
            format!("run {run} awaits approval before its first Job: {total} tenant(s) wait")
        } else {
            format!("run {run} awaits approval: {done} canary tenant(s) succeeded, {} tenant(s) wait", total - done)
        };
        return decision(Phase::AwaitingApproval, false, false, message);
    }
    if let (true, false, super::windows::Now::Closed(next)) = (outside, deleting, t.gates.window) {
        let next = next.map_or_else(|| "none within a week".to_string(), |n| format!("the next opens at {n}"));
        let message = if t.running == 0 {
            format!("outside the maintenance windows: {done}/{total} tenant(s) done; {next}")
        } else {
            format!("the maintenance window closed: {} running Job(s) finish, {done}/{total} done; {next}", t.running)
        };
        let phase = if t.running == 0 { Phase::Waiting } else { Phase::Migrating };
        return decision(phase, false, false, message);
    }
    let stage = if !canaries_done { "canary stage: " } else { "" };
    decision(Phase::Migrating, false, false, format!("{stage}{done}/{total} tenant(s) done, {in_flight} running"))
}

/// The failure policy applies: no more migrations start; `rollback` undoes what ran (unless
/// the resource is suspended: its rollback Jobs wait for it to be resumed).
fn apply_policy(t: &Tally<'_>, why: &str) -> Decision {
    let deleting = t.gates.deleting;
    let d = policy_decision(t, why);
    if t.gates.suspended && !deleting && !d.finished {
        let message = format!("suspended (spec.suspend), no new Job starts: {}", d.message);
        return Decision { launch: Vec::new(), phase: Phase::Suspended, message, ..d };
    }
    d
}

fn policy_decision(t: &Tally<'_>, why: &str) -> Decision {
    let deleting = t.gates.deleting;
    let policy = t.plan.spec.rollout.on_failure;
    let rolling_back = policy == FailurePolicy::Rollback && !t.plan.spec.dry_run;
    let decision = |launch, phase, finished, message| Decision { launch, phase, finished, stopped: true, message };
    if t.running > 0 {
        let phase = if rolling_back { Phase::RollingBack } else { Phase::Migrating };
        let message = format!("{why}; waiting for {} running Job(s) before applying onFailure={policy:?}", t.running);
        return decision(Vec::new(), phase, false, message);
    }
    if !rolling_back || deleting {
        let left = t.views.iter().filter(|v| v.migrate == Step::NotStarted).count();
        return decision(Vec::new(), Phase::Failed, true, format!("{why}; halted with {left} tenant(s) not started"));
    }
    let views = t.views;
    let candidates: Vec<usize> = (0..views.len()).filter(|&i| needs_rollback(&views[i])).collect();
    let rb_running = candidates.iter().filter(|&&i| views[i].rollback == Step::Running).count();
    let launch: Vec<(usize, Action)> = candidates
        .iter()
        .copied()
        .filter(|&i| views[i].rollback == Step::NotStarted)
        .take(t.max_parallel.saturating_sub(rb_running))
        .map(|i| (i, Action::Rollback))
        .collect();
    let rb_done = candidates.iter().filter(|&&i| matches!(views[i].rollback, Step::Done(_))).count();
    if rb_done < candidates.len() {
        let message = format!("{why}; rolling back: {rb_done}/{} tenant(s) done", candidates.len());
        return decision(launch, Phase::RollingBack, false, message);
    }
    let rb_failed = candidates.iter().filter(|&&i| views[i].rollback.failed()).count();
    if rb_failed > 0 {
        decision(
            launch,
            Phase::Failed,
            true,
            format!("{why}; rollback failed on {rb_failed} tenant(s): they need attention"),
        )
    } else {
        decision(launch, Phase::RolledBack, true, format!("{why}; {} tenant(s) rolled back", candidates.len()))
    }
}

#[cfg(test)]
mod tests {
    //! Scenarios as YAML fixtures: the plan's rollout and each tenant's Job states
    //! (`-`: not started, `R`: running, `ok` / `fail` / `fail0` (failed, nothing applied) /
    //! `died` (no result); a `+` after one: its Job has not ended yet), with the expected
    //! launches and phase.

    use super::*;
    use crate::job::JobResult;

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        rollout: serde_yaml::Value,
        #[serde(default)]
        dry_run: bool,
        canaries: usize,
        /// One entry per tenant: "<migrate>" or "<migrate>/<rollback>".
        tenants: Vec<String>,
        #[serde(default)]
        deleting: bool,
        #[serde(default)]
        suspended: bool,
        #[serde(default)]
        approved: bool,
        /// Outside the windows (the next opening is not checked here).
        #[serde(default)]
        outside_window: bool,
        launch: Vec<String>,
        phase: Phase,
        finished: bool,
    }

    fn step(s: &str) -> Step {
        let result = |ok: bool, applied: bool| JobResult {
            v: 1,
            ok,
            done: if applied { vec![("20250101000000_a".into(), 1, 1)] } else { vec![] },
            ..Default::default()
        };
        let done = |ok, r: Option<JobResult>| {
            Step::Done(std::sync::Arc::new(Outcome { ok, ran: true, result: r, error: None }))
        };
        match s {
            "-" => Step::NotStarted,
            "R" => Step::Running,
            "ok" => done(true, Some(result(true, true))),
            "ok0" => done(true, Some(result(true, false))),
            "fail" => done(false, Some(result(false, true))),
            "fail0" => done(false, Some(result(false, false))),
            "died" => done(false, None),
            "never" => Step::Done(std::sync::Arc::new(Outcome { ok: false, ran: false, result: None, error: None })),
            other => panic!("unknown step {other}"),
        }
    }

    const CASES: &str = include_str!("../../tests/fixtures/rollout.yaml");

    #[test]
    fn rollout_fixtures() {
        let cases: Vec<Case> = serde_yaml::from_str(CASES).unwrap();
        assert!(cases.len() >= 10);
        for c in cases {
            let mut plan: FrozenRun = serde_yaml::from_str(PLAN).unwrap();
            plan.spec.rollout = serde_yaml::from_value(c.rollout.clone()).unwrap();
            plan.spec.dry_run = c.dry_run;
            plan.canaries = c.canaries;
            plan.tenants = (0..c.tenants.len()).map(|i| format!("t{i}")).collect();
            let views: Vec<TenantView> = c
                .tenants
                .iter()
                .map(|t| {
                    let (m, r) = t.split_once('/').unwrap_or((t, "-"));
                    // `+`: its migration's Job has not ended (a batch that reported in full).
                    let (m, job_running) = m.strip_suffix('+').map_or((m, m == "R"), |m| (m, true));
                    TenantView { migrate: step(m), rollback: step(r), job_running }
                })
                .collect();
            let gates = Gates {
                deleting: c.deleting,
                suspended: c.suspended,
                approval: plan.spec.rollout.approval,
                approved: c.approved,
                window: if c.outside_window {
                    crate::controller::windows::Now::Closed(None)
                } else {
                    crate::controller::windows::Now::Open
                },
            };
            let d = decide(&plan, &views, gates);
            let launch: Vec<String> = d
                .launch
                .iter()
                .map(|(i, a)| format!("{}{i}", if *a == Action::Rollback { "rb" } else { "t" }))
                .collect();
            assert_eq!(launch, c.launch, "{}: launches ({})", c.name, d.message);
            assert_eq!(d.phase, c.phase, "{}: phase ({})", c.name, d.message);
            assert_eq!(d.finished, c.finished, "{}: finished ({})", c.name, d.message);
        }
    }

    const PLAN: &str = r#"
runId: r
generation: 1
target: null
tenants: []
canaries: 0
spec:
  connection: { secretRef: { name: s } }
  tenants: { names: [x] }
  migrations: { configMapRef: { name: m } }
"#;
}
