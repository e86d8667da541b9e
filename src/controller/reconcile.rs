//! The reconcile driver: a list of steps. Pure modules decide ([`super::rollout`] picks the
//! next Jobs and the phase, [`super::status`] builds the status); the others observe
//! ([`super::inputs`], [`super::observe`]), act ([`super::act`]) and report
//! ([`super::report`]).
//!
//! Order of writes for every launch: the status that names the new Jobs first, then the Jobs.
//! Job names are deterministic, so a controller stopped between the two creates the same Jobs
//! after a restart, and creating an existing Job is harmless (the tracking collection of each
//! tenant database is the last guard: an applied migration is never applied again).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::frozen::{self, FrozenRun};
use super::inputs::{self, InputError, Inputs};
use super::jobs::Action;
use super::metrics::ReasonLabel;
use super::observe::{self, RunMemory};
use super::rollout::{self, Step, TenantView};
use super::{act, census, report, status, windows, Context, Error, FINALIZER};
use crate::crd::{DatabaseMigration, DatabaseMigrationStatus, FleetStatus, Mode, Phase, APPROVE_ANNOTATION};

/// The resource being reconciled, with what every step needs of it.
pub struct Resource<'a> {
    pub dbm: &'a DatabaseMigration,
    pub api: Api<DatabaseMigration>,
    /// The status as it stands (what the last write left).
    pub status: DatabaseMigrationStatus,
    /// `<namespace>/<name>`: the key of the run's memory.
    pub key: String,
    pub ns: String,
    pub name: String,
}

impl<'a> Resource<'a> {
    fn new(dbm: &'a DatabaseMigration, ctx: &Context) -> Self {
        let ns = dbm.namespace().unwrap_or_default();
        let name = dbm.name_any();
        Resource {
            dbm,
            api: Api::namespaced(ctx.client.clone(), &ns),
            status: dbm.status.clone().unwrap_or_default(),
            key: key(dbm),
            ns,
            name,
        }
    }

    fn generation(&self) -> i64 {
        self.dbm.metadata.generation.unwrap_or(0)
    }

    /// The run in progress, if the status names one that is not over.
    fn active_run(&self) -> Option<String> {
        self.status.phase.filter(|p| p.is_active()).and(self.status.run_id.clone())
    }

