//! The mirror: keeps each LockSource's StateLocks in step with its lock stores.
//!
//! Lock files (`spec.s3`) are listed every interval and read only when their ETag is new (in event
//! mode, [`events`], they are read when an S3 event names them, and listed every `resyncInterval`
//! as the safety net); with a
//! DynamoDB table too, a lock's file and item become one StateLock
//! ([`crate::lock_store::merge_parts`]).
//!
//! One task per LockSource reads the table, plans the changes ([`plan`]) and applies them with
//! server-side apply under the `statelock-mirror` field manager, writing only what changed. In
//! Scan mode it scans every interval. In Streams mode a full Scan establishes the truth (after
//! the stream position was taken, so nothing falls in between), then the stream is followed,
//! polled every 100 ms; the interval then only re-plans from memory (for Stale), and a full Scan
//! runs again after a stream error and every hour as a safety net. It never touches a StateLock
//! when the table could not be read: an outage is reported on the LockSource, never mistaken for
//! "every lock was released".

mod events;
pub mod plan;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::Recorder,
};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    admin::Readiness,
    cluster::{
        Cluster, NudgeReceiver,
        aws::SourceSdk,
        writer::{LockWriter, Writer},
    },
    crd::{LockSource, LockSourceStatus, StateLock, SyncMode},
    dynamo::{
        self,
        lock_item::TableItem,
        streams::{ItemChange, StreamCall, StreamError, StreamFailure, StreamReader},
    },
    errors::ErrorCategory,
    leader::Leadership,
    lock_record::LockRecord,
    lock_store::StoreKind,
    metrics::{ControllerLabels, ControllerName, ErrorLabels, Metrics, S3RequestLabels, ScanLabels, SourceLabels, StreamCallLabels},
    reasons, s3,
    tenancy::TenancyPolicy,
};

/// How often Streams mode re-reads the whole table anyway.
const STREAMS_FULL_RESYNC: Duration = Duration::from_secs(3600);

/// Everything the mirror's tasks share.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Only the leader reads tables and writes; every replica watches LockSources.
    pub leader: Leadership,
    /// Which LockSources may be served, and with whose identity.
    pub tenancy: Arc<TenancyPolicy>,
    /// Table read capacity consumed so far, in thousandths of an RCU, counted as DynamoDB bills
    /// it (see [`dynamo::capacity`]); stream reads are billed separately and not counted here.
    pub read_units_milli: AtomicU64,
    /// DynamoDB Streams requests made so far (every call; AWS bills each GetRecords).
    pub stream_requests: AtomicU64,
    /// Per LockSource, the LockSources of its namespace refused in its favour (same table): it
    /// keeps their StateLocks up to date as its own.
    adopted: std::sync::Mutex<HashMap<SourceKey, BTreeSet<String>>>,
    /// The shared caches: LockSources to follow, and the StateLocks that exist.
    pub cluster: Arc<Cluster>,
    writer: LockWriter,
    /// StateLock writes in flight across every LockSource (see [`MAX_CONCURRENT_WRITES`]).
    writes: tokio::sync::Semaphore,
}

/// How many StateLocks the mirror writes at once, over all its LockSources. Each LockSource
/// writes its own one at a time, so without a bound a start over 100 LockSources made 100
/// requests at once: kube's client speaks HTTP/1, so that is 100 connections, each keeping its
/// buffers long after. The API server does not write faster for it either.
const MAX_CONCURRENT_WRITES: usize = 16;

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        leader: Leadership,
        tenancy: Arc<TenancyPolicy>,
        cluster: Arc<Cluster>,
    ) -> Self {
        let writer = LockWriter::new(client.clone(), recorder.clone(), Writer::Mirror);
        Self {
            client,
            recorder,
            metrics,
            leader,
            tenancy,
            read_units_milli: AtomicU64::new(0),
            stream_requests: AtomicU64::new(0),
            adopted: std::sync::Mutex::default(),
            cluster,
            writer,
            writes: tokio::sync::Semaphore::new(MAX_CONCURRENT_WRITES),
        }
    }

    /// Report the mirror's events as `reporter` (the recorder's): a lock's `LockAcquired` and
    /// `LockReleased` are then events of their own, never cached for a series.
    pub fn with_reporter(mut self, reporter: kube::runtime::events::Reporter) -> Self {
        self.writer = self.writer.with_reporter(reporter);
        self
    }

    fn add_read_units(&self, source: &LockSource, units: f64) {
        self.read_units_milli.fetch_add((units * 1000.0).round() as u64, Ordering::Relaxed);
        self.metrics.locks.read_units.get_or_create(&source_labels(source)).inc_by(units);
    }

    /// Fail unless this replica leads now; checked right before every write.
    fn ensure_leader(&self) -> Result<(), SyncError> {
        if self.leader.is_leader() { Ok(()) } else { Err(SyncError::NotLeader) }
    }

    /// A turn to write one StateLock (and its events); leadership is checked once it is granted.
    async fn write_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, SyncError> {
        let turn = self.writes.acquire().await.expect("the mirror's write semaphore is never closed");
        self.ensure_leader()?;
        Ok(turn)
    }

    /// Table read capacity consumed so far.
    pub fn read_units(&self) -> f64 {
        self.read_units_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// Why one sync pass failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    ReadCredentials(#[from] dynamo::source_credentials::SourceAccessError),
    #[error(transparent)]
    Dynamo(#[from] dynamo::DynamoError),
    #[error(transparent)]
    S3(#[from] crate::s3::S3Error),
    #[error("sync mode Streams needs a DynamoDB Stream on table {table}, and it has none")]
    StreamNotEnabled { table: String },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("failed to apply StateLock {name}: {error}")]
    ApplyStateLock { name: String, error: kube::Error },
    #[error("failed to delete StateLock {name}: {error}")]
    DeleteStateLock { name: String, error: kube::Error },
    #[error("this replica stopped leading; writes left to the new leader")]
    NotLeader,
}

impl SyncError {
    pub fn category(&self) -> ErrorCategory {
        match self {
            Self::ReadCredentials(e) => e.category(),
            Self::Dynamo(e) => e.category(),
            Self::S3(e) => e.category(),
            Self::StreamNotEnabled { .. } => ErrorCategory::DynamoRefused,
            Self::Stream(e) => e.category(),
            Self::ApplyStateLock { error, .. } | Self::DeleteStateLock { error, .. } => ErrorCategory::of_kube(error),
            Self::NotLeader => ErrorCategory::NotLeader,
        }
    }

    /// The reason on the LockSource's Ready condition (metrics use [`Self::category`]).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReadCredentials(e) => e.reason(),
            Self::Dynamo(_) => "TableUnreadable",
            Self::S3(_) => "LockFilesUnreadable",
            Self::StreamNotEnabled { .. } => "StreamNotEnabled",
            Self::Stream(_) => "StreamUnreadable",
            Self::ApplyStateLock { .. } | Self::DeleteStateLock { .. } => "KubernetesApiError",
            Self::NotLeader => "NotLeader",
        }
    }
}

type SourceKey = (String, String);

