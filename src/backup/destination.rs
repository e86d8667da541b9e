//! Where `dbshift run` (`DBSHIFT_BACKUP`) and `dbshift up --backup` keep the snapshots they take
//! before changing a tenant: a database of the same server, or a directory.
//!
//! A directory destination holds `<dir>/<tenant>/<yyyyMMddTHHmmssZ>/`, each a directory
//! snapshot (complete once its manifest is written).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use mongodb::Database;

use super::database::{self, STALE_AFTER};
use super::*;
use crate::engine::runner::{BeforeChange, HookError};
use crate::engine::RunOptions;
use crate::exit::Failure;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A database of the same server (see [`database`]).
    Database(String),
    /// An existing directory (a mounted volume).
    Dir(PathBuf),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Database(d) => write!(f, "database:{d}"),
            Destination::Dir(p) => write!(f, "dir:{}", p.display()),
        }
    }
}

/// The snapshot a [`TakenSnapshot::hook`] took, once it has (one per tenant run).
#[derive(Default, Clone)]
pub struct TakenSnapshot(Arc<Mutex<Option<Taken>>>);

impl TakenSnapshot {
    /// A hook that snapshots the tenant into `dest` before the runner changes it (never, in a
    /// run that changes nothing). Its error is a [`Failure`], so the run exits with the
    /// snapshot's own exit code, and nothing was changed.
    fn hook(&self, dest: Destination, opts: SnapshotOptions) -> BeforeChange {
        let me = self.clone();
        Arc::new(move |db: mongodb::Database| {
            let (me, dest, opts) = (me.clone(), dest.clone(), opts.clone());
            Box::pin(async move {
                let t = dest.take(&db, &opts).await.map_err(|e| {
                    let f = Failure::from(e);
                    let message = format!("the snapshot before the run failed, so nothing was changed: {}", f.message);
                    Box::new(Failure::new(f.exit, message)) as HookError
                })?;
                *me.0.lock().expect("lock") = Some(t);
                Ok(())
            })
        })
    }

    /// Arm `opts` to snapshot `tenant` (of the server at `hosts`) into `dest` before the
    /// run's first change, recording the run's tracking collection and id with it.
    pub fn arm(&self, dest: &Destination, hosts: &str, tenant: &str, opts: &mut RunOptions) {
        let so = SnapshotOptions {
            source: format!("{hosts}/{tenant}"),
            tracking: opts.tracking.clone(),
            run_id: Some(opts.run_id.clone()),
            ..Default::default()
        };
        opts.before_change = Some(self.hook(dest.clone(), so));
    }

    /// The snapshot taken, if the hook ran.
    pub fn get(&self) -> Option<Taken> {
        self.0.lock().expect("lock").clone()
    }
}

/// A snapshot found in a destination.
#[derive(Debug, Clone)]
pub struct Found {
    /// `database:<db>/<id>` or `dir:<path>`.
    pub location: String,
    pub manifest: Manifest,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    Database(String),
    Dir(PathBuf),
}

impl Destination {
    /// `database:<name>` (`database` alone: `dbshift_snapshots`), `dir:<path>`, or `none` / empty.
    pub fn parse(s: &str) -> Result<Option<Destination>, BackupError> {
        let s = s.trim();
        let bad =
            || BackupError::Invalid(format!("backup destination {s:?} is not database:<name>, dir:<path> or none"));
        if s.is_empty() || s == "none" {
            return Ok(None);
        }
        if s == "database" {
            return Ok(Some(Destination::Database(database::DEFAULT_DATABASE.into())));
        }
        if let Some(name) = s.strip_prefix("database:") {
            if name.is_empty() {
                return Err(bad());
            }
            crate::tenants::check_db_name(name)
                .map_err(|e| BackupError::Invalid(format!("backup destination {s:?}: {e}")))?;
            return Ok(Some(Destination::Database(name.into())));
        }
        match s.strip_prefix("dir:") {
            Some(p) if !p.is_empty() => Ok(Some(Destination::Dir(p.into()))),
            _ => Err(bad()),
        }
    }

    /// What can be checked before connecting: the database is not the tenant; the directory
    /// exists (a missing one usually means a volume that is not mounted).
    pub fn check(&self, tenant: &str) -> Result<(), BackupError> {
        match self {
            Destination::Database(d) => database::check_store(d, tenant),
            Destination::Dir(p) if !p.is_dir() => Err(BackupError::Invalid(format!(
                "backup destination {self}: no such directory (mount the backup volume there, or create it)"
            ))),
            Destination::Dir(_) => Ok(()),
        }
    }

