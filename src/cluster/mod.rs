//! The operator's one view of the cluster, started in one place and read by the mirror, the
//! expiry controller and the gateway: one LockSource reflector, one StateLock reflector and one
//! Pod cache ([`pods`]). A replica holds each kind once, without `managedFields` (and pods with
//! only the fields the decisions read), and one set of AWS SDK clients per LockSource ([`aws`]).
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

/// How many StateLock resource versions are remembered as seen (see [`Cluster::lock_version_seen`]).
const RECENT_VERSIONS: usize = 16_384;

/// The StateLock watch as a stream of changed StateLocks. Whoever drives it (the expiry
/// controller) keeps [`Cluster::locks`] current.
pub type LockTriggers = BoxStream<'static, Result<StateLock, watcher::Error>>;

/// The shared caches.
pub struct Cluster {
    /// One set of SDK clients per LockSource.
    pub aws: Arc<aws::SourceClients>,
    pub pods: Arc<PodCache>,
    pub sources: Store<LockSource>,
    pub locks: Store<StateLock>,
    /// Counts LockSource changes once the first list is in the store; 0 before.
    source_changes: watch::Receiver<u64>,
    locks_synced: watch::Receiver<bool>,
    versions: Arc<Versions>,
    /// Lock tables written through the gateway: the mirror polls their streams at once.
    pub nudges: TableNudges,
}

/// A signal per LockSource that the gateway wrote to its table (forwarded a lock or unlock): a
/// hint to read the table's stream now, never a fact about the table. Keyed by the LockSource the
/// gateway served, so that nobody's traffic makes another tenant's mirror poll.
#[derive(Default)]
pub struct TableNudges {
    sources: Mutex<HashMap<(String, String), watch::Sender<u64>>>,
}

impl TableNudges {
    /// Follow nudges of the LockSource `namespace/name`.
    pub fn subscribe(&self, namespace: &str, name: &str) -> watch::Receiver<u64> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        sources.retain(|_, tx| tx.receiver_count() > 0);
        sources.entry((namespace.to_owned(), name.to_owned())).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// The gateway wrote to the table of `namespace/name`; nothing happens when nobody follows it.
    pub fn nudge(&self, namespace: &str, name: &str) {
        let sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = sources.get(&(namespace.to_owned(), name.to_owned())) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

struct Versions {
    recent: Mutex<(VecDeque<String>, HashSet<String>)>,
    /// True once the first list is in the store. (Not `Store::wait_until_ready`: it wakes only
    /// the latest of several waiters, and the Controller waits on the same store.)
    listed: watch::Sender<bool>,
    /// Lists started and completed (one at a time, in order).
    lists_started: AtomicU64,
    lists_done: AtomicU64,
}

impl Versions {
    fn observe(&self, event: &watcher::Event<StateLock>) {
        match event {
            watcher::Event::Apply(l) | watcher::Event::InitApply(l) | watcher::Event::Delete(l) => {
                let Some(rv) = l.resource_version() else { return };
                let mut guard = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
                let (order, set) = &mut *guard;
                if set.insert(rv.clone()) {
                    order.push_back(rv);
                    if order.len() > RECENT_VERSIONS
                        && let Some(old) = order.pop_front()
                    {
                        set.remove(&old);
                    }
                }
            }
            watcher::Event::InitDone => {
                self.lists_done.fetch_add(1, Ordering::SeqCst);
                self.listed.send_if_modified(|l| !std::mem::replace(l, true));
            }
            watcher::Event::Init => {
                self.lists_started.fetch_add(1, Ordering::SeqCst);
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
        let versions = Arc::new(Versions {
            recent: Mutex::default(),
            listed: synced_tx,
            lists_started: AtomicU64::new(0),
            lists_done: AtomicU64::new(0),
        });
        let observed = versions.clone();
        let lock_triggers = reflector::reflector(
            lock_writer,
            watcher(Api::<StateLock>::all(client.clone()), watcher::Config::default()).modify(drop_managed_fields).default_backoff(),
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

    /// Whether the StateLock cache has seen the change that produced resource version `rv`.
    /// (Only a recent window is remembered: see [`Self::lock_listed_since`] for the rest.)
    pub fn lock_version_seen(&self, rv: &str) -> bool {
        self.versions.recent.lock().unwrap_or_else(PoisonError::into_inner).1.contains(rv)
    }

    /// A mark to take right after a write: once [`Self::lock_listed_since`] says so, a list that
    /// started after the write has completed, and the cache holds the write (or what came after).
    pub fn lock_list_mark(&self) -> u64 {
        self.versions.lists_started.load(Ordering::SeqCst)
    }

    /// Whether a list started after `mark` was taken has completed.
    pub fn lock_listed_since(&self, mark: u64) -> bool {
        self.versions.lists_done.load(Ordering::SeqCst) > mark
    }
}

fn drop_managed_fields<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}
