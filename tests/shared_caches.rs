//! One replica, one watch per kind: the mirror, the expiry controller and the gateway read the
//! same LockSource, StateLock and Pod caches, and pods are watched only in the namespaces the
//! LockSources name (every namespace only while one asks for it). Checked through the emulator's
//! audit log of the operator's own requests.

mod common;

use std::{collections::BTreeSet, time::Duration};

use apiserver_emulator::User;
use common::{DynamoServer, Operator, TestCluster, eventually, free_port, statelock_command};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use statelock::crd::LockSource;

const OPERATOR: &str = "system:serviceaccount:statelock:statelock";
const TABLE: &str = "tf-locks";

/// (verb, resource, namespace) of every request the operator made so far.
fn requests(cluster: &TestCluster) -> Vec<(String, String, String)> {
    cluster.emulator.audit().into_iter().filter(|r| r.user == OPERATOR).map(|r| (r.verb, r.resource, r.namespace)).collect()
}

fn count(reqs: &[(String, String, String)], verb: &str, resource: &str) -> usize {
    reqs.iter().filter(|(v, r, _)| v == verb && r == resource).count()
}

/// The namespaces the operator's pod lists and watches named ("" is every namespace).
fn pod_watch_namespaces(reqs: &[(String, String, String)]) -> BTreeSet<String> {
    reqs.iter().filter(|(v, r, _)| (v == "watch" || v == "list") && r == "pods").map(|(_, _, ns)| ns.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_watch_per_kind_and_pods_only_where_lock_sources_look() {
    let cluster = TestCluster::start_rbac(&[("operator", User::admin(OPERATOR))]).await;
    cluster.install_crds().await;
    for ns in ["team-a", "runners", "elsewhere"] {
        cluster.create_namespace(ns).await;
    }
    for (ns, pod) in [("runners", "runner-0"), ("elsewhere", "web-0"), ("team-a", "app-0")] {
        cluster.running_pod(ns, pod).await;
    }
    let db = DynamoServer::moto();
    db.create_lock_table(TABLE).await;
    let spec = |holders: serde_json::Value| json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": db.url()}, "holders": {"namespaces": holders}, "sync": {"mode": "Scan", "interval": "2s"}});
    cluster.create_lock_source("team-a", "locks", spec(json!(["runners"]))).await;

    let admin_port = free_port();
    let mut cmd = statelock_command();
    cmd.env("KUBECONFIG", cluster.kubeconfig_for("operator")).args([
        "run",
        "--admin-addr",
        &format!("127.0.0.1:{admin_port}"),
        "--gateway-addr",
        &format!("127.0.0.1:{}", free_port()),
        "--leader-election=false",
    ]);
    let op = Operator::spawn(cmd, admin_port, &cluster.dir.path().join("operator.log"));
    eventually(Duration::from_secs(60), "the operator to be Ready", || async { op.ready().then_some(()) }).await;

    let reqs = eventually(Duration::from_secs(30), "the watches to start", || async {
        let reqs = requests(&cluster);
        let started =
            count(&reqs, "watch", "locksources") >= 1 && count(&reqs, "watch", "statelocks") >= 1 && count(&reqs, "watch", "pods") >= 2;
        started.then_some(reqs)
    })
    .await;
    // The mirror, the expiry controller and the gateway all run, on one watch per kind.
    for resource in ["locksources", "statelocks"] {
        assert_eq!(count(&reqs, "watch", resource), 1, "one {resource} watch: {reqs:?}");
        assert_eq!(count(&reqs, "list", resource), 1, "one {resource} list: {reqs:?}");
    }
    // Pods: the LockSource's own namespace and its holder namespace, nowhere else.
    assert_eq!(pod_watch_namespaces(&reqs), BTreeSet::from(["runners".to_owned(), "team-a".to_owned()]), "{reqs:?}");
    assert_eq!(count(&reqs, "watch", "pods"), 2, "{reqs:?}");

    // A LockSource whose holders may be anywhere widens the cache to every namespace.
    cluster.create_lock_source("elsewhere", "anywhere", spec(json!(["*"]))).await;
    eventually(Duration::from_secs(30), "a watch of every namespace's pods", || async {
        pod_watch_namespaces(&requests(&cluster)).contains("").then_some(())
    })
    .await;

    // Gone again: back to the named namespaces, with watches of their own.
    Api::<LockSource>::namespaced(cluster.client(), "elsewhere").delete("anywhere", &DeleteParams::default()).await.expect("delete");
    eventually(Duration::from_secs(30), "pod watches in the named namespaces again", || async {
        let reqs = requests(&cluster);
        let watches_in = |ns: &str| reqs.iter().filter(|(v, r, n)| v == "watch" && r == "pods" && n == ns).count();
        (watches_in("runners") >= 2 && watches_in("team-a") >= 2).then_some(())
    })
    .await;
    let reqs = requests(&cluster);
    assert!(!pod_watch_namespaces(&reqs).contains("elsewhere"), "no LockSource names it: {reqs:?}");
    assert_eq!(count(&reqs, "watch", "locksources"), 1, "LockSource changes need no new watch: {reqs:?}");
    op.stop().await;
}

/// Give a pod an address (as the CNI and the kubelet would).
async fn give_address(cluster: &TestCluster, ns: &str, name: &str, ip: &str) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Patch, PatchParams};
    Api::<Pod>::namespaced(cluster.client(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}})))
        .await
        .expect("pod address");
}

