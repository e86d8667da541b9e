//! Observe: the run's frozen plan and what its Jobs did, as the rollout decision needs it.
//!
//! Reads the Job store (no API call) and, for Jobs that finished since the last look, their
//! pods' termination messages (one list call per finished Job, once).

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

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("reading the pods of Job {job}: {source}")]
    Pods {
        job: String,
        #[source]
        source: Box<kube::Error>,
    },
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
    /// Outcomes of finished Jobs, by Job name.
    outcomes: HashMap<String, Outcome>,
    /// Jobs whose end was already announced (Event, metrics).
    announced: HashSet<String>,
    pub running: usize,
}

impl RunMemory {
    pub fn new(plan: Arc<FrozenRun>) -> Self {
        RunMemory { plan, launched: HashMap::new(), outcomes: HashMap::new(), announced: HashSet::new(), running: 0 }
    }

    /// The end of this Job was announced: never again.
    pub fn announced(&mut self, job: String) {
        self.announced.insert(job);
    }
}

/// What the run's Jobs did.
pub struct Observed {
    /// Each tenant's Jobs, in plan order.
    pub views: Vec<TenantView>,
    /// Launches recorded in the status whose Jobs are missing (lost between the status write
    /// and the create): created again.
    pub missing: Vec<(usize, Action)>,
    /// Jobs that ended while this process ran and whose end was not announced yet.
    pub new_ends: Vec<(Arc<Job>, Outcome)>,
}

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
    // In plan order, so reads and announcements follow the tenants.
    let ordered: Vec<Arc<Job>> = plan
        .tenants
        .iter()
        .flat_map(|t| [Action::Migrate, Action::Rollback].map(|a| job_name(&r.name, &plan.run_id, t, a)))
        .filter_map(|n| jobs.get(&n).cloned())
        .collect();
    let unread: Vec<Arc<Job>> = {
        let runs = ctx.runs.lock().expect("lock");
        let mem = runs.get(&r.key);
        ordered
            .iter()
            .filter(|j| matches!(job_phase(j), JobPhase::Finished(_)))
            .filter(|j| mem.is_none_or(|m| !m.outcomes.contains_key(&j.name_any())))
            .cloned()
            .collect()
    };
    let read = read_outcomes(ctx, &r.ns, unread).await?;

    let mut runs = ctx.runs.lock().expect("lock");
    let mem = runs.entry(r.key.clone()).or_insert_with(|| RunMemory::new(plan.clone()));
    if mem.plan.run_id != plan.run_id {
        *mem = RunMemory::new(plan.clone());
    }
    for (job, o) in read {
        mem.outcomes.insert(job.name_any(), o);
    }
    // Ends are announced until an announcement went out (a failed reconcile retries them).
    let new_ends = ordered
        .iter()
        .filter(|j| job_end(j).is_some_and(|t| t >= ctx.started))
        .filter(|j| !mem.announced.contains(&j.name_any()))
        .filter_map(|j| mem.outcomes.get(&j.name_any()).map(|o| (j.clone(), o.clone())))
        .collect();
    let (views, missing) = tenant_views(plan, &r.name, &jobs, mem, &recorded);
    Ok(Observed { views, missing, new_ends })
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

/// Finished Jobs' outcomes, from their pods.
async fn read_outcomes(ctx: &Context, ns: &str, jobs: Vec<Arc<Job>>) -> Result<Vec<(Arc<Job>, Outcome)>, ObserveError> {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut read = Vec::new();
    for job in jobs {
        let jn = job.name_any();
        let pods = pods_api
            .list(&ListParams::default().labels(&format!("job-name={jn}")))
            .await
            .map_err(|e| ObserveError::Pods { job: jn, source: Box::new(e) })?;
        let o = jobs::outcome(&job, &pods.items);
        // Read: the pods may go now.
        super::act::release_pods(ctx, ns, &pods.items).await;
        read.push((job, o));
    }
    Ok(read)
}

/// How long a launch recorded in the status may be missing from the store before its Job is
/// created again (the store lags behind creates by a moment).
const MISSING_AFTER: Duration = Duration::from_secs(30);

/// Each tenant's two Jobs, and the recorded launches whose Jobs are missing.
fn tenant_views(
    plan: &FrozenRun,
    resource: &str,
    jobs: &HashMap<String, Arc<Job>>,
    mem: &RunMemory,
    recorded: &HashSet<(String, Action)>,
) -> (Vec<TenantView>, Vec<(usize, Action)>) {
    let mut missing = Vec::new();
    let views = plan
        .tenants
        .iter()
        .enumerate()
        .map(|(i, tenant)| {
            let mut step_of = |action: Action| {
                let jn = job_name(resource, &plan.run_id, tenant, action);
                if let Some(job) = jobs.get(&jn) {
                    return match job_phase(job) {
                        JobPhase::Running => Step::Running,
                        JobPhase::Finished(_) => {
                            mem.outcomes.get(&jn).cloned().map(|o| Step::Done(Box::new(o))).unwrap_or(Step::Running)
                        }
                    };
                }
                let launched_at = mem.launched.get(&(i, action));
                if launched_at.is_some() || recorded.contains(&(tenant.clone(), action)) {
                    // Launched but not in the store: just created, or lost between the
                    // status write and the create. Create it (again) once it is clearly missing.
                    if launched_at.is_none_or(|t| t.elapsed() > MISSING_AFTER) {
                        missing.push((i, action));
                    }
                    return Step::Running;
                }
                Step::NotStarted
            };
            TenantView { migrate: step_of(Action::Migrate), rollback: step_of(Action::Rollback) }
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
