//! `dbshift wait NAME`: hold an application (as an init container) until its migration
//! succeeded. Needs only get/list/watch on DatabaseMigrations in its namespace.

use std::time::Duration;

use clap::Args;
use futures::TryStreamExt;
use kube::runtime::{watcher, WatchStreamExt};

use crate::cli::cluster::{self, ResourceArgs};
use crate::crd::{DatabaseMigration, Phase};
use crate::exit::Exit;

#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// Give up after this many seconds (0: wait forever).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
}

/// Where a resource stands for someone waiting on it.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Succeeded, for the current generation.
    Ready,
    /// Finished without success for the current generation: waiting is pointless.
    Failed(String),
    Waiting(String),
}

pub fn verdict(dbm: &DatabaseMigration) -> Verdict {
    let generation = dbm.metadata.generation.unwrap_or(0);
    let Some(st) = &dbm.status else { return Verdict::Waiting("no status yet".into()) };
    let message = st.message.clone().unwrap_or_default();
    if st.observed_generation != Some(generation) {
        return Verdict::Waiting(format!("generation {generation} not observed yet"));
    }
    let stalled = st.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True");
    match st.phase {
        // A dry run migrates nothing: an application waiting on it must not start.
        Some(Phase::Succeeded) if dbm.spec.dry_run => Verdict::Failed(format!(
            "it is a dry run (spec.dryRun: true): nothing was migrated ({message}); wait on a resource that migrates"
        )),
        Some(Phase::Succeeded) => Verdict::Ready,
        Some(Phase::Failed | Phase::RolledBack) => Verdict::Failed(message),
        _ if stalled => Verdict::Failed(message),
        Some(p) => Verdict::Waiting(format!("{p:?}: {message}")),
        None => Verdict::Waiting(message),
    }
}

/// Exit code: 0 ready, 1 failed or timed out, 3 cannot ask the API server.
pub async fn run(a: &WaitArgs) -> Exit {
    run_seen(a, false).await.0
}

/// [`run`], with the resource as last seen (to print it, as `kubectl dbshift wait -o json`:
/// `quiet` keeps stdout for that).
pub async fn run_seen(a: &WaitArgs, quiet: bool) -> (Exit, Option<DatabaseMigration>) {
    let (api, ns) = match cluster::api(&a.resource).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {}", e.message);
            return (e.exit, None);
        }
    };
    let name = &a.resource.name;
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = Box::pin(watcher(api, cfg).default_backoff().applied_objects());
    let mut last = String::new();
    let mut seen: Option<DatabaseMigration> = None;
    let deadline = (a.timeout > 0).then(|| tokio::time::Instant::now() + Duration::from_secs(a.timeout));
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.try_next()).await {
                Ok(n) => n,
                Err(_) => {
                    eprintln!("timed out after {}s waiting for {ns}/{} ({last})", a.timeout, name);
                    return (Exit::Failed, seen);
                }
            },
            None => stream.try_next().await,
        };
        match next {
            Ok(Some(dbm)) => match verdict(&dbm) {
                Verdict::Ready => {
                    if quiet {
                        eprintln!("{ns}/{} succeeded", name);
                    } else {
                        println!("{ns}/{} succeeded", name);
                    }
                    return (Exit::Ok, Some(dbm));
                }
                Verdict::Failed(m) => {
                    eprintln!("{ns}/{} did not succeed: {m}", name);
                    return (Exit::Failed, Some(dbm));
                }
                Verdict::Waiting(m) => {
                    if m != last {
                        eprintln!("waiting for {ns}/{}: {m}", name);
                        last = m;
                    }
                    seen = Some(dbm);
                }
            },
            Ok(None) => return (Exit::Unreachable, seen),
            Err(e) => {
                eprintln!("error: watching {ns}/{}: {e}", name);
                return (Exit::Unreachable, seen);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dbm(status: &str, generation: i64) -> DatabaseMigration {
        let mut d: DatabaseMigration = serde_yaml::from_str(&format!(
            r#"
apiVersion: dbshift.io/v1alpha1
kind: DatabaseMigration
metadata: {{ name: m, generation: {generation} }}
spec:
  connection: {{ secretRef: {{ name: s }} }}
  tenants: {{ names: [a] }}
  migrations: {{ configMapRef: {{ name: c }} }}
status: {status}
"#
        ))
        .unwrap();
        d.metadata.generation = Some(generation);
        d
    }

    #[test]
    fn only_a_success_of_the_current_generation_releases_the_app() {
        assert_eq!(verdict(&dbm("{ observedGeneration: 2, phase: Succeeded }", 2)), Verdict::Ready);
        assert!(matches!(verdict(&dbm("{ observedGeneration: 1, phase: Succeeded }", 2)), Verdict::Waiting(_)));
        assert!(matches!(verdict(&dbm("{ observedGeneration: 2, phase: Migrating }", 2)), Verdict::Waiting(_)));
        assert!(matches!(verdict(&dbm("{ observedGeneration: 2, phase: RolledBack }", 2)), Verdict::Failed(_)));
        let stalled = "{ observedGeneration: 2, phase: Pending, conditions: [{type: Stalled, status: 'True', reason: X, message: m, lastTransitionTime: '2026-01-01T00:00:00Z'}] }";
        assert!(matches!(verdict(&dbm(stalled, 2)), Verdict::Failed(_)));
        let mut dry = dbm("{ observedGeneration: 2, phase: Succeeded }", 2);
        dry.spec.dry_run = true;
        assert!(matches!(verdict(&dry), Verdict::Failed(m) if m.contains("dry run")), "a dry run releases nothing");
    }
}
