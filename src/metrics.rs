//! Prometheus metrics, served by the admin server at `/metrics` in the OpenMetrics text format.
//!
//! Labels are bounded categories (operation, result, outcome); the only object names are a
//! LockSource's namespace and name (admin-declared and few), never a StateLock, pod or lock ID: a
//! cluster with ten thousand locks must not make ten thousand series.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Every metric statelock exports, plus the registries that encode them.
pub struct Metrics {
    registry: Registry,
    /// The standard `process_*` metrics (unprefixed, as every exporter names them).
    process_registry: Registry,
    pub gateway: GatewayMetrics,
    pub locks: LockMetrics,
    pub controllers: ControllerMetrics,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// What the leader sees of every LockSource and StateLock (cleared when it stops leading).
    pub fleet: FleetMetrics,
    process: ProcessMetrics,
}

/// Gauges about the whole fleet of locks, written by the leader only and cleared when it stops
/// leading, so that a former leader never reports stale figures beside the new one's.
#[derive(Clone, Default)]
pub struct FleetMetrics {
    /// StateLocks by holder state, per LockSource (`Dead` in Observe mode is the first alert).
    pub locks_by_holder_state: Family<HolderStateLabels, Gauge>,
    /// 1 when the LockSource's Ready condition is True, else 0.
    pub source_ready: Family<SourceLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct HolderStateLabels {
    pub namespace: String,
    pub source: String,
    /// `Alive`, `Dead`, `Unknown`, `External`, `Ambiguous`, or `Unjudged` (no verdict yet).
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfoLabels {
    pub version: String,
}

/// Read from /proc/self at each scrape.
#[derive(Clone, Default)]
struct ProcessMetrics {
    resident_memory: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    start_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// jemalloc's own figures (see [`heap_stats`]).
    heap: [Gauge; 4],
    /// CPU seconds counted so far (the counter only goes up by the difference).
    cpu_counted: std::sync::Arc<std::sync::Mutex<f64>>,
}

/// What the mirror and the expiry controller see of the locks.
#[derive(Clone)]
pub struct LockMetrics {
    /// Locks held now, per LockSource (as last read by the leader).
    pub held: Family<SourceLabels, Gauge>,
    /// Age of the oldest lock held now, per LockSource.
    pub oldest_age: Family<SourceLabels, Gauge>,
    /// How long released locks had been held.
    pub hold_duration: Histogram,
    /// Time from a lock's Created until its StateLock was first written by the mirror.
    pub mirror_lag: Histogram,
    /// DynamoDB read capacity units consumed by the mirror, per LockSource.
    pub read_units: Family<SourceLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Locks statelock released, by the evidence (or request) that allowed it.
    pub expirations: Family<ExpirationLabels, Counter>,
    /// DynamoDB Streams requests the mirror made (AWS bills each as a stream read request), per
    /// LockSource and call.
    pub stream_requests: Family<StreamCallLabels, Counter>,
    /// DynamoDB Streams calls that failed, per LockSource and call.
    pub stream_errors: Family<StreamCallLabels, Counter>,
    /// Full table Scans, per LockSource and why they ran.
    pub full_scans: Family<ScanLabels, Counter>,
    /// S3 requests made for lock files, per LockSource and request class as S3 bills them
    /// (`LIST`, `GET`, `DELETE`).
    pub s3_requests: Family<S3RequestLabels, Counter>,
    /// SQS requests made for the lock files' event queue, per LockSource and request
    /// (`ReceiveMessage`, `DeleteMessageBatch`); SQS bills each.
    pub sqs_requests: Family<SqsRequestLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SqsRequestLabels {
    pub namespace: String,
    pub source: String,
    /// `ReceiveMessage` or `DeleteMessageBatch`.
    pub request: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct S3RequestLabels {
    pub namespace: String,
    pub source: String,
    /// `LIST` (ListObjectsV2), `GET` (GetObject) or `DELETE` (DeleteObject).
    pub request: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamCallLabels {
    pub namespace: String,
    pub source: String,
    /// `DescribeStream`, `GetShardIterator` or `GetRecords`.
    pub call: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScanLabels {
    pub namespace: String,
    pub source: String,
    /// `ScanMode` (every interval), `StreamOpened` (a stream was opened or reopened),
    /// `SafetyNet` (the hourly rescan in Streams mode).
    pub cause: String,
}

/// Reconcile passes of the mirror and the expiry controller.
#[derive(Clone)]
pub struct ControllerMetrics {
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
}

/// A LockSource: admin-declared and few, the one object identity used as a label (never a
/// StateLock, pod or lock ID).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SourceLabels {
    pub namespace: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpirationLabels {
    /// The evidence reason (`PodNotFound`, `PodReplaced`, `PodCompleted`, `ContainerRestarted`,
    /// `RunnerGone`) or `ForceUnlock`.
    pub reason: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ControllerName {
    mirror,
    expiry,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: ControllerName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: ControllerName,
    /// An [`crate::errors::ErrorCategory`] (`kubernetes_unavailable`, `dynamodb_throttled`, ..).
    pub category: String,
}

/// The gateway's metrics.
#[derive(Clone)]
pub struct GatewayMetrics {
    /// Requests by DynamoDB operation and result.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to answer a request, by operation.
    pub request_duration: Family<OperationLabels, Histogram>,
    /// Lock PutItems by result (granted or contended).
    pub lock_attempts: Family<AttemptLabels, Counter>,
    /// How long a waiter waited, from its first refused attempt until it got the lock or gave up.
    pub wait_duration: Family<WaitLabels, Histogram>,
    /// Clients waiting for a lock now.
    pub waiters: Gauge,
    /// StateLocks with Kubernetes updates queued.
    pub effects_queued: Gauge,
    /// Kubernetes updates dropped because the queue was full (the mirror catches up).
    pub effects_dropped: Counter,
    /// Kubernetes updates that failed (the mirror catches up).
    pub effects_failed: Counter,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are written as Prometheus expects them
pub enum Operation {
    PutItem,
    GetItem,
    DeleteItem,
    Scan,
    DescribeTable,
    unknown,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: Operation,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: Operation,
    /// `ok`, or the DynamoDB error code the caller got (a bounded set).
    pub result: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AttemptResult {
    granted,
    contended,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub result: AttemptResult,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WaitOutcome {
    acquired,
    gave_up,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitLabels {
    pub outcome: WaitOutcome,
}

fn request_buckets() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 4.0, 9))
}

fn reconcile_buckets() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 4.0, 9))
}

fn wait_buckets() -> Histogram {
    // 1 s .. ~68 min: Terraform retries 1, 2, 4 .. 16 s apart, and applies can take an hour.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 13))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("statelock");
        let gateway = GatewayMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(request_buckets),
            lock_attempts: Family::default(),
            wait_duration: Family::new_with_constructor(wait_buckets),
            waiters: Gauge::default(),
            effects_queued: Gauge::default(),
            effects_dropped: Counter::default(),
            effects_failed: Counter::default(),
        };
        let g = registry.sub_registry_with_prefix("gateway");
        g.register("requests", "Gateway requests by DynamoDB operation and result", gateway.requests.clone());
        g.register_with_unit(
            "request_duration",
            "Time the gateway took to answer, by operation",
            prometheus_client::registry::Unit::Seconds,
            gateway.request_duration.clone(),
        );
        g.register("lock_attempts", "Lock attempts (conditional PutItems) by result", gateway.lock_attempts.clone());
        g.register_with_unit(
            "lock_wait",
            "How long a waiter waited for a lock, until it acquired it or gave up",
            prometheus_client::registry::Unit::Seconds,
            gateway.wait_duration.clone(),
        );
        g.register("waiters", "Clients waiting for a lock now", gateway.waiters.clone());
        g.register("effects_queued", "StateLocks with Kubernetes updates queued by the gateway", gateway.effects_queued.clone());
        g.register(
            "effects_dropped",
            "Gateway Kubernetes updates dropped because the queue was full (the mirror catches up)",
            gateway.effects_dropped.clone(),
        );
        g.register("effects_failed", "Gateway Kubernetes updates that failed (the mirror catches up)", gateway.effects_failed.clone());

        let locks = LockMetrics {
            held: Family::default(),
            oldest_age: Family::default(),
            hold_duration: wait_buckets(),
            mirror_lag: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.05, 2.0, 12)),
            read_units: Family::default(),
            expirations: Family::default(),
            stream_requests: Family::default(),
            stream_errors: Family::default(),
            full_scans: Family::default(),
            s3_requests: Family::default(),
            sqs_requests: Family::default(),
        };
        let seconds = prometheus_client::registry::Unit::Seconds;
        registry.register("locks_held", "Locks held now, per LockSource (as last read by the leader)", locks.held.clone());
        registry.register_with_unit(
            "lock_oldest_age",
            "Age of the oldest lock held now, per LockSource",
            seconds.clone(),
            locks.oldest_age.clone(),
        );
        registry.register_with_unit("lock_hold", "How long released locks had been held", seconds.clone(), locks.hold_duration.clone());
        registry.register_with_unit(
            "mirror_lag",
            "Time from a lock's Created until the mirror first wrote its StateLock",
            seconds.clone(),
            locks.mirror_lag.clone(),
        );
        registry.register(
            "dynamodb_read_units",
            "DynamoDB read capacity units consumed by the mirror, per LockSource",
            locks.read_units.clone(),
        );
        registry.register("expirations", "Locks statelock released, by the evidence or request that allowed it", locks.expirations.clone());
        registry.register(
            "dynamodb_stream_requests",
            "DynamoDB Streams requests made by the mirror (billed as stream read requests), per LockSource and call",
            locks.stream_requests.clone(),
        );
        registry.register(
            "dynamodb_stream_errors",
            "DynamoDB Streams calls of the mirror that failed, per LockSource and call",
            locks.stream_errors.clone(),
        );
        registry.register("dynamodb_full_scans", "Full table Scans run by the mirror, per LockSource and cause", locks.full_scans.clone());
        registry.register(
            "s3_requests",
            "S3 requests made for lock files (LIST and GET by the mirror, GET and DELETE by releases), per LockSource and request class",
            locks.s3_requests.clone(),
        );
        registry.register(
            "sqs_requests",
            "SQS requests made for the lock files' event queue (event mode), per LockSource and request",
            locks.sqs_requests.clone(),
        );

        let controllers =
            ControllerMetrics { reconcile_duration: Family::new_with_constructor(reconcile_buckets), reconcile_errors: Family::default() };
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of a mirror pass or an expiry reconcile",
            seconds,
            controllers.reconcile_duration.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed mirror passes and expiry reconciles, by error category",
            controllers.reconcile_errors.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        let build_info: Family<BuildInfoLabels, Gauge> = Family::default();
        build_info.get_or_create(&BuildInfoLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("build_info", "1, labelled with the version of this statelock build", build_info);
        let fleet = FleetMetrics::default();
        registry.register(
            "locks_by_holder_state",
            "StateLocks by the holder state of their last verdict, per LockSource (leader only)",
            fleet.locks_by_holder_state.clone(),
        );
        registry.register("locksource_ready", "1 when the LockSource is Ready, else 0 (leader only)", fleet.source_ready.clone());
        let mut process_registry = Registry::default();
        let process = ProcessMetrics::default();
        let bytes = prometheus_client::registry::Unit::Bytes;
        process_registry.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            bytes.clone(),
            process.resident_memory.clone(),
        );
        process_registry.register_with_unit("process_virtual_memory", "Virtual memory size", bytes, process.virtual_memory.clone());
        process_registry.register("process_open_fds", "Open file descriptors", process.open_fds.clone());
        process_registry.register_with_unit(
            "process_cpu",
            "User and system CPU time spent",
            prometheus_client::registry::Unit::Seconds,
            process.cpu_seconds.clone(),
        );
        process_registry.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            prometheus_client::registry::Unit::Seconds,
            process.start_time.clone(),
        );
        for (gauge, (name, help)) in process.heap.iter().zip(HEAP_FIGURES) {
            registry.register_with_unit(name, help, prometheus_client::registry::Unit::Bytes, gauge.clone());
        }
        Self { registry, process_registry, gateway, locks, controllers, leader, fleet, process }
    }
}

