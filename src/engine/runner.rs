//! Everything that happens to one tenant database: plan, lock, apply or undo, validate, record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, DateTime, Document};
use mongodb::Database;
use serde::Serialize;

use super::loader::Migration;
use super::lock::{Lease, LockError};
use super::model::Operation;
use super::ops::{self, Exec, ExecError, Prepared, Undo};
use super::planner::{self, Direction, DownRequest, PlanError, UpRequest};
use super::preimages;
use super::tracking::{self, Record, State, StepRecord};
use super::validate::{self, CheckResult};

/// Hooks for progress display. Every method has a no-op default.
pub trait Observer: Send + Sync {
    fn migration_started(&self, _tenant: &str, _id: &str, _direction: Direction) {}
    fn step_started(&self, _tenant: &str, _id: &str, _step: usize, _op: &Operation) {}
    fn progress(&self, _done: u64, _total: Option<u64>) {}
    /// Whether [`Observer::progress`] shows anything; when not, long operations skip the
    /// counts they would make only to report a total.
    fn shows_progress(&self) -> bool {
        false
    }
    fn migration_finished(&self, _tenant: &str, _outcome: &Outcome) {}
}

/// An observer that shows nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// Runs under the tenant lock, after the plan and right before a run changes anything, only
/// when it will change something (e.g. to snapshot the tenant). An error stops the run, with
/// nothing changed.
pub type BeforeChange =
    Arc<dyn Fn(Database) -> futures::future::BoxFuture<'static, Result<(), HookError>> + Send + Sync>;

/// Why a [`BeforeChange`] hook failed (its own error type, boxed).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
pub struct RunOptions {
    /// Tracking collection name.
    pub tracking: String,
    pub lock_ttl: Duration,
    /// Identifies this run in records and locks (a CLI invocation, or an operator run).
    pub run_id: String,
    /// Identifies this process in locks (host/pid).
    pub owner: String,
    pub allow_changed: bool,
    pub dry_run: bool,
    pub profiles: Vec<String>,
    pub observer: Arc<dyn Observer>,
    pub before_change: Option<BeforeChange>,
}

impl RunOptions {
    pub fn new(run_id: impl Into<String>) -> Self {
        let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into());
        RunOptions {
            tracking: tracking::TRACKING.to_string(),
            lock_ttl: Duration::from_secs(60),
            run_id: run_id.into(),
            owner: format!("{host}/{}", std::process::id()),
            allow_changed: false,
            dry_run: false,
            profiles: Vec::new(),
            observer: Arc::new(Quiet),
            before_change: None,
        }
    }
    fn host(&self) -> String {
        self.owner.split('/').next().unwrap_or_default().to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{action}: {}", crate::mongo::describe(source))]
    Mongo {
        action: &'static str,
        #[source]
        source: mongodb::error::Error,
    },
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// [`RunOptions::before_change`] failed; nothing was changed.
    #[error("{0}")]
    BeforeChange(HookError),
}

async fn before_change(db: &Database, opts: &RunOptions) -> Result<(), RunError> {
    match &opts.before_change {
        Some(hook) => hook(db.clone()).await.map_err(RunError::BeforeChange),
        None => Ok(()),
    }
}

fn mongo(action: &'static str) -> impl FnOnce(mongodb::error::Error) -> RunError {
    move |source| RunError::Mongo { action, source }
}

/// Where one migration ended on one tenant (`--output json` writes these names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeState {
    Applied,
    RolledBack,
    /// It failed; `needs_attention` tells whether its undo was complete.
    Failed,
    /// What a dry run would do.
    Planned,
}

/// What happened to one migration on one tenant.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub id: String,
    pub direction: Direction,
    pub state: OutcomeState,
    pub duration_ms: i64,
    pub documents_affected: i64,
    pub steps: Vec<StepRecord>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub validation: Vec<CheckResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A failure whose undo was incomplete: the database may be partly changed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub needs_attention: bool,
    /// For plans: documents each step would touch, where it can be counted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub estimates: Vec<Option<u64>>,
}

