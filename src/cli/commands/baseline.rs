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
    let nothing = format!("nothing to baseline (already in effect up to {})", a.to);
    print(g.output, "baseline", &results, &f.conn.redactor, "baselined {n} migration(s)", &nothing);
    Ok(worst(&results, |_| Exit::Ok))
}

/// What `baseline` or `import` recorded per tenant: `done` (`{n}` is the count) followed by
/// the ids, or `nothing` when every migration was in effect already.
pub fn print(
    out: output::Output,
    command: &str,
    results: &[(String, Result<Baselined, Failure>)],
    redactor: &crate::redact::Redactor,
    done: &str,
    nothing: &str,
) {
    if out == output::Output::Json {
        return output::print_json(command, results, |_| true, redactor);
    }
    for (tenant, r) in results {
        match r {
            Ok(b) if b.baselined.is_empty() => println!("{tenant}: {nothing}"),
            Ok(b) => {
                let done = done.replace("{n}", &b.baselined.len().to_string());
                println!("{tenant}: {done}: {}", b.baselined.join(", "))
            }
            Err(e) => output::print_error(tenant, e, redactor),
        }
    }
}
