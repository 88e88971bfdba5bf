use serde_json::{Value, json};

use super::*;

const T0: &str = "2026-11-30T00:00:00Z";
const ID: &str = "1edde332-0dcf-0332-cbb0-ed1b3daf868d";
const SHA: &str = "aaaa";

fn t0() -> Timestamp {
    T0.parse().expect("time")
}

fn at(secs: i64) -> Timestamp {
    t0().checked_add(SignedDuration::from_secs(secs)).expect("time")
}

fn verdict(state: HolderState, reason: Reason) -> Verdict {
    Verdict { state, reason, message: "what the judge saw".into(), pod: None, established: None, candidates: vec![] }
}

fn status(v: Value) -> StateLockStatus {
    serde_json::from_value(v).expect("status")
}

/// A previous status: the holder's state, and death evidence (reason, instance, seen at seconds).
fn seen(state: &str, evidence: Option<(&str, Option<&str>, i64)>) -> StateLockStatus {
    let mut holder = json!({"state": state, "reason": "x"});
    if let Some((reason, sha, secs)) = evidence {
        holder["evidence"] = json!({"reason": reason, "message": "m", "observedAt": at(secs).to_string(), "infoSha256": sha});
    }
    status(json!({"holder": holder}))
}

struct Row {
    what: &'static str,
    verdict: Verdict,
    previous: StateLockStatus,
    authority: Option<Option<&'static str>>,
    unlock: Option<(&'static str, Option<&'static str>)>,
    mode: ExpiryMode,
    grace: Duration,
    now: i64,
    not_confirmed: bool,
    // The outcome of the deletes the controller carried out.
    unlock_released: bool,
    expired: Option<bool>,
    // Expected.
    announce: bool,
    unlock_step: Option<UnlockStep>,
    expiry: ExpiryStep,
    phase: LockPhase,
    blocked: Option<&'static str>,
    requeue: Duration,
}

fn row(what: &'static str, verdict: Verdict) -> Row {
    Row {
        what,
        verdict,
        previous: StateLockStatus::default(),
        authority: Some(Some(ID)),
        unlock: None,
        mode: ExpiryMode::Release,
        grace: Duration::from_secs(15),
        now: 0,
        not_confirmed: false,
        unlock_released: false,
        expired: None,
        announce: false,
        unlock_step: None,
        expiry: ExpiryStep::NotDead,
        phase: LockPhase::Held,
        blocked: None,
        requeue: Duration::from_secs(300),
    }
}

fn dead() -> Verdict {
    verdict(HolderState::Dead, Reason::PodNotFound)
}

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

