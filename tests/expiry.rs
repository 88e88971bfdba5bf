//! Expiry end to end: moto, the API emulator (no kubelet: the tests set pod status), and
//! `statelock run` as a process. Each evidence rule releases the lock; nothing else does.

mod common;

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use common::{DynamoServer, Operator, Terraform, TestCluster, eventually, http_request, put_item, terraform_info};
use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use statelock::crd::{HolderState, StateLock, state_lock_name};

const NS: &str = "terraform";
const RUNNERS: &str = "atlantis";
const TABLE: &str = "tf-locks";
const LOCK: &str = "tfstate/app/terraform.tfstate";

struct Env {
    moto: DynamoServer,
    cluster: TestCluster,
    op: Operator,
    db: aws_sdk_dynamodb::Client,
}

async fn env(mode: &str) -> Env {
    env_with_grace(mode, "0s").await
}

async fn env_with_grace(mode: &str, grace: &str) -> Env {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    for ns in [NS, RUNNERS] {
        cluster.create_namespace(ns).await;
    }
    cluster
        .create_lock_source(
            NS,
            "prod-locks",
            json!({
                "dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url()},
                "sync": {"mode": "Scan", "interval": "1s"},
                "holders": {"namespaces": [RUNNERS], "hostnamePattern": "atlantis-[0-9]+"},
                "expiry": {"mode": mode, "gracePeriod": grace, "staleAfter": "1h", "skewTolerance": "2s"}
            }),
        )
        .await;
    let op = Operator::start(&cluster);
    Env { moto, cluster, op, db }
}

/// A running runner pod, as a kubelet would report it.
async fn runner_pod(cluster: &TestCluster, name: &str) -> Pod {
    let api: Api<Pod> = Api::namespaced(cluster.client(), RUNNERS);
    let pod: Pod =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "atlantis", "image": "atlantis"}]}}))
            .expect("pod");
    let pod = api.create(&PostParams::default(), &pod).await.expect("create pod");
    set_running(cluster, name, &pod.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default()).await;
    pod
}

