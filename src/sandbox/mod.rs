//! `statelock sandbox`: everything on one machine, in one process. The Kubernetes API emulator
//! (with the CRDs installed), an in-memory S3 for Terraform's state, and the operator with its
//! gateway on the in-memory lock tables, plus a LockSource that points at them. It writes a
//! kubeconfig, an environment file and a backend block into a directory, prints what to run next,
//! and stops cleanly on Ctrl-C. `--demo` plays a short story with real Terraform processes.
//!
//! The mirror reads the in-memory tables through the gateway itself (the gateway serves Scan and
//! DescribeTable for in-memory tables only), so the operator runs exactly as in a cluster.

pub mod demo;
pub mod s3;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use apiserver_emulator::{Config as EmulatorConfig, Emulator};
use k8s_openapi::{api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::{GatewayBackend, RunArgs, SandboxArgs};

/// The namespace the sandbox's runners and LockSource live in.
pub const NAMESPACE: &str = "terraform";
/// The sandbox's lock table and state bucket.
pub const TABLE: &str = "tf-locks";
pub const BUCKET: &str = "tfstate";

/// Why the sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("failed to create {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("failed to write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("failed to start the Kubernetes API emulator: {0}")]
    Emulator(std::io::Error),
    #[error("failed to bind a local port: {0}")]
    Bind(std::io::Error),
    #[error("failed to set up the sandbox cluster: {0}")]
    Setup(#[from] kube::Error),
    #[error("failed to build the Kubernetes client: {0}")]
    Client(String),
    #[error(transparent)]
    Operator(#[from] crate::app::RunError),
    #[error("the demo failed: {0}")]
    Demo(String),
}

/// Where everything listens, and the files written for the user.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub env_file: PathBuf,
    pub backend_file: PathBuf,
    pub s3: String,
    pub gateway: String,
    pub admin: SocketAddr,
}

fn free_port() -> Result<u16, SandboxError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(SandboxError::Bind)?;
    Ok(l.local_addr().map_err(SandboxError::Bind)?.port())
}

fn write(path: &Path, text: &str) -> Result<(), SandboxError> {
    std::fs::write(path, text).map_err(|source| SandboxError::Write { path: path.to_owned(), source })
}

/// The backend block for a Terraform version (`None`: unknown, the 1.11+ form).
pub fn backend_block(version: Option<(u32, u32)>, s3: &str, gateway: &str, key: &str) -> String {
    let legacy = version.is_some_and(|(major, minor)| major == 1 && minor < 11);
    if legacy {
        format!(
            "terraform {{\n  backend \"s3\" {{\n    bucket                      = \"{BUCKET}\"\n    key                         = \"{key}\"\n    region                      = \"us-east-1\"\n    dynamodb_table              = \"{TABLE}\"\n    access_key                  = \"sandbox\"\n    secret_key                  = \"sandbox\"\n    endpoint                    = \"{s3}\"\n    dynamodb_endpoint           = \"{gateway}\"\n    force_path_style            = true\n    skip_credentials_validation = true\n    skip_metadata_api_check     = true\n  }}\n}}\n"
        )
    } else {
        // Terraform 1.11+: S3 lock files, the way Terraform recommends (no DynamoDB table, so no
        // deprecation warning; the gateway, which speaks DynamoDB, is not involved).
        let _ = gateway;
        format!(
            "terraform {{\n  backend \"s3\" {{\n    bucket                      = \"{BUCKET}\"\n    key                         = \"{key}\"\n    region                      = \"us-east-1\"\n    use_lockfile                = true\n    access_key                  = \"sandbox\"\n    secret_key                  = \"sandbox\"\n    endpoints = {{\n      s3 = \"{s3}\"\n    }}\n    use_path_style              = true\n    skip_credentials_validation = true\n    skip_requesting_account_id  = true\n    skip_metadata_api_check     = true\n  }}\n}}\n"
        )
    }
}

