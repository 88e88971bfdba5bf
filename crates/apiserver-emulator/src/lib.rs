//! A Kubernetes API server emulator that speaks the real HTTP protocol, for statelock's tests.
//!
//! It serves discovery, CRUD, watch, server-side apply and server-side Tables for built-in kinds
//! and for custom resources registered live by CustomResourceDefinitions, so that the operator,
//! the real `kubectl` and the Python `kubernetes` client can all talk to it. Its fidelity rules
//! are in `../shared/reference/kube-api-contract.md` (from the repository root); what it leaves out is listed in its README.
//! It is a test tool: it must never be lenient where a real API server is strict.

pub mod api;
pub mod clock;
pub mod events;
pub mod http;
pub mod jsonpath;
pub mod managed;
pub mod patch;
pub mod proto;
pub mod rbac;
pub mod registry;
pub mod schema;
pub mod selectors;
pub mod status;
pub mod store;
pub mod table;

use std::{net::SocketAddr, path::Path, sync::Arc};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::{Api, Options};
pub use clock::Clock;
pub use http::ServeOptions;
pub use rbac::{Authorizer, User};

/// Everything that configures an emulator.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub api: Options,
    pub serve: ServeOptions,
    pub clock: Clock,
    pub authorizer: Authorizer,
}

/// A running emulator.
pub struct Emulator {
    pub addr: SocketAddr,
    pub api: Api,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// Start serving on `addr` (use port 0 for a free port).
    pub async fn start(addr: SocketAddr, config: Config) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let api = Api::new(config.api, config.clock);
        let shutdown = CancellationToken::new();
        let shared =
            Arc::new(http::Shared { api: api.clone(), options: config.serve, authz: config.authorizer, shutdown: shutdown.clone(), addr });
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let shared = shared.clone();
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service_fn(move |req| http::handle(shared.clone(), req)));
                        let conn = graceful.watch(conn);
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                    }
                    _ = token.cancelled() => break,
                }
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
        });
        Ok(Self { addr, api, shutdown, task })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at the emulator (no credentials, or the given bearer token).
    pub fn kubeconfig(&self, token: Option<&str>) -> String {
        let user = match token {
            Some(t) => format!("  user:\n    token: {t}\n"),
            None => "  user: {}\n".into(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\ncurrent-context: emulator\nusers:\n- name: emulator\n{user}",
            self.url()
        )
    }

    /// Write [`Self::kubeconfig`] to a file.
    pub fn write_kubeconfig(&self, path: &Path, token: Option<&str>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig(token))
    }

    /// Forget history: watches and continue tokens from before now get 410 Expired.
    pub fn compact(&self) -> u64 {
        self.api.lock().store.compact()
    }

    /// End every open watch stream.
    pub fn drop_watches(&self) -> usize {
        self.api.lock().store.drop_watches()
    }

    /// Hold new watch requests (true) until released (false).
    pub fn pause_watches(&self, paused: bool) {
        self.api.watches_paused.send_replace(paused);
    }

    /// Break the watches of one resource (`group` empty for the core group) and hold new ones
    /// (true) until released (false): clients' caches of it fall behind while other watches flow.
    pub fn hold_watches_of(&self, group: &str, plural: &str, held: bool) {
        let key = format!("{group}/{plural}");
        self.api.watches_held.send_modify(|set| {
            if held {
                set.insert(key);
            } else {
                set.remove(&key);
            }
        });
        if held {
            self.api.lock().store.drop_watches_of(group, plural);
        }
    }

    /// The next writes answer with these HTTP codes (409 Conflict or any 5xx), one each, in order.
    pub fn fail_next_writes(&self, codes: &[u16]) {
        self.api.lock().faults.next_writes = codes.to_vec();
    }

    /// Delay every response by this much.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.api.lock().faults.latency_ms = latency.as_millis() as u64;
    }

    /// Writes that changed something, for one resource (`group` empty for the core group).
    pub fn writes(&self, group: &str, plural: &str) -> u64 {
        let key = registry::StorageKey { group: group.into(), plural: plural.into() };
        self.api.lock().store.write_counts().get(&key).copied().unwrap_or(0)
    }

    /// Writes that changed something, across all resources.
    pub fn total_writes(&self) -> u64 {
        self.api.lock().store.write_counts().values().sum()
    }

    /// Resource requests so far (user, verb, resource, allowed), with RBAC on; the last 100,000.
    pub fn audit(&self) -> Vec<api::AuditRecord> {
        self.api.lock().audit.iter().cloned().collect()
    }

    /// Resource requests so far by (user, verb, resource), with RBAC on; none forgotten.
    pub fn audit_counts(&self) -> std::collections::BTreeMap<(String, String, String), u64> {
        self.api.lock().audit_counts.clone()
    }

    /// Watches refused with 410 Expired so far.
    pub fn expired_watches(&self) -> u64 {
        self.api.lock().store.expired_watches()
    }

    /// Stop serving: close watches, finish requests in flight.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}