async fn set_running(cluster: &TestCluster, name: &str, started: &str) {
    let api: Api<Pod> = Api::namespaced(cluster.client(), RUNNERS);
    let status = json!({"status": {"phase": "Running", "containerStatuses": [{"name": "atlantis", "ready": true, "restartCount": 0, "image": "atlantis", "imageID": "", "state": {"running": {"startedAt": started}}}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.expect("pod status");
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

async fn take_lock(db: &aws_sdk_dynamodb::Client, who: &str) -> String {
    let info = terraform_info("1edde332-0dcf-0332-cbb0-ed1b3daf868d", who, LOCK, &now_rfc3339());
    put_item(db, TABLE, &[("LockID", LOCK), ("Info", &info)]).await;
    info
}

async fn lock_item(db: &aws_sdk_dynamodb::Client) -> Option<String> {
    let r = db.get_item().table_name(TABLE).key("LockID", AttributeValue::S(LOCK.into())).consistent_read(true).send().await.expect("get");
    r.item.and_then(|i| i.get("Info").and_then(|v| v.as_s().ok()).cloned())
}

async fn holder_state(cluster: &TestCluster) -> Option<(HolderState, String)> {
    let l = Api::<StateLock>::namespaced(cluster.client(), NS).get_opt(&state_lock_name(LOCK)).await.expect("get")?;
    l.status.and_then(|s| s.holder).map(|h| (h.state, h.reason))
}

async fn reasons_on_lock(cluster: &TestCluster) -> Vec<String> {
    let name = state_lock_name(LOCK);
    Api::<Event>::namespaced(cluster.client(), NS)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
        .filter_map(|e| e.reason)
        .collect()
}

async fn event_note(cluster: &TestCluster, reason: &str) -> String {
    let name = state_lock_name(LOCK);
    Api::<Event>::namespaced(cluster.client(), NS)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()) && e.reason.as_deref() == Some(reason))
        .and_then(|e| e.note)
        .unwrap_or_default()
}

async fn wait_alive(e: &Env) {
    let got = eventually(Duration::from_secs(30), "the holder judged Alive", || async {
        holder_state(&e.cluster).await.filter(|(s, _)| *s == HolderState::Alive)
    })
    .await;
    assert_eq!(got.1, "PodRunning");
}

async fn wait_released(e: &Env, evidence: &str) {
    eventually(Duration::from_secs(30), "the lock item to be released", || async { lock_item(&e.db).await.is_none().then_some(()) }).await;
    let reasons = eventually(Duration::from_secs(10), "HolderDied and LockExpired events", || async {
        let r = reasons_on_lock(&e.cluster).await;
        (r.iter().any(|x| x == "HolderDied") && r.iter().any(|x| x == "LockExpired")).then_some(r)
    })
    .await;
    assert!(reasons.iter().any(|r| r == "HolderDied"), "{reasons:?} ({evidence})");
}

/// Wait long enough for several reconciles and assert the lock is still held.
async fn assert_never_released(e: &Env, info: &str, expect: HolderState) {
    let state =
        eventually(Duration::from_secs(30), "a verdict", || async { holder_state(&e.cluster).await.filter(|(s, _)| *s == expect) }).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lock_item(&e.db).await.as_deref(), Some(info), "the lock must survive ({state:?})");
    assert!(!reasons_on_lock(&e.cluster).await.iter().any(|r| r == "LockExpired"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_holder_pod_releases_the_lock() {
    let e = env("Release").await;
    runner_pod(&e.cluster, "atlantis-0").await;
    take_lock(&e.db, "root@atlantis-0").await;
    wait_alive(&e).await;
    Api::<Pod>::namespaced(e.cluster.client(), RUNNERS).delete("atlantis-0", &DeleteParams::default()).await.expect("delete pod");
    wait_released(&e, "PodNotFound").await;
    e.op.stop().await;
    drop(e.moto);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_completed_holder_pod_releases_the_lock() {
    let e = env("Release").await;
    runner_pod(&e.cluster, "atlantis-0").await;
    take_lock(&e.db, "root@atlantis-0").await;
    wait_alive(&e).await;
    Api::<Pod>::namespaced(e.cluster.client(), RUNNERS)
        .patch_status("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Failed"}})))
        .await
        .expect("pod failed");
    wait_released(&e, "PodCompleted").await;
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_holder_container_releases_the_lock() {
    let e = env("Release").await;
    runner_pod(&e.cluster, "atlantis-0").await;
    take_lock(&e.db, "root@atlantis-0").await;
    wait_alive(&e).await;
    let later =
        k8s_openapi::jiff::Timestamp::now().checked_add(k8s_openapi::jiff::SignedDuration::from_secs(10)).expect("time").to_string();
    set_running(&e.cluster, "atlantis-0", &later).await;
    wait_released(&e, "ContainerRestarted").await;
    e.op.stop().await;
}

/// A pod created after the lock (a StatefulSet's new atlantis-0 while statelock never saw the old
/// one, or anyone's pod with that name) was never the holder and is no evidence about the lock:
/// the lock stays. Once no pod yields the runner hostname at all, the runner is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_created_after_the_lock_is_never_its_holder_and_never_evidence() {
    let e = env("Release").await;
    let info = terraform_info("old-run", "root@atlantis-0", LOCK, "2020-01-01T00:00:00Z");
    put_item(&e.db, TABLE, &[("LockID", LOCK), ("Info", &info)]).await;
    runner_pod(&e.cluster, "atlantis-0").await;
    let state = eventually(Duration::from_secs(30), "HolderNotEstablished", || async {
        holder_state(&e.cluster).await.filter(|(_, r)| r == "HolderNotEstablished")
    })
    .await;
    assert_eq!(state.0, HolderState::Unknown);
    assert_never_released(&e, &info, HolderState::Unknown).await;
    // The fix still releases what it should: with no pod of that hostname left, the runner is gone.
    Api::<Pod>::namespaced(e.cluster.client(), RUNNERS).delete("atlantis-0", &DeleteParams::default()).await.expect("delete pod");
    wait_released(&e, "RunnerGone").await;
    assert!(event_note(&e.cluster, "LockExpired").await.contains("the runner is gone"));
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_holder_is_never_released_even_with_two_operators_nor_when_unknown_or_terminating() {
    let e = env("Release").await;
    // A second operator process at the same time (no leader election yet): neither may release.
    let op2 = Operator::start(&e.cluster);
    runner_pod(&e.cluster, "atlantis-0").await;
    let info = take_lock(&e.db, "root@atlantis-0").await;
    wait_alive(&e).await;
    assert_never_released(&e, &info, HolderState::Alive).await;
    let pods: Api<Pod> = Api::namespaced(e.cluster.client(), RUNNERS);
    // Phase Unknown (node unreachable): not evidence.
    pods.patch_status("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Unknown"}})))
        .await
        .expect("unknown");
    eventually(Duration::from_secs(20), "PodPhaseUnknown", || async {
        holder_state(&e.cluster).await.filter(|(_, r)| r == "PodPhaseUnknown")
    })
    .await;
    assert_never_released(&e, &info, HolderState::Unknown).await;
    // Terminating (a finalizer keeps it): Terraform may still be releasing; not evidence.
    pods.patch_status("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running"}})))
        .await
        .expect("running");
    pods.patch("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold"]}})))
        .await
        .expect("finalizer");
    pods.delete("atlantis-0", &DeleteParams::default()).await.expect("delete");
    eventually(Duration::from_secs(20), "PodTerminating", || async {
        holder_state(&e.cluster).await.filter(|(_, r)| r == "PodTerminating")
    })
    .await;
    assert_never_released(&e, &info, HolderState::Alive).await;
    e.op.stop().await;
    op2.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn external_holders_and_observe_mode_never_release() {
    let e = env("Release").await;
    let info = take_lock(&e.db, "jane@janes-laptop").await;
    assert_never_released(&e, &info, HolderState::External).await;
    e.op.stop().await;

    let o = env("Observe").await;
    runner_pod(&o.cluster, "atlantis-0").await;
    let info = take_lock(&o.db, "root@atlantis-0").await;
    wait_alive(&o).await;
    Api::<Pod>::namespaced(o.cluster.client(), RUNNERS).delete("atlantis-0", &DeleteParams::default()).await.expect("delete pod");
    let dead = eventually(Duration::from_secs(30), "Dead in Observe mode", || async {
        holder_state(&o.cluster).await.filter(|(s, _)| *s == HolderState::Dead)
    })
    .await;
    assert_eq!(dead.1, "PodNotFound");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lock_item(&o.db).await.as_deref(), Some(info.as_str()), "Observe never deletes");
    assert!(reasons_on_lock(&o.cluster).await.iter().any(|r| r == "HolderDied"));
    let lock = Api::<StateLock>::namespaced(o.cluster.client(), NS).get(&state_lock_name(LOCK)).await.expect("lock");
    let status = lock.status.expect("status");
    assert_eq!(status.phase, Some(statelock::crd::LockPhase::HolderDead));
    assert!(status.holder.and_then(|h| h.evidence).is_some_and(|ev| ev.reason == "PodNotFound"));
    o.op.stop().await;
}

