//! `statelock run` as a separate process against the Kubernetes API emulator.

mod common;

use std::{process::Stdio, time::Duration};

use common::{TestCluster, eventually, free_port};
use tokio::process::Command;

fn statelock() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_statelock"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn run_exits_non_zero_and_names_the_missing_crds() {
    let cluster = TestCluster::start().await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        statelock().env("KUBECONFIG", &cluster.kubeconfig).args(["run", "--admin-addr", "127.0.0.1:0"]).output(),
    )
    .await
    .expect("statelock run exits by itself")
    .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail without CRDs; stderr:\n{stderr}");
    assert!(stderr.contains("statelocks.statelock.dev"), "names the StateLock CRD:\n{stderr}");
    assert!(stderr.contains("locksources.statelock.dev"), "names the LockSource CRD:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_names_only_the_crd_that_is_missing() {
    let cluster = TestCluster::start().await;
    let crds: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        kube::Api::all(cluster.client());
    let one = <statelock::crd::LockSource as kube::CustomResourceExt>::crd();
    crds.create(&kube::api::PostParams::default(), &one).await.expect("create LockSource CRD");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        statelock().env("KUBECONFIG", &cluster.kubeconfig).args(["run", "--admin-addr", "127.0.0.1:0"]).output(),
    )
    .await
    .expect("exits")
    .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("statelocks.statelock.dev"), "{stderr}");
    assert!(
        !stderr.contains("locksources.statelock.dev,") && !stderr.contains(", locksources.statelock.dev"),
        "the installed CRD is not reported missing:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_fails_clearly_without_any_cluster_configuration() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = statelock().env("HOME", dir.path()).args(["run", "--admin-addr", "127.0.0.1:0"]).output().await.expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Kubernetes client configuration"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_health_endpoints_and_stops_cleanly_on_sigterm() {
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    let port = free_port();
    let mut child = statelock()
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("STATELOCK_ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .env("STATELOCK_LOG_FORMAT", "json")
        .arg("run")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let base = format!("http://127.0.0.1:{port}");
    let ready = eventually(Duration::from_secs(30), "/readyz to answer 200", || {
        let url = format!("{base}/readyz");
        async move { http_get(&url).await.filter(|(code, _)| *code == 200) }
    })
    .await;
    assert_eq!(ready.1.trim(), "ok");
    let live = http_get(&format!("{base}/livez")).await.expect("livez answers");
    assert_eq!(live.0, 200);

    let pid = child.id().expect("pid");
    let kill = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("stops within 30s").expect("wait");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        e.read_to_string(&mut stderr).await.expect("read stderr");
    }
    let lines: Vec<serde_json::Value> = stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!lines.is_empty(), "--log-format json writes JSON lines:\n{stderr}");
    assert!(lines.iter().any(|l| l["message"] == "stopped"), "logs its clean stop:\n{stderr}");
}

/// A tiny HTTP/1.1 GET over a raw socket (the admin server is plain HTTP).
async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}
