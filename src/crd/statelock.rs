//! `StateLock`: one held Terraform/OpenTofu state lock, mirrored from its lock store (an S3 lock
//! file, a DynamoDB item, or both).

// clippy reads the repeated `printcolumn(type_ = ...)` arguments of `#[kube]` as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The lock record of one held Terraform/OpenTofu state lock.
///
/// The mirror owns `spec` and `status.conditions` (server-side apply, field manager
/// `statelock-mirror`); the expiry controller owns `status.phase`, `status.holder` and
/// `status.release` (`statelock-controller`); the gateway owns `status.gatewayHolder`
/// (`statelock-gateway`) and `status.contention` (`statelock-gateway-waiters`).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "statelock.dev",
    version = "v1alpha1",
    kind = "StateLock",
    plural = "statelocks",
    shortname = "slock",
    category = "tflock",
    namespaced,
    status = "StateLockStatus",
    derive = "PartialEq",
    doc = "A Terraform/OpenTofu state lock currently held in a LockSource's lock store (an S3 lock file, a DynamoDB item, or both), with its holder and whether that holder is alive.",
    printcolumn(
        name = "Path",
        type_ = "string",
        json_path = ".spec.lockInfo.path",
        description = "The state path (bucket/key) that is locked"
    ),
    printcolumn(
        name = "Operation",
        type_ = "string",
        json_path = ".spec.operation",
        description = "The Terraform operation holding the lock, as people say it (apply, plan, ...)"
    ),
    printcolumn(
        name = "Holder",
        type_ = "string",
        json_path = ".spec.lockInfo.who",
        description = "Who holds the lock (user@hostname as Terraform wrote it)"
    ),
    printcolumn(
        name = "Holder-State",
        type_ = "string",
        json_path = ".status.holder.state",
        description = "Whether the holder is Alive, Dead, Unknown, External or Ambiguous"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".spec.lockInfo.created", description = "How long the lock has been held"),
    printcolumn(
        name = "Lock-ID",
        type_ = "string",
        json_path = ".spec.lockInfo.id",
        priority = "1",
        description = "The Terraform lock ID (what force-unlock takes)"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.source",
        priority = "1",
        description = "The LockSource whose table holds the lock"
    ),
    printcolumn(
        name = "Stored-In",
        type_ = "string",
        json_path = ".spec.storedIn",
        priority = "1",
        description = "Where the lock's parts are: S3 (a lock file), DynamoDB (an item), or both"
    ),
    printcolumn(
        name = "Waiters",
        type_ = "integer",
        json_path = ".status.contention.waiterCount",
        priority = "1",
        description = "How many clients are waiting for the lock"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StateLockSpec {
    /// Name of the LockSource, in this namespace, whose store holds the lock.
    #[schemars(length(min = 1, max = 253))]
    pub source: String,

    /// The lock's ID as DynamoDB spells it (the `LockID` key of the item): `<bucket>/<key>`, or
    /// `<bucket>/env:/<workspace>/<key>` for a non-default workspace. Its lock file is
    /// `<key>.tflock` in the bucket.
    #[schemars(length(min = 1, max = 2048))]
    pub lock_id: String,

    /// The lock record Terraform wrote in the item's `Info` attribute, as parsed. Fields that are
    /// missing or malformed in the item are absent here; the `InfoValid` condition says why.
    #[serde(default)]
    pub lock_info: LockInfo,

    /// The operation holding the lock in the words people use: `apply`, `plan` or `refresh` for
    /// Terraform's `OperationTypeApply`, `OperationTypePlan` and `OperationTypeRefresh`;
    /// anything else as written in `lockInfo.operation` (for example `state-rm` or `init`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub operation: Option<String>,

    /// Lowercase hex SHA-256 of the exact `Info` attribute value. It identifies this lock instance:
    /// statelock releases a lock only while the item still carries this exact `Info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub info_sha256: Option<String>,

    /// The raw `Info` attribute, kept only when it could not be parsed, cut to its first 4096
    /// bytes (at a character boundary) so that nothing about a malformed item is hidden.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub raw_info: Option<String>,

    /// Where the lock's parts were seen: `S3` (the lock file), `DynamoDB` (the item), or both (a
    /// backend with `use_lockfile` and `dynamodb_table`). A release releases every part, each
    /// conditioned on the exact instance read from its store at that moment (this list is a
    /// hint, never the facts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub stored_in: Vec<crate::lock_store::StoreKind>,
}

/// The fields of Terraform's `LockInfo` record (`statemgr.LockInfo`), as written by Terraform and
/// OpenTofu into the `Info` attribute.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LockInfo {
    /// The lock ID (`ID`): 16 random bytes as 8-4-4-4-12 hex. It is what `terraform
    /// force-unlock` and the `statelock.dev/force-unlock` annotation take. Not necessarily an
    /// RFC-4122 UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,

    /// The operation holding the lock (`Operation`), e.g. `OperationTypeApply`,
    /// `OperationTypePlan`, `state-rm` or `init`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,

    /// Free-form extra information (`Info`); empty for the S3 backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,

    /// Who took the lock (`Who`): `user@hostname`. In Kubernetes the hostname is the pod's
    /// hostname (its name unless the pod sets `spec.hostname`); the user part may be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,

    /// The Terraform or OpenTofu version that took the lock (`Version`), without a `v` prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,

    /// When the lock was first requested (`Created`), exactly as written: RFC 3339 in UTC with 0
    /// to 9 fractional digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub created: Option<String>,

    /// The locked state path (`Path`); for the S3 backend equal to the LockID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// What statelock knows about a lock: its holder, waiters and life-cycle.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StateLockStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Where the lock is in its life-cycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LockPhase>,

    /// Who holds the lock and whether that holder is alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<HolderStatus>,

    /// The pod the gateway saw take this lock: the strongest evidence of who holds it. Written
    /// only by the gateway; the controller reads it to resolve the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_holder: Option<Box<GatewayHolder>>,

    /// The clients currently waiting for this lock, as seen by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contention: Option<Box<ContentionStatus>>,

    /// Why statelock has not released this lock although it considered doing so (a dead holder in
    /// Observe mode, the grace period, evidence the authorities did not confirm, a refused or
    /// undecided manual unlock, a LockSource the operator refuses). Absent while there is nothing
    /// to release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Box<ReleaseStatus>>,

    /// The mirror's observations of the lock record (`InfoValid`, `Stale`), one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Where a lock is in its life-cycle.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum LockPhase {
    /// The lock is held and its holder is not known to be dead.
    Held,
    /// Evidence says the holder is dead; the lock is released when the grace period ends (mode
    /// Release) or only reported (mode Observe).
    HolderDead,
    /// statelock released the lock in DynamoDB; the object goes away with the next sync.
    Released,
}

