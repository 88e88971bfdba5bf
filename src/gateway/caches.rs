//! The gateway's view of the cluster: the operator's shared pod cache (indexed by address, so
//! identifying a caller does not scan every pod) and LockSources.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt, api::ListParams, runtime::reflector::Store};
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::{
        Cluster,
        pods::{PodCache, pod_facts},
    },
    crd::LockSource,
    expiry::holder_liveness::HolderNamespaces,
};

/// The pod and LockSource caches the gateway reads (the operator's shared ones).
#[derive(Clone)]
pub struct Caches {
    pub pods: Arc<PodCache>,
    pub sources: Store<LockSource>,
    cluster: Arc<Cluster>,
    /// Callers confirmed by a direct read: (address, pod UID) and when.
    confirmed: Arc<Mutex<HashMap<(IpAddr, String), Instant>>>,
}

/// How long a direct confirmation of a caller's address is trusted.
const CONFIRMED_FOR: Duration = Duration::from_secs(5);

impl Caches {
    pub fn new(cluster: &Arc<Cluster>) -> Self {
        Self { pods: cluster.pods.clone(), sources: cluster.sources.clone(), cluster: cluster.clone(), confirmed: Arc::default() }
    }

    /// Caches of its own, serving every LockSource (for tests and benchmarks); the watches stop
    /// with the runtime.
    pub fn start(client: &Client) -> Self {
        let (cluster, _no_statelock_watch) = Cluster::start(client, |_| true, &CancellationToken::new());
        Self::new(&cluster)
    }

    /// The gateway wrote `lock_id` in the table of `source` (the write was sent at `sent`): its
    /// mirror reads the stream now.
    pub fn nudge(&self, source: &crate::crd::LockSource, lock_id: &str, sent: std::time::Instant) {
        use kube::ResourceExt;
        self.cluster.nudges.nudge(&source.namespace().unwrap_or_default(), &source.name_any(), lock_id, sent);
    }

    /// The shared SDK clients, one set per LockSource.
    pub fn aws(&self) -> &Arc<crate::cluster::aws::SourceClients> {
        &self.cluster.aws
    }

    /// Wait until the LockSources are listed and the pod cache is complete.
    pub async fn synced(&self) {
        self.cluster.sources_listed().await;
        self.pods.wait_complete().await;
    }

    /// The caller, by its source address: a pod only when exactly one running, non-terminating
    /// pod has the address and it is not a host-network pod (whose address is its node's, shared
    /// with every host-network process there, pod or not). Completed pods keep their address in
    /// the API and CNIs reuse addresses: such an address identifies nobody. "Not a pod" only
    /// when the cache is complete and holds every namespace's pods.
    pub fn caller(&self, ip: IpAddr) -> Caller {
        let pods = self.pods.with_ip(ip);
        if pods.iter().any(|p| p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)) {
            return Caller::Unidentified { pods: pods.len() };
        }
        let live: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_running(p)).collect();
        match live.as_slice() {
            [one] => Caller::Pod((*one).clone()),
            // No pod has this address in a view of every pod.
            [] if pods.is_empty() && self.pods.is_complete() && self.pods.covers_all() => Caller::NotAPod,
            // Pods have it but none is running (a completed pod's address, reused or not), or
            // the view is partial: nobody in particular, and not a non-pod either.
            _ => Caller::Unidentified { pods: pods.len() },
        }
    }

    /// The caller, confirmed. With a cache scoped to some namespaces, pods elsewhere are
    /// invisible, and one of them may have the address now (handed on while a dead node's pod
    /// still shows Running): a caller the cache names is confirmed by a direct LIST of every
    /// namespace's pods with that address, and is that pod only if it is the one running,
    /// non-host-network pod there. A confirmation is trusted for a few seconds; a failed read
    /// identifies nobody.
    pub async fn confirmed_caller(&self, client: &Client, ip: IpAddr) -> Caller {
        let caller = self.caller(ip);
        let Caller::Pod(pod) = &caller else { return caller };
        if self.pods.covers_all() {
            return caller;
        }
        let key = (ip, pod.uid().unwrap_or_default());
        {
            let mut confirmed = self.confirmed.lock().unwrap_or_else(PoisonError::into_inner);
            confirmed.retain(|_, at| at.elapsed() < CONFIRMED_FOR);
            if confirmed.contains_key(&key) {
                return caller;
            }
        }
        let lp = ListParams::default().fields(&format!("status.podIP={ip}"));
        match Api::<Pod>::all(client.clone()).list(&lp).await {
            Ok(list) => {
                let running: Vec<&Pod> =
                    list.items.iter().filter(|p| is_running(p) && !p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)).collect();
                match running.as_slice() {
                    [one] if one.uid() == pod.uid() => {
                        self.confirmed.lock().unwrap_or_else(PoisonError::into_inner).insert(key, Instant::now());
                        caller
                    }
                    others => Caller::Unidentified { pods: others.len() },
                }
            }
            Err(e) => {
                tracing::warn!(%ip, error = %e, "could not confirm the gateway caller's address; it identifies nobody");
                Caller::Unidentified { pods: 0 }
            }
        }
    }

    /// The pod a `Who` host part names (by the kubelet's hostname rules), among `namespaces`, when
    /// exactly one running pod does.
    pub fn pod_by_hostname(&self, host: &str, namespaces: &HolderNamespaces) -> Option<Arc<Pod>> {
        let pods = self.pods.in_namespaces(namespaces);
        let mut found = pods.into_iter().filter(|p| is_running(p) && pod_facts(p).host.yields(host));
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
