//! One lock per tenant database: a lease document with an owner and an expiry, renewed while
//! its holder runs. A holder that dies stops renewing, and the lease expires by itself.
//!
//! - The owner is unique per runner process: host, pid and a random token (two pods on one
//!   node with host networking share the hostname, and each container's dbshift is PID 1).
//! - Expiry is judged on the server's clock (`$$NOW`), never the client's.
//! - A holder knows its lease is valid until `ttl` after the last renewal it *sent* that the
//!   server accepted. Past that (the server may consider it expired) it writes nothing more
//!   until a renewal gets through ([`Standing::confirm`]): a renewal matches only while the
//!   lease still names this holder, so one that gets through proves no other runner took it
//!   meanwhile (a slow server or a network stall costs a wait, not the migration). If another
//!   runner took it, or no renewal gets through within `ttl`, the lease is lost and the holder
//!   stops before its next write.
//! - A runner that finds the tenant locked waits (`--lock-wait`), then takes the lock and plans
//!   again under it.
//! - The holder notes in the lease the sessions its transactions run in ([`Sessions`]). A
//!   runner taking over an expired lease ends them (`killSessions`): a killed runner's open
//!   transaction is aborted at once, instead of blocking the next runner's writes until the
//!   server's transaction lifetime (60 s by default) expires it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::{ClientSession, Database};
use tokio::sync::watch;

use super::tracking::LOCK;

const LOCK_ID: &str = "migrations";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the database is locked by {owner} (run {run}) until {expires}; another dbshift is migrating it. \
         It expires by itself if that runner died (waited {waited}s; --lock-wait sets how long to wait)"
    )]
    Held { owner: String, run: String, expires: String, waited: u64 },
    #[error("could not take the lock: {}", crate::mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
}

/// A unique owner for this process: `<host>/<pid>/<random>` (`name`, e.g. a pod name, in
/// place of the host when given).
pub fn owner(name: Option<&str>) -> String {
    let host = name.map(str::to_string).unwrap_or_else(|| {
        hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into())
    });
    format!("{host}/{}/{:016x}", std::process::id(), rand::random::<u64>())
}

/// A held lock. Renewed in the background until [`Lease::release`] (or drop, which stops renewing).
pub struct Lease {
    db: Database,
    owner: String,
    stop: watch::Sender<bool>,
    standing: Standing,
}

/// What a holder knows of its lease, shared with the code that writes under it.
#[derive(Clone)]
pub struct Standing {
    ttl: Duration,
    lost: Arc<AtomicBool>,
    valid_until: Arc<Mutex<Instant>>,
    /// Bumped by the renewer after each renewal that got an answer (accepted, or lost).
    renewed: watch::Receiver<u64>,
}

impl Standing {
    /// Known held right now: not lost, and renewed recently enough that the server cannot
    /// have let it expire.
    pub fn known(&self) -> bool {
        !self.lost.load(Ordering::SeqCst) && Instant::now() < *self.valid_until.lock().expect("lock")
    }

    /// Whether the lease is still held, waiting if need be: at once when [`Standing::known`];
    /// otherwise for the renewer's next answer (at most `ttl`). A renewal accepted after the
    /// last known moment proves the lease still names this holder (renewals match the owner),
    /// so nobody else can have written under it.
    pub async fn confirm(&self) -> bool {
        let mut renewed = self.renewed.clone();
        let deadline = tokio::time::Instant::now() + self.ttl;
        loop {
            renewed.borrow_and_update();
            if self.lost.load(Ordering::SeqCst) {
                return false;
            }
            if self.known() {
                return true;
            }
            match tokio::time::timeout_at(deadline, renewed.changed()).await {
                Ok(Ok(())) => {}
                // No answer within the TTL, or the renewer ended (released or lost).
                _ => return self.known(),
            }
        }
    }
}

