//! Everything that happens to one tenant database: plan, lock, recover interrupted work, apply
//! or undo, validate, record.
//!
//! Under the tenant's lock a run first finds work a stopped runner left ([`recover`]: records
//! in state `applying` or `rolling_back`) and undoes it exactly; only then does it read the
//! records again and plan. Each migration is recorded as in progress, with every step and its
//! undo, before the step changes anything ([`steps`]), so a runner killed at any instant
//! leaves what the next one needs.

mod recover;
mod steps;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::DateTime;
use mongodb::Database;
use serde::Serialize;

use super::loader::Migration;
use super::lock::{Lease, LockError};
use super::model::Operation;
use super::ops::ExecError;
use super::pass::{Guard, Server};
use super::planner::{self, Direction, DownRequest, PlanError, UpRequest};
use super::tracking::{self, Record, State, StepRecord};
use super::validate::{self, CheckResult};

use recover::recover;

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
    /// How long to wait for a tenant another runner holds.
    pub lock_wait: Duration,
    /// Identifies this run in records and locks (a CLI invocation, or an operator run).
    pub run_id: String,
    /// Identifies this process in locks: unique per process (see [`super::lock::owner`]).
    pub owner: String,
    pub allow_changed: bool,
    /// Run a stored `down` with `runCommand` that the migration's file does not confirm.
    pub trust_stored_down: bool,
    pub dry_run: bool,
    pub profiles: Vec<String>,
    pub observer: Arc<dyn Observer>,
    pub before_change: Option<BeforeChange>,
    /// Set to stop at the next safe point (SIGTERM): the current migration is undone.
    pub stop: Option<Arc<AtomicBool>>,
    /// `up` on a tenant with no tracking record first records the migrations up to this
    /// version as baselined (a tenant created from a current schema): checked again under the
    /// lock, after the pre-checks, never in a dry run.
    pub baseline_new: Option<String>,
}

impl RunOptions {
    pub fn new(run_id: impl Into<String>) -> Self {
        RunOptions {
            tracking: tracking::TRACKING.to_string(),
            lock_ttl: Duration::from_secs(60),
            lock_wait: Duration::ZERO,
            run_id: run_id.into(),
            owner: super::lock::owner(None),
            allow_changed: false,
            trust_stored_down: false,
            dry_run: false,
            profiles: Vec::new(),
            observer: Arc::new(Quiet),
            before_change: None,
            stop: None,
            baseline_new: None,
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
    /// Work a stopped runner left on it was found and undone first.
    Recovered,
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
    /// For rollbacks: fields the application changed again since the migration (the
    /// pre-image won), and the first of those documents' `_id`s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<tracking::Conflicts>,
}

impl Outcome {
    pub fn new(id: &str, direction: Direction, state: OutcomeState) -> Self {
        Outcome {
            id: id.to_string(),
            direction,
            state,
            duration_ms: 0,
            documents_affected: 0,
            steps: Vec::new(),
            validation: Vec::new(),
            error: None,
            needs_attention: false,
            estimates: Vec::new(),
            conflicts: None,
        }
    }

    fn planned(id: String, direction: Direction, ops: &[Operation], estimates: Vec<Option<u64>>) -> Self {
        let mut o = Outcome::new(&id, direction, OutcomeState::Planned);
        o.steps = ops
            .iter()
            .map(|op| StepRecord {
                op: op.kind().into(),
                collection: op.collection().map(str::to_string),
                documents_affected: 0,
                duration_ms: 0,
            })
            .collect();
        o.estimates = estimates;
        o
    }
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
    /// The pre-checks of the migrations this run would apply, run before anything changed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prechecks: Vec<CheckResult>,
    /// A pre-check failed under `onPrecheckFailure: skip`: the tenant was left untouched.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Why it was skipped (not an error: the file chose to go on without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    /// Where the snapshot taken before the run's first change is (`up --backup`; set by the
    /// command, not the runner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
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
            prechecks: Vec::new(),
            skipped: false,
            skip_reason: None,
            snapshot: None,
        }
    }
}

