//! Running a migration's steps under the lock, recording each one before it changes anything,
//! and undoing them: for `up` (keys `<version>_u<i>`, undone under `_x<i>_<j>`) and for
//! `down` (keys `_d<i>`, undone under `_y<i>_<j>`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{mongo, ms_since, now, Locked, Outcome, OutcomeState, RunError};
use crate::engine::loader::Migration;
use crate::engine::model::Operation;
use crate::engine::ops::{self, Exec, ExecError, Prepared, Undo};
use crate::engine::planner::{Direction, PlanError};
use crate::engine::preimages;
use crate::engine::tracking::{self, Conflicts, Record, State, StepRecord, StepState, StepWork, Work};
use crate::engine::validate;

/// Keys of a migration's stores start with its version (unique per directory).
pub(super) fn version_of(id: &str) -> &str {
    id.split('_').next().unwrap_or(id)
}

/// How long an undo keeps retrying an operation that fails for a reason that may pass (the
/// server unreachable, a write conflict with a killed runner's transaction).
const UNDO_RETRY: Duration = Duration::from_secs(180);

/// The result of running a list of steps.
pub(super) struct Steps {
    pub records: Vec<StepRecord>,
    pub error: Option<String>,
    pub affected: i64,
    pub conflicts: Conflicts,
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serializable")
}

