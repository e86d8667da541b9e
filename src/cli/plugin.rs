//! `kubectl dbshift ...`: the same binary, run as `kubectl-dbshift` (a symlink on `PATH`, which
//! kubectl finds and runs as a plugin), steers and shows DatabaseMigrations with kubectl's
//! conventions: `-n`, `--context`, `--kubeconfig`, `-o json|yaml`.
//!
//!   ln -s "$(command -v dbshift)" /usr/local/bin/kubectl-dbshift
//!   kubectl dbshift status orders -n shop
//!   kubectl dbshift approve orders -n shop

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use super::cluster::{self, ResourceArgs};
use super::commands::{approve, suspend, wait};
use crate::crd::DatabaseMigration;
use crate::exit::{Exit, Failure};

/// The name kubectl runs the plugin by.
pub const BINARY: &str = "kubectl-dbshift";

#[derive(Parser, Debug)]
#[command(
    name = "kubectl dbshift",
    bin_name = "kubectl dbshift",
    version,
    about = "Steer and show dbshift DatabaseMigrations (the dbshift binary, run by kubectl as a plugin)"
)]
struct Plugin {
    /// Output format: a table (default), `json` or `yaml`.
    #[arg(short = 'o', long, value_enum, global = true)]
    output: Option<Format>,
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Where a DatabaseMigration's run stands, tenant by tenant.
    Status(ResourceArgs),
    /// Approve its current run (waiting at spec.rollout.approval).
    Approve(approve::ApproveArgs),
    /// Suspend it: no new Job starts, running ones finish.
    Suspend(suspend::SuspendArgs),
    /// Resume it where its run stopped.
    Resume(suspend::SuspendArgs),
    /// Wait until it succeeded (exit 0), failed (1) or the timeout passed (1).
    Wait(wait::WaitArgs),
}

/// Whether the process was started as the kubectl plugin.
pub fn invoked() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
        .is_some_and(|name| name == BINARY)
}

pub async fn main() -> ExitCode {
    crate::redact::install_panic_hook();
    let p = Plugin::parse();
    let out = p.output;
    let r = match &p.command {
        PluginCommand::Status(a) => status(a, out).await,
        PluginCommand::Approve(a) => said(approve::approve(a).await, out, "approve", &a.resource),
        PluginCommand::Suspend(a) => said(suspend::set(a, true).await, out, "suspend", &a.resource),
        PluginCommand::Resume(a) => said(suspend::set(a, false).await, out, "resume", &a.resource),
        PluginCommand::Wait(a) => Ok(match out {
            None => wait::run(a).await,
            Some(f) => {
                let (exit, seen) = wait::run_seen(a, true).await;
                match (f, seen) {
                    (Format::Json, Some(d)) => println!("{}", serde_json::to_string_pretty(&d).expect("json")),
                    (Format::Yaml, Some(d)) => print!("{}", serde_yaml::to_string(&d).expect("yaml")),
                    (_, None) => {}
                }
                exit
            }
        }),
    };
    match r {
        Ok(e) => e.into(),
        Err(e) => {
            eprintln!("error: {}", e.message);
            e.exit.into()
        }
    }
}

/// Print what a command did: its sentence, or an object saying it.
fn said(r: Result<String, Failure>, out: Option<Format>, action: &str, a: &ResourceArgs) -> Result<Exit, Failure> {
    let message = r?;
    let doc = json!({ "action": action, "name": a.name, "namespace": a.namespace, "message": message });
    match out {
        None => println!("{message}"),
        Some(Format::Json) => println!("{}", serde_json::to_string_pretty(&doc).expect("json")),
        Some(Format::Yaml) => print!("{}", serde_yaml::to_string(&doc).expect("yaml")),
    }
    Ok(Exit::Ok)
}

async fn status(a: &ResourceArgs, out: Option<Format>) -> Result<Exit, Failure> {
    let (api, ns) = cluster::api(a).await?;
    let dbm = cluster::get(&api, &ns, &a.name).await?;
    match out {
        Some(Format::Json) => println!("{}", serde_json::to_string_pretty(&dbm).expect("json")),
        Some(Format::Yaml) => print!("{}", serde_yaml::to_string(&dbm).expect("yaml")),
        None => print!("{}", table(&ns, &dbm)),
    }
    Ok(Exit::Ok)
}

/// The resource's run and its tenants, as a table.
fn table(ns: &str, dbm: &DatabaseMigration) -> String {
    let name = dbm.metadata.name.clone().unwrap_or_default();
    let Some(st) = &dbm.status else { return format!("{ns}/{name}: no status yet (is the controller running?)\n") };
    let phase = st.phase.map_or("-", |p| p.as_str());
    let progress = st.progress.as_ref().map_or("-".to_string(), |p| p.summary.clone());
    let mut out = format!(
        "{ns}/{name}: {phase}, {progress} tenant(s), run {}, target {}\n",
        st.run_id.as_deref().unwrap_or("-"),
        st.target_version.as_deref().unwrap_or("latest")
    );
    if let Some(m) = &st.message {
        out.push_str(&format!("  {m}\n"));
    }
    if let Some(t) = &st.next_window_start {
        out.push_str(&format!("  next maintenance window: {}\n", t.0));
    }
    if let Some(f) = &st.fleet {
        let when = f.counted_at.as_ref().map_or("-".to_string(), |t| t.0.to_string());
        out.push_str(&format!("  fleet (counted {when}): {}\n", f.summary));
        if let Some(e) = &f.error {
            out.push_str(&format!("  fleet: {e}\n"));
        }
    }
    let rows: Vec<[String; 6]> = st
        .tenants
        .iter()
        .map(|t| {
            let checks = |v: &Option<crate::crd::ValidationStatus>| {
                v.as_ref().map_or("-".to_string(), |v| format!("{}/{}", v.passed, v.checks))
            };
            [
                t.name.clone(),
                format!("{:?}", t.phase),
                format!("{} -> {}", t.from_version.as_deref().unwrap_or("-"), t.to_version.as_deref().unwrap_or("-")),
                checks(&t.precheck),
                checks(&t.validation),
                t.error.clone().or_else(|| t.rollback.clone()).unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["TENANT", "PHASE", "VERSION", "PRECHECKS", "CHECKS", "NOTE"].map(String::from);
    let widths: Vec<usize> =
        (0..6).map(|i| rows.iter().chain([&header]).map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in [&header].into_iter().chain(rows.iter()) {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
