//! What to do about one StateLock once its holder is judged (pure): the manual unlock request,
//! the evidence clock, the grace period, Observe mode, the release, what status says and when to
//! look again.
//!
//! The controller reads the caches and the authorities and judges the holder
//! ([`super::holder_liveness`]); [`decide`] names the steps (events, an unlock, an expiry
//! release); the controller carries them out and [`settle`] says what their outcome means for the
//! status and the requeue. Reasons are enums until the edges (status, events, metrics).

use std::{borrow::Cow, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::{
    holder_liveness::{Reason, Verdict},
    manual_unlock::{self, FORCE_UNLOCK_LIVE_ANNOTATION, UnlockDecision},
};
use crate::crd::{ExpiryMode, HolderState, LockPhase, StateLockStatus};

/// Why a release did not happen (written to `status.release`; published once per reason when
/// `event`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub reason: Cow<'static, str>,
    pub message: String,
    /// Worth an event (a pending grace period is not).
    pub event: bool,
}

impl Blocked {
    fn new(reason: &'static str, message: impl Into<String>, event: bool) -> Self {
        Self { reason: reason.into(), message: message.into(), event }
    }
}

/// A manual unlock request (the annotations as they are on the StateLock).
#[derive(Clone, Copy, Debug)]
pub struct UnlockRequest<'a> {
    pub requested: &'a str,
    pub live_override: Option<&'a str>,
}

/// Everything the decision rests on.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The verdict: from the authorities when they were read, else from the caches.
    pub verdict: &'a Verdict,
    /// The lock item's `ID` as the strongly consistent read returned it; `None` when the
    /// authorities were not read (or could not be).
    pub authority_id: Option<Option<&'a str>>,
    /// The caches suggested death and the authorities did not confirm it: the hint's story.
    pub not_confirmed: Option<String>,
    pub previous: &'a StateLockStatus,
    /// This lock instance (the Info SHA-256).
    pub instance: Option<&'a str>,
    pub unlock: Option<UnlockRequest<'a>>,
    pub mode: ExpiryMode,
    pub grace: Duration,
    /// The grace period as the LockSource spells it, for messages.
    pub grace_text: &'a str,
    pub now: Timestamp,
}

/// What to do with a manual unlock request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnlockStep {
    /// The authorities were not read: nothing is decided, the request is refused.
    NotDecided,
    /// Release through the conditional delete.
    Release,
    /// The requested ID is not the lock item's: nothing is released.
    WrongId { requested: String, actual: Option<String> },
    /// The holder is not known to be dead and the live override is not set.
    RefusedLiveHolder,
}

/// What the evidence of death allows now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpiryStep {
    /// No evidence of death.
    NotDead,
    /// Evidence, held for less than the grace period: look again then.
    Wait(Duration),
    /// The grace period cannot be added to the evidence time: fail closed.
    Never,
    /// Due, but the LockSource only observes.
    Observe,
    /// Due, but the authorities were not read: nothing to condition a delete on.
    NoAuthority,
    /// Release the exact instance the authorities returned.
    Release,
}

/// The steps, in order: announce a death, handle an unlock request (then consume it), then
/// the expiry release unless the unlock already released the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Since when the evidence has held for this lock instance; `None` without evidence.
    pub evidence_since: Option<Timestamp>,
    /// Publish HolderDied (the holder was not Dead before).
    pub announce_death: bool,
    pub unlock: Option<UnlockStep>,
    pub expiry: ExpiryStep,
}

/// What the steps' outcome means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub phase: LockPhase,
    pub blocked: Option<Blocked>,
    pub requeue: Duration,
}

/// Name the steps.
pub fn decide(i: &Input<'_>) -> Decision {
    let v = i.verdict;
    let dead = v.is_dead();
    // Evidence holds from when it was first seen for this lock instance; a new kind of evidence,
    // or another instance (the lock re-taken), starts the clock anew.
    let earlier = i.previous.holder.as_ref().and_then(|h| h.evidence.as_ref());
    let evidence_since = match earlier {
        _ if !dead => None,
        Some(e) if e.reason == v.reason.as_str() && e.info_sha256.is_some() && e.info_sha256.as_deref() == i.instance => {
            Some(e.observed_at.0)
        }
        _ => Some(i.now),
    };
    let announce_death = dead && i.previous.holder.as_ref().is_none_or(|h| h.state != HolderState::Dead);
    let unlock = i.unlock.map(|u| match i.authority_id {
        None => UnlockStep::NotDecided,
        Some(id) => match manual_unlock::decide(u.requested, id, v.state, u.live_override) {
            UnlockDecision::Release => UnlockStep::Release,
            UnlockDecision::WrongId { requested, actual } => UnlockStep::WrongId { requested, actual },
            UnlockDecision::RefusedLiveHolder => UnlockStep::RefusedLiveHolder,
        },
    });
    let expiry = match evidence_since {
        None => ExpiryStep::NotDead,
        Some(seen) => match release_timing(seen, i.grace, i.now) {
            ReleaseTiming::Wait(d) => ExpiryStep::Wait(d),
            ReleaseTiming::Never => ExpiryStep::Never,
            ReleaseTiming::Due if i.mode == ExpiryMode::Observe => ExpiryStep::Observe,
            ReleaseTiming::Due if i.authority_id.is_none() => ExpiryStep::NoAuthority,
            ReleaseTiming::Due => ExpiryStep::Release,
        },
    };
    Decision { evidence_since, announce_death, unlock, expiry }
}

