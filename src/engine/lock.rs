//! One lock per tenant database: a lease document with an owner and an expiry, renewed while
//! its holder runs. A holder that dies stops renewing, and the lease expires by itself.

use std::sync::Arc;
use std::time::Duration;

use bson::{doc, DateTime, Document};
use mongodb::Database;
use tokio::sync::watch;

use super::tracking::LOCK;

const LOCK_ID: &str = "migrations";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the database is locked by {owner} (run {run}) until {expires}; another dbshift is migrating it. \
             The lock expires by itself if that runner died"
    )]
    Held { owner: String, run: String, expires: String },
    #[error("could not take the lock: {}", crate::mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
}

/// A held lock. Renewed in the background until [`Lease::release`] (or drop, which stops renewing).
pub struct Lease {
    db: Database,
    owner: String,
    stop: watch::Sender<bool>,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Lease {
    /// Take the lock of `db` for `owner`, or fail at once if someone else holds an unexpired lease.
    pub async fn acquire(db: &Database, owner: &str, run_id: &str, ttl: Duration) -> Result<Lease, LockError> {
        let coll = db.collection::<Document>(LOCK);
        let now = DateTime::now();
        let expires = DateTime::from_millis(now.timestamp_millis() + ttl.as_millis() as i64);
        let res = coll
            .find_one_and_update(
                doc! {"_id": LOCK_ID, "$or": [{"expiresAt": {"$lt": now}}, {"owner": owner}]},
                doc! {"$set": {"owner": owner, "run": run_id, "acquiredAt": now, "expiresAt": expires}},
            )
            .upsert(true)
            .await;
        match res {
            Ok(_) => {}
            Err(e) if crate::mongo::is_duplicate_key(&e) => {
                let held = coll.find_one(doc! {"_id": LOCK_ID}).await?.unwrap_or_default();
                return Err(LockError::Held {
                    owner: held.get_str("owner").unwrap_or("?").to_string(),
                    run: held.get_str("run").unwrap_or("?").to_string(),
                    expires: held
                        .get_datetime("expiresAt")
                        .map(|d| d.try_to_rfc3339_string().unwrap_or_default())
                        .unwrap_or_default(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let (stop, mut stopped) = watch::channel(false);
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (db2, owner2, lost2) = (db.clone(), owner.to_string(), lost.clone());
        tokio::spawn(async move {
            let every = ttl / 3;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => return,
                }
                let expires = DateTime::from_millis(DateTime::now().timestamp_millis() + ttl.as_millis() as i64);
                let r = db2
                    .collection::<Document>(LOCK)
                    .update_one(doc! {"_id": LOCK_ID, "owner": &owner2}, doc! {"$set": {"expiresAt": expires}})
                    .await;
                match r {
                    Ok(r) if r.matched_count == 1 => {}
                    Ok(_) => {
                        tracing::error!("lost the migration lock (it expired and was taken by another runner)");
                        lost2.store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not renew the migration lock; retrying")
                    }
                }
            }
        });
        Ok(Lease { db: db.clone(), owner: owner.to_string(), stop, lost })
    }

    /// Whether another runner took the lock after this one failed to renew it in time.
    pub fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub async fn release(self) -> mongodb::error::Result<()> {
        let _ = self.stop.send(true);
        self.db.collection::<Document>(LOCK).delete_one(doc! {"_id": LOCK_ID, "owner": &self.owner}).await.map(|_| ())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
