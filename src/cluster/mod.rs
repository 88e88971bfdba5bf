//! The operator's one view of the cluster, started in one place and read by the mirror, the
//! expiry controller and the gateway: one LockSource reflector, one StateLock reflector and one
//! Pod cache ([`pods`]). A replica holds each kind once, without `managedFields` (StateLocks as
//! [`cached_lock`] keeps them, pods with only the fields the decisions read), and one set of AWS
//! SDK clients per LockSource ([`aws`]).
//! Every StateLock write goes through [`writer`].

pub mod aws;
pub mod pods;
pub mod writer;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::{StreamExt, TryStreamExt, pin_mut, stream::BoxStream};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::crd::{LockSource, StateLock};
use pods::PodCache;

/// How many StateLock resource versions are remembered as just seen, for a watch event that
/// outruns its write's response (see [`Cluster::await_lock_write`]).
const RECENT_VERSIONS: usize = 4_096;

/// The StateLock watch as a stream of changed StateLocks. Whoever drives it (the expiry
/// controller) keeps [`Cluster::locks`] current.
pub type LockTriggers = BoxStream<'static, Result<StateLock, watcher::Error>>;

/// The shared caches.
pub struct Cluster {
    /// One set of SDK clients per LockSource.
    pub aws: Arc<aws::SourceClients>,
    pub pods: Arc<PodCache>,
    pub sources: Store<LockSource>,
    /// The StateLocks as [`cached_lock`] keeps them: no `ownerReferences`, and the source label
    /// read only through [`cached_source_label`], never from `labels()`. Never written back.
    pub locks: Store<StateLock>,
    /// Counts LockSource changes once the first list is in the store; 0 before.
    source_changes: watch::Receiver<u64>,
    locks_synced: watch::Receiver<bool>,
    versions: Arc<Versions>,
    /// Lock tables written through the gateway: the mirror polls their streams at once.
    pub nudges: TableNudges,
}

/// A signal per LockSource that the gateway wrote to its table (forwarded a lock or unlock), with
/// the LockIDs it wrote: a hint to read the table's stream now, and to keep reading it for a
/// little while until those items' records appear (a stream record can trail its write), never
/// a fact about the table. Keyed by the LockSource the gateway served, so that nobody's traffic
/// makes another tenant's mirror poll.
#[derive(Default)]
pub struct TableNudges {
    sources: Mutex<HashMap<(String, String), Arc<NudgeChannel>>>,
}

/// LockIDs nudged but not yet taken by the mirror: at most this many are kept (a further one is
/// left to the mirror's regular polls).
const NUDGED_KEYS_KEPT: usize = 256;

struct NudgeChannel {
    wake: watch::Sender<u64>,
    keys: Mutex<Vec<Nudge>>,
}

/// A LockID the gateway wrote, and when it sent the write: no poll that started before then
/// can have read the write's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nudge {
    pub lock_id: String,
    pub sent: std::time::Instant,
}

/// The mirror's end of a LockSource's nudges.
pub struct NudgeReceiver {
    wake: watch::Receiver<u64>,
    channel: Arc<NudgeChannel>,
}