/// `terraform version`'s major and minor, if a Terraform runs.
pub fn terraform_version(terraform: &Path) -> Option<(u32, u32)> {
    let out = std::process::Command::new(terraform).arg("version").env("CHECKPOINT_DISABLE", "1").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.lines().next()?.strip_prefix("Terraform v")?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

async fn install(client: &Client, endpoints: &Endpoints) -> Result<(), SandboxError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::crd::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &PatchParams::apply("statelock-sandbox").force(), &Patch::Apply(&crd)).await?;
    }
    let pp = PatchParams::apply("statelock-sandbox").force();
    Api::<Namespace>::all(client.clone())
        .patch(NAMESPACE, &pp, &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})))
        .await?;
    // Dummy credentials, so that the operator's SDK never goes looking for real ones.
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), NAMESPACE)
        .patch(
            "sandbox-credentials",
            &pp,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sandbox-credentials"},
                "stringData": {"AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox"}})),
        )
        .await?;
    // The CRD must be served before a LockSource can be created.
    let sources: Api<crate::crd::LockSource> = Api::namespaced(client.clone(), NAMESPACE);
    let body = json!({
        "apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource", "metadata": {"name": "sandbox"},
        "spec": {
            "dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": endpoints.gateway, "credentialsSecretRef": {"name": "sandbox-credentials"}},
            "s3": {"bucket": BUCKET, "region": "us-east-1", "endpoint": endpoints.s3, "credentialsSecretRef": {"name": "sandbox-credentials"}},
            "sync": {"mode": "Scan", "interval": "1s"},
            "holders": {"namespaces": [NAMESPACE], "hostnamePattern": "atlantis-[0-9]+"},
            "expiry": {"mode": "Release", "gracePeriod": "0s"},
            "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}
        }
    });
    let mut last = None;
    for _ in 0..50 {
        match sources.patch("sandbox", &pp, &Patch::Apply(&body)).await {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.map_or_else(|| SandboxError::Client("the LockSource could not be created".into()), SandboxError::Setup))
}

fn instructions(e: &Endpoints, terraform: Option<(u32, u32)>) -> String {
    let tf = match terraform {
        Some((a, b)) => format!("for your Terraform {a}.{b}"),
        None => "for Terraform 1.11+ (no terraform found on PATH; see the README for 1.0-1.10)".into(),
    };
    format!(
        "\nstatelock sandbox is running: Kubernetes API emulator, operator, gateway and in-memory S3.\n\n\
         Watch the locks (in another terminal):\n\n  kubectl --kubeconfig {kc} get statelocks -n {NAMESPACE} -o wide -w\n\n\
         Events (contention, holder death, expiry):\n\n  kubectl --kubeconfig {kc} get events -n {NAMESPACE} -w\n\n\
         Point Terraform at it with this backend block ({tf}; also in {backend}):\n\n{block}\n\
         or source the environment instead of editing the block's endpoints: . {env}\n\
         Metrics: http://{admin}/metrics\n\nCtrl-C stops everything.\n",
        kc = e.kubeconfig.display(),
        backend = e.backend_file.display(),
        env = e.env_file.display(),
        admin = e.admin,
        block = backend_block(terraform, &e.s3, &e.gateway, "demo/terraform.tfstate"),
    )
}

