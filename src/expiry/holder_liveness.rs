//! Is a lock's holder alive? A pure decision over plain facts about the lock and the pods.
//!
//! The rules that matter:
//! - **Only positive evidence of death counts**, and only about a pod **established as the
//!   holder**: the pod the gateway saw take the lock, or the one pod (in the holder namespaces)
//!   whose kubelet hostname is the host in `Who` and which existed before the lock was taken. A
//!   pod that appears after the lock was never its holder and is never evidence about it.
//! - Evidence: the established pod's UID no longer exists (`PodNotFound`), its name belongs to
//!   another UID (`PodReplaced`), it completed (`PodCompleted`), its holder container restarted
//!   (`ContainerRestarted`); or, for hostnames matching the runner pattern, no pod under any name
//!   yields the hostname, in the holder namespaces or anywhere else (`RunnerGone`).
//! - Nothing else is evidence: not a Terminating pod, not phase Unknown, not a cache that has not
//!   synced, not an API error, not a malformed lock, never the age of the lock. Then the answer
//!   is Unknown, and Unknown never releases anything.
//!
//! The same function judges twice: over the caches (a hint, which may only trigger a judgement)
//! and over the authorities (the lock item from a strongly consistent read, pods read directly
//! from the API) right before a release. Only the second may release.

use crate::crd::{HolderIdentification, HolderState};

pub use super::pod_hostname::HostnameSpec;

/// The annotation naming the container whose restart counts as the holder's death.
pub const HOLDER_CONTAINER_ANNOTATION: &str = "statelock.dev/holder-container";

/// A pod, identified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// What the lock says about its holder (from the StateLock spec as a hint, or from the Info of a
/// strongly consistent read as the authority).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockFacts {
    /// The lock's Created time (ns since the epoch), when it parsed.
    pub created: Option<i128>,
    /// The hostname part of Who.
    pub hostname: Option<String>,
    /// SHA-256 of the exact Info: the lock instance.
    pub info_sha256: Option<String>,
    /// Why the lock record is malformed, when it is: malformed locks are never released
    /// automatically.
    pub malformed: Option<String>,
}

/// A pod established as the holder of one lock instance (recorded in status the first time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Established {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub by: HolderIdentification,
    /// The host in `Who` it was established for.
    pub hostname: String,
    /// The lock instance it holds.
    pub info_sha256: String,
    /// The holder container's restart count when established, when there is one container to watch.
    pub restarts: Option<i32>,
}

/// One container's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerFacts {
    pub name: String,
    /// `state.running.startedAt` (ns), when running.
    pub running_since: Option<i128>,
    pub restart_count: i32,
}

/// What the API (or the cache) says about a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// Namespace, name and what decides its hostname.
    pub host: HostnameSpec,
    pub uid: String,
    /// `metadata.creationTimestamp` (ns).
    pub created: i128,
    /// `status.phase`.
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    pub containers: Vec<ContainerFacts>,
    /// The value of [`HOLDER_CONTAINER_ANNOTATION`], when set.
    pub holder_container: Option<String>,
}

impl PodFacts {
    pub fn namespace(&self) -> &str {
        &self.host.namespace
    }

    pub fn name(&self) -> &str {
        &self.host.name
    }

    fn pod_ref(&self) -> PodRef {
        PodRef { namespace: self.host.namespace.clone(), name: self.host.name.clone(), uid: Some(self.uid.clone()) }
    }

    /// The container whose restart means the holder process is gone: the annotated one, or the
    /// only one.
    fn holder_container(&self) -> Option<&ContainerFacts> {
        match &self.holder_container {
            Some(name) => self.containers.iter().find(|c| &c.name == name),
            None if self.containers.len() == 1 => self.containers.first(),
            None => None,
        }
    }
}

/// Which namespaces' pods may hold the locks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HolderNamespaces {
    /// Every namespace (asked for explicitly with `*`).
    All,
    Only(Vec<String>),
}

impl HolderNamespaces {
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(list) => list.iter().any(|n| n == namespace),
        }
    }
}

/// Where holders may run, and how much clocks may disagree.
#[derive(Clone, Debug)]
pub struct HolderPolicy {
    pub namespaces: HolderNamespaces,
    /// Hostnames of in-cluster runners: for these, "no pod yields this hostname" is evidence.
    pub hostname_pattern: Option<regex::Regex>,
    pub skew_tolerance_ns: i128,
}