/// Whether a lock's holder is alive.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum HolderState {
    /// The holder pod exists and nothing says it has stopped.
    Alive,
    /// Positive evidence says the holder is gone (see `holder.evidence`).
    Dead,
    /// Not enough evidence either way yet (cache not synced, API error, ...); nothing is done.
    Unknown,
    /// The holder is not a pod statelock can see (a laptop, a CI runner elsewhere); never expired
    /// automatically.
    External,
    /// Several pods could be the holder; never expired automatically.
    Ambiguous,
}

/// How the holder pod was identified.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum HolderIdentification {
    /// The gateway saw this pod take the lock (from the caller's address): the strongest evidence.
    Gateway,
    /// The hostname part of `Who` matched a pod's hostname.
    Hostname,
}

/// Who holds a lock, and whether that holder is alive.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HolderStatus {
    /// Whether the holder is alive.
    pub state: HolderState,

    /// A CamelCase reason for the state: `PodRunning`, `PodTerminating`, `PodPhaseUnknown`,
    /// `PodNotFound`, `PodReplaced`, `PodCompleted`, `ContainerRestarted`, `RunnerGone`,
    /// `NoHostname`, `NoMatchingPod`, `SeveralPods`, `HolderNotEstablished`,
    /// `RunnerOutsideHolderNamespaces`, `LockMalformed`, `CacheNotSynced`, `ApiError`,
    /// `SourceNotFound`, `SourceRefused`.
    pub reason: String,

    /// A human-readable explanation of the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// The hostname part of `Who`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,

    /// How the holder pod was identified, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identified_by: Option<HolderIdentification>,

    /// Namespace of the holder pod, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// Name of the holder pod, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,

    /// UID of the holder pod, when known. A pod of the same name with another UID is a different pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,

    /// The pods (`namespace/name`) that could be the holder, when there are several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,

    /// The evidence of death, once seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Box<DeathEvidence>>,

    /// The pod established as the holder of this lock instance, recorded the first time it was
    /// established. Evidence of death is only ever about this pod (or, for runner hostnames, about
    /// the absence of any pod with the hostname).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established: Option<Box<EstablishedHolder>>,

    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// A pod established as the holder of one lock instance.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EstablishedHolder {
    /// Namespace of the pod.
    pub namespace: String,

    /// Name of the pod.
    pub pod: String,

    /// UID of the pod: once it no longer exists, the holder is gone.
    pub uid: String,

    /// How it was established: `Gateway` (it took the lock through the gateway) or `Hostname`
    /// (the only pod in the holder namespaces whose hostname is the host in `Who` and that existed
    /// before the lock was taken).
    pub by: HolderIdentification,

    /// The host in `Who` it was established for.
    pub hostname: String,

    /// SHA-256 of the exact `Info` of the lock instance it holds.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub info_sha256: String,

    /// The restart count of its holder container when established (when one container is watched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<i32>,

    /// When it was established.
    pub at: Time,
}

