//! Observe: the run's frozen plan and what its Jobs did, as the rollout decision needs it.
//!
//! Reads the Job store (no API call) and, for Jobs that finished since the last look, their
//! pods' termination messages (one list call per finished Job, once). A batch Job's outcomes
//! are its tenants' results in their databases: they are read as soon as every tenant of the
//! batch has one, which is before the pod has exited and the Job has counted it (seconds on a
//! real cluster), so the rollout goes on then ([`probe_batches`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::ResourceExt;

use super::frozen::{self, FrozenRun, PLAN_KEY};
use super::jobs::{self, job_name, job_phase, Action, JobPhase, Outcome};
use super::reconcile::Resource;
use super::rollout::{Step, TenantView};
use super::Context;
use crate::crd::DatabaseMigrationStatus;
use crate::job::JobResult;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("reading the pods of Job {job}: {source}")]
    Pods {
        job: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("reading the results of batch Job {job}: {why}")]
    Results { job: String, why: String },
    #[error("reading the plan of run {run} (ConfigMap {config_map}): {source}")]
    ReadPlan {
        run: String,
        config_map: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// The plan is gone or unreadable: the run cannot continue as it started.
    #[error("{0}")]
    Lost(String),
}

/// What the controller remembers about a run between reconciles (rebuilt after a restart
/// from the plan ConfigMap, the status and the Jobs).
pub struct RunMemory {
    pub plan: Arc<FrozenRun>,
    /// Jobs created by this process, and when (the Job store may not show them yet).
    pub(super) launched: HashMap<(usize, Action), Instant>,
    /// Outcomes of finished Jobs, by [`outcome_key`].
    outcomes: HashMap<String, Arc<Outcome>>,
    /// Jobs whose end was already announced (Event, metrics).
    announced: HashSet<String>,
    /// Batch Jobs whose outcomes were read while they still ran (announced then, not at their end).
    read_early: HashSet<String>,
    /// When each running batch Job's results were last looked at, and how soon again.
    probed: HashMap<String, Probed>,
    /// The connection batch results are read with, kept for the run (dropped after an error).
    conn: Option<Arc<crate::mongo::Connection>>,
    pub running: usize,
}

impl RunMemory {
    pub fn new(plan: Arc<FrozenRun>) -> Self {
        RunMemory {
            plan,
            launched: HashMap::new(),
            outcomes: HashMap::new(),
            announced: HashSet::new(),
            read_early: HashSet::new(),
            probed: HashMap::new(),
            conn: None,
            running: 0,
        }
    }

    /// The end of this Job was announced: never again.
    pub fn announced(&mut self, job: String) {
        self.announced.insert(job);
    }
}

/// The last look at a running batch's results.
struct Probed {
    at: Instant,
    /// How long after `at` the next look is due.
    every: Duration,
    /// When the batch was last seen with fewer tenants left, and how many.
    seen: Option<(Instant, usize)>,
    /// Tenants reported per second, from the last two such sightings.
    rate: Option<f64>,
}

impl Probed {
    fn new() -> Self {
        Probed { at: Instant::now(), every: Duration::ZERO, seen: None, rate: None }
    }

    /// When to look again, from about how many of the batch's tenants are `left` without a
    /// result (`None`: too far to tell, or a failed result: looked at again in a second, the
    /// pace forgotten): half the time the batch's pace says is left, between [`PROBE_SOON`] and [`PROBE_EVERY`];
    /// [`PROBE_NEAR`] when the pace is not known yet; backing off from there to once a second
    /// while nothing changes beyond what the pace said (a slow tenant).
    fn next(&mut self, left: Option<usize>, now: Instant) -> Duration {
        let Some(left) = left else {
            (self.seen, self.rate) = (None, None);
            return PROBE_EVERY;
        };
        let moved = match self.seen {
            Some((t0, l0)) if left < l0 => {
                let secs = now.duration_since(t0).as_secs_f64().max(1e-3);
                self.rate = Some((l0 - left) as f64 / secs);
                true
            }
            Some(_) => false,
            None => true,
        };
        if moved {
            self.seen = Some((now, left));
        }
        let since = self.seen.map_or(0.0, |(t, _)| now.duration_since(t).as_secs_f64());
        let backoff = (self.every * 2).clamp(PROBE_NEAR, PROBE_EVERY);
        match self.rate {
            Some(rate) if left as f64 / rate > since => {
                Duration::from_secs_f64((left as f64 / rate - since) / 2.0).clamp(PROBE_SOON, PROBE_EVERY)
            }
            None if moved => PROBE_NEAR,
            _ => backoff,
        }
    }
}

