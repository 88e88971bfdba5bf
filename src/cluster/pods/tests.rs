use serde_json::json;

use super::*;

fn source(ns: &str, spec: serde_json::Value) -> LockSource {
    let mut spec = spec;
    spec["dynamodb"] = json!({"tableName": "tf-locks", "region": "us-east-1"});
    let mut s = LockSource::new("locks", serde_json::from_value(spec).expect("spec"));
    s.metadata.namespace = Some(ns.into());
    s
}

fn pod(ns: &str, name: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("{ns}-{name}"), "labels": {"app": "x"},
                     "annotations": {"big": "y".repeat(4096), "statelock.dev/holder-container": "runner"}, "managedFields": [{"manager": "kubectl"}]},
        "spec": {"hostname": "h", "hostNetwork": false, "nodeName": "n1",
                 "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "B"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "containerStatuses": [{"name": "c", "image": "i", "imageID": "sha", "ready": true, "restartCount": 2,
                                          "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}
    }))
    .expect("pod")
}

fn ns_set(list: &[&str]) -> PodScope {
    PodScope::Namespaces(list.iter().map(|s| (*s).to_owned()).collect())
}

#[test]
fn scope_is_the_union_of_what_served_sources_name_and_everything_when_one_needs_it() {
    assert_eq!(PodScope::of([]), ns_set(&[]));
    let a = source("team-a", json!({}));
    let b = source("team-b", json!({"holders": {"namespaces": ["runners", "ci"]}, "gateway": {"allowedNamespaces": ["apps"]}}));
    assert_eq!(PodScope::of([&a, &b]), ns_set(&["apps", "ci", "runners", "team-a", "team-b"]));
    let star = source("team-c", json!({"holders": {"namespaces": ["*"]}}));
    assert_eq!(PodScope::of([&a, &star]), PodScope::All);
    // Admitting callers by address needs every pod to tell a pod from a non-pod.
    let ranges = source("infra", json!({"gateway": {"allowedSourceRanges": ["10.0.0.0/8"]}}));
    assert_eq!(PodScope::of([&ranges, &a]), PodScope::All);
    // Names become parts of API paths: anything but a namespace name is left out (and such a
    // LockSource is refused anyway).
    let odd = source(
        "team-d",
        json!({"holders": {"namespaces": ["ok", "a/b"]}, "gateway": {"allowedNamespaces": ["x?watch=1", "", "Caps", "fine"]}}),
    );
    assert_eq!(PodScope::of([&odd]), ns_set(&["fine", "ok", "team-d"]));
    assert!(odd.spec.problems().iter().any(|p| p.contains("holders.namespaces")), "{:?}", odd.spec.problems());
    assert_eq!(odd.spec.problems().iter().filter(|p| p.contains("gateway.allowedNamespaces")).count(), 3, "{:?}", odd.spec.problems());
}

#[test]
fn trim_keeps_what_decisions_read_and_drops_the_rest() {
    let p = trim(pod("a", "p", "10.0.0.1"));
    let v = serde_json::to_value(&p).expect("json");
    assert_eq!(v["metadata"]["uid"], "a-p");
    assert!(v["metadata"].get("labels").is_none());
    assert_eq!(v["metadata"]["annotations"], json!({"statelock.dev/holder-container": "runner"}), "the judge reads this one");
    assert!(v["metadata"].get("managedFields").is_none());
    assert_eq!(v["spec"]["hostname"], "h");
    assert_eq!(v["spec"]["containers"], json!([]));
    assert_eq!(v["status"]["containerStatuses"][0]["restartCount"], 2);
    assert_eq!(v["status"]["containerStatuses"][0]["state"]["running"]["startedAt"], "2026-01-01T00:00:00Z");
    assert_eq!(v["status"]["podIP"], "10.0.0.1");
    // The facts the judge reads are the same before and after trimming.
    let full = pod("a", "p", "10.0.0.1");
    assert_eq!(format!("{:?}", pod_facts(&full)), format!("{:?}", pod_facts(&p)));
    assert!(serde_json::to_vec(&p).expect("json").len() * 4 < serde_json::to_vec(&full).expect("json").len());
}

fn key(ns: &str) -> WatchKey {
    WatchKey::Namespace(ns.into())
}

fn generation_of(cache: &PodCache, k: &WatchKey) -> u64 {
    cache.read().watches.get(k).map(|w| w.generation).expect("watch")
}

fn names(pods: &[Arc<Pod>]) -> Vec<String> {
    let mut v: Vec<String> = pods.iter().map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())).collect();
    v.sort();
    v
}

