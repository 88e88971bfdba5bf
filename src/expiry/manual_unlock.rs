//! Manual unlock through annotations: what a request means (pure).
//!
//! `statelock.dev/force-unlock: <lock ID>` asks statelock to release the lock through the same
//! conditional delete as expiry. The ID must match the lock item as a strongly consistent read
//! returns it (as with `terraform force-unlock`). Without `statelock.dev/force-unlock-live: "true"`
//! only a Dead holder (judged from the authorities) or an External one (outside the cluster: the
//! person decides, as with `terraform force-unlock`) is released; Alive, Unknown and Ambiguous
//! holders need the override. The request is
//! consumed (the annotations are removed) whatever the outcome, and an event says what happened.
//! Manual unlock works in Observe mode too: it is a person's decision, not the controller's.

use crate::crd::HolderState;

pub const FORCE_UNLOCK_ANNOTATION: &str = "statelock.dev/force-unlock";
pub const FORCE_UNLOCK_LIVE_ANNOTATION: &str = "statelock.dev/force-unlock-live";

/// What to do with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnlockDecision {
    /// Release through the conditional delete.
    Release,
    /// The requested ID is not this lock's: release nothing.
    WrongId { requested: String, actual: Option<String> },
    /// The holder is not known to be dead (Alive, Unknown or Ambiguous) and the live override is
    /// not set.
    RefusedLiveHolder,
}

/// Decide a request.
pub fn decide(requested: &str, lock_id: Option<&str>, holder: HolderState, live_override: Option<&str>) -> UnlockDecision {
    if lock_id != Some(requested.trim()) {
        return UnlockDecision::WrongId { requested: requested.to_owned(), actual: lock_id.map(str::to_owned) };
    }
    let needs_override = !matches!(holder, HolderState::Dead | HolderState::External);
    if needs_override && live_override.map(str::trim) != Some("true") {
        return UnlockDecision::RefusedLiveHolder;
    }
    UnlockDecision::Release
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_decided_like_terraform_force_unlock_plus_a_liveness_guard() {
        let id = Some("1edde332-0dcf-0332-cbb0-ed1b3daf868d");
        let right = "1edde332-0dcf-0332-cbb0-ed1b3daf868d";
        assert_eq!(decide(right, id, HolderState::Dead, None), UnlockDecision::Release);
        assert_eq!(decide(right, id, HolderState::External, None), UnlockDecision::Release);
        assert_eq!(decide(right, id, HolderState::Unknown, None), UnlockDecision::RefusedLiveHolder);
        assert_eq!(decide(right, id, HolderState::Ambiguous, None), UnlockDecision::RefusedLiveHolder);
        assert_eq!(decide(right, id, HolderState::Unknown, Some("true")), UnlockDecision::Release);
        assert_eq!(decide(right, id, HolderState::Ambiguous, Some("true")), UnlockDecision::Release);
        assert_eq!(decide(right, id, HolderState::Alive, None), UnlockDecision::RefusedLiveHolder);
        assert_eq!(decide(right, id, HolderState::Alive, Some("false")), UnlockDecision::RefusedLiveHolder);
        assert_eq!(decide(right, id, HolderState::Alive, Some("true")), UnlockDecision::Release);
        assert!(matches!(decide("0000", id, HolderState::Dead, Some("true")), UnlockDecision::WrongId { .. }));
        assert!(
            matches!(decide(right, None, HolderState::Dead, None), UnlockDecision::WrongId { .. }),
            "a lock without an ID cannot be named"
        );
    }
}
