//! What every per-tenant command shares: read the files, connect, select the tenants, run on
//! each (`--parallel` at a time, results in tenant order), and the worst exit code.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::Global;
use crate::engine::runner::Observer;
use crate::engine::{self, Migration, RunOptions};
use crate::exit::{Exit, Failure};
use crate::mongo::Connection;
use crate::tenants::TenantSelector;

/// Per-tenant results, in tenant order.
pub type Results<T> = Vec<(String, Result<T, Failure>)>;

/// The files, the connection and the selected tenants.
pub struct Fleet {
    pub migrations: Vec<Migration>,
    pub conn: Connection,
    pub tenants: Vec<String>,
}

/// Connect to the server the URI names (it must be given).
pub async fn connect(g: &Global) -> Result<Connection, Failure> {
    let uri = g.uri.as_deref().ok_or_else(|| {
        Failure::invalid("no MongoDB URI: pass --uri, or set DBSHIFT_MONGODB_URI or DBSHIFT_MONGODB_URI_FILE")
    })?;
    Ok(crate::mongo::connect_for_command(uri, Duration::from_secs(g.connect_timeout)).await?)
}

/// The tenant selection of the command line (`default_db`: the database the URI names).
pub fn selector(g: &Global, default_db: Option<String>) -> TenantSelector {
    TenantSelector {
        names: g.tenant.clone(),
        pattern: g.tenants.clone(),
        exclude: g.exclude.clone(),
        default: default_db,
    }
}

/// The connection and the selected tenants.
pub async fn tenants(g: &Global) -> Result<(Connection, Vec<String>), Failure> {
    let conn = connect(g).await?;
    let tenants = selector(g, conn.default_db.clone()).resolve(&conn.client).await?;
    Ok((conn, tenants))
}

/// Files first (bad files change nothing and need no server), then the connection and tenants.
pub async fn start(g: &Global) -> Result<Fleet, Failure> {
    let migrations = engine::load_dir(&g.dir)?;
    let (conn, tenants) = tenants(g).await?;
    Ok(Fleet { migrations, conn, tenants })
}

/// On a server without transactions, say what that changes (on stderr: stdout stays the report).
pub async fn warn_without_transactions(f: &Fleet) {
    let Some(t) = f.tenants.first() else { return };
    if !crate::mongo::supports_transactions(&f.conn.client.database(t)).await {
        eprintln!("warning: {}", engine::pass::WITHOUT_TRANSACTIONS);
    }
}

/// The engine's options from the global flags.
pub fn run_options(g: &Global, observer: Arc<dyn Observer>) -> Result<RunOptions, Failure> {
    if !g.tracking_collection.starts_with(engine::tracking::INTERNAL_PREFIX) {
        return Err(Failure::invalid(format!(
            "--tracking-collection must start with `{}`",
            engine::tracking::INTERNAL_PREFIX
        )));
    }
    let mut o = RunOptions::new(new_run_id());
    o.tracking = g.tracking_collection.clone();
    o.profiles = g.profiles.clone();
    o.lock_ttl = Duration::from_secs(g.lock_ttl.max(3));
    o.lock_wait = g.lock_wait;
    o.owner = crate::engine::lock::owner(std::env::var(crate::job::env::POD_NAME).ok().as_deref());
    o.observer = observer;
    o.stop = Some(stop_on_signal());
    Ok(o)
}

/// A flag set when the process gets SIGTERM or SIGINT (a pod being deleted or evicted, a
/// Ctrl-C): runs stop at the next safe point, undo the migration in progress, record it and
/// exit. A second signal is not waited for: the default handling is restored for it.
pub fn stop_on_signal() -> Arc<std::sync::atomic::AtomicBool> {
    static STOP: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();
    STOP.get_or_init(|| {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = flag.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("asked to stop: finishing at the next safe point (undoing the migration in progress)");
            f.store(true, std::sync::atomic::Ordering::SeqCst);
            // A second signal means now.
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("asked to stop again: exiting now (the next run undoes what this one left)");
            std::process::exit(130);
        });
        flag
    })
    .clone()
}

/// A run id for one command-line invocation.
pub fn new_run_id() -> String {
    format!("cli-{}-{:08x}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), rand::random::<u32>())
}

/// Run `f` on every tenant, `parallel` at a time, keeping tenant order in the results.
pub async fn for_each_tenant<T, F, Fut>(tenants: &[String], parallel: usize, f: F) -> Results<T>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    futures::stream::iter(tenants.iter().cloned().map(|t| {
        let fut = f(t.clone());
        async move { (t, fut.await) }
    }))
    .buffered(parallel.max(1))
    .collect()
    .await
}

/// The most serious exit code over all tenants.
pub fn worst<T>(results: &[(String, Result<T, Failure>)], ok: impl Fn(&T) -> Exit) -> Exit {
    Exit::worst(results.iter().map(|(_, r)| match r {
        Ok(v) => ok(v),
        Err(e) => e.exit,
    }))
}