/// The pods the judgement sees.
#[derive(Clone, Copy, Debug)]
pub enum PodView<'a> {
    /// The cache has not listed every pod yet: nothing is decided.
    CacheNotSynced,
    /// The pod cache (a hint).
    Cache(&'a [PodFacts]),
    /// A direct list (the authority): of the holder namespaces, and of every namespace before a
    /// `RunnerGone` verdict (absence must hold cluster-wide).
    Listed(&'a [PodFacts]),
    /// The direct list failed: nothing is decided.
    ListFailed,
}

/// What a read of the established holder (by namespace and name) returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HolderLookup {
    Found(Box<PodFacts>),
    NotFound,
    Failed,
}

/// Why a holder is in its state. The strings appear only at the edges (status, events, metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    CacheNotSynced,
    ApiError,
    LockMalformed,
    PodRunning,
    PodTerminating,
    PodPhaseUnknown,
    PodNotFound,
    PodReplaced,
    PodCompleted,
    ContainerRestarted,
    RunnerGone,
    NoHostname,
    NoMatchingPod,
    SeveralPods,
    HolderNotEstablished,
    RunnerOutsideHolderNamespaces,
    SourceNotFound,
    SourceRefused,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CacheNotSynced => "CacheNotSynced",
            Self::ApiError => "ApiError",
            Self::LockMalformed => "LockMalformed",
            Self::PodRunning => "PodRunning",
            Self::PodTerminating => "PodTerminating",
            Self::PodPhaseUnknown => "PodPhaseUnknown",
            Self::PodNotFound => "PodNotFound",
            Self::PodReplaced => "PodReplaced",
            Self::PodCompleted => "PodCompleted",
            Self::ContainerRestarted => "ContainerRestarted",
            Self::RunnerGone => "RunnerGone",
            Self::NoHostname => "NoHostname",
            Self::NoMatchingPod => "NoMatchingPod",
            Self::SeveralPods => "SeveralPods",
            Self::HolderNotEstablished => "HolderNotEstablished",
            Self::RunnerOutsideHolderNamespaces => "RunnerOutsideHolderNamespaces",
            Self::SourceNotFound => "SourceNotFound",
            Self::SourceRefused => "SourceRefused",
        }
    }

    /// Every reason, for tests and metric documentation.
    pub const ALL: [Reason; 18] = [
        Self::CacheNotSynced,
        Self::ApiError,
        Self::LockMalformed,
        Self::PodRunning,
        Self::PodTerminating,
        Self::PodPhaseUnknown,
        Self::PodNotFound,
        Self::PodReplaced,
        Self::PodCompleted,
        Self::ContainerRestarted,
        Self::RunnerGone,
        Self::NoHostname,
        Self::NoMatchingPod,
        Self::SeveralPods,
        Self::HolderNotEstablished,
        Self::RunnerOutsideHolderNamespaces,
        Self::SourceNotFound,
        Self::SourceRefused,
    ];
}

/// The verdict about a holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub state: HolderState,
    pub reason: Reason,
    pub message: String,
    /// The holder pod, when established.
    pub pod: Option<PodRef>,
    /// The established holder this verdict is about (already recorded, or established now).
    pub established: Option<Established>,
    /// `namespace/name` of every candidate, when ambiguous.
    pub candidates: Vec<String>,
}

impl Verdict {
    fn new(state: HolderState, reason: Reason, message: impl Into<String>) -> Self {
        Self { state, reason, message: message.into(), pod: None, established: None, candidates: vec![] }
    }

    /// Dead is the only state that may lead to a release.
    pub fn is_dead(&self) -> bool {
        self.state == HolderState::Dead
    }

    pub fn identified_by(&self) -> Option<HolderIdentification> {
        self.established.as_ref().map(|e| e.by)
    }
}

fn secs(ns: i128) -> f64 {
    ns as f64 / 1e9
}

/// Everything a judgement looks at.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub lock: &'a LockFacts,
    /// The established holder recorded for a lock instance (status, or the gateway's record);
    /// ignored unless it is for this instance and this hostname.
    pub established: Option<&'a Established>,
    /// The established holder read by name (from the cache for a hint, directly for the authority).
    pub holder_lookup: Option<&'a HolderLookup>,
    pub pods: PodView<'a>,
    pub policy: &'a HolderPolicy,
}