impl NudgeReceiver {
    /// Wait for the next nudge; an error when the nudges' owner is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.wake.changed().await
    }

    /// The LockIDs nudged since the last call (also marks the nudges so far as seen).
    pub fn take(&mut self) -> Vec<Nudge> {
        self.wake.borrow_and_update();
        std::mem::take(&mut *self.channel.keys.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl TableNudges {
    /// Follow nudges of the LockSource `namespace/name`.
    pub fn subscribe(&self, namespace: &str, name: &str) -> NudgeReceiver {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        sources.retain(|_, c| c.wake.receiver_count() > 0);
        let channel = sources
            .entry((namespace.to_owned(), name.to_owned()))
            .or_insert_with(|| Arc::new(NudgeChannel { wake: watch::channel(0).0, keys: Mutex::default() }))
            .clone();
        NudgeReceiver { wake: channel.wake.subscribe(), channel }
    }

    /// The gateway wrote `lock_id` in the table of `namespace/name`, sending the write at `sent`;
    /// nothing happens when nobody follows it. A LockID nudged again keeps its latest `sent`.
    pub fn nudge(&self, namespace: &str, name: &str, lock_id: &str, sent: std::time::Instant) {
        let sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = sources.get(&(namespace.to_owned(), name.to_owned())) {
            {
                let mut keys = c.keys.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(k) = keys.iter_mut().find(|k| k.lock_id == lock_id) {
                    k.sent = k.sent.max(sent);
                } else if keys.len() < NUDGED_KEYS_KEPT {
                    keys.push(Nudge { lock_id: lock_id.to_owned(), sent });
                }
            }
            c.wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

struct Versions {
    seen: Mutex<Seen>,
    /// True once the first list is in the store. (Not `Store::wait_until_ready`: it wakes only
    /// the latest of several waiters, and the Controller waits on the same store.)
    listed: watch::Sender<bool>,
    /// Lists started, and the number of the latest one completed (one list at a time, in order).
    lists_started: AtomicU64,
    lists_done: AtomicU64,
}

/// StateLock resource versions: the latest ones seen, and those awaited by writers.
#[derive(Default)]
struct Seen {
    order: VecDeque<String>,
    recent: HashSet<String>,
    /// Versions that writers wait for (their [`AwaitedWrite`]s): how many wait, and whether the
    /// cache has seen it. Only what is awaited is kept, however long the cache takes.
    awaited: HashMap<String, (usize, bool)>,
    /// The versions of a list in progress: the store shows them only once the list is complete.
    listing: Vec<String>,
}

impl Seen {
    fn arrived(&mut self, rv: String) {
        if let Some((_, arrived)) = self.awaited.get_mut(&rv) {
            *arrived = true;
        }
        if self.recent.insert(rv.clone()) {
            self.order.push_back(rv);
            if self.order.len() > RECENT_VERSIONS
                && let Some(old) = self.order.pop_front()
            {
                self.recent.remove(&old);
            }
        }
    }
}

impl Versions {
    fn observe(&self, event: &watcher::Event<StateLock>) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(l) | watcher::Event::Delete(l) => {
                if let Some(rv) = l.resource_version() {
                    seen.arrived(rv);
                }
            }
            watcher::Event::InitApply(l) => {
                if let Some(rv) = l.resource_version() {
                    seen.listing.push(rv);
                }
            }
            watcher::Event::InitDone => {
                for rv in std::mem::take(&mut seen.listing) {
                    seen.arrived(rv);
                }
                drop(seen);
                // The list that completed is the latest one started (a list cut short by an
                // error is started again, and never completes as such).
                self.lists_done.store(self.lists_started.load(Ordering::SeqCst), Ordering::SeqCst);
                self.listed.send_if_modified(|l| !std::mem::replace(l, true));
            }
            watcher::Event::Init => {
                seen.listing.clear();
                drop(seen);
                self.lists_started.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

impl Versions {
    fn new(listed: watch::Sender<bool>) -> Self {
        Self { seen: Mutex::default(), listed, lists_started: AtomicU64::new(0), lists_done: AtomicU64::new(0) }
    }

    fn await_write(this: &Arc<Self>, written: &StateLock) -> AwaitedWrite {
        let mark = this.lists_started.load(Ordering::SeqCst);
        let rv = written.resource_version();
        if let Some(rv) = &rv {
            let mut seen = this.seen.lock().unwrap_or_else(PoisonError::into_inner);
            let already = seen.recent.contains(rv);
            let entry = seen.awaited.entry(rv.clone()).or_insert((0, false));
            entry.0 += 1;
            entry.1 |= already;
        }
        AwaitedWrite { rv, mark, versions: this.clone() }
    }
}

/// A StateLock write of the caller's own, awaited in the shared cache (see
/// [`Cluster::await_lock_write`]). Dropping it stops the waiting.
pub struct AwaitedWrite {
    rv: Option<String>,
    /// [`Versions::lists_started`] right after the write.
    mark: u64,
    versions: Arc<Versions>,
}

impl AwaitedWrite {
    /// Whether the cache holds the write (or what came after it): it has seen the write's
    /// version, or completed a list that started after the write.
    pub fn seen(&self) -> bool {
        self.versions.lists_done.load(Ordering::SeqCst) > self.mark
            || self.rv.as_ref().is_some_and(|rv| {
                self.versions.seen.lock().unwrap_or_else(PoisonError::into_inner).awaited.get(rv).is_some_and(|(_, arrived)| *arrived)
            })
    }
}

impl Drop for AwaitedWrite {
    fn drop(&mut self) {
        let Some(rv) = &self.rv else { return };
        let mut seen = self.versions.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((waiters, _)) = seen.awaited.get_mut(rv) {
            *waiters -= 1;
            if *waiters == 0 {
                seen.awaited.remove(rv);
            }
        }
    }
}

impl Cluster {
    /// Start the watches. `served` says which LockSources the operator serves: only those widen the
    /// pod cache's scope. The returned stream must be driven (by the expiry controller).
    pub fn start(
        client: &Client,
        served: impl Fn(&LockSource) -> bool + Send + 'static,
        shutdown: &CancellationToken,
    ) -> (Arc<Self>, LockTriggers) {
        let (sources, source_writer) = reflector::store::<LockSource>();
        let (changes_tx, source_changes) = watch::channel(0u64);
        let source_events = reflector::reflector(
            source_writer,
            watcher(Api::<LockSource>::all(client.clone()), watcher::Config::default()).modify(drop_managed_fields).default_backoff(),
        );
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                pin_mut!(source_events);
                let mut listed = false;
                loop {
                    let event = tokio::select! {
                        () = shutdown.cancelled() => break,
                        e = source_events.next() => e,
                    };
                    match event {
                        Some(Ok(e)) => {
                            listed |= matches!(e, watcher::Event::InitDone);
                            if listed {
                                changes_tx.send_modify(|n| *n += 1);
                            }
                        }
                        Some(Err(e)) => warn!(error = %e, "LockSource watch failed; retrying"),
                        None => break,
                    }
                }
            });
        }

        let (locks, lock_writer) = reflector::store::<StateLock>();
        let (synced_tx, locks_synced) = watch::channel(false);
        let versions = Arc::new(Versions::new(synced_tx));
        let observed = versions.clone();
        let lock_triggers = reflector::reflector(
            lock_writer,
            watcher(Api::<StateLock>::all(client.clone()), watcher::Config::default()).modify(cached_lock).default_backoff(),
        )
        .inspect_ok(move |e| observed.observe(e))
        .touched_objects()
        .boxed();

        let pods = Arc::new(PodCache::default());
        tokio::spawn(pods::follow_sources(pods.clone(), client.clone(), sources.clone(), source_changes.clone(), served, shutdown.clone()));
        let aws = Arc::new(aws::SourceClients::default());
        {
            // Clients of LockSources that are gone are dropped.
            let (aws, sources, mut changes, shutdown) = (aws.clone(), sources.clone(), source_changes.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = changes.changed() => if r.is_err() { break },
                        () = shutdown.cancelled() => break,
                    }
                    let live: std::collections::HashSet<(String, String)> =
                        sources.state().iter().map(|s| (s.namespace().unwrap_or_default(), s.name_any())).collect();
                    aws.retain(|ns, name| live.contains(&(ns.to_owned(), name.to_owned())));
                }
            });
        }
        (
            Arc::new(Self { aws, pods, sources, locks, source_changes, locks_synced, versions, nudges: TableNudges::default() }),
            lock_triggers,
        )
    }

    /// Wait until the LockSources were listed.
    pub async fn sources_listed(&self) {
        let _ = self.source_changes.clone().wait_for(|n| *n > 0).await;
    }

    /// Changes of the LockSources: the value moves on after each change is in [`Self::sources`].
    pub fn source_changes(&self) -> watch::Receiver<u64> {
        self.source_changes.clone()
    }

    /// Wait until the StateLocks were listed.
    pub async fn locks_listed(&self) {
        let _ = self.locks_synced.clone().wait_for(|s| *s).await;
    }

    /// Await `written`, a StateLock as a write of the caller's returned it, in the cache. Take it
    /// right after the write: a watch event that came before is found among the latest seen.
    pub fn await_lock_write(&self, written: &StateLock) -> AwaitedWrite {
        Versions::await_write(&self.versions, written)
    }
}

/// What the shared cache keeps of a StateLock (10,000 StateLocks are 10,000 copies of it: 3.7 kB
/// each as the watch delivers them). Nothing writes a cached StateLock back to the API server,
/// and nothing reads what is left out:
/// - `managedFields` and `ownerReferences` go;
/// - labels that are exactly `{statelock.dev/source: <spec.source>}`, which every StateLock the
///   mirror wrote carries, become an empty map: a map of one entry costs a 544-byte tree node.
///   Read a cached StateLock's source label with [`cached_source_label`], never from its labels. Any
///   other labels are kept as they are; absent or empty labels are kept as absent.
pub fn cached_lock(lock: &mut StateLock) {
    drop_managed_fields(lock);
    lock.metadata.owner_references = None;
    let labels = lock.metadata.labels.take().filter(|l| !l.is_empty());
    lock.metadata.labels = match labels {
        Some(l) if l.len() == 1 && l.get(crate::reasons::SOURCE_LABEL) == Some(&lock.spec.source) => Some(Default::default()),
        other => other,
    };
}

/// The `statelock.dev/source` label of a StateLock kept by the shared cache ([`cached_lock`]).
/// Wrong for an object that did not go through it: an empty labels map reads as `spec.source`.
pub(crate) fn cached_source_label(cached: &StateLock) -> Option<&str> {
    match &cached.metadata.labels {
        Some(l) if l.is_empty() => Some(&cached.spec.source),
        Some(l) => l.get(crate::reasons::SOURCE_LABEL).map(String::as_str),
        None => None,
    }
}

fn drop_managed_fields<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nudges reach only their LockSource's follower, carry each LockID once, and are kept up
    /// to NUDGED_KEYS_KEPT (a nudge beyond still wakes the follower).
    #[tokio::test]
    async fn nudges_carry_their_lock_ids_to_their_own_source_only() {
        let t0 = std::time::Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(5);
        let nudges = TableNudges::default();
        nudges.nudge("ns", "src", "before anyone follows", t0);
        let mut mine = nudges.subscribe("ns", "src");
        let mut other = nudges.subscribe("ns", "other");
        nudges.nudge("ns", "src", "a", t0);
        nudges.nudge("ns", "src", "b", t0);
        nudges.nudge("ns", "src", "a", t1);
        mine.changed().await.expect("woken");
        let took: Vec<(String, std::time::Instant)> = mine.take().into_iter().map(|n| (n.lock_id, n.sent)).collect();
        assert_eq!(took, [("a".to_owned(), t1), ("b".to_owned(), t0)], "each LockID once, with its latest write");
        assert!(other.take().is_empty(), "another source's follower hears nothing");
        for i in 0..NUDGED_KEYS_KEPT + 5 {
            nudges.nudge("ns", "src", &format!("k{i}"), t0);
        }
        assert!(mine.wake.has_changed().expect("open"), "woken");
        assert_eq!(mine.take().len(), NUDGED_KEYS_KEPT);
        assert!(!mine.wake.has_changed().expect("open"), "taking marks the nudges seen");
        drop(other);
        let _third = nudges.subscribe("ns", "third");
        let mut followed: Vec<String> = nudges.sources.lock().expect("sources").keys().map(|(_, n)| n.clone()).collect();
        followed.sort();
        assert_eq!(followed, ["src", "third"], "a dropped follower is forgotten at the next subscribe");
    }

    fn at(rv: &str) -> StateLock {
        let mut l = StateLock::new("l", crate::crd::StateLockSpec::default());
        l.metadata.resource_version = Some(rv.into());
        l
    }

    fn awaited(v: &Versions) -> usize {
        v.seen.lock().unwrap_or_else(PoisonError::into_inner).awaited.len()
    }

    #[test]
    fn a_write_is_seen_when_its_version_arrives_before_or_after_and_forgotten_when_dropped() {
        let v = Arc::new(Versions::new(watch::channel(false).0));
        // The watch event came first (it outran the write's response).
        v.observe(&watcher::Event::Apply(at("7")));
        let early = Versions::await_write(&v, &at("7"));
        assert!(early.seen());
        // The event comes after, however many other versions come in between.
        let late = Versions::await_write(&v, &at("8"));
        let again = Versions::await_write(&v, &at("8"));
        for n in 100..100 + 3 * RECENT_VERSIONS {
            v.observe(&watcher::Event::Apply(at(&n.to_string())));
        }
        assert!(!late.seen() && !again.seen());
        v.observe(&watcher::Event::Apply(at("8")));
        assert!(late.seen() && again.seen());
        // Only what is awaited is kept; each waiter lets go of its own.
        assert_eq!(awaited(&v), 2);
        drop(late);
        assert!(again.seen(), "the other waiter of the same version still sees it");
        drop((early, again));
        assert_eq!(awaited(&v), 0);
        assert!(v.seen.lock().unwrap_or_else(PoisonError::into_inner).recent.len() <= RECENT_VERSIONS);
    }

    #[test]
    fn a_list_that_started_after_the_write_shows_it() {
        let v = Arc::new(Versions::new(watch::channel(false).0));
        let w = Versions::await_write(&v, &at("9"));
        v.observe(&watcher::Event::Init);
        v.observe(&watcher::Event::InitApply(at("9")));
        assert!(!w.seen(), "a list in progress shows nothing yet (the store swaps it in when it is complete)");
        // The list is cut short by an error and started again; what it listed is never counted.
        v.observe(&watcher::Event::Init);
        assert!(!w.seen());
        // The list shows a later version (someone else wrote after the write): it is seen all the same.
        v.observe(&watcher::Event::InitApply(at("11")));
        v.observe(&watcher::Event::InitDone);
        assert!(w.seen(), "the relist replaced whatever version the write had");
        // A list that started before a write does not show it; the next one does, even after
        // a list was cut short in between.
        v.observe(&watcher::Event::Init);
        let before = Versions::await_write(&v, &at("12"));
        v.observe(&watcher::Event::InitApply(at("11")));
        v.observe(&watcher::Event::InitDone);
        assert!(!before.seen(), "the list started before the write");
        v.observe(&watcher::Event::Init);
        v.observe(&watcher::Event::Init);
        v.observe(&watcher::Event::InitApply(at("13")));
        v.observe(&watcher::Event::InitDone);
        assert!(before.seen());
        // A write during a list that the list shows is seen once the list is complete.
        v.observe(&watcher::Event::Init);
        let during = Versions::await_write(&v, &at("10"));
        v.observe(&watcher::Event::InitApply(at("10")));
        assert!(!during.seen());
        v.observe(&watcher::Event::InitDone);
        assert!(during.seen());
        // A write without a version (never returned by a real server) is seen only by a list.
        let none = Versions::await_write(&v, &StateLock::new("l", crate::crd::StateLockSpec::default()));
        assert!(!none.seen());
    }

    proptest::proptest! {
        /// Whatever labels a StateLock carries (none, the mirror's, the mirror's plus others, the
        /// source label naming another LockSource, an empty map) and whatever its spec names, the
        /// cached copy answers the source label as the object does, keeps every other label and
        /// drops what nothing reads.
        #[test]
        fn the_cached_copy_keeps_the_source_label_and_every_other_label(
            source in "[a-z]{0,3}",
            label in proptest::option::of("[a-z]{0,3}"),
            others in proptest::collection::btree_map("[a-z./]{1,12}", "[a-z]{0,3}", 0..3),
            labels_present in proptest::bool::ANY,
        ) {
            let mut lock = StateLock::new("l", crate::crd::StateLockSpec { source: source.clone(), ..Default::default() });
            let mut labels = others.clone();
            labels.remove(crate::reasons::SOURCE_LABEL);
            if let Some(l) = &label {
                labels.insert(crate::reasons::SOURCE_LABEL.to_owned(), l.clone());
            }
            lock.metadata.labels = labels_present.then_some(labels.clone());
            lock.metadata.owner_references = Some(vec![Default::default()]);
            lock.metadata.managed_fields = Some(vec![Default::default()]);
            let mut cached = lock.clone();
            cached_lock(&mut cached);
            let want = if labels_present { label.as_deref() } else { None };
            proptest::prop_assert_eq!(cached_source_label(&cached), want);
            proptest::prop_assert_eq!(cached.metadata.owner_references, None);
            proptest::prop_assert_eq!(cached.metadata.managed_fields, None);
            // Every other label is still there, as it was.
            let kept = cached.metadata.labels.clone().unwrap_or_default();
            for (k, v) in labels.iter().filter(|(k, _)| labels_present && k.as_str() != crate::reasons::SOURCE_LABEL) {
                proptest::prop_assert_eq!(kept.get(k), Some(v));
            }
            // The spec and status are untouched.
            proptest::prop_assert_eq!(&cached.spec, &lock.spec);
            proptest::prop_assert_eq!(&cached.status, &lock.status);
        }
    }
}
