//! The one place that knows everything: builds the clients and the shutdown signal, checks the
//! cluster, starts the shared caches, and starts the servers and controllers. Components share only
//! the caches (`cluster`), the StateLock writer and the pure modules; none reaches into another.

use std::{fs, io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use kube::{
    Client,
    runtime::events::{Recorder, Reporter},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    admin::{self, Readiness},
    cli::GatewayBackend,
    cli::{CrdsArgs, RunArgs},
    cluster::Cluster,
    crd, expiry, gateway,
    leader::{self, Leadership},
    metrics::Metrics,
    mirror,
};

/// Why `statelock crds` failed.
#[derive(Debug, thiserror::Error)]
pub enum CrdsError {
    #[error("failed to render the CRDs as YAML: {0}")]
    Render(#[from] serde_saphyr::SerializeError),
    #[error("failed to write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// `statelock crds`: print every CRD, or write one file per CRD.
pub fn crds(args: &CrdsArgs) -> Result<(), CrdsError> {
    match &args.write_dir {
        None => {
            print!("{}", crd::all_to_yaml()?);
            Ok(())
        }
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|source| CrdsError::Write { path: dir.clone(), source })?;
            for def in crd::all() {
                let path = dir.join(crd::file_name(&def));
                fs::write(&path, crd::to_yaml(&def)?).map_err(|source| CrdsError::Write { path, source })?;
            }
            Ok(())
        }
    }
}

/// Why `statelock run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to load the Kubernetes client configuration (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    LoadKubeConfig(#[source] kube::config::InferConfigError),
    #[error("failed to build the Kubernetes client: {0}")]
    BuildKubeClient(#[source] kube::Error),
    #[error("failed to look up the {api} API on the API server: {source}")]
    DiscoverCrds { api: String, source: kube::Error },
    #[error(
        "required CustomResourceDefinition(s) not installed: {}; install them with `statelock crds | kubectl apply --server-side -f -` or the Helm chart",
        .0.join(", ")
    )]
    CrdsMissing(Vec<String>),
    #[error("failed to bind the gateway to {addr}: {source}")]
    BindGateway { addr: SocketAddr, source: io::Error },
    #[error("failed to bind the admin server to {addr}: {source}")]
    BindAdmin { addr: SocketAddr, source: io::Error },
    #[error("the admin server failed: {0}")]
    ServeAdmin(#[source] io::Error),
    #[error("failed to install the signal handler: {0}")]
    Signals(#[source] io::Error),
}

/// `statelock run`: the operator.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let config = kube::Config::infer().await.map_err(RunError::LoadKubeConfig)?;
    info!(cluster_url = %config.cluster_url, "loaded Kubernetes configuration");
    let client = crate::kube_client::client(config).map_err(RunError::BuildKubeClient)?;
    run_with(client, args, wait_for_termination()).await
}