/// What the run's Jobs did.
pub struct Observed {
    /// Each tenant's Jobs, in plan order.
    pub views: Vec<TenantView>,
    /// Launches recorded in the status whose Jobs are missing (lost between the status write
    /// and the create): created again.
    pub missing: Vec<(usize, Action)>,
    /// Jobs that ended while this process ran (or batch Jobs whose every tenant reported) and
    /// whose end was not announced yet, with each of their tenants' outcomes (one, or a batch's).
    pub new_ends: Vec<Ended>,
    /// Batch Jobs run whose results are not all in yet: looked at again after this long (no
    /// Kubernetes event says a tenant finished).
    pub probing: Option<Duration>,
}

/// A Job that ended, with each of its tenants' outcomes.
pub type Ended = (Arc<Job>, Vec<(String, Arc<Outcome>)>);

/// Where a tenant's outcome is kept: by Job name, and for a tenant of a batch by
/// `<job>#<tenant index>` (one Job, several outcomes).
fn outcome_key(plan: &FrozenRun, job: &str, i: usize, action: Action) -> String {
    if action == Action::Migrate && plan.batch(plan.batch_start(i)).len() > 1 {
        format!("{job}#{i}")
    } else {
        job.to_string()
    }
}

/// A Job of the run and the tenants (plan indexes) it migrates or rolls back.
type Covered = (Arc<Job>, Action, Vec<usize>);

/// Read the plan from memory, or from its ConfigMap.
pub async fn plan(ctx: &Context, r: &Resource<'_>, run_id: &str) -> Result<Arc<FrozenRun>, ObserveError> {
    if let Some(m) = ctx.runs.lock().expect("lock").get(&r.key) {
        if m.plan.run_id == run_id {
            return Ok(m.plan.clone());
        }
    }
    let name = frozen::plan_config_map(run_id);
    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), &r.ns).get_opt(&name).await.map_err(|e| {
        ObserveError::ReadPlan { run: run_id.into(), config_map: format!("{}/{name}", r.ns), source: Box::new(e) }
    })?;
    let lost = |why: String| ObserveError::Lost(format!("the plan of run {run_id} (ConfigMap {}/{name}) {why}", r.ns));
    let cm = cm.ok_or_else(|| lost("is gone".into()))?;
    // Anyone who may write ConfigMaps in the namespace could have made or changed it (its name
    // is predictable): only a plan this resource owns is followed, and its jobTemplate is
    // checked again, as the Jobs are built from it.
    owned_by(&cm.metadata, r.dbm).map_err(lost)?;
    let text = cm.data.as_ref().and_then(|d| d.get(PLAN_KEY)).cloned().unwrap_or_default();
    let plan: FrozenRun = serde_json::from_str(&text).map_err(|e| lost(format!("is unreadable: {e}")))?;
    ctx.config.job_policy.check(&plan.spec.job_template).map_err(|e| lost(format!("is refused: {e}")))?;
    let plan = Arc::new(plan);
    ctx.runs.lock().expect("lock").insert(r.key.clone(), RunMemory::new(plan.clone()));
    Ok(plan)
}

/// Whether `meta` names `dbm` (by uid) as its controlling owner.
pub fn owned_by(meta: &kube::api::ObjectMeta, dbm: &crate::crd::DatabaseMigration) -> Result<(), String> {
    let uid = dbm.metadata.uid.as_deref().unwrap_or_default();
    let ours = meta.owner_references.iter().flatten().any(|o| o.uid == uid && o.controller == Some(true));
    if ours {
        Ok(())
    } else {
        Err("is not this resource's (made by someone else: its owner is not this DatabaseMigration)".into())
    }
}

