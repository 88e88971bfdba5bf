//! Conformance: the official Python `kubernetes` client against the emulator.

mod common;

use common::{Cluster, python};

#[tokio::test(flavor = "multi_thread")]
async fn python_kubernetes_client_pagination_conflicts_patches_and_watch_410() {
    let c = Cluster::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/python_client.py");
    let kubeconfig = c.kubeconfig.clone();
    let url = c.emulator.url();
    let out = tokio::task::spawn_blocking(move || python().arg(script).arg(&kubeconfig).arg(&url).output())
        .await
        .expect("task")
        .expect("python3 with the kubernetes package (bash .ci/install provides it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}");
}
