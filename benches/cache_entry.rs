//! What one StateLock costs in the operator's shared cache: 10,000 StateLocks shaped like those
//! the operator writes (a lock held from a pod, with an established holder, and one held from a
//! laptop; two mirror conditions each) go into a reflector store as the watch delivers them, and
//! jemalloc's `stats.allocated` says how many bytes the store holds per StateLock. Measured as
//! the watch hands them over and as the operator keeps them ([`statelock::cluster::cached_lock`]),
//! in the same run. Prints figures; asserts nothing. Run: `cargo bench --bench cache_entry`.

use std::sync::Arc;

use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};
use statelock::crd::StateLock;

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const LOCKS: usize = 10_000;

fn allocated() -> usize {
    tikv_jemalloc_ctl::epoch::advance().expect("epoch");
    tikv_jemalloc_ctl::stats::allocated::read().expect("stats.allocated")
}

/// A StateLock as the API server serves it after the operator judged it (managedFields aside).
fn statelock(i: usize) -> Value {
    let (ns, source, stack) = (format!("ns-{:03}", i % 10), format!("src-{:02}", i / 100), format!("stack-{:03}", i % 100));
    let name = format!("tfstate-{source}-{stack}-{:010x}", i * 7919);
    let sha = format!("{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15);
    let pod_held = i % 50 < 2;
    let who = if pod_held { format!("root@app-{:03}", i % 50) } else { format!("dev@laptop-{i}") };
    let holder = if pod_held {
        json!({"state": "Alive", "reason": "PodRunning", "message": format!("the holder pod {ns}/app-{:03} shows no sign of having stopped", i % 50),
               "hostname": format!("app-{:03}", i % 50), "identifiedBy": "Hostname", "namespace": ns, "pod": format!("app-{:03}", i % 50),
               "uid": format!("1acc4402-c1e4-4824-9425-{:012x}", i),
               "established": {"namespace": ns, "pod": format!("app-{:03}", i % 50), "uid": format!("1acc4402-c1e4-4824-9425-{:012x}", i),
                               "by": "Hostname", "hostname": format!("app-{:03}", i % 50), "infoSha256": sha, "at": "2026-12-01T13:25:53Z"},
               "since": "2026-12-01T13:25:53Z"})
    } else {
        json!({"state": "External", "reason": "NoMatchingPod",
               "message": format!("no pod has hostname \"laptop-{i}\"; the holder runs outside the cluster (not expired automatically)"),
               "hostname": format!("laptop-{i}"), "since": "2026-12-01T13:25:53Z"})
    };
    json!({
        "apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock",
        "metadata": {
            "creationTimestamp": "2026-12-01T13:25:53Z", "generation": 1, "labels": {"statelock.dev/source": source},
            "name": name, "namespace": ns, "resourceVersion": format!("{}", 100_000 + i), "uid": format!("d09a3254-b0dc-4726-ba22-{:012x}", i),
            "ownerReferences": [{"apiVersion": "statelock.dev/v1alpha1", "blockOwnerDeletion": false, "controller": false, "kind": "LockSource",
                                 "name": source, "uid": "1f5726bb-2675-423c-94a4-130c402687dd"}],
        },
        "spec": {
            "source": source, "lockId": format!("tfstate/{source}/{stack}/terraform.tfstate"),
            "lockInfo": {"id": format!("{:08x}-0000-4000-8000-{:012x}", i, i), "operation": "OperationTypeApply", "info": "", "who": who,
                         "version": "1.11.4", "created": "2026-12-01T13:25:48.668376108Z", "path": format!("tfstate/{source}/{stack}/terraform.tfstate")},
            "operation": "apply", "infoSha256": sha, "storedIn": ["DynamoDB"],
        },
        "status": {
            "observedGeneration": 1, "phase": "Held", "holder": holder,
            "conditions": [
                {"lastTransitionTime": "2026-12-01T13:25:53Z", "message": "the lock item is a well-formed Terraform lock", "observedGeneration": 1,
                 "reason": "Parsed", "status": "True", "type": "InfoValid"},
                {"lastTransitionTime": "2026-12-01T13:25:53Z", "message": "held for less than staleAfter (60m0s)", "observedGeneration": 1,
                 "reason": "WithinStaleAfter", "status": "False", "type": "Stale"},
            ],
        },
    })
}

/// Bytes per StateLock held by a store filled with `LOCKS` StateLocks, each passed through `keep`.
fn per_lock(bodies: &[Vec<u8>], keep: impl Fn(&mut StateLock)) -> f64 {
    let before = allocated();
    let (store, mut writer) = reflector::store::<StateLock>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for body in bodies {
        let mut lock: StateLock = serde_json::from_slice(body).expect("StateLock");
        keep(&mut lock);
        writer.apply_watcher_event(&watcher::Event::InitApply(lock));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let held: Vec<Arc<StateLock>> = store.state();
    assert_eq!(held.len(), LOCKS);
    drop(held);
    let after = allocated();
    let bytes = after.saturating_sub(before) as f64 / LOCKS as f64;
    drop((store, writer));
    bytes
}

fn main() {
    let bodies: Vec<Vec<u8>> = (0..LOCKS).map(|i| serde_json::to_vec(&statelock(i)).expect("json")).collect();
    let json_bytes = bodies.iter().map(Vec::len).sum::<usize>() as f64 / LOCKS as f64;
    // Once to warm the allocator's metadata up, then measured.
    per_lock(&bodies, |_| {});
    let full = per_lock(&bodies, |_| {});
    let kept = per_lock(&bodies, statelock::cluster::cached_lock);
    println!("cache entry: {LOCKS} StateLocks in a reflector store ({json_bytes:.0} bytes of JSON each)");
    println!("  {:<40} {:>10}", "bytes per StateLock", "");
    println!("  {:<40} {:>10.0}", "as the watch delivers it", full);
    println!("  {:<40} {:>10.0} {:>7.2}x", "as the operator keeps it", kept, kept / full);
    println!(
        "  in place: StateLock {} bytes (ObjectMeta {}, spec {}, status {}), a store key {}",
        std::mem::size_of::<StateLock>(),
        std::mem::size_of::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(),
        std::mem::size_of::<statelock::crd::StateLockSpec>(),
        std::mem::size_of::<Option<statelock::crd::StateLockStatus>>(),
        std::mem::size_of::<reflector::ObjectRef<StateLock>>(),
    );
    // Where the rest goes: what leaving out each part of a StateLock as the watch delivers it
    // would save (a guide to the next cut, not something the operator does).
    type Part = fn(&mut StateLock);
    let parts: Vec<(&str, Part)> = vec![
        ("labels", |l| l.metadata.labels = None),
        ("ownerReferences", |l| l.metadata.owner_references = None),
        ("metadata but the name", |l| {
            let name = l.metadata.name.take();
            l.metadata = Default::default();
            l.metadata.name = name;
        }),
        ("spec", |l| l.spec = Default::default()),
        ("spec.lockInfo", |l| l.spec.lock_info = Default::default()),
        ("status", |l| l.status = None),
        ("status.conditions", |l| {
            if let Some(s) = l.status.as_mut() {
                s.conditions = Vec::new();
            }
        }),
        ("status.holder.message", |l| {
            if let Some(h) = l.status.as_mut().and_then(|s| s.holder.as_mut()) {
                h.message = None;
            }
        }),
    ];
    println!("  {:<40} {:>10}", "bytes per StateLock saved without", "");
    for (what, part) in parts {
        println!("  {:<40} {:>10.0}", what, full - per_lock(&bodies, part));
    }
}
