//! Is a lock's holder alive? A pure decision over plain facts about the lock and the pods.
//!
//! The rule that matters: **only positive evidence of death counts**. A pod that is gone (and
//! confirmed gone by a direct read), replaced (another UID, or created after the lock), completed
//! (Succeeded/Failed), or whose holder container restarted after the lock was taken, is dead.
//! Nothing else is: not a Terminating pod, not phase Unknown, not a NotReady node, not a cache that
//! has not synced, not an API error, and never the age of the lock. When the facts are
//! incomplete the answer is Unknown, and Unknown never releases anything.

use crate::crd::HolderState;

/// The annotation naming the container whose restart counts as the holder's death.
pub const HOLDER_CONTAINER_ANNOTATION: &str = "statelock.dev/holder-container";

/// A pod, identified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// What the lock says about its holder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockFacts {
    /// The lock's Created time (ns since the epoch), when it parsed.
    pub created: Option<i128>,
    /// The hostname part of Who.
    pub hostname: Option<String>,
    /// The pod the gateway saw take the lock, when it did.
    pub gateway_pod: Option<PodRef>,
}

/// One container's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerFacts {
    pub name: String,
    /// `state.running.startedAt` (ns), when running.
    pub running_since: Option<i128>,
}

/// What the pod cache says about a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.hostname`, when set.
    pub hostname: Option<String>,
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
    /// The hostname Terraform in this pod reports: `spec.hostname`, else the pod name.
    pub fn effective_hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.name)
    }
}

/// Where holders may run, and how much clocks may disagree.
#[derive(Clone, Debug, Default)]
pub struct HolderPolicy {
    /// Namespaces whose pods may hold locks; empty means every namespace.
    pub namespaces: Vec<String>,
    /// Hostnames of in-cluster runners: for these, "no such pod" is evidence of death.
    pub hostname_pattern: Option<regex::Regex>,
    pub skew_tolerance_ns: i128,
}

impl HolderPolicy {
    fn allows(&self, namespace: &str) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace)
    }
}

/// Whether the pod cache can be trusted yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    Synced,
    NotSynced,
}

/// What a direct (uncached) read of the API said about a pod that the cache does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectRead {
    /// Not read yet: ask for one.
    NotDone,
    /// The API answered 404.
    NotFound,
    /// The API has the pod (the cache is behind): no evidence.
    Exists,
    /// The read failed: no evidence.
    Failed,
}

/// Evidence of death.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    /// `PodNotFound`, `PodReplaced`, `PodCompleted` or `ContainerRestarted`.
    pub reason: &'static str,
    pub message: String,
}

/// The verdict about a holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub state: HolderState,
    pub reason: &'static str,
    pub message: String,
    /// The resolved pod, when there is exactly one.
    pub pod: Option<PodRef>,
    pub identified_by_gateway: bool,
    /// `namespace/name` of every candidate, when ambiguous.
    pub candidates: Vec<String>,
    /// Set exactly when `state` is Dead.
    pub evidence: Option<Evidence>,
    /// A pod that must be read directly before its absence can count: (namespace, name).
    pub needs_direct_read: Option<(String, String)>,
}

impl Verdict {
    fn new(state: HolderState, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            state,
            reason,
            message: message.into(),
            pod: None,
            identified_by_gateway: false,
            candidates: vec![],
            evidence: None,
            needs_direct_read: None,
        }
    }

    fn dead(pod: Option<PodRef>, reason: &'static str, message: String) -> Self {
        let mut v = Self::new(HolderState::Dead, reason, message.clone());
        v.pod = pod;
        v.evidence = Some(Evidence { reason, message });
        v
    }
}

fn pod_ref(p: &PodFacts) -> PodRef {
    PodRef { namespace: p.namespace.clone(), name: p.name.clone(), uid: Some(p.uid.clone()) }
}

fn secs(ns: i128) -> f64 {
    ns as f64 / 1e9
}