/// Count StateLocks by (namespace, LockSource, holder state) and LockSources by readiness, from
/// the shared caches: what the fleet gauges show.
pub fn fleet_counts(
    locks: &[std::sync::Arc<crate::crd::StateLock>],
    sources: &[std::sync::Arc<crate::crd::LockSource>],
) -> (std::collections::BTreeMap<HolderStateLabels, i64>, std::collections::BTreeMap<SourceLabels, i64>) {
    use kube::ResourceExt;
    let mut by_state = std::collections::BTreeMap::new();
    for l in locks {
        let state = l.status.as_ref().and_then(|s| s.holder.as_ref()).map_or_else(|| "Unjudged".to_owned(), |h| format!("{:?}", h.state));
        let labels = HolderStateLabels { namespace: l.namespace().unwrap_or_default(), source: l.spec.source.clone(), state };
        *by_state.entry(labels).or_insert(0) += 1;
    }
    let ready = sources
        .iter()
        .map(|s| {
            let is_ready = s
                .status
                .as_ref()
                .is_some_and(|st| st.conditions.iter().any(|c| c.type_ == crate::reasons::CONDITION_READY && c.status == "True"));
            (SourceLabels { namespace: s.namespace().unwrap_or_default(), source: s.name_any() }, i64::from(is_ready))
        })
        .collect();
    (by_state, ready)
}

