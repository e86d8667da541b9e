//! Pure decisions: what is applied, pending, changed or missing, and what a run would do.
//! No database access here; the runner feeds in the files and the tracking records.

use serde::Serialize;

use super::loader::Migration;
use super::tracking::{Record, State};

/// Where one migration stands on one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// Applied, and the file is unchanged.
    Applied,
    /// Not applied yet (never run, failed and undone, or rolled back).
    Pending,
    /// Applied, but the file changed since (checksum differs).
    Changed,
    /// Applied, but no file has this id any more (drift between environments).
    Missing,
    /// Not applied, and not active under the current profiles.
    Skipped,
    /// A runner stopped while applying or rolling it back: the next run undoes that first.
    Interrupted,
    /// Recorded as applied by `dbshift baseline`: the database got it by other means.
    Baselined,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub id: String,
    pub version: String,
    pub standing: Standing,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<i32>,
    /// The last attempt failed (the database was put back); the error recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Applied after a later migration (its file was added out of order).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub out_of_order: bool,
    /// A pending migration's pre-checks, run on the tenant as it is (by `status`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prechecks: Vec<super::validate::CheckResult>,
}

/// Status of one tenant: every migration known from files or records, in version order.
pub fn status(migrations: &[Migration], records: &[Record], profiles: &[String]) -> Vec<Entry> {
    let mut out = Vec::new();
    let applied = |r: &&Record| r.state.in_effect();
    let latest_applied = records.iter().filter(applied).map(|r| r.version.clone()).max();
    for m in migrations {
        let rec = records.iter().find(|r| r.id == m.id());
        let entry = match rec {
            Some(r) if matches!(r.state, State::Applying | State::RollingBack) => Entry {
                id: m.id(),
                version: m.version.clone(),
                standing: Standing::Interrupted,
                description: Some(m.file.description.clone()).filter(|d| !d.is_empty()),
                applied_at: None,
                batch: Some(r.batch),
                last_error: r.error.clone(),
                out_of_order: false,
                prechecks: Vec::new(),
            },
            Some(r) if r.state.in_effect() => Entry {
                id: m.id(),
                version: m.version.clone(),
                standing: match r.state {
                    State::Baselined => Standing::Baselined,
                    _ if r.checksum == m.checksum => Standing::Applied,
                    _ => Standing::Changed,
                },
                description: Some(m.file.description.clone()).filter(|d| !d.is_empty()),
                applied_at: r.applied_at.try_to_rfc3339_string().ok(),
                batch: Some(r.batch),
                last_error: None,
                out_of_order: false,
                prechecks: Vec::new(),
            },
            _ => Entry {
                id: m.id(),
                version: m.version.clone(),
                standing: if m.active_for(profiles) { Standing::Pending } else { Standing::Skipped },
                description: Some(m.file.description.clone()).filter(|d| !d.is_empty()),
                applied_at: None,
                batch: None,
                last_error: rec.filter(|r| r.state == State::Failed).and_then(|r| r.error.clone()),
                out_of_order: m.active_for(profiles)
                    && latest_applied.as_deref().is_some_and(|l| l > m.version.as_str()),
                prechecks: Vec::new(),
            },
        };
        out.push(entry);
    }
    for r in records.iter().filter(applied) {
        if !migrations.iter().any(|m| m.id() == r.id) {
            out.push(Entry {
                id: r.id.clone(),
                version: r.version.clone(),
                standing: Standing::Missing,
                description: Some(r.description.clone()).filter(|d| !d.is_empty()),
                applied_at: r.applied_at.try_to_rfc3339_string().ok(),
                batch: Some(r.batch),
                last_error: None,
                out_of_order: false,
                prechecks: Vec::new(),
            });
        }
    }
    out.sort_by(|a, b| a.version.cmp(&b.version).then(a.id.cmp(&b.id)));
    out
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{} applied migration(s) changed since they were applied (checksum differs): {}. \
             Revert the edit and add a new migration instead, or pass --allow-changed if the edit is deliberate",
            .0.len(), .0.join(", "))]
    Changed(Vec<String>),
    #[error("no migration has version or id {0}")]
    UnknownMigration(String),
    #[error("target {target} is below the current version {current}: use `down --to {target}`")]
    TargetBelowCurrent { target: String, current: String },
    #[error("{0}")]
    Irreversible(String),
    #[error("{0} is not applied")]
    NotApplied(String),
    #[error("{0}")]
    StoredDown(String),
}

