//! Report: Events about the resource (each tenant's outcome related to its Job, so they are
//! not folded into one series) and the run metrics. Publishing is best effort: a lost Event
//! is logged, never a reason to fail a reconcile.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::jobs::{self, Action, Outcome};
use super::metrics::{OutcomeLabel, ResultLabel};
use super::observe::job_end;
use super::rollout::Decision;
use super::Context;
use crate::crd::{DatabaseMigration, Phase};

pub async fn publish(ctx: &Context, dbm: &DatabaseMigration, type_: EventType, reason: &str, note: String) {
    publish_about(ctx, dbm, type_, reason, note, None).await;
}

/// An Event about the resource; `related` (a tenant's Job) keeps tenants' Events apart
/// instead of folding them into one series.
async fn publish_about(
    ctx: &Context,
    dbm: &DatabaseMigration,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<ObjectReference>,
) -> bool {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: related,
    };
    ctx.metrics.write("event");
    match ctx.recorder.publish(&ev, &dbm.object_ref(&())).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, reason, "could not publish an Event");
            false
        }
    }
}

/// A Job ended: its Event (one for a batch, naming its failed tenants), then its tenants'
/// metrics. `false` when the Event could not be published: both are tried again at the next
/// reconcile.
pub async fn job_ended(ctx: &Context, dbm: &DatabaseMigration, job: &Job, outs: &[(String, Arc<Outcome>)]) -> bool {
    match outs {
        [(_, o)] => tenant_ended(ctx, dbm, job, o).await,
        many => batch_ended(ctx, dbm, job, many).await,
    }
}

/// The Event of a batch's end: how many succeeded, were skipped or failed, the first failures
/// by name.
async fn batch_ended(ctx: &Context, dbm: &DatabaseMigration, job: &Job, outs: &[(String, Arc<Outcome>)]) -> bool {
    let skipped = |o: &Outcome| o.ok && o.result.as_ref().is_some_and(|r| r.skipped);
    let failed: Vec<&(String, Arc<Outcome>)> = outs.iter().filter(|(_, o)| !o.ok).collect();
    let n_skipped = outs.iter().filter(|(_, o)| skipped(o)).count();
    let n_ok = outs.len() - failed.len() - n_skipped;
    let first = outs.first().map(|(t, _)| t.as_str()).unwrap_or_default();
    let mut note = format!(
        "batch of {} tenant(s) from {first}: {n_ok} succeeded, {n_skipped} skipped, {} failed",
        outs.len(),
        failed.len()
    );
    for (t, o) in failed.iter().take(3) {
        let why = o.result.as_ref().and_then(|r| r.error.clone()).or_else(|| o.error.clone()).unwrap_or_default();
        note.push_str(&format!("; {t}: {}", why.chars().take(200).collect::<String>()));
    }
    let (reason, kind) =
        if failed.is_empty() { ("TenantsSucceeded", EventType::Normal) } else { ("TenantsFailed", EventType::Warning) };
    if !publish_about(ctx, dbm, kind, reason, note, Some(job.object_ref(&()))).await {
        return false;
    }
    for (_, o) in outs {
        let outcome = match (o.ok, skipped(o)) {
            (true, true) => "Skipped",
            (true, false) => "Succeeded",
            (false, _) => "Failed",
        };
        ctx.metrics.tenant_runs.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
        if let Some(b) = o.result.as_ref().and_then(|r| r.backup.as_ref()) {
            // A result is the runner's word (or, for a batch, a tenant database's): bounded.
            ctx.metrics.backup_bytes.inc_by(b.bytes.min(1 << 50));
        }
    }
    // Until the Job's end, or until now for a batch whose results were read while its pod exits.
    let end = job_end(job).unwrap_or_else(k8s_openapi::jiff::Timestamp::now);
    if let Some(start) = job.metadata.creation_timestamp.as_ref() {
        let secs = end.duration_since(start.0).as_secs_f64();
        ctx.metrics.tenant_duration.observe(secs.max(0.0) / outs.len().max(1) as f64);
    }
    true
}

/// A tenant's Job ended: its Event, then its metrics.
async fn tenant_ended(ctx: &Context, dbm: &DatabaseMigration, job: &Job, o: &Outcome) -> bool {
    let tenant = job.annotations().get(jobs::ANNOTATION_TENANT).cloned().unwrap_or_default();
    let action = job.labels().get(jobs::LABEL_ACTION).and_then(|a| Action::from_label(a)).unwrap_or(Action::Migrate);
    let skipped = o.result.as_ref().is_some_and(|r| r.skipped);
    let (reason, kind) = match (action, o.ok) {
        (Action::Migrate, true) if skipped => ("TenantSkipped", EventType::Normal),
        (Action::Migrate, true) => ("TenantSucceeded", EventType::Normal),
        (Action::Migrate, false) => ("TenantFailed", EventType::Warning),
        (Action::Rollback, true) => ("TenantRolledBack", EventType::Normal),
        (Action::Rollback, false) => ("TenantRollbackFailed", EventType::Warning),
    };
    let detail = match (&o.result, &o.error) {
        (Some(r), _) if r.skipped => {
            let why = r.failed_pre.first().cloned().unwrap_or_default();
            format!("{tenant}: untouched, a pre-check failed (onPrecheckFailure: skip): {why}")
        }
        (Some(r), _) if r.ok => {
            let docs: i64 = r.done.iter().map(|d| d.2).sum();
            format!(
                "{tenant}: {} migration(s), {docs} document(s), now at {}",
                r.done.len(),
                r.to.clone().unwrap_or_default()
            )
        }
        (Some(r), _) => format!("{tenant}: {}", r.error.clone().unwrap_or_else(|| "failed".into())),
        (None, Some(e)) => format!("{tenant}: {e}"),
        (None, None) => tenant.clone(),
    };
    if !publish_about(ctx, dbm, kind, reason, detail, Some(job.object_ref(&()))).await {
        return false;
    }
    ctx.metrics.tenant_runs.get_or_create(&OutcomeLabel { outcome: reason.trim_start_matches("Tenant").into() }).inc();
    if let (Some(start), Some(end)) = (job.metadata.creation_timestamp.as_ref(), job_end(job)) {
        let secs = end.duration_since(start.0).as_secs_f64();
        ctx.metrics.tenant_duration.observe(secs.max(0.0));
    }
    if let Some(b) = o.result.as_ref().and_then(|r| r.backup.as_ref()) {
        // A result is the runner's word (or, for a batch, a tenant database's): bounded.
        ctx.metrics.backup_bytes.inc_by(b.bytes.min(1 << 50));
    }
    true
}

/// The run's phase changed: an Event, and the run metric when it is over.
pub async fn phase_changed(ctx: &Context, dbm: &DatabaseMigration, phase: Phase, decision: &Decision, run_id: &str) {
    let kind = match phase {
        Phase::Failed | Phase::RollingBack | Phase::RolledBack => EventType::Warning,
        _ => EventType::Normal,
    };
    let reason = phase.as_str();
    publish(ctx, dbm, kind, reason, decision.message.clone()).await;
    if decision.finished {
        ctx.metrics.runs.get_or_create(&ResultLabel { result: reason.into() }).inc();
        tracing::info!(resource = %dbm.name_any(), run = %run_id, phase = reason, "{}", decision.message);
    }
}
