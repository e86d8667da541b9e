//! `dbshift up` and `dbshift plan` (`up --dry-run`): apply pending migrations, or show what
//! would run where, with document estimates.

use clap::Args;

use crate::backup::{Destination, TakenSnapshot};
use crate::cli::fleet::{self, for_each_tenant, worst};
use crate::cli::{output, Global};
use crate::engine::{runner, UpRequest};
use crate::exit::{Exit, Failure};
use crate::job::run::report_exit;

#[derive(Args, Debug, Clone, Default)]
pub struct UpArgs {
    /// Apply up to and including this version (or id).
    #[arg(long)]
    pub to: Option<String>,
    /// Apply only this migration (version or id).
    #[arg(long)]
    pub only: Option<String>,
    /// Show what would run; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run even though applied migrations changed since they were applied.
    #[arg(long)]
    pub allow_changed: bool,
    /// Snapshot each tenant before its first change, as the operator's runner does:
    /// `database:<name>` (a database of the same server; `database` alone is
    /// dbshift_snapshots), `dir:<path>` (an existing directory) or `none`. A tenant with nothing
    /// to do is not snapshotted; a snapshot that fails leaves its tenant untouched.
    #[arg(long, value_name = "DEST", default_value = "none")]
    pub backup: String,
    /// With --backup: the snapshots of each tenant to keep there, newest first (0 keeps all).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub backup_retention: usize,
}

pub async fn run(g: &Global, a: &UpArgs, dry: bool) -> Result<Exit, Failure> {
    // A destination that cannot be is refused before anything is read or changed.
    let dest = Destination::parse(&a.backup).map_err(|e| {
        let f = Failure::from(e);
        Failure::new(f.exit, format!("--backup: {}", f.message))
    })?;
    let f = fleet::start(g).await?;
    if let Some(d) = &dest {
        for t in &f.tenants {
            d.check(t)?;
        }
    }
    fleet::warn_without_transactions(&f).await;
    let mut opts = fleet::run_options(g, output::observer(g.output, f.tenants.len()))?;
    opts.dry_run = dry;
    opts.allow_changed = a.allow_changed;
    let req = UpRequest { target: a.to.clone(), only: a.only.clone(), allow_changed: a.allow_changed };
    let results = for_each_tenant(&f.tenants, g.parallel, |t| {
        let (db, m, r, dest) = (f.conn.client.database(&t), &f.migrations, &req, dest.as_ref().filter(|_| !dry));
        let mut o = opts.clone();
        let taken = TakenSnapshot::default();
        if let Some(d) = dest {
            taken.arm(d, &f.conn.source, &t, &mut o);
        }
        async move {
            let mut report = match runner::up(&db, &t, m, r, &o).await {
                Ok(report) => report,
                // The tenant may be partly changed: its snapshot is where to go back from.
                Err(e) => {
                    let mut f = Failure::from(e);
                    if let Some(snap) = taken.get() {
                        f.message = format!("{} (snapshot taken before the change: {})", f.message, snap.location);
                    }
                    return Err(f);
                }
            };
            if let (Some(d), Some(snap)) = (dest, taken.get()) {
                report.snapshot = Some(snap.location);
                if report.ok {
                    d.retain_logged(&db, a.backup_retention).await;
                }
            }
            Ok(report)
        }
    })
    .await;
    output::print_reports(g.output, if dry { "plan" } else { "up" }, &results, &f.conn.redactor);
    Ok(worst(&results, report_exit))
}