impl Lease {
    /// Take the lock of `db` for `owner`. If someone else holds an unexpired lease, wait up to
    /// `wait` for it to go (polling every second or so), then fail with [`LockError::Held`].
    pub async fn acquire(
        db: &Database,
        owner: &str,
        run_id: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, LockError> {
        Lease::acquire_unless(db, owner, run_id, ttl, wait, None).await
    }

    /// [`Lease::acquire`], giving up the wait when `stop` is set.
    pub async fn acquire_unless(
        db: &Database,
        owner: &str,
        run_id: &str,
        ttl: Duration,
        wait: Duration,
        stop: Option<&AtomicBool>,
    ) -> Result<Lease, LockError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            let sent = Instant::now();
            match try_take(db, owner, run_id, ttl).await? {
                None => return Ok(Lease::hold(db, owner, ttl, sent)),
                Some(mut held) => {
                    let waited = started.elapsed();
                    if waited >= wait || stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                        if let LockError::Held { waited: w, .. } = &mut held {
                            *w = waited.as_secs();
                        }
                        return Err(held);
                    }
                    if waited.is_zero() || pause >= Duration::from_secs(1) {
                        tracing::info!(error = %held, "the tenant is locked; waiting");
                    }
                    let jitter = Duration::from_millis(rand::random::<u64>() % 200);
                    tokio::time::sleep((pause + jitter).min(wait.saturating_sub(waited) + Duration::from_millis(10)))
                        .await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn hold(db: &Database, owner: &str, ttl: Duration, sent: Instant) -> Lease {
        let (stop, mut stopped) = watch::channel(false);
        let (answered, renewed) = watch::channel(0u64);
        let lost = Arc::new(AtomicBool::new(false));
        let valid_until = Arc::new(Mutex::new(sent + margin(ttl)));
        let (db2, owner2, lost2, valid2) = (db.clone(), owner.to_string(), lost.clone(), valid_until.clone());
        tokio::spawn(async move {
            let every = ttl / 3;
            let mut next = every;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(next) => {}
                    _ = stopped.changed() => return,
                }
                next = every;
                let sent = Instant::now();
                let r = db2
                    .collection::<Document>(LOCK)
                    .update_one(doc! {"_id": LOCK_ID, "owner": &owner2}, vec![expiring(ttl)])
                    .await;
                match r {
                    Ok(r) if r.matched_count == 1 => {
                        *valid2.lock().expect("lock") = sent + margin(ttl);
                        answered.send_modify(|n| *n += 1);
                        if sent + margin(ttl) <= Instant::now() {
                            // Answered too late to count (a stalled server or network): the
                            // lease is still this holder's, so renew again at once.
                            next = Duration::ZERO;
                        }
                    }
                    Ok(_) => {
                        tracing::error!("lost the migration lock (it expired and was taken by another runner)");
                        lost2.store(true, Ordering::SeqCst);
                        answered.send_modify(|n| *n += 1);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::mongo::describe(&e), "could not renew the migration lock; retrying")
                    }
                }
            }
        });
        Lease { db: db.clone(), owner: owner.to_string(), stop, standing: Standing { ttl, lost, valid_until, renewed } }
    }

    /// What the holder knows of the lease ([`Standing::confirm`] before each write).
    pub fn standing(&self) -> Standing {
        self.standing.clone()
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Where the holder notes the sessions it runs transactions in.
    pub fn sessions(&self) -> Sessions {
        Sessions { db: self.db.clone(), owner: self.owner.clone(), noted: Arc::new(Mutex::new(HashSet::new())) }
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

/// The sessions a lease holder runs transactions in, noted in the lease document before the
/// first transaction in each, so the runner that takes over after a crash can end them.
#[derive(Clone)]
pub struct Sessions {
    db: Database,
    owner: String,
    noted: Arc<Mutex<HashSet<Vec<u8>>>>,
}

impl Sessions {
    /// Note `session` (once per server session: the driver reuses them).
    pub async fn note(&self, session: &ClientSession) -> mongodb::error::Result<()> {
        let id = session.id().clone();
        let key = bson::to_vec(&id).unwrap_or_default();
        if self.noted.lock().expect("lock").contains(&key) {
            return Ok(());
        }
        self.db
            .collection::<Document>(LOCK)
            .update_one(doc! {"_id": LOCK_ID, "owner": &self.owner}, doc! {"$addToSet": {"sessions": id}})
            .await?;
        self.noted.lock().expect("lock").insert(key);
        Ok(())
    }
}

/// End the sessions a previous holder noted (its open transactions abort). Best effort: a user
/// without the right to end another user's sessions only waits longer (the server expires an
/// open transaction after its lifetime).
async fn end_sessions(db: &Database, previous: &Document) {
    let Ok(sessions) = previous.get_array("sessions") else { return };
    if sessions.is_empty() {
        return;
    }
    let r = db.client().database("admin").run_command(doc! {"killSessions": sessions.clone()}).await;
    match r {
        Ok(_) => tracing::info!(
            sessions = sessions.len(),
            previous = previous.get_str("owner").unwrap_or("?"),
            "ended the sessions of the runner whose lock expired (its open transaction is aborted)"
        ),
        Err(e) => tracing::warn!(
            error = %crate::mongo::describe(&e),
            "could not end the sessions of the runner whose lock expired; its open transaction blocks writes \
             to what it wrote until the server expires it"
        ),
    }
}

/// How long after a renewal was sent the lease is surely still held (a tenth of the TTL less,
/// for the round trip and the two clocks' rates).
fn margin(ttl: Duration) -> Duration {
    ttl - ttl / 10
}

/// `expiresAt`: `ttl` from now on the server's clock.
fn expiring(ttl: Duration) -> Document {
    // As numbers, then a date: some servers (SecantusDB's Rust build) refuse `$add` of a date.
    let at = doc! {"$add": [{"$toLong": "$$NOW"}, ttl.as_millis() as i64]};
    doc! {"$set": {"expiresAt": {"$toDate": at}}}
}

/// One attempt: `None` when taken (or already ours), or who holds it.
async fn try_take(db: &Database, owner: &str, run_id: &str, ttl: Duration) -> Result<Option<LockError>, LockError> {
    let coll = db.collection::<Document>(LOCK);
    // Expired on the server's clock; dates are compared as numbers (portable across servers).
    let expired = doc! {"$expr": {"$lt": [{"$toLong": "$expiresAt"}, {"$toLong": "$$NOW"}]}};
    let mut set = expiring(ttl);
    if let Ok(s) = set.get_document_mut("$set") {
        // A new holder starts with no sessions; the same holder keeps its own.
        s.insert(
            "sessions",
            doc! {"$cond": [{"$eq": ["$owner", {"$literal": owner}]}, {"$ifNull": ["$sessions", []]}, []]},
        );
        s.insert("owner", doc! {"$literal": owner});
        s.insert("run", doc! {"$literal": run_id});
        s.insert("acquiredAt", "$$NOW");
    }
    let res = coll
        .find_one_and_update(doc! {"_id": LOCK_ID, "$or": [{"owner": owner}, expired]}, vec![set])
        .upsert(true)
        .await;
    match res {
        Ok(previous) => {
            if let Some(p) = previous.filter(|p| p.get_str("owner") != Ok(owner)) {
                end_sessions(db, &p).await;
            }
            Ok(None)
        }
        Err(e) if crate::mongo::is_duplicate_key(&e) => {
            let held = coll.find_one(doc! {"_id": LOCK_ID}).await?.unwrap_or_default();
            Ok(Some(LockError::Held {
                owner: held.get_str("owner").unwrap_or("?").to_string(),
                run: held.get_str("run").unwrap_or("?").to_string(),
                expires: held
                    .get_datetime("expiresAt")
                    .map(|d| d.try_to_rfc3339_string().unwrap_or_default())
                    .unwrap_or_default(),
                waited: 0,
            }))
        }
        Err(e) => Err(e.into()),
    }
}
