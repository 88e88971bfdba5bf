//! Real Terraform processes as lock clients: while an apply holds its lock, `kubectl get
//! statelocks` shows it; when the apply ends, the StateLock is gone.

mod common;

use std::{io::Write, process::Stdio, time::Duration};

use common::{DynamoServer, Operator, Terraform, TestCluster, eventually, http_request, kubectl};
use serde_json::json;

const NS: &str = "terraform";

async fn environment() -> (DynamoServer, TestCluster, Operator) {
    let moto = DynamoServer::moto();
    moto.create_lock_table("tf-locks").await;
    assert_eq!(http_request("PUT", &format!("{}/tfstate", moto.url()), ""), 200, "create the state bucket");
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    cluster.create_lock_source(NS, "tf-locks", json!({"dynamodb": {"tableName": "tf-locks", "region": "us-east-1", "endpoint": moto.url()}, "sync": {"mode": "Scan", "interval": "1s"}})).await;
    let op = Operator::start(&cluster);
    (moto, cluster, op)
}

/// Hold a lock with an apply waiting at its approval prompt, check what kubectl shows, then
/// answer "no" so that Terraform releases the lock itself.
async fn apply_shows_then_clears(tf: &Terraform, moto: &DynamoServer, cluster: &TestCluster, key: &str, workspace: Option<&str>) {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("main.tf"),
        format!(
            "{}\nvariable \"v\" {{\n  default = \"a\"\n}}\noutput \"v\" {{\n  value = var.v\n}}\n",
            tf.backend(&moto.url(), key, "tf-locks")
        ),
    )
    .expect("main.tf");
    let init = tf.command(dir.path(), "atlantis-0", &["init", "-input=false", "-no-color"]).output().expect("terraform init");
    assert!(
        init.status.success(),
        "init ({}): {}{}",
        tf.version,
        String::from_utf8_lossy(&init.stdout),
        String::from_utf8_lossy(&init.stderr)
    );
    if let Some(ws) = workspace {
        let out = tf.command(dir.path(), "atlantis-0", &["workspace", "new", "-no-color", ws]).output().expect("workspace new");
        assert!(out.status.success(), "workspace new: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut apply = tf
        .command(dir.path(), "atlantis-0", &["apply", "-no-color", "-var", "v=changed"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("terraform apply");
    let lock_id = match workspace {
        Some(ws) => format!("tfstate/env:/{ws}/{key}"),
        None => format!("tfstate/{key}"),
    };
    let row = eventually(Duration::from_secs(60), "kubectl to show the held lock", || {
        let out = kubectl(cluster, &["get", "statelocks", "-n", NS]);
        let lock_id = lock_id.clone();
        async move { out.lines().find(|l| l.contains(&lock_id)).map(str::to_owned) }
    })
    .await;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], lock_id, "PATH column: {row}");
    assert_eq!(cells[2], "apply", "OPERATION column: {row}");
    assert_eq!(cells[3], "root@atlantis-0", "HOLDER column: {row}");
    let age = cells.last().copied().unwrap_or_default();
    assert!(
        age.ends_with('s') && age.trim_end_matches('s').parse::<u32>().is_ok_and(|n| n < 120),
        "AGE column from Created (seconds old): {row}"
    );
    let wide = kubectl(cluster, &["get", "statelocks", "-n", NS, "-o", "wide"]);
    assert!(wide.lines().next().is_some_and(|h| h.contains("LOCK-ID") && h.contains("SOURCE")), "{wide}");
    let version = kubectl(cluster, &["get", "statelocks", "-n", NS, "-o", "jsonpath={.items[0].spec.lockInfo.version}"]);
    assert_eq!(version, tf.version, "the lock was taken by Terraform {}", tf.version);

    // Answer the prompt: Terraform cancels and releases the lock.
    apply.stdin.take().expect("stdin").write_all(b"no\n").expect("answer");
    let out = apply.wait_with_output().expect("apply ends");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Apply cancelled"), "{text}");
    eventually(Duration::from_secs(30), "the StateLock to go away", || {
        let out = kubectl(cluster, &["get", "statelocks", "-n", NS, "-o", "name"]);
        async move { out.trim().is_empty().then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_0_lock_is_shown_while_held_and_gone_after() {
    let tf = Terraform::v1_0();
    let (moto, cluster, op) = environment().await;
    apply_shows_then_clears(&tf, &moto, &cluster, "v103/terraform.tfstate", None).await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_11_plus_lock_in_a_non_default_workspace() {
    let tf = Terraform::modern();
    let (moto, cluster, op) = environment().await;
    apply_shows_then_clears(&tf, &moto, &cluster, "network/terraform.tfstate", None).await;
    apply_shows_then_clears(&tf, &moto, &cluster, "network/terraform.tfstate", Some("dev")).await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_15_lock_is_shown_while_held_and_gone_after() {
    let tf = Terraform::v1_15();
    let (moto, cluster, op) = environment().await;
    apply_shows_then_clears(&tf, &moto, &cluster, "v115/terraform.tfstate", None).await;
    op.stop().await;
}