/// What a run did on one tenant.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantReport {
    pub tenant: String,
    pub ok: bool,
    pub direction: Direction,
    pub dry_run: bool,
    /// Latest applied version before and after the run.
    pub from_version: Option<String>,
    pub to_version: Option<String>,
    pub migrations: Vec<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Keys of rollback data start with the migration's version (unique per directory).
fn version_of(id: &str) -> &str {
    id.split('_').next().unwrap_or(id)
}

impl TenantReport {
    /// A migration failed and its undo was incomplete: the database needs attention.
    pub fn needs_attention(&self) -> bool {
        self.migrations.iter().any(|m| m.needs_attention)
    }

    /// A report of a run that changed nothing (a plan, or nothing to do).
    fn unchanged(
        tenant: &str,
        direction: Direction,
        dry_run: bool,
        version: Option<String>,
        migrations: Vec<Outcome>,
    ) -> Self {
        TenantReport {
            tenant: tenant.into(),
            ok: true,
            direction,
            dry_run,
            from_version: version.clone(),
            to_version: version,
            migrations,
            error: None,
        }
    }
}

fn current_version(records: &[Record]) -> Option<String> {
    records.iter().filter(|r| r.state == State::Applied).map(|r| r.version.clone()).max()
}

/// The status of every migration on this tenant.
pub async fn status(
    db: &Database,
    migrations: &[Migration],
    opts: &RunOptions,
) -> Result<Vec<planner::Entry>, RunError> {
    let records = tracking::load(db, &opts.tracking).await.map_err(mongo("reading the tracking collection"))?;
    Ok(planner::status(migrations, &records, &opts.profiles))
}

/// Apply pending migrations.
pub async fn up(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    req: &UpRequest,
    opts: &RunOptions,
) -> Result<TenantReport, RunError> {
    let records = tracking::load(db, &opts.tracking).await.map_err(mongo("reading the tracking collection"))?;
    let from_version = current_version(&records);
    let planned = planner::plan_up(migrations, &records, req, &opts.profiles)?;
    if opts.dry_run {
        let mut outs = Vec::new();
        for m in planned {
            let mut estimates = Vec::new();
            for op in &m.file.up {
                estimates.push(op.estimate(db).await?);
            }
            outs.push(planned_outcome(m.id(), Direction::Up, &m.file.up, estimates));
        }
        return Ok(TenantReport::unchanged(tenant, Direction::Up, true, from_version, outs));
    }
    if planned.is_empty() {
        return Ok(TenantReport::unchanged(tenant, Direction::Up, false, from_version, vec![]));
    }
    let lease = Lease::acquire(db, &opts.owner, &opts.run_id, opts.lock_ttl).await?;
    let result = up_locked(db, tenant, migrations, req, opts, &lease).await;
    release(lease, result).await
}

/// The report of a run that did something: the version it left, and the first error.
async fn finished(
    db: &Database,
    tenant: &str,
    direction: Direction,
    from_version: Option<String>,
    migrations: Vec<Outcome>,
    opts: &RunOptions,
) -> Result<TenantReport, RunError> {
    let records = tracking::load(db, &opts.tracking).await.map_err(mongo("reading the tracking collection"))?;
    let error = migrations.iter().find_map(|o| o.error.clone());
    Ok(TenantReport {
        tenant: tenant.into(),
        ok: migrations.iter().all(|o| o.state != OutcomeState::Failed),
        direction,
        dry_run: false,
        from_version,
        to_version: current_version(&records),
        migrations,
        error,
    })
}

/// Release the lock, then report: the run's own error first, a failed release second.
async fn release(lease: Lease, result: Result<TenantReport, RunError>) -> Result<TenantReport, RunError> {
    let released = lease.release().await;
    let report = result?;
    released.map_err(mongo("releasing the lock"))?;
    Ok(report)
}

