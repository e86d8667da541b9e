//! Leader election with a `coordination.k8s.io/v1` Lease, so two replicas never both act.
//!
//! The leader renews the Lease every third of its duration. A replica that cannot renew
//! before the Lease expires exits (its pod restarts as a follower) rather than risk acting
//! next to a new leader. Followers take over once the Lease has not been renewed for its
//! whole duration, or at once when the leader released it on shutdown.
//!
//! "Not renewed for its whole duration" is measured on this replica's own monotonic clock,
//! from the moment it last saw the Lease's record change (as client-go's leader election
//! does), never by comparing the leader's `renewTime` with the local wall clock: two nodes'
//! clocks a few seconds apart would otherwise have a follower take a live leader's Lease (or
//! wait for a dead one far too long). A follower that has just started therefore waits one
//! whole duration before it takes over a Lease whose holder it has never seen renew.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The Lease's record as last seen (holder, renewTime, duration) and when, on this clock.
    observed: Mutex<Option<(Record, Instant)>>,
}

type Record = (Option<String>, Option<String>, Option<i32>);

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Elector { api, name: name.into(), identity: identity.into(), duration, observed: Mutex::new(None) }
    }

    /// How long ago, on this replica's monotonic clock, the record last changed (zero when it
    /// differs from the one seen before, or none was).
    fn unchanged_for(&self, record: Record) -> Duration {
        let mut seen = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        match seen.as_ref() {
            Some((r, at)) if *r == record => at.elapsed(),
            _ => {
                *seen = Some((record, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Wait until this replica holds the Lease.
    pub async fn acquire(&self) {
        let mut logged = false;
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) if !logged => {
                    tracing::info!(lease = %self.name, "another replica leads; standing by");
                    logged = true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "leader election"),
            }
            tokio::time::sleep(self.duration / 5).await;
        }
    }

    /// Keep renewing; returns only when leadership is lost (the caller must stop acting).
    ///
    /// A renewal counts from the moment it was sent, and a leader that has not renewed for two
    /// thirds of the duration steps down, each request bounded by the time left: a follower
    /// takes over only after a whole duration without a change it saw, which starts no
    /// earlier than the request, so the two never act at once (a third of the duration is the
    /// margin for clocks that run at different rates, and for this process to stop).
    pub async fn hold(&self) {
        let limit = self.duration * 2 / 3;
        let mut last_renewal = Instant::now();
        let mut wait = self.duration / 3;
        loop {
            tokio::time::sleep(wait.min(limit.saturating_sub(last_renewal.elapsed()))).await;
            let sent = Instant::now();
            let left = limit.saturating_sub(last_renewal.elapsed());
            match tokio::time::timeout(left, self.try_acquire()).await {
                Ok(Ok(true)) => {
                    last_renewal = sent;
                    wait = self.duration / 3;
                }
                Ok(Ok(false)) => {
                    tracing::error!(lease = %self.name, "another replica took the Lease");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.name, error = %e, "renewing the Lease failed");
                    wait = Duration::from_secs(1);
                }
                Err(_) => {}
            }
            if last_renewal.elapsed() >= limit {
                tracing::error!(lease = %self.name, "could not renew the Lease in time; stepping down");
                return;
            }
        }
    }

    /// Give the Lease up so a follower takes over at once (best effort, on shutdown).
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            if let Some(spec) = lease.spec.as_mut() {
                if spec.holder_identity.as_deref() == Some(&self.identity) {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                    let _ = self.api.replace(&self.name, &PostParams::default(), &lease).await;
                }
            }
        }
    }

    async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.duration.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(&self.identity);
        let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64);
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|r| r.0.to_string()),
            spec.lease_duration_seconds,
        );
        let unchanged = self.unchanged_for(record);
        let expired = spec.holder_identity.is_none() || spec.renew_time.is_none() || unchanged >= held_for;
        if !mine && !expired {
            return Ok(false);
        }
        if !mine {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Someone else wrote it first.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
