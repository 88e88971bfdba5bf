//! The one Pod cache of a replica.
//!
//! It holds only the pods the decisions may concern and only the fields they read:
//! - **Scope**: the namespaces that the LockSources (those the tenancy policy serves) name as
//!   holder namespaces, their own namespaces and their gateways' `allowedNamespaces`; every
//!   namespace when one of them asks for `*` or admits callers by address
//!   (`allowedSourceRanges`: only a cluster-wide view tells a pod from a caller outside the pod
//!   network). One watch per namespace, or one cluster-wide watch.
//! - **Fields**: name, namespace, UID, creation and deletion times, the
//!   `statelock.dev/holder-container` annotation, the hostname fields, host network, phase,
//!   addresses and each container's name, restart count and start time.
//!
//! Every change is stored before it is announced to subscribers, so a reconcile triggered by a pod
//! event sees that event in the cache. The cache is *complete* only while every watch of the
//! current scope has finished its initial list; until then the judge decides nothing from it and
//! the gateway identifies no caller as "not a pod".

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, PoisonError, RwLock},
};

use futures::{StreamExt, pin_mut};
use k8s_openapi::{
    api::core::v1::{ContainerState, ContainerStatus, Pod, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    crd::{LockSource, is_namespace_name},
    expiry::holder_liveness::{ContainerFacts, HOLDER_CONTAINER_ANNOTATION, HolderNamespaces, HostnameSpec, PodFacts},
};

/// How many pod changes a slow subscriber may fall behind before it is told it lagged.
const ANNOUNCE_CAPACITY: usize = 4096;

/// Which pods the cache holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodScope {
    All,
    Namespaces(BTreeSet<String>),
}