/// A `down` read from a tracking record (anyone who can write the tenant database can write
/// it) runs only as a file's would: it must parse, every operation must pass the checks a
/// file's do (dbshift's own undo operations, which no file holds, by their shape), and a
/// `runCommand` in it — which can do anything dbshift's credentials allow,
/// beyond this tenant — only runs when it is exactly what the migration's file says, or when
/// `trust` is given (`down --trust-stored-down`).
pub fn check_stored_down(r: &Record, migrations: &[Migration], trust: bool) -> Result<(), PlanError> {
    use crate::engine::ops::Operation;
    const DROPPED: &str = "_dbshift_dropped_";
    let refuse = |why: String| PlanError::StoredDown(format!("the stored down of {} {why}; nothing was changed", r.id));
    let Some(_) = &r.down else { return Ok(()) };
    let ops = r.down_ops().map_err(PlanError::Irreversible)?;
    for (i, op) in ops.iter().enumerate() {
        // What dbshift itself stores as undo, which a file cannot hold: restorePreimages (it only
        // puts back this tenant's rollback data) and the rename back of a dropped collection.
        let problems = match op {
            Operation::RestorePreimages(_) => Vec::new(),
            Operation::RenameCollection(r) if r.from.starts_with(DROPPED) && !r.to.starts_with("_dbshift") => {
                Vec::new()
            }
            _ => op.check(),
        };
        if !problems.is_empty() {
            return Err(refuse(format!("is refused: down[{i}] ({}): {}", op.kind(), problems.join("; "))));
        }
    }
    // The undo of dropIndex is a runCommand dbshift writes itself: createIndexes, in this tenant.
    let generated = |op: &Operation| match op {
        Operation::RunCommand(c) => {
            c.command.len() == 2
                && c.command.get("createIndexes").is_some_and(serde_json::Value::is_string)
                && c.command.get("indexes").is_some_and(serde_json::Value::is_array)
        }
        _ => false,
    };
    let commands = ops.iter().any(|op| matches!(op, Operation::RunCommand(_)) && !generated(op));
    if !commands || trust {
        return Ok(());
    }
    let file = migrations.iter().find(|m| m.version == r.version);
    match file.and_then(|m| m.file.down.as_ref()) {
        Some(down) if *down == ops => Ok(()),
        Some(_) => Err(refuse(
            "runs runCommand and differs from the down in the migration's file: it was changed after the migration \
             was applied. Check the record; pass --trust-stored-down to run it as stored"
                .into(),
        )),
        None => Err(refuse(
            "runs runCommand and the migration's file (with its down) is not here to compare it with. Add the file, \
             or check the record and pass --trust-stored-down to run it as stored"
                .into(),
        )),
    }
}

/// What `up` should do.
#[derive(Debug, Clone, Default)]
pub struct UpRequest {
    /// Apply up to and including this version (or id).
    pub target: Option<String>,
    /// Apply only this migration (version or id).
    pub only: Option<String>,
    pub allow_changed: bool,
}

fn matches(m_version: &str, m_id: &str, wanted: &str) -> bool {
    m_version == wanted || m_id == wanted
}

/// Migrations `up` applies, in order.
pub fn plan_up<'a>(
    migrations: &'a [Migration],
    records: &[Record],
    req: &UpRequest,
    profiles: &[String],
) -> Result<Vec<&'a Migration>, PlanError> {
    let changed: Vec<String> = migrations
        .iter()
        .filter(|m| records.iter().any(|r| r.id == m.id() && r.state == State::Applied && r.checksum != m.checksum))
        .map(|m| format!("{} ({})", m.id(), m.path.display()))
        .collect();
    if !changed.is_empty() && !req.allow_changed {
        return Err(PlanError::Changed(changed));
    }
    let target = match &req.target {
        Some(t) => Some(
            migrations
                .iter()
                .find(|m| matches(&m.version, &m.id(), t))
                .map(|m| m.version.clone())
                .ok_or_else(|| PlanError::UnknownMigration(t.clone()))?,
        ),
        None => None,
    };
    if let Some(t) = &target {
        if let Some(current) = records.iter().filter(|r| r.state.in_effect()).map(|r| &r.version).max() {
            if current > t {
                return Err(PlanError::TargetBelowCurrent { target: t.clone(), current: current.clone() });
            }
        }
    }
    if let Some(only) = &req.only {
        let m = migrations
            .iter()
            .find(|m| matches(&m.version, &m.id(), only))
            .ok_or_else(|| PlanError::UnknownMigration(only.clone()))?;
        let applied = records.iter().any(|r| r.id == m.id() && r.state.in_effect());
        return Ok(if applied || !m.active_for(profiles) { vec![] } else { vec![m] });
    }
    Ok(migrations
        .iter()
        .filter(|m| m.active_for(profiles))
        .filter(|m| !records.iter().any(|r| r.id == m.id() && r.state.in_effect()))
        .filter(|m| target.as_ref().is_none_or(|t| &m.version <= t))
        .collect())
}

