//! The reconcile driver. Short on purpose: pure modules decide (`inputs` checks, `rollout`
//! picks Jobs, `status` writes the record), this module reads the world and acts on it.
//!
//! Order of writes for every launch: the status that names the new Jobs first, then the Jobs.
//! Job names are deterministic, so a controller stopped between the two creates the same Jobs
//! after a restart, and creating an existing Job is harmless (the tracking collection of each
//! tenant database is the last guard: an applied migration is never applied again).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::inputs::{self, InputError};
use super::jobs::{self, job_name, job_phase, Action, JobPhase, Outcome};
use super::metrics::{OutcomeLabel, ReasonLabel, ResultLabel};
use super::plan::{self, RunPlan, PLAN_KEY};
use super::rollout::{self, Step, TenantView};
use super::status;
use super::{Context, Error, FINALIZER, MANAGER};
use crate::crd::{DatabaseMigration, DatabaseMigrationStatus, Phase};

/// What the controller remembers about a run between reconciles (rebuilt after a restart
/// from the plan ConfigMap, the status and the Jobs).
pub struct RunMemory {
    pub plan: Arc<RunPlan>,
    /// Jobs created by this process, and when (the Job store may not show them yet).
    launched: HashMap<(usize, Action), Instant>,
    /// Outcomes of finished Jobs, by Job name.
    outcomes: HashMap<String, Outcome>,
    /// Jobs whose end was already announced (Event, metrics).
    announced: HashSet<String>,
    pub running: usize,
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn is_active(phase: Option<Phase>) -> bool {
    matches!(phase, Some(Phase::Migrating | Phase::RollingBack | Phase::BackingUp | Phase::Validating))
}

fn is_final(phase: Option<Phase>) -> bool {
    matches!(phase, Some(Phase::Succeeded | Phase::Failed | Phase::RolledBack))
}

pub async fn reconcile(dbm: Arc<DatabaseMigration>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let ns = dbm.namespace().unwrap_or_default();
    let name = dbm.name_any();
    let api: Api<DatabaseMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let st = dbm.status.clone().unwrap_or_default();
    let key = format!("{ns}/{name}");

    if dbm.meta().deletion_timestamp.is_some() {
        return on_delete(&dbm, &ctx, &api, &st, &key).await;
    }
    if !dbm.finalizers().iter().any(|f| f == FINALIZER) {
        let mut fins = dbm.finalizers().to_vec();
        fins.push(FINALIZER.into());
        set_finalizers(&api, &ctx, &dbm, fins, "adding the finalizer").await?;
        return Ok(Requeue::await_change());
    }
    let generation = dbm.metadata.generation.unwrap_or(0);

    if is_active(st.phase) {
        if let Some(run_id) = st.run_id.clone() {
            let plan = load_plan(&ctx, &dbm, &key, &run_id).await?;
            return continue_run(&dbm, &ctx, &api, &st, &key, plan, false).await;
        }
    }
    if is_final(st.phase) && st.observed_generation == Some(generation) {
        return Ok(Requeue::await_change());
    }
    start_run(&dbm, &ctx, &api, &st, &key).await
}

async fn on_delete(
    dbm: &DatabaseMigration,
    ctx: &Context,
    api: &Api<DatabaseMigration>,
    st: &DatabaseMigrationStatus,
    key: &str,
) -> Result<Requeue, Error> {
    if !dbm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Requeue::await_change());
    }
    // A run in progress: start nothing more, let running Jobs finish (stopping one mid-way
    // would skip the engine's own undo), then let go. Snapshots stay, per retention.
    if let (true, Some(run_id)) = (is_active(st.phase), st.run_id.clone()) {
        if let Ok(plan) = load_plan(ctx, dbm, key, &run_id).await {
            continue_run(dbm, ctx, api, st, key, plan, true).await?;
            if ctx.runs.lock().expect("lock").get(key).is_some_and(|m| m.running > 0) {
                return Ok(Requeue::requeue(Duration::from_secs(10)));
            }
        }
    }
    let fins: Vec<String> = dbm.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    set_finalizers(api, ctx, dbm, fins, "removing the finalizer").await?;
    ctx.runs.lock().expect("lock").remove(key);
    Ok(Requeue::await_change())
}

