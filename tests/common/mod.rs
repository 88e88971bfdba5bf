//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::{path::PathBuf, process::Command};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command for a Python tool installed by `.ci/run` into the repository's `.venv`, falling back
/// to `PATH` (so a developer's own install works too).
pub fn python_tool(name: &str) -> Command {
    let venv = repo_root().join(".venv/bin").join(name);
    if venv.exists() { Command::new(venv) } else { Command::new(name) }
}

use std::time::{Duration, Instant};

use apiserver_emulator::{Config, Emulator};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

/// An emulator on a free loopback port, with a kubeconfig file for child processes.
pub struct TestCluster {
    pub emulator: Emulator,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl TestCluster {
    pub async fn start() -> Self {
        Self::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let emulator = Emulator::start("127.0.0.1:0".parse().expect("addr"), config).await.expect("emulator starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        emulator.write_kubeconfig(&kubeconfig, None).expect("write kubeconfig");
        Self { emulator, dir, kubeconfig }
    }

    /// A kube client for the emulator, with retries off so that faults surface.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.emulator.url().parse().expect("url"));
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("client")
    }

    /// Install statelock's CRDs the way a user would (server-side apply).
    pub async fn install_crds(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client());
        for crd in statelock::crd::all() {
            let name = crd.metadata.name.clone().expect("name");
            crds.patch(&name, &PatchParams::apply("test-setup").force(), &Patch::Apply(&crd)).await.expect("apply CRD");
        }
    }
}

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}