/// The allocator's figures, in the order [`heap_stats`] reads them: what the program holds, and
/// what that costs the process (the gaps are fragmentation, and freed pages not yet handed back).
const HEAP_FIGURES: [(&str, &str); 4] = [
    ("heap_allocated", "Bytes the process has allocated and not freed, as its allocator (jemalloc) counts them"),
    ("heap_active", "Bytes in the allocator's active pages: the allocated bytes and the free space among them"),
    ("heap_metadata", "Bytes of the allocator's own metadata"),
    ("heap_resident", "Bytes of memory the allocator holds resident: active pages, metadata, and freed pages it has not handed back yet"),
];

/// jemalloc's `stats.allocated`, `stats.active`, `stats.metadata` and `stats.resident`, read after
/// advancing its epoch (they are cached until then). Figures of the jemalloc linked in: the
/// binary's allocator; in a program that links this library without making jemalloc its
/// allocator, they are near zero.
#[cfg(not(target_env = "msvc"))]
fn heap_stats() -> Option<[usize; 4]> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    Some([stats::allocated::read().ok()?, stats::active::read().ok()?, stats::metadata::read().ok()?, stats::resident::read().ok()?])
}

#[cfg(target_env = "msvc")]
fn heap_stats() -> Option<[usize; 4]> {
    None
}

