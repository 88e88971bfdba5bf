//! Mirror benchmarks, printed as figures (nothing here asserts a speed):
//!
//! 1. Lag and cost, per stream poll interval: from a lock item's PutItem returning to its
//!    StateLock being visible through the API (a kube watcher), p50 and p99 over 100 locks, and
//!    what the mirror costs per hour as AWS bills it (stream read requests, table reads), for a
//!    table of 10,000 states (digest items) and 50 held locks, against a naive "full Scan every
//!    second" baseline measured on the same table in the same run. Scan mode (1 s) for reference,
//!    and the lag when each change is announced by the gateway (a nudge, as the gateway sends
//!    after a forwarded lock or unlock) at the slowest poll setting.
//! 2. Through stream trouble (moto behind the streams test double): the lag of the first change
//!    after a shard split and after the stream was replaced (a new ARN), and the Scans run while
//!    the stream is throttled.
//!
//! Prices: AWS list prices, us-east-1, as published in November 2026; every stream call (also
//! DescribeStream and GetShardIterator, which AWS does not bill) is priced as a stream read
//! request, and the mirror's table reads are priced on demand in both columns (its only Scan is
//! the hourly safety net), so the mirror's figures are upper bounds.
//!
//! Needs moto in the repository's .venv (bash .ci/install). Run:
//! `cargo bench --bench mirror` (BENCH_SECONDS sets the cost window, default 30).

mod common;
#[allow(dead_code)]
#[path = "../tests/common/streams_double.rs"]
mod streams_double;

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use common::{Seen, create_table, db, moto, percentile, put_lock, rig};
use statelock::dynamo;

/// On-demand read request units, $ per million.
const ON_DEMAND_READ_PER_MILLION: f64 = 0.125;
/// Provisioned read capacity, $ per RCU-hour.
const PROVISIONED_RCU_HOUR: f64 = 0.00013;
/// DynamoDB Streams read request units, $ per 100,000.
const STREAM_READS_PER_100K: f64 = 0.02;

fn lock_id(prefix: &str, i: usize) -> String {
    format!("tfstate/{prefix}{i}/terraform.tfstate")
}

/// Lags of `n` locks put every `gap` (and, with `nudge`, announced as the gateway does).
async fn lags(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    seen: &Seen,
    prefix: &str,
    n: usize,
    gap: Duration,
    nudge: Option<&statelock::cluster::Cluster>,
) -> Vec<Duration> {
    let mut written = Vec::with_capacity(n);
    for i in 0..n {
        put_lock(client, table, i, prefix).await;
        let t = Instant::now();
        if let Some(c) = nudge {
            c.nudges.nudge("default", "bench");
        }
        written.push((lock_id(prefix, i), t));
        tokio::time::sleep(gap).await;
    }
    let mut out = Vec::with_capacity(n);
    for (id, t) in written {
        out.push(seen.wait(&id).await.saturating_duration_since(t));
    }
    out.sort();
    out
}