/// Replace the finalizer list, failing on a concurrent change (the resourceVersion guards it).
async fn set_finalizers(
    api: &Api<DatabaseMigration>,
    ctx: &Context,
    dbm: &DatabaseMigration,
    fins: Vec<String>,
    action: &'static str,
) -> Result<(), Error> {
    let patch = serde_json::json!({ "metadata": { "finalizers": fins, "resourceVersion": dbm.resource_version() } });
    api.patch(&dbm.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(Error::kube(action))?;
    ctx.metrics.write("finalizer");
    Ok(())
}

async fn start_run(
    dbm: &DatabaseMigration,
    ctx: &Context,
    api: &Api<DatabaseMigration>,
    st: &DatabaseMigrationStatus,
    key: &str,
) -> Result<Requeue, Error> {
    let generation = dbm.metadata.generation.unwrap_or(0);
    let inputs = match inputs::gather(&ctx.client, dbm, ctx.config.connect_timeout).await {
        Ok(i) => i,
        Err(e) => return blocked(dbm, ctx, api, st, generation, e).await,
    };
    let ns = dbm.namespace().unwrap_or_default();
    let run_id = plan::run_id(dbm);
    let (tenants, canaries) = plan::order_tenants(&inputs.tenants, &dbm.spec.rollout.canaries);
    let owner = dbm.controller_owner_ref(&()).expect("a namespaced resource has an owner reference");
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let labels = BTreeMap::from([
        (jobs::MANAGED_BY.to_string(), jobs::MANAGER.to_string()),
        (jobs::LABEL_RUN.to_string(), run_id.clone()),
    ]);
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: Some(ns.clone()),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };
    let files_config_map = match &inputs.files {
        Some(files) => {
            let name = plan::files_config_map(&run_id);
            let cm = ConfigMap { metadata: meta(name.clone()), data: Some(files.clone()), ..Default::default() };
            create_ignoring_conflict(&cms, &cm, ctx, "configmap").await?;
            Some(name)
        }
        None => None,
    };
    let fresh = RunPlan {
        run_id: run_id.clone(),
        generation,
        target: inputs.target.clone(),
        tenants,
        canaries,
        files_config_map,
        spec: dbm.spec.clone(),
    };
    let cm = ConfigMap {
        metadata: meta(plan::plan_config_map(&run_id)),
        data: Some(BTreeMap::from([(PLAN_KEY.to_string(), serde_json::to_string(&fresh).expect("serializable"))])),
        ..Default::default()
    };
    let created = create_ignoring_conflict(&cms, &cm, ctx, "configmap").await?;
    // A plan written before a restart wins over a fresh one: the run is the one that started.
    let plan = if created { Arc::new(fresh) } else { load_plan(ctx, dbm, key, &run_id).await? };
    tracing::info!(resource = key, run = %run_id, tenants = plan.tenants.len(), target = ?plan.target, "run starts");
    publish(
        ctx,
        dbm,
        EventType::Normal,
        "RunStarted",
        format!(
            "run {run_id}: {} tenant(s) to {}",
            plan.tenants.len(),
            plan.target.as_deref().unwrap_or("the latest version")
        ),
    )
    .await;
    ctx.runs.lock().expect("lock").insert(key.to_string(), RunMemory::new(plan.clone()));
    continue_run(dbm, ctx, api, st, key, plan, false).await
}