/// Which applied migrations `down` undoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownRequest {
    /// The last `n` applied migrations.
    Steps(usize),
    /// Every applied migration above this version (or id); `0` undoes everything.
    To(String),
    /// Every migration of the last batch.
    LastBatch,
    /// Only this migration.
    Only(String),
    /// Every migration a given run applied (the operator's "roll back every tenant touched").
    Run(String),
}

/// Records `down` undoes, newest first. Fails if any of them cannot be undone. Baselined
/// records are never undone, nor anything below the newest of them: a `down` stops above it.
pub fn plan_down<'a>(
    migrations: &[Migration],
    records: &'a [Record],
    req: &DownRequest,
) -> Result<Vec<&'a Record>, PlanError> {
    // A baseline is a floor: nothing at or below it is undone (dbshift did not apply what it
    // covers, and what lies under it was the state the baseline describes).
    let floor = records.iter().filter(|r| r.state == State::Baselined).map(|r| r.version.as_str()).max();
    let mut applied: Vec<&Record> =
        records.iter().filter(|r| r.state == State::Applied && floor.is_none_or(|f| r.version.as_str() > f)).collect();
    applied.sort_by(|a, b| b.version.cmp(&a.version));
    let chosen: Vec<&Record> = match req {
        DownRequest::Steps(n) => applied.into_iter().take(*n).collect(),
        DownRequest::To(t) => {
            let version = if t == "0" {
                "0".to_string()
            } else {
                migrations
                    .iter()
                    .map(|m| (m.version.clone(), m.id()))
                    .chain(records.iter().map(|r| (r.version.clone(), r.id.clone())))
                    .find(|(v, id)| matches(v, id, t))
                    .map(|(v, _)| v)
                    .ok_or_else(|| PlanError::UnknownMigration(t.clone()))?
            };
            applied.into_iter().filter(|r| r.version > version).collect()
        }
        DownRequest::LastBatch => {
            let last = applied.iter().map(|r| r.batch).max();
            applied.into_iter().filter(|r| Some(r.batch) == last).collect()
        }
        DownRequest::Only(o) => {
            if let Some(b) = records.iter().find(|r| r.state == State::Baselined && matches(&r.version, &r.id, o)) {
                return Err(PlanError::Irreversible(format!(
                    "{} is baselined: it was recorded as applied, not applied by dbshift, which cannot undo it",
                    b.id
                )));
            }
            if let Some(r) = records.iter().find(|r| {
                r.state == State::Applied
                    && matches(&r.version, &r.id, o)
                    && floor.is_some_and(|f| r.version.as_str() <= f)
            }) {
                return Err(PlanError::Irreversible(format!(
                    "{} lies below the baseline ({}): a down never goes under a baseline",
                    r.id,
                    floor.unwrap_or_default()
                )));
            }
            let r = applied
                .into_iter()
                .find(|r| matches(&r.version, &r.id, o))
                .ok_or_else(|| PlanError::NotApplied(o.clone()))?;
            vec![r]
        }
        DownRequest::Run(run) => applied.into_iter().filter(|r| &r.run_id == run).collect(),
    };
    let problems: Vec<String> = chosen.iter().filter_map(|r| r.down_ops().err()).collect();
    if !problems.is_empty() {
        return Err(PlanError::Irreversible(problems.join("; ")));
    }
    Ok(chosen)
}

