//! S3 lock-file benchmarks, printed as figures (nothing here asserts a speed):
//!
//! 1. Lag in listing mode (`sync.interval` 1 s): from a lock file's PutObject returning to its
//!    StateLock being visible through the API (a kube watcher), p50 and p99 over 200 locks.
//! 2. Cost: S3 requests per hour, and their price as S3 bills them, for a bucket of 10,000 states
//!    and 50 held locks at 1 s freshness with one lock change a second, against a naive
//!    "list the bucket and read every lock file every second" run against the same bucket in the
//!    same process.
//!
//! Prices: S3 Standard list prices, us-east-1, November 2026: LIST (and PUT) $0.005 per 1,000
//! requests, GET $0.0004 per 1,000, DELETE free.
//!
//! Needs moto in the repository's .venv (bash .ci/install). Run:
//! `cargo bench --bench lock_files` (BENCH_SECONDS sets the cost window, default 30;
//! STATELOCK_BENCH_STATES the bucket's state objects, default 10000).

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{moto, percentile, rig};
use futures::{StreamExt, stream};
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use statelock::{crd::StateLock, metrics::S3RequestLabels, s3};

const LIST_PER_1000: f64 = 0.005;
const GET_PER_1000: f64 = 0.0004;
const BUCKET: &str = "tfstate";

async fn s3_client(url: &str) -> aws_sdk_s3::Client {
    let config = statelock::dynamo::sdk_config(
        "us-east-1",
        Some(url),
        Some(statelock::dynamo::StaticCredentials {
            access_key_id: "AKIAFAKE".into(),
            secret_access_key: "fake".into(),
            session_token: None,
        }),
    )
    .await;
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(true).build())
}

fn info(id: &str, lock_id: &str) -> String {
    serde_json::json!({"ID": id, "Operation": "OperationTypeApply", "Info": "", "Who": "root@runner", "Version": "1.11.4", "Created": "2026-11-30T10:00:00Z", "Path": lock_id}).to_string()
}

async fn put(client: &aws_sdk_s3::Client, key: &str, body: String) {
    client.put_object().bucket(BUCKET).key(key).body(body.into_bytes().into()).send().await.expect("put");
}

/// Take a lock: its lock file. Returns the LockID.
async fn take(client: &aws_sdk_s3::Client, state: &str) -> String {
    let lock_id = format!("{BUCKET}/{state}");
    put(client, &format!("{state}.tflock"), info(&format!("id-{state}"), &lock_id)).await;
    lock_id
}