/// Why a lock was not released.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseStatus {
    /// A CamelCase reason: `GracePeriod`, `GracePeriodOverflow`, `ObserveMode`, `NotConfirmed`,
    /// `LockChanged`, `UnlockRefused`, `UnlockNotDecided` or `SourceRefused`.
    pub reason: String,

    /// What exactly stopped the release.
    pub message: String,

    /// When this reason was first recorded.
    pub since: Time,
}

/// The pod the gateway saw take a lock.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayHolder {
    /// Namespace of the pod.
    pub namespace: String,

    /// Name of the pod.
    pub pod: String,

    /// UID of the pod: a pod of the same name with another UID is a different pod.
    pub uid: String,

    /// The lock ID the pod took (the holder record applies to this lock instance only).
    pub lock_id: String,

    /// The LockSource (in this namespace) through whose table the pod took the lock: the record
    /// counts only for that table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,

    /// SHA-256 of the exact `Info` the pod wrote: the lock instance it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub info_sha256: Option<String>,

    /// When the gateway granted the lock.
    pub seen_at: Time,
}

/// Evidence that a holder is dead.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeathEvidence {
    /// The kind of evidence: `PodNotFound`, `PodReplaced`, `PodCompleted`, `ContainerRestarted`
    /// or `RunnerGone`.
    pub reason: String,

    /// What exactly was observed.
    pub message: String,

    /// When the evidence was first observed; the grace period counts from here.
    pub observed_at: Time,

    /// SHA-256 of the exact `Info` of the lock instance the evidence is about: evidence never
    /// carries over to a lock taken again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_sha256: Option<String>,
}

/// The clients waiting for a lock.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContentionStatus {
    /// How many clients are waiting now.
    pub waiter_count: i32,

    /// The waiting clients, one per lock ID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub waiters: Vec<Waiter>,
}

/// A client waiting for a lock.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Waiter {
    /// The lock ID the waiter is trying to take.
    pub id: String,

    /// The waiter's `Who`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,

    /// The waiter's operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,

    /// Namespace of the waiting pod, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// Name of the waiting pod, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,

    /// When the waiter first tried to take the lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt: Option<Time>,

    /// When the waiter last tried to take the lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<Time>,

    /// How many times the waiter has tried.
    pub attempts: i32,
}