struct Running {
    fingerprint: String,
    /// The stores it mirrors.
    stores: Vec<StoreKey>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// A store as LockSources of one namespace name it: (namespace, kind, table or bucket, region,
/// endpoint, credentials Secret). Another Secret may be another AWS account's store of the same
/// name. A bucket is one store whatever the prefix (prefixes may overlap).
type StoreKey = (String, &'static str, String, String, Option<String>, Option<String>);

fn store_keys(s: &LockSource) -> Vec<StoreKey> {
    let ns = s.namespace().unwrap_or_default();
    let secret = |r: &Option<crate::crd::CredentialsSecretRef>| r.as_ref().map(|r| r.name.clone());
    let mut out = Vec::new();
    if let Some(b) = &s.spec.s3 {
        out.push((ns.clone(), "bucket", b.bucket.clone(), b.region.clone(), b.endpoint.clone(), secret(&b.credentials_secret_ref)));
    }
    if let Some(d) = &s.spec.dynamodb {
        out.push((ns, "table", d.table_name.clone(), d.region.clone(), d.endpoint.clone(), secret(&d.credentials_secret_ref)));
    }
    out
}

/// The stores of a LockSource in words: `table t`, `bucket b`, `bucket b and table t`.
fn stores_text(s: &LockSource) -> String {
    store_keys(s).iter().map(|k| format!("{} {}", k.1, k.2)).collect::<Vec<_>>().join(" and ")
}

fn source_labels(source: &LockSource) -> SourceLabels {
    SourceLabels { namespace: source.namespace().unwrap_or_default(), source: source.name_any() }
}

/// Follow the LockSources (the shared cache) on every replica; while this replica leads, run one
/// sync task per source until `shutdown`.
///
/// Readiness: `locksources` opens once the LockSources were listed; `stores` once one
/// LockSource's stores could be read (a DescribeTable, a one-key listing, on every replica, so
/// followers are checked too), or at once
/// when there are no LockSources. One broken LockSource does not hold the operator back: it
/// reports itself in its own Ready condition.
///
/// Its readiness gates are closed when this is called, before the returned future first runs.
pub fn run(ctx: Arc<Context>, readiness: Readiness, shutdown: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
    readiness.add_gate("locksources", "listing LockSources");
    readiness.add_gate("stores", "no LockSource's lock store has been read yet");
    follow_sources(ctx, readiness, shutdown)
}

async fn follow_sources(ctx: Arc<Context>, readiness: Readiness, shutdown: CancellationToken) {
    tokio::select! {
        () = ctx.cluster.sources_listed() => {},
        () = shutdown.cancelled() => return,
    }
    let mut changes = ctx.cluster.source_changes();
    let mut lead = ctx.leader.changes();
    let mut lead_open = true;
    let mut known: HashMap<SourceKey, LockSource> = HashMap::new();
    let mut probed: HashMap<SourceKey, (String, CancellationToken)> = HashMap::new();
    let mut running: HashMap<SourceKey, Running> = HashMap::new();
    let mut refused: HashMap<SourceKey, (String, String)> = HashMap::new();
    let dynamo_ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut first = true;
    loop {
        // Level-triggered: the wanted set is whatever the cache holds now.
        changes.borrow_and_update();
        let wanted: HashMap<SourceKey, LockSource> = ctx.cluster.sources.state().iter().map(|s| (key(s), (**s).clone())).collect();
        let first_readers = first_readers(&wanted, &running);
        // One StateLock per lock: a second LockSource on a table already mirrored into this
        // namespace is refused, by name, and never runs; it is stopped before anything starts,
        // and the first one adopts its StateLocks.
        let mut adopted: HashMap<SourceKey, BTreeSet<String>> = HashMap::new();
        for (k, first) in &first_readers {
            stop(&mut running, k).await;
            adopted.entry((k.0.clone(), first.clone())).or_default().insert(k.1.clone());
            let src = &wanted[k];
            if ctx.leader.is_leader() && refused.get(k) != Some(&(fingerprint(src), first.clone())) {
                refuse_duplicate(&ctx, src, first).await;
                refused.insert(k.clone(), (fingerprint(src), first.clone()));
            }
        }
        *ctx.adopted.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = adopted;
        // Sources that went stop before any other starts.
        let gone: Vec<SourceKey> = known.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for k in gone {
            forget(&ctx, &mut known, &mut probed, &k);
            stop(&mut running, &k).await;
        }
        for (k, src) in &wanted {
            if first_readers.contains_key(k) {
                continue;
            }
            refused.remove(k);
            if probed.get(k).is_none_or(|(f, _)| *f != fingerprint(src)) {
                let cancel = shutdown.child_token();
                if let Some((_, old)) = probed.insert(k.clone(), (fingerprint(src), cancel.clone())) {
                    old.cancel();
                }
                tokio::spawn(probe(ctx.clone(), src.clone(), readiness.clone(), dynamo_ok.clone(), cancel));
            }
            if ctx.leader.is_leader() {
                ensure(&ctx, &mut running, src.clone()).await;
            }
        }
        known = wanted;
        if first {
            first = false;
            readiness.open("locksources");
            if known.is_empty() {
                readiness.open("stores");
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            changed = lead.changed(), if lead_open => {
                if changed.is_err() {
                    lead_open = false;
                } else if *lead.borrow_and_update() {
                    info!(sources = known.len(), "leading: starting the mirror");
                } else {
                    info!("no longer leading: stopping the mirror");
                    refused.clear();
                    for k in running.keys().cloned().collect::<Vec<_>>() {
                        stop(&mut running, &k).await;
                    }
                }
            }
            () = shutdown.cancelled() => break,
        }
    }
    for k in running.keys().cloned().collect::<Vec<_>>() {
        stop(&mut running, &k).await;
    }
}

fn forget(
    ctx: &Context,
    known: &mut HashMap<SourceKey, LockSource>,
    probed: &mut HashMap<SourceKey, (String, CancellationToken)>,
    k: &SourceKey,
) {
    known.remove(k);
    if let Some((_, cancel)) = probed.remove(k) {
        cancel.cancel();
    }
    let labels = SourceLabels { namespace: k.0.clone(), source: k.1.clone() };
    ctx.metrics.locks.held.remove(&labels);
    ctx.metrics.locks.oldest_age.remove(&labels);
}

/// [`reachable`] until it succeeds, to learn that the source's stores can be reached with its
/// credentials; opens the `stores` readiness gate on the first success of
/// any source. Retried every 2 s; stops once the gate is open or the source changed or went.
async fn probe(
    ctx: Arc<Context>,
    source: LockSource,
    readiness: Readiness,
    dynamo_ok: Arc<std::sync::atomic::AtomicBool>,
    cancel: CancellationToken,
) {
    while !dynamo_ok.load(Ordering::SeqCst) {
        let result = match ctx.cluster.aws.get(&ctx.client, &ctx.tenancy, &source).await {
            Ok(sdk) => reachable(&sdk, &source).await,
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                if !dynamo_ok.swap(true, Ordering::SeqCst) {
                    readiness.open("stores");
                }
                return;
            }
            Err(e) => {
                warn!(source = %source.name_any(), error = %e, "could not read the LockSource's table; retrying");
                if !dynamo_ok.load(Ordering::SeqCst) {
                    readiness.close("stores", format!("no LockSource's lock store has been read yet; last error: {e}"));
                    // Another LockSource's store may have been read in between (and the gate
                    // opened before this closed it): it is never closed again after that.
                    if dynamo_ok.load(Ordering::SeqCst) {
                        readiness.open("stores");
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {},
            () = cancel.cancelled() => return,
        }
    }
}

/// One call to each store of the source that costs nothing (DescribeTable) or next to nothing (a
/// one-key listing).
async fn reachable(sdk: &SourceSdk, source: &LockSource) -> Result<(), String> {
    if let Some(d) = &source.spec.dynamodb {
        dynamo::stream_arn(&sdk.table, &d.table_name).await.map_err(|e| e.to_string())?;
    }
    if let (Some(files), Some(client)) = (&source.spec.s3, &sdk.s3) {
        client
            .list_objects_v2()
            .bucket(&files.bucket)
            .prefix(&files.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| format!("failed to list S3 bucket {}: {}", files.bucket, aws_sdk_s3::error::DisplayErrorContext(&e)))?;
    }
    Ok(())
}

fn key(src: &LockSource) -> SourceKey {
    (src.namespace().unwrap_or_default(), src.name_any())
}

fn fingerprint(src: &LockSource) -> String {
    format!("{}/{}", src.uid().unwrap_or_default(), serde_json::to_string(&src.spec).unwrap_or_default())
}

/// For each LockSource that reads a table another LockSource of its namespace read first (same
/// table name, region and endpoint), the first one's name. The one mirroring now stays first;
/// otherwise the older object (creation timestamps have second precision), then the name.
fn first_readers(wanted: &HashMap<SourceKey, LockSource>, running: &HashMap<SourceKey, Running>) -> HashMap<SourceKey, String> {
    let mut by_table: BTreeMap<StoreKey, Vec<&LockSource>> = BTreeMap::new();
    for s in wanted.values() {
        for k in store_keys(s) {
            by_table.entry(k).or_default().push(s);
        }
    }
    let mut out = HashMap::new();
    for (table, mut group) in by_table.into_iter().filter(|(_, g)| g.len() > 1) {
        // Mirroring this very table now (not one edited to point at it); after a restart or a
        // failover, the refusals written in status say who was first.
        let incumbent = |s: &LockSource| running.get(&key(s)).is_some_and(|r| r.stores.contains(&table));
        let refused = |s: &LockSource| {
            s.status
                .as_ref()
                .is_some_and(|st| st.conditions.iter().any(|c| c.type_ == reasons::CONDITION_READY && c.reason == "DuplicateTable"))
        };
        group.sort_by_key(|s| (!incumbent(s), refused(s), s.metadata.creation_timestamp.as_ref().map(|t| t.0), s.name_any()));
        let first = group[0].name_any();
        for s in &group[1..] {
            out.entry(key(s)).or_insert_with(|| first.clone());
        }
    }
    out
}

async fn refuse_duplicate(ctx: &Context, source: &LockSource, first: &str) {
    let message = format!(
        "LockSource {first} in this namespace already mirrors {}; a lock store is mirrored once per namespace, so that each lock is one StateLock. Delete this LockSource, or put it in another namespace",
        stores_text(source)
    );
    warn!(source = %source.name_any(), %first, "refusing a second LockSource on one table");
    let status = ready_status(source, None, false, "DuplicateTable", message, None);
    let api: Api<LockSource> = Api::namespaced(ctx.client.clone(), &source.namespace().unwrap_or_default());
    let body =
        json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource", "metadata": {"name": source.name_any()}, "status": status});
    if let Err(e) = api.patch_status(&source.name_any(), &PatchParams::apply(reasons::MIRROR_MANAGER).force(), &Patch::Apply(&body)).await {
        warn!(error = %e, "failed to write LockSource status");
    }
}

/// Start (or restart, after its spec changed) a source's task; the old task has stopped before
/// the new one starts.
async fn ensure(ctx: &Arc<Context>, running: &mut HashMap<SourceKey, Running>, src: LockSource) {
    let k = key(&src);
    let fingerprint = fingerprint(&src);
    if running.get(&k).is_some_and(|r| r.fingerprint == fingerprint) {
        return;
    }
    stop(running, &k).await;
    let stores = store_keys(&src);
    let cancel = CancellationToken::new();
    let span = info_span!("locksource", namespace = %k.0, name = %k.1, stores = %stores_text(&src));
    let task = tokio::spawn(sync_source(ctx.clone(), src, cancel.clone()).instrument(span));
    running.insert(k, Running { fingerprint, stores, cancel, task });
}

async fn stop(running: &mut HashMap<SourceKey, Running>, k: &SourceKey) {
    if let Some(r) = running.remove(k) {
        r.cancel.cancel();
        let _ = r.task.await;
    }
}

/// What one source's task remembers between passes.
#[derive(Default)]
struct SourceState {
    clients: Option<Arc<SourceSdk>>,
    last_status: Option<(LockSourceStatus, Timestamp)>,
    /// The stream being followed (Streams mode).
    stream: Option<StreamReader>,
    /// Why the stream was closed, when it was closed by trouble (reported, and the next opening
    /// waits for [`REOPEN_SPACING`] after the last full Scan).
    stream_closed: Option<String>,
    /// Auto mode: the stream was refused (permissions); Scan until then.
    stream_refused_until: Option<(Instant, String)>,
    /// The table in memory comes from a full Scan that succeeded after the stream followed now
    /// (if any) was opened. Until then nothing is written.
    scanned: bool,
    /// A full Scan was applied and the stream has not been read until quiet since: nothing may
    /// be written yet (the table may hold an intermediate state of some item).
    catching_up: bool,
    /// LockIDs the gateway wrote whose records are polled for (kept across passes).
    awaited: Awaited,
    /// When the last poll while following the stream started, and when it was done (its
    /// records written). None after a catch-up.
    last_poll: Option<(Instant, Instant)>,
    /// The table as last read, by LockID (lock items only).
    table: BTreeMap<String, LockRecord>,
    /// The lock files as last listed, by object key (`spec.s3`).
    files: BTreeMap<String, LockFile>,
    /// A listing of the lock files has succeeded since this task started: until then, nothing is
    /// written (an empty `files` would read as "every lock file was released").
    files_listed: bool,
    /// When the last full listing of the lock files succeeded.
    last_listing: Option<Instant>,
    /// Event mode: why the queue cannot be read now (listing every pass meanwhile).
    queue_trouble: Option<String>,
    /// Event mode: what the bucket's notification configuration lacks (listing every pass).
    events_unconfigured: Option<String>,
    /// Event mode: why the bucket's notification configuration could not be read (said in the
    /// Ready condition; event mode stays on).
    events_unverified: Option<String>,
    /// The bucket's endpoint was found to ignore `If-Match` on DeleteObject (said in the Ready
    /// condition: no lock file is released there).
    if_match_refused: bool,
    /// The If-Match probe was tried with the current clients (tried once; a probe that failed
    /// is made again by the first release).
    if_match_probed: bool,
    /// Items a KEYS_ONLY stream named that could not be read yet.
    unread: std::collections::BTreeSet<String>,
    /// When the table's current stream ARN was last compared with the one followed.
    last_arn_check: Option<Instant>,
    /// When the last full Scan ended (wall clock, to compare with stream records' times).
    scan_ended: Option<std::time::SystemTime>,
    last_full_scan: Option<Instant>,
    mode: Option<SyncMode>,
    items: usize,
    pages: u32,
    /// What this task wrote that the StateLock cache may not show yet, by StateLock name.
    written: HashMap<String, Written>,
}

/// A lock file as last read: the ETag of the body read, and its record. A listing that shows
/// another ETag makes it read again; the same ETag is never read twice.
struct LockFile {
    etag: String,
    record: LockRecord,
}

impl SourceState {
    /// Every lock, its parts put together (one record per LockID).
    fn records(&self) -> Vec<LockRecord> {
        crate::lock_store::merge_parts(
            self.files.values().map(|f| (StoreKind::S3, &f.record)).chain(self.table.values().map(|r| (StoreKind::DynamoDB, r))),
        )
    }
}

/// A write of the mirror's own, kept until the shared StateLock cache has caught up with it, so
/// that a lagging cache never makes it create (and announce) a lock twice or delete one twice.
enum Written {
    /// `awaited`: the write in the cache, awaited since `at`.
    Applied {
        lock: Box<StateLock>,
        awaited: crate::cluster::AwaitedWrite,
        at: Instant,
    },
    Deleted {
        uid: String,
    },
}

/// How soon a failed write is tried again while following a stream, at the least.
const RETRY_SOON: Duration = Duration::from_millis(100);
/// The least time between a poll and one a gateway nudge asks for.
const NUDGE_SPACING: Duration = Duration::from_millis(200);
/// A LockID the gateway wrote whose stream record the poll it asked for did not read (a record
/// can trail its write) is polled for again after 0.2, 0.6, 1.4 and 3 s (each gap twice the one
/// before, up to this one), then left to the regular polls (see [`Awaited`]).
const LAST_FOLLOW_UP_GAP: Duration = Duration::from_millis(1600);
/// At most this many nudged LockIDs are awaited at once; more are left to the regular polls.
const AWAITED_AT_MOST: usize = 256;
/// How often the table's current stream ARN is compared with the one followed (DescribeTable,
/// free of read capacity).
const ARN_CHECK: Duration = Duration::from_secs(30);
/// The least time between a full Scan and one caused by reopening a stream (a replaced stream,
/// a lost position): stream trouble never turns into a Scan storm.
const REOPEN_SPACING: Duration = Duration::from_secs(15);
/// Auto mode retries a refused stream this long after the refusal.
const REFUSED_RETRY: Duration = Duration::from_secs(3600);
/// After opening a stream and scanning, the stream is read past the Scan before anything is
/// written: at most this many polls, this far apart.
const CATCH_UP_POLLS: usize = 40;
const CATCH_UP_PACE: Duration = Duration::from_millis(200);

/// Exponential backoff for repeated stream errors: 0.5 s doubling to `max`.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self { next: Duration::from_millis(500), max }
    }

    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// When the stream is polled next, given when the last poll started and when it was `done` (its
/// records written): after the backoff in trouble (nudges wait); else at the regular pace
/// (`idle_poll` after the last poll was done), or sooner for an awaited LockID, but never within
/// NUDGE_SPACING of the last poll's start (DynamoDB allows about five reads a second per shard).
fn next_poll(last: (Instant, Instant), idle_poll: Duration, trouble: Option<Duration>, awaited: Option<Instant>) -> Instant {
    let (started, done) = last;
    match (trouble, awaited) {
        (Some(wait), _) => done + wait,
        (None, Some(at)) => at.max(started + NUDGE_SPACING).min(done + idle_poll),
        (None, None) => done + idle_poll,
    }
}

/// LockIDs the gateway wrote (its nudges) whose stream records have not been read yet, and how
/// soon after a write its record is looked for.
///
/// A record trails its write by a delay nobody can know in advance. The first poll for a nudged
/// LockID is due `first_delay` after the gateway sent the write. Each record that first poll
/// reads shortens `first_delay` by FIRST_DELAY_DOWN; each it misses lengthens it by nine times as
/// much (FIRST_DELAY_UP), so it settles where about nine first polls in ten find their record:
/// near the 90th percentile of the delay, followed as it changes, and at zero where records come
/// at once. A record missed is polled for again after 0.2, 0.6, 1.4 and 3 s, then left to the
/// regular polls.
#[derive(Default)]
struct Awaited {
    keys: HashMap<String, AwaitedKey>,
    /// LockIDs read by the polls of the last READ_REMEMBERED, with when that poll started and
    /// ended: a nudge taken after a poll that started after its write and read its record asks
    /// for no poll.
    read: HashMap<String, (Instant, Instant)>,
    first_delay: Duration,
}

struct AwaitedKey {
    /// When the gateway sent the write: only a poll started since can have read its record.
    sent: Instant,
    /// When the next poll for it is due, and the gap after that one.
    at: Instant,
    gap: Duration,
    /// No poll was due for it yet.
    first: bool,
}

const FIRST_DELAY_DOWN: Duration = Duration::from_millis(5);
const FIRST_DELAY_UP: Duration = Duration::from_millis(45);
const FIRST_DELAY_AT_MOST: Duration = Duration::from_secs(1);
const READ_REMEMBERED: Duration = Duration::from_secs(5);

impl Awaited {
    /// After a Scan and catch-up: what they read may have been an awaited LockID's record, so
    /// the next poll not reading it teaches nothing.
    fn caught_up(&mut self) {
        for k in self.keys.values_mut() {
            k.first = false;
        }
    }

    /// Await what the gateway wrote; a LockID nudged again is awaited from its latest write.
    fn add(&mut self, nudges: Vec<crate::cluster::Nudge>) {
        for n in nudges {
            let read = self.read.get(&n.lock_id);
            if read.is_some_and(|(started, _)| *started >= n.sent) || self.keys.get(&n.lock_id).is_some_and(|k| k.sent >= n.sent) {
                continue;
            }
            // Read by a poll under way while the write was sent: maybe this write's record, maybe
            // an earlier one's. Polled for all the same, but the next poll not reading it teaches
            // nothing about how late records come.
            let first = read.is_none_or(|(_, ended)| *ended < n.sent);
            if self.keys.len() < AWAITED_AT_MOST || self.keys.contains_key(&n.lock_id) {
                let at = n.sent + self.first_delay;
                self.keys.insert(n.lock_id, AwaitedKey { sent: n.sent, at, gap: NUDGE_SPACING, first });
            }
        }
    }

    /// When a poll is due for an awaited LockID.
    fn next_at(&self) -> Option<Instant> {
        self.keys.values().map(|k| k.at).min()
    }

    /// A poll that started at `started` and ended at `now` read the records of `read`. Each
    /// LockID it was due for and did not read moves on to its next follow-up (or is given up),
    /// whatever happened; only a poll that did not fail (`learn`) teaches `first_delay`.
    fn polled(&mut self, read: &[String], started: Instant, now: Instant, learn: bool) {
        let read: HashSet<&String> = read.iter().collect();
        for id in &read {
            self.read.insert((*id).clone(), (started, now));
        }
        self.read.retain(|_, (t, _)| now.saturating_duration_since(*t) < READ_REMEMBERED);
        let mut delay = self.first_delay;
        self.keys.retain(|id, k| {
            if started < k.sent {
                // Started before the write was sent: whatever it read is an earlier write.
                return true;
            }
            if read.contains(id) {
                if k.first && learn {
                    delay = delay.saturating_sub(FIRST_DELAY_DOWN);
                }
                return false;
            }
            if k.at > started {
                return true;
            }
            if std::mem::take(&mut k.first) && learn {
                delay = (delay + FIRST_DELAY_UP).min(FIRST_DELAY_AT_MOST);
            }
            if k.gap > LAST_FOLLOW_UP_GAP {
                tracing::debug!(lock_id = %id, "no stream record read for a LockID the gateway wrote; left to the regular polls");
                return false;
            }
            k.at = now + k.gap;
            k.gap *= 2;
            true
        });
        self.first_delay = delay;
    }
}

async fn sync_source(ctx: Arc<Context>, source: LockSource, cancel: CancellationToken) {
    let interval = source.spec.sync.interval.get().max(Duration::from_secs(1));
    let idle_poll = source.spec.sync.stream_poll_interval.get().max(crate::crd::MIN_STREAM_POLL_INTERVAL);
    let mut nudges = ctx.cluster.nudges.subscribe(&source.namespace().unwrap_or_default(), &source.name_any());
    let mut state = SourceState::default();
    let mut queue = events::start(&ctx, &source, &cancel);
    info!(interval = ?interval, poll = ?idle_poll, mode = ?source.spec.sync.mode, events = queue.is_some(), "syncing LockSource");
    loop {
        // Reopening a stream after trouble waits for the spacing since the last full Scan.
        if state.stream_closed.is_some()
            && let Some(wait) = state.last_full_scan.map(|t| REOPEN_SPACING.saturating_sub(t.elapsed())).filter(|w| !w.is_zero())
        {
            tokio::select! {
                () = tokio::time::sleep(wait) => {},
                () = cancel.cancelled() => return,
            }
        }
        let started = Instant::now();
        let result = tokio::select! {
            r = sync_once(&ctx, &source, &mut state) => r,
            () = cancel.cancelled() => return,
        };
        observe_pass(&ctx, &source, &state, started, &result);
        if let Err(SyncError::Stream(e)) = &result {
            count_stream_error(&ctx, &source, e);
            close_stream_if_needed(&source, &mut state, e);
        }
        report(&ctx, &source, &mut state, &result).await;
        if state.stream.is_some() && state.scanned && !state.catching_up {
            // A failed write is retried while following; the stream is never left unread.
            if follow(&ctx, &source, &mut state, Pace { interval, idle_poll }, (&mut nudges, &mut queue), &cancel, result.is_err())
                .await
                .is_break()
            {
                return;
            }
        } else {
            // A transient failure is tried again soon; anything else at the next pass.
            let wait = match &result {
                Err(e) if e.category().is_transient() => interval.min(e.category().retry_after()),
                _ => interval,
            };
            // Lock-file events are taken in as they come while waiting.
            let until = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    news = events::next(&mut queue) => take_events(&ctx, &source, &mut state, news).await,
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// Take in a batch of lock-file events; a failure is reported like a pass's.
async fn take_events(ctx: &Context, source: &LockSource, state: &mut SourceState, news: events::QueueNews) {
    let trouble_before = state.queue_trouble.is_some();
    if let Err(e) = events::handle(ctx, source, state, news).await {
        let result = Err(e);
        observe_pass(ctx, source, state, Instant::now(), &result);
        report(ctx, source, state, &result).await;
    } else if trouble_before != state.queue_trouble.is_some() && state.files_listed {
        // The fallback started or ended: say so now rather than at the next pass.
        let locks = i32::try_from(state.records().len()).unwrap_or(i32::MAX);
        report(ctx, source, state, &Ok(PassSummary { items: state.items, locks, pages: state.pages })).await;
    }
}

fn observe_pass(ctx: &Context, source: &LockSource, state: &SourceState, started: Instant, result: &Result<PassSummary, SyncError>) {
    let controller = ControllerLabels { controller: ControllerName::mirror };
    ctx.metrics.controllers.reconcile_duration.get_or_create(&controller).observe(started.elapsed().as_secs_f64());
    match result {
        Ok(pass) => {
            let labels = source_labels(source);
            ctx.metrics.locks.held.get_or_create(&labels).set(i64::from(pass.locks));
            let now = Timestamp::now().as_nanosecond();
            let oldest = state
                .table
                .values()
                .chain(state.files.values().map(|f| &f.record))
                .filter_map(|r| r.info.created.as_deref().and_then(crate::lock_record::parse_created))
                .min();
            ctx.metrics.locks.oldest_age.get_or_create(&labels).set(oldest.map_or(0, |c| ((now - c).max(0) / 1_000_000_000) as i64));
        }
        Err(e) => {
            let category = e.category().as_str().to_owned();
            ctx.metrics.controllers.reconcile_errors.get_or_create(&ErrorLabels { controller: ControllerName::mirror, category }).inc();
        }
    }
}

/// The Ready condition for a pass's outcome.
async fn report(ctx: &Context, source: &LockSource, state: &mut SourceState, result: &Result<PassSummary, SyncError>) {
    let status = match result {
        Ok(pass) => {
            let mut what = format!("read {} items ({} locks) in {} pages", pass.items, pass.locks, pass.pages);
            if let Some(why) = &state.events_unverified {
                what.push_str(&format!(
                    "; following the lock files' events, but the bucket's notification configuration could not be checked ({why}): grant s3:GetBucketNotification so that a bucket that does not send them is found out"
                ));
            }
            if state.if_match_refused {
                what.push_str("; the bucket's endpoint ignores If-Match on DeleteObject, so statelock releases no lock file there (expiry and manual unlock of lock files are refused)");
            }
            match &state.stream_refused_until {
                Some((_, why)) if state.mode == Some(SyncMode::Scan) => ready_status(
                    source,
                    state.mode,
                    true,
                    "ScanFallback",
                    format!("{what}; scanning every {} because the table's stream cannot be read: {why}", source.spec.sync.interval),
                    Some(pass.locks),
                ),
                _ => match state.queue_trouble.as_ref().or(state.events_unconfigured.as_ref()) {
                    Some(why) if source.spec.s3.as_ref().is_some_and(|s| s.events.is_some()) => ready_status(
                        source,
                        state.mode,
                        true,
                        "ListingFallback",
                        format!(
                            "{what}; listing the lock files every {} because their events cannot be relied on: {why}",
                            source.spec.sync.interval
                        ),
                        Some(pass.locks),
                    ),
                    _ => ready_status(source, state.mode, true, "Synced", what, Some(pass.locks)),
                },
            }
        }
        Err(e) => {
            warn!(error = %e, reason = e.reason(), "sync pass failed; StateLocks left as they were");
            ready_status(source, state.mode, false, e.reason(), e.to_string(), None)
        }
    };
    let ok = result.is_ok();
    if let Err(e) = write_source_status(ctx, source, status, ok, state).await {
        warn!(error = %e, "failed to write LockSource status");
    }
}

/// How often passes run (`interval`) and the stream is polled (`idle_poll`).
#[derive(Clone, Copy)]
struct Pace {
    interval: Duration,
    idle_poll: Duration,
}

/// Follow the stream until the next pass is due (`interval`), the stream must be reopened, or
/// the task is cancelled (`Break`). Stream errors are retried with backoff and the position kept;
/// they are reported on the LockSource, and they never cause a Scan by themselves.
async fn follow(
    ctx: &Context,
    source: &LockSource,
    state: &mut SourceState,
    pace: Pace,
    (nudges, queue): (&mut NudgeReceiver, &mut Option<tokio::sync::mpsc::Receiver<events::QueueNews>>),
    cancel: &CancellationToken,
    mut dirty: bool,
) -> std::ops::ControlFlow<()> {
    use std::ops::ControlFlow::{Break, Continue};
    let Pace { interval, idle_poll } = pace;
    // At least one poll per call, also when polls are further apart than passes.
    let until = Instant::now() + interval.max(idle_poll);
    let (mut last_poll, mut last_done) = state.last_poll.unwrap_or_else(|| (Instant::now(), Instant::now()));
    let mut backoff = Backoff::new(Duration::from_secs(30));
    // A stream error: polls wait for the backoff, and nudges are ignored.
    let mut trouble: Option<Duration> = None;
    // `dirty`: records applied to the table but not written yet; a failed write is tried again
    // at `retry_at`, while polling goes on at its own pace.
    let mut retry_at = Instant::now();
    let mut write_failed = false;
    // LockIDs nudged while the pass ran are awaited like any others.
    state.awaited.add(nudges.take());
    while Instant::now() < until {
        let due = next_poll((last_poll, last_done), idle_poll, trouble, state.awaited.next_at());
        // Entered also when the poll is overdue (the sleep then ends at once), so that the task
        // is cancelled, and takes events and nudges, however long polls and writes take.
        {
            tokio::select! {
                () = tokio::time::sleep_until(due.min(until).into()) => {},
                r = nudges.changed(), if trouble.is_none() => {
                    if r.is_err() {
                        return Break(());
                    }
                    state.awaited.add(nudges.take());
                    continue;
                }
                // Events never hold the stream back (it is polled when its time has come), nor
                // hurry it while it backs off from trouble.
                news = events::next(queue) => {
                    take_events(ctx, source, state, news).await;
                    continue;
                }
                () = cancel.cancelled() => return Break(()),
            }
        }
        let now = Instant::now();
        if now >= until && !dirty && (now < due || trouble.is_some()) {
            break;
        }
        if state.last_arn_check.is_none_or(|t| t.elapsed() >= ARN_CHECK) {
            state.last_arn_check = Some(Instant::now());
            if let Some(clients) = state.clients.clone() {
                let table = source.spec.dynamodb.as_ref().map(|d| d.table_name.as_str()).unwrap_or_default();
                match dynamo::stream_arn(&clients.table, table).await {
                    Ok(arn) if arn.as_deref() != state.stream.as_ref().map(StreamReader::arn) => {
                        let now = arn.as_deref().unwrap_or("none");
                        info!(stream = now, "the table's stream was replaced; reopening it");
                        state.stream_closed = Some(format!("the table's latest stream is now {now}"));
                        state.stream = None;
                        state.scanned = false;
                        state.catching_up = false;
                        return Continue(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // The stream is still read; say that the table itself could not be.
                        warn!(error = %e, "could not check the table's stream ARN");
                        report(ctx, source, state, &Err(SyncError::Dynamo(e))).await;
                    }
                }
            }
        }
        if trouble.is_none() {
            state.awaited.add(nudges.take());
        }
        last_poll = Instant::now();
        let Followed { changed, read, error } = follow_stream(ctx, source, state).await;
        take_stream_calls(ctx, source, state);
        // A failed poll says nothing about how late records come.
        state.awaited.polled(&read, last_poll, Instant::now(), error.is_none());
        dirty |= changed;
        let mut failed: Option<SyncError> = None;
        let mut report_ok = false;
        match error {
            Some(SyncError::Stream(e)) => {
                count_stream_error(ctx, source, &e);
                if close_stream_if_needed(source, state, &e) {
                    return Continue(());
                }
                // Throttled or unavailable: retried with the position kept. Denied in Streams
                // mode (Auto scans instead): retried less often.
                let wait = match e.failure {
                    StreamFailure::Throttled | StreamFailure::Unavailable => backoff.step(),
                    _ => backoff.step().max(Duration::from_secs(5)),
                };
                warn!(error = %e, retry_in = ?wait, "stream read failed; retrying with the position kept");
                trouble = Some(wait);
                failed = Some(SyncError::Stream(e));
            }
            // A read a KEYS_ONLY record asked for: the item is read again at the next poll.
            Some(e) => failed = Some(e),
            None => {
                if trouble.take().is_some() {
                    backoff = Backoff::new(Duration::from_secs(30));
                    report_ok = true;
                }
            }
        }
        // What was read is written (every item is at a state it really had), also when some
        // call failed; a failed write is tried again at `retry_at`.
        if dirty && (changed || Instant::now() >= retry_at) {
            match reconcile(ctx, source, state).await {
                Ok(locks) => {
                    dirty = false;
                    ctx.metrics.locks.held.get_or_create(&source_labels(source)).set(i64::from(locks));
                    report_ok |= std::mem::take(&mut write_failed);
                }
                Err(e) => {
                    write_failed = true;
                    retry_at = Instant::now() + e.category().retry_after().max(RETRY_SOON).min(interval);
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => {
                let result = Err(e);
                observe_pass(ctx, source, state, Instant::now(), &result);
                report(ctx, source, state, &result).await;
            }
            None if report_ok && !dirty => {
                let locks = i32::try_from(state.table.len()).unwrap_or(i32::MAX);
                report(ctx, source, state, &Ok(PassSummary { items: state.items, locks, pages: state.pages })).await;
            }
            None => {}
        }
        last_done = Instant::now();
        state.last_poll = Some((last_poll, last_done));
    }
    Continue(())
}

fn count_stream_error(ctx: &Context, source: &LockSource, e: &StreamError) {
    let labels =
        StreamCallLabels { namespace: source.namespace().unwrap_or_default(), source: source.name_any(), call: e.call.as_str().into() };
    ctx.metrics.locks.stream_errors.get_or_create(&labels).inc();
}

/// Close the stream when this failure means it cannot be followed from where it is: it is gone
/// or replaced, or the position was lost (reopened, with a Scan), or in Auto mode it may not be
/// read (scanned instead, and tried again later). True when closed.
fn close_stream_if_needed(source: &LockSource, state: &mut SourceState, e: &StreamError) -> bool {
    match e.failure {
        StreamFailure::Gone | StreamFailure::PositionLost | StreamFailure::IteratorExpired => {
            warn!(error = %e, "the stream must be reopened; the table is scanned again");
            state.stream_closed = Some(e.to_string());
        }
        StreamFailure::Denied if source.spec.sync.mode == SyncMode::Auto => {
            warn!(error = %e, "the stream cannot be read; Auto mode scans instead");
            state.stream_refused_until = Some((Instant::now() + REFUSED_RETRY, e.to_string()));
        }
        _ => return false,
    }
    state.stream = None;
    state.scanned = false;
    state.catching_up = false;
    true
}

fn take_stream_calls(ctx: &Context, source: &LockSource, state: &mut SourceState) {
    let Some(reader) = state.stream.as_mut() else { return };
    let calls = reader.take_calls();
    for call in StreamCall::ALL {
        let n = calls.get(call);
        if n > 0 {
            ctx.stream_requests.fetch_add(n, Ordering::Relaxed);
            ctx.metrics
                .locks
                .stream_requests
                .get_or_create(&StreamCallLabels {
                    namespace: source.namespace().unwrap_or_default(),
                    source: source.name_any(),
                    call: call.as_str().into(),
                })
                .inc_by(n);
        }
    }
}

struct PassSummary {
    items: usize,
    locks: i32,
    pages: u32,
}

async fn sync_once(ctx: &Context, source: &LockSource, state: &mut SourceState) -> Result<PassSummary, SyncError> {
    // The shared clients; new ones (another spec or rotated credentials) reopen the stream.
    let clients = ctx.cluster.aws.get(&ctx.client, &ctx.tenancy, source).await?;
    if state.clients.as_ref().is_none_or(|c| !Arc::ptr_eq(c, &clients)) {
        if state.stream.is_some() {
            info!("the LockSource's AWS clients changed (spec or credentials); reopening the stream");
        }
        state.clients = Some(clients.clone());
        state.if_match_probed = false;
        state.stream = None;
        state.scanned = false;
    }
    // Lock files: listed every pass (there is no stream of them yet), read when their ETag is new.
    // A failed listing keeps the last one; with a table too, the table's pass goes on and the
    // failure is reported at its end.
    // In event mode the listing is the safety net, run every `resyncInterval` (and every pass
    // while events cannot be relied on).
    let mut files_error = None;
    if let Some(files) = &source.spec.s3
        && events::listing_due(source, state)
    {
        match refresh_files(ctx, source, state, files, &clients).await {
            Ok(()) => {
                state.last_listing = Some(Instant::now());
                if files.events.is_some() {
                    events::check_configuration(ctx, source, state).await;
                }
                probe_if_match(ctx, source, state, files, &clients).await;
            }
            // Without a first listing there is no picture of the lock files to write from.
            Err(e) if source.spec.dynamodb.is_none() || !state.files_listed => return Err(e),
            Err(e) => files_error = Some(e),
        }
    }
    let Some(dynamodb) = &source.spec.dynamodb else {
        // Lock files only: what the listing said is the truth of this pass.
        state.mode = None;
        state.scanned = true;
        let locks = reconcile(ctx, source, state).await?;
        return Ok(PassSummary { items: state.items, locks, pages: state.pages });
    };
    let table = &dynamodb.table_name;
    if state.stream_refused_until.as_ref().is_some_and(|(t, _)| Instant::now() >= *t) {
        state.stream_refused_until = None;
    }

    // Pick the mode; open the stream before scanning so that no change falls in between.
    // `scanned` says the table in memory comes from a Scan that succeeded after the stream
    // followed now was opened: until then nothing is written, whatever fails in between.
    let mut cause = if !state.scanned {
        Some("StreamOpened")
    } else {
        state.last_full_scan.is_none_or(|t| t.elapsed() >= STREAMS_FULL_RESYNC).then_some("SafetyNet")
    };
    match source.spec.sync.mode {
        SyncMode::Scan => {
            state.mode = Some(SyncMode::Scan);
            cause = Some("ScanMode");
        }
        SyncMode::Auto if state.stream_refused_until.is_some() => {
            state.mode = Some(SyncMode::Scan);
            cause = Some("ScanMode");
        }
        wanted if state.stream.is_none() => match dynamo::stream_arn(&clients.table, table).await? {
            Some(arn) => {
                let opened = match StreamReader::open(clients.streams.clone(), arn).await {
                    Err(e) if e.failure == StreamFailure::Denied && wanted == SyncMode::Auto => {
                        count_stream_error(ctx, source, &e);
                        close_stream_if_needed(source, state, &e);
                        None
                    }
                    other => Some(other?),
                };
                state.mode = Some(if opened.is_some() { SyncMode::Streams } else { SyncMode::Scan });
                state.stream = opened;
                state.scanned = false;
                state.last_arn_check = Some(Instant::now());
                take_stream_calls(ctx, source, state);
                cause = Some(if state.stream.is_some() { "StreamOpened" } else { "ScanMode" });
                state.stream_closed = None;
            }
            None if wanted == SyncMode::Streams => return Err(SyncError::StreamNotEnabled { table: table.clone() }),
            None => {
                state.mode = Some(SyncMode::Scan);
                cause = Some("ScanMode");
            }
        },
        _ => {}
    }
    if let Some(cause) = cause {
        // Strongly consistent: a lagging replica must not answer with a state older than one
        // the stream already delivered.
        info!(cause, "reading the whole table (strongly consistent Scan)");
        let scan = dynamo::scan_table(&clients.table, table, true).await?;
        ctx.add_read_units(source, scan.read_units);
        ctx.metrics
            .locks
            .full_scans
            .get_or_create(&ScanLabels {
                namespace: source.namespace().unwrap_or_default(),
                source: source.name_any(),
                cause: cause.into(),
            })
            .inc();
        state.table.clear();
        state.unread.clear();
        for item in &scan.items {
            apply_item(&mut state.table, item);
        }
        state.items = scan.items.len();
        state.pages = scan.pages;
        state.last_full_scan = Some(Instant::now());
        // The Scan read every item at some moment before now: every record older than what it
        // returned was written before now, so replaying the stream past this moment ends every
        // item at its latest state (the barrier the catch-up reads past).
        state.scan_ended = Some(std::time::SystemTime::now());
        state.scanned = true;
        state.catching_up = state.stream.is_some();
    }
    // The stream position was taken before the Scan: replay what it holds on top of the Scan
    // until it is quiet, and only then write, so that no intermediate (older) state of an item is
    // ever shown. Quiet: every shard answered an empty page, at least CATCH_UP_SETTLE after the
    // Scan ended (records reach the stream shortly after their write). A failed read leaves
    // `catching_up` set: the next pass goes on from there. See the README ("Why the mirror is
    // right").
    if state.catching_up {
        if let Some(reader) = state.stream.as_mut() {
            reader.set_barrier(state.scan_ended.unwrap_or_else(std::time::SystemTime::now));
        }
        let mut past = false;
        for _ in 0..CATCH_UP_POLLS {
            let polled = catch_up(ctx, source, state).await;
            take_stream_calls(ctx, source, state);
            polled?;
            if state.stream.as_ref().is_none_or(StreamReader::past) {
                past = true;
                break;
            }
            // Paced: GetRecords allows about five calls a second per shard.
            tokio::time::sleep(CATCH_UP_PACE).await;
        }
        if !past {
            warn!(polls = CATCH_UP_POLLS, "the stream was not read past the Scan in time; writing what it says so far");
        }
        state.catching_up = false;
        // Following starts at the regular pace from here.
        state.last_poll = None;
        state.awaited.caught_up();
    }
    let locks = reconcile(ctx, source, state).await?;
    if let Some(e) = files_error {
        return Err(e);
    }
    Ok(PassSummary { items: state.items, locks, pages: state.pages })
}

/// List the lock files under the prefix and read those whose ETag is new; `state.files` changes
/// only when the listing succeeded (a failed listing leaves the last complete picture).
async fn refresh_files(
    ctx: &Context,
    source: &LockSource,
    state: &mut SourceState,
    files: &crate::crd::S3LockFiles,
    clients: &SourceSdk,
) -> Result<(), SyncError> {
    let Some(client) = &clients.s3 else { return Ok(()) };
    let count = |request: &str, n: u64| count_s3(ctx, source, request, n);
    let listing = s3::list_lock_files(client, &files.bucket, &files.prefix).await;
    let listing = match listing {
        Ok(l) => l,
        Err(e) => {
            count("LIST", 1);
            return Err(e.into());
        }
    };
    count("LIST", listing.list_requests);
    let mut next = BTreeMap::new();
    let mut gets = 0;
    for f in listing.files {
        if let Some(known) = state.files.get(&f.key).filter(|k| k.etag == f.etag) {
            next.insert(f.key, LockFile { etag: known.etag.clone(), record: known.record.clone() });
            continue;
        }
        if f.size > s3::MAX_LOCK_FILE_BYTES {
            let Some(lock_id) = s3::lock_id_of(&files.bucket, &f.key) else { continue };
            let mut record = LockRecord::without_info(lock_id);
            record.problems =
                vec![format!("the lock file is {} bytes, more than the {} a lock file can be; not read", f.size, s3::MAX_LOCK_FILE_BYTES)];
            next.insert(f.key, LockFile { etag: f.etag, record });
            continue;
        }
        gets += 1;
        match s3::read_lock_file(client, &files.bucket, &f.key).await {
            Ok(Some(read)) => {
                next.insert(f.key, LockFile { etag: read.etag, record: read.record });
            }
            // Released between the listing and the read.
            Ok(None) => {}
            // One unreadable file (a KMS key the operator may not use, an archived object, a
            // throttled read) holds back neither the others nor the pass: the last version read
            // stays (and is read again next pass); a file never read is shown as unreadable.
            Err(e) => {
                warn!(key = %f.key, error = %e, "could not read a lock file");
                let entry = match state.files.get(&f.key) {
                    Some(known) => LockFile { etag: known.etag.clone(), record: known.record.clone() },
                    None => {
                        let Some(lock_id) = s3::lock_id_of(&files.bucket, &f.key) else { continue };
                        let mut record = LockRecord::without_info(lock_id);
                        record.problems = vec![format!("the lock file could not be read: {e}")];
                        LockFile { etag: String::new(), record }
                    }
                };
                next.insert(f.key, entry);
            }
        }
    }
    count("GET", gets);
    state.items = next.len() + listing.other_objects as usize;
    state.pages = u32::try_from(listing.list_requests).unwrap_or(u32::MAX);
    state.files = next;
    state.files_listed = true;
    Ok(())
}

/// Find out once per set of clients, off the release path, whether the bucket's endpoint honours
/// `If-Match` on DeleteObject (the release asks the same cell, so it never probes again). A probe
/// that fails is not repeated here: the first release tries again. (On a versioned bucket each
/// probe leaves a delete marker on a random key that never existed.)
async fn probe_if_match(ctx: &Context, source: &LockSource, state: &mut SourceState, files: &crate::crd::S3LockFiles, clients: &SourceSdk) {
    let Some(client) = &clients.s3 else { return };
    if clients.s3_if_match.get().is_none() && !state.if_match_probed {
        state.if_match_probed = true;
        let probed = clients.s3_if_match.get_or_try_init(|| s3::honours_if_match(client, &files.bucket, &files.prefix)).await;
        // Two DELETEs when the first succeeded, one when it failed.
        count_s3(ctx, source, "DELETE", if probed.is_ok() { 2 } else { 1 });
        if let Err(e) = probed {
            warn!(error = %e, "could not check whether the bucket's endpoint honours If-Match; the first release checks again");
        }
    }
    state.if_match_refused = clients.s3_if_match.get() == Some(&false);
}

/// Count S3 requests as S3 bills them (`LIST`, `GET`, `DELETE`).
fn count_s3(ctx: &Context, source: &LockSource, request: &str, n: u64) {
    let labels = S3RequestLabels { namespace: source.namespace().unwrap_or_default(), source: source.name_any(), request: request.into() };
    ctx.metrics.locks.s3_requests.get_or_create(&labels).inc_by(n);
}

fn apply_item(table: &mut BTreeMap<String, LockRecord>, item: &HashMap<String, aws_sdk_dynamodb::types::AttributeValue>) {
    match dynamo::lock_item::parse_item(item) {
        TableItem::Lock(r) => {
            table.insert(r.lock_id.clone(), *r);
        }
        other => {
            // Whatever the item is now, it is no longer the lock it may have been.
            if let Some(id) = item.get("LockID").and_then(|v| v.as_s().ok()) {
                table.remove(id);
            }
            if let TableItem::Unusable { reason } = other {
                warn!(%reason, "skipping an item that is not a lock");
            }
        }
    }
}

/// Read one page of every readable shard into the table; true when the stream was quiet.
async fn catch_up(ctx: &Context, source: &LockSource, state: &mut SourceState) -> Result<bool, SyncError> {
    let Some(reader) = state.stream.as_mut() else { return Ok(true) };
    let started = Instant::now();
    let outcome = reader.poll().await;
    let read: Vec<String> = outcome.changes.iter().filter_map(ItemChange::lock_id).map(str::to_owned).collect();
    state.awaited.polled(&read, started, Instant::now(), false);
    apply_changes(ctx, source, state, outcome.changes).await?;
    if let Some(e) = outcome.error {
        return Err(e.into());
    }
    Ok(outcome.quiet)
}

/// What one poll of a followed stream did.
struct Followed {
    /// Records arrived and were applied to the table in memory.
    changed: bool,
    /// The LockIDs of the records read.
    read: Vec<String>,
    /// The first failure (a stream call, or a read a KEYS_ONLY record asked for).
    error: Option<SyncError>,
}

/// Apply what the stream says to the table in memory: all that was read, even when a call
/// failed.
async fn follow_stream(ctx: &Context, source: &LockSource, state: &mut SourceState) -> Followed {
    let Some(reader) = state.stream.as_mut() else { return Followed { changed: false, read: Vec::new(), error: None } };
    let outcome = reader.poll().await;
    let changed = !outcome.changes.is_empty();
    let read = outcome.changes.iter().filter_map(ItemChange::lock_id).map(str::to_owned).collect();
    let applied = apply_changes(ctx, source, state, outcome.changes).await;
    Followed { changed, read, error: outcome.error.map(SyncError::from).or(applied.err()) }
}

/// Apply what the stream says to the table in memory. An item a KEYS_ONLY record names is read
/// (strongly consistent, so any later read gives its latest state); one that cannot be read now
/// is remembered and read again first on the next call, and the rest is applied all the same.
async fn apply_changes(ctx: &Context, source: &LockSource, state: &mut SourceState, changes: Vec<ItemChange>) -> Result<(), SyncError> {
    let table = source.spec.dynamodb.as_ref().map(|d| d.table_name.clone()).unwrap_or_default();
    let mut first_error = None;
    let retry: Vec<ItemChange> = std::mem::take(&mut state.unread).into_iter().map(ItemChange::Touched).collect();
    for change in retry.into_iter().chain(changes) {
        match change {
            ItemChange::Put(item) => {
                if let Some(id) = item.get("LockID").and_then(|v| v.as_s().ok()) {
                    state.unread.remove(id);
                }
                apply_item(&mut state.table, &item);
            }
            ItemChange::Removed(lock_id) => {
                state.unread.remove(&lock_id);
                state.table.remove(&lock_id);
            }
            ItemChange::Touched(lock_id) => {
                let Some(clients) = &state.clients else { continue };
                match dynamo::get_item(&clients.table, &table, &lock_id).await {
                    Ok((item, units)) => {
                        ctx.add_read_units(source, units);
                        state.unread.remove(&lock_id);
                        match item {
                            Some(item) => apply_item(&mut state.table, &item),
                            None => {
                                state.table.remove(&lock_id);
                            }
                        }
                    }
                    Err(e) => {
                        state.unread.insert(lock_id);
                        first_error.get_or_insert(SyncError::from(e));
                    }
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Plan against the StateLocks that exist and apply the plan; returns the lock count.
async fn reconcile(ctx: &Context, source: &LockSource, state: &mut SourceState) -> Result<i32, SyncError> {
    let records = state.records();
    ctx.cluster.locks_listed().await;
    let existing_objs = existing_locks(ctx, source, &mut state.written);
    let existing: Vec<plan::ExistingLock> = existing_objs.iter().map(existing_lock).collect();
    let now = Timestamp::now();
    let p = plan::plan(&source.name_any(), &records, &existing, now.as_nanosecond(), source.spec.expiry.stale_after.get().as_secs());
    execute(ctx, source, &existing_objs, &p, now, &mut state.written).await?;
    Ok(i32::try_from(p.lock_count).unwrap_or(i32::MAX))
}

/// This source's StateLocks: the shared cache, corrected by the writes it has not caught up with.
fn existing_locks(ctx: &Context, source: &LockSource, written: &mut HashMap<String, Written>) -> Vec<StateLock> {
    let (ns, name) = (source.namespace().unwrap_or_default(), source.name_any());
    let adopted =
        ctx.adopted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&(ns.clone(), name.clone())).cloned().unwrap_or_default();
    let ours = |label: Option<&str>| label.is_some_and(|l| l == name || adopted.contains(l));
    let mut by_name: BTreeMap<String, StateLock> = ctx
        .cluster
        .locks
        .state()
        .iter()
        .filter(|l| l.namespace().as_deref() == Some(ns.as_str()) && ours(crate::cluster::cached_source_label(l)))
        .map(|l| (l.name_any(), (**l).clone()))
        .collect();
    written.retain(|lock_name, w| match w {
        Written::Applied { lock, awaited, at } => {
            // A write that the API server found to change nothing has a version the cache may
            // have seen long ago: the cache shows it now, or something after it soon. A cache
            // that lags that much longer is stale anyway; the write is then forgotten, and the
            // worst that follows is a write made again.
            let seen = awaited.seen()
                || by_name.get(lock_name).is_some_and(|c| c.resource_version() == lock.resource_version())
                || at.elapsed() > WRITES_AWAITED_AT_MOST;
            if !seen {
                by_name.insert(lock_name.clone(), (**lock).clone());
            }
            !seen
        }
        Written::Deleted { uid } => {
            let lagging = by_name.get(lock_name).is_some_and(|c| c.uid().as_deref() == Some(uid.as_str()));
            if lagging {
                by_name.remove(lock_name);
            }
            lagging
        }
    });
    by_name.into_values().collect()
}

fn existing_lock(o: &StateLock) -> plan::ExistingLock {
    let conditions = o
        .status
        .as_ref()
        .map(|s| s.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.message.clone())).collect())
        .unwrap_or_default();
    plan::ExistingLock {
        name: o.name_any(),
        uid: o.uid().unwrap_or_default(),
        spec: o.spec.clone(),
        conditions,
        created_at: o.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_nanosecond()),
    }
}

/// Apply a plan: removals first (they free quota for creations), then upserts; every write is
/// tried even when another failed, and the first failure is returned.
async fn execute(
    ctx: &Context,
    source: &LockSource,
    existing: &[StateLock],
    p: &plan::Plan,
    now: Timestamp,
    written: &mut HashMap<String, Written>,
) -> Result<(), SyncError> {
    let ns = source.namespace().unwrap_or_default();
    let mut first_error: Option<SyncError> = None;
    for r in &p.removals {
        if let Err(e) = remove_one(ctx, &ns, existing, r, written).await {
            warn!(error = %e, "a StateLock could not be removed; the others are written all the same");
            first_error.get_or_insert(e);
        }
    }
    for u in &p.upserts {
        if let Err(e) = upsert_one(ctx, source, &ns, existing, u, now, written).await {
            warn!(error = %e, "a StateLock could not be written; the others are written all the same");
            first_error.get_or_insert(e);
        }
    }
    for (name, lock_id) in &p.collisions {
        warn!(%name, %lock_id, "two LockIDs map to one StateLock name; the second is not mirrored");
        if let Some(obj) = existing.iter().find(|e| e.name_any() == *name) {
            publish(
                ctx,
                obj,
                reasons::LOCK_NAME_COLLISION,
                true,
                &format!("LockID {lock_id} maps to this object's name too and is not mirrored"),
            )
            .await;
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn remove_one(
    ctx: &Context,
    ns: &str,
    existing: &[StateLock],
    r: &plan::Removal,
    written: &mut HashMap<String, Written>,
) -> Result<(), SyncError> {
    let _turn = ctx.write_turn().await?;
    ctx.writer.delete(ns, &r.name, &r.uid).await.map_err(|error| SyncError::DeleteStateLock { name: r.name.clone(), error })?;
    written.insert(r.name.clone(), Written::Deleted { uid: r.uid.clone() });
    if let Some(h) = r.held_for_secs.filter(|h| *h >= 0) {
        ctx.metrics.locks.hold_duration.observe(h as f64);
    }
    if let Some(obj) = existing.iter().find(|e| e.name_any() == r.name) {
        let held = r.held_for_secs.map(crate::lock_record::human).unwrap_or_else(|| "an unknown time".into());
        publish(ctx, obj, reasons::LOCK_RELEASED, false, &format!("lock on {} released after {held}", r.lock_id)).await;
    }
    Ok(())
}

async fn upsert_one(
    ctx: &Context,
    source: &LockSource,
    ns: &str,
    existing: &[StateLock],
    u: &plan::Upsert,
    now: Timestamp,
    written: &mut HashMap<String, Written>,
) -> Result<(), SyncError> {
    let _turn = ctx.write_turn().await?;
    let mut obj = existing.iter().find(|e| e.name_any() == u.name).cloned();
    if u.write_spec {
        if obj.is_none()
            && let Some(created) = u.spec.lock_info.created.as_deref().and_then(crate::lock_record::parse_created)
        {
            let lag = (now.as_nanosecond() - created).max(0) as f64 / 1e9;
            ctx.metrics.locks.mirror_lag.observe(lag);
        }
        obj = Some(
            ctx.writer
                .apply_spec(source, &u.name, &u.spec)
                .await
                .map_err(|error| SyncError::ApplyStateLock { name: u.name.clone(), error })?,
        );
    }
    let Some(current) = obj else { return Ok(()) };
    if u.write_conditions {
        let old: &[Condition] = current.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
        let conditions: Vec<Condition> = u
            .conditions
            .iter()
            .map(|c| {
                let kept = old.iter().find(|o| o.type_ == c.type_ && o.status == c.status).map(|o| o.last_transition_time.clone());
                Condition {
                    type_: c.type_.into(),
                    status: c.status.into(),
                    reason: c.reason.into(),
                    message: c.message.clone(),
                    last_transition_time: kept.unwrap_or(Time(now)),
                    observed_generation: current.metadata.generation,
                }
            })
            .collect();
        let after = ctx
            .writer
            .apply_status(ns, &u.name, reasons::MIRROR_MANAGER, json!({"conditions": conditions}))
            .await
            .map_err(|error| SyncError::ApplyStateLock { name: u.name.clone(), error })?;
        written.insert(u.name.clone(), applied(ctx, after));
    } else if u.write_spec {
        written.insert(u.name.clone(), applied(ctx, current.clone()));
    }
    for e in &u.events {
        publish(ctx, &current, e.reason, e.warning, &e.note).await;
    }
    Ok(())
}

/// `lock`, as a write of the mirror's returned it, awaited in the cache from now on.
fn applied(ctx: &Context, lock: StateLock) -> Written {
    Written::Applied { awaited: ctx.cluster.await_lock_write(&lock), lock: Box::new(lock), at: Instant::now() }
}

/// How long the mirror waits for the StateLock cache to show a write of its own.
const WRITES_AWAITED_AT_MOST: Duration = Duration::from_secs(300);

async fn publish(ctx: &Context, obj: &StateLock, reason: &str, warning: bool, note: &str) {
    ctx.writer.publish(obj, reason, warning, note, None).await;
}

fn ready_status(
    source: &LockSource,
    mode: Option<SyncMode>,
    ok: bool,
    reason: &str,
    message: String,
    locks: Option<i32>,
) -> LockSourceStatus {
    let old = source.status.clone().unwrap_or_default();
    let condition = Condition {
        type_: reasons::CONDITION_READY.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(Timestamp::now()),
        observed_generation: source.metadata.generation,
    };
    LockSourceStatus {
        observed_generation: source.metadata.generation,
        conditions: vec![condition],
        lock_count: locks.or(old.lock_count),
        last_sync_time: old.last_sync_time,
        sync_mode: mode.or(old.sync_mode),
    }
}

/// Write the LockSource status when it changed; `lastSyncTime` alone is refreshed at most once a
/// minute, so that a quiet table costs one write a minute, not one per pass.
async fn write_source_status(
    ctx: &Context,
    source: &LockSource,
    mut status: LockSourceStatus,
    synced: bool,
    state: &mut SourceState,
) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let comparable = |s: &LockSourceStatus| {
        let mut c = s.clone();
        c.last_sync_time = None;
        for cond in &mut c.conditions {
            cond.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        c
    };
    let previous = state.last_status.as_ref();
    let unchanged = previous.is_some_and(|(p, _)| comparable(p) == comparable(&status));
    let sync_fresh = previous.is_some_and(|(_, at)| now.duration_since(*at).as_secs() < 60);
    if unchanged && (sync_fresh || !synced) {
        return Ok(());
    }
    if synced {
        status.last_sync_time = Some(Time(now));
    } else if let Some((p, _)) = previous {
        status.last_sync_time = p.last_sync_time.clone();
    }
    // Keep the transition time while the Ready status stays the same.
    if let Some((p, _)) = previous
        && let (Some(old), Some(new)) = (p.conditions.first(), status.conditions.first_mut())
        && old.status == new.status
    {
        new.last_transition_time = old.last_transition_time.clone();
    }
    if !ctx.leader.is_leader() {
        return Ok(());
    }
    let api: Api<LockSource> = Api::namespaced(ctx.client.clone(), &source.namespace().unwrap_or_default());
    let body =
        json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource", "metadata": {"name": source.name_any()}, "status": status});
    api.patch_status(&source.name_any(), &PatchParams::apply(reasons::MIRROR_MANAGER).force(), &Patch::Apply(&body)).await?;
    let written_at = if synced || previous.is_none() { now } else { previous.map_or(now, |p| p.1) };
    state.last_status = Some((status, written_at));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Nudge;

    fn nudges(k: &[&str], sent: Instant) -> Vec<Nudge> {
        k.iter().map(|s| Nudge { lock_id: (*s).to_owned(), sent }).collect()
    }

    fn ids(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A nudged LockID asks for a poll at once; one whose record does not come is polled for
    /// again 0.2, 0.6, 1.4 and 3 s after the first poll, then given up; one read is done with.
    #[test]
    fn awaited_lock_ids_are_polled_for_at_doubling_gaps_until_read_or_given_up() {
        let t0 = Instant::now();
        let mut a = Awaited::default();
        assert_eq!(a.next_at(), None, "nothing awaited: the regular pace");
        a.add(nudges(&["a", "b"], t0));
        assert_eq!(a.next_at(), Some(t0));
        // The first poll reads `b` only.
        a.polled(&ids(&["b"]), t0, t0, true);
        let mut polls = vec![t0];
        while let Some(at) = a.next_at() {
            polls.push(at);
            a.polled(&[], at, at, true);
            assert!(polls.len() < 10, "follow-ups end");
        }
        let gaps: Vec<u128> = polls.windows(2).map(|w| w[1].duration_since(w[0]).as_millis()).collect();
        assert_eq!(gaps, [200, 400, 800, 1600], "the follow-ups after the first poll, then none");
        // A LockID written again is awaited from its new write.
        let t1 = t0 + ms(10_000);
        a.add(nudges(&["c"], t1));
        a.polled(&[], t1, t1, true);
        a.add(nudges(&["c"], t1 + ms(300)));
        assert!(a.next_at().is_some_and(|at| at >= t1 + ms(300)), "nudged again: polled for after its new write");
        a.polled(&ids(&["c"]), t1 + ms(400), t1 + ms(410), true);
        assert_eq!(a.next_at(), None);
    }

    /// Only a poll that started after the write was sent can have read its record: one that
    /// started before neither settles it nor counts as a miss; a nudge taken after a poll that
    /// started after the write and read it asks for no poll at all.
    #[test]
    fn only_polls_started_after_the_write_count() {
        let t0 = Instant::now();
        let mut a = Awaited::default();
        a.add(nudges(&["a"], t0 + ms(10)));
        a.polled(&ids(&["a"]), t0, t0 + ms(20), true);
        assert_eq!(a.keys.len(), 1, "an earlier write's record does not settle it");
        assert!(a.keys["a"].first, "nor is that poll a miss");
        // The record read by a poll started after the write, taken before the nudge.
        let mut b = Awaited::default();
        b.polled(&ids(&["b"]), t0 + ms(15), t0 + ms(30), true);
        b.add(nudges(&["b"], t0 + ms(10)));
        assert_eq!(b.next_at(), None, "already read: no poll asked for");
        b.add(nudges(&["b"], t0 + ms(20)));
        assert!(b.next_at().is_some(), "a write sent after that poll started is awaited");
        assert!(!b.keys["b"].first, "sent while that poll was under way: its next poll teaches nothing");
        b.polled(&[], t0 + ms(200), t0 + ms(210), true);
        assert_eq!(b.first_delay, Duration::ZERO, "no miss counted");
        b.add(nudges(&["b"], t0 + ms(220)));
        assert!(b.keys["b"].first, "sent after that poll ended: a first poll like any other");
    }

    /// A poll that failed (throttled, or a KEYS_ONLY item read refused) settles the LockIDs it
    /// read and moves the others on to their follow-ups, but teaches nothing about how late
    /// records come; polls that keep failing still give a LockID up after its follow-ups.
    #[test]
    fn a_failed_poll_teaches_nothing_and_follow_ups_still_end() {
        let t0 = Instant::now();
        let mut a = Awaited::default();
        a.add(nudges(&["a", "b"], t0));
        a.polled(&ids(&["a"]), t0, t0 + ms(10), false);
        assert_eq!(a.keys.len(), 1, "what it read is settled");
        assert_eq!(a.keys["b"].at, t0 + ms(210), "the other moves on to its first follow-up");
        assert_eq!(a.first_delay, Duration::ZERO, "no miss learnt");
        let mut polls = 1;
        while let Some(at) = a.next_at() {
            a.polled(&[], at, at + ms(10), false);
            polls += 1;
            assert!(polls <= 6, "failing polls end too");
        }
        assert_eq!(polls, 5);
        assert_eq!(a.first_delay, Duration::ZERO);
    }

    /// What a Scan and catch-up read may have been an awaited record: the next poll not finding
    /// it is no miss.
    #[test]
    fn after_a_catch_up_a_missing_record_is_no_miss() {
        let t0 = Instant::now();
        let mut a = Awaited::default();
        a.add(nudges(&["a"], t0));
        a.caught_up();
        a.polled(&[], t0 + ms(300), t0 + ms(310), true);
        assert_eq!(a.first_delay, Duration::ZERO);
        assert!(a.next_at().is_some(), "still polled for, at its follow-ups");
    }

    /// A nudge that comes late for an earlier write leaves the wait for the later one.
    #[test]
    fn an_older_nudge_does_not_move_the_wait_back() {
        let t0 = Instant::now();
        let mut a = Awaited::default();
        a.add(nudges(&["a"], t0 + ms(50)));
        a.add(nudges(&["a"], t0));
        assert_eq!(a.keys["a"].sent, t0 + ms(50));
        a.polled(&ids(&["a"]), t0 + ms(20), t0 + ms(30), true);
        assert_eq!(a.keys.len(), 1, "a poll started before the later write does not settle it");
    }

    /// A poll made for another reason before a LockID's follow-up is due leaves its schedule.
    #[test]
    fn a_poll_before_a_follow_up_is_due_does_not_spend_it() {
        let t0 = Instant::now();
        let mut a = Awaited::default();
        a.add(nudges(&["a"], t0));
        a.polled(&[], t0, t0, true);
        a.polled(&[], t0 + ms(50), t0 + ms(60), true);
        assert_eq!(a.next_at(), Some(t0 + ms(200)));
    }

    /// The first poll's delay settles near the 90th percentile of how late records are: misses
    /// lengthen it nine times as much as hits shorten it; records that come at once keep it at 0.
    #[test]
    fn the_first_poll_learns_how_late_records_come() {
        let mut a = Awaited::default();
        let mut t = Instant::now();
        // Records readable 100 ms after their write, except one in five, 300 ms after.
        let mut first_polls = Vec::new();
        for i in 0..2_000u32 {
            let late = if i % 5 == 0 { ms(300) } else { ms(100) };
            let sent = t;
            a.add(nudges(&["k"], sent));
            while let Some(at) = a.next_at() {
                let read = at >= sent + late;
                if a.keys["k"].first {
                    first_polls.push(at.duration_since(sent));
                }
                a.polled(&if read { ids(&["k"]) } else { Vec::new() }, at, at, true);
            }
            t += ms(5_000);
        }
        let settled = &first_polls[1_000..];
        let mean = settled.iter().sum::<Duration>() / settled.len() as u32;
        // One record in five is 300 ms late: the 90th percentile of the delay is 300 ms.
        assert!(mean >= ms(250) && mean <= ms(350), "near the 90th percentile of the delay (300 ms): {mean:?}");
        let missed = settled.iter().zip(0..).filter(|(d, i)| **d < if (1_000 + i) % 5 == 0 { ms(300) } else { ms(100) }).count();
        assert!(missed * 100 <= settled.len() * 25, "about one first poll in ten misses: {missed} of {}", settled.len());
        // Records that come at once bring it back to zero.
        for _ in 0..400 {
            let sent = t;
            a.add(nudges(&["k"], sent));
            let at = a.next_at().expect("due");
            a.polled(&ids(&["k"]), at, at, true);
            t += ms(5_000);
        }
        assert_eq!(a.first_delay, Duration::ZERO);
    }

    /// Awaited LockIDs hurry the next poll up to NUDGE_SPACING after the last one, never past the
    /// regular pace (also one faster than that spacing); trouble's backoff overrides both.
    #[test]
    fn the_next_poll_is_spaced_and_paced() {
        let t0 = Instant::now();
        // The last poll started at t0 and was done (its records written) 30 ms later.
        let last = (t0, t0 + ms(30));
        assert_eq!(next_poll(last, ms(2_000), None, None), t0 + ms(2_030), "the regular pace, from the last poll's end");
        assert_eq!(next_poll(last, ms(2_000), None, Some(t0)), t0 + NUDGE_SPACING, "spaced from the last poll's start");
        assert_eq!(next_poll(last, ms(2_000), None, Some(t0 + ms(700))), t0 + ms(700));
        assert_eq!(next_poll(last, ms(2_000), None, Some(t0 + ms(9_000))), t0 + ms(2_030));
        assert_eq!(next_poll(last, ms(100), None, Some(t0)), t0 + ms(130), "a regular pace faster than the spacing");
        assert_eq!(next_poll(last, ms(2_000), Some(ms(8_000)), Some(t0)), t0 + ms(8_030), "the backoff, from the failed poll's end");
    }

    /// At most AWAITED_AT_MOST LockIDs are awaited; one already awaited is still renewed.
    #[test]
    fn awaited_lock_ids_are_bounded() {
        let t0 = Instant::now();
        let mut a = Awaited::default();
        let many: Vec<String> = (0..AWAITED_AT_MOST + 10).map(|i| format!("k{i}")).collect();
        a.add(many.iter().map(|k| Nudge { lock_id: k.clone(), sent: t0 }).collect());
        assert_eq!(a.keys.len(), AWAITED_AT_MOST);
        let later = t0 + ms(1_000);
        a.add(nudges(&["k0", "new"], later));
        assert_eq!(a.keys.len(), AWAITED_AT_MOST, "a new one is left to the regular polls");
        assert_eq!(a.keys.get("k0").map(|k| k.sent), Some(later), "an awaited one is renewed");
    }
}