fn current_version(records: &[Record]) -> Option<String> {
    records.iter().filter(|r| r.state.in_effect()).map(|r| r.version.clone()).max()
}

fn interrupted(records: &[Record]) -> bool {
    records.iter().any(|r| matches!(r.state, State::Applying | State::RollingBack))
}

async fn load(db: &Database, opts: &RunOptions) -> Result<Vec<Record>, RunError> {
    tracking::load(db, &opts.tracking).await.map_err(mongo("reading the tracking collection"))
}

/// The status of every migration on this tenant.
pub async fn status(
    db: &Database,
    migrations: &[Migration],
    opts: &RunOptions,
) -> Result<Vec<planner::Entry>, RunError> {
    let mut entries = planner::status(migrations, &load(db, opts).await?, &opts.profiles);
    for e in entries.iter_mut().filter(|e| e.standing == planner::Standing::Pending) {
        if let Some(m) = migrations.iter().find(|m| m.id() == e.id) {
            e.prechecks = prechecks(db, &[m]).await.0;
        }
    }
    Ok(entries)
}

/// The indexes and validators the migrations in effect left, compared with the database
/// (see [`super::drift`]); and the migrations with `runCommand` steps that cannot be followed.
pub async fn schema_drift(
    db: &Database,
    migrations: &[Migration],
    opts: &RunOptions,
) -> Result<(Vec<super::drift::Difference>, Vec<String>), RunError> {
    let records = load(db, opts).await?;
    super::drift::drift(db, migrations, &records).await.map_err(mongo("comparing indexes and validators"))
}

/// The tenant under its lock: what every step needs to change it.
struct Locked<'a> {
    db: &'a Database,
    tenant: &'a str,
    opts: &'a RunOptions,
    guard: Guard,
    server: Server,
}