#[test]
fn grace_period_observe_manual_unlock_and_requeue_rules() {
    let rows = vec![
        row("a live holder: nothing to do, looked at again in 5 minutes", verdict(HolderState::Alive, Reason::PodRunning)),
        Row { requeue: s(5), ..row("undecided: looked at again soon", verdict(HolderState::Unknown, Reason::ApiError)) },
        Row { requeue: s(1), ..row("the cache is not synced: sooner still", verdict(HolderState::Unknown, Reason::CacheNotSynced)) },
        row(
            "a runner outside the holder namespaces costs a cluster-wide LIST: not every few seconds",
            verdict(HolderState::Unknown, Reason::RunnerOutsideHolderNamespaces),
        ),
        Row {
            announce: true,
            expiry: ExpiryStep::Wait(s(15)),
            phase: LockPhase::HolderDead,
            blocked: Some("GracePeriod"),
            requeue: s(15),
            ..row("death first seen: announced, and the grace period starts", dead())
        },
        Row {
            previous: seen("Dead", Some(("PodNotFound", Some(SHA), -20))),
            expired: Some(true),
            expiry: ExpiryStep::Release,
            phase: LockPhase::Released,
            requeue: s(5),
            ..row("evidence held past the grace period for this instance: released", dead())
        },
        Row {
            previous: seen("Dead", Some(("PodNotFound", Some(SHA), -20))),
            expired: Some(false),
            expiry: ExpiryStep::Release,
            phase: LockPhase::HolderDead,
            blocked: Some("LockChanged"),
            requeue: s(5),
            ..row("the item changed before the delete: nothing released, said so", dead())
        },
        Row {
            previous: seen("Dead", Some(("PodNotFound", Some("bbbb"), -20))),
            expiry: ExpiryStep::Wait(s(15)),
            phase: LockPhase::HolderDead,
            blocked: Some("GracePeriod"),
            requeue: s(15),
            ..row("evidence about another lock instance does not count: the clock restarts", dead())
        },
        Row {
            previous: seen("Dead", Some(("ContainerRestarted", Some(SHA), -20))),
            expiry: ExpiryStep::Wait(s(15)),
            phase: LockPhase::HolderDead,
            blocked: Some("GracePeriod"),
            requeue: s(15),
            ..row("another kind of evidence restarts the clock", dead())
        },
        Row {
            previous: seen("Dead", Some(("PodNotFound", None, -20))),
            expiry: ExpiryStep::Wait(s(15)),
            phase: LockPhase::HolderDead,
            blocked: Some("GracePeriod"),
            requeue: s(15),
            ..row("evidence that names no instance restarts the clock", dead())
        },
        Row {
            previous: seen("Dead", Some(("PodNotFound", Some(SHA), 30))),
            expiry: ExpiryStep::Wait(s(45)),
            phase: LockPhase::HolderDead,
            blocked: Some("GracePeriod"),
            requeue: s(45),
            ..row("evidence stamped on a clock ahead of ours: wait, never early", dead())
        },
        Row {
            mode: ExpiryMode::Observe,
            grace: s(0),
            announce: true,
            expiry: ExpiryStep::Observe,
            phase: LockPhase::HolderDead,
            blocked: Some("ObserveMode"),
            ..row("Observe mode reports and never releases", dead())
        },
        Row {
            authority: None,
            grace: s(0),
            announce: true,
            expiry: ExpiryStep::NoAuthority,
            phase: LockPhase::HolderDead,
            ..row("due, but no authority was read: nothing to condition a delete on", dead())
        },
        Row {
            grace: Duration::MAX,
            announce: true,
            expiry: ExpiryStep::Never,
            phase: LockPhase::HolderDead,
            blocked: Some("GracePeriodOverflow"),
            ..row("a grace period past the calendar fails closed", dead())
        },
        Row {
            not_confirmed: true,
            blocked: Some("NotConfirmed"),
            requeue: s(5),
            ..row("the caches said dead, the authorities did not", verdict(HolderState::Unknown, Reason::ApiError))
        },
        Row {
            unlock: Some((ID, None)),
            authority: None,
            unlock_step: Some(UnlockStep::NotDecided),
            blocked: Some("UnlockNotDecided"),
            requeue: s(5),
            ..row("an unlock request without the authorities is refused", verdict(HolderState::Unknown, Reason::ApiError))
        },
        Row {
            unlock: Some((ID, None)),
            unlock_step: Some(UnlockStep::RefusedLiveHolder),
            blocked: Some("UnlockRefused"),
            ..row("unlocking a live holder needs the override", verdict(HolderState::Alive, Reason::PodRunning))
        },
        Row {
            unlock: Some((ID, Some(ID))),
            unlock_released: true,
            unlock_step: Some(UnlockStep::Release),
            phase: LockPhase::Released,
            ..row("with the override naming the lock a live holder's lock is released", verdict(HolderState::Alive, Reason::PodRunning))
        },
        Row {
            unlock: Some((ID, Some("true"))),
            unlock_step: Some(UnlockStep::RefusedLiveHolder),
            blocked: Some("UnlockRefused"),
            ..row("an override that does not name the lock (\"true\") does nothing", verdict(HolderState::Alive, Reason::PodRunning))
        },
        Row {
            unlock: Some((ID, Some(ID))),
            unlock_released: false,
            unlock_step: Some(UnlockStep::Release),
            ..row("an unlock whose item changed releases nothing", verdict(HolderState::Alive, Reason::PodRunning))
        },
        Row {
            unlock: Some(("0000", Some("0000"))),
            unlock_step: Some(UnlockStep::WrongId { requested: "0000".into(), actual: Some(ID.into()) }),
            ..row("a wrong ID releases nothing", verdict(HolderState::Alive, Reason::PodRunning))
        },
        Row {
            unlock: Some((ID, None)),
            unlock_released: true,
            unlock_step: Some(UnlockStep::Release),
            phase: LockPhase::Released,
            ..row("an external holder's lock is released on request", verdict(HolderState::External, Reason::NoHostname))
        },
        Row {
            unlock: Some((ID, None)),
            unlock_released: true,
            announce: true,
            unlock_step: Some(UnlockStep::Release),
            expiry: ExpiryStep::Wait(s(15)),
            phase: LockPhase::Released,
            ..row("a dead holder's lock released on request needs no grace period", dead())
        },
        Row {
            previous: status(
                json!({"holder": {"state": "Alive", "reason": "x"}, "release": {"reason": "UnlockRefused", "message": "earlier", "since": T0}}),
            ),
            blocked: Some("UnlockRefused"),
            ..row("a refused request's reason stays while nothing changed", verdict(HolderState::Alive, Reason::PodRunning))
        },
        Row {
            previous: status(
                json!({"holder": {"state": "Alive", "reason": "x"}, "release": {"reason": "UnlockRefused", "message": "earlier", "since": T0}}),
            ),
            requeue: s(5),
            ..row("and goes when the holder's state changes", verdict(HolderState::Unknown, Reason::ApiError))
        },
    ];
    for r in rows {
        let input = Input {
            verdict: &r.verdict,
            authority_id: r.authority,
            not_confirmed: r.not_confirmed.then(|| "the caches suggested death".to_owned()),
            previous: &r.previous,
            instance: Some(SHA),
            unlock: r.unlock.map(|(requested, live_override)| UnlockRequest { requested, live_override }),
            mode: r.mode,
            grace: r.grace,
            grace_text: "15s",
            now: at(r.now),
        };
        let d = decide(&input);
        assert_eq!(d.announce_death, r.announce, "{}: announce", r.what);
        assert_eq!(d.unlock, r.unlock_step, "{}: unlock", r.what);
        assert_eq!(d.expiry, r.expiry, "{}: expiry", r.what);
        let o = settle(&input, &d, r.unlock_released, r.expired);
        assert_eq!(o.phase, r.phase, "{}: phase", r.what);
        assert_eq!(o.blocked.as_ref().map(|b| b.reason.as_ref()), r.blocked, "{}: blocked", r.what);
        assert_eq!(o.requeue, r.requeue, "{}: requeue", r.what);
    }
}

