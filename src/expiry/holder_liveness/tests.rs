//! Table tests of every rule, and property tests of the promise over generated worlds whose
//! shapes are the ones where hostname-based identity fails: hostnames that are not pod names,
//! same-named pods elsewhere or created after the lock, stale records, hints that disagree.

use proptest::prelude::*;

use super::*;

const T0: i128 = 1_764_162_000_000_000_000;
const S: i128 = 1_000_000_000;
const SHA: &str = "aaaa";

fn lock(host: &str) -> LockFacts {
    LockFacts { created: Some(T0), hostname: Some(host.into()), info_sha256: Some(SHA.into()), malformed: None }
}

fn pod(ns: &str, name: &str) -> PodFacts {
    PodFacts {
        host: HostnameSpec { namespace: ns.into(), name: name.into(), ..HostnameSpec::default() },
        uid: format!("uid-{ns}-{name}"),
        created: T0 - 600 * S,
        phase: Some("Running".into()),
        containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 - 590 * S), restart_count: 0 }],
        ..PodFacts::default()
    }
}

fn policy() -> HolderPolicy {
    HolderPolicy {
        namespaces: HolderNamespaces::Only(vec!["atlantis".into()]),
        hostname_pattern: Some(regex::Regex::new("^(?:atlantis-[0-9]+)$").expect("re")),
        skew_tolerance_ns: 2 * S,
    }
}

fn established(p: &PodFacts, by: HolderIdentification) -> Established {
    Established {
        namespace: p.namespace().into(),
        name: p.name().into(),
        uid: p.uid.clone(),
        by,
        hostname: p.host.short_hostname().unwrap_or_default().to_owned(),
        info_sha256: SHA.into(),
        restarts: Some(0),
    }
}

fn judged(lock: &LockFacts, pods: &[PodFacts]) -> Verdict {
    judge(&Facts { lock, established: None, holder_lookup: None, pods: PodView::Listed(pods), policy: &policy() })
}

fn judged_with(lock: &LockFacts, e: &Established, lookup: HolderLookup, pods: &[PodFacts]) -> Verdict {
    judge(&Facts { lock, established: Some(e), holder_lookup: Some(&lookup), pods: PodView::Listed(pods), policy: &policy() })
}

#[test]
fn establishing_by_hostname() {
    let base = pod("atlantis", "atlantis-0");
    let cases: Vec<(&str, &str, Vec<PodFacts>, HolderState, Reason)> = vec![
        ("running holder", "atlantis-0", vec![base.clone()], HolderState::Alive, Reason::PodRunning),
        (
            "completed",
            "atlantis-0",
            vec![PodFacts { phase: Some("Succeeded".into()), ..base.clone() }],
            HolderState::Dead,
            Reason::PodCompleted,
        ),
        (
            "evicted (Failed)",
            "atlantis-0",
            vec![PodFacts { phase: Some("Failed".into()), ..base.clone() }],
            HolderState::Dead,
            Reason::PodCompleted,
        ),
        (
            "a pod created after the lock was never the holder",
            "atlantis-0",
            vec![PodFacts { created: T0 + 3 * S, ..base.clone() }],
            HolderState::Unknown,
            Reason::HolderNotEstablished,
        ),
        (
            "created within the skew tolerance",
            "atlantis-0",
            vec![PodFacts { created: T0 + S, ..base.clone() }],
            HolderState::Alive,
            Reason::PodRunning,
        ),
        (
            "container started after the lock",
            "atlantis-0",
            vec![PodFacts {
                containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 + 10 * S), restart_count: 1 }],
                ..base.clone()
            }],
            HolderState::Dead,
            Reason::ContainerRestarted,
        ),
        (
            "two containers, no annotation: no container rule",
            "atlantis-0",
            vec![PodFacts {
                containers: vec![
                    ContainerFacts { name: "runner".into(), running_since: Some(T0 + 10 * S), restart_count: 1 },
                    ContainerFacts { name: "sidecar".into(), running_since: Some(T0 - S), restart_count: 0 },
                ],
                ..base.clone()
            }],
            HolderState::Alive,
            Reason::PodRunning,
        ),
        (
            "terminating is not death",
            "atlantis-0",
            vec![PodFacts { terminating: true, ..base.clone() }],
            HolderState::Alive,
            Reason::PodTerminating,
        ),
        (
            "phase Unknown is not death",
            "atlantis-0",
            vec![PodFacts { phase: Some("Unknown".into()), ..base.clone() }],
            HolderState::Unknown,
            Reason::PodPhaseUnknown,
        ),
        ("runner gone", "atlantis-3", vec![base.clone()], HolderState::Dead, Reason::RunnerGone),
        ("not a runner hostname", "janes-laptop", vec![base.clone()], HolderState::External, Reason::NoMatchingPod),
        (
            "a same-named pod in a namespace holders may not use is not the holder, nor is the runner gone",
            "atlantis-0",
            vec![pod("elsewhere", "atlantis-0")],
            HolderState::Unknown,
            Reason::RunnerOutsideHolderNamespaces,
        ),
        (
            "two pods yield the hostname",
            "atlantis-0",
            vec![
                base.clone(),
                PodFacts {
                    host: HostnameSpec { hostname: Some("atlantis-0".into()), ..pod("atlantis", "other").host },
                    ..pod("atlantis", "other")
                },
            ],
            HolderState::Ambiguous,
            Reason::SeveralPods,
        ),
        (
            "spec.hostname: found under another name",
            "runner",
            vec![PodFacts {
                host: HostnameSpec { hostname: Some("runner".into()), ..pod("atlantis", "atlantis-7").host },
                ..pod("atlantis", "atlantis-7")
            }],
            HolderState::Alive,
            Reason::PodRunning,
        ),
        (
            "a pod named after the host whose spec.hostname differs is not the holder",
            "atlantis-0",
            vec![PodFacts { host: HostnameSpec { hostname: Some("x".into()), ..base.host.clone() }, ..base.clone() }],
            HolderState::Dead,
            Reason::RunnerGone,
        ),
        (
            "host-network pods never match",
            "atlantis-0",
            vec![PodFacts { host: HostnameSpec { host_network: true, ..base.host.clone() }, ..base.clone() }],
            HolderState::Dead,
            Reason::RunnerGone,
        ),
    ];
    for (what, host, pods, state, reason) in cases {
        let v = judged(&lock(host), &pods);
        assert_eq!((v.state, v.reason), (state, reason), "{what}: {}", v.message);
        if state == HolderState::Alive {
            assert!(v.established.is_some(), "{what}: a live holder found by hostname is established");
        }
    }
}

