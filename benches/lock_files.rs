//! S3 lock-file benchmarks, printed as figures (nothing here asserts a speed):
//!
//! 1. Lag in listing mode (`sync.interval` 1 s) and in event mode (S3 Event Notifications to
//!    SQS, `resyncInterval` 5m): from a lock file's PutObject returning to its StateLock being
//!    visible through the API (a kube watcher), p50 and p99 over 200 locks.
//! 2. Cost: S3 and SQS requests per hour, and their price as AWS bills them, for a bucket of
//!    10,000 states and 50 held locks at 1 s freshness, first with nothing changing, then with one
//!    lock change a second (a lock file taken and another released), against a naive "list the bucket and read every lock file
//!    every second" run against the same bucket in the same process. Event mode's full listings
//!    (one per `resyncInterval`) are counted at their rate per hour, whether or not one fell in the
//!    window, and so are the messages S3 sends to the queue (SQS bills the queue's owner).
//!
//! Prices: list prices, us-east-1, November 2026: S3 Standard LIST (and PUT) $0.005 per 1,000
//! requests, GET $0.0004 per 1,000, DELETE free; SQS standard queue $0.40 per million requests
//! (free tier ignored).
//!
//! Needs moto in the repository's .venv (bash .ci/install). Run:
//! `cargo bench --bench lock_files` (BENCH_SECONDS sets the cost window, default 30;
//! STATELOCK_BENCH_STATES the bucket's state objects, default 10000).

mod common;

use std::time::{Duration, Instant};

use common::{Seen, moto, percentile, rig};
use futures::{StreamExt, stream};
use statelock::{
    metrics::{S3RequestLabels, SqsRequestLabels},
    s3,
};

const LIST_PER_1000: f64 = 0.005;
const GET_PER_1000: f64 = 0.0004;
const SQS_PER_MILLION: f64 = 0.40;
/// Event mode's safety-net listing, as configured below.
const RESYNC: Duration = Duration::from_secs(300);
const BUCKET: &str = "tfstate";

async fn s3_client(url: &str) -> aws_sdk_s3::Client {
    s3::client("us-east-1", Some(url), Some(common::fake_credentials())).await
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
    let listing_spec = serde_json::json!({
        "dynamodb": null,
        "s3": {"bucket": BUCKET, "region": "us-east-1", "endpoint": url, "credentialsSecretRef": {"name": "aws"}},
        "sync": {"interval": "1s"}
    });
    let listing = run_mode(&m.url, &client, listing_spec, "listing", seconds).await;

    // statelock in event mode: the bucket sends its lock files' events to a queue.
    let sqs = aws_sdk_sqs::Client::new(&statelock::dynamo::sdk_config("us-east-1", Some(&m.url), Some(common::fake_credentials())).await);
    let queue_url = sqs.create_queue().queue_name("statelock-bench").send().await.expect("queue").queue_url.expect("url");
    configure_notifications(&client, "arn:aws:sqs:us-east-1:123456789012:statelock-bench").await;
    let events_spec = serde_json::json!({
        "dynamodb": null,
        "s3": {"bucket": BUCKET, "region": "us-east-1", "endpoint": url, "credentialsSecretRef": {"name": "aws"},
               "events": {"queueUrl": queue_url, "resyncInterval": format!("{}s", RESYNC.as_secs())}},
        "sync": {"interval": "1s"}
    });
    let events = run_mode(&m.url, &client, events_spec, "events", seconds).await;

    for (name, r) in [("listing mode (1 s)", &listing), ("event mode (SQS, resync 5m)", &events)] {
        println!(
            "lag in {name}, PutObject returned -> StateLock visible through the API, 200 locks 40 ms apart: p50 {:.1} ms, p99 {:.1} ms",
            ms(percentile(&r.lag, 0.5)),
            ms(percentile(&r.lag, 0.99))
        );
    }
    let cost = |lists: f64, gets: f64, sqs: f64| dollars_per_hour(lists, gets) + sqs * SQS_PER_MILLION / 1e6;
    println!("cost per hour, {states} states + 50 held locks, AWS list prices ({seconds} s windows):");
    println!("  {:<62} {:>9} {:>9} {:>9} {:>10} {:>8}", "", "LIST/h", "GET/h", "SQS/h", "$/h", "% naive");
    println!(
        "  {:<62} {:>9.0} {:>9.0} {:>9.0} {:>10.4} {:>7.1}%",
        "naive: list + read every lock file every 1 s", naive_lists, naive_gets, 0.0, naive, 100.0
    );
    for (name, r) in [("statelock listing mode, 1 s", &listing), ("statelock event mode, resync 5m", &events)] {
        let (l, g, q) = r.quiet;
        let c = cost(l, g, q);
        println!(
            "  {:<62} {:>9.0} {:>9.0} {:>9.0} {:>10.4} {:>7.1}%",
            format!("{name}, locks held, no change"),
            l,
            g,
            q,
            c,
            100.0 * c / naive
        );
        let c = cost(r.lists, r.gets, r.sqs);
        let label = format!("{name}, one lock change a second");
        println!("  {:<62} {:>9.0} {:>9.0} {:>9.0} {:>10.4} {:>7.1}%", label, r.lists, r.gets, r.sqs, c, 100.0 * c / naive);
    }
    println!(
        "  (event mode: {} LIST requests per full listing, counted {} times an hour; {} LIST requests made during its window)",
        events.per_listing,
        3600 / RESYNC.as_secs(),
        events.window_lists
    );
}

