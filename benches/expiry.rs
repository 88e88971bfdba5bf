//! Release latency: from the holder pod's deletion as the API reports it (the DELETE returned) to
//! the lock item gone from DynamoDB, grace period 0, p50 and p99 over 200 releases. Prints
//! figures; asserts nothing about speed. Run: `cargo bench --bench expiry`.

mod common;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use common::{create_table, db, info, moto, percentile, rig};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use statelock::crd::{HolderState, StateLock};

const N: usize = 200;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let m = moto();
    let client = db(&m.url).await;
    create_table(&client, "tf-locks", true).await;
    let rig = rig(
        &m.url,
        "tf-locks",
        json!({"sync": {"mode": "Streams", "interval": "5s"}, "holders": {"namespaces": ["atlantis"], "hostnamePattern": "atlantis-[0-9]+"}, "expiry": {"mode": "Release", "gracePeriod": "0s"}}),
    )
    .await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "atlantis"}})).expect("ns");
    Api::<Namespace>::all(rig.client.clone()).create(&PostParams::default(), &ns).await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(rig.client.clone(), "atlantis");
    for i in 0..N {
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": format!("atlantis-{i}")}, "spec": {"containers": [{"name": "atlantis", "image": "atlantis"}]}}),
        )
        .expect("pod");
        pods.create(&PostParams::default(), &pod).await.expect("pod");
        pods.patch_status(&format!("atlantis-{i}"), &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running"}})))
            .await
            .expect("status");
    }
    let created = k8s_openapi::jiff::Timestamp::now().checked_add(k8s_openapi::jiff::SignedDuration::from_secs(1)).expect("t").to_string();
    for i in 0..N {
        let id = format!("tfstate/r{i}/terraform.tfstate");
        client
            .put_item()
            .table_name("tf-locks")
            .item("LockID", AttributeValue::S(id.clone()))
            .item("Info", AttributeValue::S(info(i, &format!("root@atlantis-{i}"), &id, &created)))
            .send()
            .await
            .expect("put");
    }
    let locks: Api<StateLock> = Api::namespaced(rig.client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let alive = locks
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .iter()
            .filter(|l| l.status.as_ref().and_then(|s| s.holder.as_ref()).is_some_and(|h| h.state == HolderState::Alive))
            .count();
        if alive == N {
            break;
        }
        assert!(Instant::now() < deadline, "only {alive} of {N} holders judged Alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut lat = Vec::with_capacity(N);
    for i in 0..N {
        let id = format!("tfstate/r{i}/terraform.tfstate");
        pods.delete(&format!("atlantis-{i}"), &DeleteParams::default()).await.expect("delete pod");
        let t0 = Instant::now();
        loop {
            let item = client
                .get_item()
                .table_name("tf-locks")
                .key("LockID", AttributeValue::S(id.clone()))
                .consistent_read(true)
                .send()
                .await
                .expect("get");
            if item.item.is_none() {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "lock {id} was not released");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    println!("statelock release latency (2 cores, moto 5.2.5 + API emulator, statelock in-process, grace period 0)");
    println!(
        "  pod DELETE returned -> lock item gone, {N} releases: p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().expect("latencies"))
    );
    rig.cancel.cancel();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
