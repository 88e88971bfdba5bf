//! Manual unlock through annotations: what a request means (pure).
//!
//! `statelock.dev/force-unlock: <lock ID>` asks statelock to release the lock through the same
//! conditional delete as expiry. The ID must match the lock item as a strongly consistent read
//! returns it (as with `terraform force-unlock`). Without `statelock.dev/force-unlock-live: <the same
//! lock ID>` (the override names the lock it is for, so that it never carries over to another
//! request: an override for one lock ID does nothing for a request naming another)
//! only a Dead holder (judged from the authorities) or an External one (outside the cluster: the
//! person decides, as with `terraform force-unlock`) is released; Alive, Unknown and Ambiguous
//! holders need the override. The request is
//! consumed (the annotations are removed, only while they still say what was read, so that a newer
//! request is never lost) whatever the outcome, and an event says what happened. A request that
//! also carries `statelock.dev/force-unlock-request: <token>` (what `kubectl statelock unlock`
//! sets) gets every event that answers it marked: its note begins `[request <token>] ` (a note is cut
//! at its end when too long, never at its beginning), so that the one who asked
//! finds its own answer among others'. A release that fails (an AWS error) keeps the request,
//! answers `UnlockFailed` and is tried again.
//! Manual unlock works in Observe mode too: it is a person's decision, not the controller's.

use crate::crd::HolderState;

pub const FORCE_UNLOCK_ANNOTATION: &str = "statelock.dev/force-unlock";
pub const FORCE_UNLOCK_LIVE_ANNOTATION: &str = "statelock.dev/force-unlock-live";
pub const FORCE_UNLOCK_REQUEST_ANNOTATION: &str = "statelock.dev/force-unlock-request";

/// The request token as it is echoed in answers: 1 to 64 ASCII letters, digits and `-`. Anything
/// else (a hostile or huge value) is not echoed.
pub fn request_token(value: Option<&str>) -> Option<&str> {
    value.filter(|v| (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// The mark that begins the note of every event answering the request with `token`.
pub fn answer_mark(token: Option<&str>) -> String {
    token.map(|t| format!("[request {t}] ")).unwrap_or_default()
}

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
    if needs_override && live_override.map(str::trim) != Some(requested.trim()) {
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
        assert_eq!(decide(right, id, HolderState::Unknown, Some(right)), UnlockDecision::Release);
        assert_eq!(decide(right, id, HolderState::Ambiguous, Some(right)), UnlockDecision::Release);
        assert_eq!(decide(right, id, HolderState::Alive, None), UnlockDecision::RefusedLiveHolder);
        assert_eq!(decide(right, id, HolderState::Alive, Some("false")), UnlockDecision::RefusedLiveHolder);
        assert_eq!(decide(right, id, HolderState::Alive, Some(right)), UnlockDecision::Release);
        // An override names the lock it is for: one for another lock ID (or a bare "true", which
        // names none) does nothing.
        assert_eq!(decide(right, id, HolderState::Alive, Some("true")), UnlockDecision::RefusedLiveHolder);
        assert_eq!(decide(right, id, HolderState::Alive, Some("99999999-0dcf-0332-cbb0-ed1b3daf868d")), UnlockDecision::RefusedLiveHolder);
        assert!(matches!(decide("0000", id, HolderState::Dead, Some("true")), UnlockDecision::WrongId { .. }));
        assert!(
            matches!(decide(right, None, HolderState::Dead, None), UnlockDecision::WrongId { .. }),
            "a lock without an ID cannot be named"
        );
    }

    #[test]
    fn only_plain_tokens_are_echoed() {
        assert_eq!(request_token(Some("3f2a-9c")), Some("3f2a-9c"));
        assert_eq!(answer_mark(request_token(Some("3f2a-9c"))), "[request 3f2a-9c] ");
        for hostile in ["", "a b", "x\nForceUnlocked: released", "[request x]", "ü", &"a".repeat(65)] {
            assert_eq!(request_token(Some(hostile)), None, "{hostile:?}");
        }
        assert_eq!(answer_mark(None), "");
    }
}