/// When the operator (or `run`) is given only a target: up to it, or down to it if it is lower.
pub fn direction_for(records: &[Record], target: Option<&str>) -> Direction {
    let current = records.iter().filter(|r| r.state.in_effect()).map(|r| r.version.as_str()).max();
    match (target, current) {
        (Some(t), Some(c)) if t < c => Direction::Down,
        _ => Direction::Up,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Up,
    Down,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::loader::load_sources;
    use std::path::PathBuf;

    #[test]
    fn down_stops_above_the_newest_baseline() {
        let m = migs();
        let mut recs: Vec<Record> = vec![rec(&m[0], 1), rec(&m[1], 2), rec(&m[3], 3)];
        recs[1].state = State::Baselined;
        let ids = |r: Vec<&Record>| r.into_iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(plan_down(&m, &recs, &DownRequest::To("0".into())).unwrap()), [m[3].id()]);
        assert_eq!(ids(plan_down(&m, &recs, &DownRequest::Steps(5)).unwrap()), [m[3].id()]);
        let below = plan_down(&m, &recs, &DownRequest::Only(m[0].id())).unwrap_err().to_string();
        assert!(below.contains("below the baseline"), "{below}");
    }

    fn migs() -> Vec<Migration> {
        load_sources(vec![
            (PathBuf::from("20250101000000_a.yaml"), "up: [ { dropIndex: { collection: c, name: a } } ]".into()),
            (PathBuf::from("20250102000000_b.yaml"), "up: [ { dropIndex: { collection: c, name: b } } ]".into()),
            (
                PathBuf::from("20250103000000_c.yaml"),
                "profiles: [dev]\nup: [ { dropIndex: { collection: c, name: c } } ]".into(),
            ),
            (PathBuf::from("20250104000000_d.yaml"), "up: [ { dropIndex: { collection: c, name: d } } ]".into()),
        ])
        .unwrap()
    }

    fn rec(m: &Migration, batch: i32) -> Record {
        Record {
            id: m.id(),
            version: m.version.clone(),
            name: m.name.clone(),
            description: String::new(),
            author: String::new(),
            checksum: m.checksum.clone(),
            state: State::Applied,
            applied_at: bson::DateTime::from_millis(0),
            duration_ms: 1,
            documents_affected: 0,
            batch,
            run_id: "r".into(),
            host: "h".into(),
            steps: vec![],
            rollback_data: None,
            down: Some("[]".into()),
            irreversible: None,
            error: None,
            rolled_back_at: None,
            rolled_back_by: None,
            work: None,
            conflicts: None,
        }
    }

    #[test]
    fn up_skips_applied_and_inactive_profiles_and_stops_at_target() {
        let m = migs();
        let recs = vec![rec(&m[0], 1)];
        let ids = |v: Vec<&Migration>| v.iter().map(|m| m.version.clone()).collect::<Vec<_>>();
        assert_eq!(ids(plan_up(&m, &recs, &UpRequest::default(), &[]).unwrap()), ["20250102000000", "20250104000000"]);
        assert_eq!(
            ids(plan_up(&m, &recs, &UpRequest::default(), &["dev".into()]).unwrap()),
            ["20250102000000", "20250103000000", "20250104000000"]
        );
        let to = UpRequest { target: Some("20250102000000_b".into()), ..Default::default() };
        assert_eq!(ids(plan_up(&m, &recs, &to, &[]).unwrap()), ["20250102000000"]);
        let bad = UpRequest { target: Some("2099".into()), ..Default::default() };
        assert_eq!(plan_up(&m, &recs, &bad, &[]).unwrap_err(), PlanError::UnknownMigration("2099".into()));
    }

    #[test]
    fn changed_files_are_refused_unless_allowed() {
        let m = migs();
        let mut r = rec(&m[0], 1);
        r.checksum = "old".into();
        let e = plan_up(&m, &[r.clone()], &UpRequest::default(), &[]).unwrap_err();
        assert!(e.to_string().contains("20250101000000_a (20250101000000_a.yaml)"), "{e}");
        assert!(plan_up(&m, &[r.clone()], &UpRequest { allow_changed: true, ..Default::default() }, &[]).is_ok());
        let st = status(&m, &[r], &[]);
        assert_eq!(st[0].standing, Standing::Changed);
    }

    #[test]
    fn status_shows_drift_and_out_of_order() {
        let m = migs();
        let mut gone = rec(&m[0], 1);
        gone.id = "20241231000000_gone".into();
        gone.version = "20241231000000".into();
        let recs = vec![gone, rec(&m[3], 2)];
        let st = status(&m, &recs, &[]);
        let by = |id: &str| st.iter().find(|e| e.id == id).unwrap().clone();
        assert_eq!(by("20241231000000_gone").standing, Standing::Missing);
        assert_eq!(by("20250101000000_a").standing, Standing::Pending);
        assert!(by("20250101000000_a").out_of_order);
        assert_eq!(by("20250103000000_c").standing, Standing::Skipped);
        assert_eq!(by("20250104000000_d").standing, Standing::Applied);
    }

    #[test]
    fn down_selects_steps_target_and_last_batch() {
        let m = migs();
        let recs = vec![rec(&m[0], 1), rec(&m[1], 2), rec(&m[3], 2)];
        let ids = |v: Vec<&Record>| v.iter().map(|r| r.version.clone()).collect::<Vec<_>>();
        assert_eq!(ids(plan_down(&m, &recs, &DownRequest::Steps(1)).unwrap()), ["20250104000000"]);
        assert_eq!(ids(plan_down(&m, &recs, &DownRequest::LastBatch).unwrap()), ["20250104000000", "20250102000000"]);
        assert_eq!(
            ids(plan_down(&m, &recs, &DownRequest::To("20250101000000".into())).unwrap()),
            ["20250104000000", "20250102000000"]
        );
        assert_eq!(plan_down(&m, &recs, &DownRequest::To("0".into())).unwrap().len(), 3);
        let mut irr = recs.clone();
        irr[2].down = None;
        irr[2].irreversible = Some("runCommand has no automatic inverse".into());
        let e = plan_down(&m, &irr, &DownRequest::Steps(1)).unwrap_err();
        assert!(e.to_string().contains("cannot be rolled back: runCommand"), "{e}");
        assert_eq!(direction_for(&recs, Some("20250101000000")), Direction::Down);
        assert_eq!(direction_for(&recs, None), Direction::Up);
    }
}
