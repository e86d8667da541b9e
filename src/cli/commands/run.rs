//! `dbshift run`: one tenant, as a Kubernetes Job runs it (the flow is [`crate::job::run`]).

use std::sync::Arc;
use std::time::Duration;

use crate::cli::{fleet, Global};
use crate::engine::runner::Quiet;
use crate::exit::Exit;
use crate::job::{self, RunArgs};

pub async fn run(g: &Global, a: &RunArgs) -> Exit {
    let options = match fleet::run_options(g, Arc::new(Quiet)) {
        Ok(o) => o,
        Err(e) => return job::run::failed(a, &g.tenant, e),
    };
    let settings = job::run::Settings {
        uri: g.uri.clone(),
        dir: g.dir.clone(),
        tenants: g.tenant.clone(),
        connect_timeout: Duration::from_secs(g.connect_timeout),
        options,
    };
    job::run::run(settings, a).await
}