    /// Snapshot the tenant `db`.
    pub async fn take(&self, db: &Database, opts: &SnapshotOptions) -> Result<Taken, BackupError> {
        match self {
            Destination::Database(d) => database::snapshot_to_database(db, &db.client().database(d), opts, None).await,
            Destination::Dir(root) => {
                let tdir = root.join(db.name());
                std::fs::create_dir_all(&tdir).map_err(io(&tdir))?;
                cleanup_abandoned_dirs(&tdir);
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
                let mut k = 1;
                let path = loop {
                    let name = if k == 1 { stamp.clone() } else { format!("{stamp}-{k}") };
                    let p = tdir.join(&name);
                    match std::fs::create_dir(&p) {
                        Ok(()) => break p,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && k < 100 => k += 1,
                        Err(e) => return Err(io(&p)(e)),
                    }
                };
                match snapshot(db, &path, opts, None).await {
                    Ok(manifest) => Ok(Taken {
                        id: format!("{}/{}", db.name(), path.file_name().unwrap_or_default().to_string_lossy()),
                        location: format!("dir:{}", path.display()),
                        manifest,
                    }),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&path);
                        Err(e)
                    }
                }
            }
        }
    }

    /// The newest complete snapshot of the tenant `db` that the run `run_id` took.
    pub async fn find_by_run(&self, db: &Database, run_id: &str) -> Result<Option<Found>, BackupError> {
        match self {
            Destination::Database(d) => {
                let store = db.client().database(d);
                let Some(id) = database::newest(&store, db.name(), Some(run_id)).await? else { return Ok(None) };
                let manifest = database::manifest(&store, &id).await?;
                Ok(Some(Found { location: database::location(d, &id), manifest, place: Place::Database(id) }))
            }
            Destination::Dir(root) => Ok(dir_snapshots(&root.join(db.name()))
                .into_iter()
                .filter(|(_, m)| m.run_id.as_deref() == Some(run_id))
                .map(|(p, manifest)| Found { location: format!("dir:{}", p.display()), manifest, place: Place::Dir(p) })
                .next()),
        }
    }

    /// Restore a snapshot found here into `db`.
    pub async fn restore(
        &self,
        db: &Database,
        found: &Found,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport, BackupError> {
        match (&found.place, self) {
            (Place::Database(id), Destination::Database(d)) => {
                database::restore_from_database(db, &db.client().database(d), id, opts, None).await
            }
            (Place::Dir(p), _) => restore(db, p, opts, None).await,
            (Place::Database(_), Destination::Dir(_)) => {
                Err(BackupError::Invalid(format!("{} is not in {self}", found.location)))
            }
        }
    }

    /// Keep the `keep` newest complete snapshots of the tenant `db` (0 keeps all); delete
    /// older and abandoned ones. Returns what was deleted.
    /// [`Destination::retain`] after a run that went well: what it deletes is logged, and so
    /// is a failure (the run's outcome stands).
    pub async fn retain_logged(&self, db: &Database, keep: usize) {
        match self.retain(db, keep).await {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(tenant = db.name(), ?deleted, "deleted older snapshots")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(tenant = db.name(), error = %e, "could not delete older snapshots"),
        }
    }

    pub async fn retain(&self, db: &Database, keep: usize) -> Result<Vec<String>, BackupError> {
        match self {
            Destination::Database(d) => database::retain(&db.client().database(d), db.name(), keep).await,
            Destination::Dir(root) => {
                let tdir = root.join(db.name());
                let mut deleted = cleanup_abandoned_dirs(&tdir);
                if keep > 0 {
                    for (p, _) in dir_snapshots(&tdir).into_iter().skip(keep) {
                        std::fs::remove_dir_all(&p).map_err(io(&p))?;
                        deleted.push(p.display().to_string());
                    }
                }
                Ok(deleted)
            }
        }
    }
}

/// Complete directory snapshots of one tenant, newest first.
fn dir_snapshots(tdir: &Path) -> Vec<(PathBuf, Manifest)> {
    let mut out: Vec<(PathBuf, Manifest)> = std::fs::read_dir(tdir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(MANIFEST).is_file())
        .filter_map(|p| match read_manifest(&p) {
            Ok(m) => Some((p, m)),
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable snapshot");
                None
            }
        })
        .collect();
    out.sort_by(|a, b| b.1.created_at.cmp(&a.1.created_at).then(b.0.cmp(&a.0)));
    out
}

/// The newest modification time of anything under `p`.
fn newest_mtime(p: &Path) -> Option<SystemTime> {
    let own = std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let children = std::fs::read_dir(p).into_iter().flatten().flatten().filter_map(|e| newest_mtime(&e.path()));
    own.into_iter().chain(children).max()
}

/// Delete snapshot directories without a manifest that nothing wrote to for [`STALE_AFTER`].
fn cleanup_abandoned_dirs(tdir: &Path) -> Vec<String> {
    let mut deleted = Vec::new();
    for p in std::fs::read_dir(tdir).into_iter().flatten().flatten().map(|e| e.path()) {
        let stale = newest_mtime(&p).and_then(|t| t.elapsed().ok()).is_some_and(|age| age > STALE_AFTER);
        if p.is_dir() && !p.join(MANIFEST).exists() && stale {
            tracing::info!(dir = %p.display(), "deleting an abandoned snapshot");
            if std::fs::remove_dir_all(&p).is_ok() {
                deleted.push(p.display().to_string());
            }
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_or_say_what_is_expected() {
        assert_eq!(Destination::parse("").unwrap(), None);
        assert_eq!(Destination::parse("none").unwrap(), None);
        assert_eq!(Destination::parse("database").unwrap(), Some(Destination::Database("dbshift_snapshots".into())));
        assert_eq!(Destination::parse("database:bk").unwrap(), Some(Destination::Database("bk".into())));
        assert_eq!(Destination::parse("dir:/backups").unwrap(), Some(Destination::Dir("/backups".into())));
        for bad in ["database:", "dir:", "s3://bucket", "database:a.b"] {
            let e = Destination::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert!(Destination::Database("t1".into()).check("t1").is_err());
        assert!(Destination::Dir("/nonexistent/dbshift".into()).check("t1").unwrap_err().to_string().contains("mount"));
    }
}