/// The operator with a given client, until `stop` resolves (SIGTERM/SIGINT for `run`).
pub async fn run_with(client: Client, args: RunArgs, stop: impl std::future::Future<Output = io::Result<()>>) -> Result<(), RunError> {
    let readiness = Readiness::default();
    // The admin server answers /readyz from here on: until every component has closed its own
    // gates, this one keeps the replica from looking ready.
    readiness.add_gate("start", "starting the components");
    readiness.add_gate("crds", "checking that the statelock CRDs are installed");
    ensure_crds_installed(&client).await?;
    readiness.open("crds");
    info!("statelock CRDs are installed");

    // Shutdown order: the gateway stops accepting and finishes its calls, the mirror and the
    // expiry controller stop, then the Lease is handed back, then the admin server stops.
    let shutdown = CancellationToken::new();
    let lease_shutdown = CancellationToken::new();
    let admin_shutdown = CancellationToken::new();
    let listener = admin::bind(args.admin_addr).await.map_err(|source| RunError::BindAdmin { addr: args.admin_addr, source })?;
    info!(addr = %args.admin_addr, "admin server listening");
    let metrics = Metrics::new();
    let admin = tokio::spawn(admin::serve(listener, readiness.clone(), metrics.clone(), admin_shutdown.clone()));

    let (leadership, election) = if args.leader_election {
        let namespace = args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        let config = leader::LeaseConfig::new(&args.lease_name, namespace, &args.pod_name, args.lease_duration);
        info!(lease = %config.name, namespace = %config.namespace, identity = %config.identity, "leader election on");
        let m = metrics.clone();
        let (l, task) = leader::start(client.clone(), config, lease_shutdown.clone(), move |leading| {
            m.leader.set(i64::from(leading));
            if !leading {
                m.clear_leader_gauges();
            }
        });
        (l, Some(task))
    } else {
        info!("leader election off: this process acts alone");
        metrics.leader.set(1);
        (Leadership::always(), None)
    };

    let reporter = reporter_of(&args);
    let recorder = Recorder::new(client.clone(), reporter.clone());
    let tenancy = Arc::new(crate::tenancy::TenancyPolicy {
        identity_namespaces: if args.aws_identity_namespaces.is_empty() {
            vec![args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned())]
        } else {
            args.aws_identity_namespaces.clone()
        },
        allowed_endpoints: args.allowed_endpoints.clone(),
    });
    info!(identity_namespaces = ?tenancy.identity_namespaces, allowed_endpoints = ?tenancy.allowed_endpoints, "tenancy");
    // The watches every component reads: one per kind. LockSources the operator refuses widen
    // nothing (the in-memory gateway backend, for tests and benchmarks, serves them all).
    let served = {
        let (tenancy, all) = (tenancy.clone(), matches!(args.gateway_backend, GatewayBackend::Memory));
        move |s: &crd::LockSource| all || tenancy.check(s).is_ok()
    };
    let (cluster, lock_triggers) = Cluster::start(&client, served, &shutdown);
    let mirror_ctx = Arc::new(
        mirror::Context::new(client.clone(), recorder.clone(), metrics.clone(), leadership.clone(), tenancy.clone(), cluster.clone())
            .with_reporter(reporter.clone()),
    );
    let mirror = tokio::spawn(mirror::run(mirror_ctx, readiness.clone(), shutdown.clone()));
    tokio::spawn(fleet_gauges(cluster.clone(), metrics.clone(), leadership.clone(), shutdown.clone()));
    let expiry = tokio::spawn(expiry::controller::run(
        expiry::controller::Deps {
            client: client.clone(),
            recorder: recorder.clone(),
            reporter,
            metrics: metrics.clone(),
            leader: leadership.clone(),
            tenancy: tenancy.clone(),
            cluster: cluster.clone(),
            lock_triggers,
        },
        readiness.clone(),
        shutdown.clone(),
    ));
    let gateway = match args.gateway_addr {
        Some(addr) => {
            Some(start_gateway(&client, &cluster, recorder, &args, addr, &metrics, &readiness, &shutdown, tenancy.clone()).await?)
        }
        None => None,
    };
    readiness.open("start");

    stop.await.map_err(RunError::Signals)?;
    info!("stopping");
    readiness.close("shutdown", "shutting down");
    shutdown.cancel();
    let deadline = tokio::time::Instant::now() + args.shutdown_timeout;
    if let Some(g) = gateway {
        // axum's graceful shutdown: stop accepting, finish the requests in flight.
        match tokio::time::timeout_at(deadline, g).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the gateway failed"),
            Err(_) => tracing::warn!("the gateway did not finish its requests in time"),
            _ => {}
        }
    }
    if tokio::time::timeout_at(deadline, async { (mirror.await, expiry.await) }).await.is_err() {
        tracing::warn!(timeout = ?args.shutdown_timeout, "the mirror or the expiry controller did not stop in time");
    }
    lease_shutdown.cancel();
    if let Some(task) = election
        && tokio::time::timeout_at(deadline, task).await.is_err()
    {
        tracing::warn!("the Lease was not handed back in time; another replica takes over when it expires");
    }
    admin_shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(2), admin).await {
        Ok(Ok(result)) => result.map_err(RunError::ServeAdmin)?,
        Ok(Err(join)) => tracing::error!(error = %join, "admin server task failed"),
        Err(_) => tracing::warn!("admin server did not stop in time"),
    }
    info!("stopped");
    Ok(())
}

