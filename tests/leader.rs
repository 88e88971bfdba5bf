//! Leader election with two operator processes: only the leader writes; when it is killed the
//! other takes over within the lease duration and no lock is released twice; a graceful stop
//! hands the Lease over at once.

mod common;

use std::time::{Duration, Instant};

use apiserver_emulator::User;
use common::{DynamoServer, Operator, TestCluster, eventually, free_port, metric};
use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use serde_json::json;

const NS: &str = "runners";
const TABLE: &str = "tf-locks";
const LEASE_SECONDS: u64 = 4;

fn start(cluster: &TestCluster, who: &str) -> Operator {
    let admin_port = free_port();
    let mut cmd = common::statelock_command();
    cmd.env("KUBECONFIG", cluster.kubeconfig_for(&format!("{who}-token")))
        .env("STATELOCK_LOG", "info,statelock=debug")
        .env("STATELOCK_LEASE_NAMESPACE", "statelock-system")
        .env("STATELOCK_LEASE_DURATION", format!("{LEASE_SECONDS}s"))
        .args(["run", "--admin-addr", &format!("127.0.0.1:{admin_port}"), "--pod-name", who]);
    let log = cluster.dir.path().join(format!("{who}-{admin_port}.log"));
    Operator::spawn(cmd, admin_port, &log)
}

fn leads(op: &Operator) -> Option<bool> {
    let addr = format!("127.0.0.1:{}", op.admin_port);
    std::net::TcpStream::connect(&addr).ok()?;
    let (status, body) = common::http_fetch("GET", &format!("http://{addr}/metrics"), "");
    (status == 200).then(|| metric(&body, "statelock_leader") == Some(1.0))
}

/// Writes (anything but get, list and watch) by `user` to statelock's own resources.
fn writes_by(cluster: &TestCluster, user: &str) -> Vec<String> {
    cluster
        .emulator
        .audit()
        .into_iter()
        .filter(|r| r.user == user && r.allowed && !matches!(r.verb.as_str(), "get" | "list" | "watch"))
        .filter(|r| r.group == "statelock.dev" || (r.group.is_empty() && r.resource == "pods"))
        .map(|r| format!("{} {}/{} {}", r.verb, r.resource, r.subresource, r.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_follower_takes_over_within_the_lease_duration_and_never_writes_while_following() {
    let cluster = TestCluster::start_rbac(&[
        ("operator-a-token", User::admin("operator-a")),
        ("operator-b-token", User::admin("operator-b")),
        ("operator-c-token", User::admin("operator-c")),
    ])
    .await;
    cluster.install_crds().await;
    for ns in [NS, "statelock-system"] {
        cluster.create_namespace(ns).await;
    }
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    cluster
        .create_lock_source(
            NS,
            "tf-locks",
            json!({
                "dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url()},
                "sync": {"mode": "Scan", "interval": "1s"},
                "holders": {"namespaces": [NS], "hostnamePattern": "runner-[0-9]+"},
                "expiry": {"mode": "Release", "gracePeriod": "0s"}
            }),
        )
        .await;
    let a = start(&cluster, "operator-a");
    eventually(Duration::from_secs(30), "A to lead", || {
        let l = leads(&a);
        async move { (l == Some(true)).then_some(()) }
    })
    .await;
    let b = start(&cluster, "operator-b");
    eventually(Duration::from_secs(30), "B to be ready as a follower", || {
        let ok = b.ready() && leads(&b) == Some(false);
        async move { ok.then_some(()) }
    })
    .await;

    // A live holder: the leader mirrors the lock and judges it.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    cluster.running_pod(NS, "runner-1").await;
    let lock_id = "tfstate/app/terraform.tfstate";
    common::take_lock(&db, TABLE, lock_id, "1edde332-0dcf-0332-cbb0-ed1b3daf868d", "root@runner-1").await;
    common::wait_holder_alive(&cluster, NS, lock_id, "the lock mirrored and judged alive by the leader").await;
    // An absence cannot be waited for: give the follower a window in which it could have written.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!writes_by(&cluster, "operator-a").is_empty(), "the leader wrote");
    assert_eq!(writes_by(&cluster, "operator-b"), Vec::<String>::new(), "the follower wrote nothing");

    // The leader dies without a word; the follower takes over once the Lease has expired.
    a.kill().await;
    let killed = Instant::now();
    eventually(Duration::from_secs(LEASE_SECONDS * 3), "B to lead", || {
        let l = leads(&b);
        async move { (l == Some(true)).then_some(()) }
    })
    .await;
    let took = killed.elapsed();
    println!("failover after SIGKILL of the leader: {took:?} (lease {LEASE_SECONDS} s)");
    // Within the lease duration plus one retry period (of lease/7) and the polling here.
    assert!(took <= Duration::from_secs(LEASE_SECONDS) + Duration::from_millis(1500), "took over after {took:?}");

    // The new leader releases the dead holder's lock, once.
    pods.delete("runner-1", &DeleteParams::default()).await.expect("delete pod");
    eventually(Duration::from_secs(30), "the lock released by B", || async {
        (!common::lock_item_exists(&db, TABLE, lock_id).await).then_some(())
    })
    .await;
    // A window in which a second release would show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events: Vec<Event> = Api::<Event>::namespaced(cluster.client(), NS).list(&ListParams::default()).await.expect("events").items;
    let expired: Vec<&Event> = events.iter().filter(|e| e.reason.as_deref() == Some("LockExpired")).collect();
    assert_eq!(expired.len(), 1, "released exactly once");
    assert!(expired[0].series.is_none(), "one release, not a series");
    assert!(!events.iter().any(|e| e.reason.as_deref() == Some("ReleaseSkipped")));

    // A graceful stop hands the Lease over at once: C follows, B stops, C leads well before
    // the Lease would have expired.
    let c = start(&cluster, "operator-c");
    eventually(Duration::from_secs(30), "C to follow", || {
        let ok = c.ready() && leads(&c) == Some(false);
        async move { ok.then_some(()) }
    })
    .await;
    let stopping = Instant::now();
    b.stop().await;
    eventually(Duration::from_secs(LEASE_SECONDS * 3), "C to lead", || {
        let l = leads(&c);
        async move { (l == Some(true)).then_some(()) }
    })
    .await;
    println!("hand-over after SIGTERM: {:?}", stopping.elapsed());
    let lease: k8s_openapi::api::coordination::v1::Lease =
        Api::namespaced(cluster.client(), "statelock-system").get("statelock").await.expect("lease");
    assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some("operator-c"));
    c.stop().await;
}