/// Where every tenant of the run stands.
pub async fn jobs(ctx: &Context, r: &Resource<'_>, plan: &Arc<FrozenRun>) -> Result<Observed, ObserveError> {
    let jobs = run_jobs(ctx, r, &plan.run_id);
    let recorded = recorded_launches(&r.status, &plan.run_id);
    // In plan order, so reads and announcements follow the tenants: each batch's migration Job,
    // then its tenants' rollback Jobs.
    let mut ordered: Vec<Covered> = Vec::new();
    for b in plan.batch_starts() {
        let batch: Vec<usize> = plan.batch(b).collect();
        if let Some(j) = jobs.get(&job_name(&r.name, &plan.run_id, &plan.tenants[b], Action::Migrate)) {
            ordered.push((j.clone(), Action::Migrate, batch.clone()));
        }
        for i in batch {
            if let Some(j) = jobs.get(&job_name(&r.name, &plan.run_id, &plan.tenants[i], Action::Rollback)) {
                ordered.push((j.clone(), Action::Rollback, vec![i]));
            }
        }
    }
    let unread: Vec<Covered> = {
        let runs = ctx.runs.lock().expect("lock");
        let mem = runs.get(&r.key);
        ordered
            .iter()
            .filter(|(j, _, _)| matches!(job_phase(j), JobPhase::Finished(_)))
            .filter(|(j, a, t)| {
                mem.is_none_or(|m| !m.outcomes.contains_key(&outcome_key(plan, &j.name_any(), t[0], *a)))
            })
            .cloned()
            .collect()
    };
    // Running batch Jobs whose outcomes are not known, not looked at within the last moment.
    let running_batches: Vec<Covered> = {
        let runs = ctx.runs.lock().expect("lock");
        let mem = runs.get(&r.key).filter(|m| m.plan.run_id == plan.run_id);
        ordered
            .iter()
            .filter(|(j, a, t)| *a == Action::Migrate && t.len() > 1 && job_phase(j) == JobPhase::Running)
            .filter(|(j, _, t)| {
                mem.is_none_or(|m| !m.outcomes.contains_key(&outcome_key(plan, &j.name_any(), t[0], Action::Migrate)))
            })
            .cloned()
            .collect()
    };
    let running_names: Vec<String> = running_batches.iter().map(|(j, _, _)| j.name_any()).collect();
    let due: Vec<Covered> = {
        let mut runs = ctx.runs.lock().expect("lock");
        let mem = runs.get_mut(&r.key).filter(|m| m.plan.run_id == plan.run_id);
        match mem {
            Some(m) => running_batches
                .into_iter()
                .filter(|(j, _, _)| {
                    let p = m.probed.entry(j.name_any()).or_insert_with(Probed::new);
                    let due = p.at.elapsed() >= p.every;
                    if due {
                        p.at = Instant::now();
                    }
                    due
                })
                .collect(),
            None => running_batches,
        }
    };
    // Bounded: an unreachable server delays the rollout's other work by at most this much (an
    // early read cut short is done again at the next look, or at the Job's end).
    let looked: HashSet<String> = due.iter().map(|(j, _, _)| j.name_any()).collect();
    let (early, near) = tokio::time::timeout(PROBE_BUDGET, probe_batches(ctx, r, plan, due)).await.unwrap_or_default();
    let read = read_outcomes(ctx, r, plan, unread).await?;

    let mut runs = ctx.runs.lock().expect("lock");
    let mem = runs.entry(r.key.clone()).or_insert_with(|| RunMemory::new(plan.clone()));
    if mem.plan.run_id != plan.run_id {
        *mem = RunMemory::new(plan.clone());
    }
    // A batch looked at now is looked at again when its progress says (one whose look came
    // to nothing, e.g. the server did not answer, in a second, its pace kept).
    let now = Instant::now();
    let near: HashMap<String, (Option<usize>, bool)> = near.into_iter().map(|(j, l, w)| (j, (l, w))).collect();
    for job in &looked {
        // (Made here too: the first look after a restart or at a new run counts.)
        let p = mem.probed.entry(job.clone()).or_insert_with(Probed::new);
        let left = near.get(job).copied();
        p.every = match left {
            // A look that read the whole batch: not again sooner than this.
            Some((left, true)) => p.next(left, now).max(PROBE_NEAR),
            Some((left, false)) => p.next(left, now),
            None => PROBE_EVERY,
        };
        tracing::debug!(resource = r.key, job, ?left, again = ?p.every, "looked at a running batch's results");
    }
    // The next look is due when the soonest of the batches still running is (one looked at
    // now, after its interval; another, after what is left of it).
    let probing = running_names
        .iter()
        .filter(|j| !early.iter().any(|(e, _)| e.name_any() == **j))
        .map(|j| match mem.probed.get(j) {
            Some(p) if looked.contains(j) => p.every,
            Some(p) => p.every.saturating_sub(p.at.elapsed()).max(PROBE_SOON),
            None => PROBE_EVERY,
        })
        .min();
    for (job, outs) in early {
        mem.read_early.insert(job.name_any());
        for (i, o) in outs {
            mem.outcomes.insert(outcome_key(plan, &job.name_any(), i, Action::Migrate), Arc::new(o));
        }
    }
    for (job, action, outs) in read {
        for (i, o) in outs {
            mem.outcomes.insert(outcome_key(plan, &job.name_any(), i, action), Arc::new(o));
        }
    }
    // Ends are announced until an announcement went out (a failed reconcile retries them).
    let new_ends = ordered
        .iter()
        .filter(|(j, _, _)| job_end(j).is_some_and(|t| t >= ctx.started) || mem.read_early.contains(&j.name_any()))
        .filter(|(j, _, _)| !mem.announced.contains(&j.name_any()))
        .filter_map(|(j, a, tenants)| {
            let outs: Option<Vec<(String, Arc<Outcome>)>> = tenants
                .iter()
                .map(|&i| {
                    let o = mem.outcomes.get(&outcome_key(plan, &j.name_any(), i, *a))?;
                    Some((plan.tenants[i].clone(), o.clone()))
                })
                .collect();
            outs.map(|o| (j.clone(), o))
        })
        .collect();
    let (views, missing) = tenant_views(plan, &r.name, &jobs, mem, &recorded);
    Ok(Observed { views, missing, new_ends, probing })
}