/// Decide whether the holder is alive.
pub fn judge(f: &Facts<'_>) -> Verdict {
    let pods = match f.pods {
        PodView::CacheNotSynced => {
            return Verdict::new(HolderState::Unknown, Reason::CacheNotSynced, "the pod cache has not synced yet; nothing is decided");
        }
        PodView::ListFailed => {
            return Verdict::new(
                HolderState::Unknown,
                Reason::ApiError,
                "the pods of the holder namespaces could not be listed; nothing is decided",
            );
        }
        PodView::Cache(p) | PodView::Listed(p) => p,
    };
    if let Some(why) = &f.lock.malformed {
        return Verdict::new(
            HolderState::Unknown,
            Reason::LockMalformed,
            format!("the lock record is malformed ({why}); a malformed lock is never released automatically"),
        );
    }
    let Some(host) = f.lock.hostname.as_deref().filter(|h| !h.is_empty()) else {
        return Verdict::new(HolderState::External, Reason::NoHostname, "Who names no host; the holder cannot be a known pod");
    };
    let Some(created) = f.lock.created else {
        return Verdict::new(HolderState::Unknown, Reason::LockMalformed, "the lock has no Created time; nothing is decided");
    };
    let latest_holder_creation = created.saturating_add(f.policy.skew_tolerance_ns.max(0));
    // Pods that may be (or may have been) the holder: right namespace, right hostname, and in
    // existence before the lock was taken (within the skew tolerance).
    let could_hold = |p: &PodFacts| f.policy.namespaces.allows(p.namespace()) && p.host.yields(host) && p.created <= latest_holder_creation;

    // 1. An established holder of this very lock instance.
    let recorded = f.established.filter(|e| f.lock.info_sha256.as_deref() == Some(e.info_sha256.as_str()) && e.hostname == host);
    if let Some(e) = recorded {
        let mut v = match f.holder_lookup {
            None => Verdict::new(
                HolderState::Unknown,
                Reason::ApiError,
                format!("the holder pod {}/{} was not read; nothing is decided", e.namespace, e.name),
            ),
            Some(HolderLookup::Failed) => Verdict::new(
                HolderState::Unknown,
                Reason::ApiError,
                format!("could not read the holder pod {}/{}; nothing is decided", e.namespace, e.name),
            ),
            Some(HolderLookup::NotFound) => Verdict::new(
                HolderState::Dead,
                Reason::PodNotFound,
                format!("the holder pod {}/{} (UID {}) no longer exists", e.namespace, e.name, e.uid),
            ),
            Some(HolderLookup::Found(p)) if p.uid != e.uid => Verdict::new(
                HolderState::Dead,
                Reason::PodReplaced,
                format!("the holder pod {}/{} (UID {}) is gone; the name now belongs to UID {}", e.namespace, e.name, e.uid, p.uid),
            ),
            Some(HolderLookup::Found(p)) => judge_holder_pod(p, e.restarts, created, f.policy),
        };
        // A holder found by hostname is the holder only while no other pod could be: if another
        // pod with this hostname existed before the lock, say so and decide nothing.
        if v.is_dead() && e.by == HolderIdentification::Hostname {
            // A completed pod cannot be running the holder process; any other could be.
            let alive = |p: &PodFacts| !matches!(p.phase.as_deref(), Some("Succeeded" | "Failed"));
            let others: Vec<String> = pods
                .iter()
                .filter(|p| could_hold(p) && p.uid != e.uid && alive(p))
                .map(|p| format!("{}/{}", p.namespace(), p.name()))
                .collect();
            if !others.is_empty() {
                v = Verdict {
                    candidates: others,
                    ..Verdict::new(
                        HolderState::Ambiguous,
                        Reason::SeveralPods,
                        format!(
                            "the recorded holder {}/{} is gone, but other pods with hostname {host:?} existed before the lock",
                            e.namespace, e.name
                        ),
                    )
                };
            }
        }
        v.pod = Some(PodRef { namespace: e.namespace.clone(), name: e.name.clone(), uid: Some(e.uid.clone()) });
        v.established = Some(e.clone());
        return v;
    }

    // 2. Establish the holder by hostname.
    let matching: Vec<&PodFacts> = pods.iter().filter(|p| f.policy.namespaces.allows(p.namespace()) && p.host.yields(host)).collect();
    let before: Vec<&PodFacts> = matching.iter().copied().filter(|p| could_hold(p)).collect();
    match before.as_slice() {
        [p] => {
            let restarts = p.holder_container().map(|c| c.restart_count);
            let e = Established {
                namespace: p.namespace().to_owned(),
                name: p.name().to_owned(),
                uid: p.uid.clone(),
                by: HolderIdentification::Hostname,
                hostname: host.to_owned(),
                info_sha256: f.lock.info_sha256.clone().unwrap_or_default(),
                restarts,
            };
            let mut v = judge_holder_pod(p, restarts, created, f.policy);
            v.pod = Some(p.pod_ref());
            // Without an instance identity there is nothing to record it against.
            v.established = f.lock.info_sha256.is_some().then_some(e);
            v
        }
        [] if !matching.is_empty() => Verdict {
            candidates: matching.iter().map(|p| format!("{}/{}", p.namespace(), p.name())).collect(),
            ..Verdict::new(
                HolderState::Unknown,
                Reason::HolderNotEstablished,
                format!(
                    "pods with hostname {host:?} exist but were created after the lock; none of them took it, and the pod that did was never seen"
                ),
            )
        },
        [] => {
            let elsewhere: Vec<String> =
                pods.iter().filter(|p| p.host.yields(host)).map(|p| format!("{}/{}", p.namespace(), p.name())).collect();
            if !elsewhere.is_empty() {
                // Not a holder candidate, but maybe the runner: a pattern is no evidence while a
                // pod anywhere has the hostname (holder namespaces narrower than where runners run).
                Verdict {
                    candidates: elsewhere,
                    ..Verdict::new(
                        HolderState::Unknown,
                        Reason::RunnerOutsideHolderNamespaces,
                        format!(
                            "no pod in the holder namespaces has hostname {host:?}, but pods elsewhere do; not evidence that the runner is gone"
                        ),
                    )
                }
            } else if f.policy.hostname_pattern.as_ref().is_some_and(|re| re.is_match(host)) {
                Verdict::new(
                    HolderState::Dead,
                    Reason::RunnerGone,
                    format!("no pod in the holder namespaces has hostname {host:?}, which matches the runner pattern: the runner is gone"),
                )
            } else {
                Verdict::new(
                    HolderState::External,
                    Reason::NoMatchingPod,
                    format!("no pod has hostname {host:?}; the holder runs outside the cluster (not expired automatically)"),
                )
            }
        }
        many => Verdict {
            candidates: many.iter().map(|p| format!("{}/{}", p.namespace(), p.name())).collect(),
            ..Verdict::new(
                HolderState::Ambiguous,
                Reason::SeveralPods,
                format!("{} pods with hostname {host:?} existed before the lock; never expired automatically", many.len()),
            )
        },
    }
}