/// What one mode measured: lag samples, and requests per hour.
struct Measured {
    lag: Vec<Duration>,
    lists: f64,
    gets: f64,
    /// SQS requests per hour: statelock's ReceiveMessage and DeleteMessageBatch, and the
    /// messages S3 sends (one per lock-file event).
    sqs: f64,
    /// LIST requests made during the churn window, and per full listing.
    window_lists: u64,
    per_listing: u64,
    /// LIST, GET and SQS requests per hour with the locks held and nothing changing.
    quiet: (f64, f64, f64),
}

async fn configure_notifications(client: &aws_sdk_s3::Client, queue_arn: &str) {
    use aws_sdk_s3::types::{
        Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter, QueueConfiguration, S3KeyFilter,
    };
    let filter = NotificationConfigurationFilter::builder()
        .key(S3KeyFilter::builder().filter_rules(FilterRule::builder().name(FilterRuleName::Suffix).value(".tflock").build()).build())
        .build();
    let rule = QueueConfiguration::builder()
        .queue_arn(queue_arn)
        .events(Event::from("s3:ObjectCreated:*"))
        .events(Event::from("s3:ObjectRemoved:*"))
        .filter(filter)
        .build()
        .expect("queue configuration");
    client
        .put_bucket_notification_configuration()
        .bucket(BUCKET)
        .notification_configuration(NotificationConfiguration::builder().queue_configurations(rule).build())
        .send()
        .await
        .expect("notification configuration");
}

/// One operator with `spec`: the lag of 200 new locks, then the requests of `seconds` of churn.
async fn run_mode(moto_url: &str, client: &aws_sdk_s3::Client, spec: serde_json::Value, tag: &str, seconds: u64) -> Measured {
    let r = rig(moto_url, "unused", spec).await;
    let seen = Seen::start(&r.emulator.url());
    seen.wait(&format!("{BUCKET}/state0/terraform.tfstate")).await;
    let s3_count = |request: &str| {
        let labels = S3RequestLabels { namespace: "default".into(), source: "bench".into(), request: request.into() };
        r.mirror.metrics.locks.s3_requests.get_or_create(&labels).get()
    };
    let sqs_count = |request: &str| {
        let labels = SqsRequestLabels { namespace: "default".into(), source: "bench".into(), request: request.into() };
        r.mirror.metrics.locks.sqs_requests.get_or_create(&labels).get()
    };
    // One full listing's requests (the first pass made exactly one).
    let per_listing = s3_count("LIST");
    // Lag: 200 locks taken 40 ms apart.
    let mut written = Vec::new();
    for i in 0..200 {
        let id = take(client, &format!("{tag}-lag{i}/terraform.tfstate")).await;
        written.push((id, Instant::now()));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut lag = Vec::new();
    for (id, t) in &written {
        lag.push(seen.wait(id).await.saturating_duration_since(*t));
    }
    lag.sort();
    // Cost with the 50 locks held and nothing changing.
    let event_mode = tag == "events";
    let (lists0, gets0) = (s3_count("LIST"), s3_count("GET"));
    let sqs0 = sqs_count("ReceiveMessage") + sqs_count("DeleteMessageBatch");
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let quiet_window = started.elapsed().as_secs_f64();
    let quiet_per_hour = |n: u64| n as f64 * 3600.0 / quiet_window;
    let quiet = if event_mode {
        let listings = 3600.0 / RESYNC.as_secs_f64();
        (
            // The safety-net listings at their rate, and any made in the window (a fallback).
            listings * per_listing as f64 + quiet_per_hour(s3_count("LIST") - lists0),
            quiet_per_hour(s3_count("GET") - gets0) + listings,
            quiet_per_hour(sqs_count("ReceiveMessage") + sqs_count("DeleteMessageBatch") - sqs0),
        )
    } else {
        (quiet_per_hour(s3_count("LIST") - lists0), quiet_per_hour(s3_count("GET") - gets0), 0.0)
    };
    // Cost: one lock change a second (a lock file taken, the previous one released).
    let (lists0, gets0) = (s3_count("LIST"), s3_count("GET"));
    let sqs0 = sqs_count("ReceiveMessage") + sqs_count("DeleteMessageBatch");
    let started = Instant::now();
    let mut t = 0;
    let mut changes = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        take(client, &format!("{tag}-churn{t}/terraform.tfstate")).await;
        changes += 1;
        if t > 0 {
            client
                .delete_object()
                .bucket(BUCKET)
                .key(format!("{tag}-churn{}/terraform.tfstate.tflock", t - 1))
                .send()
                .await
                .expect("delete");
            changes += 1;
        }
        t += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let window = started.elapsed().as_secs_f64();
    let window_lists = s3_count("LIST") - lists0;
    let per_hour = |n: u64| n as f64 * 3600.0 / window;
    let (lists, gets, sqs) = if event_mode {
        // Listings at their configured rate (each with its notification check, one GET), the
        // rest as measured.
        let listings = 3600.0 / RESYNC.as_secs_f64();
        (
            listings * per_listing as f64,
            per_hour(s3_count("GET") - gets0) + listings,
            per_hour(sqs_count("ReceiveMessage") + sqs_count("DeleteMessageBatch") - sqs0 + changes),
        )
    } else {
        (per_hour(s3_count("LIST") - lists0), per_hour(s3_count("GET") - gets0), 0.0)
    };
    r.cancel.cancel();
    Measured { lag, lists, gets, sqs, window_lists, per_listing, quiet }
}
