//! `dbshift validate`: the checks of every applied migration, each reported.

use std::sync::Arc;

use crate::cli::fleet::{self, for_each_tenant, worst};
use crate::cli::{output, Global};
use crate::engine::runner;
use crate::exit::{Exit, Failure};

pub async fn run(g: &Global) -> Result<Exit, Failure> {
    let f = fleet::start(g).await?;
    let opts = fleet::run_options(g, Arc::new(runner::Quiet))?;
    let results = for_each_tenant(&f.tenants, g.parallel, |t| {
        let (db, m, o) = (f.conn.client.database(&t), &f.migrations, &opts);
        async move { Ok(runner::validate(&db, m, o).await?) }
    })
    .await;
    output::print_validation(g.output, &results, &f.conn.redactor);
    Ok(worst(&results, |checks| if checks.iter().all(|c| c.passed) { Exit::Ok } else { Exit::Failed }))
}
