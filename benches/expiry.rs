//! Release latency: from the holder pod's deletion as the API reports it (the DELETE returned) to
//! the lock gone from its store, grace period 0, p50 and p99 over 200 releases: DynamoDB lock
//! items (the table followed through its stream), then S3 lock files (the bucket listed every
//! second; the release reads the file and deletes it with If-Match). Prints figures; asserts
//! nothing about speed. Run: `cargo bench --bench expiry`.

mod common;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use common::{create_table, db, info, moto, percentile, rig};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use statelock::crd::{HolderState, StateLock};

const N: usize = 200;

/// Where the locks are.
#[derive(Clone, Copy, PartialEq)]
enum Store {
    Items,
    Files,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let m = moto();
    println!("statelock release latency (2 cores, moto 5.2.5 + API emulator, statelock in-process, grace period 0)");
    for store in [Store::Items, Store::Files] {
        let lat = measure(&m.url, store).await;
        println!(
            "  pod DELETE returned -> {}, {N} releases: p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
            if store == Store::Items { "lock item gone (DynamoDB, Streams mode)" } else { "lock file gone (S3, listing mode 1 s)" },
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            ms(*lat.last().expect("latencies"))
        );
    }
}

async fn measure(moto_url: &str, store: Store) -> Vec<Duration> {
    let client = db(moto_url).await;
    let s3 = statelock::s3::client("us-east-1", Some(moto_url), Some(common::fake_credentials())).await;
    let policy = json!({"holders": {"namespaces": ["atlantis"], "hostnamePattern": "atlantis-[0-9]+"}, "expiry": {"mode": "Release", "gracePeriod": "0s"}});
    let mut spec = match store {
        Store::Items => {
            create_table(&client, "tf-locks", true).await;
            json!({"sync": {"mode": "Streams", "interval": "5s"}})
        }
        Store::Files => {
            s3.create_bucket().bucket("tfstate").send().await.expect("bucket");
            json!({"dynamodb": null, "s3": {"bucket": "tfstate", "region": "us-east-1", "endpoint": moto_url, "credentialsSecretRef": {"name": "aws"}}, "sync": {"interval": "1s"}})
        }
    };
    for (k, v) in policy.as_object().expect("policy") {
        spec[k] = v.clone();
    }
    let rig = rig(moto_url, "tf-locks", spec).await;
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
        let body = info(i, &format!("root@atlantis-{i}"), &id, &created);
        match store {
            Store::Items => {
                client
                    .put_item()
                    .table_name("tf-locks")
                    .item("LockID", AttributeValue::S(id.clone()))
                    .item("Info", AttributeValue::S(body))
                    .send()
                    .await
                    .expect("put");
            }
            Store::Files => {
                s3.put_object()
                    .bucket("tfstate")
                    .key(format!("r{i}/terraform.tfstate.tflock"))
                    .body(body.into_bytes().into())
                    .send()
                    .await
                    .expect("put");
            }
        }
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
            let gone = match store {
                Store::Items => client
                    .get_item()
                    .table_name("tf-locks")
                    .key("LockID", AttributeValue::S(id.clone()))
                    .consistent_read(true)
                    .send()
                    .await
                    .expect("get")
                    .item
                    .is_none(),
                Store::Files => match s3.head_object().bucket("tfstate").key(format!("r{i}/terraform.tfstate.tflock")).send().await {
                    Ok(_) => false,
                    Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => true,
                    Err(e) => panic!("HeadObject: {e:?}"),
                },
            };
            if gone {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "lock {id} was not released");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    rig.cancel.cancel();
    // The next measurement starts from an empty bucket and table of its own.
    if store == Store::Items {
        client.delete_table().table_name("tf-locks").send().await.expect("delete table");
    }
    lat
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