/// The longest wait between looks at a running batch Job's results (and the wait while none
/// of the tenants a look reads has reported).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The wait once some of the tenants a look reads have reported (as far back as about half the
/// batch), until the batch's pace is known.
const PROBE_NEAR: Duration = Duration::from_millis(200);
/// The soonest look at a batch after the last one.
const PROBE_SOON: Duration = Duration::from_millis(50);
/// How long one look at running batches may take within a reconcile.
const PROBE_BUDGET: Duration = Duration::from_secs(2);

/// The connection batch results are read with: the run's, or a new one from the Secret.
async fn results_connection(ctx: &Context, r: &Resource<'_>) -> Result<Arc<crate::mongo::Connection>, String> {
    let kept = ctx.runs.lock().expect("lock").get(&r.key).and_then(|m| m.conn.clone());
    if let Some(c) = kept {
        return Ok(c);
    }
    let uri = super::inputs::read_uri(&ctx.client, r.dbm).await.map_err(|e| e.message)?;
    let c = Arc::new(super::inputs::connect(&uri, ctx.config.connect_timeout).await.map_err(|e| e.message)?);
    if let Some(m) = ctx.runs.lock().expect("lock").get_mut(&r.key) {
        m.conn = Some(c.clone());
    }
    Ok(c)
}

/// Forget the run's connection (after an error: the next look makes a new one from the Secret).
fn drop_connection(ctx: &Context, r: &Resource<'_>) {
    if let Some(m) = ctx.runs.lock().expect("lock").get_mut(&r.key) {
        m.conn = None;
    }
}

/// Running batch Jobs every one of whose tenants has a successful result in its database:
/// their outcomes, read now rather than once the pod has exited and the Job counted it. A
/// result is written after everything of its tenant is done (lock released, snapshot kept);
/// only successes are taken early, from a Job with no failed pod whose pods are neither failed
/// nor being deleted: a failed result may be a runner stopped by an eviction, whose Job retries
/// the batch in a new pod (which would find the successful tenants migrated and report them
/// the same). The pods' finalizers are released at once (nothing more is read from them). Any
/// other batch waits for its Job's end, which says what became of every tenant.
///
/// A look reads the batch's last `parallelPerJob` tenants (the last ones started) and one
/// tenant 1, 2, 4, ... places before them: tenants start in plan order, so where the results
/// stop says about how many are left; the whole batch is read only when the last
/// `parallelPerJob` all succeeded. Returns the batches taken, and for others about how many
/// of their tenants are left ([`Progress`]; a batch missing from it learned nothing from this
/// look: the server did not answer, its pods could not be read or are not settled, a failed
/// pod). Errors are logged and left for the next look.
async fn probe_batches(
    ctx: &Context,
    r: &Resource<'_>,
    plan: &FrozenRun,
    jobs: Vec<Covered>,
) -> (Vec<(Arc<Job>, Vec<(usize, Outcome)>)>, Progress) {
    let (mut read, mut near) = (Vec::new(), Vec::new());
    if jobs.is_empty() {
        return (read, near);
    }
    let conn = match results_connection(ctx, r).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(resource = r.key, error = %e, "could not look at running batches' results");
            return (read, near);
        }
    };
    let tail = (plan.spec.rollout.parallel_per_job as usize).max(1);
    for (job, _, tenants) in jobs {
        if job.status.as_ref().and_then(|s| s.failed).unwrap_or(0) > 0 {
            continue;
        }
        let offsets = sample_offsets(tenants.len(), tail);
        let picks: Vec<usize> = offsets.iter().map(|o| tenants[tenants.len() - o]).collect();
        let complete = |looks: &[Result<Option<JobResult>, crate::job::batch::ReadError>]| {
            looks.iter().all(|l| matches!(l, Ok(Some(r)) if r.ok))
        };
        let looks = match results(&conn, plan, &picks).await {
            Ok(l) if complete(&l[..tail.min(l.len())]) => results(&conn, plan, &tenants).await,
            Ok(l) => {
                near.push((job.name_any(), left(&l, &offsets), false));
                continue;
            }
            Err(e) => Err(e),
        };
        let looks = match looks {
            Ok(l) if complete(&l) => l,
            // Its last tenants reported but one before them is still at work (a larger
            // tenant): the whole batch is read again at its pace, not sooner than PROBE_NEAR.
            Ok(l) => {
                let all: Vec<usize> = (1..=l.len()).rev().collect();
                near.push((job.name_any(), left(&l, &all), true));
                continue;
            }
            Err(e) => {
                drop_connection(ctx, r);
                tracing::debug!(resource = r.key, job = %job.name_any(), error = %conn.redactor.apply(&e), "could not look at a running batch's results");
                return (read, near);
            }
        };
        let outs = tenants
            .iter()
            .copied()
            .zip(looks)
            .filter_map(|(i, l)| {
                let res = jobs::sanitized(l.ok()??);
                Some((i, Outcome { ok: res.ok, ran: true, error: None, result: Some(res) }))
            })
            .collect();
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &r.ns);
        // The outcomes are taken only with the pods let go (after the Job's end nothing looks
        // at them again): otherwise read again at the next look.
        let settled = |p: &Pod| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()).is_none_or(|ph| ph != "Failed")
        };
        match pods.list(&ListParams::default().labels(&format!("job-name={}", job.name_any()))).await {
            Ok(p) if !p.items.iter().all(settled) => continue,
            Ok(p) if super::act::release_pods_now(ctx, &r.ns, &p.items).await => {}
            Ok(_) => {
                near.push((job.name_any(), Some(0), false));
                continue;
            }
            Err(e) => {
                tracing::warn!(job = %job.name_any(), error = %e, "could not read a batch's pods; retrying later");
                continue;
            }
        }
        read.push((job, outs));
    }
    (read, near)
}