impl PodScope {
    /// The scope the LockSources that are served need.
    pub fn of<'a>(sources: impl IntoIterator<Item = &'a LockSource>) -> Self {
        let mut namespaces = BTreeSet::new();
        for s in sources {
            let own = s.namespace().unwrap_or_default();
            if !s.spec.gateway.allowed_source_ranges.is_empty() {
                return Self::All;
            }
            match s.spec.holders.resolved_namespaces(&own) {
                HolderNamespaces::All => return Self::All,
                HolderNamespaces::Only(list) => namespaces.extend(list),
            }
            namespaces.extend(s.spec.gateway.allowed_namespaces.iter().flatten().cloned());
            namespaces.insert(own);
        }
        // Names become parts of API paths: only real namespace names (served LockSources have
        // none other; this holds whatever `served` says).
        namespaces.retain(|n| is_namespace_name(n));
        Self::Namespaces(namespaces)
    }

    fn watches(&self) -> Vec<WatchKey> {
        match self {
            Self::All => vec![WatchKey::All],
            Self::Namespaces(set) => set.iter().cloned().map(WatchKey::Namespace).collect(),
        }
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::All => "every namespace".into(),
            Self::Namespaces(set) if set.is_empty() => "no namespace".into(),
            Self::Namespaces(set) => set.iter().cloned().collect::<Vec<_>>().join(","),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum WatchKey {
    All,
    Namespace(String),
}

impl WatchKey {
    /// A watch of one namespace stores pods of that namespace only.
    fn holds(&self, pod: &Pod) -> bool {
        match self {
            Self::All => true,
            Self::Namespace(ns) => pod.metadata.namespace.as_deref() == Some(ns.as_str()),
        }
    }
}

struct Watch {
    generation: u64,
    listed: bool,
    /// A (re-)list in progress; it replaces the watch's pods once complete.
    building: Option<Vec<Arc<Pod>>>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    scope: Option<PodScope>,
    watches: HashMap<WatchKey, Watch>,
    next_generation: u64,
    by_namespace: HashMap<String, HashMap<String, Arc<Pod>>>,
    by_ip: HashMap<IpAddr, HashSet<(String, String)>>,
}

impl State {
    fn unindex(&mut self, pod: &Pod) {
        let key = (pod.namespace().unwrap_or_default(), pod.name_any());
        for ip in pod_ips(pod) {
            if let Some(set) = self.by_ip.get_mut(&ip) {
                set.remove(&key);
                if set.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    fn insert(&mut self, pod: Arc<Pod>) {
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        if let Some(old) = self.by_namespace.entry(ns.clone()).or_default().insert(name.clone(), pod.clone()) {
            self.unindex(&old);
        }
        for ip in pod_ips(&pod) {
            self.by_ip.entry(ip).or_default().insert((ns.clone(), name.clone()));
        }
    }

    fn remove(&mut self, ns: &str, name: &str) -> Option<Arc<Pod>> {
        let pods = self.by_namespace.get_mut(ns)?;
        let old = pods.remove(name)?;
        if pods.is_empty() {
            self.by_namespace.remove(ns);
        }
        self.unindex(&old);
        Some(old)
    }

    /// Drop the pods a watch held; returns them.
    fn drop_watched(&mut self, key: &WatchKey) -> Vec<Arc<Pod>> {
        let gone: Vec<Arc<Pod>> = match key {
            WatchKey::All => self.by_namespace.drain().flat_map(|(_, pods)| pods.into_values()).collect(),
            WatchKey::Namespace(ns) => self.by_namespace.remove(ns).map(|p| p.into_values().collect()).unwrap_or_default(),
        };
        if matches!(key, WatchKey::All) {
            self.by_ip.clear();
        } else {
            for p in &gone {
                self.unindex(p);
            }
        }
        gone
    }

    fn complete(&self) -> bool {
        self.scope.is_some() && self.watches.values().all(|w| w.listed)
    }
}

/// The pods the operator's decisions may concern (see the module documentation).
pub struct PodCache {
    state: RwLock<State>,
    announce: broadcast::Sender<Arc<Pod>>,
    complete: watch::Sender<bool>,
}

impl Default for PodCache {
    fn default() -> Self {
        Self { state: RwLock::default(), announce: broadcast::channel(ANNOUNCE_CAPACITY).0, complete: watch::channel(false).0 }
    }
}

impl PodCache {
    /// The pod `namespace/name`, as last seen.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.read().by_namespace.get(namespace).and_then(|pods| pods.get(name)).cloned()
    }

    /// The pods of `namespaces` (those the scope covers).
    pub fn in_namespaces(&self, namespaces: &HolderNamespaces) -> Vec<Arc<Pod>> {
        let state = self.read();
        match namespaces {
            HolderNamespaces::All => state.by_namespace.values().flat_map(|p| p.values().cloned()).collect(),
            HolderNamespaces::Only(list) => {
                list.iter().filter_map(|ns| state.by_namespace.get(ns)).flat_map(|p| p.values().cloned()).collect()
            }
        }
    }

    /// The pods that have `ip` among their addresses.
    pub fn with_ip(&self, ip: IpAddr) -> Vec<Arc<Pod>> {
        let state = self.read();
        let Some(keys) = state.by_ip.get(&ip) else { return Vec::new() };
        keys.iter().filter_map(|(ns, name)| state.by_namespace.get(ns).and_then(|p| p.get(name)).cloned()).collect()
    }

    /// Whether the scope is every namespace.
    pub fn covers_all(&self) -> bool {
        self.read().scope == Some(PodScope::All)
    }

    /// How many pods are held.
    pub fn len(&self) -> usize {
        self.read().by_namespace.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every watch of the current scope has listed its pods.
    pub fn is_complete(&self) -> bool {
        *self.complete.borrow()
    }

    /// Wait until the cache is complete.
    pub async fn wait_complete(&self) {
        let _ = self.complete.subscribe().wait_for(|c| *c).await;
    }

    /// Every pod that changed (or went), after the change is stored. A relist announces every pod
    /// it listed and every pod it found gone.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Pod>> {
        self.announce.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Apply one event of the watch `key` (ignored once that watch was replaced or stopped).
    fn apply(&self, key: &WatchKey, generation: u64, event: watcher::Event<Pod>) {
        let mut touched: Vec<Arc<Pod>> = Vec::new();
        let complete;
        {
            let mut state = self.write();
            let Some(w) = state.watches.get_mut(key).filter(|w| w.generation == generation) else { return };
            match event {
                watcher::Event::Init => w.building = Some(Vec::new()),
                watcher::Event::InitApply(p) if key.holds(&p) => w.building.get_or_insert_with(Vec::new).push(Arc::new(trim(p))),
                watcher::Event::InitApply(_) => {}
                watcher::Event::InitDone => {
                    let listed = w.building.take().unwrap_or_default();
                    w.listed = true;
                    let old = state.drop_watched(key);
                    let now: HashSet<(String, String)> = listed.iter().map(|p| (p.namespace().unwrap_or_default(), p.name_any())).collect();
                    touched.extend(old.into_iter().filter(|p| !now.contains(&(p.namespace().unwrap_or_default(), p.name_any()))));
                    for p in listed {
                        state.insert(p.clone());
                        touched.push(p);
                    }
                }
                watcher::Event::Apply(p) if key.holds(&p) => {
                    let p = Arc::new(trim(p));
                    state.insert(p.clone());
                    touched.push(p);
                }
                watcher::Event::Apply(_) => {}
                watcher::Event::Delete(p) => {
                    let p = Arc::new(trim(p));
                    state.remove(&p.namespace().unwrap_or_default(), &p.name_any());
                    touched.push(p);
                }
            }
            complete = state.complete();
        }
        self.complete.send_if_modified(|c| std::mem::replace(c, complete) != complete);
        for p in touched {
            let _ = self.announce.send(p);
        }
    }

    /// Move to `scope`: stop the watches it no longer needs (dropping their pods), start the new
    /// ones. A move between every namespace and some starts over.
    fn set_scope(self: &Arc<Self>, client: &Client, scope: PodScope) {
        for (key, generation, cancel) in self.rescope(scope) {
            let api: Api<Pod> = match &key {
                WatchKey::All => Api::all(client.clone()),
                WatchKey::Namespace(ns) => Api::namespaced(client.clone(), ns),
            };
            tokio::spawn(watch_pods(self.clone(), api, key, generation, cancel));
        }
    }

    /// The bookkeeping of [`Self::set_scope`]; returns the watches to start.
    fn rescope(&self, scope: PodScope) -> Vec<(WatchKey, u64, CancellationToken)> {
        let mut start = Vec::new();
        let complete;
        {
            let mut state = self.write();
            if state.scope.as_ref() == Some(&scope) {
                return start;
            }
            info!(scope = %scope.describe(), "pod cache scope");
            let wanted = scope.watches();
            let stale: Vec<WatchKey> = state.watches.keys().filter(|k| !wanted.contains(k)).cloned().collect();
            for k in stale {
                if let Some(w) = state.watches.remove(&k) {
                    w.cancel.cancel();
                }
                state.drop_watched(&k);
            }
            for k in wanted {
                if state.watches.contains_key(&k) {
                    continue;
                }
                state.next_generation += 1;
                let generation = state.next_generation;
                let cancel = CancellationToken::new();
                state.watches.insert(k.clone(), Watch { generation, listed: false, building: None, cancel: cancel.clone() });
                start.push((k, generation, cancel));
            }
            state.scope = Some(scope);
            complete = state.complete();
        }
        self.complete.send_if_modified(|c| std::mem::replace(c, complete) != complete);
        start
    }

    fn stop(&self) {
        let mut state = self.write();
        for (_, w) in state.watches.drain() {
            w.cancel.cancel();
        }
    }
}

async fn watch_pods(cache: Arc<PodCache>, api: Api<Pod>, key: WatchKey, generation: u64, cancel: CancellationToken) {
    let events = watcher(api, watcher::Config::default()).default_backoff();
    pin_mut!(events);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            event = events.next() => match event {
                Some(Ok(e)) => cache.apply(&key, generation, e),
                Some(Err(e)) => warn!(error = %e, scope = ?key, "pod watch failed; retrying"),
                None => return,
            },
        }
    }
}

/// Keep the cache's scope in step with the LockSources until `shutdown`. `served` says which
/// LockSources the operator serves (the others widen nothing).
pub async fn follow_sources(
    cache: Arc<PodCache>,
    client: Client,
    sources: kube::runtime::reflector::Store<LockSource>,
    mut changes: watch::Receiver<u64>,
    served: impl Fn(&LockSource) -> bool + Send + 'static,
    shutdown: CancellationToken,
) {
    loop {
        // `changes` counts LockSource events; 0 means "not listed yet".
        if *changes.borrow_and_update() > 0 {
            let list = sources.state();
            cache.set_scope(&client, PodScope::of(list.iter().map(|s| &**s).filter(|s| served(s))));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            () = shutdown.cancelled() => break,
        }
    }
    cache.stop();
}

/// The facts about a pod the judge needs.
pub fn pod_facts(p: &Pod) -> PodFacts {
    let status = p.status.as_ref();
    let spec = p.spec.as_ref();
    let ts = |t: &Time| t.0.as_nanosecond();
    PodFacts {
        host: HostnameSpec {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            hostname: spec.and_then(|s| s.hostname.clone()).filter(|h| !h.is_empty()),
            subdomain: spec.and_then(|s| s.subdomain.clone()).filter(|h| !h.is_empty()),
            set_hostname_as_fqdn: spec.and_then(|s| s.set_hostname_as_fqdn).unwrap_or(false),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        },
        uid: p.uid().unwrap_or_default(),
        created: p.metadata.creation_timestamp.as_ref().map_or(0, ts),
        phase: status.and_then(|s| s.phase.clone()),
        terminating: p.metadata.deletion_timestamp.is_some(),
        containers: status
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| ContainerFacts {
                running_since: c.state.and_then(|s| s.running).and_then(|r| r.started_at).map(|t| ts(&t)),
                restart_count: c.restart_count,
                name: c.name,
            })
            .collect(),
        holder_container: p.annotations().get(HOLDER_CONTAINER_ANNOTATION).cloned(),
    }
}

/// The fields of a pod the decisions read; everything else is dropped before it is stored.
pub fn trim(p: Pod) -> Pod {
    let m = p.metadata;
    Pod {
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            // The one annotation the judge reads: which container is the runner.
            annotations: m
                .annotations
                .and_then(|a| a.get_key_value(HOLDER_CONTAINER_ANNOTATION).map(|(k, v)| [(k.clone(), v.clone())].into_iter().collect())),
            ..ObjectMeta::default()
        },
        spec: p.spec.map(|s| PodSpec {
            hostname: s.hostname,
            subdomain: s.subdomain,
            set_hostname_as_fqdn: s.set_hostname_as_fqdn,
            host_network: s.host_network,
            ..PodSpec::default()
        }),
        status: p.status.map(|s| PodStatus {
            phase: s.phase,
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            container_statuses: s.container_statuses.map(|list| {
                list.into_iter()
                    .map(|c| ContainerStatus {
                        name: c.name,
                        restart_count: c.restart_count,
                        state: c.state.map(|st| ContainerState { running: st.running, ..ContainerState::default() }),
                        ..ContainerStatus::default()
                    })
                    .collect()
            }),
            ..PodStatus::default()
        }),
    }
}

/// The addresses in `status.podIPs` and `status.podIP`.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let mut ips: Vec<IpAddr> = status.pod_ips.iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

#[cfg(test)]
mod tests;
