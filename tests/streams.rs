//! The mirror follows DynamoDB Streams as the protocol requires. moto holds the table; a test
//! double in front of it (tests/common/streams_double.rs) serves a stream that splits and closes
//! shards, expires iterators, throttles, answers empty pages, refuses access and is replaced.
//! After every schedule the StateLocks are exactly the table's locks (read strongly consistent
//! from moto itself), and no lock instance was ever created twice (a released lock brought back
//! would be created again: a phantom).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_sdk_dynamodb::types::AttributeValue;
use common::{DynamoServer, Operator, TestCluster, eventually, put_item, streams_double::StreamsDouble, terraform_info};
use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use statelock::crd::{LockSource, StateLock};

const NS: &str = "terraform";
const TABLE: &str = "tf-locks";

#[derive(Debug, Default)]
struct Ready {
    status: String,
    reason: String,
    message: String,
}

struct Rig {
    moto: DynamoServer,
    double: StreamsDouble,
    /// A client through the double: its writes become stream records.
    db: aws_sdk_dynamodb::Client,
    cluster: TestCluster,
    op: Option<Operator>,
    /// StateLock creations per (LockID, Info ID), from a watch that starts before the operator.
    created: Arc<Mutex<HashMap<(String, String), u32>>>,
    watch: tokio::task::JoinHandle<()>,
    /// Lock IDs and Info IDs ever written.
    written: BTreeSet<(String, String)>,
    next: u32,
}

/// The access key of the test's own client (the operator signs with `AKIAFAKE`).
const TEST_KEY: &str = "AKIATESTCLIENT";

async fn client_at(url: &str) -> aws_sdk_dynamodb::Client {
    let creds =
        statelock::dynamo::StaticCredentials { access_key_id: TEST_KEY.into(), secret_access_key: "fake".into(), session_token: None };
    statelock::dynamo::dynamodb_client("us-east-1", Some(url), Some(creds)).await
}

impl Rig {
    async fn start(mode: &str) -> Self {
        Self::start_with(mode, "1s", "100ms").await
    }

    async fn start_with(mode: &str, interval: &str, poll: &str) -> Self {
        Self::start_full(mode, interval, poll, None).await
    }

