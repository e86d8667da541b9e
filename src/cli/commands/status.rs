//! `dbshift status`: per tenant, where every migration stands; with `--schema`, also whether the
//! indexes and validators the applied migrations left are still what the database has (drift).

use std::sync::Arc;

use clap::Args;
use serde::Serialize;

use crate::cli::fleet::{self, for_each_tenant, worst};
use crate::cli::{output, Global};
use crate::engine::drift::Difference;
use crate::engine::planner::Entry;
use crate::engine::runner;
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone, Default)]
pub struct StatusArgs {
    /// Also compare the indexes and validators that applied migrations created, changed or
    /// dropped with what each database has now; exit 1 when any differs.
    #[arg(long)]
    pub schema: bool,
}

/// One tenant's status with its drift.
#[derive(Debug, Serialize)]
pub struct WithSchema {
    pub migrations: Vec<Entry>,
    pub drift: Vec<Difference>,
    /// Migrations with runCommand steps, whose effect on indexes and validators is not followed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unchecked: Vec<String>,
}

pub async fn run(g: &Global, a: &StatusArgs) -> Result<Exit, Failure> {
    let f = fleet::start(g).await?;
    let opts = fleet::run_options(g, Arc::new(runner::Quiet))?;
    if !a.schema {
        let results = for_each_tenant(&f.tenants, g.parallel, |t| {
            let (db, m, o) = (f.conn.client.database(&t), &f.migrations, &opts);
            async move { Ok(runner::status(&db, m, o).await?) }
        })
        .await;
        output::print_status(g.output, &results, &f.conn.redactor);
        return Ok(worst(&results, |_| Exit::Ok));
    }
    let results = for_each_tenant(&f.tenants, g.parallel, |t| {
        let (db, m, o) = (f.conn.client.database(&t), &f.migrations, &opts);
        async move {
            let migrations = runner::status(&db, m, o).await?;
            let (drift, unchecked) = runner::schema_drift(&db, m, o).await?;
            Ok(WithSchema { migrations, drift, unchecked })
        }
    })
    .await;
    output::print_schema_status(g.output, &results, &f.conn.redactor);
    Ok(worst(&results, |w| if w.drift.is_empty() { Exit::Ok } else { Exit::Failed }))
}