impl<'a> Locked<'a> {
    async fn new(db: &'a Database, tenant: &'a str, opts: &'a RunOptions, lease: &Lease) -> Locked<'a> {
        let guard = Guard::new(Some(lease), opts.stop.clone());
        Locked { db, tenant, opts, guard, server: Server::detect(db).await }
    }

    async fn before_change(&self) -> Result<(), RunError> {
        match &self.opts.before_change {
            Some(hook) => hook(self.db.clone()).await.map_err(RunError::BeforeChange),
            None => Ok(()),
        }
    }

    /// The report of a run that did something: the version it left, and the first error.
    async fn finished(
        &self,
        direction: Direction,
        from_version: Option<String>,
        migrations: Vec<Outcome>,
    ) -> Result<TenantReport, RunError> {
        let records = load(self.db, self.opts).await?;
        let error = migrations.iter().find_map(|o| o.error.clone());
        Ok(TenantReport {
            tenant: self.tenant.into(),
            ok: migrations.iter().all(|o| o.state != OutcomeState::Failed && !o.needs_attention),
            direction,
            dry_run: false,
            from_version,
            to_version: current_version(&records),
            migrations,
            error,
            prechecks: Vec::new(),
            skipped: false,
            skip_reason: None,
            snapshot: None,
        })
    }
}

/// Take the lock, waiting up to `lock_wait`.
async fn acquire(db: &Database, opts: &RunOptions) -> Result<Lease, RunError> {
    let stop = opts.stop.as_deref();
    Ok(Lease::acquire_unless(db, &opts.owner, &opts.run_id, opts.lock_ttl, opts.lock_wait, stop).await?)
}

/// Release the lock, then report: the run's own error first, a failed release second.
async fn release<T>(lease: Lease, result: Result<T, RunError>) -> Result<T, RunError> {
    let released = lease.release().await;
    let r = result?;
    released.map_err(mongo("releasing the lock"))?;
    Ok(r)
}

/// What the pre-checks of the planned migrations say.
#[derive(Debug, Clone, PartialEq)]
enum Prechecked {
    Passed,
    /// A pre-check of a migration with `onPrecheckFailure: fail` failed.
    Failed(String),
    /// Every failed pre-check belongs to a migration with `onPrecheckFailure: skip`.
    Skipped(String),
}

/// Run the pre-checks of `planned`, in order, on the tenant as it is.
async fn prechecks(db: &Database, planned: &[&Migration]) -> (Vec<CheckResult>, Prechecked) {
    use super::model::PrecheckFailure;
    let mut results = Vec::new();
    let (mut fail, mut skip) = (None, None);
    for m in planned {
        for c in &m.file.precheck {
            let r = validate::run_check(db, &m.id(), c).await;
            if !r.passed {
                let why = format!(
                    "pre-check {} of {} on {} failed: {}; the tenant is untouched",
                    r.check, r.migration, r.collection, r.message
                );
                match m.file.on_precheck_failure {
                    PrecheckFailure::Fail => fail = fail.or(Some(why)),
                    PrecheckFailure::Skip => skip = skip.or(Some(why)),
                }
            }
            results.push(r);
        }
    }
    let verdict = match (fail, skip) {
        (Some(f), _) => Prechecked::Failed(f),
        (None, Some(s)) => Prechecked::Skipped(s),
        (None, None) => Prechecked::Passed,
    };
    (results, verdict)
}

impl TenantReport {
    /// The report with the pre-checks' results and, when they stopped the run, their verdict.
    fn with_prechecks(mut self, results: Vec<CheckResult>, verdict: &Prechecked) -> Self {
        self.prechecks = results;
        match verdict {
            Prechecked::Passed => {}
            Prechecked::Failed(why) => {
                self.ok = false;
                self.error = self.error.or(Some(why.clone()));
            }
            // Not an error: the file chose to go on without the tenant.
            Prechecked::Skipped(why) => {
                self.skipped = true;
                self.skip_reason = Some(why.clone());
            }
        }
        self
    }
}

/// Apply pending migrations.
pub async fn up(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    req: &UpRequest,
    opts: &RunOptions,
) -> Result<TenantReport, RunError> {
    let records = load(db, opts).await?;
    let from_version = current_version(&records);
    let mut planned = planner::plan_up(migrations, &records, req, &opts.profiles)?;
    // A new tenant with a baseline gets only what comes after it (plans and pre-checks too).
    let baseline = opts.baseline_new.as_deref().filter(|_| records.is_empty());
    if let Some(b) = baseline {
        planned.retain(|m| m.version.as_str() > b);
    }
    // Before the lock and the snapshot: a tenant that cannot take the change is not touched.
    let (checked, verdict) = prechecks(db, &planned).await;
    if opts.dry_run {
        let mut outs = Vec::new();
        for m in planned {
            let mut estimates = Vec::new();
            for op in &m.file.up {
                estimates.push(op.estimate(db).await?);
            }
            outs.push(Outcome::planned(m.id(), Direction::Up, &m.file.up, estimates));
        }
        let report = TenantReport::unchanged(tenant, Direction::Up, true, from_version, outs);
        return Ok(report.with_prechecks(checked, &verdict));
    }
    let stopped = verdict != Prechecked::Passed;
    if ((planned.is_empty() && baseline.is_none()) || stopped) && !interrupted(&records) {
        let report = TenantReport::unchanged(tenant, Direction::Up, false, from_version, vec![]);
        return Ok(report.with_prechecks(checked, &verdict));
    }
    let lease = acquire(db, opts).await?;
    let result = async {
        let l = Locked::new(db, tenant, opts, &lease).await;
        let mut outs = recover(&l).await?;
        if outs.iter().any(|o| o.needs_attention) {
            return l.finished(Direction::Up, from_version, outs).await;
        }
        // Work a stopped runner left is finished or undone whatever the pre-checks say; then
        // a failed pre-check applies nothing.
        if stopped {
            let report = l.finished(Direction::Up, from_version, outs).await?;
            return Ok(report.with_prechecks(checked.clone(), &verdict));
        }
        // Read again under the lock: another runner may have applied some in the meantime.
        let mut records = load(db, opts).await?;
        if let (Some(b), true) = (baseline, records.is_empty()) {
            let done =
                l.record_baselined(migrations, |m| m.version.as_str() <= b && m.active_for(&opts.profiles)).await?;
            tracing::info!(tenant, baselined = done.len(), to = %b, "a new tenant: baselined, not replayed");
            records = load(db, opts).await?;
        }
        let from_version = current_version(&records);
        let planned = planner::plan_up(migrations, &records, req, &opts.profiles)?;
        let batch = records.iter().map(|r| r.batch).max().unwrap_or(0) + 1;
        if !planned.is_empty() {
            l.before_change().await?;
        }
        for m in planned {
            opts.observer.migration_started(tenant, &m.id(), Direction::Up);
            let out = l.apply(m, batch).await?;
            opts.observer.migration_finished(tenant, &out);
            let failed = out.state == OutcomeState::Failed;
            outs.push(out);
            if failed {
                break; // later migrations may depend on this one
            }
        }
        let report = l.finished(Direction::Up, from_version, outs).await?;
        Ok(TenantReport { prechecks: checked.clone(), ..report })
    }
    .await;
    release(lease, result).await
}

/// Undo applied migrations.
pub async fn down(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    req: &DownRequest,
    opts: &RunOptions,
) -> Result<TenantReport, RunError> {
    let records = load(db, opts).await?;
    let from_version = current_version(&records);
    let chosen = planner::plan_down(migrations, &records, req)?;
    for r in &chosen {
        planner::check_stored_down(r, migrations, opts.trust_stored_down)?;
    }
    if opts.dry_run || (chosen.is_empty() && !interrupted(&records)) {
        let outs = chosen
            .iter()
            .map(|r| Outcome::planned(r.id.clone(), Direction::Down, &r.down_ops().unwrap_or_default(), vec![]))
            .collect();
        return Ok(TenantReport::unchanged(tenant, Direction::Down, opts.dry_run, from_version, outs));
    }
    let lease = acquire(db, opts).await?;
    let result = async {
        let l = Locked::new(db, tenant, opts, &lease).await;
        let mut outs = recover(&l).await?;
        if outs.iter().any(|o| o.needs_attention) {
            return l.finished(Direction::Down, from_version, outs).await;
        }
        let records = load(db, opts).await?;
        let from_version = current_version(&records);
        let chosen: Vec<Record> = planner::plan_down(migrations, &records, req)?.into_iter().cloned().collect();
        for r in &chosen {
            // Read again under the lock: the record may have changed since.
            planner::check_stored_down(r, migrations, opts.trust_stored_down)?;
        }
        if !chosen.is_empty() {
            l.before_change().await?;
        }
        for r in &chosen {
            opts.observer.migration_started(tenant, &r.id, Direction::Down);
            let out = l.roll_back(r).await?;
            opts.observer.migration_finished(tenant, &out);
            let failed = out.state == OutcomeState::Failed;
            outs.push(out);
            if failed {
                break;
            }
        }
        l.finished(Direction::Down, from_version, outs).await
    }
    .await;
    release(lease, result).await
}

/// Record the migrations up to `to` (a version or id) as applied without running them, for a
/// database that got them by other means (state `baselined`). Under the lock, after recovering
/// interrupted work; migrations already in effect are left as they are. Returns the ids
/// recorded.
pub async fn baseline(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    to: &str,
    opts: &RunOptions,
) -> Result<Vec<String>, RunError> {
    let target = migrations
        .iter()
        .find(|m| m.version == to || m.id() == to)
        .map(|m| m.version.clone())
        .ok_or_else(|| PlanError::UnknownMigration(to.to_string()))?;
    baseline_these(db, tenant, migrations, opts, |m| m.version <= target && m.active_for(&opts.profiles)).await
}

/// Record these migrations (by id) as baselined, as [`baseline`] does: for databases another
/// tool migrated (`dbshift import`).
pub async fn baseline_ids(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    ids: &[String],
    opts: &RunOptions,
) -> Result<Vec<String>, RunError> {
    baseline_these(db, tenant, migrations, opts, |m| ids.contains(&m.id())).await
}

async fn baseline_these(
    db: &Database,
    tenant: &str,
    migrations: &[Migration],
    opts: &RunOptions,
    pick: impl Fn(&Migration) -> bool,
) -> Result<Vec<String>, RunError> {
    let lease = acquire(db, opts).await?;
    let result = async {
        let l = Locked::new(db, tenant, opts, &lease).await;
        let outs = recover(&l).await?;
        if let Some(o) = outs.iter().find(|o| o.needs_attention) {
            return Err(RunError::Exec(ExecError::Precondition(format!(
                "interrupted work on {} could not be undone: nothing was baselined",
                o.id
            ))));
        }
        l.record_baselined(migrations, pick).await
    }
    .await;
    release(lease, result).await
}

impl Locked<'_> {
    /// Under the lock: record the picked migrations that are not in effect as baselined.
    async fn record_baselined(
        &self,
        migrations: &[Migration],
        pick: impl Fn(&Migration) -> bool,
    ) -> Result<Vec<String>, RunError> {
        let (db, opts) = (self.db, self.opts);
        let records = load(db, opts).await?;
        let batch = records.iter().map(|r| r.batch).max().unwrap_or(0) + 1;
        let new: Vec<Record> = migrations
            .iter()
            .filter(|m| pick(m) && !records.iter().any(|r| r.id == m.id() && r.state.in_effect()))
            .map(|m| Record {
                irreversible: Some("baselined: the database got it by other means; dbshift never undoes it".into()),
                ..Record::of(m, State::Baselined, batch, &opts.run_id, opts.host())
            })
            .collect();
        // All of them or none where transactions exist: a runner killed half-way must not
        // leave a tenant baselined in part (the next `up` would replay the rest). Without
        // transactions (a standalone server) a kill can leave a prefix of them written.
        if self.server.transactions && !new.is_empty() {
            let mut session = self.guard.session(db).await?;
            session.start_transaction().await.map_err(mongo("starting a transaction"))?;
            let coll = db.collection::<Record>(&opts.tracking);
            for r in &new {
                let write = coll.replace_one(bson::doc! {"_id": &r.id}, r).upsert(true).session(&mut session).await;
                if let Err(e) = write {
                    let _ = session.abort_transaction().await;
                    return Err(mongo("recording the baselined migrations")(e));
                }
            }
            session.commit_transaction().await.map_err(mongo("committing the baselined migrations"))?;
        } else {
            for r in &new {
                tracking::save(db, &opts.tracking, r).await.map_err(mongo("recording a baselined migration"))?;
            }
        }
        Ok(new.into_iter().map(|r| r.id).collect())
    }
}