async fn up_locked(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    req: &UpRequest,
    opts: &RunOptions,
    lease: &Lease,
) -> Result<TenantReport, RunError> {
    // Read again under the lock: another runner may have applied some in the meantime.
    let records = tracking::load(db, &opts.tracking).await.map_err(mongo("reading the tracking collection"))?;
    let from_version = current_version(&records);
    let planned = planner::plan_up(migrations, &records, req, &opts.profiles)?;
    let batch = records.iter().map(|r| r.batch).max().unwrap_or(0) + 1;
    if !planned.is_empty() {
        before_change(db, opts).await?;
    }
    let txn = crate::mongo::supports_transactions(db).await;
    let mut outs = Vec::new();
    for m in planned {
        opts.observer.migration_started(tenant, &m.id(), Direction::Up);
        let out = apply(db, tenant, m, batch, txn, opts, lease).await?;
        opts.observer.migration_finished(tenant, &out);
        let failed = out.state == OutcomeState::Failed;
        outs.push(out);
        if failed {
            break; // later migrations may depend on this one
        }
    }
    finished(db, tenant, Direction::Up, from_version, outs, opts).await
}

fn planned_outcome(id: String, direction: Direction, ops: &[Operation], estimates: Vec<Option<u64>>) -> Outcome {
    Outcome {
        id,
        direction,
        state: OutcomeState::Planned,
        duration_ms: 0,
        documents_affected: 0,
        steps: ops
            .iter()
            .map(|op| StepRecord {
                op: op.kind().into(),
                collection: op.collection().map(str::to_string),
                documents_affected: 0,
                duration_ms: 0,
            })
            .collect(),
        validation: vec![],
        error: None,
        needs_attention: false,
        estimates,
    }
}

/// Execute a prepared step (nothing when prepare found nothing to do).
async fn execute(
    db: &Database,
    prepared: &Prepared,
    key: &str,
    session: Option<&mut mongodb::ClientSession>,
    progress: Option<ops::Progress>,
) -> Result<u64, ExecError> {
    if prepared.skip {
        return Ok(0);
    }
    prepared.op.execute(&mut Exec { db, key, session, progress }).await
}

/// The result of running a list of operations with undo on failure.
struct Steps {
    done: Vec<Prepared>,
    records: Vec<StepRecord>,
    error: Option<String>,
    affected: i64,
}

/// Run `ops` one by one (prepare, then execute). Stops at the first failure.
async fn run_steps(
    db: &Database,
    tenant: &str,
    id: &str,
    tag: &str,
    ops: &[Operation],
    opts: &RunOptions,
    lease: &Lease,
) -> Steps {
    let mut s = Steps { done: Vec::new(), records: Vec::new(), error: None, affected: 0 };
    for (i, op) in ops.iter().enumerate() {
        if lease.is_lost() {
            s.error = Some("the migration lock was lost (not renewed in time); stopped to avoid two runners".into());
            break;
        }
        opts.observer.step_started(tenant, id, i, op);
        let key = format!("{}_{tag}{i}", version_of(id));
        let t = Instant::now();
        let prepared = match op.prepare(db, &key).await {
            Ok(p) => p,
            Err(e) => {
                s.error = Some(format!("step {} ({}): {e}", i + 1, op.kind()));
                break;
            }
        };
        let observer = opts.observer.clone();
        let progress: Option<ops::Progress> =
            observer.shows_progress().then(|| Arc::new(move |d, t| observer.progress(d, t)) as ops::Progress);
        let r = execute(db, &prepared, &key, None, progress).await;
        s.done.push(prepared);
        match r {
            Ok(n) => {
                s.affected += n as i64;
                s.records.push(StepRecord {
                    op: op.kind().into(),
                    collection: op.collection().map(str::to_string),
                    documents_affected: n as i64,
                    duration_ms: t.elapsed().as_millis() as i64,
                });
            }
            Err(e) => {
                s.error = Some(format!("step {} ({}): {e}", i + 1, op.kind()));
                break;
            }
        }
    }
    s
}