/// Decide whether the holder is alive.
///
/// `pods` is the cache's view of every pod; `direct` is the result of the direct read asked for
/// by an earlier verdict's `needs_direct_read` (for the same pod), or `NotDone`.
pub fn judge(lock: &LockFacts, pods: &[PodFacts], policy: &HolderPolicy, cache: Cache, direct: DirectRead) -> Verdict {
    if cache == Cache::NotSynced {
        return Verdict::new(HolderState::Unknown, "CacheNotSynced", "the pod cache has not synced yet; nothing is decided");
    }
    // 1. The pod the gateway saw take the lock.
    if let Some(g) = &lock.gateway_pod {
        let found = pods.iter().find(|p| p.namespace == g.namespace && p.name == g.name);
        let mut v = match found {
            Some(p) => judge_pod(lock, p, policy, g.uid.as_deref()),
            None => absent(g.namespace.clone(), g.name.clone(), direct, "the pod that took the lock (seen by the gateway)"),
        };
        v.identified_by_gateway = true;
        if v.pod.is_none() {
            v.pod = Some(g.clone());
        }
        return v;
    }
    // 2. The hostname in Who.
    let Some(host) = lock.hostname.as_deref().filter(|h| !h.is_empty()) else {
        return Verdict::new(HolderState::External, "NoHostname", "Who names no host; the holder cannot be a known pod");
    };
    let candidates: Vec<&PodFacts> = pods.iter().filter(|p| policy.allows(&p.namespace) && p.effective_hostname() == host).collect();
    match candidates.as_slice() {
        [] => {
            let runner = policy.hostname_pattern.as_ref().is_some_and(|re| re.is_match(host));
            if !runner {
                return Verdict::new(
                    HolderState::External,
                    "NoMatchingPod",
                    format!("no pod has hostname {host:?}; the holder runs outside the cluster (not expired automatically)"),
                );
            }
            // A runner hostname with no pod: its absence is evidence, once confirmed. With
            // several holder namespaces the direct read cannot name one pod, so only a single
            // namespace makes the absence checkable.
            match policy.namespaces.as_slice() {
                [ns] => absent(ns.clone(), host.to_owned(), direct, "the runner pod named in Who"),
                _ => Verdict::new(
                    HolderState::Unknown,
                    "RunnerNotFound",
                    format!(
                        "no pod has hostname {host:?}, which matches the runner pattern, but its absence can only be confirmed with exactly one holder namespace"
                    ),
                ),
            }
        }
        [p] => judge_pod(lock, p, policy, None),
        many => {
            let mut v = Verdict::new(
                HolderState::Ambiguous,
                "SeveralPods",
                format!("{} pods have hostname {host:?}; never expired automatically", many.len()),
            );
            v.candidates = many.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
            v
        }
    }
}

fn absent(namespace: String, name: String, direct: DirectRead, what: &str) -> Verdict {
    match direct {
        DirectRead::NotFound => Verdict::dead(
            Some(PodRef { namespace: namespace.clone(), name: name.clone(), uid: None }),
            "PodNotFound",
            format!("{what}, {namespace}/{name}, does not exist (confirmed by a direct read)"),
        ),
        DirectRead::NotDone => {
            let mut v = Verdict::new(
                HolderState::Unknown,
                "ConfirmingAbsence",
                format!("{what}, {namespace}/{name}, is not in the cache; confirming with a direct read"),
            );
            v.needs_direct_read = Some((namespace, name));
            v
        }
        DirectRead::Exists => {
            Verdict::new(HolderState::Unknown, "CacheBehind", format!("{what}, {namespace}/{name}, exists but the cache has not caught up"))
        }
        DirectRead::Failed => {
            Verdict::new(HolderState::Unknown, "ApiError", format!("could not read {namespace}/{name} directly; nothing is decided"))
        }
    }
}