/// Watches the StateLocks of `default` and records when each LockID first became visible.
struct Seen {
    at: Arc<Mutex<HashMap<String, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Seen {
    fn start(emulator_url: &str) -> Self {
        let mut config = kube::Config::new(emulator_url.parse().expect("url"));
        config.default_namespace = "default".into();
        let api: Api<StateLock> = Api::namespaced(kube::Client::try_from(config).expect("client"), "default");
        let at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let w = at.clone();
        let task = tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default()).default_backoff().applied_objects().boxed();
            while let Some(Ok(o)) = s.next().await {
                w.lock().expect("seen").entry(o.spec.lock_id.clone()).or_insert_with(Instant::now);
            }
        });
        Self { at, task }
    }

    async fn wait(&self, id: &str) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(t) = self.at.lock().expect("seen").get(id) {
                return *t;
            }
            assert!(Instant::now() < deadline, "{id} never became visible");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Seen {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn dollars_per_hour(lists_per_hour: f64, gets_per_hour: f64) -> f64 {
    lists_per_hour * LIST_PER_1000 / 1000.0 + gets_per_hour * GET_PER_1000 / 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let states: usize = std::env::var("STATELOCK_BENCH_STATES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let m = moto();
    let client = s3_client(&m.url).await;
    client.create_bucket().bucket(BUCKET).send().await.expect("bucket");
    println!("statelock lock-file benchmarks (2 cores, moto S3 + API emulator, mirror in-process)");
    let filled = Instant::now();
    stream::iter(0..states)
        .for_each_concurrent(16, |i| {
            let client = client.clone();
            async move { put(&client, &format!("state{i}/terraform.tfstate"), "{\"version\":4}".into()).await }
        })
        .await;
    for i in 0..50 {
        take(&client, &format!("state{i}/terraform.tfstate")).await;
    }
    println!("  bucket: {states} state objects and 50 lock files, written in {:.0} s", filled.elapsed().as_secs_f64());

    // The naive baseline: list everything and read every lock file, every second.
    let started = Instant::now();
    let (mut lists, mut gets) = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(seconds.min(10)) {
        let tick = Instant::now();
        let listing = s3::list_lock_files(&client, BUCKET, "").await.expect("list");
        lists += listing.list_requests;
        for f in &listing.files {
            s3::read_lock_file(&client, BUCKET, &f.key).await.expect("get");
            gets += 1;
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }
    let window = started.elapsed().as_secs_f64();
    let (naive_lists, naive_gets) = (lists as f64 * 3600.0 / window, gets as f64 * 3600.0 / window);
    let naive = dollars_per_hour(naive_lists, naive_gets);

    // statelock, listing every second.
    let url = m.url.clone();
    let spec = serde_json::json!({
        "dynamodb": null,
        "s3": {"bucket": BUCKET, "region": "us-east-1", "endpoint": url, "credentialsSecretRef": {"name": "aws"}},
        "sync": {"interval": "1s"}
    });
    let r = rig(&m.url, "unused", spec).await;
    let seen = Seen::start(&r.emulator.url());
    seen.wait(&format!("{BUCKET}/state0/terraform.tfstate")).await;
    // Lag: 200 locks taken 40 ms apart.
    let mut written = Vec::new();
    for i in 0..200 {
        let id = take(&client, &format!("lag{i}/terraform.tfstate")).await;
        written.push((id, Instant::now()));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut lag = Vec::new();
    for (id, t) in &written {
        lag.push(seen.wait(id).await.saturating_duration_since(*t));
    }
    lag.sort();
    // Cost: one lock change a second (a lock file taken, the previous one released).
    let count = |request: &str| {
        let labels = S3RequestLabels { namespace: "default".into(), source: "bench".into(), request: request.into() };
        r.mirror.metrics.locks.s3_requests.get_or_create(&labels).get()
    };
    let (lists0, gets0) = (count("LIST"), count("GET"));
    let started = Instant::now();
    let mut t = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        take(&client, &format!("churn{t}/terraform.tfstate")).await;
        if t > 0 {
            client.delete_object().bucket(BUCKET).key(format!("churn{}/terraform.tfstate.tflock", t - 1)).send().await.expect("delete");
        }
        t += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let window = started.elapsed().as_secs_f64();
    let lists = (count("LIST") - lists0) as f64 * 3600.0 / window;
    let gets = (count("GET") - gets0) as f64 * 3600.0 / window;
    let ours = dollars_per_hour(lists, gets);
    r.cancel.cancel();

    println!(
        "lag in listing mode (1 s), PutObject returned -> StateLock visible through the API, 200 locks 40 ms apart: p50 {:.1} ms, p99 {:.1} ms",
        ms(percentile(&lag, 0.5)),
        ms(percentile(&lag, 0.99))
    );
    println!("cost per hour, {states} states + 50 held locks, one lock change a second ({seconds} s window), S3 list prices:");
    println!("  {:<44} {:>10} {:>10} {:>10} {:>8}", "", "LIST/h", "GET/h", "$/h", "% naive");
    println!(
        "  {:<44} {:>10.0} {:>10.0} {:>10.4} {:>7.1}%",
        "naive: list + read every lock file every 1 s", naive_lists, naive_gets, naive, 100.0
    );
    println!("  {:<44} {:>10.0} {:>10.0} {:>10.4} {:>7.1}%", "statelock listing mode, 1 s", lists, gets, ours, 100.0 * ours / naive);
}