async fn fill_states(client: &aws_sdk_dynamodb::Client, table: &str) {
    let states: usize = std::env::var("STATELOCK_BENCH_STATES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    for chunk in 0..states.div_ceil(25) {
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
        client.batch_write_item().request_items(table, reqs).send().await.expect("batch");
    }
    for i in 0..50 {
        put_lock(client, table, i, "state").await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Setting {
    label: String,
    lag: Vec<Duration>,
    stream_requests_per_hour: f64,
    read_units_per_hour: f64,
}

impl Setting {
    fn dollars_per_hour(&self) -> f64 {
        self.stream_requests_per_hour * STREAM_READS_PER_100K / 100_000.0 + self.read_units_per_hour * ON_DEMAND_READ_PER_MILLION / 1e6
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Ok(filter) = std::env::var("STATELOCK_BENCH_LOG") {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_writer(std::io::stderr).init();
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let m = moto();
    let client = db(&m.url).await;
    println!("statelock mirror benchmarks (2 cores, moto + API emulator, mirror in-process)");

    // The naive baseline: a full (eventually consistent) Scan every second of 10,000 states.
    create_table(&client, "naive", false).await;
    fill_states(&client, "naive").await;
    let started = Instant::now();
    let (mut units, mut scans) = (0.0, 0u32);
    while started.elapsed() < Duration::from_secs(seconds.min(10)) {
        units += dynamo::scan_table(&client, "naive", false).await.expect("scan").read_units;
        scans += 1;
    }
    let per_scan = units / f64::from(scans);
    let naive_on_demand = per_scan * 3600.0 * ON_DEMAND_READ_PER_MILLION / 1e6;
    let naive_provisioned = per_scan * PROVISIONED_RCU_HOUR;

    // Scan mode, for reference.
    create_table(&client, "lag-scan", false).await;
    let r = rig(&m.url, "lag-scan", serde_json::json!({"sync": {"mode": "Scan", "interval": "1s"}})).await;
    let seen = Seen::start(&r.emulator.url());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let scan_lag = lags(&client, "lag-scan", &seen, "scan", 100, Duration::from_millis(40), None).await;
    r.cancel.cancel();
    drop(seen);

    // Streams mode at several poll intervals: lag, then cost over a window with one lock change
    // a second.
    let mut settings = Vec::new();
    let mut nudged = Vec::new();
    for (i, poll) in ["100ms", "200ms", "500ms", "1s", "2s"].into_iter().enumerate() {
        let table = format!("cost{i}");
        create_table(&client, &table, true).await;
        fill_states(&client, &table).await;
        let r = rig(&m.url, &table, serde_json::json!({"sync": {"mode": "Streams", "interval": "1s", "streamPollInterval": poll}})).await;
        let seen = Seen::start(&r.emulator.url());
        seen.wait(&lock_id("state", 0)).await;
        let lag = lags(&client, &table, &seen, "lag", 100, Duration::from_millis(40), None).await;
        if poll == "2s" {
            nudged = lags(&client, &table, &seen, "nudged", 50, Duration::from_millis(40), Some(&r.mirror.cluster)).await;
        }
        let (units0, requests0) = (r.mirror.read_units(), r.mirror.stream_requests.load(Ordering::Relaxed));
        let started = Instant::now();
        let mut t = 0;
        while started.elapsed() < Duration::from_secs(seconds) {
            put_lock(&client, &table, 1000 + t, "churn").await;
            if t > 0 {
                let id = lock_id("churn", 1000 + t - 1);
                client.delete_item().table_name(&table).key("LockID", AttributeValue::S(id)).send().await.expect("delete");
            }
            t += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let window = started.elapsed().as_secs_f64();
        let requests = (r.mirror.stream_requests.load(Ordering::Relaxed) - requests0) as f64;
        let churn_units = r.mirror.read_units() - units0;
        // The hourly safety-net Scan (strongly consistent: twice the eventually consistent units).
        let hourly_scan = 2.0 * per_scan;
        settings.push(Setting {
            label: poll.into(),
            lag,
            stream_requests_per_hour: requests * 3600.0 / window,
            read_units_per_hour: hourly_scan + churn_units * 3600.0 / window,
        });
        r.cancel.cancel();
    }

    println!("lag, PutItem returned -> StateLock visible through the API, 100 locks 40 ms apart:");
    println!(
        "  Scan mode, 1s interval        p50 {:>7.1} ms   p99 {:>7.1} ms",
        ms(percentile(&scan_lag, 0.5)),
        ms(percentile(&scan_lag, 0.99))
    );
    println!(
        "  Streams, 2s poll + gateway    p50 {:>7.1} ms   p99 {:>7.1} ms   (each change announced as the gateway does)",
        ms(percentile(&nudged, 0.5)),
        ms(percentile(&nudged, 0.99))
    );
    println!("cost per hour, 10,000 states + 50 held locks, one lock change a second ({seconds} s windows), AWS list prices:");
    println!(
        "  naive full Scan every second: {per_scan:.1} RCU per scan; ${naive_on_demand:.4}/h on demand, ${naive_provisioned:.4}/h provisioned ({:.0} RCU)",
        per_scan.ceil()
    );
    println!(
        "  {:<22} {:>9} {:>9} {:>15} {:>10} {:>11} {:>14} {:>14}",
        "Streams, poll interval", "lag p50", "lag p99", "stream req/h", "RCU/h", "$/h", "% on-demand", "% provisioned"
    );
    for s in &settings {
        let d = s.dollars_per_hour();
        println!(
            "  {:<22} {:>6.1} ms {:>6.1} ms {:>15.0} {:>10.1} {:>11.5} {:>13.2}% {:>13.2}%",
            s.label,
            ms(percentile(&s.lag, 0.5)),
            ms(percentile(&s.lag, 0.99)),
            s.stream_requests_per_hour,
            s.read_units_per_hour,
            d,
            100.0 * d / naive_on_demand,
            100.0 * d / naive_provisioned
        );
    }

    trouble(&m.url, &client).await;
}

/// Lag of the first change after a split and after a replaced stream; Scans while throttled.
async fn trouble(moto_url: &str, direct: &aws_sdk_dynamodb::Client) {
    create_table(direct, "trouble", true).await;
    let double = streams_double::StreamsDouble::start(moto_url, "trouble").await;
    let client = db(&double.url).await;
    let r = rig(&double.url, "trouble", serde_json::json!({"sync": {"mode": "Streams", "interval": "1s", "streamPollInterval": "200ms"}}))
        .await;
    let seen = Seen::start(&r.emulator.url());
    put_lock(&client, "trouble", 0, "warm").await;
    seen.wait(&lock_id("warm", 0)).await;
    let (mut after_split, mut after_replace) = (Vec::new(), Vec::new());
    for round in 0..5 {
        double.split();
        after_split.extend(lags(&client, "trouble", &seen, &format!("split{round}-"), 1, Duration::ZERO, None).await);
        // Let the last full Scan age past the reopening spacing, as in a real table whose
        // stream is replaced rarely.
        tokio::time::sleep(Duration::from_secs(16)).await;
        double.replace_stream();
        after_replace.extend(lags(&client, "trouble", &seen, &format!("replace{round}-"), 1, Duration::ZERO, None).await);
    }
    after_split.sort();
    after_replace.sort();
    let scans = double.calls("Scan");
    double.faults(|f| f.throttle_all = true);
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let throttled_scans = double.calls("Scan") - scans;
    double.faults(|f| f.throttle_all = false);
    r.cancel.cancel();
    println!("stream trouble (streams test double in front of moto, 200ms poll), 5 rounds each:");
    println!(
        "  first change after a shard split:       p50 {:>7.1} ms   max {:>7.1} ms",
        ms(percentile(&after_split, 0.5)),
        ms(*after_split.last().expect("lags"))
    );
    println!(
        "  first change after the stream replaced: p50 {:>7.1} ms   max {:>7.1} ms (the change is made right after the new stream appears)",
        ms(percentile(&after_replace, 0.5)),
        ms(*after_replace.last().expect("lags"))
    );
    println!("  Scans while every GetRecords is throttled for {} s: {throttled_scans}", window.as_secs());
}