/// Who this replica's events are reported as.
fn reporter_of(args: &RunArgs) -> Reporter {
    Reporter { controller: "statelock".into(), instance: Some(args.pod_name.clone()) }
}

/// How often the leader recounts the fleet gauges from the shared caches.
const FLEET_GAUGES_EVERY: Duration = Duration::from_secs(10);

/// The fleet gauges (locks by holder state, LockSource readiness) from the shared caches, on the
/// leader only; a replica that does not lead reports none.
async fn fleet_gauges(cluster: Arc<Cluster>, metrics: Arc<Metrics>, leadership: Leadership, shutdown: CancellationToken) {
    loop {
        if leadership.is_leader() {
            metrics.set_fleet(crate::metrics::fleet_counts(&cluster.locks.state(), &cluster.sources.state()));
        } else {
            metrics.clear_leader_gauges();
        }
        tokio::select! {
            () = tokio::time::sleep(FLEET_GAUGES_EVERY) => {},
            () = shutdown.cancelled() => return,
        }
    }
}

/// Start the gateway (on the shared caches), then the server.
#[allow(clippy::too_many_arguments)]
async fn start_gateway(
    client: &Client,
    cluster: &Arc<Cluster>,
    recorder: Recorder,
    args: &RunArgs,
    addr: SocketAddr,
    metrics: &Arc<Metrics>,
    readiness: &Readiness,
    shutdown: &CancellationToken,
    tenancy: Arc<crate::tenancy::TenancyPolicy>,
) -> Result<tokio::task::JoinHandle<io::Result<()>>, RunError> {
    readiness.add_gate("gateway", "waiting for the pod and LockSource caches");
    let listener = TcpListener::bind(addr).await.map_err(|source| RunError::BindGateway { addr, source })?;
    info!(%addr, backend = ?args.gateway_backend, "gateway listening");
    let backend = match args.gateway_backend {
        GatewayBackend::Dynamodb => gateway::server::Backend::Forward,
        GatewayBackend::Memory => gateway::server::Backend::Memory(Arc::new(gateway::memory::MemoryTables::default())),
    };
    let config = gateway::effects::EffectsConfig {
        waiter_timeout: args.gateway_waiter_timeout,
        reporter: Some(reporter_of(args)),
        ..Default::default()
    };
    let caches = gateway::caches::Caches::new(cluster);
    let gw = gateway::server::Gateway::with_caches(client.clone(), caches, recorder, backend, metrics.clone(), config, tenancy);
    {
        let (gw, readiness) = (gw.clone(), readiness.clone());
        tokio::spawn(async move {
            gw.synced().await;
            readiness.open("gateway");
        });
    }
    Ok(tokio::spawn(gateway::server::serve(gw, listener, shutdown.clone())))
}

/// Check through discovery (which every authenticated client may read, so no extra RBAC) that
/// both CRDs are served, and name the missing ones otherwise.
pub async fn ensure_crds_installed(client: &Client) -> Result<(), RunError> {
    let api = format!("{}/{}", crd::GROUP, crd::VERSION);
    let served: Vec<String> = match client.list_api_group_resources(&api).await {
        Ok(list) => list.resources.into_iter().map(|r| r.name).collect(),
        Err(kube::Error::Api(status)) if status.is_not_found() => Vec::new(),
        Err(source) => return Err(RunError::DiscoverCrds { api, source }),
    };
    let missing: Vec<String> = crd::all()
        .into_iter()
        .filter(|def| !served.contains(&def.spec.names.plural))
        .map(|def| def.metadata.name.unwrap_or_default())
        .collect();
    if missing.is_empty() { Ok(()) } else { Err(RunError::CrdsMissing(missing)) }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn wait_for_termination() -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