/// Start the sandbox; returns when Ctrl-C (or SIGTERM) arrives, or the demo has played.
pub async fn run(args: SandboxArgs) -> Result<(), SandboxError> {
    std::fs::create_dir_all(&args.dir).map_err(|source| SandboxError::Dir { path: args.dir.clone(), source })?;
    let dir = std::fs::canonicalize(&args.dir).map_err(|source| SandboxError::Dir { path: args.dir.clone(), source })?;
    let emulator = Emulator::start("127.0.0.1:0".parse().map_err(|_| SandboxError::Client("address".into()))?, EmulatorConfig::default())
        .await
        .map_err(SandboxError::Emulator)?;
    let shutdown = CancellationToken::new();
    let s3_listener = TcpListener::bind("127.0.0.1:0").await.map_err(SandboxError::Bind)?;
    let s3_addr = s3_listener.local_addr().map_err(SandboxError::Bind)?;
    let s3_task = tokio::spawn(s3::MemoryS3::default().serve(s3_listener, shutdown.clone()));
    let gateway_port = free_port()?;
    let endpoints = Endpoints {
        kubeconfig: dir.join("kubeconfig"),
        env_file: dir.join("env.sh"),
        backend_file: dir.join("backend.tf"),
        s3: format!("http://{s3_addr}"),
        gateway: format!("http://127.0.0.1:{gateway_port}"),
        admin: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        dir: dir.clone(),
    };
    emulator
        .write_kubeconfig(&endpoints.kubeconfig, None)
        .map_err(|source| SandboxError::Write { path: endpoints.kubeconfig.clone(), source })?;
    let mut config = kube::Config::new(emulator.url().parse().map_err(|e| SandboxError::Client(format!("{e}")))?);
    config.default_namespace = NAMESPACE.into();
    let client = Client::try_from(config).map_err(|e| SandboxError::Client(e.to_string()))?;
    install(&client, &endpoints).await?;

    let version = terraform_version(&args.terraform);
    write(&endpoints.backend_file, &backend_block(version, &endpoints.s3, &endpoints.gateway, "demo/terraform.tfstate"))?;
    write(
        &endpoints.env_file,
        &format!(
            "# statelock sandbox: source this file (. {env}) to point kubectl and Terraform at the sandbox.\n\
             export KUBECONFIG={kc}\nexport AWS_ACCESS_KEY_ID=sandbox\nexport AWS_SECRET_ACCESS_KEY=sandbox\nexport AWS_REGION=us-east-1\n\
             # Terraform 1.11+\nexport AWS_ENDPOINT_URL_S3={s3}\nexport AWS_ENDPOINT_URL_DYNAMODB={gw}\n\
             # Terraform 1.0 - 1.10\nexport AWS_S3_ENDPOINT={s3}\nexport AWS_DYNAMODB_ENDPOINT={gw}\n",
            env = endpoints.env_file.display(),
            kc = endpoints.kubeconfig.display(),
            s3 = endpoints.s3,
            gw = endpoints.gateway,
        ),
    )?;

    let run_args = RunArgs {
        admin_addr: endpoints.admin,
        gateway_addr: Some(SocketAddr::from(([127, 0, 0, 1], gateway_port))),
        gateway_backend: GatewayBackend::Memory,
        gateway_waiter_timeout: Duration::from_secs(40),
        pod_name: "statelock-sandbox".into(),
        shutdown_timeout: Duration::from_secs(5),
        leader_election: false,
        lease_name: "statelock".into(),
        lease_namespace: None,
        lease_duration: Duration::from_secs(15),
        // The sandbox's LockSource reads its in-memory tables through the sandbox's own gateway,
        // and its lock files from the in-memory S3, with the sandbox's dummy identity.
        aws_identity_namespaces: vec![NAMESPACE.into()],
        allowed_endpoints: vec![format!("http://127.0.0.1:{gateway_port}"), endpoints.s3.clone()],
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let demo = if args.demo {
        let d = demo::Demo { client: client.clone(), endpoints: endpoints.clone(), terraform: args.terraform.clone(), version };
        Some(tokio::spawn(async move {
            let result = d.play().await;
            let _ = stop_tx.send(());
            result
        }))
    } else {
        print!("{}", instructions(&endpoints, version));
        drop(stop_tx);
        None
    };
    let demo_mode = args.demo;
    let stop = async move {
        tokio::select! {
            r = crate::app::wait_for_termination() => r,
            _ = stop_rx, if demo_mode => Ok(()),
        }
    };
    let operator = crate::app::run_with(client, run_args, stop).await;
    shutdown.cancel();
    let _ = s3_task.await;
    // The emulator goes with the runtime, after the last watch of the operator's caches has
    // stopped with it; stopping it first would only make those watches log reconnect errors.
    drop(emulator);
    operator?;
    match demo {
        Some(task) => match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SandboxError::Demo(e)),
            Err(e) => Err(SandboxError::Demo(e.to_string())),
        },
        None => Ok(()),
    }
}
