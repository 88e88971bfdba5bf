//! What the gateway's calls mean for StateLocks, applied to Kubernetes off the request path.
//!
//! A request only records what happened (a grant, a refusal, a release) in memory and returns; a
//! few workers apply it to the API server. Work is coalesced per lock: while one update for a
//! lock is in flight, or within `min_interval` of the last one, further grants and releases only
//! replace the lock's pending final state, and waiter attempts accumulate. So a lock that changes
//! hands ten thousand times a second costs a handful of writes, while the first change after a
//! quiet spell is written at once. The queue is bounded: beyond `max_pending` locks, updates are
//! dropped and counted (the mirror still converges on the table's contents).
//!
//! Waiters are tracked here as well, from their own PutItem bodies: one entry per waiting lock ID,
//! removed when that ID is granted the lock (it acquired it) or when it has not retried within
//! `waiter_timeout` (it gave up; Terraform retries at most 16 s apart). Both ends are observed in
//! the wait-time histogram, and the StateLock's `status.contention` is written from this state.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{Api, Client, Resource, ResourceExt, runtime::events::Recorder};
use serde_json::{Value, json};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::caches::Caches;
use crate::{
    cluster::writer::{LockWriter, Writer},
    crd::{LockSource, StateLock, state_lock_name},
    lock_record::{LockRecord, human, parse_created, spec_for, split_who},
    lock_store::StoreKind,
    metrics::{GatewayMetrics, LockMetrics, Metrics, WaitLabels, WaitOutcome},
    reasons,
};

/// Tuning for [`Effects`].
#[derive(Clone, Debug)]
pub struct EffectsConfig {
    /// Concurrent Kubernetes updates.
    pub workers: usize,
    /// Least time between two updates of one lock.
    pub min_interval: Duration,
    /// Locks with updates queued beyond which new updates are dropped.
    pub max_pending: usize,
    /// A waiter that has not retried for this long gave up.
    pub waiter_timeout: Duration,
    /// Waiters listed per lock (more are counted in metrics but not listed).
    pub max_waiters_per_lock: usize,
    /// Who the events are reported as: with it, a lock's `LockAcquired` and `LockReleased` are
    /// events of their own (see [`LockWriter::publish`]); without it, all go through the recorder.
    pub reporter: Option<kube::runtime::events::Reporter>,
}

impl Default for EffectsConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            min_interval: Duration::from_millis(250),
            max_pending: 4096,
            waiter_timeout: Duration::from_secs(40),
            max_waiters_per_lock: 64,
            reporter: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    namespace: String,
    lock_id: String,
}

enum Change {
    Held { record: Box<LockRecord>, pod: Option<Arc<Pod>> },
    Released,
}

struct Pending {
    source: Arc<LockSource>,
    change: Option<Change>,
    grants: u32,
    releases: u32,
    /// Waiter IDs that tried again since the last update (each gets a LockContended event).
    contended: Vec<String>,
    waiters_changed: bool,
}

#[derive(Clone)]
struct WaiterState {
    who: Option<String>,
    operation: Option<String>,
    pod: Option<Arc<Pod>>,
    first: Timestamp,
    last: Timestamp,
    since: Instant,
    seen: Instant,
    attempts: u32,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<Key, Pending>,
    queue: BinaryHeap<Reverse<(Instant, u64, Key)>>,
    queued: HashSet<Key>,
    busy: HashSet<Key>,
    last_update: HashMap<Key, Instant>,
    waiters: HashMap<Key, BTreeMap<String, WaiterState>>,
    seq: u64,
    closed: bool,
}

/// The coalescing queue of StateLock updates and the waiter table.
pub struct Effects {
    client: Client,
    writer: LockWriter,
    caches: Caches,
    metrics: GatewayMetrics,
    locks: LockMetrics,
    config: EffectsConfig,
    inner: Mutex<Inner>,
    wake: Notify,
}

fn key_of(source: &LockSource, lock_id: &str) -> Key {
    Key { namespace: source.namespace().unwrap_or_default(), lock_id: lock_id.to_owned() }
}

