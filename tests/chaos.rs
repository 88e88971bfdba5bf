//! The chaos harness: the safety promise under randomized fault schedules.
//!
//! Real operator processes (two, with leader election, as the chart runs them) against the
//! Kubernetes API emulator and moto, with simulated Terraform runners in emulated pods, under a
//! schedule of faults drawn from a seed. A third of the schedules lock with S3 lock files
//! (`use_lockfile`: PutObject with If-None-Match, Terraform's GetObject-compare-DeleteObject unlock)
//! in moto's S3, mirrored by a second LockSource listing the bucket every second; the operator's
//! S3 calls go through a recording proxy with the same faults. The table's stream is served by the streams test double in
//! front of moto (the mirror runs in Streams mode; shards split, iterators expire, GetRecords is
//! throttled, the stream is replaced). The operator reaches DynamoDB through a recording proxy
//! that can also throttle and fail calls; the runners talk to moto directly or through an
//! operator's gateway (which forwards through the same proxy). The harness knows at
//! every moment which runner processes are alive: that is the ground truth the checker compares
//! the recorded deletions against.
//!
//! Checked over the whole history:
//! 1. Safety: no lock held by a live runner is ever deleted by the operator (a manual unlock with
//!    the live override excepted and recorded as such). A live runner also checks, before its
//!    unlock, that its lock is still its own: a lock that vanished under it is a violation too.
//! 2. Liveness: once the faults heal, every lock whose runner is dead and whose pod is gone is
//!    released within the grace period plus a stated bound; the observed distribution is printed.
//! 3. No double grant: a runner is granted a lock only after the previous holder's unlock or the
//!    operator's release of it was sent.
//!
//! `cargo test --test chaos` runs the fixed CI seeds. `STATELOCK_CHAOS_SCHEDULES=1000` (and
//! optionally `STATELOCK_CHAOS_SEED=<first seed>`) runs more; `--nocapture` prints the figures. A
//! failing schedule prints its seed and its faults in order; the schedule (not the timing of the
//! processes) is reproduced exactly by running that seed alone.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use aws_sdk_dynamodb::types::AttributeValue;
use common::{DynamoServer, Operator, TestCluster, free_port, terraform_info};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use statelock::crd::{StateLock, state_lock_name};
use tokio::io::AsyncWriteExt;

const SOURCE_NS: &str = "terraform";
const RUNNERS: &str = "runners";
const TABLE: &str = "tf-locks";
const BUCKET: &str = "tfstate";
const GRACE: Duration = Duration::from_secs(1);
/// The liveness bound the harness states: after the faults heal and a dead runner's pod is gone,
/// its lock is released within the grace period plus this.
const LIVENESS_BOUND: Duration = Duration::from_secs(30);
/// Schedules run side by side in one environment (each with its own locks and pods).
const PARALLEL: usize = 6;

// ---- Deterministic randomness ------------------------------------------------------------------

/// splitmix64: the schedule is a pure function of the seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---- The schedule ------------------------------------------------------------------------------

/// One fault (or ordinary event) of a schedule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    /// The runner's process dies without unlocking (SIGKILL, OOM); its pod stays.
    RunnerCrash(usize),
    /// The pod is deleted (its process dies with it).
    PodDeleted(usize),
    /// The pod is evicted: phase Failed (its process dies).
    PodEvicted(usize),
    /// The pod is deleted and a new one of the same name created (StatefulSet).
    PodRecreated(usize),
    /// The holder container restarts (its process dies; restartCount goes up).
    ContainerRestart(usize),
    /// The node is partitioned: phase Unknown while the runner lives on.
    NodePartition(usize),
    /// Someone creates a pod whose spec.hostname is the runner's hostname (after the lock).
    ImpostorPod(usize),
    /// A user edits the StateLock spec (created and who).
    SpecEdited(usize),
    /// A user asks for a manual unlock of the runner's lock, without the live override.
    ForceUnlock(usize),
    /// A user asks for a manual unlock with the live override (excepted from the safety check).
    ForceUnlockLive(usize),
    /// The runner's clock is skewed (within the tolerance) when it takes the lock.
    ClockSkew(usize),
    /// An operator process is killed and restarted.
    OperatorKilled(usize),
    /// An operator process is paused (SIGSTOP) for a while, then resumed.
    OperatorPaused(usize),
    /// Every watch stream is dropped.
    WatchesDropped,
    /// The pod watch is broken (held) for a while: caches fall behind.
    PodWatchHeld,
    /// The API's history is compacted: reconnecting watches get 410 Expired.
    HistoryCompacted,
    /// The next API writes fail (409, 500).
    ApiWritesFail,
    /// The API answers slowly for a while.
    ApiLatency,
    /// DynamoDB throttles the operator's next calls.
    DynamoThrottled,
    /// DynamoDB answers 500 to the operator's next calls.
    Dynamo5xx,
    /// The table's stream splits its open shards.
    StreamSplit,
    /// Every stream iterator handed out so far expires.
    StreamIteratorsExpired,
    /// The next GetRecords calls are throttled (too many readers on a shard).
    StreamThrottled,
    /// The table's stream is disabled and a new one enabled (a new ARN).
    StreamReplaced,
    /// The LockSource's grace period is changed while in use.
    SourceChanged,
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Self::RunnerCrash(_) => "runner crash",
            Self::PodDeleted(_) => "pod deleted",
            Self::PodEvicted(_) => "pod evicted",
            Self::PodRecreated(_) => "pod recreated",
            Self::ContainerRestart(_) => "container restart",
            Self::NodePartition(_) => "node partition",
            Self::ImpostorPod(_) => "look-alike pod",
            Self::SpecEdited(_) => "spec edited",
            Self::ForceUnlock(_) => "force-unlock",
            Self::ForceUnlockLive(_) => "force-unlock live",
            Self::ClockSkew(_) => "clock skew",
            Self::OperatorKilled(_) => "operator killed",
            Self::OperatorPaused(_) => "operator paused",
            Self::WatchesDropped => "watches dropped",
            Self::PodWatchHeld => "pod watch held",
            Self::HistoryCompacted => "history compacted (410)",
            Self::ApiWritesFail => "API 409/500",
            Self::ApiLatency => "API latency",
            Self::DynamoThrottled => "DynamoDB throttling",
            Self::Dynamo5xx => "DynamoDB 5xx",
            Self::StreamSplit => "stream shard split",
            Self::StreamIteratorsExpired => "stream iterators expired",
            Self::StreamThrottled => "stream throttled",
            Self::StreamReplaced => "stream replaced",
            Self::SourceChanged => "LockSource changed",
        }
    }
}