/// Running batches not taken, each with about how many of its tenants are left.
type Progress = Vec<(String, Option<usize>, bool)>;

/// Where a look at a batch of `n` tenants reads, as places from its end: its last `tail`
/// (1 to `tail`), then `tail` + 1, + 2, + 4, ... while within the batch.
fn sample_offsets(n: usize, tail: usize) -> Vec<usize> {
    let mut offsets: Vec<usize> = (1..=tail.min(n)).collect();
    let mut k = 1;
    while tail + k <= n {
        offsets.push(tail + k);
        k *= 2;
    }
    offsets
}

/// About how many tenants of a batch are left, from the results at these places from its end:
/// the farthest sampled place without one (a lower bound: the true count may be up to about
/// twice as many, the next place sampled). `None` when none reported (too far to tell) or one
/// failed or is unreadable (its Job's end decides; looking sooner helps nothing).
fn left(looks: &[Result<Option<JobResult>, crate::job::batch::ReadError>], offsets: &[usize]) -> Option<usize> {
    let fine = looks.iter().all(|l| matches!(l, Ok(None) | Ok(Some(JobResult { ok: true, .. }))));
    if !fine || !looks.iter().any(|l| matches!(l, Ok(Some(_)))) {
        return None;
    }
    looks.iter().zip(offsets).filter(|(l, _)| matches!(l, Ok(None))).map(|(_, &o)| o).max()
}

/// The results of `tenants` in this run, read side by side. An unreachable server is an error;
/// a result that is not one is its tenant's [`crate::job::batch::ReadError`].
async fn results(
    conn: &crate::mongo::Connection,
    plan: &FrozenRun,
    tenants: &[usize],
) -> Result<Vec<Result<Option<JobResult>, crate::job::batch::ReadError>>, String> {
    use crate::job::batch::ReadError;
    use futures::StreamExt;
    let dbs: Vec<mongodb::Database> = tenants.iter().map(|&i| conn.client.database(&plan.tenants[i])).collect();
    let looks: Vec<Result<Option<JobResult>, ReadError>> =
        futures::stream::iter(dbs.into_iter().map(|db| read_result(db, plan.run_id.clone())))
            .buffered(RESULT_READS)
            .collect()
            .await;
    // A server that does not answer now says nothing of the tenants: read them again later.
    if let Some(Err(ReadError::Unreachable(e))) = looks.iter().find(|l| matches!(l, Err(ReadError::Unreachable(_)))) {
        return Err(conn.redactor.apply(e));
    }
    Ok(looks)
}

/// The Jobs of this run, from the store.
fn run_jobs(ctx: &Context, r: &Resource<'_>, run_id: &str) -> HashMap<String, Arc<Job>> {
    let uid = r.dbm.uid().unwrap_or_default();
    ctx.jobs
        .state()
        .into_iter()
        .filter(|j| j.namespace().as_deref() == Some(r.ns.as_str()))
        .filter(|j| j.labels().get(jobs::LABEL_RUN).map(String::as_str) == Some(run_id))
        .filter(|j| j.owner_references().iter().any(|o| o.uid == uid))
        .map(|j| (j.name_any(), j))
        .collect()
}

