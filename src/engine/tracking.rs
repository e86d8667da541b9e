//! The tracking collection: one record per migration that ran on a tenant database.

use bson::{doc, DateTime};
use futures::TryStreamExt;
use mongodb::Database;
use serde::{Deserialize, Serialize};

use super::model::Operation;

/// Prefix of every collection dbshift keeps in a tenant database.
pub const INTERNAL_PREFIX: &str = "_dbshift";
/// Default tracking collection.
pub const TRACKING: &str = "_dbshift_migrations";
/// Prefix of the collections holding pre-images kept by lossy operations, one per step:
/// `_dbshift_rb_<version>_<step>`.
pub const ROLLBACK_PREFIX: &str = "_dbshift_rb_";
/// The per-database lock.
pub const LOCK: &str = "_dbshift_lock";
/// The database that holds snapshots when none is named (never a tenant).
pub const SNAPSHOT_DATABASE: &str = "dbshift_snapshots";
/// Prefix of collections moved aside by `dropCollection`.
pub const DROPPED_PREFIX: &str = "_dbshift_dropped_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Applied and in effect.
    Applied,
    /// Tried and failed; the database was put back as it was before it.
    Failed,
    /// Applied, then rolled back.
    RolledBack,
    /// Being applied, or interrupted while it was (its `work` says how far it got): the next
    /// runner undoes it before anything else.
    Applying,
    /// Being rolled back, or interrupted while it was: the next runner undoes the rollback
    /// (the migration stays applied) before anything else.
    RollingBack,
    /// Recorded as applied without dbshift changing anything (`dbshift baseline`): the
    /// database got it by other means. In effect like `applied`; `down` never undoes it.
    Baselined,
}

impl State {
    /// In effect on the database: applied by dbshift, or baselined.
    pub fn in_effect(self) -> bool {
        matches!(self, State::Applied | State::Baselined)
    }
}

/// Where a step of the work in progress got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Prepared (its undo is known and recorded): it may have started changing data.
    Prepared,
    /// It finished.
    Done,
}

/// One step of the work in progress, recorded before it changes anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepWork {
    /// Names the step's pre-image store.
    pub key: String,
    /// What runs (with run-time choices made, e.g. generated `_id`s), as JSON.
    pub op: String,
    /// The operations that undo it, as JSON; absent when it cannot be undone (`irreversible` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irreversible: Option<String>,
    pub state: StepState,
}

/// The work in progress on a migration: what the next runner undoes if this one stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Work {
    /// The lock owner doing it.
    pub owner: String,
    pub run_id: String,
    pub started_at: DateTime,
    pub steps: Vec<StepWork>,
}

/// Fields a rollback found changed again since the migration (the pre-image won).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conflicts {
    pub count: u64,
    /// The documents' `_id`s (the first 100), as Extended JSON.
    pub ids: Vec<String>,
}

/// Per-operation details of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    pub documents_affected: i64,
    pub duration_ms: i64,
}

/// One document of the tracking collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// `<version>_<name>`.
    #[serde(rename = "_id")]
    pub id: String,
    pub version: String,
    pub name: String,
    pub description: String,
    pub author: String,
    pub checksum: String,
    pub state: State,
    pub applied_at: DateTime,
    pub duration_ms: i64,
    pub documents_affected: i64,
    /// Migrations applied by one `up` share a batch number (`down --batch` undoes the last batch).
    pub batch: i32,
    /// The run that applied it (a CLI invocation or an operator run).
    pub run_id: String,
    pub host: String,
    pub steps: Vec<StepRecord>,
    /// Where rollback data lives: the `_dbshift_rb_<version>_*` collections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_data: Option<String>,
    /// What `down` runs, as JSON (the file's `down`, or the inverse computed when it ran).
    /// Absent when the migration cannot be undone (see `irreversible`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
    /// Why `down` is impossible, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irreversible: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_by: Option<String>,
    /// The work in progress (state `applying` or `rolling_back`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<Work>,
    /// What the last rollback overrode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<Conflicts>,
}

impl Record {
    /// A new record of migration `m` in `state`, made now by `run_id` on `host`, with nothing
    /// done yet.
    pub fn of(m: &super::loader::Migration, state: State, batch: i32, run_id: &str, host: String) -> Record {
        Record {
            id: m.id(),
            version: m.version.clone(),
            name: m.name.clone(),
            description: m.file.description.clone(),
            author: m.file.author.clone(),
            checksum: m.checksum.clone(),
            state,
            applied_at: DateTime::now(),
            duration_ms: 0,
            documents_affected: 0,
            batch,
            run_id: run_id.to_string(),
            host,
            steps: Vec::new(),
            rollback_data: None,
            down: None,
            irreversible: None,
            error: None,
            rolled_back_at: None,
            rolled_back_by: None,
            work: None,
            conflicts: None,
        }
    }

    /// The operations `down` runs, when it can run.
    pub fn down_ops(&self) -> Result<Vec<Operation>, String> {
        match (&self.down, &self.irreversible) {
            (Some(json), _) => {
                serde_json::from_str(json).map_err(|e| format!("the stored down of {} is unreadable: {e}", self.id))
            }
            (None, Some(why)) => Err(format!("{} cannot be rolled back: {why}", self.id)),
            (None, None) => Err(format!("{} has no recorded down", self.id)),
        }
    }
}

/// All records, sorted by version.
pub async fn load(db: &Database, collection: &str) -> mongodb::error::Result<Vec<Record>> {
    let mut v: Vec<Record> = db.collection::<Record>(collection).find(doc! {}).await?.try_collect().await?;
    v.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(v)
}

pub async fn save(db: &Database, collection: &str, record: &Record) -> mongodb::error::Result<()> {
    db.collection::<Record>(collection).replace_one(doc! {"_id": &record.id}, record).upsert(true).await.map(|_| ())
}