fn judge_pod(lock: &LockFacts, p: &PodFacts, policy: &HolderPolicy, recorded_uid: Option<&str>) -> Verdict {
    let me = pod_ref(p);
    let id = format!("{}/{}", p.namespace, p.name);
    if let Some(uid) = recorded_uid
        && uid != p.uid
    {
        return Verdict::dead(
            Some(me),
            "PodReplaced",
            format!("pod {id} now has UID {}, not {uid}: the pod that took the lock is gone", p.uid),
        );
    }
    if let Some(created) = lock.created
        && p.created > created + policy.skew_tolerance_ns
    {
        return Verdict::dead(
            Some(me),
            "PodReplaced",
            format!(
                "pod {id} was created {:.1}s after the lock was taken (more than the skew tolerance): the holder was an earlier pod",
                secs(p.created - created)
            ),
        );
    }
    if let Some(phase @ ("Succeeded" | "Failed")) = p.phase.as_deref() {
        return Verdict::dead(Some(me), "PodCompleted", format!("pod {id} has phase {phase}"));
    }
    if let Some(created) = lock.created {
        let holder = match &p.holder_container {
            Some(name) => p.containers.iter().find(|c| &c.name == name),
            None if p.containers.len() == 1 => p.containers.first(),
            None => None,
        };
        if let Some(since) = holder.and_then(|c| c.running_since)
            && since > created + policy.skew_tolerance_ns
        {
            let name = holder.map(|c| c.name.as_str()).unwrap_or_default();
            return Verdict::dead(
                Some(me),
                "ContainerRestarted",
                format!(
                    "container {name} of pod {id} started {:.1}s after the lock was taken: the process that held it is gone",
                    secs(since - created)
                ),
            );
        }
    }
    let mut v = if p.terminating {
        Verdict::new(HolderState::Alive, "PodTerminating", format!("pod {id} is terminating; Terraform may still be releasing the lock"))
    } else if p.phase.as_deref() == Some("Unknown") {
        Verdict::new(
            HolderState::Unknown,
            "PodPhaseUnknown",
            format!("pod {id} has phase Unknown (its node may be unreachable); not evidence of death"),
        )
    } else {
        Verdict::new(HolderState::Alive, "PodRunning", format!("pod {id} is the holder and shows no sign of having stopped"))
    };
    v.pod = Some(me);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i128 = 1_764_162_000_000_000_000;
    const S: i128 = 1_000_000_000;

    fn lock(host: &str) -> LockFacts {
        LockFacts { created: Some(T0), hostname: Some(host.into()), gateway_pod: None }
    }

    fn pod(ns: &str, name: &str) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            created: T0 - 600 * S,
            phase: Some("Running".into()),
            containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 - 590 * S) }],
            ..PodFacts::default()
        }
    }

    fn policy() -> HolderPolicy {
        HolderPolicy {
            namespaces: vec!["atlantis".into()],
            hostname_pattern: Some(regex::Regex::new("^atlantis-[0-9]+$").expect("re")),
            skew_tolerance_ns: 2 * S,
        }
    }

    fn judged(lock: &LockFacts, pods: &[PodFacts]) -> Verdict {
        judge(lock, pods, &policy(), Cache::Synced, DirectRead::NotDone)
    }

    #[test]
    fn table_of_evidence_and_non_evidence() {
        let base = pod("atlantis", "atlantis-0");
        let cases: Vec<(&str, Vec<PodFacts>, HolderState, &str)> = vec![
            ("running holder", vec![base.clone()], HolderState::Alive, "PodRunning"),
            ("completed", vec![PodFacts { phase: Some("Succeeded".into()), ..base.clone() }], HolderState::Dead, "PodCompleted"),
            ("failed", vec![PodFacts { phase: Some("Failed".into()), ..base.clone() }], HolderState::Dead, "PodCompleted"),
            ("replaced after the lock", vec![PodFacts { created: T0 + 3 * S, ..base.clone() }], HolderState::Dead, "PodReplaced"),
            ("created within skew", vec![PodFacts { created: T0 + S, ..base.clone() }], HolderState::Alive, "PodRunning"),
            (
                "container restarted",
                vec![PodFacts {
                    containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 + 10 * S) }],
                    ..base.clone()
                }],
                HolderState::Dead,
                "ContainerRestarted",
            ),
            (
                "restart within skew",
                vec![PodFacts { containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 + S) }], ..base.clone() }],
                HolderState::Alive,
                "PodRunning",
            ),
            (
                "two containers, no annotation: no container rule",
                vec![PodFacts {
                    containers: vec![
                        ContainerFacts { name: "runner".into(), running_since: Some(T0 + 10 * S) },
                        ContainerFacts { name: "sidecar".into(), running_since: Some(T0 - S) },
                    ],
                    ..base.clone()
                }],
                HolderState::Alive,
                "PodRunning",
            ),
            (
                "two containers, annotated holder restarted",
                vec![PodFacts {
                    holder_container: Some("runner".into()),
                    containers: vec![
                        ContainerFacts { name: "runner".into(), running_since: Some(T0 + 10 * S) },
                        ContainerFacts { name: "sidecar".into(), running_since: Some(T0 - S) },
                    ],
                    ..base.clone()
                }],
                HolderState::Dead,
                "ContainerRestarted",
            ),
            ("terminating is not death", vec![PodFacts { terminating: true, ..base.clone() }], HolderState::Alive, "PodTerminating"),
            (
                "phase Unknown is not death",
                vec![PodFacts { phase: Some("Unknown".into()), ..base.clone() }],
                HolderState::Unknown,
                "PodPhaseUnknown",
            ),
            ("runner pod missing: confirm first", vec![], HolderState::Unknown, "ConfirmingAbsence"),
            (
                "two pods with the hostname",
                vec![
                    base.clone(),
                    PodFacts { namespace: "atlantis".into(), name: "other".into(), hostname: Some("atlantis-0".into()), ..base.clone() },
                ],
                HolderState::Ambiguous,
                "SeveralPods",
            ),
            (
                "pod in a namespace holders may not use",
                vec![PodFacts { namespace: "elsewhere".into(), ..base.clone() }],
                HolderState::Unknown,
                "ConfirmingAbsence",
            ),
        ];
        for (what, pods, state, reason) in cases {
            let v = judged(&lock("atlantis-0"), &pods);
            assert_eq!((v.state, v.reason), (state, reason), "{what}: {}", v.message);
            assert_eq!(v.evidence.is_some(), state == HolderState::Dead, "{what}: evidence exactly when dead");
        }
    }

    #[test]
    fn absence_counts_only_after_a_direct_read_says_404() {
        let l = lock("atlantis-3");
        let v = judged(&l, &[]);
        assert_eq!(v.needs_direct_read, Some(("atlantis".into(), "atlantis-3".into())));
        for (direct, state) in [
            (DirectRead::NotFound, HolderState::Dead),
            (DirectRead::Exists, HolderState::Unknown),
            (DirectRead::Failed, HolderState::Unknown),
        ] {
            assert_eq!(judge(&l, &[], &policy(), Cache::Synced, direct).state, state, "{direct:?}");
        }
    }

    #[test]
    fn hosts_outside_the_runner_pattern_are_external_and_never_expire() {
        let v = judge(&lock("laptop-of-jane"), &[], &policy(), Cache::Synced, DirectRead::NotFound);
        assert_eq!(v.state, HolderState::External);
        let v = judge(&LockFacts { hostname: None, ..lock("") }, &[], &policy(), Cache::Synced, DirectRead::NotFound);
        assert_eq!(v.state, HolderState::External);
    }

    #[test]
    fn an_unsynced_cache_decides_nothing() {
        let v = judge(&lock("atlantis-0"), &[], &policy(), Cache::NotSynced, DirectRead::NotFound);
        assert_eq!((v.state, v.reason), (HolderState::Unknown, "CacheNotSynced"));
    }

    #[test]
    fn the_gateway_pod_is_the_strongest_evidence() {
        let base = pod("atlantis", "atlantis-0");
        let g = LockFacts {
            gateway_pod: Some(PodRef { namespace: "atlantis".into(), name: "atlantis-0".into(), uid: Some("uid-atlantis-0".into()) }),
            ..lock("something-else")
        };
        let v = judged(&g, std::slice::from_ref(&base));
        assert_eq!((v.state, v.identified_by_gateway), (HolderState::Alive, true));
        let replaced = PodFacts { uid: "uid-new".into(), ..base };
        assert_eq!(judged(&g, &[replaced]).reason, "PodReplaced");
        assert_eq!(judged(&g, &[]).needs_direct_read, Some(("atlantis".into(), "atlantis-0".into())));
    }

    #[test]
    fn without_a_created_time_time_based_evidence_is_skipped() {
        let l = LockFacts { created: None, ..lock("atlantis-0") };
        let young = PodFacts { created: T0 + 100 * S, ..pod("atlantis", "atlantis-0") };
        assert_eq!(judged(&l, &[young]).state, HolderState::Alive);
    }

    fn arb_pod() -> impl Strategy<Value = PodFacts> {
        (
            prop_oneof![Just("atlantis"), Just("other")],
            prop_oneof![Just("atlantis-0"), Just("atlantis-1")],
            prop_oneof![Just(None), Just(Some("atlantis-0".to_owned()))],
            -100i128..100,
            prop_oneof![Just(None), Just(Some("Pending")), Just(Some("Running")), Just(Some("Unknown"))],
            any::<bool>(),
            proptest::option::of(-100i128..100),
        )
            .prop_map(|(ns, name, hostname, created, phase, terminating, started)| PodFacts {
                namespace: ns.into(),
                name: name.into(),
                uid: format!("uid-{name}"),
                hostname,
                created: T0 + created * S,
                phase: phase.map(str::to_owned),
                terminating,
                containers: vec![ContainerFacts { name: "runner".into(), running_since: started.map(|s| T0 + s * S) }],
                holder_container: None,
            })
    }

    proptest! {
        /// A holder that is alive by construction (created before the lock, running, its only
        /// container started before the lock, same UID) is never judged dead, whatever other pods
        /// exist, whatever the cache or a direct read says.
        #[test]
        fn a_live_holder_is_never_judged_dead(
            others in proptest::collection::vec(arb_pod(), 0..6),
            age in 0i128..10_000,
            start in 0i128..10_000,
            terminating in any::<bool>(),
            direct in prop_oneof![Just(DirectRead::NotDone), Just(DirectRead::NotFound), Just(DirectRead::Exists), Just(DirectRead::Failed)],
            synced in any::<bool>(),
            gateway in any::<bool>(),
        ) {
            let holder = PodFacts {
                namespace: "atlantis".into(),
                name: "atlantis-0".into(),
                uid: "uid-holder".into(),
                created: T0 - age * S,
                phase: Some("Running".into()),
                terminating,
                containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 - start * S) }],
                ..PodFacts::default()
            };
            // Other pods may not share the holder's namespace and name (names are unique).
            let mut pods: Vec<PodFacts> = others.into_iter().filter(|p| !(p.namespace == "atlantis" && p.name == "atlantis-0")).collect();
            pods.push(holder.clone());
            let l = LockFacts {
                created: Some(T0),
                hostname: Some("atlantis-0".into()),
                gateway_pod: gateway.then(|| PodRef { namespace: "atlantis".into(), name: "atlantis-0".into(), uid: Some("uid-holder".into()) }),
            };
            let v = judge(&l, &pods, &policy(), if synced { Cache::Synced } else { Cache::NotSynced }, direct);
            prop_assert_ne!(v.state, HolderState::Dead, "{:?}", v);
        }

        /// The same over sequences of pod events: the judge is stateless, so every snapshot of a
        /// history in which the holder stays alive must be judged not dead.
        #[test]
        fn no_sequence_of_pod_events_makes_a_live_holder_dead(history in proptest::collection::vec(proptest::collection::vec(arb_pod(), 0..4), 1..12)) {
            let holder = PodFacts {
                namespace: "atlantis".into(),
                name: "atlantis-0".into(),
                uid: "uid-holder".into(),
                created: T0 - 60 * S,
                phase: Some("Running".into()),
                containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 - 50 * S) }],
                ..PodFacts::default()
            };
            for snapshot in history {
                let mut pods: Vec<PodFacts> = snapshot.into_iter().filter(|p| !(p.namespace == "atlantis" && p.name == "atlantis-0")).collect();
                pods.push(holder.clone());
                let v = judge(&lock("atlantis-0"), &pods, &policy(), Cache::Synced, DirectRead::NotFound);
                prop_assert_ne!(v.state, HolderState::Dead, "{:?}", v);
            }
        }

        /// Dead always comes with evidence, and evidence only with Dead.
        #[test]
        fn evidence_exactly_when_dead(pods in proptest::collection::vec(arb_pod(), 0..5), host in prop_oneof![Just("atlantis-0"), Just("atlantis-1"), Just("laptop")]) {
            let v = judge(&lock(host), &pods, &policy(), Cache::Synced, DirectRead::NotDone);
            prop_assert_eq!(v.evidence.is_some(), v.state == HolderState::Dead);
        }
    }
}