/// This resource's runs other than the newest `keep`, oldest first, whose Jobs have all
/// finished (a run that still has running Jobs, e.g. one whose plan was lost, is kept), from
/// the Job store: runs are ordered by their newest Job.
pub fn old_runs(ctx: &Context, r: &Resource<'_>, keep: usize) -> Vec<String> {
    let uid = r.dbm.uid().unwrap_or_default();
    let mut runs: HashMap<String, (Timestamp, bool)> = HashMap::new();
    for j in ctx.jobs.state() {
        if j.namespace().as_deref() != Some(r.ns.as_str()) || !j.owner_references().iter().any(|o| o.uid == uid) {
            continue;
        }
        let Some(run) = j.labels().get(jobs::LABEL_RUN) else { continue };
        let created = j.metadata.creation_timestamp.as_ref().map_or(Timestamp::UNIX_EPOCH, |t| t.0);
        let e = runs.entry(run.clone()).or_insert((created, false));
        e.0 = e.0.max(created);
        e.1 |= job_phase(&j) == JobPhase::Running;
    }
    let mut order: Vec<(Timestamp, String, bool)> =
        runs.into_iter().map(|(id, (t, running))| (t, id, running)).collect();
    order.sort();
    let n = order.len().saturating_sub(keep);
    order.into_iter().take(n).filter(|(_, _, running)| !running).map(|(_, id, _)| id).collect()
}

/// How many Jobs of the run have not finished.
pub fn running_jobs(ctx: &Context, r: &Resource<'_>, run_id: &str) -> usize {
    run_jobs(ctx, r, run_id).values().filter(|j| jobs::job_phase(j) == jobs::JobPhase::Running).count()
}

/// Launches the status recorded (they matter after a restart).
fn recorded_launches(st: &DatabaseMigrationStatus, run_id: &str) -> HashSet<(String, Action)> {
    if st.run_id.as_deref() != Some(run_id) {
        return HashSet::new();
    }
    let mut out = HashSet::new();
    for t in &st.tenants {
        if t.job.is_some() {
            out.insert((t.name.clone(), Action::Migrate));
        }
        if t.rollback.is_some() {
            out.insert((t.name.clone(), Action::Rollback));
        }
    }
    out
}

/// Finished Jobs' outcomes: a Job of one tenant from its pods' termination message, a batch's
/// from its tenants' databases ([`batch_outcomes`]).
async fn read_outcomes(
    ctx: &Context,
    r: &Resource<'_>,
    plan: &FrozenRun,
    jobs: Vec<Covered>,
) -> Result<Vec<(Arc<Job>, Action, Vec<(usize, Outcome)>)>, ObserveError> {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &r.ns);
    let mut read = Vec::new();
    for (job, action, tenants) in jobs {
        let jn = job.name_any();
        let pods = pods_api
            .list(&ListParams::default().labels(&format!("job-name={jn}")))
            .await
            .map_err(|e| ObserveError::Pods { job: jn.clone(), source: Box::new(e) })?;
        let single = match tenants.as_slice() {
            [i] => Some((*i, jobs::outcome(&job, &pods.items))),
            _ => None,
        };
        // Read (a batch's results are in its tenants' databases): the pods may go now.
        super::act::release_pods(ctx, &r.ns, &pods.items).await;
        let outs = match single {
            Some(one) => vec![one],
            None => {
                let failed = |why: String| ObserveError::Results { job: jn.clone(), why };
                let c = results_connection(ctx, r).await.map_err(failed)?;
                let o = match batch_outcomes(&c, plan, &tenants).await {
                    Ok(o) => o,
                    Err(e) => {
                        drop_connection(ctx, r);
                        return Err(failed(e));
                    }
                };
                tenants.iter().copied().zip(o).collect()
            }
        };
        read.push((job, action, outs));
    }
    Ok(read)
}

/// Tenant databases read at once for a batch's results.
const RESULT_READS: usize = 16;