/// Undo prepared steps, newest first. Returns what could not be undone. `last_failed`: the
/// newest step failed, so its undo may find nothing to undo (an index or collection that was
/// never created), which is not a problem.
async fn undo(db: &Database, id: &str, done: &[Prepared], last_failed: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, p) in done.iter().enumerate().rev() {
        let partial = last_failed && i + 1 == done.len();
        let ops = match &p.undo {
            Undo::Ops(ops) => ops,
            Undo::Impossible(why) => {
                problems.push(format!("step {} ({}) was not undone: {why}", i + 1, p.op.kind()));
                continue;
            }
        };
        for (j, op) in ops.iter().enumerate() {
            let key = format!("{}_x{i}_{j}", version_of(id));
            let r = match op.prepare(db, &key).await {
                Ok(prep) => execute(db, &prep, &key, None, None).await.map(|_| ()),
                // The failed step never created what its undo would remove.
                Err(ExecError::Precondition(_))
                    if partial && matches!(op, Operation::DropIndex(_) | Operation::DropCollection(_)) =>
                {
                    Ok(())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                problems.push(format!("undoing step {} ({}): {e}", i + 1, p.op.kind()));
            }
        }
    }
    problems
}

/// The operations `down` will run for a migration applied with these prepared steps.
fn auto_down(done: &[Prepared]) -> Result<Vec<Operation>, String> {
    let mut ops = Vec::new();
    for (i, p) in done.iter().enumerate().rev() {
        match &p.undo {
            Undo::Ops(u) => ops.extend(u.iter().cloned()),
            Undo::Impossible(why) => return Err(format!("step {} ({}): {why}", i + 1, p.op.kind())),
        }
    }
    Ok(ops)
}

async fn apply(
    db: &Database,
    tenant: &str,
    m: &Migration,
    batch: i32,
    txn_supported: bool,
    opts: &RunOptions,
    lease: &Lease,
) -> Result<Outcome, RunError> {
    let id = m.id();
    let started = Instant::now();
    let applied_at = DateTime::now();
    preimages::forget(db, &format!("{}_", m.version)).await?;
    let mut steps = if m.file.transaction && txn_supported {
        run_in_transaction(db, &id, &m.file.up).await?
    } else {
        if m.file.transaction {
            tracing::info!(migration = %id, "the server does not support transactions; running without one (failures are undone from rollback data)");
        }
        run_steps(db, tenant, &id, "u", &m.file.up, opts, lease).await
    };
    let mut validation = Vec::new();
    if steps.error.is_none() {
        for c in &m.file.validate {
            validation.push(validate::run_check(db, &id, c).await);
        }
        let failed: Vec<String> = validation
            .iter()
            .filter(|r| !r.passed)
            .map(|r| format!("{} on {}: {}", r.check, r.collection, r.message))
            .collect();
        if !failed.is_empty() {
            steps.error = Some(format!("validation failed: {}", failed.join("; ")));
        }
    }
    let mut record = Record {
        id: id.clone(),
        version: m.version.clone(),
        name: m.name.clone(),
        description: m.file.description.clone(),
        author: m.file.author.clone(),
        checksum: m.checksum.clone(),
        state: State::Applied,
        applied_at,
        duration_ms: 0,
        documents_affected: steps.affected,
        batch,
        run_id: opts.run_id.clone(),
        host: opts.host(),
        steps: steps.records.clone(),
        rollback_data: Some(format!("{}*", preimages::collection_name(&format!("{}_", m.version)))),
        down: None,
        irreversible: None,
        error: None,
        rolled_back_at: None,
        rolled_back_by: None,
    };
    if let Some(err) = steps.error.clone() {
        let problems = undo(db, &id, &steps.done, steps.records.len() < steps.done.len()).await;
        let error = if problems.is_empty() {
            format!("{err}; every change of this migration was undone")
        } else {
            format!("{err}; UNDO INCOMPLETE, the database may be partly migrated: {}", problems.join("; "))
        };
        if problems.is_empty() {
            preimages::forget(db, &format!("{}_", m.version)).await?;
            record.rollback_data = None;
        }
        record.state = State::Failed;
        record.error = Some(error.clone());
        record.duration_ms = started.elapsed().as_millis() as i64;
        tracking::save(db, &opts.tracking, &record).await.map_err(mongo("recording the failed migration"))?;
        return Ok(Outcome {
            id,
            direction: Direction::Up,
            state: OutcomeState::Failed,
            duration_ms: record.duration_ms,
            documents_affected: 0,
            steps: steps.records,
            validation,
            error: Some(error),
            needs_attention: !problems.is_empty(),
            estimates: vec![],
        });
    }
    match (&m.file.down, auto_down(&steps.done)) {
        (Some(explicit), _) => record.down = Some(serde_json::to_string(explicit).expect("serializable")),
        (None, Ok(ops)) => record.down = Some(serde_json::to_string(&ops).expect("serializable")),
        (None, Err(why)) => record.irreversible = Some(why),
    }
    record.duration_ms = started.elapsed().as_millis() as i64;
    tracking::save(db, &opts.tracking, &record).await.map_err(mongo("recording the applied migration"))?;
    Ok(Outcome {
        id,
        direction: Direction::Up,
        state: OutcomeState::Applied,
        duration_ms: record.duration_ms,
        documents_affected: steps.affected,
        steps: steps.records,
        validation,
        error: None,
        needs_attention: false,
        estimates: vec![],
    })
}