#[test]
fn the_evidence_clock_keeps_its_start_only_for_the_same_instance_and_reason() {
    let previous = seen("Dead", Some(("PodNotFound", Some(SHA), -20)));
    let v = dead();
    let input = |instance| Input {
        verdict: &v,
        authority_id: Some(Some(ID)),
        not_confirmed: None,
        previous: &previous,
        instance,
        unlock: None,
        mode: ExpiryMode::Release,
        grace: s(15),
        grace_text: "15s",
        now: at(0),
    };
    assert_eq!(decide(&input(Some(SHA))).evidence_since, Some(at(-20)));
    assert_eq!(decide(&input(Some("bbbb"))).evidence_since, Some(at(0)));
    assert_eq!(decide(&input(None)).evidence_since, Some(at(0)), "an unknown instance never inherits evidence");
    let alive = verdict(HolderState::Alive, Reason::PodRunning);
    assert_eq!(decide(&Input { verdict: &alive, ..input(Some(SHA)) }).evidence_since, None);
}

#[test]
fn release_timing_is_due_after_the_grace_period_and_fails_closed_on_overflow() {
    let cases = [
        ("no grace", s(0), at(0), ReleaseTiming::Due),
        ("grace over", s(15), at(15), ReleaseTiming::Due),
        ("grace running", s(15), at(5), ReleaseTiming::Wait(s(10))),
        (
            "a moment left waits at least 50 ms",
            s(15),
            at(15) - SignedDuration::from_millis(1),
            ReleaseTiming::Wait(Duration::from_millis(50)),
        ),
        ("evidence seen on a clock ahead of ours: wait, never release early", s(0), at(-30), ReleaseTiming::Wait(s(30))),
        ("a grace that overflows a timestamp", Duration::MAX, at(0), ReleaseTiming::Never),
        ("a grace of centuries waits", s(400 * 365 * 24 * 3600), at(0), ReleaseTiming::Wait(s(400 * 365 * 24 * 3600))),
        ("a grace past the calendar's end", s(9000 * 365 * 24 * 3600), at(0), ReleaseTiming::Never),
    ];
    for (what, grace, now, want) in cases {
        assert_eq!(release_timing(t0(), grace, now), want, "{what}");
    }
}