impl Effects {
    pub fn new(client: Client, recorder: Recorder, caches: Caches, metrics: &Metrics, config: EffectsConfig) -> Arc<Self> {
        Arc::new(Self {
            writer: match config.reporter.clone() {
                Some(reporter) => LockWriter::new(client.clone(), recorder, Writer::Gateway).with_reporter(reporter),
                None => LockWriter::new(client.clone(), recorder, Writer::Gateway),
            },
            client,
            caches,
            metrics: metrics.gateway.clone(),
            locks: metrics.locks.clone(),
            config,
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent before anything can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pending entry for `key`, unless the queue is full.
    fn pending<'a>(&self, inner: &'a mut Inner, key: &Key, source: &Arc<LockSource>) -> Option<&'a mut Pending> {
        if !inner.pending.contains_key(key) && inner.pending.len() >= self.config.max_pending {
            self.metrics.effects_dropped.inc();
            return None;
        }
        let p = inner.pending.entry(key.clone()).or_insert_with(|| Pending {
            source: source.clone(),
            change: None,
            grants: 0,
            releases: 0,
            contended: Vec::new(),
            waiters_changed: false,
        });
        p.source = source.clone();
        Some(p)
    }

    fn schedule(&self, inner: &mut Inner, key: Key) {
        if inner.busy.contains(&key) || inner.queued.contains(&key) {
            return; // a worker picks it up when the update in flight is done
        }
        let now = Instant::now();
        let due = inner.last_update.get(&key).map_or(now, |t| (*t + self.config.min_interval).max(now));
        inner.seq += 1;
        let seq = inner.seq;
        inner.queued.insert(key.clone());
        inner.queue.push(Reverse((due, seq, key)));
        self.metrics.effects_queued.set(inner.pending.len() as i64);
        self.wake.notify_one();
    }

    fn set_waiter_gauge(&self, inner: &Inner) {
        self.metrics.waiters.set(inner.waiters.values().map(|w| w.len() as i64).sum());
    }

    /// A lock was granted to `record` (called by `pod`, when known).
    pub fn granted(&self, source: &Arc<LockSource>, record: LockRecord, pod: Option<Arc<Pod>>) {
        let key = key_of(source, &record.lock_id);
        let mut inner = self.lock();
        let acquired = record.info.id.as_deref().and_then(|id| inner.waiters.get_mut(&key).and_then(|w| w.remove(id)));
        if let Some(w) = &acquired {
            self.metrics
                .wait_duration
                .get_or_create(&WaitLabels { outcome: WaitOutcome::acquired })
                .observe(w.since.elapsed().as_secs_f64());
            if inner.waiters.get(&key).is_some_and(BTreeMap::is_empty) {
                inner.waiters.remove(&key);
            }
            self.set_waiter_gauge(&inner);
        }
        let Some(p) = self.pending(&mut inner, &key, source) else { return };
        p.change = Some(Change::Held { record: Box::new(record), pod });
        p.grants += 1;
        p.waiters_changed |= acquired.is_some();
        self.schedule(&mut inner, key);
    }

    /// `waiter` was refused the lock it asked for: someone else holds it.
    pub fn contended(&self, source: &Arc<LockSource>, waiter: &LockRecord, pod: Option<Arc<Pod>>) {
        let Some(id) = waiter.info.id.clone() else { return };
        let key = key_of(source, &waiter.lock_id);
        let now = Instant::now();
        let mut inner = self.lock();
        let list = inner.waiters.entry(key.clone()).or_default();
        let is_new = !list.contains_key(&id);
        if is_new && list.len() >= self.config.max_waiters_per_lock {
            return;
        }
        let w = list.entry(id.clone()).or_insert_with(|| WaiterState {
            who: waiter.info.who.clone(),
            operation: waiter.info.operation.clone(),
            pod: None,
            first: Timestamp::now(),
            last: Timestamp::now(),
            since: now,
            seen: now,
            attempts: 0,
        });
        w.attempts += 1;
        w.last = Timestamp::now();
        w.seen = now;
        if pod.is_some() {
            w.pod = pod;
        }
        self.set_waiter_gauge(&inner);
        let Some(p) = self.pending(&mut inner, &key, source) else { return };
        if !p.contended.contains(&id) {
            p.contended.push(id);
        }
        p.waiters_changed = true;
        self.schedule(&mut inner, key);
    }

    /// The lock `lock_id` was released (DeleteItem).
    pub fn released(&self, source: &Arc<LockSource>, lock_id: &str) {
        let key = key_of(source, lock_id);
        let mut inner = self.lock();
        let Some(p) = self.pending(&mut inner, &key, source) else { return };
        p.change = Some(Change::Released);
        p.releases += 1;
        self.schedule(&mut inner, key);
    }

    /// Forget waiters that stopped retrying; returns how many gave up.
    fn sweep(&self) -> usize {
        let mut inner = self.lock();
        let timeout = self.config.waiter_timeout;
        let mut gone: Vec<(Key, Duration)> = Vec::new();
        inner.waiters.retain(|key, list| {
            list.retain(|_, w| {
                let alive = w.seen.elapsed() < timeout;
                if !alive {
                    gone.push((key.clone(), w.seen.duration_since(w.since)));
                }
                alive
            });
            !list.is_empty()
        });
        let min = self.config.min_interval;
        inner.last_update.retain(|_, t| t.elapsed() < min);
        for (key, waited) in &gone {
            // It waited from its first attempt until its last.
            self.metrics.wait_duration.get_or_create(&WaitLabels { outcome: WaitOutcome::gave_up }).observe(waited.as_secs_f64());
            let source = inner
                .pending
                .get(key)
                .map(|p| p.source.clone())
                .or_else(|| self.caches.sources.state().into_iter().find(|s| s.namespace().as_deref() == Some(key.namespace.as_str())));
            if let Some(source) = source
                && let Some(p) = self.pending(&mut inner, key, &source)
            {
                p.waiters_changed = true;
                self.schedule(&mut inner, key.clone());
            }
        }
        self.set_waiter_gauge(&inner);
        gone.len()
    }

    /// Run the workers and the waiter sweep until [`Effects::close`], then apply what is still
    /// queued (without waiting out `min_interval`) and return.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let sweeper = {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval((me.config.waiter_timeout / 8).max(Duration::from_millis(100)));
                loop {
                    tokio::select! {
                        _ = tick.tick() => { me.sweep(); }
                        () = shutdown.cancelled() => return,
                    }
                }
            })
        };
        let workers: Vec<_> = (0..self.config.workers.max(1)).map(|_| tokio::spawn(self.clone().worker())).collect();
        for w in workers {
            let _ = w.await;
        }
        sweeper.abort();
    }

    /// Stop taking new work once the queue is empty; queued updates are applied at once.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_waiters();
    }

    async fn worker(self: Arc<Self>) {
        loop {
            let notified = self.wake.notified();
            let next = {
                let mut inner = self.lock();
                match inner.queue.peek() {
                    Some(Reverse((due, _, _))) if *due <= Instant::now() || inner.closed => {
                        let Some(Reverse((_, _, key))) = inner.queue.pop() else { continue };
                        inner.queued.remove(&key);
                        let pending = inner.pending.remove(&key);
                        let waiters = inner.waiters.get(&key).cloned().unwrap_or_default();
                        if pending.is_some() {
                            inner.busy.insert(key.clone());
                        }
                        self.metrics.effects_queued.set(inner.pending.len() as i64);
                        Ok(pending.map(|p| (key, p, waiters)))
                    }
                    Some(Reverse((due, _, _))) => Err(Some(*due)),
                    None if inner.closed => return,
                    None => Err(None),
                }
            };
            match next {
                Ok(Some((key, pending, waiters))) => {
                    if let Err(e) = self.apply(&key, pending, &waiters).await {
                        self.metrics.effects_failed.inc();
                        warn!(error = %e, lock_id = %key.lock_id, "gateway failed to update the StateLock; the mirror will catch up");
                    }
                    let mut inner = self.lock();
                    inner.busy.remove(&key);
                    inner.last_update.insert(key.clone(), Instant::now());
                    if inner.pending.contains_key(&key) {
                        self.schedule(&mut inner, key);
                    }
                }
                Ok(None) => {}
                Err(due) => {
                    tokio::select! {
                        () = notified => {}
                        () = async { match due { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {}
                    }
                }
            }
        }
    }

    /// Apply one lock's coalesced changes.
    async fn apply(&self, key: &Key, p: Pending, waiters: &BTreeMap<String, WaiterState>) -> Result<(), kube::Error> {
        let api: Api<StateLock> = Api::namespaced(self.client.clone(), &key.namespace);
        let name = state_lock_name(&key.lock_id);
        debug!(lock_id = %key.lock_id, grants = p.grants, releases = p.releases, waiters = waiters.len(), "applying gateway effects");
        let lock = match &p.change {
            Some(Change::Held { record, pod }) => Some(self.record_holder(&name, &p.source, record, pod.as_deref(), p.grants).await?),
            _ => api.get_opt(&name).await?.filter(|l| l.spec.lock_id == key.lock_id),
        };
        if p.waiters_changed || !p.contended.is_empty() {
            self.record_waiters(&name, &p, lock.as_ref(), waiters).await?;
        }
        if let (Some(Change::Released), Some(lock)) = (&p.change, &lock) {
            self.remove_lock(lock, p.releases).await?;
        }
        Ok(())
    }

    async fn record_holder(
        &self,
        name: &str,
        source: &LockSource,
        record: &LockRecord,
        pod: Option<&Pod>,
        grants: u32,
    ) -> Result<StateLock, kube::Error> {
        // The gateway sees the DynamoDB part; a client of a LockSource with lock files too takes
        // its lock file first (the mirror corrects this hint when that is not so).
        let mut spec = spec_for(&source.name_any(), record);
        spec.stored_in = if source.spec.s3.is_some() { vec![StoreKind::S3, StoreKind::DynamoDB] } else { vec![StoreKind::DynamoDB] };
        let mut obj = self.writer.apply_spec(source, name, &spec).await?;
        // The caller was identified from the pod cache, which may lag (a deleted pod's address
        // given to its successor): record it only if a direct read shows the same pod, running.
        let confirmed = match pod {
            Some(p) => {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
                match api.get_opt(&p.name_any()).await {
                    Ok(Some(now)) => {
                        let running = now.metadata.deletion_timestamp.is_none()
                            && now.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                        (now.uid() == p.uid() && running).then_some(p)
                    }
                    Ok(None) | Err(_) => None,
                }
            }
            None => None,
        };
        if pod.is_some() && confirmed.is_none() {
            warn!(lock_id = %record.lock_id, "the gateway's caller could not be confirmed by a direct read; not recorded as the holder");
        }
        if let (Some(p), Some(lock_id)) = (confirmed, record.info.id.as_deref()) {
            let holder = json!({"namespace": p.namespace(), "pod": p.name_any(), "uid": p.uid(), "lockId": lock_id, "source": source.name_any(), "infoSha256": record.info_sha256, "seenAt": Timestamp::now().to_string()});
            let ns = source.namespace().unwrap_or_default();
            obj = self.writer.apply_status(&ns, name, reasons::GATEWAY_MANAGER, json!({"gatewayHolder": holder})).await?;
        }
        let who = record.info.who.as_deref().unwrap_or("unknown");
        let earlier = match grants {
            0 | 1 => String::new(),
            n => format!(" (after {} earlier grants since the last update)", n - 1),
        };
        let note = format!(
            "{who} took the lock on {} for {} through the gateway{earlier}",
            record.lock_id,
            record.info.operation.as_deref().unwrap_or("?")
        );
        self.publish(&obj, reasons::LOCK_ACQUIRED, false, &note, None).await;
        Ok(obj)
    }

    async fn record_waiters(
        &self,
        name: &str,
        p: &Pending,
        lock: Option<&StateLock>,
        waiters: &BTreeMap<String, WaiterState>,
    ) -> Result<(), kube::Error> {
        let Some(lock) = lock else {
            // Not mirrored yet (held since before the gateway started): tell the waiting pods.
            for w in p.contended.iter().filter_map(|id| waiters.get(id)) {
                if let Some(pod) = self.waiter_pod(&p.source, w) {
                    let note = format!(
                        "{} waits for lock {name} (held by a client the gateway has not seen)",
                        w.who.as_deref().unwrap_or("unknown")
                    );
                    self.publish_on(&pod.object_ref(&()), reasons::LOCK_CONTENDED, true, &note).await;
                }
            }
            return Ok(());
        };
        let listed: Vec<Value> = waiters
            .iter()
            .map(|(id, w)| {
                let pod = self.waiter_pod(&p.source, w);
                json!({
                    "id": id, "who": w.who, "operation": w.operation,
                    "namespace": pod.as_ref().and_then(|p| p.namespace()), "pod": pod.as_ref().map(|p| p.name_any()),
                    "firstAttempt": w.first.to_string(), "lastAttempt": w.last.to_string(), "attempts": w.attempts,
                })
            })
            .map(|mut v| {
                if let Some(m) = v.as_object_mut() {
                    m.retain(|_, v| !v.is_null());
                }
                v
            })
            .collect();
        let status = json!({"contention": {"waiterCount": listed.len(), "waiters": listed}});
        self.writer.apply_status(&p.source.namespace().unwrap_or_default(), name, reasons::GATEWAY_WAITERS_MANAGER, status).await?;
        let info = &lock.spec.lock_info;
        let holder_pod = lock
            .status
            .as_ref()
            .and_then(|s| s.gateway_holder.as_ref().map(|g| g.pod.clone()).or_else(|| s.holder.as_ref().and_then(|h| h.pod.clone())))
            .map(|p| format!(" (pod {p})"))
            .unwrap_or_default();
        for (id, w) in p.contended.iter().filter_map(|id| waiters.get(id).map(|w| (id, w))) {
            let pod = self.waiter_pod(&p.source, w);
            let waiter_pod =
                pod.as_ref().map(|p| format!(" (pod {}/{})", p.namespace().unwrap_or_default(), p.name_any())).unwrap_or_default();
            let note = format!(
                "{}{waiter_pod} waits to {} {}: held by {}{holder_pod} for {} since {} (waiter lock ID {id})",
                w.who.as_deref().unwrap_or("unknown"),
                w.operation.as_deref().unwrap_or("use"),
                lock.spec.lock_id,
                info.who.as_deref().unwrap_or("unknown"),
                info.operation.as_deref().unwrap_or("?"),
                info.created.as_deref().unwrap_or("?")
            );
            self.publish(lock, reasons::LOCK_CONTENDED, true, &note, pod.as_deref()).await;
        }
        Ok(())
    }

    /// The waiting pod: by source address, else by the host part of its `Who` among the
    /// namespaces its lock's holders may live in.
    fn waiter_pod(&self, source: &LockSource, w: &WaiterState) -> Option<Arc<Pod>> {
        if let Some(p) = &w.pod {
            return Some(p.clone());
        }
        let host = w.who.as_deref().and_then(|who| split_who(who).1)?;
        self.caches.pod_by_hostname(host, &source.spec.holders.resolved_namespaces(&source.namespace().unwrap_or_default()))
    }

    async fn remove_lock(&self, lock: &StateLock, releases: u32) -> Result<(), kube::Error> {
        let held = lock
            .spec
            .lock_info
            .created
            .as_deref()
            .and_then(parse_created)
            .map(|c| ((Timestamp::now().as_nanosecond() - c) / 1_000_000_000) as i64);
        if let Some(h) = held.filter(|h| *h >= 0) {
            self.locks.hold_duration.observe(h as f64);
        }
        let earlier = match releases {
            0 | 1 => String::new(),
            n => format!("; {} earlier releases since the last update", n - 1),
        };
        let note = format!(
            "lock on {} released after {} (through the gateway{earlier})",
            lock.spec.lock_id,
            held.map(human).unwrap_or_else(|| "an unknown time".into())
        );
        self.publish(lock, reasons::LOCK_RELEASED, false, &note, None).await;
        match lock.uid() {
            Some(uid) => self.writer.delete(&lock.namespace().unwrap_or_default(), &lock.name_any(), &uid).await,
            None => Ok(()),
        }
    }

    async fn publish(&self, lock: &StateLock, reason: &str, warning: bool, note: &str, pod: Option<&Pod>) {
        self.writer.publish(lock, reason, warning, note, pod.map(|p| p.object_ref(&()))).await;
    }

    async fn publish_on(&self, regarding: &k8s_openapi::api::core::v1::ObjectReference, reason: &str, warning: bool, note: &str) {
        self.writer.publish_on(regarding, reason, warning, note).await;
    }
}
