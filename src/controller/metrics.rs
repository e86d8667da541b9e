//! Prometheus metrics and the small HTTP server for `/healthz`, `/readyz` and `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// One DatabaseMigration. Not `namespace`: Prometheus gives that name to the namespace of the
/// scraped pod (and would rename this one `exported_namespace`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource_namespace: String,
    pub resource: String,
}

/// Everything the controller counts.
pub struct Metrics {
    registry: Registry,
    pub runs: Family<ResultLabel, Counter>,
    pub tenant_runs: Family<OutcomeLabel, Counter>,
    pub tenant_duration: Histogram,
    pub backup_bytes: Counter,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub jobs_running: Gauge,
    pub api_writes: Family<ReasonLabel, Counter>,
    /// Runs going on, by resource: when each started (the series goes when the run ends).
    pub run_started: Family<ResourceLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dbshift");
        let runs = Family::<ResultLabel, Counter>::default();
        registry.register("runs", "Runs finished, by result (Succeeded, Failed, RolledBack)", runs.clone());
        let tenant_runs = Family::<OutcomeLabel, Counter>::default();
        registry.register("tenant_runs", "Tenant Jobs finished, by outcome", tenant_runs.clone());
        let tenant_duration = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "tenant_duration_seconds",
            "Time from a tenant Job's creation to its end",
            tenant_duration.clone(),
        );
        let backup_bytes = Counter::default();
        registry.register("backup_bytes", "Bytes written to snapshots by tenant Jobs", backup_bytes.clone());
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        registry.register("reconcile_errors", "Reconciles that ended in an error, by reason", reconcile_errors.clone());
        let jobs_running = Gauge::default();
        registry.register("jobs_running", "Tenant Jobs running now", jobs_running.clone());
        let api_writes = Family::<ReasonLabel, Counter>::default();
        registry.register("api_writes", "Writes to the Kubernetes API, by kind", api_writes.clone());
        let run_started = Family::<ResourceLabel, Gauge>::default();
        registry.register(
            "run_started_timestamp_seconds",
            "When the run going on for a DatabaseMigration started (Unix time; none once it ended)",
            run_started.clone(),
        );
        // Every known label value from the start, at 0: Prometheus sees no increase in a series
        // whose first sample is already 1, so an alert on the first failure after a restart
        // would never fire.
        for result in ["Succeeded", "Failed", "RolledBack"] {
            let _ = runs.get_or_create(&ResultLabel { result: result.into() });
        }
        for outcome in ["Succeeded", "Skipped", "Failed", "RolledBack", "RollbackFailed"] {
            let _ = tenant_runs.get_or_create(&OutcomeLabel { outcome: outcome.into() });
        }
        Metrics {
            registry,
            runs,
            tenant_runs,
            tenant_duration,
            backup_bytes,
            reconcile_errors,
            jobs_running,
            api_writes,
            run_started,
        }
    }
}

impl Metrics {
    /// A run going on for `namespace/name` since `started` (Unix seconds), or none (`None`).
    pub fn run_going_on(&self, namespace: &str, name: &str, started: Option<i64>) {
        let label = ResourceLabel { resource_namespace: namespace.into(), resource: name.into() };
        match started {
            Some(t) => {
                self.run_started.get_or_create(&label).set(t);
            }
            None => {
                self.run_started.remove(&label);
            }
        }
    }

    pub fn write(&self, kind: &str) {
        self.api_writes.get_or_create(&ReasonLabel { reason: kind.into() }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Health as the probes see it.
#[derive(Default)]
pub struct Health {
    /// Set once the controller's watches have synced (or it stands by as a non-leader).
    pub ready: AtomicBool,
}

/// Serve `/healthz` (and `/livez`), `/readyz`, `/metrics` until the process ends, with axum:
/// HTTP/1.1 done by hyper, and an accept loop that backs off when the process runs out of file
/// descriptors (EMFILE) instead of spinning.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    let ok = || async { "ok\n" };
    let app = axum::Router::new()
        .route("/healthz", get(ok))
        .route("/livez", get(ok))
        .route(
            "/readyz",
            get(move || async move {
                if health.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    metrics.encode(),
                )
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the HTTP server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        sock.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_probes_and_metrics_answer_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::default());
        tokio::spawn(serve(listener, Arc::new(Metrics::default()), health.clone()));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(
            m.starts_with("HTTP/1.1 200") && m.contains("openmetrics-text") && m.contains("dbshift_jobs_running"),
            "{m}"
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn metrics_are_named_as_documented() {
        let m = Metrics::default();
        m.runs.get_or_create(&ResultLabel { result: "Succeeded".into() }).inc();
        m.tenant_runs.get_or_create(&OutcomeLabel { outcome: "Failed".into() }).inc();
        m.tenant_duration.observe(3.0);
        m.backup_bytes.inc_by(10);
        let text = m.encode();
        for name in [
            "dbshift_runs_total{result=\"Succeeded\"} 1",
            "dbshift_tenant_runs_total{outcome=\"Failed\"} 1",
            "dbshift_tenant_duration_seconds_count 1",
            "dbshift_backup_bytes_total 10",
            "dbshift_jobs_running 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
