//! Interrupted work: a runner killed, evicted, stopped by SIGTERM or cut off from its lock
//! leaves records in state `applying` or `rolling_back`, with every step it started and that
//! step's undo. The next runner on the tenant (the CLI, a Job, the rollback Job) undoes that
//! work exactly before anything else:
//! - an interrupted `up` is undone (the migration ends `failed`, and can be applied again);
//! - an interrupted `down` is undone (the migration stays `applied`, and can be rolled back
//!   again).
//!
//! Undoing is itself resumable: a runner killed while undoing leaves the same records, and the
//! next one continues (the stores record how far each restore got).

use super::{load, Locked, Outcome, OutcomeState, RunError};
use crate::engine::planner::Direction;
use crate::engine::tracking::{self, State};

/// Undo every interrupted migration of the tenant. One that cannot be undone completely is
/// reported with `needs_attention`, and the run stops there.
pub(super) async fn recover(l: &Locked<'_>) -> Result<Vec<Outcome>, RunError> {
    let mut outs = Vec::new();
    let records = load(l.db, l.opts).await?;
    let mut stuck: Vec<_> =
        records.into_iter().filter(|r| matches!(r.state, State::Applying | State::RollingBack)).collect();
    // The newest first: a later migration may depend on an earlier one.
    stuck.sort_by(|a, b| b.version.cmp(&a.version));
    for mut r in stuck {
        let who =
            r.work.as_ref().map(|w| format!("{} of run {}", w.owner, w.run_id)).unwrap_or_else(|| "a runner".into());
        let (direction, tag) = if r.state == State::Applying { (Direction::Up, 'x') } else { (Direction::Down, 'y') };
        tracing::warn!(migration = %r.id, by = %who, "found interrupted work; undoing it first");
        let problems = l.undo_work(&r, tag).await;
        let err = format!(
            "interrupted while {} (by {who})",
            if direction == Direction::Up { "applied" } else { "rolled back" }
        );
        let by = Some(l.opts.run_id.as_str());
        let error = match direction {
            Direction::Up => l.fail_applying(&mut r, &err, problems.clone(), by).await?,
            Direction::Down => l.fail_rolling_back(&mut r, &err, problems.clone(), by).await?,
        };
        tracking::save(l.db, &l.opts.tracking, &r).await.map_err(super::mongo("recording the recovery"))?;
        let mut out = Outcome::new(&r.id, direction, OutcomeState::Recovered);
        out.needs_attention = !problems.is_empty();
        out.error = out.needs_attention.then_some(error.clone());
        tracing::warn!(migration = %r.id, "{error}");
        outs.push(out);
        if !problems.is_empty() {
            break;
        }
    }
    Ok(outs)
}
