//! Watch protocol details, seen through kube-rs and a raw HTTP client.

mod common;

use std::{collections::BTreeMap, time::Duration};

use apiserver_emulator::{Config, ServeOptions};
use common::Cluster;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c.metadata.labels = Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>());
    c
}

fn fast_bookmarks() -> Config {
    Config { serve: ServeOptions { bookmark_interval: Duration::from_millis(300), ..ServeOptions::default() }, ..Config::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn bookmarks_carry_kind_and_the_stream_closes_at_timeout_seconds() {
    let c = Cluster::start_with(fast_bookmarks()).await;
    let api: Api<ConfigMap> = Api::namespaced(c.client(), "default");
    let rv = api.list(&Default::default()).await.expect("list").metadata.resource_version.expect("list rv");
    let started = std::time::Instant::now();
    let events: Vec<WatchEvent<ConfigMap>> =
        api.watch(&WatchParams::default().timeout(2), &rv).await.expect("watch").try_collect().await.expect("stream");
    let elapsed = started.elapsed();
    assert!(
        events.iter().any(|e| matches!(e, WatchEvent::Bookmark(_))),
        "a BOOKMARK that kube-rs parses (kind and apiVersion present): {events:?}"
    );
    assert!(!events.iter().any(|e| matches!(e, WatchEvent::Error(_))), "{events:?}");
    assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(10), "closed at timeoutSeconds, took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn selector_transitions_become_added_and_deleted() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client(), "default");
    api.create(&PostParams::default(), &cm("x", &[("team", "a")])).await.expect("create");
    let rv = api.list(&Default::default()).await.expect("list").metadata.resource_version.expect("rv");
    let stream = api.watch(&WatchParams::default().labels("team=b").timeout(3), &rv).await.expect("watch");
    let writer = async {
        api.patch("x", &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"labels": {"team": "b"}}})))
            .await
            .expect("into selector");
        api.patch("x", &PatchParams::default(), &Patch::Merge(serde_json::json!({"data": {"k": "v"}}))).await.expect("change inside");
        api.patch("x", &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"labels": {"team": "c"}}})))
            .await
            .expect("out of selector");
    };
    let (events, ()) = tokio::join!(stream.try_collect::<Vec<_>>(), writer);
    let kinds: Vec<String> = events
        .expect("stream")
        .into_iter()
        .filter_map(|e| match e {
            WatchEvent::Added(o) => Some(format!("ADDED {}", o.labels()["team"])),
            WatchEvent::Modified(o) => Some(format!("MODIFIED {}", o.labels()["team"])),
            WatchEvent::Deleted(o) => Some(format!("DELETED {}", o.labels()["team"])),
            _ => None,
        })
        .collect();
    // DELETED carries the last content that matched (label b), as the apiserver's cacher does.
    assert_eq!(kinds, ["ADDED b", "MODIFIED b", "DELETED b"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_from_a_compacted_revision_gets_an_in_stream_410() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client(), "default");
    let rv = api.list(&Default::default()).await.expect("list").metadata.resource_version.expect("rv");
    api.create(&PostParams::default(), &cm("x", &[])).await.expect("create");
    c.emulator.compact();
    let events: Vec<WatchEvent<ConfigMap>> =
        api.watch(&WatchParams::default().timeout(5), &rv).await.expect("HTTP 200, not an HTTP 410").try_collect().await.expect("stream");
    match events.as_slice() {
        [WatchEvent::Error(e)] => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected exactly one ERROR 410 event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_faults_answer_the_next_writes() {
    let c = Cluster::start().await;
    let mut config = kube::Config::new(c.emulator.url().parse().expect("url"));
    config.default_namespace = "default".into();
    let api: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(config).expect("client"), "default");
    c.emulator.fail_next_writes(&[409, 500]);
    let e1 = api.create(&PostParams::default(), &cm("a", &[])).await.expect_err("409");
    let e2 = api.create(&PostParams::default(), &cm("a", &[])).await.expect_err("500");
    assert!(matches!(e1, kube::Error::Api(ref s) if s.code == 409), "{e1:?}");
    assert!(matches!(e2, kube::Error::Api(ref s) if s.code == 500), "{e2:?}");
    api.create(&PostParams::default(), &cm("a", &[])).await.expect("the third write succeeds");
    assert_eq!(c.emulator.writes("", "configmaps"), 1, "failed writes change nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pagination_is_consistent_and_continue_tokens_expire() {
    let c = Cluster::start().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client(), "default");
    for i in 0..7 {
        api.create(&PostParams::default(), &cm(&format!("c{i}"), &[])).await.expect("create");
    }
    let first = api.list(&kube::api::ListParams::default().limit(3)).await.expect("page 1");
    let token = first.metadata.continue_.clone().expect("continue token");
    api.create(&PostParams::default(), &cm("c9", &[])).await.expect("create between pages");
    let second = api.list(&kube::api::ListParams::default().limit(100).continue_token(&token)).await.expect("page 2");
    let names: Vec<String> = first.items.iter().chain(second.items.iter()).map(|c| c.name_any()).collect();
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]);
    assert_eq!(first.metadata.resource_version, second.metadata.resource_version);
    c.emulator.compact();
    let err = api.list(&kube::api::ListParams::default().limit(3).continue_token(&token)).await.expect_err("expired token");
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 410 && s.reason == "Expired"), "{err:?}");
    let _ = api.list(&Default::default()).await.expect("a fresh list works").items.len();
    let stream = api.watch(&WatchParams::default().timeout(1), "0").await.expect("watch from 0");
    let replay: Vec<_> = stream.try_collect().await.expect("stream");
    let added = replay.iter().filter(|e| matches!(e, WatchEvent::Added(_))).count();
    assert_eq!(added, 8, "resourceVersion 0 replays the current state as ADDED");
}