/// Linux's fixed user-space clock tick (USER_HZ) for /proc times.
const USER_HZ: f64 = 100.0;

impl ProcessMetrics {
    /// Read /proc/self; a field that cannot be read keeps its last value.
    fn refresh(&self) {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let kib = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
                    .map(|k| k * 1024)
            };
            if let Some(v) = kib("VmRSS:") {
                self.resident_memory.set(v);
            }
            if let Some(v) = kib("VmSize:") {
                self.virtual_memory.set(v);
            }
        }
        if let Some(figures) = heap_stats() {
            for (gauge, v) in self.heap.iter().zip(figures) {
                gauge.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(i64::try_from(fds.count()).unwrap_or(i64::MAX));
        }
        // Fields after the command (which may hold spaces and parentheses): state is field 3.
        if let Some(rest) = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| s.rsplit_once(')').map(|(_, r)| r.to_owned())) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
            if let (Some(utime), Some(stime)) = (field(14), field(15)) {
                let total = (utime + stime) / USER_HZ;
                let mut counted = self.cpu_counted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if total > *counted {
                    self.cpu_seconds.inc_by(total - *counted);
                    *counted = total;
                }
            }
            let boot = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<f64>().ok()));
            if let (Some(start), Some(boot)) = (field(22), boot) {
                self.start_time.set(boot + start / USER_HZ);
            }
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The OpenMetrics text exposition (statelock's metrics, then the process metrics, read now).
    pub fn encode(&self) -> String {
        self.process.refresh();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.process_registry);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }

    /// Set the fleet gauges to exactly these counts (series that are gone are removed).
    pub fn set_fleet(
        &self,
        (by_state, ready): (std::collections::BTreeMap<HolderStateLabels, i64>, std::collections::BTreeMap<SourceLabels, i64>),
    ) {
        self.fleet.locks_by_holder_state.clear();
        for (labels, n) in by_state {
            self.fleet.locks_by_holder_state.get_or_create(&labels).set(n);
        }
        self.fleet.source_ready.clear();
        for (labels, v) in ready {
            self.fleet.source_ready.get_or_create(&labels).set(v);
        }
    }

    /// Forget every figure only the leader may report (this replica stopped leading).
    pub fn clear_leader_gauges(&self) {
        self.locks.held.clear();
        self.locks.oldest_age.clear();
        self.fleet.locks_by_holder_state.clear();
        self.fleet.source_ready.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_the_gateway_families_with_units() {
        let m = Metrics::default();
        m.gateway.requests.get_or_create(&RequestLabels { operation: Operation::PutItem, result: "ok".into() }).inc();
        m.gateway.wait_duration.get_or_create(&WaitLabels { outcome: WaitOutcome::gave_up }).observe(3.0);
        m.gateway.request_duration.get_or_create(&OperationLabels { operation: Operation::GetItem }).observe(0.002);
        let text = m.encode();
        assert!(text.contains("statelock_gateway_requests_total{operation=\"PutItem\",result=\"ok\"} 1"), "{text}");
        assert!(text.contains("statelock_gateway_lock_wait_seconds_count{outcome=\"gave_up\"} 1"), "{text}");
        assert!(text.contains("# TYPE statelock_gateway_request_duration_seconds histogram"), "{text}");
        assert!(text.contains("statelock_gateway_request_duration_seconds_bucket{le=\"0.0064\",operation=\"GetItem\"} 1"), "{text}");
        assert!(text.contains("statelock_gateway_effects_dropped_total 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