#[test]
fn a_long_pod_name_is_found_by_its_truncated_hostname() {
    let name = format!("{}-{}", "tf-runner-for-the-payments-platform-production-account", "7d9f8c6b5-x2abc");
    let p = pod("atlantis", &name);
    let host = p.host.short_hostname().expect("hostname");
    assert!(host.len() <= 63 && host != name);
    let v = judged(&lock(host), std::slice::from_ref(&p));
    assert_eq!((v.state, v.reason), (HolderState::Alive, Reason::PodRunning), "{}", v.message);
    // And the pattern rule does not call it gone: a pod yields the hostname.
    let pol = HolderPolicy { hostname_pattern: Some(regex::Regex::new(".*").expect("re")), ..policy() };
    let v = judge(&Facts {
        lock: &lock(host),
        established: None,
        holder_lookup: None,
        pods: PodView::Listed(std::slice::from_ref(&p)),
        policy: &pol,
    });
    assert_ne!(v.state, HolderState::Dead);
}

#[test]
fn an_established_holder_is_judged_by_its_uid() {
    let p = pod("atlantis", "atlantis-0");
    for by in [HolderIdentification::Hostname, HolderIdentification::Gateway] {
        let e = established(&p, by);
        let l = lock("atlantis-0");
        assert_eq!(judged_with(&l, &e, HolderLookup::Found(Box::new(p.clone())), std::slice::from_ref(&p)).state, HolderState::Alive);
        let v = judged_with(&l, &e, HolderLookup::NotFound, &[]);
        assert_eq!((v.state, v.reason), (HolderState::Dead, Reason::PodNotFound));
        // The StatefulSet made a new atlantis-0: the holder is gone.
        let new = PodFacts { uid: "uid-new".into(), created: T0 + 60 * S, ..p.clone() };
        let v = judged_with(&l, &e, HolderLookup::Found(Box::new(new.clone())), std::slice::from_ref(&new));
        assert_eq!((v.state, v.reason), (HolderState::Dead, Reason::PodReplaced));
        // A restart since it was established, whatever the clocks say.
        let restarted = PodFacts {
            containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 - 5 * S), restart_count: 1 }],
            ..p.clone()
        };
        let v = judged_with(&l, &e, HolderLookup::Found(Box::new(restarted.clone())), std::slice::from_ref(&restarted));
        assert_eq!((v.state, v.reason), (HolderState::Dead, Reason::ContainerRestarted));
        assert_eq!(judged_with(&l, &e, HolderLookup::Failed, &[]).state, HolderState::Unknown);
    }
}