/// The run cannot start: say why in the status, and wait (retry later or for a change).
async fn blocked(
    dbm: &DatabaseMigration,
    ctx: &Context,
    api: &Api<DatabaseMigration>,
    st: &DatabaseMigrationStatus,
    generation: i64,
    e: InputError,
) -> Result<Requeue, Error> {
    tracing::warn!(resource = %dbm.name_any(), reason = e.reason, error = %e.message, "run blocked");
    ctx.metrics.reconcile_errors.get_or_create(&ReasonLabel { reason: e.reason.into() }).inc();
    let new = status::blocked_status(st, generation, e.reason, &e.message, e.permanent, &now());
    if *st != new {
        write_status(api, ctx, &dbm.name_any(), &new).await?;
        let previous = st.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.reason.as_str());
        if previous != Some(e.reason) {
            publish(ctx, dbm, EventType::Warning, e.reason, e.message.clone()).await;
        }
    }
    Ok(if e.permanent { Requeue::await_change() } else { Requeue::requeue(ctx.config.retry) })
}

/// Read the plan from memory, or from its ConfigMap.
async fn load_plan(ctx: &Context, dbm: &DatabaseMigration, key: &str, run_id: &str) -> Result<Arc<RunPlan>, Error> {
    if let Some(m) = ctx.runs.lock().expect("lock").get(key) {
        if m.plan.run_id == run_id {
            return Ok(m.plan.clone());
        }
    }
    let ns = dbm.namespace().unwrap_or_default();
    let name = plan::plan_config_map(run_id);
    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await
        .map_err(Error::kube("reading the run's plan"))?
        .ok_or_else(|| Error::Lost(format!("the plan of run {run_id} (ConfigMap {ns}/{name}) is gone")))?;
    let text = cm.data.as_ref().and_then(|d| d.get(PLAN_KEY)).cloned().unwrap_or_default();
    let plan: RunPlan = serde_json::from_str(&text)
        .map_err(|e| Error::Lost(format!("the plan of run {run_id} (ConfigMap {ns}/{name}) is unreadable: {e}")))?;
    let plan = Arc::new(plan);
    ctx.runs.lock().expect("lock").insert(key.to_string(), RunMemory::new(plan.clone()));
    Ok(plan)
}

impl RunMemory {
    fn new(plan: Arc<RunPlan>) -> Self {
        RunMemory { plan, launched: HashMap::new(), outcomes: HashMap::new(), announced: HashSet::new(), running: 0 }
    }
}

