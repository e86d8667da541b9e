//! `dbshift suspend NAME` / `dbshift resume NAME`: set or clear `spec.suspend`. Suspended, a run
//! starts no new Job (running ones finish); resumed, it goes on where it stopped. Under GitOps,
//! set the field in the repository instead: a sync would put back what the repository says.

use clap::Args;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::cli::cluster::{self, ResourceArgs};
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct SuspendArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
}

pub async fn run(a: &SuspendArgs, suspend: bool) -> Result<Exit, Failure> {
    println!("{}", set(a, suspend).await?);
    Ok(Exit::Ok)
}

/// Set or clear `spec.suspend`; what was done, in a sentence.
pub async fn set(a: &SuspendArgs, suspend: bool) -> Result<String, Failure> {
    let (api, ns) = cluster::api(&a.resource).await?;
    let name = &a.resource.name;
    let dbm = cluster::get(&api, &ns, name).await?;
    let verb = if suspend { "suspended" } else { "resumed" };
    if dbm.spec.suspend == suspend {
        return Ok(format!("{ns}/{name} is already {verb}"));
    }
    // `null` removes the field: a resumed resource reads as one never suspended.
    let value = if suspend { json!(true) } else { serde_json::Value::Null };
    let patch = json!({ "spec": { "suspend": value } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| cluster::api_failure(&format!("setting spec.suspend of {ns}/{name}"), e))?;
    let what = if suspend {
        "no new Job starts; running Jobs finish (`dbshift resume` goes on)"
    } else {
        "the run goes on where it stopped"
    };
    Ok(format!("{verb} {ns}/{name}: {what}"))
}