/// The outcomes of a finished batch Job's tenants, from their databases: the result each
/// tenant's runner wrote there ([`crate::job::batch`]); for a tenant without one, its tracking
/// collection says whether the runner got to it (no record of the run: untouched). An error
/// (the Secret, MongoDB) is retried at the next reconcile.
async fn batch_outcomes(
    conn: &crate::mongo::Connection,
    plan: &FrozenRun,
    tenants: &[usize],
) -> Result<Vec<Outcome>, String> {
    let run = plan.run_id.as_str();
    let looks = results(conn, plan, tenants).await?;
    let any_failed = looks.iter().any(|l| matches!(l, Ok(Some(r)) if !r.ok) || l.is_err());
    // Without keep-going the batch stopped at its first failure: the tenants after it were left
    // by the policy, not by a stopped runner.
    let stopped_by_a_failure = any_failed && !jobs::keeps_going(plan);
    let mut out = Vec::with_capacity(tenants.len());
    for (&i, look) in tenants.iter().zip(looks) {
        let o = match look {
            Ok(Some(res)) => {
                let res = jobs::sanitized(res);
                Outcome { ok: res.ok, ran: true, error: None, result: Some(res) }
            }
            // Whoever may write to the tenant database could have written this: the tenant is
            // taken as failed (its rollback, if any, runs), with why.
            Err(e) => Outcome {
                ok: false,
                ran: true,
                result: None,
                error: Some(conn.redactor.apply(&format!("its result could not be read: {e}"))),
            },
            Ok(None) => {
                let db = conn.client.database(&plan.tenants[i]);
                match crate::engine::tracking::load(&db, crate::engine::tracking::TRACKING).await {
                    Ok(records) => {
                        let touched = records.iter().any(|rec| {
                            rec.run_id == run
                                || rec.rolled_back_by.as_deref() == Some(run)
                                || rec.work.as_ref().is_some_and(|w| w.run_id == run)
                        });
                        untouched_or_interrupted(touched, stopped_by_a_failure)
                    }
                    // A record that is not one (written by anyone with access): that tenant
                    // cannot be judged and is failed, with why; the others go on.
                    Err(e) if matches!(*e.kind, mongodb::error::ErrorKind::BsonDeserialization(_)) => Outcome {
                        ok: false,
                        ran: true,
                        result: None,
                        error: Some("no result, and its tracking collection holds a record that is not one".into()),
                    },
                    Err(e) => {
                        let what = format!("reading {}: {}", plan.tenants[i], crate::mongo::describe(&e));
                        return Err(conn.redactor.apply(&what));
                    }
                }
            }
        };
        out.push(o);
    }
    Ok(out)
}

async fn read_result(db: mongodb::Database, run: String) -> Result<Option<JobResult>, crate::job::batch::ReadError> {
    crate::job::batch::read(&db, &run, false).await
}

/// A batch tenant without a result. `touched`: its tracking collection has a record of the run
/// (the runner stopped while on it, or after it but before writing its result); its next
/// runner finishes or undoes that work. Untouched, it was never started: skipped when the batch
/// stopped at a failed tenant (without keep-going: the failure policy's doing), failed when its
/// runner was stopped (killed, evicted, past its deadline).
fn untouched_or_interrupted(touched: bool, stopped_by_a_failure: bool) -> Outcome {
    if touched {
        return Outcome {
            ok: false,
            ran: true,
            result: None,
            error: Some(
                "the batch's runner stopped before it reported on this tenant; its tracking collection has records of \
                 this run (work left half-done is finished or undone by the tenant's next runner)"
                    .into(),
            ),
        };
    }
    if stopped_by_a_failure {
        let why = "not started: its batch stopped at a failed tenant (the failure policy); untouched";
        let r = JobResult { v: 1, ok: true, skipped: true, error: Some(why.into()), ..Default::default() };
        return Outcome { ok: true, ran: false, result: Some(r), error: None };
    }
    Outcome {
        ok: false,
        ran: false,
        result: None,
        error: Some("not started: the batch's runner was stopped (killed, evicted or past its deadline) before this tenant; untouched".into()),
    }
}

/// How long a launch recorded in the status may be missing from the store before its Job is
/// created again (the store lags behind creates by a moment).
const MISSING_AFTER: Duration = Duration::from_secs(30);

/// Each tenant's two Jobs, and the recorded launches whose Jobs are missing (a migration's
/// by its batch's first tenant).
fn tenant_views(
    plan: &FrozenRun,
    resource: &str,
    jobs: &HashMap<String, Arc<Job>>,
    mem: &RunMemory,
    recorded: &HashSet<(String, Action)>,
) -> (Vec<TenantView>, Vec<(usize, Action)>) {
    let mut missing = Vec::new();
    // Whether the status recorded a batch's launch, by its first tenant (asked once a batch).
    let mut batch_recorded: HashMap<usize, bool> = HashMap::new();
    let views = plan
        .tenants
        .iter()
        .enumerate()
        .map(|(i, tenant)| {
            let mut step_of = |action: Action| {
                // A migration's Job is its batch's, launched as its first tenant's.
                let (unit, first) = match action {
                    Action::Migrate => (plan.batch_start(i), &plan.tenants[plan.batch_start(i)]),
                    Action::Rollback => (i, tenant),
                };
                let jn = job_name(resource, &plan.run_id, first, action);
                if let Some(job) = jobs.get(&jn) {
                    let known = mem.outcomes.get(&outcome_key(plan, &jn, i, action));
                    return match job_phase(job) {
                        // A batch whose every tenant reported (its pod still exiting).
                        JobPhase::Running if action == Action::Migrate && known.is_some() => {
                            Step::Done(known.cloned().expect("known"))
                        }
                        JobPhase::Running => Step::Running,
                        JobPhase::Finished(_) => mem
                            .outcomes
                            .get(&outcome_key(plan, &jn, i, action))
                            .cloned()
                            .map(Step::Done)
                            .unwrap_or(Step::Running),
                    };
                }
                let launched_at = mem.launched.get(&(unit, action));
                let was_recorded = match action {
                    Action::Migrate => *batch_recorded.entry(unit).or_insert_with(|| {
                        plan.batch(unit).any(|k| recorded.contains(&(plan.tenants[k].clone(), action)))
                    }),
                    Action::Rollback => recorded.contains(&(tenant.clone(), action)),
                };
                if launched_at.is_some() || was_recorded {
                    // Launched but not in the store: just created, or lost between the
                    // status write and the create. Create it (again) once it is clearly missing.
                    if launched_at.is_none_or(|t| t.elapsed() > MISSING_AFTER) && !missing.contains(&(unit, action)) {
                        missing.push((unit, action));
                    }
                    return Step::Running;
                }
                Step::NotStarted
            };
            let migrate = step_of(Action::Migrate);
            let rollback = step_of(Action::Rollback);
            let job = job_name(resource, &plan.run_id, &plan.tenants[plan.batch_start(i)], Action::Migrate);
            let job_running = jobs.get(&job).is_some_and(|j| job_phase(j) == JobPhase::Running);
            TenantView { migrate, rollback, job_running }
        })
        .collect();
    (views, missing)
}