/// The message of a refused unlock request (status and event).
pub fn refused_message(v: &Verdict) -> String {
    format!(
        "the holder is {:?} ({}); only a Dead or External holder is released on request, set {FORCE_UNLOCK_LIVE_ANNOTATION} to the same lock ID as well to release it anyway",
        v.state, v.message
    )
}

/// What the outcome of the steps means. `unlock_released`: the unlock's delete removed the item
/// (or found it gone); `expired`: the expiry delete's result, when it was attempted.
pub fn settle(i: &Input<'_>, d: &Decision, unlock_released: bool, expired: Option<bool>) -> Outcome {
    let v = i.verdict;
    // Pod events drive most reconciles; these are safety nets. An undecided verdict is looked at
    // again soon.
    let mut requeue = match (v.state, v.reason) {
        (_, Reason::CacheNotSynced) => Duration::from_secs(1),
        // Found only by a LIST of every namespace (the pod cache holds the holder namespaces):
        // not repeated every few seconds; pod events in the holder namespaces still trigger.
        (_, Reason::RunnerOutsideHolderNamespaces) => Duration::from_secs(300),
        (HolderState::Unknown, _) => Duration::from_secs(5),
        _ => Duration::from_secs(300),
    };
    let mut phase = if v.is_dead() { LockPhase::HolderDead } else { LockPhase::Held };
    let mut blocked = i.not_confirmed.as_ref().map(|m| Blocked::new("NotConfirmed", m.clone(), true));
    match (&d.unlock, i.unlock) {
        (Some(UnlockStep::NotDecided), Some(u)) => {
            blocked = Some(Blocked::new("UnlockNotDecided", format!("force-unlock {}: {}", u.requested, v.message), false));
        }
        (Some(UnlockStep::RefusedLiveHolder), _) => blocked = Some(Blocked::new("UnlockRefused", refused_message(v), false)),
        (Some(UnlockStep::Release), _) if unlock_released => phase = LockPhase::Released,
        _ => {}
    }
    if phase != LockPhase::Released {
        match &d.expiry {
            ExpiryStep::Wait(w) => {
                requeue = *w;
                blocked = Some(Blocked::new("GracePeriod", format!("evidence must hold for {} before the release", i.grace_text), false));
            }
            ExpiryStep::Never => {
                blocked = Some(Blocked::new(
                    "GracePeriodOverflow",
                    "the grace period cannot be added to the evidence time; nothing is released",
                    true,
                ));
            }
            ExpiryStep::Observe => {
                blocked = Some(Blocked::new(
                    "ObserveMode",
                    "the holder is dead; the LockSource's expiry mode is Observe, so statelock only reports",
                    false,
                ));
            }
            ExpiryStep::Release => {
                match expired {
                    Some(true) => phase = LockPhase::Released,
                    Some(false) => {
                        blocked = Some(Blocked::new(
                            "LockChanged",
                            "the lock item changed between the judgement and the delete; nothing was released",
                            false,
                        ));
                    }
                    None => {}
                }
                requeue = Duration::from_secs(5);
            }
            ExpiryStep::NotDead | ExpiryStep::NoAuthority => {}
        }
    }
    if phase == LockPhase::Released {
        blocked = None;
    } else if blocked.is_none()
        && let Some(prev) = i.previous.release.as_ref().filter(|r| r.reason.starts_with("Unlock"))
        && i.previous.holder.as_ref().is_some_and(|h| h.state == v.state)
    {
        // A refused unlock request is consumed; its reason stays in status while nothing changed.
        blocked = Some(Blocked { reason: prev.reason.clone().into(), message: prev.message.clone(), event: false });
    }
    Outcome { phase, blocked, requeue }
}

/// When a release is due, from when the evidence was first seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseTiming {
    Due,
    Wait(Duration),
    /// The deadline cannot be computed: fail closed.
    Never,
}

pub fn release_timing(evidence_seen: Timestamp, grace: Duration, now: Timestamp) -> ReleaseTiming {
    let Ok(span) = SignedDuration::try_from(grace) else { return ReleaseTiming::Never };
    let Ok(due) = evidence_seen.checked_add(span) else { return ReleaseTiming::Never };
    if now >= due {
        return ReleaseTiming::Due;
    }
    match u64::try_from(due.as_nanosecond() - now.as_nanosecond()) {
        Ok(ns) => ReleaseTiming::Wait(Duration::from_nanos(ns).max(Duration::from_millis(50))),
        Err(_) => ReleaseTiming::Never,
    }
}

#[cfg(test)]
mod tests;