impl Locked<'_> {
    async fn save(&self, record: &Record, action: &'static str) -> Result<(), RunError> {
        tracking::save(self.db, &self.opts.tracking, record).await.map_err(mongo(action))
    }

    fn work(&self) -> Work {
        Work { owner: self.opts.owner.clone(), run_id: self.opts.run_id.clone(), started_at: now(), steps: Vec::new() }
    }

    fn progress(&self) -> Option<ops::Progress> {
        let observer = self.opts.observer.clone();
        observer.shows_progress().then(|| Arc::new(move |d, t| observer.progress(d, t)) as ops::Progress)
    }

    /// Run `ops` one by one under `tag` (`u` or `d`): prepare, record, execute, record.
    /// Stops at the first failure (the steps recorded say what to undo).
    pub(super) async fn run_steps(&self, record: &mut Record, tag: char, ops: &[Operation]) -> Result<Steps, RunError> {
        let mut s = Steps { records: Vec::new(), error: None, affected: 0, conflicts: Conflicts::default() };
        let v = version_of(&record.id).to_string();
        for (i, op) in ops.iter().enumerate() {
            let fail = |e: String| Some(format!("step {} ({}): {e}", i + 1, op.kind()));
            if let Err(e) = self.guard.check().await {
                s.error = fail(e.to_string());
                break;
            }
            self.opts.observer.step_started(self.tenant, &record.id, i, op);
            let key = format!("{v}_{tag}{i}");
            let t = Instant::now();
            let prepared = match op.prepare(self.db, &key).await {
                Ok(p) => p,
                Err(e) => {
                    s.error = fail(e.to_string());
                    break;
                }
            };
            record.work.get_or_insert_with(|| self.work()).steps.push(step_work(&key, &prepared));
            self.save(record, "recording a step before it runs").await?;
            let mut x = Exec {
                db: self.db,
                key: &key,
                session: None,
                progress: self.progress(),
                guard: &self.guard,
                server: self.server,
                conflicts: (0, Vec::new()),
            };
            let r = if prepared.skip { Ok(0) } else { prepared.op.execute(&mut x).await };
            merge_conflicts(&mut s.conflicts, x.conflicts);
            match r {
                Ok(n) => {
                    if let Some(w) = record.work.as_mut().and_then(|w| w.steps.last_mut()) {
                        w.state = StepState::Done;
                    }
                    self.save(record, "recording a finished step").await?;
                    s.affected += n as i64;
                    s.records.push(step_record(op, n, ms_since(t)));
                }
                Err(e) => {
                    s.error = fail(e.to_string());
                    break;
                }
            }
        }
        Ok(s)
    }

    /// `transaction: true` on a server with transactions: every step is prepared and recorded,
    /// then all run in one transaction (pre-images included), so a failure leaves nothing.
    async fn run_in_transaction(&self, record: &mut Record, ops: &[Operation]) -> Result<Steps, RunError> {
        let mut s = Steps { records: Vec::new(), error: None, affected: 0, conflicts: Conflicts::default() };
        let v = version_of(&record.id).to_string();
        let mut prepared = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let key = format!("{v}_u{i}");
            match op.prepare(self.db, &key).await {
                Ok(p) => {
                    record.work.get_or_insert_with(|| self.work()).steps.push(step_work(&key, &p));
                    prepared.push((key, p));
                }
                Err(e) => {
                    s.error = Some(format!("step {} ({}): {e}", i + 1, op.kind()));
                    return Ok(s);
                }
            }
        }
        self.save(record, "recording the steps before they run").await?;
        let mut session = self.guard.session(self.db).await.map_err(RunError::Exec)?;
        session.start_transaction().await.map_err(mongo("starting a transaction"))?;
        for (i, (key, p)) in prepared.iter().enumerate() {
            let t = Instant::now();
            let mut x = Exec {
                db: self.db,
                key,
                session: Some(&mut session),
                progress: None,
                guard: &self.guard,
                server: self.server,
                conflicts: (0, Vec::new()),
            };
            match p.op.execute(&mut x).await {
                Ok(n) => {
                    s.affected += n as i64;
                    s.records.push(step_record(&p.op, n, ms_since(t)));
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
            // Nothing changed: nothing to undo.
            if let Some(w) = record.work.as_mut() {
                w.steps.clear();
            }
            return Ok(s);
        }
        for w in record.work.iter_mut().flat_map(|w| w.steps.iter_mut()) {
            w.state = StepState::Done;
        }
        Ok(s)
    }

    /// Undo the recorded steps of `record.work`, newest first, under `tag` (`x` or `y`).
    /// Returns what could not be undone.
    pub(super) async fn undo_work(&self, record: &Record, tag: char) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(work) = &record.work else { return problems };
        let v = version_of(&record.id).to_string();
        for (i, step) in work.steps.iter().enumerate().rev() {
            let kind = serde_json::from_str::<Operation>(&step.op).map(|o| o.kind()).unwrap_or("?");
            let ops: Vec<Operation> = match (&step.undo, &step.irreversible) {
                (Some(json), _) => match serde_json::from_str(json) {
                    Ok(ops) => ops,
                    Err(e) => {
                        problems.push(format!("step {} ({kind}): its recorded undo is unreadable: {e}", i + 1));
                        continue;
                    }
                },
                (None, why) => {
                    problems.push(format!(
                        "step {} ({kind}) was not undone: {}",
                        i + 1,
                        why.clone().unwrap_or_default()
                    ));
                    continue;
                }
            };
            for (j, op) in ops.iter().enumerate() {
                let key = format!("{v}_{tag}{i}_{j}");
                if let Err(e) = self.undo_one(op, &key, step.state == StepState::Prepared).await {
                    problems.push(format!("undoing step {} ({kind}): {e}", i + 1));
                }
            }
        }
        problems
    }

    /// One undo operation, retried while it fails for a reason that may pass. `partial`: the
    /// step may not have run (or not to its end), so what its undo would remove may be missing.
    async fn undo_one(&self, op: &Operation, key: &str, partial: bool) -> Result<(), ExecError> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(200);
        // An undo must finish even when the lock's guard would stop a forward step: it only
        // puts back what this runner's own work changed.
        let guard = crate::engine::pass::Guard::default();
        loop {
            let r = async {
                let prepared = op.prepare(self.db, key).await?;
                let mut x = Exec {
                    db: self.db,
                    key,
                    session: None,
                    progress: None,
                    guard: &guard,
                    server: self.server,
                    conflicts: (0, Vec::new()),
                };
                if prepared.skip {
                    return Ok(());
                }
                prepared.op.execute(&mut x).await.map(|_| ())
            }
            .await;
            match r {
                Ok(()) => return Ok(()),
                // The step never created what its undo would remove or move back.
                Err(ExecError::Precondition(_))
                    if partial
                        && matches!(
                            op,
                            Operation::DropIndex(_) | Operation::DropCollection(_) | Operation::RenameCollection(_)
                        ) =>
                {
                    return Ok(())
                }
                Err(ExecError::Mongo { ref source, .. }) if transient(source) && started.elapsed() < UNDO_RETRY => {
                    tracing::warn!(error = %crate::mongo::describe(source), "undo failed for a reason that may pass; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Apply one migration: record it in progress, run its steps, check, record the result.
    pub(super) async fn apply(&self, m: &Migration, batch: i32) -> Result<Outcome, RunError> {
        let id = m.id();
        let started = Instant::now();
        preimages::forget(self.db, &format!("{}_", m.version)).await?;
        let mut record = self.new_record(m, batch);
        self.save(&record, "recording the migration before it runs").await?;
        let mut steps = if m.file.transaction && self.server.transactions {
            self.run_in_transaction(&mut record, &m.file.up).await?
        } else {
            if m.file.transaction {
                tracing::info!(migration = %id, "the server does not support transactions; running without one (failures are undone from rollback data)");
            }
            self.run_steps(&mut record, 'u', &m.file.up).await?
        };
        let mut validation = Vec::new();
        if steps.error.is_none() {
            for c in &m.file.validate {
                validation.push(validate::run_check(self.db, &id, c).await);
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
        record.steps = steps.records.clone();
        record.documents_affected = steps.affected;
        let mut out = Outcome::new(&id, Direction::Up, OutcomeState::Applied);
        out.steps = steps.records;
        out.validation = validation;
        if let Some(err) = steps.error {
            let problems = self.undo_work(&record, 'x').await;
            out.state = OutcomeState::Failed;
            out.needs_attention = !problems.is_empty();
            out.error = Some(self.fail_applying(&mut record, &err, problems, None).await?);
        } else {
            match (&m.file.down, auto_down(&record)) {
                (Some(explicit), _) => record.down = Some(to_json(explicit)),
                (None, Ok(ops)) => record.down = Some(to_json(&ops)),
                (None, Err(why)) => record.irreversible = Some(why),
            }
            record.state = State::Applied;
            record.work = None;
            out.documents_affected = steps.affected;
        }
        record.duration_ms = ms_since(started);
        out.duration_ms = record.duration_ms;
        self.save(&record, "recording the migration's result").await?;
        Ok(out)
    }

    /// After a failed or interrupted `up` was undone (`problems`: what could not be): the
    /// record says so, and the error says whether the tenant needs attention.
    pub(super) async fn fail_applying(
        &self,
        record: &mut Record,
        err: &str,
        problems: Vec<String>,
        by: Option<&str>,
    ) -> Result<String, RunError> {
        let undone_by = by.map(|r| format!(" (by run {r})")).unwrap_or_default();
        let error = if problems.is_empty() {
            preimages::forget(self.db, &format!("{}_", record.version)).await?;
            record.rollback_data = None;
            record.state = State::Failed;
            record.work = None;
            format!("{err}; every change of this migration was undone{undone_by}")
        } else {
            // Still in progress: the next runner tries the undo again before anything else.
            record.state = State::Applying;
            format!("{err}; UNDO INCOMPLETE, the database may be partly migrated: {}", problems.join("; "))
        };
        record.error = Some(error.clone());
        Ok(error)
    }

    fn new_record(&self, m: &Migration, batch: i32) -> Record {
        Record {
            rollback_data: Some(format!("{}*", preimages::collection_name(&format!("{}_", m.version)))),
            work: Some(self.work()),
            ..Record::of(m, State::Applying, batch, &self.opts.run_id, self.opts.host())
        }
    }

    /// Roll back one applied migration: record it in progress, run its down, record the result.
    pub(super) async fn roll_back(&self, r: &Record) -> Result<Outcome, RunError> {
        let started = Instant::now();
        let ops = r.down_ops().map_err(PlanError::Irreversible)?;
        let v = version_of(&r.id).to_string();
        preimages::forget(self.db, &format!("{v}_d")).await?;
        preimages::forget(self.db, &format!("{v}_y")).await?;
        let mut record = r.clone();
        record.state = State::RollingBack;
        record.error = None;
        record.work = Some(self.work());
        self.save(&record, "recording the rollback before it runs").await?;
        let steps = self.run_steps(&mut record, 'd', &ops).await?;
        let mut out = Outcome::new(&r.id, Direction::Down, OutcomeState::RolledBack);
        out.steps = steps.records;
        if let Some(err) = steps.error {
            let problems = self.undo_work(&record, 'y').await;
            out.state = OutcomeState::Failed;
            out.needs_attention = !problems.is_empty();
            out.error = Some(self.fail_rolling_back(&mut record, &err, problems, None).await?);
        } else {
            record.state = State::RolledBack;
            record.work = None;
            record.rolled_back_at = Some(now());
            record.rolled_back_by = Some(self.opts.run_id.clone());
            record.conflicts = (steps.conflicts.count > 0).then_some(steps.conflicts.clone());
            out.documents_affected = steps.affected;
            out.conflicts = record.conflicts.clone();
            if steps.conflicts.count > 0 {
                tracing::warn!(migration = %r.id, conflicts = steps.conflicts.count, "rolled back over later changes to the same fields (the pre-images won)");
            }
        }
        self.save(&record, "recording the rollback's result").await?;
        if record.state == State::RolledBack {
            preimages::forget(self.db, &format!("{v}_")).await?;
        }
        out.duration_ms = ms_since(started);
        Ok(out)
    }

    /// After a failed or interrupted `down` was undone: the migration is applied again.
    pub(super) async fn fail_rolling_back(
        &self,
        record: &mut Record,
        err: &str,
        problems: Vec<String>,
        by: Option<&str>,
    ) -> Result<String, RunError> {
        let undone_by = by.map(|r| format!(" (by run {r})")).unwrap_or_default();
        let error = if problems.is_empty() {
            let v = version_of(&record.id).to_string();
            preimages::forget(self.db, &format!("{v}_d")).await?;
            preimages::forget(self.db, &format!("{v}_y")).await?;
            record.state = State::Applied;
            record.work = None;
            format!("{err}; the rollback was undone{undone_by}, the migration is still applied")
        } else {
            record.state = State::RollingBack;
            format!("{err}; UNDO INCOMPLETE, the database may be partly rolled back: {}", problems.join("; "))
        };
        record.error = Some(error.clone());
        Ok(error)
    }
}

fn step_work(key: &str, p: &Prepared) -> StepWork {
    let (undo, irreversible) = match &p.undo {
        Undo::Ops(ops) => (Some(to_json(ops)), None),
        Undo::Impossible(why) => (None, Some(why.clone())),
    };
    StepWork { key: key.to_string(), op: to_json(&p.op), undo, irreversible, state: StepState::Prepared }
}

fn step_record(op: &Operation, n: u64, ms: i64) -> StepRecord {
    StepRecord {
        op: op.kind().into(),
        collection: op.collection().map(str::to_string),
        documents_affected: n as i64,
        duration_ms: ms,
    }
}

fn merge_conflicts(total: &mut Conflicts, (n, ids): (u64, Vec<bson::Bson>)) {
    total.count += n;
    for id in ids {
        if total.ids.len() < 100 {
            total.ids.push(id.into_relaxed_extjson().to_string());
        }
    }
}

/// The operations `down` runs for a migration applied with these steps: their undos, newest first.
fn auto_down(record: &Record) -> Result<Vec<Operation>, String> {
    let mut ops = Vec::new();
    let steps = record.work.as_ref().map(|w| w.steps.as_slice()).unwrap_or_default();
    for (i, step) in steps.iter().enumerate().rev() {
        match (&step.undo, &step.irreversible) {
            (Some(json), _) => {
                let u: Vec<Operation> = serde_json::from_str(json).map_err(|e| format!("step {}: {e}", i + 1))?;
                ops.extend(u);
            }
            (None, why) => {
                let kind = serde_json::from_str::<Operation>(&step.op).map(|o| o.kind()).unwrap_or("?");
                return Err(format!("step {} ({kind}): {}", i + 1, why.clone().unwrap_or_default()));
            }
        }
    }
    Ok(ops)
}

/// A server error that may pass if tried again.
fn transient(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
        || e.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
        || crate::mongo::error_code(e) == Some(crate::mongo::code::WRITE_CONFLICT)
        || matches!(
            *e.kind,
            ErrorKind::ServerSelection { .. } | ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
        )
}
