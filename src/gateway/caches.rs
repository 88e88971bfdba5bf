//! The gateway's view of the cluster: pods (with an index by pod IP, so identifying a caller does
//! not scan every pod) and LockSources.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, PoisonError, RwLock},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt, reflector,
        reflector::{ObjectRef, Store},
        watcher,
    },
};

use crate::{
    crd::LockSource,
    expiry::{controller::pod_facts, holder_liveness::HolderNamespaces},
};

/// Pods by the IPs in `status.podIPs` (and `status.podIP`).
#[derive(Debug, Default)]
pub struct PodIpIndex {
    inner: RwLock<IndexState>,
}

#[derive(Debug, Default)]
struct IndexState {
    live: Maps,
    /// A re-list in progress: the index it builds replaces `live` once complete.
    building: Option<Maps>,
}

#[derive(Debug, Default)]
struct Maps {
    by_ip: HashMap<IpAddr, HashSet<ObjectRef<Pod>>>,
    ips_of: HashMap<ObjectRef<Pod>, Vec<IpAddr>>,
}

impl Maps {
    fn remove(&mut self, key: &ObjectRef<Pod>) {
        for ip in self.ips_of.remove(key).unwrap_or_default() {
            if let Some(set) = self.by_ip.get_mut(&ip) {
                set.remove(key);
                if set.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    fn apply(&mut self, pod: &Pod) {
        let key = ObjectRef::from_obj(pod);
        self.remove(&key);
        let ips = pod_ips(pod);
        for ip in &ips {
            self.by_ip.entry(*ip).or_default().insert(key.clone());
        }
        if !ips.is_empty() {
            self.ips_of.insert(key, ips);
        }
    }
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let mut ips: Vec<IpAddr> = status.pod_ips.iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

impl PodIpIndex {
    /// Apply one watch event.
    pub fn observe(&self, event: &watcher::Event<Pod>) {
        let mut state = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(p) => state.live.apply(p),
            watcher::Event::Delete(p) => state.live.remove(&ObjectRef::from_obj(p)),
            watcher::Event::Init => state.building = Some(Maps::default()),
            watcher::Event::InitApply(p) => state.building.get_or_insert_with(Maps::default).apply(p),
            watcher::Event::InitDone => {
                if let Some(fresh) = state.building.take() {
                    state.live = fresh;
                }
            }
        }
    }

    /// The pods that have `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Vec<ObjectRef<Pod>> {
        let state = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        state.live.by_ip.get(&ip).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }
}

/// The pod and LockSource caches the gateway reads.
#[derive(Clone)]
pub struct Caches {
    pub pods: Store<Pod>,
    pub pod_ips: Arc<PodIpIndex>,
    pub sources: Store<LockSource>,
    synced: tokio::sync::watch::Receiver<bool>,
}

impl Caches {
    /// Start the watches (they stop with the runtime).
    pub fn start(client: &Client) -> Self {
        let (pods, pod_writer) = reflector::store();
        let (sources, source_writer) = reflector::store();
        let pod_ips = Arc::new(PodIpIndex::default());
        let index = pod_ips.clone();
        let pod_stream =
            reflector::reflector(pod_writer, watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())).default_backoff();
        tokio::spawn(pod_stream.for_each(move |ev| {
            if let Ok(ev) = ev {
                index.observe(&ev);
            }
            async {}
        }));
        let source_stream =
            reflector::reflector(source_writer, watcher(Api::<LockSource>::all(client.clone()), watcher::Config::default()))
                .default_backoff();
        tokio::spawn(source_stream.for_each(|_| async {}));
        // `Store::wait_until_ready` wakes only the most recent of several concurrent waiters, so
        // one task waits and tells everyone else through a watch channel.
        let (tx, synced) = tokio::sync::watch::channel(false);
        let (p, s) = (pods.clone(), sources.clone());
        tokio::spawn(async move {
            if p.wait_until_ready().await.is_ok() && s.wait_until_ready().await.is_ok() {
                let _ = tx.send(true);
            }
        });
        Self { pods, pod_ips, sources, synced }
    }

    /// Wait until both caches hold a complete list.
    pub async fn synced(&self) {
        let _ = self.synced.clone().wait_for(|done| *done).await;
    }

    /// The caller, by its source address: a pod only when exactly one running, non-terminating
    /// pod has the address. Completed pods keep their address in the API and CNIs reuse
    /// addresses, and host-network pods share their node's: such an address identifies nobody.
    pub fn caller(&self, ip: IpAddr) -> Caller {
        let pods: Vec<Arc<Pod>> = self.pod_ips.lookup(ip).into_iter().filter_map(|r| self.pods.get(&r)).collect();
        let live: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_running(p)).collect();
        match live.as_slice() {
            [one] => Caller::Pod((*one).clone()),
            // No pod has ever had this address in the cache's view.
            [] if pods.is_empty() => Caller::NotAPod,
            // Pods have it but none is running (a completed pod's address, reused or not): nobody
            // in particular, and not a non-pod either.
            _ => Caller::Unidentified { pods: pods.len() },
        }
    }

