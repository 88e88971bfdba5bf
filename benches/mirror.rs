//! Mirror benchmarks, printed as figures (nothing here asserts a speed):
//!
//! 1. Mirror lag: from a lock item's PutItem returning to its StateLock being visible through
//!    the API (a kube watcher), p50 and p99 over 200 locks, in Scan mode (1 s interval) and in
//!    Streams mode.
//! 2. DynamoDB read cost: read capacity units per hour for a table of 10,000 states (digest items)
//!    with 50 held locks at one-second freshness, mirror in Streams mode versus a naive "full Scan
//!    every second" baseline measured in the same run, both counted with `dynamo::capacity` (item
//!    sizes summed per Scan page and rounded up to 4 KB, eventually consistent = half a unit;
//!    consistent GetItem = one unit per 4 KB item).
//!
//! Needs moto in the repository's .venv (bash .ci/install). Run:
//! `cargo bench --bench mirror` (BENCH_SECONDS sets the cost window, default 30).

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use common::{create_table, db, moto, percentile, put_lock, rig};
use futures::StreamExt;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use statelock::{
    crd::{LockSource, StateLock},
    dynamo,
};

/// Lag of `n` locks put every `gap`.
async fn lag(url: &str, table: &str, mode: &str, n: usize, gap: Duration) -> Vec<Duration> {
    let rig = rig(url, table, serde_json::json!({"sync": {"mode": mode, "interval": "1s"}})).await;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut config = kube::Config::new(rig.emulator.url().parse().expect("url"));
    config.default_namespace = "default".into();
    let api: Api<StateLock> = Api::namespaced(kube::Client::try_from(config).expect("client"), "default");
    let seen_w = seen.clone();
    let watch = tokio::spawn(async move {
        let mut s = watcher(api, watcher::Config::default()).default_backoff().applied_objects().boxed();
        while let Some(Ok(o)) = s.next().await {
            seen_w.lock().expect("lock").entry(o.spec.lock_id.clone()).or_insert_with(Instant::now);
        }
    });
    // Let the first pass settle (the table is empty).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = db(url).await;
    let mut written = Vec::with_capacity(n);
    for i in 0..n {
        put_lock(&client, table, i, mode).await;
        written.push((format!("tfstate/{mode}{i}/terraform.tfstate"), Instant::now()));
        tokio::time::sleep(gap).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = { seen.lock().expect("lock").len() >= n };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().expect("lock").clone();
    if seen.len() < n {
        let src = Api::<LockSource>::namespaced(rig.mirror.client.clone(), "default").get("bench").await.expect("LockSource");
        eprintln!("only {} of {n} locks became visible; LockSource status: {:?}", seen.len(), src.status);
    }
    let mut lags: Vec<Duration> = written.iter().filter_map(|(id, t)| seen.get(id).map(|s| s.saturating_duration_since(*t))).collect();
    assert_eq!(lags.len(), n, "every lock became visible");
    lags.sort();
    rig.cancel.cancel();
    watch.abort();
    lags
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let m = moto();
    let client = db(&m.url).await;

    // 1. Lag.
    create_table(&client, "lag-scan", false).await;
    create_table(&client, "lag-streams", true).await;
    let scan = lag(&m.url, "lag-scan", "Scan", 200, Duration::from_millis(40)).await;
    let streams = lag(&m.url, "lag-streams", "Streams", 200, Duration::from_millis(40)).await;
    println!("statelock mirror benchmarks (2 cores, moto 5.2.5 + API emulator, mirror in-process)");
    println!("mirror lag, PutItem returned -> StateLock visible through the API, 200 locks:");
    for (name, l) in [("Scan, 1s interval", &scan), ("Streams", &streams)] {
        println!(
            "  {name:<18} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms",
            ms(percentile(l, 0.5)),
            ms(percentile(l, 0.99)),
            ms(*l.last().expect("lags"))
        );
    }

    // 2. Read cost: 10,000 states (digest items) and 50 held locks.
    create_table(&client, "cost", true).await;
    for chunk in 0..400 {
        let reqs: Vec<WriteRequest> = (0..25)
            .map(|i| {
                let n = chunk * 25 + i;
                let put = PutRequest::builder()
                    .item("LockID", AttributeValue::S(format!("tfstate/state{n}/terraform.tfstate-md5")))
                    .item("Digest", AttributeValue::S(format!("{n:032x}")))
                    .build()
                    .expect("put");
                WriteRequest::builder().put_request(put).build()
            })
            .collect();
        client.batch_write_item().request_items("cost", reqs).send().await.expect("batch");
    }
    for i in 0..50 {
        put_lock(&client, "cost", i, "state").await;
    }
    let rig = rig(&m.url, "cost", serde_json::json!({"sync": {"mode": "Streams", "interval": "1s"}})).await;
    // The initial full Scan: in Streams mode it repeats once an hour (the safety-net rescan).
    while rig.mirror.read_units() == 0.0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let initial_scan = rig.mirror.read_units();
    let started = Instant::now();
    // One lock taken and one released every second, as a busy team would.
    let mut t = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        put_lock(&client, "cost", 1000 + t, "churn").await;
        if t > 0 {
            let id = format!("tfstate/churn{}/terraform.tfstate", 1000 + t - 1);
            client.delete_item().table_name("cost").key("LockID", AttributeValue::S(id)).send().await.expect("delete");
        }
        t += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let window = started.elapsed().as_secs_f64();
    let churn_units = rig.mirror.read_units() - initial_scan;
    rig.cancel.cancel();
    // Baseline, same table, same process: a full Scan every second for the same window.
    let started = Instant::now();
    let mut baseline_units = 0.0;
    let mut scans = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        let tick = Instant::now();
        baseline_units += dynamo::scan_table(&client, "cost").await.expect("scan").read_units;
        scans += 1;
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }
    let baseline_window = started.elapsed().as_secs_f64();
    let per_hour = |u: f64, w: f64| u * 3600.0 / w;
    let per_scan = baseline_units / f64::from(scans);
    // The baseline as defined (one full Scan every second), priced from the scans measured; the
    // loop itself may run fewer scans when the server cannot scan 10,000 items in a second.
    let baseline_hour = per_scan * 3600.0;
    let mirror_hour = initial_scan + per_hour(churn_units, window);
    println!("DynamoDB read cost, 10,000 states + 50 held locks, one lock change per second, {seconds} s windows:");
    println!(
        "  naive full Scan every second: {baseline_hour:>10.0} RCU/hour ({per_scan:.1} RCU per scan; the loop managed {scans} scans in {baseline_window:.0} s on moto)"
    );
    println!(
        "  mirror, Streams mode:         {mirror_hour:>10.1} RCU/hour (one full Scan an hour: {initial_scan:.1} RCU; reads caused by the churn: {churn_units:.1} RCU in {window:.0} s)"
    );
    println!("  ratio mirror / baseline:      {:>10.3} %", 100.0 * mirror_hour / baseline_hour);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