/// The runners of a schedule and the faults, in order, with the pause before each.
#[derive(Clone, Debug)]
struct Schedule {
    seed: u64,
    runners: usize,
    /// Per runner: how long it holds its lock once it has it (ms).
    hold_ms: Vec<u64>,
    /// Per runner: its pod's name is longer than 63 characters (its hostname is the name cut).
    long_name: Vec<bool>,
    /// Per runner: it talks to DynamoDB through an operator's gateway (which one), or directly.
    via_gateway: Vec<Option<usize>>,
    steps: Vec<(u64, Fault)>,
    /// The runners lock with an S3 lock file instead of a DynamoDB item (never through a gateway).
    lock_files: bool,
}

impl Schedule {
    /// The LockID of this schedule's lock (a lock file's as DynamoDB would spell it).
    fn lock_id(&self) -> String {
        if self.lock_files {
            format!("{BUCKET}/chaos-{}-f/terraform.tfstate", self.seed)
        } else {
            format!("tfstate/chaos-{}/terraform.tfstate", self.seed)
        }
    }

    /// The LockSource that mirrors this schedule's lock.
    fn source(&self) -> &'static str {
        if self.lock_files { "chaos-files" } else { "chaos" }
    }
}

fn schedule(seed: u64) -> Schedule {
    let mut rng = Rng(seed);
    let runners = 2 + rng.below(2) as usize;
    let hold_ms = (0..runners).map(|_| 300 + rng.below(2500)).collect();
    let long_name = (0..runners).map(|_| rng.chance(30)).collect();
    let via_gateway = (0..runners).map(|_| rng.chance(50).then(|| rng.below(2) as usize)).collect();
    let n = 3 + rng.below(6) as usize;
    let mut steps = Vec::new();
    for _ in 0..n {
        let r = rng.below(runners as u64) as usize;
        let f = match rng.below(21) {
            20 => Fault::ImpostorPod(r),
            0 | 1 => Fault::RunnerCrash(r),
            2 | 3 => Fault::PodDeleted(r),
            4 => Fault::PodEvicted(r),
            5 => Fault::PodRecreated(r),
            6 => Fault::ContainerRestart(r),
            7 => Fault::NodePartition(r),
            8 => Fault::SpecEdited(r),
            9 => Fault::ForceUnlock(r),
            10 if rng.chance(30) => Fault::ForceUnlockLive(r),
            10 => Fault::ClockSkew(r),
            11 => Fault::OperatorKilled(rng.below(2) as usize),
            12 => Fault::OperatorPaused(rng.below(2) as usize),
            13 => Fault::WatchesDropped,
            14 => Fault::PodWatchHeld,
            15 => Fault::HistoryCompacted,
            16 => Fault::ApiWritesFail,
            17 => Fault::ApiLatency,
            18 => match rng.below(6) {
                0 => Fault::DynamoThrottled,
                1 => Fault::Dynamo5xx,
                2 => Fault::StreamSplit,
                3 => Fault::StreamIteratorsExpired,
                4 => Fault::StreamThrottled,
                _ => Fault::StreamReplaced,
            },
            _ => Fault::SourceChanged,
        };
        steps.push((50 + rng.below(700), f));
    }
    // Drawn last, so that the other draws of a seed are what they were before lock files.
    let lock_files = rng.chance(33);
    let via_gateway = if lock_files { vec![None; runners] } else { via_gateway };
    Schedule { seed, runners, hold_ms, long_name, via_gateway, steps, lock_files }
}

// ---- The recording proxy in front of moto --------------------------------------------------------

/// A delete the operator sent: the exact instance it conditioned on.
#[derive(Clone, Debug)]
struct Deletion {
    at: Instant,
    lock_id: String,
    info: Option<String>,
}

#[derive(Default)]
struct ProxyState {
    deletions: Mutex<Vec<Deletion>>,
    throttle_next: AtomicU32,
    fail_next: AtomicU32,
}

/// Forward to moto, one connection per request; record the operator's deletes; inject faults
/// (when `faults`). Every write to moto goes through `writes`, one at a time: moto's conditional
/// PutItem is not atomic under concurrent requests (the first 1,000-schedule run with histories
/// showed two runners granted one lock 0-7 ms apart, with no delete in between), and DynamoDB's is.
async fn proxy(upstream: u16, faults: bool, writes: Arc<tokio::sync::Mutex<()>>) -> (String, Arc<ProxyState>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let state = Arc::new(ProxyState::default());
    let st = state.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (st, writes) = (st.clone(), writes.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, body)) = common::read_http_request(&mut conn, &mut buf).await {
                    let text = String::from_utf8_lossy(&head).to_string();
                    let target = text
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-amz-target:").map(|v| v.trim().to_owned()))
                        .unwrap_or_default();
                    // S3 calls carry no X-Amz-Target.
                    let s3 = target.is_empty();
                    let method = text.split(' ').next().unwrap_or_default().to_owned();
                    let reply = if faults && st.throttle_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
                    {
                        if s3 { s3_error_reply(503, "SlowDown") } else { error_reply(400, "ThrottlingException") }
                    } else if faults && st.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                        if s3 { s3_error_reply(500, "InternalError") } else { error_reply(500, "InternalServerError") }
                    } else {
                        if s3 && method == "DELETE" {
                            // A lock file's delete: recorded with the ETag it is conditioned on.
                            let path = text.split(' ').nth(1).unwrap_or_default();
                            let key =
                                path.split('?').next().unwrap_or_default().trim_start_matches('/').trim_end_matches(".tflock").to_owned();
                            let if_match = text.lines().find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("if-match:").map(|v| v.trim().trim_matches('"').to_owned())
                            });
                            st.deletions.lock().expect("deletions").push(Deletion { at: Instant::now(), lock_id: key, info: if_match });
                        }
                        if target.ends_with("deleteitem") {
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                            st.deletions.lock().expect("deletions").push(Deletion {
                                at: Instant::now(),
                                lock_id: v["Key"]["LockID"]["S"].as_str().unwrap_or_default().to_owned(),
                                info: v["ExpressionAttributeValues"]
                                    .as_object()
                                    .and_then(|m| m.values().next())
                                    .and_then(|x| x["S"].as_str())
                                    .map(str::to_owned),
                            });
                        }
                        let write = ["putitem", "deleteitem", "updateitem"].iter().any(|w| target.ends_with(w))
                            || (s3 && (method == "PUT" || method == "DELETE"));
                        let _one_at_a_time = if write { Some(writes.lock().await) } else { None };
                        match common::forward_http(upstream, &text, &body).await {
                            Some(r) => r,
                            None => error_reply(500, "InternalServerError"),
                        }
                    };
                    if conn.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, state)
}