    /// The pod a `Who` host part names (by the kubelet's hostname rules), among `namespaces`, when
    /// exactly one running pod does.
    pub fn pod_by_hostname(&self, host: &str, namespaces: &HolderNamespaces) -> Option<Arc<Pod>> {
        let mut found = self
            .pods
            .state()
            .into_iter()
            .filter(|p| namespaces.allows(&p.namespace().unwrap_or_default()) && is_running(p) && pod_facts(p).host.yields(host));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

/// Running and not terminating.
fn is_running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none() && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Who a gateway caller is.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Exactly one running pod has the caller's address.
    Pod(Arc<Pod>),
    /// Several running pods share the address (host network), or only pods that are not running
    /// have it: nobody in particular. Never admitted by `allowedSourceRanges`.
    Unidentified { pods: usize },
    /// No pod has the address: a caller outside the pod network, which `allowedSourceRanges` may admit.
    NotAPod,
}

impl Caller {
    pub fn pod(&self) -> Option<&Arc<Pod>> {
        match self {
            Self::Pod(p) => Some(p),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, ips: &[&str]) -> Pod {
        let ips: Vec<_> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": ns}, "status": {"podIP": ips.first().map(|v| v["ip"].clone()), "podIPs": ips}}),
        )
        .expect("pod")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn index_follows_applies_deletes_ip_changes_and_relists() {
        let idx = PodIpIndex::default();
        idx.observe(&watcher::Event::Apply(pod("a", "p1", &["10.0.0.1", "fd00::1"])));
        idx.observe(&watcher::Event::Apply(pod("a", "p2", &["10.0.0.2"])));
        assert_eq!(idx.lookup(ip("10.0.0.1")), vec![ObjectRef::new("p1").within("a")]);
        assert_eq!(idx.lookup(ip("fd00::1")), vec![ObjectRef::new("p1").within("a")]);
        // p1's address changes: the old one no longer names it.
        idx.observe(&watcher::Event::Apply(pod("a", "p1", &["10.0.0.3"])));
        assert!(idx.lookup(ip("10.0.0.1")).is_empty());
        assert!(idx.lookup(ip("fd00::1")).is_empty());
        // Two pods sharing an address (host network) are both listed.
        idx.observe(&watcher::Event::Apply(pod("b", "host", &["10.0.0.2"])));
        assert_eq!(idx.lookup(ip("10.0.0.2")).len(), 2);
        idx.observe(&watcher::Event::Delete(pod("a", "p2", &["10.0.0.2"])));
        assert_eq!(idx.lookup(ip("10.0.0.2")), vec![ObjectRef::new("host").within("b")]);
        // A re-list replaces the index only when complete; until then the old one answers.
        idx.observe(&watcher::Event::Init);
        idx.observe(&watcher::Event::InitApply(pod("c", "new", &["10.0.0.9"])));
        assert_eq!(idx.lookup(ip("10.0.0.3")).len(), 1);
        assert!(idx.lookup(ip("10.0.0.9")).is_empty());
        idx.observe(&watcher::Event::InitDone);
        assert!(idx.lookup(ip("10.0.0.3")).is_empty());
        assert_eq!(idx.lookup(ip("10.0.0.9")), vec![ObjectRef::new("new").within("c")]);
    }
}