/// How the holder pod of a killed Terraform is shown to be dead.
#[derive(Clone, Copy, Debug)]
enum Death {
    PodDeleted,
    PodFailed,
    ContainerRestarted,
    PodReplaced,
}

async fn terraform_sigkill_then(death: Death) {
    use std::{os::unix::process::CommandExt, process::Stdio};
    // Replacing a pod passes through a moment with no pod of that name: a grace period keeps that
    // brief PodNotFound from deciding, so the release rests on PodReplaced.
    let e = env_with_grace("Release", if matches!(death, Death::PodReplaced) { "3s" } else { "0s" }).await;
    assert_eq!(http_request("PUT", &format!("{}/tfstate", e.moto.url()), ""), 200, "state bucket");
    runner_pod(&e.cluster, "atlantis-0").await;
    runner_pod(&e.cluster, "atlantis-1").await;
    let tf = Terraform::modern();
    let workdir = |name: &str| {
        let dir = e.cluster.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("main.tf"),
            format!(
                "{}\nvariable \"v\" {{\n  default = \"a\"\n}}\noutput \"v\" {{\n  value = var.v\n}}\n",
                tf.backend(&e.moto.url(), "app/terraform.tfstate", TABLE)
            ),
        )
        .expect("main.tf");
        dir
    };
    let (dir_a, dir_b) = (workdir("runner-a"), workdir("runner-b"));
    for (dir, host) in [(&dir_a, "atlantis-0"), (&dir_b, "atlantis-1")] {
        let init = tf.command(dir, host, &["init", "-input=false", "-no-color"]).output().expect("init");
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    }
    // Runner A (pod atlantis-0) holds the lock at its approval prompt, then dies hard.
    let mut a = tf
        .command(&dir_a, "atlantis-0", &["apply", "-no-color", "-var", "v=a2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("apply A");
    eventually(Duration::from_secs(60), "A's lock judged Alive", || async {
        holder_state(&e.cluster).await.filter(|(s, _)| *s == HolderState::Alive)
    })
    .await;
    let held = lock_item(&e.db).await.expect("A holds the lock");
    assert!(held.contains("root@atlantis-0"), "{held}");
    let pgid = a.id();
    assert!(std::process::Command::new("kill").args(["-9", "--", &format!("-{pgid}")]).status().expect("kill").success());
    let _ = a.wait();
    // The process is gone but its pod is not: statelock cannot know, and must not release.
    let blocked = tf.command(&dir_b, "atlantis-1", &["apply", "-no-color", "-auto-approve", "-var", "v=b"]).output().expect("apply B");
    assert!(!blocked.status.success(), "B must be blocked while A's lock stands");
    assert_eq!(lock_item(&e.db).await.as_deref(), Some(held.as_str()), "a stale lock whose pod lives is kept");
    assert_eq!(holder_state(&e.cluster).await.map(|h| h.0), Some(HolderState::Alive));

    // Time-based evidence needs the lock to be older than the skew tolerance (2 s).
    let created: serde_json::Value = serde_json::from_str(&held).expect("Info");
    let created = created["Created"].as_str().and_then(|c| c.parse::<k8s_openapi::jiff::Timestamp>().ok()).expect("Created");
    let past_skew = || k8s_openapi::jiff::Timestamp::now().duration_since(created).as_secs() >= 3;
    let pods: Api<Pod> = Api::namespaced(e.cluster.client(), RUNNERS);
    match death {
        Death::PodDeleted => pods.delete("atlantis-0", &DeleteParams::default()).await.map(|_| ()).expect("delete pod"),
        Death::PodFailed => pods
            .patch_status("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Failed"}})))
            .await
            .map(|_| ())
            .expect("fail pod"),
        Death::ContainerRestarted => {
            eventually(Duration::from_secs(10), "the lock to be older than the skew tolerance", || async { past_skew().then_some(()) })
                .await;
            set_running(&e.cluster, "atlantis-0", &now_rfc3339()).await;
        }
        Death::PodReplaced => {
            // A finalizer keeps the old pod Terminating (not evidence) until the new one exists.
            pods.patch("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold"]}})))
                .await
                .expect("finalizer");
            pods.delete("atlantis-0", &DeleteParams::default()).await.expect("delete");
            eventually(Duration::from_secs(10), "the lock to be older than the skew tolerance", || async { past_skew().then_some(()) })
                .await;
            pods.patch("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
                .await
                .expect("let it go");
            runner_pod(&e.cluster, "atlantis-0").await;
        }
    }
    wait_released(&e, &format!("{death:?}")).await;
    let expected = match death {
        Death::PodDeleted => "no longer exists",
        Death::PodFailed => "has phase Failed",
        Death::ContainerRestarted => "started",
        Death::PodReplaced => "now belongs to UID",
    };
    let note = event_note(&e.cluster, "LockExpired").await;
    assert!(note.contains(expected), "{death:?}: the release rests on that evidence: {note}");
    // B proceeds, with locking on.
    let ok = tf.command(&dir_b, "atlantis-1", &["apply", "-no-color", "-auto-approve", "-var", "v=b"]).output().expect("apply B");
    assert!(ok.status.success(), "B applies once the dead holder's lock is released ({death:?}): {}", String::from_utf8_lossy(&ok.stderr));
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_killed_with_sigkill_is_released_when_its_pod_is_deleted() {
    terraform_sigkill_then(Death::PodDeleted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_killed_with_sigkill_is_released_when_its_pod_failed() {
    terraform_sigkill_then(Death::PodFailed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_killed_with_sigkill_is_released_when_its_container_restarted() {
    terraform_sigkill_then(Death::ContainerRestarted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_killed_with_sigkill_is_released_when_its_pod_was_replaced() {
    terraform_sigkill_then(Death::PodReplaced).await;
}

async fn annotate(cluster: &TestCluster, annotations: serde_json::Value) {
    Api::<StateLock>::namespaced(cluster.client(), NS)
        .patch(&state_lock_name(LOCK), &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": annotations}})))
        .await
        .expect("annotate");
}

async fn wait_event(cluster: &TestCluster, reason: &str) {
    eventually(Duration::from_secs(20), reason, || async { reasons_on_lock(cluster).await.iter().any(|r| r == reason).then_some(()) })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_unlock_checks_the_id_and_refuses_a_live_holder_unless_told() {
    let e = env("Observe").await;
    runner_pod(&e.cluster, "atlantis-0").await;
    let info = take_lock(&e.db, "root@atlantis-0").await;
    wait_alive(&e).await;
    let id = "1edde332-0dcf-0332-cbb0-ed1b3daf868d";

    annotate(&e.cluster, json!({"statelock.dev/force-unlock": "00000000-0000-0000-0000-000000000000"})).await;
    wait_event(&e.cluster, "UnlockIdMismatch").await;
    assert_eq!(lock_item(&e.db).await.as_deref(), Some(info.as_str()), "a wrong ID releases nothing");
    let lock = Api::<StateLock>::namespaced(e.cluster.client(), NS).get(&state_lock_name(LOCK)).await.expect("lock");
    assert!(!lock.annotations().contains_key("statelock.dev/force-unlock"), "the request is consumed");

    annotate(&e.cluster, json!({"statelock.dev/force-unlock": id})).await;
    wait_event(&e.cluster, "UnlockRefused").await;
    assert_eq!(lock_item(&e.db).await.as_deref(), Some(info.as_str()), "a live holder is not released without the override");

    annotate(&e.cluster, json!({"statelock.dev/force-unlock": id, "statelock.dev/force-unlock-live": id})).await;
    wait_event(&e.cluster, "ForceUnlocked").await;
    assert_eq!(lock_item(&e.db).await, None, "released through the conditional delete (even in Observe mode: a person asked)");
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_unlock_of_an_external_holder_needs_only_the_right_id() {
    let e = env("Release").await;
    take_lock(&e.db, "jane@janes-laptop").await;
    eventually(Duration::from_secs(30), "External", || async {
        holder_state(&e.cluster).await.filter(|(s, _)| *s == HolderState::External)
    })
    .await;
    annotate(&e.cluster, json!({"statelock.dev/force-unlock": "1edde332-0dcf-0332-cbb0-ed1b3daf868d"})).await;
    wait_event(&e.cluster, "ForceUnlocked").await;
    assert_eq!(lock_item(&e.db).await, None);
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_holder_pods_deleted_at_once_all_release_their_locks() {
    // Guards the cache/trigger ordering: a reconcile triggered by a pod deletion must see that
    // deletion in the pod cache (one watch feeds both), or a lock stays judged Alive.
    let e = env("Release").await;
    const N: usize = 25;
    for i in 0..N {
        runner_pod(&e.cluster, &format!("atlantis-{i}")).await;
    }
    for i in 0..N {
        let id = format!("tfstate/many{i}/terraform.tfstate");
        put_item(
            &e.db,
            TABLE,
            &[("LockID", &id), ("Info", &terraform_info(&format!("m-{i}"), &format!("root@atlantis-{i}"), &id, &now_rfc3339()))],
        )
        .await;
    }
    let locks: Api<StateLock> = Api::namespaced(e.cluster.client(), NS);
    eventually(Duration::from_secs(60), "every holder judged Alive", || async {
        let l = locks.list(&ListParams::default()).await.ok()?.items;
        (l.iter().filter(|x| x.status.as_ref().and_then(|s| s.holder.as_ref()).is_some_and(|h| h.state == HolderState::Alive)).count() == N)
            .then_some(())
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(e.cluster.client(), RUNNERS);
    for i in 0..N {
        pods.delete(&format!("atlantis-{i}"), &DeleteParams::default()).await.expect("delete");
    }
    eventually(Duration::from_secs(30), "every lock released", || async {
        let scan = e.db.scan().table_name(TABLE).send().await.ok()?;
        (scan.count == 0).then_some(())
    })
    .await;
    e.op.stop().await;
}

// ---- The safety issue's failure classes, end to end: the live lock survives, and the dead
// holder's lock in the same setup is still released. -----------------------------------------

/// A running pod in `ns` with an optional `spec.hostname`.
async fn pod_in(cluster: &TestCluster, ns: &str, name: &str, hostname: Option<&str>) -> Pod {
    let api: Api<Pod> = Api::namespaced(cluster.client(), ns);
    let mut spec = json!({"containers": [{"name": "atlantis", "image": "atlantis"}]});
    if let Some(h) = hostname {
        spec["hostname"] = json!(h);
    }
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod");
    let pod = api.create(&PostParams::default(), &pod).await.expect("create pod");
    let started = pod.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    let status = json!({"status": {"phase": "Running", "containerStatuses": [{"name": "atlantis", "ready": true, "restartCount": 0, "image": "atlantis", "imageID": "", "state": {"running": {"startedAt": started}}}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.expect("pod status")
}

async fn lock_status(cluster: &TestCluster) -> statelock::crd::StateLockStatus {
    Api::<StateLock>::namespaced(cluster.client(), NS)
        .get_opt(&state_lock_name(LOCK))
        .await
        .expect("get StateLock")
        .and_then(|l| l.status)
        .unwrap_or_default()
}

/// Class 1, with real Terraform: a runner pod whose name is longer than 63 characters takes the
/// lock under its truncated hostname. It is found (established by hostname), the lock survives
/// while it lives, and it is released once the pod is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_runner_with_a_truncated_hostname_keeps_its_lock_while_it_lives() {
    use std::{os::unix::process::CommandExt, process::Stdio};
    let e = env("Release").await;
    assert_eq!(http_request("PUT", &format!("{}/tfstate", e.moto.url()), ""), 200, "state bucket");
    let name = format!("atlantis-{}", "1234567890".repeat(6));
    assert!(name.len() > 63);
    let host = name[..63].trim_end_matches(['-', '.']).to_owned();
    pod_in(&e.cluster, RUNNERS, &name, None).await;
    let tf = Terraform::modern();
    let dir = e.cluster.dir.path().join("long");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("main.tf"),
        format!(
            "{}\nvariable \"v\" {{\n  default = \"a\"\n}}\noutput \"v\" {{\n  value = var.v\n}}\n",
            tf.backend(&e.moto.url(), "app/terraform.tfstate", TABLE)
        ),
    )
    .expect("main.tf");
    let init = tf.command(&dir, &host, &["init", "-input=false", "-no-color"]).output().expect("init");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut apply = tf
        .command(&dir, &host, &["apply", "-no-color", "-var", "v=b"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("apply");
    let held = eventually(Duration::from_secs(60), "the lock taken", || async { lock_item(&e.db).await }).await;
    assert!(held.contains(&format!("@{host}\"")), "Who names the truncated hostname: {held}");
    wait_alive(&e).await;
    let status = lock_status(&e.cluster).await;
    let established = status.holder.and_then(|h| h.established).expect("established holder");
    assert_eq!((established.pod.as_str(), established.by), (name.as_str(), statelock::crd::HolderIdentification::Hostname));
    assert_never_released(&e, &held, HolderState::Alive).await;
    // The runner dies hard; its pod goes: released.
    let pgid = apply.id();
    assert!(std::process::Command::new("kill").args(["-9", "--", &format!("-{pgid}")]).status().expect("kill").success());
    let _ = apply.wait();
    Api::<Pod>::namespaced(e.cluster.client(), RUNNERS).delete(&name, &DeleteParams::default()).await.expect("delete pod");
    wait_released(&e, "PodNotFound").await;
    e.op.stop().await;
}

/// Class 2: pods with the holder's hostname elsewhere (another namespace) or created after the
/// lock (in the holder namespace, through spec.hostname) are never the holder: the live lock
/// survives them, and the holder's own death still releases it.
#[tokio::test(flavor = "multi_thread")]
async fn look_alike_pods_never_stand_in_for_the_holder() {
    let e = env("Release").await;
    e.cluster.create_namespace("elsewhere").await;
    runner_pod(&e.cluster, "atlantis-0").await;
    let info = take_lock(&e.db, "root@atlantis-0").await;
    wait_alive(&e).await;
    eventually(Duration::from_secs(10), "the lock older than the skew tolerance", || async {
        let created: serde_json::Value = serde_json::from_str(&info).ok()?;
        let created: k8s_openapi::jiff::Timestamp = created["Created"].as_str()?.parse().ok()?;
        (k8s_openapi::jiff::Timestamp::now().duration_since(created).as_secs() >= 3).then_some(())
    })
    .await;
    pod_in(&e.cluster, "elsewhere", "atlantis-0", None).await;
    pod_in(&e.cluster, RUNNERS, "impostor", Some("atlantis-0")).await;
    assert_never_released(&e, &info, HolderState::Alive).await;
    let status = lock_status(&e.cluster).await;
    assert_eq!(status.holder.and_then(|h| h.established).map(|x| x.pod).as_deref(), Some("atlantis-0"));
    // The holder dies: the impostor (created after the lock) does not keep the lock alive either.
    Api::<Pod>::namespaced(e.cluster.client(), RUNNERS).delete("atlantis-0", &DeleteParams::default()).await.expect("delete pod");
    wait_released(&e, "PodNotFound").await;
    e.op.stop().await;
}

/// Class 3: a user edits the StateLock spec (Created far in the past, Who naming a runner that
/// does not exist): nothing is released, since every release is judged on the item DynamoDB
/// returns. The holder's own death still releases it.
#[tokio::test(flavor = "multi_thread")]
async fn an_edited_spec_never_releases_a_live_lock() {
    let e = env("Release").await;
    runner_pod(&e.cluster, "atlantis-0").await;
    let info = take_lock(&e.db, "root@atlantis-0").await;
    wait_alive(&e).await;
    let locks: Api<StateLock> = Api::namespaced(e.cluster.client(), NS);
    let edit = json!({"spec": {"lockInfo": {"created": "2020-01-01T00:00:00Z", "who": "root@atlantis-9"}}});
    locks.patch(&state_lock_name(LOCK), &PatchParams::default(), &Patch::Merge(&edit)).await.expect("edit the spec");
    // Whatever the controller thinks of the edited spec, the item survives several reconciles.
    tokio::time::sleep(Duration::from_secs(4)).await; // an observation window for an absence
    assert_eq!(lock_item(&e.db).await.as_deref(), Some(info.as_str()), "an edited spec releases nothing");
    assert!(!reasons_on_lock(&e.cluster).await.iter().any(|r| r == "LockExpired"));
    eventually(Duration::from_secs(30), "the mirror restores the spec", || async {
        let l = locks.get(&state_lock_name(LOCK)).await.ok()?;
        (l.spec.lock_info.who.as_deref() == Some("root@atlantis-0")).then_some(())
    })
    .await;
    Api::<Pod>::namespaced(e.cluster.client(), RUNNERS).delete("atlantis-0", &DeleteParams::default()).await.expect("delete pod");
    wait_released(&e, "PodNotFound").await;
    e.op.stop().await;
}

/// Class 7: a manual unlock of a holder that is not known to be dead (phase Unknown: its node may
/// be partitioned with the process running) is refused without the override, and carried out with it.
#[tokio::test(flavor = "multi_thread")]
async fn manual_unlock_of_an_unknown_holder_needs_the_override() {
    let e = env("Release").await;
    runner_pod(&e.cluster, "atlantis-0").await;
    let info = take_lock(&e.db, "root@atlantis-0").await;
    wait_alive(&e).await;
    Api::<Pod>::namespaced(e.cluster.client(), RUNNERS)
        .patch_status("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Unknown"}})))
        .await
        .expect("unknown");
    eventually(Duration::from_secs(20), "PodPhaseUnknown", || async {
        holder_state(&e.cluster).await.filter(|(_, r)| r == "PodPhaseUnknown")
    })
    .await;
    let id = "1edde332-0dcf-0332-cbb0-ed1b3daf868d";
    annotate(&e.cluster, json!({"statelock.dev/force-unlock": id})).await;
    wait_event(&e.cluster, "UnlockRefused").await;
    assert_eq!(lock_item(&e.db).await.as_deref(), Some(info.as_str()), "an Unknown holder is not released without the override");
    eventually(Duration::from_secs(10), "status.release says why", || async {
        (lock_status(&e.cluster).await.release.map(|r| r.reason).as_deref() == Some("UnlockRefused")).then_some(())
    })
    .await;
    annotate(&e.cluster, json!({"statelock.dev/force-unlock": id, "statelock.dev/force-unlock-live": id})).await;
    wait_event(&e.cluster, "ForceUnlocked").await;
    assert_eq!(lock_item(&e.db).await, None);
    e.op.stop().await;
}

/// Class 8: a malformed lock item whose Who names a gone runner is never released in Release
/// mode; a well-formed lock of a gone runner in the same table is.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_items_are_never_released_automatically() {
    let e = env("Release").await;
    let bad = r#"{"ID":"x","Operation":1,"Who":"root@atlantis-7","Created":"2020-01-01T00:00:00Z"}"#;
    put_item(&e.db, TABLE, &[("LockID", LOCK), ("Info", bad)]).await;
    let gone = "tfstate/gone/terraform.tfstate";
    put_item(&e.db, TABLE, &[("LockID", gone), ("Info", &terraform_info("g-1", "root@atlantis-8", gone, &now_rfc3339()))]).await;
    eventually(Duration::from_secs(30), "the well-formed lock of a gone runner released", || async {
        let r = e.db.get_item().table_name(TABLE).key("LockID", AttributeValue::S(gone.into())).consistent_read(true).send().await.ok()?;
        r.item.is_none().then_some(())
    })
    .await;
    let state = eventually(Duration::from_secs(30), "LockMalformed", || async {
        holder_state(&e.cluster).await.filter(|(_, r)| r == "LockMalformed")
    })
    .await;
    assert_eq!(state.0, HolderState::Unknown);
    tokio::time::sleep(Duration::from_secs(3)).await; // an observation window for an absence
    assert_eq!(lock_item(&e.db).await.as_deref(), Some(bad), "a malformed lock stays");
    e.op.stop().await;
}

/// Classes 4 and 9: a LockSource whose grace period is too large to be safe, or that names an
/// endpoint outside the operator's allow-list, is refused with a condition that says why, and
/// its locks are never released; a LockSource in another namespace without a Secret may not use
/// the operator's identity.
#[tokio::test(flavor = "multi_thread")]
async fn refused_lock_sources_say_why_and_release_nothing() {
    use statelock::crd::LockSource;
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    for ns in ["team-a", "team-b", "team-c", RUNNERS] {
        cluster.create_namespace(ns).await;
    }
    let spec = |grace: &str| {
        json!({
            "dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url()},
            "sync": {"mode": "Scan", "interval": "1s"},
            "holders": {"namespaces": [RUNNERS], "hostnamePattern": "atlantis-[0-9]+"},
            "expiry": {"mode": "Release", "gracePeriod": grace}
        })
    };
    cluster.create_lock_source("team-a", "huge-grace", spec("99999999h")).await;
    let mut elsewhere = spec("0s");
    elsewhere["dynamodb"]["endpoint"] = json!("http://127.0.0.1:1");
    elsewhere["dynamodb"]["credentialsSecretRef"] = json!({"name": "aws"});
    cluster.create_lock_source("team-b", "not-allowed", elsewhere).await;
    let mut no_endpoint = spec("0s");
    no_endpoint["dynamodb"].as_object_mut().expect("dynamodb").remove("endpoint");
    cluster.create_lock_source("team-c", "operator-identity", no_endpoint).await;
    // The administrator allows this moto for team-a only, and the operator's identity nowhere
    // but its own namespace.
    let mut cmd = common::statelock_command();
    cmd.env("STATELOCK_ALLOWED_ENDPOINTS", moto.url()).env("STATELOCK_AWS_IDENTITY_NAMESPACES", "team-a");
    let op = Operator::start_with(&cluster, cmd);
    // A runner that is gone holds a lock: a served LockSource in Release mode would release it.
    put_item(&db, TABLE, &[("LockID", LOCK), ("Info", &terraform_info("r-1", "root@atlantis-5", LOCK, &now_rfc3339()))]).await;
    let ready = |ns: &'static str, name: &'static str| {
        let client = cluster.client();
        async move {
            let s = Api::<LockSource>::namespaced(client, ns).get(name).await.ok()?;
            s.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False").map(|c| (c.reason, c.message))
        }
    };
    let (reason, message) = eventually(Duration::from_secs(30), "huge grace refused", || ready("team-a", "huge-grace")).await;
    assert_eq!(reason, "InvalidSpec", "{message}");
    assert!(message.contains("gracePeriod"), "{message}");
    let (reason, _) = eventually(Duration::from_secs(30), "endpoint refused", || ready("team-b", "not-allowed")).await;
    assert_eq!(reason, "EndpointNotAllowed", "even with credentials of its own");
    let (reason, _) = eventually(Duration::from_secs(30), "operator identity refused", || ready("team-c", "operator-identity")).await;
    assert_eq!(reason, "OperatorIdentityNotAllowed");
    tokio::time::sleep(Duration::from_secs(3)).await; // an observation window for an absence
    let r = db.get_item().table_name(TABLE).key("LockID", AttributeValue::S(LOCK.into())).consistent_read(true).send().await.expect("get");
    assert!(r.item.is_some(), "no refused LockSource releases anything");
    op.stop().await;
}

/// Class 5: the operator's pod watch is broken (its cache behind the API) while an evicted pod
/// of a StatefulSet is replaced by a new one that takes a lock. The cache still shows the old,
/// Failed pod: a hint of death, which the authorities (a direct LIST) do not confirm. The live
/// lock survives; once the new pod is really gone, the lock is released.
#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_pod_cache_never_condemns_a_live_holder() {
    let e = env("Release").await;
    let pods: Api<Pod> = Api::namespaced(e.cluster.client(), RUNNERS);
    runner_pod(&e.cluster, "atlantis-0").await;
    pods.patch_status("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Failed"}}))).await.expect("evicted");
    // A probe lock of that evicted pod is released: proof that the operator's cache has the
    // Failed pod before the watch breaks.
    let probe = "tfstate/probe/terraform.tfstate";
    put_item(&e.db, TABLE, &[("LockID", probe), ("Info", &terraform_info("p-1", "root@atlantis-0", probe, &now_rfc3339()))]).await;
    eventually(Duration::from_secs(30), "the evicted pod's probe lock released", || async {
        let r = e.db.get_item().table_name(TABLE).key("LockID", AttributeValue::S(probe.into())).consistent_read(true).send().await.ok()?;
        r.item.is_none().then_some(())
    })
    .await;
    // The pod watch breaks; the StatefulSet replaces the pod; the new pod takes the lock.
    e.cluster.emulator.hold_watches_of("", "pods", true);
    pods.delete("atlantis-0", &DeleteParams::default()).await.expect("delete the evicted pod");
    runner_pod(&e.cluster, "atlantis-0").await;
    let info = take_lock(&e.db, "root@atlantis-0").await;
    let status = eventually(Duration::from_secs(30), "the hint not confirmed", || async {
        let s = lock_status(&e.cluster).await;
        (s.release.as_ref().map(|r| r.reason.as_str()) == Some("NotConfirmed")).then_some(s)
    })
    .await;
    let holder = status.holder.expect("holder");
    assert_eq!(holder.state, HolderState::Alive, "{:?}", holder.message);
    assert!(reasons_on_lock(&e.cluster).await.iter().any(|r| r == "ReleaseBlocked"));
    assert_never_released(&e, &info, HolderState::Alive).await;
    // The watch heals; the new pod is deleted: released.
    e.cluster.emulator.hold_watches_of("", "pods", false);
    pods.delete("atlantis-0", &DeleteParams::default()).await.expect("delete the new pod");
    wait_released(&e, "PodNotFound").await;
    e.op.stop().await;
}

/// Handling a force-unlock request removes that request only, the way the expiry controller
/// consumes one: the lock ID and the request's token together, only while both are what was
/// read; the live override on its own, only while it is what was read. A newer request made
/// meanwhile stays whole, an override never carries over to a request that did not set it, and
/// the StateLock's other annotations are kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_force_unlock_request_is_never_removed_with_the_one_handled() {
    use kube::runtime::events::{Recorder, Reporter};
    use statelock::cluster::writer::{LockWriter, Writer};
    const ID: &str = "statelock.dev/force-unlock";
    const LIVE: &str = "statelock.dev/force-unlock-live";
    const TOKEN: &str = "statelock.dev/force-unlock-request";
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    let locks: Api<StateLock> = Api::namespaced(cluster.client(), NS);
    let writer = LockWriter::new(
        cluster.client(),
        Recorder::new(cluster.client(), Reporter { controller: "t".into(), instance: None }),
        Writer::Expire,
    );
    let consume = |read: StateLock| {
        let writer = writer.clone();
        async move {
            let whole = writer.remove_annotations_as_read(&read, &[ID, TOKEN]).await.expect("patch");
            writer.remove_annotations_as_read(&read, &[LIVE]).await.expect("patch");
            whole
        }
    };
    let annotations = |name: &'static str| {
        let locks = locks.clone();
        async move {
            let mut a: Vec<(String, String)> = locks.get(name).await.expect("get").annotations().clone().into_iter().collect();
            a.sort();
            a
        }
    };
    let create = |name: &'static str, ann: serde_json::Value| {
        let locks = locks.clone();
        async move {
            let body: StateLock = serde_json::from_value(json!({
                "apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock",
                "metadata": {"name": name, "annotations": ann},
                "spec": {"source": "tf-locks", "lockId": LOCK},
            }))
            .expect("StateLock");
            locks.create(&PostParams::default(), &body).await.expect("create")
        }
    };
    let pairs = |v: &[(&str, &str)]| v.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>();

    // 1. A newer request (same lock ID, now live, another token) arrives after the read: it stays whole.
    let read = create("newer", json!({"team": "infra", ID: "id-1", TOKEN: "t-1"})).await;
    locks
        .patch("newer", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {LIVE: "id-1", TOKEN: "t-2"}}})))
        .await
        .expect("newer request");
    assert!(!consume(read).await, "the older request is not removed");
    assert_eq!(
        annotations("newer").await,
        pairs(&[
            ("statelock.dev/force-unlock", "id-1"),
            ("statelock.dev/force-unlock-live", "id-1"),
            ("statelock.dev/force-unlock-request", "t-2"),
            ("team", "infra")
        ])
    );
    // The newer one, as read, is removed; other annotations stay.
    let now = locks.get("newer").await.expect("get");
    assert!(consume(now).await);
    assert_eq!(annotations("newer").await, pairs(&[("team", "infra")]), "only the request is gone");
    // Nothing to remove is not an error.
    assert!(consume(locks.get("newer").await.expect("get")).await);

    // 2. A live request is overwritten meanwhile by one without the override (kubectl annotate
    //    --overwrite of the ID alone): the override read goes, the new request stays without it.
    let read = create("overwritten", json!({ID: "id-1", LIVE: "id-1"})).await;
    locks
        .patch("overwritten", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {ID: "id-2"}}})))
        .await
        .expect("overwrite");
    assert!(!consume(read).await);
    assert_eq!(annotations("overwritten").await, pairs(&[("statelock.dev/force-unlock", "id-2")]), "the override did not carry over");
}