#[test]
fn a_record_for_another_instance_or_host_is_ignored() {
    let p = pod("atlantis", "atlantis-0");
    let e = established(&p, HolderIdentification::Gateway);
    // Another lock instance (re-taken): the record says nothing about it.
    let other = LockFacts { info_sha256: Some("bbbb".into()), ..lock("atlantis-0") };
    let v = judged_with(&other, &e, HolderLookup::NotFound, std::slice::from_ref(&p));
    assert_eq!(v.state, HolderState::Alive, "judged afresh by hostname: {}", v.message);
    // An edited Who naming another host: the record is not used for it.
    let edited = lock("atlantis-1");
    let v = judged_with(&edited, &e, HolderLookup::NotFound, std::slice::from_ref(&p));
    assert_eq!(v.reason, Reason::RunnerGone, "judged by its own hostname only");
}

#[test]
fn a_gone_hostname_holder_with_another_candidate_is_ambiguous() {
    let a = pod("atlantis", "atlantis-0");
    let b =
        PodFacts { host: HostnameSpec { hostname: Some("atlantis-0".into()), ..pod("atlantis", "twin").host }, ..pod("atlantis", "twin") };
    let e = established(&a, HolderIdentification::Hostname);
    let v = judged_with(&lock("atlantis-0"), &e, HolderLookup::NotFound, std::slice::from_ref(&b));
    assert_eq!((v.state, v.reason), (HolderState::Ambiguous, Reason::SeveralPods), "{}", v.message);
    // Seen by the gateway, the holder is exact: the twin does not matter.
    let e = established(&a, HolderIdentification::Gateway);
    assert_eq!(judged_with(&lock("atlantis-0"), &e, HolderLookup::NotFound, std::slice::from_ref(&b)).state, HolderState::Dead);
}

#[test]
fn nothing_is_decided_without_complete_facts() {
    let l = lock("atlantis-3");
    for view in [PodView::CacheNotSynced, PodView::ListFailed] {
        let v = judge(&Facts { lock: &l, established: None, holder_lookup: None, pods: view, policy: &policy() });
        assert_eq!(v.state, HolderState::Unknown);
    }
    let malformed = LockFacts { malformed: Some("Info is not JSON".into()), ..l.clone() };
    assert_eq!(judged(&malformed, &[]).reason, Reason::LockMalformed);
    let no_created = LockFacts { created: None, ..l };
    assert_eq!(judged(&no_created, &[]).state, HolderState::Unknown);
    let no_host = LockFacts { hostname: None, ..lock("x") };
    assert_eq!(judged(&no_host, &[]).state, HolderState::External);
}

#[test]
fn every_namespace_only_when_asked() {
    let pol = HolderPolicy { namespaces: HolderNamespaces::All, ..policy() };
    let p = pod("anywhere", "atlantis-0");
    let v = judge(&Facts {
        lock: &lock("atlantis-0"),
        established: None,
        holder_lookup: None,
        pods: PodView::Listed(std::slice::from_ref(&p)),
        policy: &pol,
    });
    assert_eq!(v.state, HolderState::Alive);
    let v = judged(&lock("atlantis-0"), &[p]);
    assert_eq!(v.reason, Reason::RunnerOutsideHolderNamespaces, "outside the holder namespaces: not a candidate, and not gone either");
    assert!(v.established.is_none());
}

// ---- Properties -------------------------------------------------------------------------------

/// How the live holder's hostname comes about.
#[derive(Clone, Debug)]
enum HostShape {
    Name,
    Long,
    SpecHostname,
    Fqdn,
}

fn holder_pod(shape: &HostShape, age: i128, started: i128, restarts: i32, terminating: bool, phase: &str) -> PodFacts {
    let mut p = pod("atlantis", "atlantis-0");
    match shape {
        HostShape::Name => {}
        HostShape::Long => p.host.name = format!("{}-{}", "a-very-long-runner-set-name-for-a-ci-system-that-likes-prefixes", "x2abc"),
        HostShape::SpecHostname => p.host.hostname = Some("runner".into()),
        HostShape::Fqdn => {
            p.host.subdomain = Some("tf".into());
            p.host.set_hostname_as_fqdn = true;
        }
    }
    p.uid = "uid-holder".into();
    p.created = T0 - age * S;
    p.terminating = terminating;
    p.phase = Some(phase.into());
    p.containers = vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 - started * S), restart_count: restarts }];
    p
}

fn who_host(p: &PodFacts) -> String {
    match (&p.host.subdomain, p.host.set_hostname_as_fqdn) {
        (Some(sub), true) => format!("{}.{sub}.{}.svc.cluster.local", p.host.short_hostname().unwrap_or_default(), p.namespace()),
        _ => p.host.short_hostname().unwrap_or_default().to_owned(),
    }
}