/// Run the checks of every applied migration that has checks.
pub async fn validate(
    db: &Database,
    migrations: &[Migration],
    opts: &RunOptions,
) -> Result<Vec<CheckResult>, RunError> {
    let records = load(db, opts).await?;
    let mut out = Vec::new();
    for m in migrations {
        if records.iter().any(|r| r.id == m.id() && r.state.in_effect()) {
            for c in &m.file.validate {
                out.push(validate::run_check(db, &m.id(), c).await);
            }
        }
    }
    Ok(out)
}

/// Run `f` under the tenant's lock after recovering interrupted work (for callers that change
/// the tenant other ways, e.g. restoring a snapshot). Returns the recovery's outcomes too.
pub async fn with_lock<T, F, Fut>(
    db: &Database,
    tenant: &str,
    opts: &RunOptions,
    f: F,
) -> Result<(Vec<Outcome>, Option<T>), RunError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, RunError>>,
{
    let lease = acquire(db, opts).await?;
    let result = async {
        let l = Locked::new(db, tenant, opts, &lease).await;
        let outs = recover(&l).await?;
        if outs.iter().any(|o| o.needs_attention) {
            return Ok((outs, None));
        }
        Ok((outs, Some(f().await?)))
    }
    .await;
    release(lease, result).await
}

fn ms_since(t: Instant) -> i64 {
    t.elapsed().as_millis() as i64
}

fn now() -> DateTime {
    DateTime::now()
}
