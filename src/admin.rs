//! The admin HTTP server: `/livez` (the process is serving), `/readyz` (every readiness gate has
//! opened) and `/metrics` (OpenMetrics text). It never touches the API server or DynamoDB itself.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Named conditions that must all hold before the process reports ready.
///
/// Each part of the operator registers a gate at start-up (with why it is not ready yet) and opens
/// it once it is: `start`, `crds`, `locksources`, `stores`, `pods`, `gateway` (and `shutdown` closes).
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    gates: Arc<Mutex<BTreeMap<&'static str, Option<String>>>>,
}

impl Readiness {
    /// Register a gate that is closed, with the reason it is not open yet.
    pub fn add_gate(&self, name: &'static str, waiting_for: impl Into<String>) {
        self.lock().insert(name, Some(waiting_for.into()));
    }

    /// Open a gate.
    pub fn open(&self, name: &'static str) {
        self.lock().insert(name, None);
    }

    /// Close a gate again, with the reason.
    pub fn close(&self, name: &'static str, reason: impl Into<String>) {
        self.lock().insert(name, Some(reason.into()));
    }

    /// `Ok` when every gate is open, else the closed gates with their reasons.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let closed: Vec<String> = self.lock().iter().filter_map(|(name, why)| why.as_ref().map(|w| format!("{name}: {w}"))).collect();
        if closed.is_empty() { Ok(()) } else { Err(closed) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Option<String>>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts).
        self.gates.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The admin routes.
pub fn router(readiness: Readiness, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(readiness)
        .route("/metrics", get(metrics_text).with_state(metrics))
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(readiness): State<Readiness>) -> (StatusCode, String) {
    match readiness.check() {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(closed) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready:\n{}\n", closed.join("\n"))),
    }
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
}

/// Bind the admin server; separate from [`serve`] so that a bad address fails start-up at once.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serve until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, readiness: Readiness, metrics: Arc<Metrics>, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(readiness, metrics)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_gate_is_open() {
        let r = Readiness::default();
        assert_eq!(r.check(), Ok(()));
        r.add_gate("crds", "checking CRDs");
        r.add_gate("caches", "waiting for watches");
        assert_eq!(r.check(), Err(vec!["caches: waiting for watches".to_owned(), "crds: checking CRDs".to_owned()]));
        r.open("crds");
        assert_eq!(r.check(), Err(vec!["caches: waiting for watches".to_owned()]));
        r.open("caches");
        assert_eq!(r.check(), Ok(()));
        r.close("caches", "watch lost");
        assert!(r.check().is_err());
    }
}