/// One step of a run: observe the Jobs, decide, write status, start Jobs.
async fn continue_run(
    dbm: &DatabaseMigration,
    ctx: &Context,
    api: &Api<DatabaseMigration>,
    st: &DatabaseMigrationStatus,
    key: &str,
    plan: Arc<RunPlan>,
    deleting: bool,
) -> Result<Requeue, Error> {
    let ns = dbm.namespace().unwrap_or_default();
    let name = dbm.name_any();
    let uid = dbm.uid().unwrap_or_default();

    // Jobs of this run, from the store.
    let jobs: HashMap<String, Arc<Job>> = ctx
        .jobs
        .state()
        .into_iter()
        .filter(|j| j.namespace().as_deref() == Some(&ns))
        .filter(|j| j.labels().get(jobs::LABEL_RUN) == Some(&plan.run_id))
        .filter(|j| j.owner_references().iter().any(|o| o.uid == uid))
        .map(|j| (j.name_any(), j))
        .collect();
    // Launches the status recorded (they matter after a restart).
    let recorded: HashSet<(String, Action)> = st
        .tenants
        .iter()
        .filter(|_| st.run_id.as_deref() == Some(&plan.run_id))
        .flat_map(|t| {
            let mut v = Vec::new();
            if t.job.is_some() {
                v.push((t.name.clone(), Action::Migrate));
            }
            if t.rollback.is_some() {
                v.push((t.name.clone(), Action::Rollback));
            }
            v
        })
        .collect();

    // Finished Jobs whose outcome is not known yet: read their pods.
    let mut to_read = Vec::new();
    {
        let runs = ctx.runs.lock().expect("lock");
        let mem = runs.get(key);
        for (jn, job) in &jobs {
            if let JobPhase::Finished(_) = job_phase(job) {
                if mem.is_none_or(|m| !m.outcomes.contains_key(jn)) {
                    to_read.push(job.clone());
                }
            }
        }
    }
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut read = Vec::new();
    for job in to_read {
        let jn = job.name_any();
        let pods = pods_api
            .list(&ListParams::default().labels(&format!("job-name={jn}")))
            .await
            .map_err(Error::kube("reading a Job's pods"))?;
        read.push((jn, job.clone(), jobs::outcome(&job, &pods.items)));
    }

    let mut new_ends = Vec::new();
    let (views, missing) = {
        let mut runs = ctx.runs.lock().expect("lock");
        let mem = runs.entry(key.to_string()).or_insert_with(|| RunMemory::new(plan.clone()));
        if mem.plan.run_id != plan.run_id {
            *mem = RunMemory::new(plan.clone());
        }
        for (jn, job, o) in read {
            let finished_now = job_end(&job).is_none_or(|t| t >= ctx.started);
            if finished_now && mem.announced.insert(jn.clone()) {
                new_ends.push((job, o.clone()));
            }
            mem.outcomes.insert(jn, o);
        }
        let mut missing = Vec::new();
        let views: Vec<TenantView> = plan
            .tenants
            .iter()
            .enumerate()
            .map(|(i, tenant)| {
                let mut step_of = |action: Action| {
                    let jn = job_name(&name, &plan.run_id, tenant, action);
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
                        if launched_at.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
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
    };

    let decision = rollout::decide(&plan, &views, deleting);
    let mut views = views;
    for (i, action) in &decision.launch {
        match action {
            Action::Migrate => views[*i].migrate = Step::Running,
            Action::Rollback => views[*i].rollback = Step::Running,
        }
    }
    let running = views.iter().filter(|v| v.migrate == Step::Running || v.rollback == Step::Running).count();
    let mut new = status::run_status(st, &plan, &name, &views, &decision, &now());
    let generation = dbm.metadata.generation.unwrap_or(0);
    if deleting {
        new.message = Some(format!("deleting: {running} running Job(s) finish first; {}", decision.message));
    } else if generation > plan.generation && !decision.finished {
        // The run keeps the spec it started with; the change gets a run of its own after it.
        new.message = Some(format!(
            "{} (the spec changed to generation {generation} during run {}: it applies when this run ends)",
            decision.message, plan.run_id
        ));
    }
    // Status first: it records the launches before the Jobs exist.
    if *st != new {
        write_status(api, ctx, &name, &new).await?;
    }
    let owner = dbm.controller_owner_ref(&()).expect("owner reference");
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let defaults = jobs::JobDefaults { image: ctx.config.runner_image.clone() };
    // A resource being deleted starts nothing, not even a Job lost before a restart.
    let missing = if deleting { Vec::new() } else { missing };
    for (i, action) in decision.launch.iter().chain(missing.iter()) {
        let job = jobs::build_job(&plan, &name, &ns, owner.clone(), &plan.tenants[*i], *action, &defaults);
        create_ignoring_conflict(&jobs_api, &job, ctx, "job").await?;
        if let Some(m) = ctx.runs.lock().expect("lock").get_mut(key) {
            m.launched.insert((*i, *action), Instant::now());
        }
    }

    for (job, o) in new_ends {
        announce_end(ctx, dbm, &job, &o).await;
    }
    if st.phase != new.phase {
        let kind = if matches!(new.phase, Some(Phase::Failed | Phase::RollingBack | Phase::RolledBack)) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let reason = status::reason(new.phase.unwrap_or(Phase::Pending));
        publish(ctx, dbm, kind, reason, decision.message.clone()).await;
        if decision.finished {
            ctx.metrics.runs.get_or_create(&ResultLabel { result: reason.into() }).inc();
            tracing::info!(resource = key, run = %plan.run_id, phase = reason, "{}", decision.message);
        }
    }
    {
        let mut runs = ctx.runs.lock().expect("lock");
        if let Some(m) = runs.get_mut(key) {
            m.running = running;
        }
        if decision.finished && !deleting {
            runs.remove(key);
        }
        ctx.metrics.jobs_running.set(runs.values().map(|m| m.running as i64).sum());
    }
    Ok(match (decision.finished, generation > plan.generation) {
        (true, true) => Requeue::requeue(Duration::from_secs(1)),
        (true, false) => Requeue::await_change(),
        (false, _) => Requeue::requeue(Duration::from_secs(60)),
    })
}

/// When a Job ended (its Complete/Failed condition).
fn job_end(job: &Job) -> Option<Timestamp> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .filter(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
        .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0))
        .max()
}

async fn announce_end(ctx: &Context, dbm: &DatabaseMigration, job: &Job, o: &Outcome) {
    let tenant = job.annotations().get(jobs::ANNOTATION_TENANT).cloned().unwrap_or_default();
    let action = job.labels().get(jobs::LABEL_ACTION).and_then(|a| Action::from_label(a)).unwrap_or(Action::Migrate);
    let (reason, kind) = match (action, o.ok) {
        (Action::Migrate, true) => ("TenantSucceeded", EventType::Normal),
        (Action::Migrate, false) => ("TenantFailed", EventType::Warning),
        (Action::Rollback, true) => ("TenantRolledBack", EventType::Normal),
        (Action::Rollback, false) => ("TenantRollbackFailed", EventType::Warning),
    };
    ctx.metrics.tenant_runs.get_or_create(&OutcomeLabel { outcome: reason.trim_start_matches("Tenant").into() }).inc();
    if let (Some(start), Some(end)) = (job.metadata.creation_timestamp.as_ref(), job_end(job)) {
        let secs = end.duration_since(start.0).as_secs_f64();
        ctx.metrics.tenant_duration.observe(secs.max(0.0));
    }
    if let Some(b) = o.result.as_ref().and_then(|r| r.backup.as_ref()) {
        ctx.metrics.backup_bytes.inc_by(b.bytes);
    }
    let detail = match (&o.result, &o.error) {
        (Some(r), _) if r.ok => {
            let docs: i64 = r.done.iter().map(|d| d.2).sum();
            format!(
                "{tenant}: {} migration(s), {docs} document(s), now at {}",
                r.done.len(),
                r.to.clone().unwrap_or_default()
            )
        }
        (Some(r), _) => format!("{tenant}: {}", r.error.clone().unwrap_or_else(|| "failed".into())),
        (None, Some(e)) => format!("{tenant}: {e}"),
        (None, None) => tenant.clone(),
    };
    publish_about(ctx, dbm, kind, reason, detail, Some(job.object_ref(&()))).await;
}

/// Server-side apply of the whole status under the controller's field manager.
async fn write_status(
    api: &Api<DatabaseMigration>,
    ctx: &Context,
    name: &str,
    status: &DatabaseMigrationStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": "dbshift.io/v1alpha1",
        "kind": "DatabaseMigration",
        "status": status,
    });
    let pp = PatchParams::apply(MANAGER).force();
    tokio::time::timeout(Duration::from_secs(30), api.patch_status(name, &pp, &Patch::Apply(&patch)))
        .await
        .map_err(|_| Error::Timeout("writing the status"))?
        .map_err(Error::kube("writing the status"))?;
    ctx.metrics.write("status");
    Ok(())
}

/// Create an object; `Ok(false)` when it already exists (a repeat after a restart).
async fn create_ignoring_conflict<K>(api: &Api<K>, obj: &K, ctx: &Context, kind: &str) -> Result<bool, Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    ctx.metrics.write(kind);
    match api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, obj).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(Error::Kube { action: "creating a child object", source: Box::new(e) }),
    }
}

async fn publish(ctx: &Context, dbm: &DatabaseMigration, type_: EventType, reason: &str, note: String) {
    publish_about(ctx, dbm, type_, reason, note, None).await
}

/// An Event about the resource; `related` (a tenant's Job) keeps tenants' Events apart
/// instead of folding them into one series.
async fn publish_about(
    ctx: &Context,
    dbm: &DatabaseMigration,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: related,
    };
    ctx.metrics.write("event");
    if let Err(e) = ctx.recorder.publish(&ev, &dbm.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish an Event");
    }
}
