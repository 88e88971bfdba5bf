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
//! `cargo bench --bench mirror` (BENCH_SECONDS sets the cost window, default 30; BENCH_SETTINGS
//! lists the indexes of the Streams settings to run, e.g. `5,6`; BENCH_TROUBLE=0 skips part 2).

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

/// Put lock `i` (and, with `nudge`, announce it as the gateway does, with when the write was
/// sent); its LockID and when the put returned.
async fn write_lock(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    i: usize,
    prefix: &str,
    nudge: Option<&statelock::cluster::Cluster>,
) -> (String, Instant) {
    let id = lock_id(prefix, i);
    let sent = Instant::now();
    // As Terraform takes a lock (the gateway announces only such writes).
    client
        .put_item()
        .table_name(table)
        .item("LockID", AttributeValue::S(id.clone()))
        .item("Info", AttributeValue::S(common::info(i, "root@runner", &id, "2026-11-26T13:02:20.238325691Z")))
        .condition_expression("attribute_not_exists(LockID)")
        .send()
        .await
        .expect("lock");
    let t = Instant::now();
    if let Some(c) = nudge {
        c.nudges.nudge("default", "bench", &id, sent);
    }
    (id, t)
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
        written.push(write_lock(client, table, i, prefix, nudge).await);
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

/// How the benchmark's writes reach the table.
#[derive(Clone, Copy)]
enum Writes {
    /// Straight to the table: the mirror reads them at its own pace.
    Direct,
    /// Straight to the table, each announced as the gateway announces it; through the streams
    /// double with records this late when given.
    Announced(Option<Duration>),
    /// Through a gateway on the replica that mirrors (`leader`) or on another one.
    Gateway { leader: bool },
}

/// Wait until the LockSource `default/bench` is Ready.
async fn following(client: &kube::Client) {
    let api: kube::Api<statelock::crd::LockSource> = kube::Api::namespaced(client.clone(), "default");
    loop {
        let ready = api
            .get("bench")
            .await
            .ok()
            .and_then(|s| s.status)
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Take and release a lock through the gateway, retrying while it waits for its caches.
async fn warm_gateway(gateway: &aws_sdk_dynamodb::Client, table: &str) {
    let id = "tfstate/warm/terraform.tfstate";
    for _ in 0..500 {
        let put = gateway
            .put_item()
            .table_name(table)
            .item("LockID", AttributeValue::S(id.into()))
            .item("Info", AttributeValue::S(common::info(0, "root@runner", id, "2026-11-26T13:02:20.238325691Z")))
            .condition_expression("attribute_not_exists(LockID)")
            .send()
            .await;
        if put.is_ok() {
            gateway.delete_item().table_name(table).key("LockID", AttributeValue::S(id.into())).send().await.expect("unlock");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway never served");
}

struct Setting {
    label: String,
    /// Lags in the burst, and in the cost window's steady churn.
    burst: Vec<Duration>,
    steady: Vec<Duration>,
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

    // Streams mode: polling alone at several intervals; then polling every 2 s with every write
    // announced as the gateway announces it (a nudge naming the LockID), straight on moto and
    // behind the streams double with records that trail their writes; then the writes made
    // through a real gateway, on the replica that mirrors and on another one.
    let mut settings = Vec::new();
    let late = |ms| Writes::Announced(Some(Duration::from_millis(ms)));
    let kinds = [
        ("100ms", Writes::Direct),
        ("200ms", Writes::Direct),
        ("500ms", Writes::Direct),
        ("1s", Writes::Direct),
        ("2s", Writes::Direct),
        ("2s", Writes::Announced(None)),
        ("2s", late(100)),
        ("2s", late(500)),
        ("2s", Writes::Gateway { leader: true }),
        ("2s", Writes::Gateway { leader: false }),
    ];
    // BENCH_SETTINGS: a comma-separated list of the settings' indexes to run (default: all).
    let only: Option<Vec<usize>> =
        std::env::var("BENCH_SETTINGS").ok().map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    for (i, (poll, writes)) in kinds.into_iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        let table = format!("cost{i}");
        create_table(&client, &table, true).await;
        fill_states(&client, &table).await;
        // Records that trail their writes: the streams double in front of moto.
        let double = match writes {
            Writes::Announced(Some(trail)) => {
                let d = streams_double::StreamsDouble::start(&m.url, &table).await;
                d.faults(|f| f.propagation = trail);
                Some(d)
            }
            _ => None,
        };
        let url = double.as_ref().map_or_else(|| m.url.clone(), |d| d.url.clone());
        let label = match writes {
            Writes::Direct => poll.to_owned(),
            Writes::Announced(None) => format!("{poll} + announced"),
            Writes::Announced(Some(trail)) => format!("{poll} + announced, records {} ms late", trail.as_millis()),
            Writes::Gateway { leader: true } => format!("{poll}, through the gateway (leader)"),
            Writes::Gateway { leader: false } => format!("{poll}, through the gateway (other)"),
        };
        let r = rig(
            &url,
            &table,
            serde_json::json!({"sync": {"mode": "Streams", "interval": "1s", "streamPollInterval": poll},
                               "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}}),
        )
        .await;
        let nudge = matches!(writes, Writes::Announced(_)).then_some(&*r.mirror.cluster);
        // Through a gateway that shares the mirror's caches (the leader: its writes are announced
        // to the mirror) or has caches of its own (another replica: they are not).
        let writer = match writes {
            Writes::Gateway { leader } => {
                let recorder = kube::runtime::events::Recorder::new(
                    r.client.clone(),
                    kube::runtime::events::Reporter { controller: "statelock-bench".into(), instance: None },
                );
                let caches = if leader {
                    statelock::gateway::caches::Caches::new(&r.mirror.cluster)
                } else {
                    statelock::gateway::caches::Caches::start(&r.client)
                };
                let gw = statelock::gateway::server::Gateway::with_caches(
                    r.client.clone(),
                    caches,
                    recorder,
                    statelock::gateway::server::Backend::Forward,
                    statelock::metrics::Metrics::new(),
                    Default::default(),
                    common::open_tenancy(),
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("addr");
                tokio::spawn(statelock::gateway::server::serve(gw, listener, r.cancel.clone()));
                db(&format!("http://{addr}")).await
            }
            _ => db(&url).await,
        };
        let seen = Seen::start(&r.emulator.url());
        seen.wait(&lock_id("state", 0)).await;
        // Measured once the mirror follows the stream (its first pass reported) and, through a
        // gateway, once the gateway serves (a lock taken and released through it).
        following(&r.client).await;
        if matches!(writes, Writes::Gateway { .. }) {
            warm_gateway(&writer, &table).await;
        }
        let burst = lags(&writer, &table, &seen, "lag", 100, Duration::from_millis(40), nudge).await;
        let (units0, requests0) = (r.mirror.read_units(), r.mirror.stream_requests.load(Ordering::Relaxed));
        let started = Instant::now();
        let mut t = 0;
        let mut steady = Vec::new();
        while started.elapsed() < Duration::from_secs(seconds) {
            let (id, at) = write_lock(&writer, &table, 1000 + t, "churn", nudge).await;
            // Each lock is held 3 s, longer than the slowest poll interval, so that every one
            // is mirrored (a lock taken and released between two polls never shows).
            if t >= 3 {
                let id = lock_id("churn", 1000 + t - 3);
                let sent = Instant::now();
                writer.delete_item().table_name(&table).key("LockID", AttributeValue::S(id.clone())).send().await.expect("delete");
                if let Some(c) = nudge {
                    c.nudges.nudge("default", "bench", &id, sent);
                }
            }
            steady.push((id, at));
            t += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let window = started.elapsed().as_secs_f64();
        let requests = (r.mirror.stream_requests.load(Ordering::Relaxed) - requests0) as f64;
        let churn_units = r.mirror.read_units() - units0;
        let mut steady_lag = Vec::with_capacity(steady.len());
        for (id, at) in steady {
            steady_lag.push(seen.wait(&id).await.saturating_duration_since(at));
        }
        steady_lag.sort();
        // The hourly safety-net Scan (strongly consistent: twice the eventually consistent units).
        let hourly_scan = 2.0 * per_scan;
        settings.push(Setting {
            label,
            burst,
            steady: steady_lag,
            stream_requests_per_hour: requests * 3600.0 / window,
            read_units_per_hour: hourly_scan + churn_units * 3600.0 / window,
        });
        r.cancel.cancel();
    }

    println!("lag, PutItem returned -> StateLock visible through the API (a kube watch):");
    println!(
        "  Scan mode, 1s interval, 100 locks 40 ms apart: p50 {:>7.1} ms   p99 {:>7.1} ms",
        ms(percentile(&scan_lag, 0.5)),
        ms(percentile(&scan_lag, 0.99))
    );
    println!(
        "cost per hour, 10,000 states + 50 held locks, one lock taken and one released a second, each held 3 s ({seconds} s windows), AWS list prices:"
    );
    println!(
        "  naive full Scan every second: {per_scan:.1} RCU per scan; ${naive_on_demand:.4}/h on demand, ${naive_provisioned:.4}/h provisioned ({:.0} RCU)",
        per_scan.ceil()
    );
    println!(
        "  {:<38} {:>19} {:>19} {:>13} {:>8} {:>10} {:>12} {:>14}",
        "Streams, poll interval", "burst lag p50/p99", "steady lag p50/p99", "stream req/h", "RCU/h", "$/h", "% on-demand", "% provisioned"
    );
    for s in &settings {
        let d = s.dollars_per_hour();
        println!(
            "  {:<38} {:>7.1} /{:>7.1} ms {:>7.1} /{:>7.1} ms {:>13.0} {:>8.1} {:>10.5} {:>11.2}% {:>13.2}%",
            s.label,
            ms(percentile(&s.burst, 0.5)),
            ms(percentile(&s.burst, 0.99)),
            ms(percentile(&s.steady, 0.5)),
            ms(percentile(&s.steady, 0.99)),
            s.stream_requests_per_hour,
            s.read_units_per_hour,
            d,
            100.0 * d / naive_on_demand,
            100.0 * d / naive_provisioned
        );
    }
    println!("  (burst: 100 locks 40 ms apart; steady: the locks taken in the cost window, one a second)");

    if std::env::var("BENCH_TROUBLE").as_deref() != Ok("0") {
        trouble(&m.url, &client).await;
    }
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
