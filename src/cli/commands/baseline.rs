//! `dbshift baseline --to VERSION`: record the migrations up to VERSION as applied, changing
//! nothing else, on databases that got them by other means (state `baselined`: in effect for
//! `up` and `status`, never undone by `down`).

use std::sync::Arc;

use clap::Args;
use serde::Serialize;

use crate::cli::fleet::{self, for_each_tenant, worst};
use crate::cli::{output, Global};
use crate::engine::runner;
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct BaselineArgs {
    /// The last migration (version or id) the databases already have.
    #[arg(long)]
    pub to: String,
}

/// What `baseline` recorded on one tenant.
#[derive(Debug, Clone, Serialize)]
pub struct Baselined {
    pub baselined: Vec<String>,
}

pub async fn run(g: &Global, a: &BaselineArgs) -> Result<Exit, Failure> {
    let f = fleet::start(g).await?;
    let opts = fleet::run_options(g, Arc::new(runner::Quiet))?;
    let results = for_each_tenant(&f.tenants, g.parallel, |t| {
        let (db, m, o, to) = (f.conn.client.database(&t), &f.migrations, &opts, a.to.as_str());
        async move { Ok(Baselined { baselined: runner::baseline(&db, &t, m, to, o).await? }) }
    })
    .await;
    if g.output == output::Output::Json {
        output::print_json("baseline", &results, |_| true, &f.conn.redactor);
    } else {
        for (tenant, r) in &results {
            match r {
                Ok(b) if b.baselined.is_empty() => {
                    println!("{tenant}: nothing to baseline (already in effect up to {})", a.to)
                }
                Ok(b) => println!("{tenant}: baselined {} migration(s): {}", b.baselined.len(), b.baselined.join(", ")),
                Err(e) => output::print_error(tenant, e, &f.conn.redactor),
            }
        }
    }
    Ok(worst(&results, |_| Exit::Ok))
}