#[test]
fn complete_only_when_every_watch_listed_and_relists_replace_and_announce() {
    let cache = PodCache::default();
    let mut announced = cache.subscribe();
    assert!(!cache.is_complete(), "no scope yet: not complete");
    let started = cache.rescope(ns_set(&["a", "b"]));
    assert_eq!(started.len(), 2);
    assert!(!cache.is_complete());
    let (ga, gb) = (generation_of(&cache, &key("a")), generation_of(&cache, &key("b")));
    cache.apply(&key("a"), ga, watcher::Event::Init);
    cache.apply(&key("a"), ga, watcher::Event::InitApply(pod("a", "p1", "10.0.0.1")));
    assert!(cache.get("a", "p1").is_none(), "a list in progress is not visible");
    cache.apply(&key("a"), ga, watcher::Event::InitDone);
    assert!(cache.get("a", "p1").is_some());
    assert!(!cache.is_complete(), "b has not listed");
    cache.apply(&key("b"), gb, watcher::Event::Init);
    cache.apply(&key("b"), gb, watcher::Event::InitDone);
    assert!(cache.is_complete());
    assert_eq!(announced.try_recv().map(|p| p.name_any()).ok(), Some("p1".into()));

    // Changes are stored, then announced.
    cache.apply(&key("a"), ga, watcher::Event::Apply(pod("a", "p2", "10.0.0.2")));
    let p2 = announced.try_recv().expect("announced");
    assert!(cache.get("a", &p2.name_any()).is_some());
    assert_eq!(names(&cache.with_ip("10.0.0.2".parse().expect("ip"))), ["a/p2"]);
    // An address that moves leaves its old owner.
    cache.apply(&key("a"), ga, watcher::Event::Apply(pod("a", "p2", "10.0.0.3")));
    assert!(cache.with_ip("10.0.0.2".parse().expect("ip")).is_empty());
    let _ = announced.try_recv();

    // A relist replaces the watch's pods and announces the ones it found gone.
    cache.apply(&key("a"), ga, watcher::Event::Init);
    cache.apply(&key("a"), ga, watcher::Event::InitApply(pod("a", "p3", "10.0.0.4")));
    cache.apply(&key("a"), ga, watcher::Event::InitDone);
    assert_eq!(names(&cache.in_namespaces(&HolderNamespaces::Only(vec!["a".into()]))), ["a/p3"]);
    assert!(cache.with_ip("10.0.0.1".parse().expect("ip")).is_empty() && cache.with_ip("10.0.0.3".parse().expect("ip")).is_empty());
    let mut relisted = Vec::new();
    while let Ok(p) = announced.try_recv() {
        relisted.push(p);
    }
    assert_eq!(names(&relisted), ["a/p1", "a/p2", "a/p3"]);

    // A namespace's watch stores only that namespace's pods, whatever it is sent.
    cache.apply(&key("a"), ga, watcher::Event::Apply(pod("b", "stray", "10.0.0.8")));
    assert!(cache.get("b", "stray").is_none() && cache.with_ip("10.0.0.8".parse().expect("ip")).is_empty());
    let _ = announced.try_recv();

    // Leaving a namespace drops its pods; a late event of its stopped watch changes nothing.
    cache.rescope(ns_set(&["b", "c"]));
    assert!(cache.get("a", "p3").is_none());
    assert!(!cache.is_complete(), "c has not listed");
    cache.apply(&key("a"), ga, watcher::Event::Apply(pod("a", "late", "10.0.0.9")));
    assert!(cache.get("a", "late").is_none() && cache.with_ip("10.0.0.9".parse().expect("ip")).is_empty());
    // Coming back to a namespace starts a new watch; the old one's events stay ignored.
    cache.rescope(ns_set(&["a", "b"]));
    let ga2 = generation_of(&cache, &key("a"));
    assert_ne!(ga, ga2);
    cache.apply(&key("a"), ga, watcher::Event::Apply(pod("a", "late", "10.0.0.9")));
    assert!(cache.get("a", "late").is_none());
    assert!(!cache.is_complete());
    cache.apply(&key("a"), ga2, watcher::Event::InitDone);
    assert!(cache.is_complete());

    // Everywhere, then back: starts over.
    cache.rescope(PodScope::All);
    assert!(cache.is_empty() && !cache.is_complete() && cache.covers_all());
    let g = generation_of(&cache, &WatchKey::All);
    cache.apply(&WatchKey::All, g, watcher::Event::Init);
    cache.apply(&WatchKey::All, g, watcher::Event::InitApply(pod("z", "p", "10.0.1.1")));
    cache.apply(&WatchKey::All, g, watcher::Event::InitApply(pod("y", "p", "10.0.1.2")));
    cache.apply(&WatchKey::All, g, watcher::Event::InitDone);
    assert!(cache.is_complete());
    assert_eq!(names(&cache.in_namespaces(&HolderNamespaces::All)), ["y/p", "z/p"]);
    cache.apply(&WatchKey::All, g, watcher::Event::Delete(pod("z", "p", "10.0.1.1")));
    assert_eq!(cache.len(), 1);
    assert!(cache.with_ip("10.0.1.1".parse().expect("ip")).is_empty());
    cache.rescope(ns_set(&[]));
    assert!(cache.is_empty() && cache.is_complete(), "no namespace to watch: complete and empty");
}
