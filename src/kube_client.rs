//! The operator's Kubernetes client: kube's own stack (TLS, timeouts, authentication, retries of
//! server errors), with a connection pool that lets go of what it does not use.
//!
//! kube-rs speaks HTTP/1 only, so every request in flight has a connection of its own, and its
//! pool is built without a timer: hyper then never evicts an idle connection (its 90 s idle
//! timeout is checked only when that very connection is checked out again, and the pool hands out
//! the most recently used one first). A start that judges 64 StateLocks at once leaves a hundred
//! connections behind, each with its read and write buffers, for the life of the process. Here
//! the pool has a timer, a shorter idle timeout and a bound on idle connections.
//!
//! Left out of kube's stack: its tracing layer (a debug span per request, and an error log line
//! per failed request; the callers log what failed them, with their context). An exec credential
//! plugin (it may issue client certificates that expire) and a proxy fall back to kube's own
//! builder: it handles the first, and refuses a proxy as before (this build enables none of
//! kube's proxy features).

use std::time::Duration;

use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use kube::{
    Client, Config,
    client::{ConfigExt, retry::RetryPolicy},
};
use tower::{BoxError, ServiceBuilder, retry::RetryLayer};

/// Idle connections kept to the API server: enough for the steady state's requests in flight
/// (watches hold their own connections, which are never idle).
pub const IDLE_CONNECTIONS: usize = 8;
/// An idle connection beyond need is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for `config` with the bounded pool (see the module's documentation).
pub fn client(config: Config) -> Result<Client, kube::Error> {
    if config.proxy_url.is_some() || config.auth_info.exec.is_some() {
        return Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let pool = HyperClient::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(IDLE_CONNECTIONS)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| RetryLayer::new(RetryPolicy::server_retry())))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(pool);
    Ok(Client::new(service, config.default_namespace))
}