fn s3_error_reply(status: u16, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the chaos harness</Message></Error>"
    );
    format!("HTTP/1.1 {status} X\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

fn error_reply(status: u16, code: &str) -> Vec<u8> {
    let body = format!("{{\"__type\":\"com.amazonaws.dynamodb.v20120810#{code}\",\"message\":\"injected by the chaos harness\"}}");
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/x-amz-json-1.0\r\nx-amzn-ErrorType: {code}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---- Ground truth ----------------------------------------------------------------------------

/// What the harness knows about one lock instance.
#[derive(Clone, Debug)]
struct Instance {
    schedule: u64,
    runner: usize,
    lock_id: String,
    /// What identifies the instance: its Info, or for a lock file its ETag.
    info: String,
    /// A lock file (S3) rather than an item.
    file: bool,
    granted: Instant,
    /// When its runner's process died (None: alive or unlocked it itself).
    died: Option<Instant>,
    /// When the runner unlocked it itself.
    unlocked: Option<Instant>,
    /// Whether the pod was gone (deleted, evicted, replaced or restarted) at the end.
    evidence_at: Option<Instant>,
}

#[derive(Default)]
struct Truth {
    instances: Mutex<Vec<Instance>>,
    /// Violations the runners saw themselves (their live lock gone before their unlock).
    vanished: Mutex<Vec<String>>,
    faults: Mutex<BTreeMap<&'static str, u64>>,
    /// Runners (schedule, runner) whose lock a manual unlock with the live override was asked
    /// for: their instances are excepted from the safety check (a person decided).
    overridden: Mutex<std::collections::BTreeSet<(u64, usize)>>,
}

// ---- The environment ---------------------------------------------------------------------------

struct Env {
    cluster: TestCluster,
    _moto: DynamoServer,
    db: aws_sdk_dynamodb::Client,
    /// The gateway of each operator process (fixed ports across restarts), as runners see it.
    gateways: Vec<(u16, aws_sdk_dynamodb::Client)>,
    proxy: Arc<ProxyState>,
    /// The runners' S3 (moto's, through a proxy that takes turns for writes), and what the
    /// operator's S3 proxy recorded.
    s3: aws_sdk_s3::Client,
    s3_proxy: Arc<ProxyState>,
    /// The table's stream (moto's table behind the streams double).
    stream: common::streams_double::StreamsDouble,
    operators: Mutex<Vec<Option<Operator>>>,
    truth: Truth,
}

fn start_operator(cluster: &TestCluster, i: usize, gateway_port: u16) -> Operator {
    let admin_port = free_port();
    let mut cmd = common::statelock_command();
    cmd.env("KUBECONFIG", &cluster.kubeconfig)
        .env("STATELOCK_GATEWAY_ADDR", format!("127.0.0.1:{gateway_port}"))
        .env("STATELOCK_LOG", "info")
        .env("STATELOCK_LEASE_NAMESPACE", SOURCE_NS)
        .env("STATELOCK_LEASE_DURATION", "3s")
        .args(["run", "--admin-addr", &format!("127.0.0.1:{admin_port}"), "--pod-name", &format!("operator-{i}")]);
    let log = cluster.dir.path().join(format!("operator-{i}-{admin_port}.log"));
    Operator::spawn(cmd, admin_port, &log)
}

async fn environment() -> Arc<Env> {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    // The table's stream: every write that reaches moto through the double becomes a record.
    let stream = common::streams_double::StreamsDouble::start(&moto.url(), TABLE).await;
    let upstream: u16 = stream.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("the double's port");
    let writes = Arc::new(tokio::sync::Mutex::new(()));
    // The runners that talk to DynamoDB directly do so through a proxy without faults or records,
    // which takes its turn for writes with the operator's.
    let (direct_url, _) = proxy(upstream, false, writes.clone()).await;
    // S3 straight to moto (the streams double serves DynamoDB only): the runners' and the operator's.
    let moto_port: u16 = moto.url().rsplit(':').next().and_then(|p| p.parse().ok()).expect("moto's port");
    let (s3_direct, _) = proxy(moto_port, false, writes.clone()).await;
    let (s3_url, s3_proxy) = proxy(moto_port, true, writes.clone()).await;
    let (url, proxy) = proxy(upstream, true, writes).await;
    let s3 = statelock::s3::client("us-east-1", Some(&s3_direct), Some(common::fake_credentials())).await;
    s3.create_bucket().bucket(BUCKET).send().await.expect("bucket");
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    for ns in [SOURCE_NS, RUNNERS] {
        cluster.create_namespace(ns).await;
    }
    cluster
        .create_lock_source(
            SOURCE_NS,
            "chaos",
            json!({
                "dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": url},
                "sync": {"mode": sync_mode(), "interval": "1s", "streamPollInterval": "100ms"},
                "holders": {"namespaces": [RUNNERS], "hostnamePattern": "runner-[0-9]+-[0-9]+"},
                "expiry": {"mode": "Release", "gracePeriod": "1s", "skewTolerance": "2s"},
                "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}
            }),
        )
        .await;
    cluster
        .create_lock_source(
            SOURCE_NS,
            "chaos-files",
            json!({
                "s3": {"bucket": BUCKET, "region": "us-east-1", "endpoint": s3_url},
                "sync": {"interval": "1s"},
                "holders": {"namespaces": [RUNNERS], "hostnamePattern": "runner-[0-9]+-[0-9]+"},
                "expiry": {"mode": "Release", "gracePeriod": "1s", "skewTolerance": "2s"}
            }),
        )
        .await;
    // The runners' SDK makes one attempt per call. A retried attempt of Terraform's unconditional
    // unlock (after a timeout, the first having gone through) deletes whoever took the lock in
    // between: a hazard of Terraform's own protocol, which no lock service can see. With one
    // attempt, every lock that vanishes under a live runner is statelock's doing.
    let creds =
        || statelock::dynamo::StaticCredentials { access_key_id: "AKIAFAKE".into(), secret_access_key: "fake".into(), session_token: None };
    let db = statelock::dynamo::passthrough_client("us-east-1", Some(&direct_url), Some(creds())).await;
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let client = statelock::dynamo::passthrough_client("us-east-1", Some(&format!("http://127.0.0.1:{port}")), Some(creds())).await;
        gateways.push((port, client));
    }
    let operators = Mutex::new((0..2).map(|i| Some(start_operator(&cluster, i, gateways[i].0))).collect());
    Arc::new(Env { cluster, _moto: moto, db, gateways, proxy, s3, s3_proxy, stream, operators, truth: Truth::default() })
}