/// Other pods, in the shapes that fool hostname matching.
fn arb_other() -> impl Strategy<Value = PodFacts> {
    (
        prop_oneof![Just("atlantis"), Just("other"), Just("kube-system")],
        prop_oneof![Just("atlantis-0"), Just("atlantis-1"), Just("runner"), Just("twin")],
        prop_oneof![Just(None), Just(Some("atlantis-0")), Just(Some("runner"))],
        -100i128..100,
        prop_oneof![Just("Pending"), Just("Running"), Just("Unknown"), Just("Failed"), Just("Succeeded")],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(ns, name, hostname, created, phase, terminating, host_network)| PodFacts {
            host: HostnameSpec {
                namespace: ns.into(),
                name: name.into(),
                hostname: hostname.map(str::to_owned),
                host_network,
                ..HostnameSpec::default()
            },
            uid: format!("uid-{ns}-{name}-{created}"),
            created: T0 + created * S,
            phase: Some(phase.into()),
            terminating,
            containers: vec![ContainerFacts { name: "runner".into(), running_since: Some(T0 + created * S), restart_count: 0 }],
            holder_container: None,
        })
}

/// What a recorded holder can be: none, the truth, a record for another instance, for another
/// host, or a stale hostname-based record naming another pod.
#[derive(Clone, Debug)]
enum Record {
    None,
    Truth(HolderIdentification),
    OtherInstance,
    OtherHost,
    StaleHostname(usize),
}

fn arb_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        Just(Record::None),
        Just(Record::Truth(HolderIdentification::Gateway)),
        Just(Record::Truth(HolderIdentification::Hostname)),
        Just(Record::OtherInstance),
        Just(Record::OtherHost),
        (0usize..6).prop_map(Record::StaleHostname),
    ]
}

proptest! {
    /// The promise: a holder that is alive (created before the lock, its process's container
    /// running since before the lock, not completed) is never judged Dead from complete facts,
    /// whatever other pods exist, whatever was recorded, whatever its hostname's shape.
    #[test]
    fn a_live_holder_is_never_judged_dead(
        shape in prop_oneof![Just(HostShape::Name), Just(HostShape::Long), Just(HostShape::SpecHostname), Just(HostShape::Fqdn)],
        others in proptest::collection::vec(arb_other(), 0..6),
        age in 0i128..10_000,
        started in -2i128..10_000,
        restarts in 0i32..3,
        terminating in any::<bool>(),
        phase in prop_oneof![Just("Running"), Just("Unknown"), Just("Pending")],
        record in arb_record(),
        lookup_fails in any::<bool>(),
        all_namespaces in any::<bool>(),
    ) {
        let holder = holder_pod(&shape, age, started.max(-1), restarts, terminating, phase);
        let host = who_host(&holder);
        let mut pods: Vec<PodFacts> = others.into_iter().filter(|p| !(p.namespace() == "atlantis" && p.name() == holder.name())).collect();
        pods.push(holder.clone());
        let l = lock(&host);
        let e = match record {
            Record::None => None,
            Record::Truth(by) => Some(Established { restarts: Some(restarts), ..established(&holder, by) }).map(|e| Established { hostname: host.clone(), ..e }),
            Record::OtherInstance => Some(Established { info_sha256: "other".into(), uid: "uid-gone".into(), ..established(&holder, HolderIdentification::Gateway) }),
            Record::OtherHost => Some(Established { hostname: "elsewhere".into(), uid: "uid-gone".into(), ..established(&holder, HolderIdentification::Gateway) }),
            Record::StaleHostname(i) => pods.get(i).filter(|p| p.uid != holder.uid).map(|p| Established { hostname: host.clone(), ..established(p, HolderIdentification::Hostname) }),
        };
        let lookup = e.as_ref().map(|e| {
            if lookup_fails { HolderLookup::Failed } else {
                pods.iter().find(|p| p.namespace() == e.namespace && p.name() == e.name).cloned().map_or(HolderLookup::NotFound, |p| HolderLookup::Found(Box::new(p)))
            }
        });
        let pol = HolderPolicy {
            namespaces: if all_namespaces { HolderNamespaces::All } else { HolderNamespaces::Only(vec!["atlantis".into()]) },
            hostname_pattern: Some(regex::Regex::new(".*").expect("re")),
            ..policy()
        };
        let v = judge(&Facts { lock: &l, established: e.as_ref(), holder_lookup: lookup.as_ref(), pods: PodView::Listed(&pods), policy: &pol });
        prop_assert_ne!(v.state, HolderState::Dead, "{:?}", v);
    }

    /// A holder that was never established and whose hostname no pod yields before the lock is
    /// never Alive by accident of another pod: pods created after the lock are never the holder.
    #[test]
    fn pods_created_after_the_lock_are_never_the_holder(others in proptest::collection::vec(arb_other(), 0..6)) {
        let late: Vec<PodFacts> = others.into_iter().map(|p| PodFacts { created: T0 + 10 * S, ..p }).collect();
        let v = judged(&lock("atlantis-0"), &late);
        prop_assert!(v.established.is_none(), "{:?}", v);
        prop_assert!(v.state != HolderState::Alive);
    }
}
