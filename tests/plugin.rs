//! `kubectl statelock`: the statelock binary linked as `kubectl-statelock` on PATH, run by the
//! real kubectl against the API emulator with a running operator (moto for DynamoDB).

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{DynamoServer, Operator, TestCluster, eventually, kubectl, lock_item_exists, release_lock, take_lock};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;
use statelock::crd::{HolderState, StateLock, state_lock_name};

const NS: &str = "terraform";
const TABLE: &str = "tf-locks";

/// `kubectl statelock <args>` with the plugin on PATH.
fn plugin_command(dir: &Path, cluster: &TestCluster, args: &[&str]) -> Command {
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut c = Command::new("kubectl");
    c.arg("statelock").args(args).arg(format!("--kubeconfig={}", cluster.kubeconfig.display())).env("PATH", path);
    c
}

/// [`plugin_command`], run to its end: (exit success, stdout, stderr).
fn plugin(dir: &Path, cluster: &TestCluster, args: &[&str]) -> (bool, String, String) {
    outcome(plugin_command(dir, cluster, args).output().expect("kubectl (part of the machine image)"))
}

fn outcome(out: std::process::Output) -> (bool, String, String) {
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// With the operator stopped: `kubectl statelock unlock NAME LOCK_ID` in the background; once its
/// request is on the StateLock, start the operator. The operator, and the plugin's outcome.
async fn unlock_then_start_operator(dir: &Path, cluster: &TestCluster, name: &str, lock_id: &str) -> (Operator, (bool, String, String)) {
    let waiting = plugin_command(dir, cluster, &["unlock", name, lock_id, "--timeout", "300s", "-n", NS])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    eventually(Duration::from_secs(60), "the plugin's request on the StateLock", || async {
        let l = Api::<StateLock>::namespaced(cluster.client(), NS).get(name).await.ok()?;
        l.metadata.annotations.unwrap_or_default().contains_key("statelock.dev/force-unlock").then_some(())
    })
    .await;
    let op = Operator::start(cluster);
    (op, outcome(tokio::task::spawn_blocking(move || waiting.wait_with_output()).await.expect("join").expect("kubectl")))
}

async fn holder_state(cluster: &TestCluster, lock_id: &str) -> Option<HolderState> {
    let l = Api::<StateLock>::namespaced(cluster.client(), NS).get_opt(&state_lock_name(lock_id)).await.ok()??;
    l.status.and_then(|s| s.holder).map(|h| h.state)
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_statelock_lists_explains_and_unlocks() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    cluster.create_namespace("other").await;
    cluster
        .create_lock_source(
            NS,
            "prod-locks",
            json!({
                "dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url()},
                "sync": {"mode": "Scan", "interval": "1s"},
                "holders": {"hostnamePattern": "runner-[0-9]+"},
                "expiry": {"mode": "Observe", "gracePeriod": "0s"}
            }),
        )
        .await;
    let bin_dir = tempfile::tempdir().expect("dir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_statelock"), bin_dir.path().join("kubectl-statelock")).expect("link the plugin");
    // kubectl finds the plugin.
    let listed = Command::new("kubectl")
        .args(["plugin", "list"])
        .env("PATH", format!("{}:{}", bin_dir.path().display(), std::env::var("PATH").unwrap_or_default()))
        .output()
        .expect("kubectl plugin list");
    assert!(String::from_utf8_lossy(&listed.stdout).contains("kubectl-statelock"), "{listed:?}");

    let (ok, out, err) = plugin(bin_dir.path(), &cluster, &["list", "-n", NS]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("No state locks in namespace {NS}.\n"));

    cluster.running_pod(NS, "runner-0").await;
    cluster.running_pod(NS, "runner-1").await;
    let (dead_lock, live_lock) = ("tfstate/app/terraform.tfstate", "tfstate/net/terraform.tfstate");
    take_lock(&db, TABLE, dead_lock, "11111111-2222-3333-4444-555555555555", "root@runner-0").await;
    take_lock(&db, TABLE, live_lock, "66666666-2222-3333-4444-555555555555", "root@runner-1").await;
    let op = Operator::start(&cluster);
    for id in [dead_lock, live_lock] {
        eventually(Duration::from_secs(30), "the holder judged Alive", || async {
            (holder_state(&cluster, id).await == Some(HolderState::Alive)).then_some(())
        })
        .await;
    }

    // list: one row per lock, with the documented columns; -A adds the namespace.
    let (ok, out, err) = plugin(bin_dir.path(), &cluster, &["list", "-n", NS]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].split_whitespace().eq(["NAME", "PATH", "HOLDER", "STATE", "OPERATION", "AGE", "WAITERS", "STORED-IN"]), "{out}");
    let row = lines.iter().find(|l| l.contains(&state_lock_name(dead_lock))).expect("the lock's row");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..5], [dead_lock, "root@runner-0", "Alive", "apply"], "{out}");
    let (ok, all, _) = plugin(bin_dir.path(), &cluster, &["list", "-A"]);
    assert!(
        ok && all.lines().next().is_some_and(|h| h.starts_with("NAMESPACE")) && all.lines().filter(|l| l.starts_with(NS)).count() == 2,
        "{all}"
    );

    // why, for a live holder.
    let name = state_lock_name(dead_lock);
    let (ok, why, err) = plugin(bin_dir.path(), &cluster, &["why", &name, "-n", NS]);
    assert!(ok, "{err}");
    assert!(why.contains("is alive") && why.contains("never released"), "{why}");

    // unlock of a live holder without --live: refused, and the operator's event is printed.
    let live_name = state_lock_name(live_lock);
    let (ok, _, err) = plugin(bin_dir.path(), &cluster, &["unlock", &live_name, "66666666-2222-3333-4444-555555555555", "-n", NS]);
    assert!(!ok && err.contains("UnlockRefused"), "{err}");
    assert!(lock_item_exists(&db, TABLE, live_lock).await, "a live holder's lock stays");

    // The holder dies; Observe mode only reports; why says so; unlock releases it.
    Api::<Pod>::namespaced(cluster.client(), NS).delete("runner-0", &DeleteParams::default()).await.expect("delete pod");
    eventually(Duration::from_secs(30), "the holder judged Dead", || async {
        (holder_state(&cluster, dead_lock).await == Some(HolderState::Dead)).then_some(())
    })
    .await;
    let (ok, why, err) = plugin(bin_dir.path(), &cluster, &["why", &name, "-n", NS]);
    assert!(ok, "{err}");
    assert!(
        why.contains("is dead")
            && why.contains("Observe mode")
            && why.contains(&format!("kubectl statelock unlock {name} 11111111-2222-3333-4444-555555555555")),
        "{why}"
    );
    // A lock ID other than the one held now (the lock re-taken since it was looked at) releases nothing.
    // Each request gets its own answer, even the same request twice in a row (its answer is
    // told apart by the request's token, not by what was there before).
    for _ in 0..2 {
        let (ok, _, err) = plugin(bin_dir.path(), &cluster, &["unlock", &name, "99999999-2222-3333-4444-555555555555", "-n", NS]);
        assert!(!ok && err.contains("UnlockIdMismatch") && !err.contains("[request"), "{err}");
    }
    assert!(lock_item_exists(&db, TABLE, dead_lock).await);
    let request = Api::<StateLock>::namespaced(cluster.client(), NS).get(&name).await.expect("get");
    assert!(
        !request.metadata.annotations.unwrap_or_default().keys().any(|k| k.starts_with("statelock.dev/force-unlock")),
        "handled requests are removed"
    );
    let (ok, out, err) = plugin(bin_dir.path(), &cluster, &["unlock", &name, "11111111-2222-3333-4444-555555555555", "-n", NS]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ForceUnlocked: released lock 11111111-2222-3333-4444-555555555555"), "{out}");
    assert!(!lock_item_exists(&db, TABLE, dead_lock).await, "released");

    // Errors in words.
    let (ok, _, err) = plugin(bin_dir.path(), &cluster, &["why", "no-such-lock", "-n", NS]);
    assert!(!ok && err.contains("StateLock terraform/no-such-lock not found"), "{err}");
    op.stop().await;

    // A request made with kubectl and not answered yet (the operator is stopped) is never
    // overwritten by the plugin's: its requester is waiting for its answer.
    kubectl(&cluster, &["annotate", "statelock", &live_name, "-n", NS, "statelock.dev/force-unlock=66666666-2222-3333-4444-555555555555"]);
    let (ok, _, err) =
        plugin(bin_dir.path(), &cluster, &["unlock", &live_name, "77777777-2222-3333-4444-555555555555", "--live", "-n", NS]);
    assert!(!ok && err.contains("already has an unlock request pending (for lock ID 66666666-2222-3333-4444-555555555555)"), "{err}");
    let kept =
        Api::<StateLock>::namespaced(cluster.client(), NS).get(&live_name).await.expect("get").metadata.annotations.unwrap_or_default();
    assert_eq!(kept.get("statelock.dev/force-unlock").map(String::as_str), Some("66666666-2222-3333-4444-555555555555"));
    assert!(!kept.contains_key("statelock.dev/force-unlock-live"), "the pending request is not made live: {kept:?}");

    // A request for a lock that its holder released meanwhile (here while the operator was down)
    // ends well: the request stays until the mirror removes the StateLock, and the plugin reports
    // the lock released. (Consumed without an answer, as it once was, it exits non-zero whenever
    // the expiry controller comes before the mirror.)
    kubectl(&cluster, &["annotate", "statelock", &live_name, "-n", NS, "statelock.dev/force-unlock-"]);
    release_lock(&db, TABLE, live_lock).await;
    let (op, (ok, out, err)) =
        unlock_then_start_operator(bin_dir.path(), &cluster, &live_name, "66666666-2222-3333-4444-555555555555").await;
    assert!(ok, "{out}{err}");
    assert!(out.starts_with(&format!("StateLock {NS}/{live_name} is gone")), "{out}");

    // A StateLock whose spec was edited to name a key that does not exist: its request is not
    // consumed, answered or acted on for that key's absence. The mirror removes the edited
    // object and makes the lock's StateLock again (a new UID, the request gone with the old
    // one); the lock stays, and nothing said it was released. (The plugin, had it been waiting,
    // would have read the removal as a release: it trusts the StateLock objects, see the README.)
    let held = "tfstate/web/terraform.tfstate";
    take_lock(&db, TABLE, held, "88888888-2222-3333-4444-555555555555", "root@runner-1").await;
    eventually(Duration::from_secs(30), "the holder judged Alive", || async {
        (holder_state(&cluster, held).await == Some(HolderState::Alive)).then_some(())
    })
    .await;
    op.stop().await;
    let held_name = state_lock_name(held);
    let locks = Api::<StateLock>::namespaced(cluster.client(), NS);
    let edited = locks
        .patch(
            &held_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"statelock.dev/force-unlock": "88888888-2222-3333-4444-555555555555"}},
                                 "spec": {"lockId": "tfstate/none/terraform.tfstate"}})),
        )
        .await
        .expect("edit the spec and request an unlock");
    let op = Operator::start(&cluster);
    eventually(Duration::from_secs(60), "the lock's StateLock made again and judged", || async {
        let l = locks.get_opt(&held_name).await.ok()??;
        (l.uid() != edited.uid() && l.spec.lock_id == held && l.status?.holder?.state == HolderState::Alive).then_some(())
    })
    .await;
    assert!(lock_item_exists(&db, TABLE, held).await, "a live holder's lock stays");
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(cluster.client(), NS).list(&Default::default()).await.expect("events");
    // Nothing answered the request: an answer would have been about the edited key.
    let answer_reasons = ["ForceUnlocked", "UnlockRefused", "UnlockIdMismatch", "UnlockFailed", "ReleaseSkipped", "LockPartiallyReleased"];
    let answers: Vec<_> = events
        .items
        .iter()
        .filter(|e| {
            e.reason.as_deref().is_some_and(|r| answer_reasons.contains(&r)) && e.note.as_deref().is_some_and(|n| n.contains("88888888"))
        })
        .collect();
    assert!(answers.is_empty(), "{answers:?}");
    op.stop().await;
}