/// `transaction: true`: rollback data is stored first (outside), then every operation runs in
/// one transaction, so a failure leaves nothing to undo.
async fn run_in_transaction(db: &Database, id: &str, ops: &[Operation]) -> Result<Steps, RunError> {
    let mut s = Steps { done: Vec::new(), records: Vec::new(), error: None, affected: 0 };
    for (i, op) in ops.iter().enumerate() {
        match op.prepare(db, &format!("{}_u{i}", version_of(id))).await {
            Ok(p) => s.done.push(p),
            Err(e) => {
                s.error = Some(format!("step {} ({}): {e}", i + 1, op.kind()));
                s.done.clear();
                return Ok(s);
            }
        }
    }
    let mut session = db.client().start_session().await.map_err(mongo("starting a session"))?;
    session.start_transaction().await.map_err(mongo("starting a transaction"))?;
    for (i, p) in s.done.iter().enumerate() {
        let t = Instant::now();
        match execute(db, p, &format!("{}_u{i}", version_of(id)), Some(&mut session), None).await {
            Ok(n) => {
                s.affected += n as i64;
                s.records.push(StepRecord {
                    op: p.op.kind().into(),
                    collection: p.op.collection().map(str::to_string),
                    documents_affected: n as i64,
                    duration_ms: t.elapsed().as_millis() as i64,
                });
            }
            Err(e) => {
                s.error = Some(format!("step {} ({}): {e}; the transaction was aborted", i + 1, p.op.kind()));
                break;
            }
        }
    }
    if s.error.is_none() {
        if let Err(e) = session.commit_transaction().await {
            s.error = Some(format!("committing the transaction: {}", crate::mongo::describe(&e)));
        }
    }
    if s.error.is_some() {
        let _ = session.abort_transaction().await;
        // Nothing was changed: there is nothing to undo.
        s.done.clear();
    }
    Ok(s)
}

