//! `dbshift up` and `dbshift plan` (`up --dry-run`): apply pending migrations, or show what
//! would run where, with document estimates.

use clap::Args;

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
}

pub async fn run(g: &Global, a: &UpArgs, dry: bool) -> Result<Exit, Failure> {
    let f = fleet::start(g).await?;
    fleet::warn_without_transactions(&f).await;
    let mut opts = fleet::run_options(g, output::observer(g.output, f.tenants.len()))?;
    opts.dry_run = dry;
    opts.allow_changed = a.allow_changed;
    let req = UpRequest { target: a.to.clone(), only: a.only.clone(), allow_changed: a.allow_changed };
    let results = for_each_tenant(&f.tenants, g.parallel, |t| {
        let (db, m, o, r) = (f.conn.client.database(&t), &f.migrations, &opts, &req);
        async move { Ok(runner::up(&db, &t, m, r, o).await?) }
    })
    .await;
    output::print_reports(g.output, if dry { "plan" } else { "up" }, &results, &f.conn.redactor);
    Ok(worst(&results, report_exit))
}