    /// With the operator's gateway on `gateway_port` (serving this host) when given.
    async fn start_full(mode: &str, interval: &str, poll: &str, gateway_port: Option<u16>) -> Self {
        let moto = DynamoServer::moto();
        moto.create_lock_table_with_stream(TABLE).await;
        let double = StreamsDouble::start(&moto.url(), TABLE).await;
        let db = client_at(&double.url).await;
        let cluster = TestCluster::start().await;
        cluster.install_crds().await;
        cluster.create_namespace(NS).await;
        let created: Arc<Mutex<HashMap<(String, String), u32>>> = Arc::default();
        let api: Api<StateLock> = Api::namespaced(cluster.client(), NS);
        let (c, mut seen) = (created.clone(), BTreeSet::<String>::new());
        let watch = tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default()).default_backoff().applied_objects().boxed();
            while let Some(Ok(l)) = s.next().await {
                if seen.insert(l.uid().unwrap_or_default()) {
                    let id = l.spec.lock_info.id.clone().unwrap_or_default();
                    *c.lock().expect("created").entry((l.spec.lock_id.clone(), id)).or_default() += 1;
                }
            }
        });
        let mut spec = json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": double.url},
                              "sync": {"mode": mode, "interval": interval, "streamPollInterval": poll}});
        if gateway_port.is_some() {
            spec["gateway"] = json!({"allowedSourceRanges": ["127.0.0.1/32"]});
        }
        cluster.create_lock_source(NS, "prod-locks", spec).await;
        let op = Some(match gateway_port {
            Some(port) => Operator::start_with_gateway(&cluster, port),
            None => Operator::start(&cluster),
        });
        Self { moto, double, db, cluster, op, created, watch, written: BTreeSet::new(), next: 0 }
    }

    async fn take(&mut self) -> String {
        self.next += 1;
        let id = format!("tfstate/app{}/terraform.tfstate", self.next);
        let info_id = format!("id-{}", self.next);
        put_item(&self.db, TABLE, &[("LockID", &id), ("Info", &terraform_info(&info_id, "root@runner", &id, "2026-11-26T13:02:20Z"))])
            .await;
        self.written.insert((id.clone(), info_id));
        id
    }

    async fn release(&self, id: &str) {
        self.db.delete_item().table_name(TABLE).key("LockID", AttributeValue::S(id.into())).send().await.expect("delete");
    }

    /// The table's locks, read strongly consistent from moto itself: (LockID, Info ID).
    async fn truth(&self) -> BTreeSet<(String, String)> {
        let direct = self.moto.dynamodb().await;
        let scan = statelock::dynamo::scan_table(&direct, TABLE, true).await.expect("scan moto");
        scan.items
            .iter()
            .filter_map(|i| {
                let id = i.get("LockID")?.as_s().ok()?;
                let info: serde_json::Value = serde_json::from_str(i.get("Info")?.as_s().ok()?).ok()?;
                Some((id.clone(), info["ID"].as_str()?.to_owned()))
            })
            .collect()
    }

    async fn mirrored(&self) -> BTreeSet<(String, String)> {
        Api::<StateLock>::namespaced(self.cluster.client(), NS)
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .map(|l| (l.spec.lock_id.clone(), l.spec.lock_info.id.clone().unwrap_or_default()))
            .collect()
    }

    /// Wait until the StateLocks are the table's locks; then check that no instance was created
    /// twice and that nothing was created that was never written.
    async fn converged(&self, what: &str) {
        self.matches_table(what).await;
        let created = self.created.lock().expect("created").clone();
        for (instance, n) in &created {
            assert!(self.written.contains(instance), "after {what}: a StateLock for {instance:?}, which was never written (a phantom)");
            assert_eq!(*n, 1, "after {what}: {instance:?} was created {n} times (a released lock came back)");
        }
    }

    /// Wait until the StateLocks are the table's locks.
    async fn matches_table(&self, what: &str) {
        let truth = self.truth().await;
        eventually(Duration::from_secs(90), &format!("the StateLocks to match the table after {what}"), || async {
            (self.mirrored().await == truth).then_some(())
        })
        .await;
    }

    async fn status(&self) -> statelock::crd::LockSourceStatus {
        Api::<LockSource>::namespaced(self.cluster.client(), NS).get("prod-locks").await.expect("LockSource").status.unwrap_or_default()
    }

    async fn ready(&self) -> Ready {
        let c = self.status().await.conditions.into_iter().find(|c| c.type_ == "Ready");
        c.map_or_else(Ready::default, |c| Ready { status: c.status, reason: c.reason, message: c.message })
    }

    /// GetRecords calls the double answered, at least `n` more than now.
    async fn polls(&self, n: u64) {
        let start = self.double.calls("GetRecords");
        eventually(Duration::from_secs(60), &format!("{n} more GetRecords calls"), || async {
            (self.double.calls("GetRecords") >= start + n).then_some(())
        })
        .await;
    }

    fn op(&self) -> &Operator {
        self.op.as_ref().expect("the operator runs")
    }

    /// Stop the operator and start a new one.
    async fn restart(&mut self) {
        if let Some(op) = self.op.take() {
            op.stop().await;
        }
        self.op = Some(Operator::start(&self.cluster));
    }

    /// The operator's log lines about the mirror (for failure messages).
    fn log(&self) -> String {
        let path = self.cluster.dir.path().join(format!("operator-{}.log", self.op().admin_port));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines().filter(|l| !l.contains("DEBUG")).map(|l| l.chars().take(300).collect::<String>()).collect::<Vec<_>>().join("\n")
    }

    async fn stop(mut self) {
        if let Some(op) = self.op.take() {
            op.stop().await;
        }
        self.watch.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mirror_follows_splits_expired_iterators_empty_pages_and_replaced_streams() {
    let mut rig = Rig::start("Streams").await;
    let before: Vec<String> = vec![rig.take().await, rig.take().await, rig.take().await];
    rig.converged("the start").await;
    assert_eq!(rig.status().await.sync_mode, Some(statelock::crd::SyncMode::Streams));
    let scans_at_start = rig.double.calls("Scan");

    // Locks come and go.
    for _ in 0..4 {
        rig.take().await;
    }
    rig.release(&before[0]).await;
    rig.converged("locks coming and going").await;

    // A split where reading the children first would apply a release before its lock: the
    // parent lags (empty pages) while the lock is taken on it and released on a child.
    rig.double.stall_open_shards();
    let split_lock = rig.take().await;
    rig.double.split();
    rig.release(&split_lock).await;
    let other = rig.take().await;
    rig.polls(5).await;
    rig.double.unstall();
    rig.converged("a split with a lagging parent").await;
    assert!(rig.mirrored().await.iter().any(|(id, _)| *id == other), "a lock taken on a child shard is mirrored");

    // Every iterator expires: reading resumes after the last record, without a Scan.
    rig.double.expire_iterators();
    rig.take().await;
    rig.release(&before[1]).await;
    rig.converged("expired iterators").await;

    // Empty pages although records are waiting.
    rig.double.faults(|f| f.empty_next = 25);
    rig.take().await;
    rig.converged("empty pages").await;
    assert_eq!(rig.double.calls("Scan"), scans_at_start, "splits, expired iterators and empty pages cause no Scan");

    // A second split, then the stream is disabled and a new one enabled (a new ARN); the writes
    // made in between reach no stream and are found by the Scan that follows the reopening.
    rig.double.split();
    rig.take().await;
    rig.double.disable_stream();
    let gap = rig.take().await;
    rig.release(&before[2]).await;
    rig.double.enable_stream();
    rig.take().await;
    rig.converged("a replaced stream").await;
    assert!(rig.mirrored().await.iter().any(|(id, _)| *id == gap), "the lock taken while no stream existed is mirrored");
    assert_eq!(rig.double.calls("Scan"), scans_at_start + 1, "one Scan for the new stream");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_stream_is_reported_and_retried_without_scans() {
    let mut rig = Rig::start("Streams").await;
    rig.take().await;
    rig.converged("the start").await;
    let scans = rig.double.calls("Scan");
    rig.double.faults(|f| f.throttle_all = true);
    let held = rig.take().await;
    let ready = eventually(Duration::from_secs(60), "Ready=False while throttled", || async {
        let c = rig.ready().await;
        (c.status == "False").then_some(c)
    })
    .await;
    assert_eq!(ready.reason, "StreamUnreadable");
    assert!(ready.message.contains("GetRecords") && ready.message.contains("LimitExceeded"), "{}", ready.message);
    // Retries, spaced by a backoff; none of them scans.
    rig.polls(4).await;
    assert_eq!(rig.double.calls("Scan"), scans, "a throttled stream never causes a Scan; log:\n{}", rig.log());
    let metrics = rig.op().metrics();
    assert!(
        common::metric(
            &metrics,
            "statelock_dynamodb_stream_errors_total{namespace=\"terraform\",source=\"prod-locks\",call=\"GetRecords\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "stream errors are counted"
    );
    rig.double.faults(|f| f.throttle_all = false);
    rig.converged("the throttling ended").await;
    assert!(rig.mirrored().await.iter().any(|(id, _)| *id == held));
    eventually(Duration::from_secs(60), "Ready=True again", || async { (rig.ready().await.status == "True").then_some(()) }).await;
    assert_eq!(rig.double.calls("Scan"), scans, "the position was kept: no Scan after the throttling either");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_without_permission_fails_streams_mode_and_auto_mode_scans() {
    for mode in ["Streams", "Auto"] {
        let mut rig = Rig::start(mode).await;
        rig.double.faults(|f| f.deny = true);
        let id = rig.take().await;
        let ready = eventually(Duration::from_secs(60), "a condition naming the refused call", || async {
            let c = rig.ready().await;
            (!c.reason.is_empty()).then_some(c)
        })
        .await;
        if mode == "Streams" {
            assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "StreamUnreadable"), "{ready:?}");
            assert!(ready.message.contains("DescribeStream") && ready.message.contains("AccessDenied"), "{}", ready.message);
            assert!(rig.mirrored().await.is_empty());
        } else {
            assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "ScanFallback"), "{ready:?}");
            assert!(ready.message.contains("AccessDenied"), "{}", ready.message);
            rig.converged("Auto mode without stream permissions").await;
            assert!(rig.mirrored().await.iter().any(|(i, _)| *i == id));
            assert_eq!(rig.status().await.sync_mode, Some(statelock::crd::SyncMode::Scan));
        }
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_locksource_on_the_same_table_is_refused_by_name_and_nothing_flaps() {
    let mut rig = Rig::start("Streams").await;
    rig.take().await;
    rig.converged("the start").await;
    rig.cluster
        .create_lock_source(
            NS,
            "also-prod",
            json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": rig.double.url}, "sync": {"mode": "Scan", "interval": "1s"}}),
        )
        .await;
    let api: Api<LockSource> = Api::namespaced(rig.cluster.client(), NS);
    let cond = eventually(Duration::from_secs(60), "the second LockSource refused", || async {
        let s = api.get("also-prod").await.ok()?.status?;
        s.conditions.into_iter().find(|c| c.type_ == "Ready" && c.reason == "DuplicateTable")
    })
    .await;
    assert_eq!(cond.status, "False");
    assert!(cond.message.contains("prod-locks"), "the condition names the first LockSource: {}", cond.message);
    let writes = rig.cluster.emulator.writes("statelock.dev", "statelocks");
    // A few of the refused source's would-be passes (1 s interval) and some stream polls later,
    // nothing was rewritten.
    rig.polls(30).await;
    assert_eq!(rig.cluster.emulator.writes("statelock.dev", "statelocks"), writes, "no StateLock is rewritten by two LockSources");
    let l = Api::<StateLock>::namespaced(rig.cluster.client(), NS).list(&ListParams::default()).await.expect("list");
    assert!(l.items.iter().all(|l| l.spec.source == "prod-locks"));
    // The first one goes: the second takes over.
    api.delete("prod-locks", &Default::default()).await.expect("delete");
    eventually(Duration::from_secs(60), "the second LockSource serving", || async {
        let s = api.get("also-prod").await.ok()?.status?;
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    // Its StateLocks went with it (dependents); the second recreates them, each once more.
    rig.take().await;
    rig.matches_table("the second LockSource took over").await;
    let l = Api::<StateLock>::namespaced(rig.cluster.client(), NS).list(&ListParams::default()).await.expect("list");
    assert!(!l.items.is_empty() && l.items.iter().all(|l| l.spec.source == "also-prod"));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poll_interval_longer_than_the_pass_interval_still_follows_the_stream() {
    let mut rig = Rig::start_with("Streams", "1s", "2s").await;
    rig.take().await;
    rig.converged("the start").await;
    let scans = rig.double.calls("Scan");
    let held = rig.take().await;
    rig.converged("a lock taken").await;
    rig.release(&held).await;
    rig.converged("a lock released").await;
    assert_eq!(rig.double.calls("Scan"), scans, "the stream delivered both changes");
    rig.stop().await;
}

/// A stream record can trail its write. A lock taken through the gateway is announced to the
/// mirror (a nudge naming its LockID); the poll that follows does not find the record yet, so the
/// mirror polls for it again, sooner than its regular pace, until it reads it. Here the regular
/// polls and passes are an hour apart: only those follow-up polls can read the record.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_that_trails_its_write_is_read_by_polls_that_follow_the_gateways_nudge() {
    let port = common::free_port();
    let mut rig = Rig::start_full("Streams", "1h", "1h", Some(port)).await;
    // Synced: the stream is open and read past the start's Scan.
    eventually(Duration::from_secs(60), "the LockSource to be Ready", || async {
        let ready = rig.ready().await;
        (ready.status == "True").then_some(())
    })
    .await;
    let gateway = client_at(&format!("http://127.0.0.1:{port}")).await;
    // The gateway serves once its caches are in: until then it answers 503 (the write is retried).
    let id = "tfstate/nudged/terraform.tfstate";
    let info = terraform_info("nudged-1", "root@runner", id, "2026-11-26T13:02:20Z");
    // Each record is left out of the first two pages that reach it: the poll the nudge asks for
    // and the first follow-up do not read it; the second follow-up does.
    rig.double.faults(|f| f.hide_for_polls = 2);
    let polls_before = rig.double.calls("GetRecords");
    eventually(Duration::from_secs(60), "the gateway to take the lock", || async {
        gateway
            .put_item()
            .table_name(TABLE)
            .item("LockID", AttributeValue::S(id.into()))
            .item("Info", AttributeValue::S(info.clone()))
            .condition_expression("attribute_not_exists(LockID)")
            .send()
            .await
            .ok()
    })
    .await;
    eventually(Duration::from_secs(60), "the mirror to read the lock's stream record", || async {
        (rig.double.served(id) > 0).then_some(())
    })
    .await;
    let polls = rig.double.calls("GetRecords") - polls_before;
    assert!((3..=12).contains(&polls), "read after the nudged poll and two follow-ups, in {polls} GetRecords calls\n{}", rig.log());
    rig.written.insert((id.into(), "nudged-1".into()));
    rig.converged("a lock taken through the gateway").await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_scan_after_opening_the_stream_never_changes_statelocks() {
    let mut rig = Rig::start("Streams").await;
    rig.take().await;
    let held = rig.take().await;
    rig.converged("the start").await;
    // A new leader (here: a restarted operator) opens the stream, and its Scan is refused: it
    // must not write from the empty table it holds, nor from the stream alone.
    rig.double.faults(|f| f.deny_scan = true);
    let scans = rig.double.calls("Scan");
    rig.restart().await;
    rig.release(&held).await;
    rig.take().await;
    let ready = eventually(Duration::from_secs(60), "Ready=False after refused Scans", || async {
        let c = rig.ready().await;
        (c.status == "False" && rig.double.calls("Scan") >= scans + 2).then_some(c)
    })
    .await;
    assert_eq!(ready.reason, "TableUnreadable", "{ready:?}");
    assert!(ready.message.contains("AccessDenied"), "{}", ready.message);
    assert_eq!(rig.mirrored().await.len(), 2, "StateLocks stay as they were while the table cannot be read");
    rig.double.faults(|f| f.deny_scan = false);
    rig.converged("the Scan allowed again").await;
    rig.stop().await;
}

/// A small deterministic generator (xorshift), so that a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn randomized_stream_schedules_converge_without_phantoms() {
    let schedules: u64 = std::env::var("STATELOCK_STREAM_SCHEDULES").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    for seed in 1..=schedules {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x1000_0000_01B3));
        let mut rig = Rig::start("Auto").await;
        let mut held: Vec<String> = Vec::new();
        let mut log: Vec<String> = Vec::new();
        for _ in 0..40 {
            let op = rng.below(100);
            match op {
                0..=39 => {
                    held.push(rig.take().await);
                    log.push("take".into());
                }
                40..=64 if !held.is_empty() => {
                    let id = held.swap_remove(rng.below(held.len() as u64) as usize);
                    rig.release(&id).await;
                    log.push("release".into());
                }
                65..=71 => {
                    rig.double.split();
                    log.push("split".into());
                }
                72..=77 => {
                    rig.double.expire_iterators();
                    log.push("expire".into());
                }
                78..=83 => {
                    let n = rng.below(10);
                    rig.double.faults(|f| f.empty_next += n);
                    log.push(format!("empty x{n}"));
                }
                84..=89 => {
                    let n = rng.below(6);
                    rig.double.faults(|f| f.throttle_next += n);
                    log.push(format!("throttle x{n}"));
                }
                90..=94 => {
                    rig.double.stall_open_shards();
                    log.push("stall".into());
                }
                95..=96 => {
                    rig.double.unstall();
                    log.push("unstall".into());
                }
                97..=98 => {
                    rig.double.replace_stream();
                    log.push("replace stream".into());
                }
                _ => {
                    rig.polls(1).await;
                    log.push("wait for a poll".into());
                }
            }
        }
        rig.double.unstall();
        rig.double.faults(|f| {
            f.throttle_next = 0;
            f.empty_next = 0;
        });
        eprintln!("seed {seed}: {}", log.join(", "));
        rig.converged(&format!("schedule {seed} ({})", log.join(", "))).await;
        let by_lock: BTreeMap<String, usize> = rig.written.iter().fold(BTreeMap::new(), |mut m, (id, _)| {
            *m.entry(id.clone()).or_default() += 1;
            m
        });
        assert!(by_lock.values().all(|n| *n == 1), "each lock was written once");
        rig.stop().await;
    }
}

/// The IAM table in the README, by row.
fn documented_iam() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(common::repo_root().join("README.md")).expect("README");
    let table = readme.split("<!-- iam:begin -->").nth(1).and_then(|t| t.split("<!-- iam:end -->").next()).expect("the IAM table");
    table
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| what"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].to_owned(), cells[1].split(',').map(|a| a.trim().to_owned()).collect())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_iam_table_lists_exactly_the_calls_each_mirror_mode_makes() {
    let documented = documented_iam();
    let mut rows_checked = 0;
    for (mode, row) in [("Scan", "mirror, `Scan` mode"), ("Streams", "mirror, `Streams` mode"), ("Auto", "mirror, `Auto` mode")] {
        let mut rig = Rig::start(mode).await;
        rig.take().await;
        rig.converged(mode).await;
        let held = rig.take().await;
        rig.release(&held).await;
        rig.converged(mode).await;
        // Streams and Auto: a replaced stream too (DescribeStream, GetShardIterator again).
        if mode != "Scan" {
            rig.double.replace_stream();
            rig.take().await;
            rig.converged(mode).await;
        }
        let used: BTreeSet<String> = rig.double.operations_by("AKIAFAKE").into_iter().map(|op| format!("dynamodb:{op}")).collect();
        let allowed = documented.get(row).unwrap_or_else(|| panic!("README IAM row {row:?}"));
        let undocumented: Vec<&String> = used.difference(allowed).collect();
        assert!(undocumented.is_empty(), "{mode} mode made calls the README's IAM table does not list: {undocumented:?}");
        // Everything listed is used, except GetItem, which only KEYS_ONLY streams need.
        let unused: Vec<&String> = allowed.difference(&used).filter(|a| *a != "dynamodb:GetItem").collect();
        assert!(unused.is_empty(), "{mode} mode: the README lists {unused:?}, which it never calls");
        rows_checked += 1;
        rig.stop().await;
    }
    assert_eq!(rows_checked, 3);
}