/// When a Job ended (its Complete/Failed condition).
pub fn job_end(job: &Job) -> Option<Timestamp> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .filter(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
        .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Result<Option<JobResult>, crate::job::batch::ReadError> {
        Ok(Some(JobResult { ok: true, ..Default::default() }))
    }

    #[test]
    fn a_look_reads_the_last_tenants_and_samples_before_them() {
        assert_eq!(sample_offsets(500, 5), [1, 2, 3, 4, 5, 6, 7, 9, 13, 21, 37, 69, 133, 261]);
        assert_eq!(sample_offsets(3, 2), [1, 2, 3]);
        assert_eq!(sample_offsets(2, 5), [1, 2]);
        let offsets = sample_offsets(20, 2); // 1, 2, 3, 4, 6, 10, 18
        let (none, failed) = (Ok(None), Ok(Some(JobResult::default())));
        let looks = |reported: usize| -> Vec<_> {
            offsets.iter().map(|&o| if o > reported { ok() } else { Ok(None) }).collect()
        };
        assert_eq!(left(&looks(20), &offsets), None, "nothing reported: too far to tell");
        assert_eq!(left(&looks(8), &offsets), Some(6), "results stop between 6 and 10 from the end");
        assert_eq!(left(&looks(1), &offsets), Some(1));
        let mut with_failure = looks(8);
        with_failure[6] = failed;
        assert_eq!(left(&with_failure, &offsets), None, "a failure waits for the Job's end");
        with_failure[6] = Err(crate::job::batch::ReadError::Invalid("bad".into()));
        assert_eq!(left(&with_failure, &offsets), None);
        assert_eq!(left(&[none], &[1]), None);
    }

    #[test]
    fn looks_come_sooner_as_a_batch_nears_its_end_at_its_own_pace() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = Probed::new();
        assert_eq!(p.next(None, at(0)), PROBE_EVERY, "far: once a second");
        assert_eq!(p.next(Some(261), at(1000)), PROBE_NEAR, "results came in, pace unknown");
        // 128 tenants in 400 ms: 133 left is about 416 ms away: looked at in half of that.
        p.every = p.next(Some(261), at(1200));
        assert_eq!(p.every, PROBE_NEAR, "no change seen yet");
        let d = p.next(Some(133), at(1400));
        assert!((Duration::from_millis(200)..=Duration::from_millis(220)).contains(&d), "{d:?}");
        // Nearly there: the soonest look.
        p.every = p.next(Some(3), at(1600));
        assert_eq!(p.every, PROBE_SOON);
        // The last tenant is slow: backing off, to once a second.
        let mut again = vec![];
        for ms in [1700, 1800, 2000, 2400, 3200, 4200] {
            p.every = p.next(Some(3), at(ms));
            again.push(p.every.as_millis());
        }
        assert_eq!(again, [200, 400, 800, 1000, 1000, 1000]);
        // A failure (or the results gone): back to once a second, the pace forgotten.
        assert_eq!(p.next(None, at(5000)), PROBE_EVERY);
        assert_eq!(p.next(Some(3), at(6000)), PROBE_NEAR);
        // Results far from the end, not moving yet (a long batch): backing off too.
        let mut p = Probed::new();
        let mut again = vec![];
        for ms in [0, 200, 600, 1400, 2400] {
            p.every = p.next(Some(513), at(ms));
            again.push(p.every.as_millis());
        }
        assert_eq!(again, [200, 400, 800, 1000, 1000]);
    }
}