/// Undo applied migrations.
pub async fn down(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    req: &DownRequest,
    opts: &RunOptions,
) -> Result<TenantReport, RunError> {
    let records = tracking::load(db, &opts.tracking).await.map_err(mongo("reading the tracking collection"))?;
    let from_version = current_version(&records);
    let chosen = planner::plan_down(migrations, &records, req)?;
    if opts.dry_run || chosen.is_empty() {
        let outs = chosen
            .iter()
            .map(|r| planned_outcome(r.id.clone(), Direction::Down, &r.down_ops().unwrap_or_default(), vec![]))
            .collect();
        return Ok(TenantReport::unchanged(tenant, Direction::Down, opts.dry_run, from_version, outs));
    }
    let lease = Lease::acquire(db, &opts.owner, &opts.run_id, opts.lock_ttl).await?;
    let result = down_locked(db, tenant, migrations, req, opts, &lease).await;
    release(lease, result).await
}

async fn down_locked(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    req: &DownRequest,
    opts: &RunOptions,
    lease: &Lease,
) -> Result<TenantReport, RunError> {
    let records = tracking::load(db, &opts.tracking).await.map_err(mongo("reading the tracking collection"))?;
    let from_version = current_version(&records);
    let chosen: Vec<Record> = planner::plan_down(migrations, &records, req)?.into_iter().cloned().collect();
    if !chosen.is_empty() {
        before_change(db, opts).await?;
    }
    let mut outs = Vec::new();
    for r in &chosen {
        opts.observer.migration_started(tenant, &r.id, Direction::Down);
        let started = Instant::now();
        let ops = r.down_ops().map_err(PlanError::Irreversible)?;
        preimages::forget(db, &format!("{}_d", r.version)).await?;
        preimages::forget(db, &format!("{}_x", r.version)).await?;
        let steps = run_steps(db, tenant, &r.id, "d", &ops, opts, lease).await;
        let (state, affected, error, needs_attention) = if let Some(err) = steps.error {
            let problems = undo(db, &r.id, &steps.done, steps.records.len() < steps.done.len()).await;
            let error = if problems.is_empty() {
                format!("{err}; the rollback was undone, the migration is still applied")
            } else {
                format!("{err}; UNDO INCOMPLETE, the database may be partly rolled back: {}", problems.join("; "))
            };
            db.collection::<Document>(&opts.tracking)
                .update_one(doc! {"_id": &r.id}, doc! {"$set": {"error": &error}})
                .await
                .map_err(mongo("recording the failed rollback"))?;
            (OutcomeState::Failed, 0, Some(error), !problems.is_empty())
        } else {
            tracking::mark_rolled_back(db, &opts.tracking, &r.id, &opts.run_id)
                .await
                .map_err(mongo("recording the rollback"))?;
            preimages::forget(db, &format!("{}_", r.version)).await?;
            (OutcomeState::RolledBack, steps.affected, None, false)
        };
        let out = Outcome {
            id: r.id.clone(),
            direction: Direction::Down,
            state,
            duration_ms: started.elapsed().as_millis() as i64,
            documents_affected: affected,
            steps: steps.records,
            validation: vec![],
            error,
            needs_attention,
            estimates: vec![],
        };
        opts.observer.migration_finished(tenant, &out);
        let failed = out.state == OutcomeState::Failed;
        outs.push(out);
        if failed {
            break;
        }
    }
    finished(db, tenant, Direction::Down, from_version, outs, opts).await
}

/// Run the checks of every applied migration that has checks.
pub async fn validate(
    db: &Database,
    migrations: &[Migration],
    opts: &RunOptions,
) -> Result<Vec<CheckResult>, RunError> {
    let records = tracking::load(db, &opts.tracking).await.map_err(mongo("reading the tracking collection"))?;
    let mut out = Vec::new();
    for m in migrations {
        if records.iter().any(|r| r.id == m.id() && r.state == State::Applied) {
            for c in &m.file.validate {
                out.push(validate::run_check(db, &m.id(), c).await);
            }
        }
    }
    Ok(out)
}