    /// The run that ended because its plan was lost (its Jobs may still run).
    fn lost_run(&self) -> Option<String> {
        let lost = self.status.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "RunLost");
        self.status.run_id.clone().filter(|_| lost)
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// The resource's key in the controller's memory (`namespace/name`).
pub fn key(dbm: &DatabaseMigration) -> String {
    format!("{}/{}", dbm.namespace().unwrap_or_default(), dbm.name_any())
}

/// How long a resource being deleted waits between looks at its running Jobs.
const DELETE_WAIT: Duration = Duration::from_secs(10);

/// One reconcile. The finalizer is kube's [`finalizer`] helper: it adds ours before the first
/// step (and nothing else happens in that reconcile), and removes it only once [`on_delete`]
/// returns `Ok`. A deletion that must wait for running Jobs returns [`Error::Waiting`], which
/// keeps the finalizer and is a requeue here, not a failure.
pub async fn reconcile(dbm: Arc<DatabaseMigration>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    use kube::runtime::finalizer::{finalizer, Error as Fin, Event};
    let api: Api<DatabaseMigration> = Api::namespaced(ctx.client.clone(), &dbm.namespace().unwrap_or_default());
    let had = dbm.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = dbm.metadata.deletion_timestamp.is_some();
    let out = finalizer(&api, FINALIZER, dbm.clone(), |event| async {
        match event {
            Event::Apply(d) => apply(d, &ctx).await,
            Event::Cleanup(d) => on_delete(&ctx, &Resource::new(&d, &ctx)).await,
        }
    })
    .await;
    let kube = |action, source| Error::Act(act::ActError::Kube { action, source: Box::new(source) });
    let r = match out {
        Ok(a) => {
            if had == deleting {
                // The helper patched the finalizer in (not yet there) or out (deleted, cleaned up).
                ctx.metrics.write("finalizer");
            }
            Ok(a)
        }
        Err(Fin::ApplyFailed(e) | Fin::CleanupFailed(e)) => match e {
            Error::Waiting(why) => {
                tracing::info!(resource = key(&dbm), %why, "deleting: waiting");
                Ok(Requeue::requeue(DELETE_WAIT))
            }
            e => Err(e),
        },
        Err(Fin::AddFinalizer(e)) => Err(kube("adding the finalizer", e)),
        Err(Fin::RemoveFinalizer(e)) => Err(kube("removing the finalizer", e)),
        Err(e @ (Fin::UnnamedObject | Fin::InvalidFinalizer)) => Err(Error::Finalizer(e.to_string())),
    };
    if r.is_ok() {
        ctx.failures.lock().expect("lock").remove(&key(&dbm));
    }
    r
}

/// A resource that is not being deleted, with the finalizer in place.
async fn apply(dbm: Arc<DatabaseMigration>, ctx: &Arc<Context>) -> Result<Requeue, Error> {
    let ctx = ctx.clone();
    let mut r = Resource::new(&dbm, &ctx);
    if let Some(run_id) = r.active_run() {
        let plan = match observe::plan(&ctx, &r, &run_id).await {
            Ok(plan) => plan,
            // Retrying cannot bring a deleted or mangled plan back: say so, and let a change
            // of the resource start a new run (its runners wait for any still running).
            Err(observe::ObserveError::Lost(why)) => {
                let message = format!(
                    "{why}: the run cannot continue. Jobs still running finish on their own and each tenant's \
                     tracking collection records what ran; change the resource to start a new run"
                );
                return run_lost(&ctx, &r, message).await;
            }
            Err(e) => return Err(e.into()),
        };
        return continue_run(&ctx, &r, plan, false).await;
    }
    if r.status.phase.is_some_and(Phase::is_final) {
        if r.status.observed_generation != Some(r.generation()) {
            if !only_steering_changed(&ctx, &r).await? {
                return start_run(&ctx, &r, None).await;
            }
            // Suspending, resuming or changing the approval or mode of a finished run: nothing
            // to run. Written with the next step's status (one write per reconcile).
            r.status = status::observed(&r.status, r.generation());
        }
        return follow(&ctx, &mut r).await;
    }
    start_run(&ctx, &r, None).await
}

/// A resource whose run is over: count its tenants when that is due (after the run, then
/// every `resyncInterval`), and in `continuous` mode start a follow-up run for those behind.
async fn follow(ctx: &Context, r: &mut Resource<'_>) -> Result<Requeue, Error> {
    // Only a run that started is followed: not one refused before it began (no run id), nor
    // one whose plan was lost (that needs a change of the resource).
    if r.status.run_id.is_none() || r.lost_run().is_some() {
        if Some(&r.status) != r.dbm.status.as_ref() {
            act::write_status(ctx, r, &r.status).await?;
        }
        return Ok(Requeue::await_change());
    }
    let run_id = r.status.run_id.clone().unwrap_or_default();
    let spec = &r.dbm.spec;
    let continuous = spec.mode == Mode::Continuous;
    let interval = spec.resync();
    let now_ts = Timestamp::now();
    let counted = r.status.fleet.as_ref().and_then(|f| f.counted_at.as_ref()).map(|t| t.0);
    let finished = r.status.finished_at.as_ref().map(|t| t.0);
    let after_run = match (counted, finished) {
        (None, _) => true,
        (Some(c), Some(f)) => c < f,
        (Some(_), None) => false,
    };
    let due_at = counted.map(|c| later(c, interval));
    let written = r.dbm.status.clone().unwrap_or_default();
    if !after_run {
        if let Some(at) = due_at.filter(|at| *at > now_ts) {
            if r.status != written {
                act::write_status(ctx, r, &r.status).await?;
            }
            return Ok(Requeue::requeue(wait_until(at)));
        }
    }
    let previous = r.status.fleet.clone().unwrap_or_default();
    // A follow-up starts only a whole interval after the last run ended (the count right after a
    // run only counts), and never after a run the failure policy stopped (`halt`, `rollback`):
    // a person looks first, and a change of the resource starts the next run.
    let rested = finished.is_none_or(|f| later(f, interval) <= now_ts);
    let policy_stopped = match r.status.phase {
        Some(Phase::RolledBack) => true,
        Some(Phase::Failed) => spec.rollout.on_failure != crate::crd::FailurePolicy::Continue,
        _ => false,
    };
    let mut fleet = match count(ctx, r, &run_id).await {
        Ok((census, inputs)) => {
            announce_drift(ctx, r, &previous, &census.fleet).await;
            let may_follow = continuous && !spec.suspend && rested && !policy_stopped;
            if may_follow && !census.behind.is_empty() {
                let mut fleet = census.fleet;
                fleet.counted_at = Some(now());
                fleet.next_resync = Some(Time(later(now_ts, interval)));
                r.status.fleet = Some(fleet);
                let inputs = Inputs { tenants: census.behind, ..inputs };
                return start_run(ctx, r, Some((frozen::next_follow_up(&run_id), inputs))).await;
            }
            let mut f = census.fleet;
            if continuous && policy_stopped && f.behind > 0 {
                let note = format!(
                    "no follow-up run starts: run {run_id} ended {} under onFailure {:?}; change the resource to go on",
                    r.status.phase.map_or("", Phase::as_str),
                    spec.rollout.on_failure
                );
                f.error = Some(f.error.map_or(note.clone(), |e| format!("{note}; {e}")));
                f.summary = census::summary(&f);
            }
            f
        }
        // The counts stay those of the last count that worked; the error says why not now.
        Err(e) => {
            tracing::warn!(resource = r.key, error = %e.message, "could not count the tenants");
            let mut f = previous.clone();
            f.error = Some(format!("could not count the tenants: {}; the counts are from the count before", e.message));
            f.summary = census::summary(&f);
            f
        }
    };
    fleet.counted_at = Some(now());
    // The next look: an interval from now, or once the run has rested an interval.
    let next = match finished {
        Some(f) if !rested => later(f, interval),
        _ => later(now_ts, interval),
    };
    fleet.next_resync = continuous.then_some(Time(next));
    let mut new = r.status.clone();
    new.fleet = Some(fleet);
    if new != written {
        act::write_status(ctx, r, &new).await?;
    }
    Ok(Requeue::requeue(wait_until(next)))
}

/// A Warning Event when more tenants drifted than at the last count.
async fn announce_drift(ctx: &Context, r: &Resource<'_>, previous: &FleetStatus, now: &FleetStatus) {
    if now.drifted > previous.drifted {
        let note = format!(
            "{} tenant(s) have indexes or validators that differ from what their migrations left (was {}): \
             dbshift status --schema lists the differences",
            now.drifted, previous.drifted
        );
        report::publish(ctx, r.dbm, EventType::Warning, "TenantsDrifted", note).await;
    }
}

/// Read every selected tenant's database: the census, and the inputs it was taken with.
async fn count(ctx: &Context, r: &Resource<'_>, run_id: &str) -> Result<(census::Census, Inputs), InputError> {
    let (inputs, conn) =
        inputs::gather_connected(&ctx.client, r.dbm, ctx.config.connect_timeout, &ctx.config.job_policy).await?;
    let migrations = match &inputs.files {
        Some(f) => Some(inputs::load_migrations(f).await?),
        None => None,
    };
    // The last run's tenants that are still behind (skipped by a pre-check, a Job that never
    // started...) are held too: not tried again at every resync until the resource changes.
    let last: std::collections::HashSet<String> = match observe::plan(ctx, r, run_id).await {
        Ok(plan) => plan.tenants.iter().cloned().collect(),
        Err(_) => Default::default(),
    };
    ctx.runs.lock().expect("lock").remove(&r.key);
    let basis = census::Basis {
        migrations: migrations.as_deref(),
        target: inputs.target.as_deref(),
        profiles: &r.dbm.spec.profiles,
        root_run: frozen::root_run(run_id),
        last_run: &last,
    };
    let census = census::take(&conn, &inputs.tenants, &basis).await;
    Ok((census, inputs))
}

/// `t` plus `d` (saturating).
fn later(t: Timestamp, d: Duration) -> Timestamp {
    k8s_openapi::jiff::SignedDuration::try_from(d).ok().and_then(|d| t.checked_add(d).ok()).unwrap_or(t)
}

/// How long until `at` (a second more, so the count is due when the reconcile comes).
fn wait_until(at: Timestamp) -> Duration {
    Duration::from_secs(at.duration_since(Timestamp::now()).as_secs().max(0) as u64 + 1)
}

/// Whether the finished run's spec differs from the resource's only in what steers a run
/// (`suspend`, `rollout.approval`, `rollout.windows`). A plan that is gone or not this
/// resource's counts as a change; one that cannot be read now is an error (retried).
async fn only_steering_changed(ctx: &Context, r: &Resource<'_>) -> Result<bool, Error> {
    let Some(run_id) = r.status.run_id.as_deref() else { return Ok(false) };
    let same = match observe::plan(ctx, r, run_id).await {
        Ok(plan) => Ok(frozen::same_run(&plan, r.generation(), &r.dbm.spec)),
        Err(observe::ObserveError::Lost(_)) => Ok(false),
        Err(e) => Err(e.into()),
    };
    // The run is over: keep no memory of it.
    ctx.runs.lock().expect("lock").remove(&r.key);
    same
}

/// A resource being deleted (the helper calls this only while our finalizer is on it): `Ok`
/// lets the finalizer go; [`Error::Waiting`] keeps it while the run's Jobs still run.
async fn on_delete(ctx: &Context, r: &Resource<'_>) -> Result<Requeue, Error> {
    // A run in progress: start nothing more, let running Jobs finish (stopping one mid-way
    // would skip the engine's own undo), then let go. Snapshots stay, per retention.
    // A run whose plan was lost ended Failed, but its Jobs may still run.
    let run = r.active_run().or_else(|| r.lost_run());
    if let Some(run_id) = run.clone() {
        match observe::plan(ctx, r, &run_id).await {
            Ok(plan) => {
                continue_run(ctx, r, plan, true).await?;
                let running = ctx.runs.lock().expect("lock").get(&r.key).map_or(0, |m| m.running);
                if running > 0 {
                    return Err(Error::Waiting(format!("{running} running Job(s) of run {run_id} finish first")));
                }
            }
            // The plan is gone or unreadable: nothing more can start, but the run's Jobs that
            // still run must finish before the finalizer goes (garbage collection would kill
            // them mid-migration).
            Err(observe::ObserveError::Lost(why)) => {
                let running = observe::running_jobs(ctx, r, &run_id);
                if running > 0 {
                    return Err(Error::Waiting(format!(
                        "{running} running Job(s) of run {run_id} finish first (its plan: {why})"
                    )));
                }
            }
            // Any other error may pass (the API server did not answer): the finalizer stays
            // until the plan can be read.
            Err(e) => return Err(e.into()),
        }
    }
    // Nothing more will be read: the runner pods may go with their Jobs.
    act::release_all_pods(ctx, r, run.as_deref()).await?;
    // The helper removes the finalizer now.
    ctx.runs.lock().expect("lock").remove(&r.key);
    ctx.metrics.run_going_on(&r.ns, &r.name, None);
    Ok(Requeue::await_change())
}

/// A new run: check the inputs, freeze the run, then continue it. `follow_up`: a follow-up
/// run's id and the inputs of the census that found its tenants (`continuous` mode).
async fn start_run(ctx: &Context, r: &Resource<'_>, follow_up: Option<(String, Inputs)>) -> Result<Requeue, Error> {
    let is_follow_up = follow_up.is_some();
    let (run_id, inputs) = match follow_up {
        Some(x) => x,
        None => match inputs::gather(&ctx.client, r.dbm, ctx.config.connect_timeout, &ctx.config.job_policy).await {
            Ok(i) => (frozen::run_id(r.dbm), i),
            Err(e) => return blocked(ctx, r, e).await,
        },
    };
    let (fresh, created) = match act::freeze_run(ctx, r, &inputs, run_id).await {
        Ok(x) => x,
        Err(act::ActError::TooLarge(message)) => {
            return refused(ctx, r, is_follow_up, InputError { reason: "PlanTooLarge", message, permanent: true }).await
        }
        Err(act::ActError::NotOurs(message)) => {
            return refused(ctx, r, is_follow_up, InputError { reason: "ConfigMapConflict", message, permanent: false })
                .await
        }
        // Retried: the namespace's labels (or the operator's policy) may change.
        Err(act::ActError::PodRefused(message)) => {
            return refused(ctx, r, is_follow_up, InputError { reason: "PodRefused", message, permanent: false }).await
        }
        Err(e) => return Err(e.into()),
    };
    // A plan written before a restart wins over a fresh one: the run is the one that started.
    let plan = if created {
        Arc::new(fresh)
    } else {
        match observe::plan(ctx, r, &fresh.run_id).await {
            Ok(plan) => plan,
            // A ConfigMap of the plan's name that is not this resource's own: refused, and
            // retried (it starts once that ConfigMap is deleted).
            Err(observe::ObserveError::Lost(why)) => {
                let message = format!("{why}: delete it, and the run starts");
                return refused(
                    ctx,
                    r,
                    is_follow_up,
                    InputError { reason: "ConfigMapConflict", message, permanent: false },
                )
                .await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(resource = r.key, run = %plan.run_id, tenants = plan.tenants.len(), target = ?plan.target, "run starts");
    let note = format!(
        "{}run {}: {} tenant(s) to {}",
        if is_follow_up { "follow-up " } else { "" },
        plan.run_id,
        plan.tenants.len(),
        plan.target.as_deref().unwrap_or("the latest version")
    );
    report::publish(ctx, r.dbm, EventType::Normal, "RunStarted", note).await;
    ctx.runs.lock().expect("lock").insert(r.key.clone(), RunMemory::new(plan.clone()));
    continue_run(ctx, r, plan, false).await
}

/// A run that cannot start: a generation's run is blocked (its status says why); a follow-up
/// run leaves the finished run's status as it is, says why in `status.fleet.error` and an
/// Event, and is tried again later.
async fn refused(ctx: &Context, r: &Resource<'_>, follow_up: bool, e: InputError) -> Result<Requeue, Error> {
    if !follow_up {
        return blocked(ctx, r, e).await;
    }
    tracing::warn!(resource = %r.name, reason = e.reason, error = %e.message, "follow-up run refused");
    ctx.metrics.reconcile_errors.get_or_create(&ReasonLabel { reason: e.reason.into() }).inc();
    let mut new = r.status.clone();
    let fleet = new.fleet.get_or_insert_with(Default::default);
    let message = format!("no follow-up run could start ({}): {}", e.reason, e.message);
    let first = fleet.error.as_deref() != Some(message.as_str());
    fleet.error = Some(message.clone());
    fleet.summary = census::summary(fleet);
    act::write_status(ctx, r, &new).await?;
    if first {
        report::publish(ctx, r.dbm, EventType::Warning, e.reason, message).await;
    }
    Ok(Requeue::requeue(ctx.config.retry))
}

/// The active run's plan is lost: the run ends Failed, said in the status and an Event.
async fn run_lost(ctx: &Context, r: &Resource<'_>, message: String) -> Result<Requeue, Error> {
    tracing::error!(resource = %r.name, error = %message, "run lost");
    ctx.metrics.reconcile_errors.get_or_create(&ReasonLabel { reason: "RunLost".into() }).inc();
    let new = status::lost_status(&r.status, r.generation(), &message, &now());
    act::write_status(ctx, r, &new).await?;
    report::publish(ctx, r.dbm, EventType::Warning, "RunLost", message).await;
    ctx.runs.lock().expect("lock").remove(&r.key);
    ctx.metrics.run_going_on(&r.ns, &r.name, None);
    // Nothing will read the run's results any more: its pods may go with their Jobs.
    act::release_all_pods(ctx, r, new.run_id.as_deref()).await?;
    Ok(Requeue::await_change())
}

/// The run cannot start: say why in the status, and wait (retry later or for a change).
async fn blocked(ctx: &Context, r: &Resource<'_>, e: InputError) -> Result<Requeue, Error> {
    tracing::warn!(resource = %r.name, reason = e.reason, error = %e.message, "run blocked");
    ctx.metrics.reconcile_errors.get_or_create(&ReasonLabel { reason: e.reason.into() }).inc();
    let st = &r.status;
    let new = status::blocked_status(st, r.generation(), e.reason, &e.message, e.permanent, &now());
    if *st != new {
        act::write_status(ctx, r, &new).await?;
        let previous = st.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.reason.as_str());
        if previous != Some(e.reason) {
            report::publish(ctx, r.dbm, EventType::Warning, e.reason, e.message.clone()).await;
        }
    }
    Ok(if e.permanent { Requeue::await_change() } else { Requeue::requeue(ctx.config.retry) })
}

/// One step of a run: observe the Jobs, decide, write the status, start Jobs, report.
async fn continue_run(ctx: &Context, r: &Resource<'_>, plan: Arc<FrozenRun>, deleting: bool) -> Result<Requeue, Error> {
    let seen = observe::jobs(ctx, r, &plan).await?;
    // Windows are read live, like suspend and approval; ones that cannot be read (a time zone
    // the API server could not check) hold the run, said in the message.
    let (window, bad_windows) = match windows::parse(&r.dbm.spec.rollout.windows) {
        Ok(w) if w.is_empty() => (windows::Now::Open, None),
        Ok(w) => (windows::at(&w, Timestamp::now()), None),
        Err(e) => (windows::Now::Closed(None), Some(e)),
    };
    let gates = rollout::Gates {
        deleting,
        suspended: r.dbm.spec.suspend,
        approval: r.dbm.spec.rollout.approval,
        approved: r.dbm.annotations().get(APPROVE_ANNOTATION) == Some(&plan.run_id),
        window,
    };
    let decision = rollout::decide(&plan, &seen.views, gates);
    let probing = seen.probing;
    let running_before =
        seen.views.iter().filter(|v| v.migrate == Step::Running || v.rollback == Step::Running).count();
    let started_before = seen.views.iter().filter(|v| v.migrate != Step::NotStarted).count();
    let views = with_launches(&plan, seen.views, &decision.launch);
    let running = views.iter().filter(|v| v.migrate == Step::Running || v.rollback == Step::Running).count();
    let budget = status::entries_budget(serde_json::to_vec(&r.dbm.spec).map_or(0, |v| v.len()));
    // A change of only what steers a run (suspend, approval) is this run's to follow; any other
    // change gets a run of its own once this one ends.
    let spec_changed = !frozen::same_run(&plan, r.generation(), &r.dbm.spec);
    // Tenant outcomes are announced before the status that counts them, so whoever sees the
    // status also finds their Events.
    announce_ends(ctx, r, seen.new_ends).await;
    // A run held at its gate (approval, suspend, window) with no Job running would keep a
    // changed spec waiting for ever (or for an approval of what is no longer wanted): the new
    // generation's run takes over at once. What the held run did is in each tenant's tracking
    // collection; its Jobs and plan stay until pruned.
    // (Held as it was last seen, or as it is now: a change that also lifts the gate does not
    // let the old run through.)
    let held = r.status.phase.filter(|p| p.is_held() && r.status.run_id.as_deref() == Some(plan.run_id.as_str()));
    let held = held.or(Some(decision.phase).filter(|p| p.is_held()));
    // (Not a run whose failure policy applies: its rollback must happen first.)
    let quiet = running_before + seen.missing.len() == 0 && !decision.stopped;
    if let (true, false, true, Some(held)) = (spec_changed, deleting, quiet, held) {
        let done = started_before;
        let note = format!(
            "run {} was held ({}) with {done} of {} tenant(s) started; generation {} changed the spec, so its own \
             run starts now",
            plan.run_id,
            held.as_str(),
            views.len(),
            r.generation()
        );
        tracing::info!(resource = r.key, run = %plan.run_id, "a held run is superseded by a changed spec");
        report::publish(ctx, r.dbm, EventType::Normal, "RunSuperseded", note).await;
        ctx.runs.lock().expect("lock").remove(&r.key);
        return Box::pin(start_run(ctx, r, None)).await;
    }
    let observed = if spec_changed { plan.generation } else { r.generation().max(plan.generation) };
    let mut new = status::run_status(&r.status, &plan, observed, &r.name, &views, &decision, budget, &now());
    if let Some(m) = status::message_override(&decision, &plan, r.generation(), spec_changed, deleting, running) {
        new.message = Some(m);
    }
    let next_window = match window {
        windows::Now::Closed(next) if !decision.finished => next,
        _ => None,
    };
    new.next_window_start = next_window.map(Time);
    if let (Some(e), false) = (&bad_windows, decision.finished) {
        new.message = Some(format!("{e}: no migration starts until it is fixed; {}", new.message.unwrap_or_default()));
    }
    // Status first: it records the launches before the Jobs exist.
    if r.status != new {
        act::write_status(ctx, r, &new).await?;
    }
    // A resource being deleted or suspended starts nothing, not even a Job lost before a
    // restart (the status keeps it as launched; it is created once the resource is resumed);
    // outside the maintenance windows only lost rollback Jobs are created again.
    let missing: Vec<(usize, Action)> = if gates.deleting || gates.suspended {
        Vec::new()
    } else {
        let open = gates.window == windows::Now::Open;
        seen.missing.into_iter().filter(|(_, a)| open || *a == Action::Rollback).collect()
    };
    let launches: Vec<(usize, Action)> = decision.launch.iter().chain(&missing).copied().collect();
    act::launch(ctx, r, &plan, &launches).await?;

    if r.status.phase != new.phase {
        report::phase_changed(ctx, r.dbm, new.phase.unwrap_or(Phase::Pending), &decision, &plan.run_id).await;
    }
    remember(ctx, r, running, decision.finished && !deleting);
    if decision.finished && !deleting {
        prune(ctx, r).await;
    }
    let started = new.started_at.as_ref().map(|t| t.0.as_second());
    ctx.metrics.run_going_on(&r.ns, &r.name, started.filter(|_| !decision.finished));
    // Waiting for a window: look again when it opens (at least every 5 minutes).
    let until_window = next_window.map(|n| {
        let secs = n.duration_since(Timestamp::now()).as_secs().clamp(0, 300) as u64;
        Duration::from_secs(secs + 1)
    });
    Ok(match (decision.finished, spec_changed) {
        // The spec changed during the run: its own run starts now.
        (true, true) => Requeue::requeue(Duration::from_secs(1)),
        // Count the fleet as the run left it (see `follow`).
        (true, false) => Requeue::requeue(Duration::from_secs(1)),
        (false, _) => match probing {
            // Batch Jobs run: their tenants' results are looked at again in a moment.
            Some(again) => Requeue::requeue(again),
            None => Requeue::requeue(until_window.unwrap_or(Duration::from_secs(60)).min(Duration::from_secs(60))),
        },
    })
}

/// Publish each Job's end; one that went out is never published again.
async fn announce_ends(ctx: &Context, r: &Resource<'_>, ends: Vec<observe::Ended>) {
    for (job, outs) in ends {
        if report::job_ended(ctx, r.dbm, &job, &outs).await {
            if let Some(m) = ctx.runs.lock().expect("lock").get_mut(&r.key) {
                m.announced(job.name_any());
            }
        }
    }
}

/// The views as they will be once the decided launches are made (a migration launch is its
/// whole batch's).
fn with_launches(plan: &FrozenRun, mut views: Vec<TenantView>, launch: &[(usize, Action)]) -> Vec<TenantView> {
    for (i, action) in launch {
        match action {
            Action::Migrate => plan.batch(*i).for_each(|k| views[k].migrate = Step::Running),
            Action::Rollback => views[*i].rollback = Step::Running,
        }
    }
    views
}

/// A run ended: delete the Jobs and ConfigMaps of runs beyond `spec.historyLimit`. A failure
/// is logged and left for the next run's end (nothing of the migration depends on it).
async fn prune(ctx: &Context, r: &Resource<'_>) {
    for run in observe::old_runs(ctx, r, r.dbm.spec.history_limit.max(1) as usize) {
        match act::prune_run(ctx, r, &run).await {
            Ok(()) => tracing::info!(resource = r.key, run = %run, "deleted an old run's Jobs and ConfigMaps"),
            Err(e) => {
                tracing::warn!(resource = r.key, run = %run, error = %e, "could not delete an old run's Jobs");
                ctx.metrics.reconcile_errors.get_or_create(&ReasonLabel { reason: "PruneFailed".into() }).inc();
            }
        }
    }
}

/// Keep the count of running Jobs (for deletion and the gauge); forget a finished run.
fn remember(ctx: &Context, r: &Resource<'_>, running: usize, forget: bool) {
    let mut runs = ctx.runs.lock().expect("lock");
    if let Some(m) = runs.get_mut(&r.key) {
        m.running = running;
    }
    if forget {
        runs.remove(&r.key);
    }
    ctx.metrics.jobs_running.set(runs.values().map(|m| m.running as i64).sum());
}
