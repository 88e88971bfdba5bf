//! Conformance: kube-rs itself as a client. A reflector and a Controller converge through
//! compaction and dropped watches; kube-lease-manager takes, renews and loses a Lease.

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use apiserver_emulator::{Config, Options, ServeOptions};
use common::{Cluster, eventually};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{Controller, WatchStreamExt, controller::Action, reflector, watcher, watcher::Config as WatcherConfig},
};

fn small_history() -> Config {
    Config {
        api: Options { history: 20, ..Options::default() },
        serve: ServeOptions { bookmark_interval: Duration::from_millis(200), ..ServeOptions::default() },
        ..Config::default()
    }
}

fn cm(name: &str, v: &str) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c.data = Some(BTreeMap::from([("v".to_owned(), v.to_owned())]));
    c
}

async fn server_state(api: &Api<ConfigMap>) -> BTreeMap<String, String> {
    api.list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|c| (c.name_any(), c.data.unwrap_or_default().get("v").cloned().unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reflector_converges_through_compaction_and_dropped_watches() {
    for streaming in [false, true] {
        let c = Cluster::start_with(small_history()).await;
        let api: Api<ConfigMap> = Api::namespaced(c.client(), "default");
        for i in 0..5 {
            api.create(&PostParams::default(), &cm(&format!("c{i}"), "0")).await.expect("create");
        }
        let (reader, writer) = reflector::store::<ConfigMap>();
        let cfg = if streaming { WatcherConfig::default().streaming_lists() } else { WatcherConfig::default() };
        let stream = reflector(writer, watcher(api.clone(), cfg)).default_backoff().applied_objects();
        let task = tokio::spawn(stream.for_each(|_| async {}));
        reader.wait_until_ready().await.expect("initial sync");

        for round in 1..=3 {
            for mut x in api.list(&Default::default()).await.expect("list").items {
                x.data = Some(BTreeMap::from([("v".to_owned(), round.to_string())]));
                api.replace(&x.name_any(), &PostParams::default(), &x).await.expect("replace");
            }
            // Cut every watch, change things while the watcher cannot reconnect, then compact the
            // history it would need: it must get 410, re-list and recover.
            c.emulator.pause_watches(true);
            c.emulator.drop_watches();
            api.delete(&format!("c{round}"), &Default::default()).await.expect("delete");
            api.create(&PostParams::default(), &cm(&format!("n{round}"), "new")).await.expect("create");
            c.emulator.compact();
            c.emulator.pause_watches(false);
        }
        let want = server_state(&api).await;
        let reader2 = reader.clone();
        eventually(Duration::from_secs(20), "the reflector to match the server", || {
            let have: BTreeMap<String, String> = reader2
                .state()
                .iter()
                .map(|c| (c.name_any(), c.data.clone().unwrap_or_default().get("v").cloned().unwrap_or_default()))
                .collect();
            let ok = have == want;
            async move { ok.then_some(()) }
        })
        .await;
        assert!(c.emulator.expired_watches() > 0, "the watcher must have gone through a 410 re-list (streaming={streaming})");
        task.abort();
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reconcile failed: {0}")]
struct ReconcileError(#[from] kube::Error);

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_converges_and_does_not_hot_loop() {
    let c = Cluster::start_with(small_history()).await;
    let client = c.client();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..10 {
        api.create(&PostParams::default(), &cm(&format!("c{i}"), &i.to_string())).await.expect("create");
    }
    struct Ctx {
        api: Api<ConfigMap>,
    }
    async fn reconcile(obj: Arc<ConfigMap>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
        let v = obj.data.clone().unwrap_or_default().get("v").cloned().unwrap_or_default();
        // Server-side apply of the same annotation on every reconcile: a real server treats the
        // repeat as a no-op, so this must not loop.
        let patch =
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": obj.name_any(), "annotations": {"seen": v}}});
        ctx.api.patch(&obj.name_any(), &PatchParams::apply("test-controller"), &Patch::Apply(&patch)).await?;
        Ok(Action::await_change())
    }
    fn error_policy(_: Arc<ConfigMap>, _: &ReconcileError, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_millis(100))
    }
    let ctx = Arc::new(Ctx { api: api.clone() });
    let controller =
        tokio::spawn(Controller::new(api.clone(), WatcherConfig::default()).run(reconcile, error_policy, ctx).for_each(|_| async {}));

    let check_all = |api: Api<ConfigMap>| async move {
        let items = api.list(&Default::default()).await.ok()?.items;
        items.iter().all(|c| c.annotations().get("seen") == c.data.clone().unwrap_or_default().get("v")).then_some(())
    };
    eventually(Duration::from_secs(20), "every ConfigMap annotated", || check_all(api.clone())).await;
    c.emulator.compact();
    c.emulator.drop_watches();
    api.patch("c3", &PatchParams::default(), &Patch::Merge(serde_json::json!({"data": {"v": "changed"}}))).await.expect("patch");
    eventually(Duration::from_secs(20), "the change reconciled after the watch was cut", || check_all(api.clone())).await;

    // Quiet period: with nothing changing, the controller must not write.
    let before = c.emulator.total_writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.emulator.total_writes(), before, "the controller kept writing with nothing to do (hot loop)");
    controller.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_lease_manager_takes_renews_and_loses_a_lease() {
    let c = Cluster::start().await;
    let build = |id: &str| {
        kube_lease_manager::LeaseManagerBuilder::new(c.client(), "statelock-test")
            .with_namespace("default")
            .with_identity(id)
            .with_duration(3)
            .with_grace(1)
            .build()
    };
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(c.client(), "default");
    let holder = |l: k8s_openapi::api::coordination::v1::Lease| l.spec.and_then(|s| s.holder_identity);
    let renew = |l: &k8s_openapi::api::coordination::v1::Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone());

    let a = Arc::new(build("replica-a").await.expect("manager a"));
    assert!(a.changed().await.expect("a acquires"), "the first replica takes the free lease");
    let first_renew = renew(&leases.get("statelock-test").await.expect("lease"));
    // Keep a's renewal loop running, as a leader does.
    let a_loop = {
        let a = a.clone();
        tokio::spawn(async move {
            loop {
                if a.changed().await.is_err() {
                    break;
                }
            }
        })
    };
    let b = build("replica-b").await.expect("manager b");
    // For longer than the lease duration, b must not take the lease a keeps renewing.
    let b_got = tokio::time::timeout(Duration::from_secs(5), b.changed()).await;
    assert!(b_got.is_err(), "b took a lease that a kept renewing: {b_got:?}");
    let lease = leases.get("statelock-test").await.expect("lease");
    assert_ne!(renew(&lease), first_renew, "a renewed the lease");
    assert_eq!(holder(lease).as_deref(), Some("replica-a"));

    // a stops renewing (a hung leader): b takes over once the lease expires.
    a_loop.abort();
    let got = tokio::time::timeout(Duration::from_secs(10), b.changed()).await.expect("b acquires after expiry").expect("state");
    assert!(got);
    assert_eq!(holder(leases.get("statelock-test").await.expect("lease")).as_deref(), Some("replica-b"));
    // a learns that it lost the lease.
    let a_now = tokio::time::timeout(Duration::from_secs(10), a.changed()).await.expect("a notices").expect("state");
    assert!(!a_now, "a must see that it lost the lease");
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_runtime_event_recorder_creates_then_counts_a_series() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client(), "default");
    let obj = api.create(&PostParams::default(), &cm("subject", "1")).await.expect("create");
    let recorder = Recorder::new(c.client(), Reporter { controller: "statelock-test".into(), instance: Some("pod-0".into()) });
    let event = Event {
        type_: EventType::Warning,
        reason: "LockContended".into(),
        note: Some("waiting".into()),
        action: "Wait".into(),
        secondary: None,
    };
    let reference = kube::Resource::object_ref(&obj, &());
    recorder.publish(&event, &reference).await.expect("first publish (POST)");
    recorder.publish(&event, &reference).await.expect("repeat (merge patch with a series)");
    let out = c.kubectl(&["get", "events", "-o", "wide"]).await.success();
    let rows = out.rows();
    assert_eq!(rows.len(), 2, "one event, counted twice:\n{}", out.stdout);
    assert_eq!(out.cell(1, "COUNT"), "2", "{}", out.stdout);
    assert_eq!(out.cell(1, "REASON"), "LockContended", "{}", out.stdout);
    assert!(rows[1].contains(&"configmap/subject".to_owned()), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_print_name_holder_and_age() {
    let c = Cluster::start().await;
    let f = c.file(
        "lease.yaml",
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: statelock-leader\nspec:\n  holderIdentity: statelock-0\n  leaseDurationSeconds: 15\n",
    );
    c.kubectl(&["apply", "-f", f.to_str().expect("path")]).await.success();
    let out = c.kubectl(&["get", "leases"]).await.success();
    assert_eq!(out.rows()[0], ["NAME", "HOLDER", "AGE"]);
    assert_eq!(out.rows()[1][..2], ["statelock-leader".to_owned(), "statelock-0".to_owned()]);
}

fn owned_by(name: &str, owners: &[&ConfigMap]) -> ConfigMap {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    let mut c = cm(name, "x");
    c.metadata.owner_references = Some(
        owners
            .iter()
            .map(|o| OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: o.name_any(),
                uid: o.uid().expect("created objects have a UID"),
                ..OwnerReference::default()
            })
            .collect(),
    );
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_follows_owner_chains_and_spares_dependents_with_a_live_owner() {
    let c = Cluster::start_with(small_history()).await;
    let api: Api<ConfigMap> = Api::namespaced(c.client(), "default");
    let pp = PostParams::default();
    let root = api.create(&pp, &cm("root", "r")).await.expect("root");
    let other = api.create(&pp, &cm("other", "o")).await.expect("other");
    let child = api.create(&pp, &owned_by("child", &[&root])).await.expect("child");
    api.create(&pp, &owned_by("grandchild", &[&child])).await.expect("grandchild");
    api.create(&pp, &owned_by("shared", &[&root, &other])).await.expect("shared");
    let mut held = owned_by("held", &[&root]);
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&pp, &held).await.expect("held");
    api.delete("root", &Default::default()).await.expect("delete root");

    let names: Vec<String> = server_state(&api).await.into_keys().collect();
    assert_eq!(names, ["held", "other", "shared"], "child and grandchild collected; shared has a live owner; held has a finalizer");
    let held = api.get("held").await.expect("held");
    assert!(held.metadata.deletion_timestamp.is_some(), "a dependent with finalizers is marked for deletion, not removed");

    api.create(&pp, &cm("root", "again")).await.expect("recreate root");
    api.delete("other", &Default::default()).await.expect("delete other");
    let names: Vec<String> = server_state(&api).await.into_keys().collect();
    assert_eq!(names, ["held", "root"], "shared's last live owner is gone (the recreated root has another UID)");
}