/// The established holder pod, with the UID recorded for it: is it still running the process
/// that took the lock?
fn judge_holder_pod(p: &PodFacts, restarts_when_established: Option<i32>, lock_created: i128, policy: &HolderPolicy) -> Verdict {
    let id = format!("{}/{}", p.namespace(), p.name());
    if let Some(phase @ ("Succeeded" | "Failed")) = p.phase.as_deref() {
        return Verdict::new(HolderState::Dead, Reason::PodCompleted, format!("the holder pod {id} has phase {phase}"));
    }
    if let Some(c) = p.holder_container() {
        if let Some(before) = restarts_when_established
            && c.restart_count > before
        {
            return Verdict::new(
                HolderState::Dead,
                Reason::ContainerRestarted,
                format!(
                    "container {} of the holder pod {id} restarted since it was established as the holder ({before} -> {} restarts)",
                    c.name, c.restart_count
                ),
            );
        }
        // Both times come from the pod's node: Terraform's Created from the node's clock, the
        // container's start from its kubelet.
        if let Some(since) = c.running_since
            && since > lock_created.saturating_add(policy.skew_tolerance_ns.max(0))
        {
            return Verdict::new(
                HolderState::Dead,
                Reason::ContainerRestarted,
                format!(
                    "container {} of the holder pod {id} started {:.1}s after the lock was taken: the process that held it is gone",
                    c.name,
                    secs(since - lock_created)
                ),
            );
        }
    }
    if p.terminating {
        Verdict::new(
            HolderState::Alive,
            Reason::PodTerminating,
            format!("the holder pod {id} is terminating; Terraform may still be releasing the lock"),
        )
    } else if p.phase.as_deref() == Some("Unknown") {
        Verdict::new(
            HolderState::Unknown,
            Reason::PodPhaseUnknown,
            format!("the holder pod {id} has phase Unknown (its node may be unreachable); not evidence of death"),
        )
    } else {
        Verdict::new(HolderState::Alive, Reason::PodRunning, format!("the holder pod {id} shows no sign of having stopped"))
    }
}

#[cfg(test)]
mod tests;
