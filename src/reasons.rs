//! Event reasons and condition types: the stable vocabulary users alert on. Documented in the
//! README; never rename one without a deprecation.

/// A lock was taken (a StateLock appeared). Normal.
pub const LOCK_ACQUIRED: &str = "LockAcquired";
/// A lock was released (its StateLock goes away); the note says how long it was held. Normal.
pub const LOCK_RELEASED: &str = "LockReleased";
/// A lock item could not be fully parsed; the note says what is wrong. Warning, once.
pub const LOCK_MALFORMED: &str = "LockMalformed";
/// A lock has been held longer than its source's `staleAfter`. Warning, once.
pub const LOCK_STALE: &str = "LockStale";
/// Two LockIDs map to the same StateLock name; the second is not mirrored. Warning.
pub const LOCK_NAME_COLLISION: &str = "LockNameCollision";

/// Evidence says the holder is dead (on the StateLock and the holder pod). Warning.
pub const HOLDER_DIED: &str = "HolderDied";
/// statelock released the lock after its holder died (on the StateLock and the holder pod). Warning.
pub const LOCK_EXPIRED: &str = "LockExpired";
/// A release was due but the lock item had changed (re-taken): nothing was released. Warning.
pub const RELEASE_SKIPPED: &str = "ReleaseSkipped";
/// A release removed some parts of a lock (the lock file, say) and failed on another (the
/// DynamoDB item): not a release; it is tried again. Warning.
pub const LOCK_PARTIALLY_RELEASED: &str = "LockPartiallyReleased";
/// statelock considered releasing a lock and did not (the reason is in `status.release`).
pub const RELEASE_BLOCKED: &str = "ReleaseBlocked";
/// The gateway saw a pod take a lock whose `Who` names another host: not recorded as the holder.
pub const GATEWAY_HOLDER_MISMATCH: &str = "GatewayHolderMismatch";

/// A `statelock.dev/force-unlock` request released the lock. Warning.
pub const FORCE_UNLOCKED: &str = "ForceUnlocked";
/// A force-unlock request was refused: the holder is not known to be dead (Alive, Unknown or
/// Ambiguous) and the live override is not set, or the authorities could not be read. Warning.
pub const UNLOCK_REFUSED: &str = "UnlockRefused";
/// A force-unlock request named another lock ID: nothing released. Warning.
pub const UNLOCK_ID_MISMATCH: &str = "UnlockIdMismatch";
/// A manual unlock whose release failed (an AWS error): the request is kept and tried again. Warning.
pub const UNLOCK_FAILED: &str = "UnlockFailed";

/// A client tried to take a lock that another holds (seen by the gateway); one series per waiter
/// and lock, on the StateLock and the waiting pod. Warning.
pub const LOCK_CONTENDED: &str = "LockContended";
/// The gateway refused a caller that may not use the table. Warning, on the LockSource and the pod.
pub const GATEWAY_ACCESS_DENIED: &str = "GatewayAccessDenied";

/// Condition: whether the lock item parsed as a Terraform lock.
pub const CONDITION_INFO_VALID: &str = "InfoValid";
/// Condition: whether the lock is older than the source's `staleAfter`.
pub const CONDITION_STALE: &str = "Stale";
/// Condition on a LockSource: whether its table can be read.
pub const CONDITION_READY: &str = "Ready";

/// The label every StateLock carries with the name of its LockSource.
pub const SOURCE_LABEL: &str = "statelock.dev/source";

/// Field manager of the expiry controller (owns `status.holder`, `status.phase`, `status.release`
/// and `status.observedGeneration`).
pub const CONTROLLER_MANAGER: &str = "statelock-controller";

/// Field manager of the gateway's holder record (`status.gatewayHolder`).
pub const GATEWAY_MANAGER: &str = "statelock-gateway";
/// Field manager of the gateway's waiter list (`status.contention`). A separate manager, since a
/// server-side apply removes the fields its manager applied before and omits now.
pub const GATEWAY_WAITERS_MANAGER: &str = "statelock-gateway-waiters";

/// Field manager of the mirror (owns StateLock spec, the mirror's conditions and the LockSource
/// status; the gateway applies StateLock specs under it too, so neither fights the other).
pub const MIRROR_MANAGER: &str = "statelock-mirror";