fn pod_name_of(seed: u64, r: usize, long: bool) -> String {
    let name = format!("runner-{seed}-{r}");
    if long { format!("{name}{}", "0".repeat(70)) } else { name }
}

/// The hostname the kubelet gives a pod of that name: cut to 63 characters.
fn hostname_of(name: &str) -> String {
    name[..name.len().min(63)].trim_end_matches(['-', '.']).to_owned()
}

/// Create a runner's pod, Running, through the API faults the harness injects (another
/// schedule's): a runner without its pod is a world that cannot exist, where "no pod has the
/// runner's hostname" would be the truth.
async fn create_running_pod(env: &Env, name: &str) {
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), RUNNERS);
    let pod: Pod =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "terraform", "image": "terraform"}]}}))
            .expect("pod");
    let mut created = None;
    for _ in 0..100 {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(p) => {
                created = Some(p);
                break;
            }
            // An attempt that went through although its answer was a fault.
            Err(kube::Error::Api(e)) if e.code == 409 && e.reason == "AlreadyExists" => {
                created = pods.get_opt(name).await.ok().flatten();
                if created.is_some() {
                    break;
                }
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let created = created.unwrap_or_else(|| panic!("the harness could not create pod {name}"));
    let started = created.metadata.creation_timestamp.map(|t| t.0.to_string()).unwrap_or_default();
    let status = json!({"status": {"phase": "Running", "containerStatuses": [{"name": "terraform", "ready": true, "restartCount": 0, "image": "terraform", "imageID": "", "state": {"running": {"startedAt": started}}}]}});
    pod_status(env, name, status).await;
    let running = pods.get_opt(name).await.ok().flatten().and_then(|p| p.status).and_then(|s| s.phase);
    assert_eq!(running.as_deref(), Some("Running"), "the harness could not make pod {name} Running");
}

/// The harness's own API calls retry through the faults it injects.
async fn pod_status(env: &Env, name: &str, body: serde_json::Value) {
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), RUNNERS);
    for _ in 0..20 {
        match pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&body)).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 404 => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn delete_pod(env: &Env, name: &str) {
    let pods: Api<Pod> = Api::namespaced(env.cluster.client(), RUNNERS);
    for _ in 0..20 {
        match pods.delete(name, &DeleteParams::default()).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 404 => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---- A runner: Terraform's lock protocol --------------------------------------------------------

/// A simulated Terraform process. Its `alive` flag is the ground truth: the harness clears it
/// when the process dies (crash, pod deleted, evicted, container restarted).
struct Runner {
    alive: std::sync::atomic::AtomicBool,
    /// Created-time skew in ms (within the tolerance).
    skew_ms: std::sync::atomic::AtomicI64,
    instance: Mutex<Option<usize>>,
}

async fn run_runner(env: Arc<Env>, s: Arc<Schedule>, r: usize, me: Arc<Runner>) {
    if s.lock_files {
        return run_file_runner(env, s, r, me).await;
    }
    let lock_id = s.lock_id();
    let who = format!("root@{}", hostname_of(&pod_name_of(s.seed, r, s.long_name[r])));
    let id = format!("{:08x}-0000-0000-0000-{:012x}", s.seed, r);
    // Terraform's backoff: 1 s, 2 s, 4 s ... capped at 16 s; scaled down 5x to keep schedules short.
    let mut backoff = Duration::from_millis(200);
    let created = {
        let skew = me.skew_ms.load(Ordering::SeqCst);
        let now = k8s_openapi::jiff::Timestamp::now();
        now.checked_add(k8s_openapi::jiff::SignedDuration::from_millis(skew)).unwrap_or(now).to_string()
    };
    let info = terraform_info(&id, &who, &lock_id, &created);
    let db = match s.via_gateway[r] {
        Some(g) => env.gateways[g].1.clone(),
        None => env.db.clone(),
    };
    loop {
        if !me.alive.load(Ordering::SeqCst) {
            return;
        }
        let put = db
            .put_item()
            .table_name(TABLE)
            .item("LockID", AttributeValue::S(lock_id.clone()))
            .item("Info", AttributeValue::S(info.clone()))
            .condition_expression("attribute_not_exists(LockID)")
            .send()
            .await;
        if put.is_ok() {
            // A runner that died while its call was in flight holds the lock as a dead process.
            let died = (!me.alive.load(Ordering::SeqCst)).then(Instant::now);
            let idx = {
                let mut all = env.truth.instances.lock().expect("truth");
                all.push(Instance {
                    schedule: s.seed,
                    runner: r,
                    lock_id: lock_id.clone(),
                    info: info.clone(),
                    file: false,
                    granted: Instant::now(),
                    died,
                    unlocked: None,
                    evidence_at: None,
                });
                all.len() - 1
            };
            *me.instance.lock().expect("instance") = Some(idx);
            // Killed between the check above and now: kill_runner saw no instance to mark.
            if !me.alive.load(Ordering::SeqCst) {
                env.truth.instances.lock().expect("truth")[idx].died.get_or_insert_with(Instant::now);
                return;
            }
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(3200));
    }
    tokio::time::sleep(Duration::from_millis(s.hold_ms[r])).await;
    if !me.alive.load(Ordering::SeqCst) {
        return;
    }
    // Unlock as Terraform does: a consistent GetItem, compare the ID, an unconditional delete.
    // Terraform's SDK retries errors (an operator and its gateway may be down for a moment).
    let mut got = None;
    for _ in 0..20 {
        if let Ok(g) = db.get_item().table_name(TABLE).key("LockID", AttributeValue::S(lock_id.clone())).consistent_read(true).send().await
        {
            got = Some(g);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let Some(got) = got else {
        kill_runner(&env, &me);
        return;
    };
    let current = got.item.as_ref().and_then(|i| i.get("Info")).and_then(|v| v.as_s().ok()).cloned();
    if !me.alive.load(Ordering::SeqCst) {
        return;
    }
    if current.as_deref() != Some(info.as_str()) {
        let overridden = env.truth.overridden.lock().expect("overridden").contains(&(s.seed, r));
        if !overridden {
            env.truth.vanished.lock().expect("vanished").push(format!(
                "seed {}: runner {r} is alive and its lock {lock_id} is gone or not its own at unlock ({current:?})",
                s.seed
            ));
        }
        return;
    }
    // The unlock counts from when its delete is sent (another runner may be granted the lock before
    // the delete's answer arrives).
    // One attempt: once sent, the delete may take effect whatever the answer.
    let unlocking = Instant::now();
    if let Some(i) = *me.instance.lock().expect("instance") {
        env.truth.instances.lock().expect("truth")[i].unlocked = Some(unlocking);
    }
    if db.delete_item().table_name(TABLE).key("LockID", AttributeValue::S(lock_id.clone())).send().await.is_err() {
        // Terraform reports the error and exits: whatever became of its lock, its process is gone.
        kill_runner(&env, &me);
    }
    me.alive.store(false, Ordering::SeqCst);
}

/// A Terraform 1.11+ process with `use_lockfile`: PutObject `<key>.tflock` with If-None-Match,
/// and its unlock (GetObject, compare, an unconditional DeleteObject).
async fn run_file_runner(env: Arc<Env>, s: Arc<Schedule>, r: usize, me: Arc<Runner>) {
    let lock_id = s.lock_id();
    let key = format!("{}.tflock", lock_id.strip_prefix("tfstate/").expect("in the bucket"));
    let who = format!("root@{}", hostname_of(&pod_name_of(s.seed, r, s.long_name[r])));
    let id = format!("{:08x}-0000-0000-0000-{:012x}", s.seed, r);
    let mut backoff = Duration::from_millis(200);
    let created = {
        let skew = me.skew_ms.load(Ordering::SeqCst);
        let now = k8s_openapi::jiff::Timestamp::now();
        now.checked_add(k8s_openapi::jiff::SignedDuration::from_millis(skew)).unwrap_or(now).to_string()
    };
    let info = terraform_info(&id, &who, &lock_id, &created);
    loop {
        if !me.alive.load(Ordering::SeqCst) {
            return;
        }
        let put = env.s3.put_object().bucket(BUCKET).key(&key).if_none_match("*").body(info.clone().into_bytes().into()).send().await;
        if let Ok(out) = put {
            let etag = out.e_tag.unwrap_or_default().trim_matches('"').to_owned();
            let died = (!me.alive.load(Ordering::SeqCst)).then(Instant::now);
            let idx = {
                let mut all = env.truth.instances.lock().expect("truth");
                all.push(Instance {
                    schedule: s.seed,
                    runner: r,
                    lock_id: lock_id.clone(),
                    info: etag,
                    file: true,
                    granted: Instant::now(),
                    died,
                    unlocked: None,
                    evidence_at: None,
                });
                all.len() - 1
            };
            *me.instance.lock().expect("instance") = Some(idx);
            if !me.alive.load(Ordering::SeqCst) {
                env.truth.instances.lock().expect("truth")[idx].died.get_or_insert_with(Instant::now);
                return;
            }
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(3200));
    }
    tokio::time::sleep(Duration::from_millis(s.hold_ms[r])).await;
    if !me.alive.load(Ordering::SeqCst) {
        return;
    }
    // Terraform's unlock: read the file, compare the ID, delete it unconditionally.
    let mut got: Option<Option<String>> = None;
    for _ in 0..20 {
        match env.s3.get_object().bucket(BUCKET).key(&key).send().await {
            Ok(o) => {
                let body = o.body.collect().await.map(|b| String::from_utf8_lossy(&b.into_bytes()).into_owned()).ok();
                got = Some(body);
                break;
            }
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                got = Some(None);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    let Some(current) = got else {
        kill_runner(&env, &me);
        return;
    };
    if !me.alive.load(Ordering::SeqCst) {
        return;
    }
    if current.as_deref() != Some(info.as_str()) {
        let overridden = env.truth.overridden.lock().expect("overridden").contains(&(s.seed, r));
        if !overridden {
            env.truth.vanished.lock().expect("vanished").push(format!(
                "seed {}: runner {r} is alive and its lock file {key} is gone or not its own at unlock ({current:?})",
                s.seed
            ));
        }
        return;
    }
    let unlocking = Instant::now();
    if let Some(i) = *me.instance.lock().expect("instance") {
        env.truth.instances.lock().expect("truth")[i].unlocked = Some(unlocking);
    }
    if env.s3.delete_object().bucket(BUCKET).key(&key).send().await.is_err() {
        kill_runner(&env, &me);
    }
    me.alive.store(false, Ordering::SeqCst);
}

fn kill_runner(env: &Env, me: &Runner) {
    if me.alive.swap(false, Ordering::SeqCst)
        && let Some(i) = *me.instance.lock().expect("instance")
    {
        let mut all = env.truth.instances.lock().expect("truth");
        if all[i].unlocked.is_none() && all[i].died.is_none() {
            all[i].died = Some(Instant::now());
        }
    }
}

fn mark_evidence(env: &Env, me: &Runner) {
    if let Some(i) = *me.instance.lock().expect("instance") {
        let mut all = env.truth.instances.lock().expect("truth");
        all[i].evidence_at.get_or_insert(Instant::now());
    }
}

// ---- Running a schedule ---------------------------------------------------------------------------

async fn apply_fault(env: &Arc<Env>, s: &Schedule, runners: &[Arc<Runner>], f: &Fault) {
    *env.truth.faults.lock().expect("faults").entry(f.kind()).or_default() += 1;
    let locks: Api<StateLock> = Api::namespaced(env.cluster.client(), SOURCE_NS);
    let lock_name = state_lock_name(&s.lock_id());
    match f {
        Fault::RunnerCrash(r) => kill_runner(env, &runners[*r]),
        Fault::PodDeleted(r) => {
            kill_runner(env, &runners[*r]);
            mark_evidence(env, &runners[*r]);
            delete_pod(env, &pod_name_of(s.seed, *r, s.long_name[*r])).await;
        }
        Fault::PodEvicted(r) => {
            kill_runner(env, &runners[*r]);
            mark_evidence(env, &runners[*r]);
            let body = json!({"status": {"phase": "Failed", "reason": "Evicted"}});
            pod_status(env, &pod_name_of(s.seed, *r, s.long_name[*r]), body).await;
        }
        Fault::PodRecreated(r) => {
            kill_runner(env, &runners[*r]);
            mark_evidence(env, &runners[*r]);
            delete_pod(env, &pod_name_of(s.seed, *r, s.long_name[*r])).await;
            create_running_pod(env, &pod_name_of(s.seed, *r, s.long_name[*r])).await;
        }
        Fault::ContainerRestart(r) => {
            kill_runner(env, &runners[*r]);
            mark_evidence(env, &runners[*r]);
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let body = json!({"status": {"containerStatuses": [{"name": "terraform", "ready": true, "restartCount": 1, "image": "terraform", "imageID": "", "state": {"running": {"startedAt": now}}}]}});
            pod_status(env, &pod_name_of(s.seed, *r, s.long_name[*r]), body).await;
        }
        Fault::NodePartition(r) => {
            let body = json!({"status": {"phase": "Unknown"}});
            pod_status(env, &pod_name_of(s.seed, *r, s.long_name[*r]), body).await;
        }
        Fault::ImpostorPod(r) => {
            let host = hostname_of(&pod_name_of(s.seed, *r, s.long_name[*r]));
            let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("impostor-{}-{r}", s.seed)}, "spec": {"hostname": host, "containers": [{"name": "x", "image": "x"}]}}))
                .expect("pod");
            let _ = Api::<Pod>::namespaced(env.cluster.client(), RUNNERS).create(&PostParams::default(), &pod).await;
            pod_status(env, &format!("impostor-{}-{r}", s.seed), json!({"status": {"phase": "Running"}})).await;
        }
        Fault::SpecEdited(_) => {
            let edit = json!({"spec": {"lockInfo": {"created": "2020-01-01T00:00:00Z", "who": "root@runner-0-0"}}});
            let _ = locks.patch(&lock_name, &PatchParams::default(), &Patch::Merge(&edit)).await;
        }
        Fault::ForceUnlock(r) | Fault::ForceUnlockLive(r) => {
            let id = format!("{:08x}-0000-0000-0000-{:012x}", s.seed, r);
            let live = matches!(f, Fault::ForceUnlockLive(_));
            if live {
                env.truth.overridden.lock().expect("overridden").insert((s.seed, *r));
            }
            let mut ann = json!({"statelock.dev/force-unlock": id});
            if live {
                ann["statelock.dev/force-unlock-live"] = json!(id);
            }
            let _ = locks.patch(&lock_name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": ann}}))).await;
        }
        Fault::ClockSkew(r) => runners[*r].skew_ms.store(if s.seed.is_multiple_of(2) { 1500 } else { -1500 }, Ordering::SeqCst),
        Fault::OperatorKilled(i) => {
            let old = env.operators.lock().expect("operators")[*i].take();
            if let Some(op) = old {
                op.kill().await;
            }
            let new = start_operator(&env.cluster, *i, env.gateways[*i].0);
            env.operators.lock().expect("operators")[*i] = Some(new);
        }
        Fault::OperatorPaused(i) => {
            let pid = env.operators.lock().expect("operators")[*i].as_ref().and_then(|o| o.child.id());
            if let Some(pid) = pid {
                let signal = |sig: &str| {
                    let _ = std::process::Command::new("kill").args([sig, &pid.to_string()]).stderr(std::process::Stdio::null()).status();
                };
                signal("-STOP");
                tokio::time::sleep(Duration::from_millis(1500)).await;
                signal("-CONT");
            }
        }
        Fault::WatchesDropped => {
            env.cluster.emulator.drop_watches();
        }
        Fault::PodWatchHeld => {
            env.cluster.emulator.hold_watches_of("", "pods", true);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            env.cluster.emulator.hold_watches_of("", "pods", false);
        }
        Fault::HistoryCompacted => {
            env.cluster.emulator.compact();
            env.cluster.emulator.drop_watches();
        }
        Fault::ApiWritesFail => env.cluster.emulator.fail_next_writes(&[409, 500]),
        Fault::ApiLatency => {
            env.cluster.emulator.set_latency(Duration::from_millis(300));
            tokio::time::sleep(Duration::from_millis(1000)).await;
            env.cluster.emulator.set_latency(Duration::ZERO);
        }
        // The store of the schedule's lock throttles or fails (S3: SlowDown, InternalError).
        Fault::DynamoThrottled => {
            (if s.lock_files { &env.s3_proxy } else { &env.proxy }).throttle_next.fetch_add(3, Ordering::SeqCst);
        }
        Fault::Dynamo5xx => {
            (if s.lock_files { &env.s3_proxy } else { &env.proxy }).fail_next.fetch_add(2, Ordering::SeqCst);
        }
        Fault::StreamSplit => env.stream.split(),
        Fault::StreamIteratorsExpired => env.stream.expire_iterators(),
        Fault::StreamThrottled => env.stream.faults(|f| f.throttle_next += 5),
        Fault::StreamReplaced => env.stream.replace_stream(),
        Fault::SourceChanged => {
            let grace = if s.seed.is_multiple_of(2) { "0s" } else { "2s" };
            let api: Api<statelock::crd::LockSource> = Api::namespaced(env.cluster.client(), SOURCE_NS);
            let _ =
                api.patch(s.source(), &PatchParams::default(), &Patch::Merge(json!({"spec": {"expiry": {"gracePeriod": grace}}}))).await;
        }
    }
}

async fn run_schedule(env: Arc<Env>, s: Schedule) {
    let s = Arc::new(s);
    let runners: Vec<Arc<Runner>> =
        (0..s.runners).map(|_| Arc::new(Runner { alive: true.into(), skew_ms: 0.into(), instance: Mutex::new(None) })).collect();
    for r in 0..s.runners {
        create_running_pod(&env, &pod_name_of(s.seed, r, s.long_name[r])).await;
    }
    // Clock skew applies when the lock is taken: set it first.
    for (_, f) in &s.steps {
        if matches!(f, Fault::ClockSkew(_)) {
            apply_fault(&env, &s, &runners, f).await;
        }
    }
    let tasks: Vec<_> = (0..s.runners).map(|r| tokio::spawn(run_runner(env.clone(), s.clone(), r, runners[r].clone()))).collect();
    for (pause, f) in &s.steps {
        tokio::time::sleep(Duration::from_millis(*pause)).await;
        if !matches!(f, Fault::ClockSkew(_)) {
            apply_fault(&env, &s, &runners, f).await;
        }
    }
    // Heal: the pods of dead runners go (so that their locks are released and the live runners
    // waiting behind them get their turn); the live runners finish; then every pod goes.
    for r in 0..s.runners {
        if s.steps.iter().any(|(_, f)| *f == Fault::ImpostorPod(r)) {
            delete_pod(&env, &format!("impostor-{}-{r}", s.seed)).await;
        }
    }
    for (r, runner) in runners.iter().enumerate() {
        if !runner.alive.load(Ordering::SeqCst) {
            mark_evidence(&env, runner);
            delete_pod(&env, &pod_name_of(s.seed, r, s.long_name[r])).await;
        }
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(90), t).await;
    }
    for (r, runner) in runners.iter().enumerate() {
        kill_runner(&env, runner);
        mark_evidence(&env, runner);
        delete_pod(&env, &pod_name_of(s.seed, r, s.long_name[r])).await;
    }
}

// ---- The checker -------------------------------------------------------------------------------

struct Report {
    schedules: u64,
    violations: Vec<String>,
    liveness: Vec<Duration>,
    /// How many of the releases measured were lock files.
    liveness_files: usize,
}

async fn check(env: &Env, schedules: &[Schedule]) -> Report {
    let mut violations: Vec<String> = env.truth.vanished.lock().expect("vanished").clone();
    // Liveness: wait for every lock of a dead runner whose pod is gone.
    let mut liveness = Vec::new();
    let mut liveness_files = 0;
    let instances = env.truth.instances.lock().expect("truth").clone();
    for inst in &instances {
        if inst.unlocked.is_some() {
            continue;
        }
        let Some(evidence) = inst.evidence_at else { continue };
        let deadline = evidence.max(Instant::now()) + GRACE + LIVENESS_BOUND;
        loop {
            let present = if inst.file {
                let key = format!("{}.tflock", inst.lock_id.strip_prefix("tfstate/").unwrap_or_default());
                let got = env.s3.head_object().bucket(BUCKET).key(key).send().await;
                got.ok().and_then(|h| h.e_tag).map(|e| e.trim_matches('"').to_owned())
            } else {
                let got = env
                    .db
                    .get_item()
                    .table_name(TABLE)
                    .key("LockID", AttributeValue::S(inst.lock_id.clone()))
                    .consistent_read(true)
                    .send()
                    .await;
                got.ok().and_then(|g| g.item).and_then(|i| i.get("Info").and_then(|v| v.as_s().ok()).cloned())
            };
            if present.as_deref() != Some(inst.info.as_str()) {
                break;
            }
            if Instant::now() > deadline {
                violations.push(format!(
                    "seed {}: liveness: the lock of dead runner {} (pod gone) was not released within {:?}",
                    inst.schedule,
                    inst.runner,
                    GRACE + LIVENESS_BOUND
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let released = all_deletions(env).iter().find(|d| d.info.as_deref() == Some(inst.info.as_str())).map(|d| d.at);
        if let Some(at) = released {
            liveness.push(at.saturating_duration_since(evidence));
            liveness_files += usize::from(inst.file);
        }
    }
    // Safety: every delete the operator sent was for an instance whose runner was dead then.
    for d in &all_deletions(env) {
        // Unconditional deletes are Terraform's own unlocks forwarded by the gateway; statelock's
        // releases are always conditioned on the exact Info.
        let Some(info) = &d.info else { continue };
        let Some(inst) = instances.iter().find(|i| &i.info == info) else { continue };
        let dead_then = inst.died.is_some_and(|t| t <= d.at) || inst.unlocked.is_some_and(|t| t <= d.at);
        let overridden = env.truth.overridden.lock().expect("overridden").contains(&(inst.schedule, inst.runner));
        if !dead_then && !overridden {
            violations.push(format!(
                "seed {}: SAFETY: the operator deleted the lock {} of live runner {} ({} after it was granted)",
                inst.schedule,
                d.lock_id,
                inst.runner,
                humantime(d.at.saturating_duration_since(inst.granted))
            ));
        }
    }
    // No double grant: a lock instance is granted only once the previous one of the same LockID
    // was unlocked by its runner or deleted by the operator.
    let deletions = all_deletions(env);
    let mut by_lock: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
    for i in &instances {
        by_lock.entry(i.lock_id.as_str()).or_default().push(i);
    }
    for list in by_lock.values_mut() {
        list.sort_by_key(|i| i.granted);
        for pair in list.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let freed = a.unlocked.is_some_and(|t| t <= b.granted)
                || deletions.iter().any(|d| d.info.as_deref() == Some(a.info.as_str()) && d.at <= b.granted);
            if !freed {
                violations.push(format!(
                    "seed {}: DOUBLE GRANT: runner {} was granted the lock while runner {} still held it",
                    b.schedule, b.runner, a.runner
                ));
            }
        }
    }
    for v in &mut violations {
        if let Some(seed) = v.strip_prefix("seed ").and_then(|r| r.split(':').next()).and_then(|n| n.parse::<u64>().ok())
            && let Some(s) = schedules.iter().find(|s| s.seed == seed)
        {
            v.push_str(&format!(
                "\n  schedule: {} runners, {}, holds {:?} ms, long names {:?}, through gateway {:?}, faults in order: {:?}",
                s.runners,
                if s.lock_files { "lock files" } else { "DynamoDB items" },
                s.hold_ms,
                s.long_name,
                s.via_gateway,
                s.steps
            ));
            v.push_str(&history(&instances, &deletions, seed));
        }
    }
    Report { schedules: schedules.len() as u64, violations, liveness, liveness_files }
}

/// Every delete the operator sent, to DynamoDB and to S3.
fn all_deletions(env: &Env) -> Vec<Deletion> {
    let mut all = env.proxy.deletions.lock().expect("deletions").clone();
    all.extend(env.s3_proxy.deletions.lock().expect("deletions").iter().cloned());
    all
}

/// The offending history of one schedule: every grant of its lock (with its runner's death, unlock
/// and pod evidence) and every delete of it, in seconds from the first grant.
fn history(instances: &[Instance], deletions: &[Deletion], seed: u64) -> String {
    let mine: Vec<&Instance> = instances.iter().filter(|i| i.schedule == seed).collect();
    let Some(t0) = mine.iter().map(|i| i.granted).min() else { return "\n  history: no grant".into() };
    let at = |t: Instant| format!("{:+.3}s", t.saturating_duration_since(t0).as_secs_f64());
    let opt = |t: Option<Instant>| t.map(at).unwrap_or_else(|| "-".into());
    let mut out = String::from("\n  history (from the first grant):");
    for i in &mine {
        out.push_str(&format!(
            "\n    grant to runner {} at {}: died {}, unlock sent {}, pod evidence {}",
            i.runner,
            at(i.granted),
            opt(i.died),
            opt(i.unlocked),
            opt(i.evidence_at)
        ));
    }
    let lock_ids = [format!("tfstate/chaos-{seed}/terraform.tfstate"), format!("{BUCKET}/chaos-{seed}-f/terraform.tfstate")];
    for d in deletions.iter().filter(|d| lock_ids.contains(&d.lock_id)) {
        let whose = match &d.info {
            None => "unconditional (a runner's unlock through a gateway)".to_owned(),
            Some(info) => match mine.iter().find(|i| &i.info == info) {
                Some(i) => format!("conditioned on runner {}'s instance", i.runner),
                None => "conditioned on an unknown instance".to_owned(),
            },
        };
        out.push_str(&format!("\n    delete sent at {}: {whose}", at(d.at)));
    }
    out
}

fn humantime(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// The mirror's sync mode: Streams (the stream faults act), or `STATELOCK_CHAOS_SYNC_MODE=Scan`.
fn sync_mode() -> String {
    std::env::var("STATELOCK_CHAOS_SYNC_MODE").unwrap_or_else(|_| "Streams".into())
}

/// Seeds to run: a fixed set in CI, more on request.
fn seeds() -> Vec<u64> {
    let count: u64 = std::env::var("STATELOCK_CHAOS_SCHEDULES").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let first: u64 = std::env::var("STATELOCK_CHAOS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    (first..first + count).collect()
}

#[test]
fn schedules_are_a_pure_function_of_the_seed_and_cover_every_fault() {
    let a: Vec<_> = (1..200).map(|s| schedule(s).steps).collect();
    let b: Vec<_> = (1..200).map(|s| schedule(s).steps).collect();
    assert_eq!(a, b);
    let kinds: std::collections::BTreeSet<&str> = a.iter().flatten().map(|(_, f)| f.kind()).collect();
    assert_eq!(kinds.len(), 25, "every kind of fault is drawn: {kinds:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_live_holders_lock_is_ever_released_under_randomized_faults() {
    let started = Instant::now();
    let env = environment().await;
    let seeds = seeds();
    let schedules: Vec<Schedule> = seeds.iter().map(|s| schedule(*s)).collect();
    for batch in schedules.chunks(PARALLEL) {
        let tasks: Vec<_> = batch.iter().cloned().map(|s| tokio::spawn(run_schedule(env.clone(), s))).collect();
        for t in tasks {
            t.await.expect("schedule");
        }
    }
    let report = check(&env, &schedules).await;
    let mut lat = report.liveness.clone();
    lat.sort();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default();
    println!("chaos: {} schedules in {:.0}s", report.schedules, started.elapsed().as_secs_f64());
    println!("  faults injected by kind: {:?}", env.truth.faults.lock().expect("faults"));
    println!(
        "  locks of dead runners released after their pod went: {}; p50 {}  p99 {}  max {} (bound: grace {:?} + {:?})",
        lat.len(),
        humantime(pct(0.5)),
        humantime(pct(0.99)),
        humantime(lat.last().copied().unwrap_or_default()),
        GRACE,
        LIVENESS_BOUND
    );
    // Schedules run side by side on shared operators, so another schedule's faults (an operator
    // killed or paused, watches held) may still be active when one heals: reported, not failed.
    println!(
        "  releases slower than the bound (another schedule's faults still active): {}",
        lat.iter().filter(|d| **d > GRACE + LIVENESS_BOUND).count()
    );
    println!(
        "  deletes recorded at the DynamoDB side (statelock's, and runners' unlocks through a gateway): {}; lock files deleted by statelock: {}",
        env.proxy.deletions.lock().expect("deletions").len(),
        env.s3_proxy.deletions.lock().expect("deletions").len()
    );
    let file_schedules = schedules.iter().filter(|s| s.lock_files).count();
    let file_releases = report.liveness_files;
    println!("  schedules with lock files: {file_schedules}; their dead runners' lock files released: {file_releases}");
    println!("  violations: {}", report.violations.len());
    for op in env.operators.lock().expect("operators").iter_mut().flatten() {
        let _ = op.child.start_kill();
    }
    assert!(report.violations.is_empty(), "violations:\n{}", report.violations.join("\n"));
    assert!(
        !lat.is_empty() || report.schedules < 3,
        "no schedule released anything: the harness would not notice a fix that releases nothing"
    );
}