/// A pod outside the cache's scope is invisible to it; when it has the address of a pod the cache
/// still shows Running (a dead node's pod, its address handed on), the gateway must not take it
/// for that pod: a direct read of every namespace finds both, and nobody is identified.
#[tokio::test(flavor = "multi_thread")]
async fn an_address_reused_outside_the_scope_identifies_nobody() {
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    for ns in ["team-a", "elsewhere"] {
        cluster.create_namespace(ns).await;
    }
    let db = DynamoServer::moto();
    db.create_lock_table(TABLE).await;
    cluster
        .create_lock_source(
            "team-a",
            "locks",
            json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": db.url()}, "sync": {"mode": "Scan", "interval": "2s"}}),
        )
        .await;
    // The runner of team-a, on a node that died: still Running in the API, its address reused.
    cluster.running_pod("team-a", "runner-0").await;
    give_address(&cluster, "team-a", "runner-0", "127.0.0.1").await;
    cluster.running_pod("elsewhere", "intruder").await;
    give_address(&cluster, "elsewhere", "intruder", "127.0.0.1").await;

    let gateway_port = free_port();
    let op = Operator::start_with_gateway(&cluster, gateway_port);
    eventually(Duration::from_secs(60), "the operator to be Ready", || async { op.ready().then_some(()) }).await;
    let creds =
        statelock::dynamo::StaticCredentials { access_key_id: "AKIAFAKE".into(), secret_access_key: "fake".into(), session_token: None };
    let gw = statelock::dynamo::passthrough_client("us-east-1", Some(&format!("http://127.0.0.1:{gateway_port}")), Some(creds)).await;
    let lock_id = "tfstate/app/terraform.tfstate";
    let info = common::terraform_info("1edde332-0dcf-0332-cbb0-ed1b3daf868d", "root@runner-0", lock_id, "2026-11-30T00:00:00Z");
    let put = || {
        gw.put_item()
            .table_name(TABLE)
            .item("LockID", aws_sdk_dynamodb::types::AttributeValue::S(lock_id.into()))
            .item("Info", aws_sdk_dynamodb::types::AttributeValue::S(info.clone()))
            .condition_expression("attribute_not_exists(LockID)")
            .send()
    };
    let denied = put().await.expect_err("the intruder's call must be refused");
    let code = aws_sdk_dynamodb::error::ProvideErrorMetadata::code(&denied).map(str::to_owned);
    assert_eq!(code.as_deref(), Some("AccessDeniedException"), "{}", aws_sdk_dynamodb::error::DisplayErrorContext(&denied));
    assert!(!common::lock_item_exists(&db.dynamodb().await, TABLE, lock_id).await, "nothing reached the table");

    // The intruder goes: the address is runner-0's alone, and its call is served.
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client(), "elsewhere")
        .delete("intruder", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(Duration::from_secs(30), "runner-0's call to be served", || async { put().await.ok() }).await;
    assert!(common::lock_item_exists(&db.dynamodb().await, TABLE, lock_id).await);
    op.stop().await;
}
