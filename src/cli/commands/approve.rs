//! `dbshift approve NAME`: let the current run of a DatabaseMigration past its approval gate
//! (`spec.rollout.approval`), by setting the annotation `dbshift.io/approve: <run id>`.
//! Needs only get and patch on DatabaseMigrations (the chart's approver ClusterRole).

use clap::Args;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::cli::cluster::{self, ResourceArgs};
use crate::crd::APPROVE_ANNOTATION;
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct ApproveArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// Approve only if this is the current run (`status.runId`): what you looked at is what
    /// you approve, even if the resource changed since.
    #[arg(long)]
    pub run: Option<String>,
}

/// How many times a write that lost a race with another is tried again.
const ATTEMPTS: usize = 5;

pub async fn run(a: &ApproveArgs) -> Result<Exit, Failure> {
    println!("{}", approve(a).await?);
    Ok(Exit::Ok)
}

/// Approve; what was done, in a sentence.
pub async fn approve(a: &ApproveArgs) -> Result<String, Failure> {
    let (api, ns) = cluster::api(&a.resource).await?;
    let name = &a.resource.name;
    let mut expected = a.run.clone();
    for _ in 0..ATTEMPTS {
        let dbm = cluster::get(&api, &ns, name).await?;
        let st = dbm.status.clone().unwrap_or_default();
        let Some(run) = st.run_id.clone() else {
            let why = st.message.unwrap_or_else(|| "no status yet".into());
            return Err(Failure::invalid(format!("{ns}/{name} has no run to approve ({why})")));
        };
        if let Some(want) = &expected {
            if *want != run {
                return Err(Failure::invalid(format!(
                    "the current run of {ns}/{name} is {run}, not {want}: nothing approved"
                )));
            }
        }
        // Retries of a lost race approve the run first seen, or none.
        expected = Some(run.clone());
        let phase = st.phase.map_or("no phase", |p| p.as_str());
        if st.phase.is_some_and(|p| p.is_final()) {
            return Err(Failure::invalid(format!(
                "run {run} of {ns}/{name} is over ({phase}): nothing to approve (a change of the spec starts a new run)"
            )));
        }
        // The run carries out the generation it observed; a later spec waits for it to end.
        let generation = dbm.metadata.generation.unwrap_or(0);
        if a.run.is_none() && st.observed_generation.is_some_and(|g| g < generation) {
            return Err(Failure::invalid(format!(
                "the spec of {ns}/{name} changed (generation {generation}) since run {run} started (generation {}): \
                 approving would carry out the old spec. Approve it anyway with --run {run}, or delete and re-apply \
                 the resource to start a run of the new spec",
                st.observed_generation.unwrap_or(0)
            )));
        }
        if dbm.metadata.annotations.as_ref().and_then(|m| m.get(APPROVE_ANNOTATION)) == Some(&run) {
            return Ok(format!("run {run} of {ns}/{name} is already approved ({phase})"));
        }
        // The resourceVersion read makes the write conditional: if the resource changed in
        // between (a new run may have started), the API server refuses it and we look again.
        let patch = json!({
            "metadata": {
                "resourceVersion": dbm.metadata.resource_version,
                "annotations": { APPROVE_ANNOTATION: run },
            }
        });
        match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(format!("approved run {run} of {ns}/{name} (it was {phase})")),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(cluster::api_failure(&format!("approving {ns}/{name}"), e)),
        }
    }
    Err(Failure::new(Exit::Unreachable, format!("{ns}/{name} kept changing while it was approved: try again")))
}
