//! `dbshift down`: roll back applied migrations (default: the last one).

use clap::Args;

use crate::cli::fleet::{self, for_each_tenant, worst};
use crate::cli::{output, Global};
use crate::engine::{runner, DownRequest};
use crate::exit::{Exit, Failure};
use crate::job::run::report_exit;

#[derive(Args, Debug, Clone)]
#[group(id = "which", multiple = false)]
pub struct DownArgs {
    /// Roll back every migration above this version (`0` for all).
    #[arg(long, group = "which")]
    pub to: Option<String>,
    /// Roll back the last N migrations.
    #[arg(long, group = "which")]
    pub steps: Option<usize>,
    /// Roll back the last batch (everything the last `up` applied).
    #[arg(long, group = "which")]
    pub batch: bool,
    /// Roll back only this migration.
    #[arg(long, group = "which")]
    pub only: Option<String>,
    /// Show what would be rolled back; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run a stored down that uses runCommand even when the migration's file is missing or says
    /// otherwise (the tracking record can be written by anyone who can write the database).
    #[arg(long)]
    pub trust_stored_down: bool,
}

impl DownArgs {
    fn request(&self) -> DownRequest {
        if let Some(t) = &self.to {
            DownRequest::To(t.clone())
        } else if let Some(n) = self.steps {
            DownRequest::Steps(n)
        } else if self.batch {
            DownRequest::LastBatch
        } else if let Some(o) = &self.only {
            DownRequest::Only(o.clone())
        } else {
            DownRequest::Steps(1)
        }
    }
}

pub async fn run(g: &Global, a: &DownArgs) -> Result<Exit, Failure> {
    let f = fleet::start(g).await?;
    fleet::warn_without_transactions(&f).await;
    let mut opts = fleet::run_options(g, output::observer(g.output, f.tenants.len()))?;
    opts.dry_run = a.dry_run;
    opts.trust_stored_down = a.trust_stored_down;
    let req = a.request();
    let results = for_each_tenant(&f.tenants, g.parallel, |t| {
        let (db, m, o, r) = (f.conn.client.database(&t), &f.migrations, &opts, &req);
        async move { Ok(runner::down(&db, &t, m, r, o).await?) }
    })
    .await;
    output::print_reports(g.output, "down", &results, &f.conn.redactor);
    Ok(worst(&results, report_exit))
}
