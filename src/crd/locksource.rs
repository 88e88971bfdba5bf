//! `LockSource`: a Terraform lock store (S3 lock files, a DynamoDB lock table, or both, as a
//! backend that sets `use_lockfile` and `dynamodb_table` uses them), and how statelock treats the
//! locks in it.

// clippy reads the repeated `printcolumn(type_ = ...)` arguments of `#[kube]` as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::GoDuration;

/// Where Terraform/OpenTofu keeps state locks (S3 lock files, a DynamoDB table, or both), and the
/// policy statelock applies to them.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "statelock.dev",
    version = "v1alpha1",
    kind = "LockSource",
    plural = "locksources",
    shortname = "lsrc",
    category = "tflock",
    namespaced,
    status = "LockSourceStatus",
    derive = "PartialEq",
    doc = "Where Terraform/OpenTofu keeps state locks (S3 lock files, a DynamoDB table, or both) that statelock mirrors into StateLocks in this namespace, and the policy for expiring them.",
    printcolumn(name = "Bucket", type_ = "string", json_path = ".spec.s3.bucket", description = "The S3 bucket of the lock files"),
    printcolumn(name = "Table", type_ = "string", json_path = ".spec.dynamodb.tableName", description = "The DynamoDB table"),
    printcolumn(name = "Expiry", type_ = "string", json_path = ".spec.expiry.mode", description = "Release or Observe"),
    printcolumn(name = "Sync", type_ = "string", json_path = ".status.syncMode", description = "The sync mode in use"),
    printcolumn(name = "Locks", type_ = "integer", json_path = ".status.lockCount", description = "Locks held now"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the table can be read"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp", description = "Age of the LockSource")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.s3) || has(self.dynamodb)", "message": "a LockSource names spec.s3 (lock files), spec.dynamodb (a lock table), or both"},
]))]
pub struct LockSourceSpec {
    /// The S3 lock files (`use_lockfile = true`, Terraform 1.11+ and OpenTofu 1.10+): the state
    /// bucket and the key prefix under which lock files are looked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3LockFiles>,

    /// The DynamoDB table (`dynamodb_table`) and how to reach it. With `s3` too, a lock is one
    /// StateLock whose parts are the lock file and the item, and releasing it releases both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamodb: Option<DynamoDbTable>,

    /// How statelock keeps its StateLocks in step with the table.
    #[serde(default)]
    pub sync: SyncSpec,

    /// Where the Terraform runners that take these locks run.
    #[serde(default)]
    pub holders: HolderSpec,

    /// When and how locks whose holder died are released.
    #[serde(default)]
    pub expiry: ExpirySpec,

    /// Who may use this table through the statelock gateway.
    #[serde(default)]
    pub gateway: GatewaySpec,
}

/// A DynamoDB table with the key schema Terraform uses (hash key `LockID`, type S).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DynamoDbTable {
    /// The table name, as in the backend's `dynamodb_table`.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9_.-]{3,255}$"))]
    pub table_name: String,

    /// The AWS region of the table, e.g. `eu-west-1`.
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,64}$"))]
    pub region: String,

    /// An endpoint URL overriding the regional DynamoDB endpoint, for DynamoDB-compatible servers
    /// or VPC endpoints. Unset means the AWS default for the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s/?#]+(/[^\s]*)?$"))]
    pub endpoint: Option<String>,

    /// A Secret in this namespace holding static AWS credentials for the table. Unset means the
    /// operator's default credential chain (environment, IRSA web identity, instance profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,
}

/// The lock files of a state bucket.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3LockFiles {
    /// The state bucket, as in the backend's `bucket`.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"))]
    pub bucket: String,

    /// Only lock files whose key starts with this prefix are mirrored (for example `team-a/`, or
    /// `env:/` for workspaces only). Empty (the default) means the whole bucket. The listing also
    /// returns the state objects under the prefix (S3 cannot filter by suffix); they are never read.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub prefix: String,

    /// The AWS region of the bucket, e.g. `eu-west-1`.
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,64}$"))]
    pub region: String,

    /// An endpoint URL overriding the regional S3 endpoint (S3-compatible servers, VPC
    /// endpoints); path-style addressing is used with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s/?#]+(/[^\s]*)?$"))]
    pub endpoint: Option<String>,

    /// A Secret in this namespace holding static AWS credentials for the bucket. Unset means the
    /// operator's default credential chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,

    /// Event mode: follow the bucket's S3 Event Notifications through an SQS queue, for changes
    /// seen in well under a second at a few requests a minute, with a full listing every
    /// `resyncInterval` as the safety net. Unset: the bucket is listed every `sync.interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<S3Events>,
}

/// The SQS queue that receives the bucket's `s3:ObjectCreated:*` and `s3:ObjectRemoved:*` Event
/// Notifications (filtered to the suffix `.tflock`, and the prefix, if you like). The queue is
/// statelock's alone: it deletes the messages it has handled. An event only says which lock file
/// to read again; what the mirror shows is what the read returns.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Events {
    /// The queue's URL, e.g. `https://sqs.eu-west-1.amazonaws.com/123456789012/statelock-tfstate`.
    /// It is reached with the bucket's credentials; an origin other than AWS's own SQS endpoint
    /// of the bucket's region must be on the operator's endpoint allow-list.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s/?#]+/[^\s?#]+$"))]
    pub queue_url: String,

    /// How often the whole prefix is listed anyway (events can be lost: a queue purged, a
    /// notification configuration edited), e.g. `5m`. At least `sync.interval`.
    #[serde(default = "default_resync_interval")]
    pub resync_interval: GoDuration,
}

fn default_resync_interval() -> GoDuration {
    GoDuration::from_secs(300)
}

impl S3Events {
    /// The queue's origin (`scheme://host[:port]`): the SQS endpoint its calls go to.
    pub fn endpoint(&self) -> Option<&str> {
        let rest = self.queue_url.strip_prefix("https://").or_else(|| self.queue_url.strip_prefix("http://"))?;
        let host_end = rest.find('/')?;
        Some(&self.queue_url[..self.queue_url.len() - rest.len() + host_end])
    }

    /// Whether the queue is AWS's own SQS endpoint for `region` (allowed without the allow-list).
    pub fn is_aws_endpoint(&self, region: &str) -> bool {
        self.endpoint()
            .is_some_and(|e| e == format!("https://sqs.{region}.amazonaws.com") || e == format!("https://sqs.{region}.amazonaws.com.cn"))
    }
}

/// A Secret holding static AWS credentials.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, in the LockSource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Key of the access key ID in the Secret.
    #[serde(default = "default_access_key_id_key")]
    pub access_key_id_key: String,

    /// Key of the secret access key in the Secret.
    #[serde(default = "default_secret_access_key_key")]
    pub secret_access_key_key: String,

    /// Key of an optional session token in the Secret; used when the key is present.
    #[serde(default = "default_session_token_key")]
    pub session_token_key: String,
}

fn default_access_key_id_key() -> String {
    "AWS_ACCESS_KEY_ID".into()
}
fn default_secret_access_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}
fn default_session_token_key() -> String {
    "AWS_SESSION_TOKEN".into()
}

/// How statelock keeps its StateLocks in step with the table.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.interval) >= duration('1s')", "message": "sync.interval must be at least 1s"},
    {"rule": "duration(self.interval) <= duration('24h')", "message": "sync.interval must be at most 24h"},
    {"rule": "!has(self.streamPollInterval) || (duration(self.streamPollInterval) >= duration('100ms') && duration(self.streamPollInterval) <= duration('1h'))",
     "message": "sync.streamPollInterval must be between 100ms and 1h"},
]))]
pub struct SyncSpec {
    /// `Auto` reads the table's DynamoDB Stream when it has one and scans otherwise; `Streams`
    /// requires a stream; `Scan` always scans.
    #[serde(default)]
    pub mode: SyncMode,

    /// In Scan mode, how often the table is scanned. In Streams mode, how often ages are
    /// re-checked (for Stale) without reading the table; changes arrive through the stream, and a
    /// full Scan runs only when a stream is opened (at start, when the table's stream was replaced
    /// or its position lost) and every hour.
    #[serde(default = "default_sync_interval")]
    pub interval: GoDuration,

    /// In Streams mode, how often each open shard is polled (at least 100ms). Every poll is a
    /// stream read request that AWS bills; the poll interval is about the longest a change waits
    /// to be seen. A lock taken or released through the statelock gateway is polled for at once.
    #[serde(default = "default_stream_poll_interval")]
    pub stream_poll_interval: GoDuration,
}

impl Default for SyncSpec {
    fn default() -> Self {
        Self { mode: SyncMode::default(), interval: default_sync_interval(), stream_poll_interval: default_stream_poll_interval() }
    }
}

fn default_stream_poll_interval() -> GoDuration {
    GoDuration::from_millis(200)
}

fn default_sync_interval() -> GoDuration {
    GoDuration::from_secs(5)
}

/// How to detect changes in the table.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum SyncMode {
    /// Streams when the table has a stream, Scan otherwise.
    #[default]
    Auto,
    /// DynamoDB Streams only.
    Streams,
    /// A full Scan every interval.
    Scan,
}

/// Where the Terraform runners that take these locks run.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HolderSpec {
    /// Namespaces whose pods may hold these locks. Empty (the default) means only this
    /// LockSource's own namespace; `["*"]` means every namespace, which must be asked for
    /// explicitly: then any pod of the cluster whose hostname is the host in `Who` may be judged
    /// as the holder.
    #[serde(default)]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 63, "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?|\\*)$"}))]
    pub namespaces: Vec<String>,

    /// A regular expression (anchored at both ends) for hostnames of in-cluster runners. When the
    /// hostname in `Who` matches it and no such pod exists, that absence counts as evidence of
    /// death; other holders with no matching pod are External and never expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub hostname_pattern: Option<String>,
}

/// When and how locks whose holder died are released.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.gracePeriod) <= duration('168h')", "message": "expiry.gracePeriod must be at most 168h"},
    {"rule": "duration(self.staleAfter) <= duration('8760h')", "message": "expiry.staleAfter must be at most 8760h"},
    {"rule": "duration(self.skewTolerance) <= duration('10m')", "message": "expiry.skewTolerance must be at most 10m"},
]))]
pub struct ExpirySpec {
    /// `Release` deletes the lock item once its holder is dead for the grace period; `Observe`
    /// (the default) only reports. Releasing is opt-in per LockSource.
    #[serde(default)]
    pub mode: ExpiryMode,

    /// How long evidence of death must hold before the lock is released.
    #[serde(default = "default_grace_period")]
    pub grace_period: GoDuration,

    /// A lock held longer than this gets a Stale condition and one Warning event. Age alone
    /// never releases a lock.
    #[serde(default = "default_stale_after")]
    pub stale_after: GoDuration,

    /// How far apart clocks may be: timestamps closer than this (a pod created "after" the lock,
    /// a container started "after" it) are not taken as evidence.
    #[serde(default = "default_skew_tolerance")]
    pub skew_tolerance: GoDuration,
}

impl Default for ExpirySpec {
    fn default() -> Self {
        Self {
            mode: ExpiryMode::default(),
            grace_period: default_grace_period(),
            stale_after: default_stale_after(),
            skew_tolerance: default_skew_tolerance(),
        }
    }
}

fn default_grace_period() -> GoDuration {
    GoDuration::from_secs(15)
}
fn default_stale_after() -> GoDuration {
    GoDuration::from_hours(1)
}
fn default_skew_tolerance() -> GoDuration {
    GoDuration::from_secs(2)
}

/// What to do with a lock whose holder is dead.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ExpiryMode {
    /// Release the lock with a conditional delete.
    Release,
    /// Report only; never delete.
    #[default]
    Observe,
}

/// Who may use the table through the statelock gateway.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Namespaces whose pods may use the table through the gateway. Unset means only this
    /// LockSource's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 63, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}))]
    pub allowed_namespaces: Option<Vec<String>>,

    /// CIDR ranges of callers that are not pods and may use the table through the gateway. None
    /// by default. A caller that is a pod is admitted only by its namespace, never by a range.
    #[serde(default)]
    #[schemars(length(max = 32), extend("items" = {"type": "string", "maxLength": 43}), extend("x-kubernetes-validations" = [{"rule": "self.all(r, isCIDR(r))", "message": "every allowedSourceRanges entry must be a CIDR such as 10.0.0.0/8"}]))]
    pub allowed_source_ranges: Vec<String>,
}

/// What statelock observed about the table.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LockSourceStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` says whether the table can be read, with a reason when it cannot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// How many locks the table holds now (digest items not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_count: Option<i32>,

    /// When a sync pass (a full Scan, or following the stream) last succeeded; refreshed at most
    /// once a minute while nothing else changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,

    /// The sync mode in use (`Streams` or `Scan`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_mode: Option<SyncMode>,
}

/// The largest values the CRD's validation rules admit; checked here too, since an API server
/// that does not run the CEL rules (or an object stored before they existed) must not make a
/// release due at once or overflow a timestamp.
pub const MAX_GRACE_PERIOD: std::time::Duration = std::time::Duration::from_secs(168 * 3600);
pub const MAX_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(8760 * 3600);
pub const MAX_SKEW_TOLERANCE: std::time::Duration = std::time::Duration::from_secs(600);
pub const MAX_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The longest `s3.events.resyncInterval`.
pub const MAX_RESYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
pub const MIN_STREAM_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
pub const MAX_STREAM_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

impl LockSourceSpec {
    /// What is wrong with the spec, in words; empty when it can be served.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.s3.is_none() && self.dynamodb.is_none() {
            out.push("the LockSource names neither spec.s3 (lock files) nor spec.dynamodb (a lock table)".into());
        }
        if let Some(s3) = &self.s3
            && s3.bucket.is_empty()
        {
            out.push("spec.s3.bucket is empty".into());
        }
        if let Some(ev) = self.s3.as_ref().and_then(|s| s.events.as_ref()) {
            if ev.endpoint().is_none() {
                out.push("s3.events.queueUrl is not an http(s) URL with a path".into());
            }
            if ev.resync_interval.problem().is_none() && ev.resync_interval.get() < self.sync.interval.get() {
                out.push(format!("s3.events.resyncInterval is {}, less than sync.interval ({})", ev.resync_interval, self.sync.interval));
            }
        }
        let bounded = |what: &str, d: &GoDuration, max: std::time::Duration, out: &mut Vec<String>| {
            if let Some(p) = d.problem() {
                out.push(format!("{what}: {p}"));
            } else if d.get() > max {
                out.push(format!("{what} is {d}, more than the maximum of {}s", max.as_secs()));
            }
        };
        bounded("expiry.gracePeriod", &self.expiry.grace_period, MAX_GRACE_PERIOD, &mut out);
        bounded("expiry.staleAfter", &self.expiry.stale_after, MAX_STALE_AFTER, &mut out);
        bounded("expiry.skewTolerance", &self.expiry.skew_tolerance, MAX_SKEW_TOLERANCE, &mut out);
        bounded("sync.interval", &self.sync.interval, MAX_SYNC_INTERVAL, &mut out);
        if let Some(ev) = self.s3.as_ref().and_then(|s| s.events.as_ref()) {
            bounded("s3.events.resyncInterval", &ev.resync_interval, MAX_RESYNC_INTERVAL, &mut out);
        }
        if self.sync.interval.get() < std::time::Duration::from_secs(1) {
            out.push(format!("sync.interval is {}, less than 1s", self.sync.interval));
        }
        bounded("sync.streamPollInterval", &self.sync.stream_poll_interval, MAX_STREAM_POLL_INTERVAL, &mut out);
        if self.sync.stream_poll_interval.get() < MIN_STREAM_POLL_INTERVAL {
            out.push(format!("sync.streamPollInterval is {}, less than 100ms", self.sync.stream_poll_interval));
        }
        if let Some(p) = &self.holders.hostname_pattern
            && let Err(e) = self.holders.compiled_pattern_of(p)
        {
            out.push(format!("holders.hostnamePattern does not compile: {e}"));
        }
        if self.holders.namespaces.iter().any(|n| n == "*") && self.holders.namespaces.len() > 1 {
            out.push("holders.namespaces: \"*\" (every namespace) must be the only entry".into());
        }
        // Namespace names become parts of API paths (the pod watches): only real names pass.
        for n in self.holders.namespaces.iter().filter(|n| *n != "*") {
            if !is_namespace_name(n) {
                out.push(format!("holders.namespaces: {:?} is not a namespace name", crate::lock_record::truncate(n, 64)));
            }
        }
        for n in self.gateway.allowed_namespaces.iter().flatten() {
            if !is_namespace_name(n) {
                out.push(format!("gateway.allowedNamespaces: {:?} is not a namespace name", crate::lock_record::truncate(n, 64)));
            }
        }
        out
    }
}

/// A DNS-1123 label: what a namespace's name must be.
pub fn is_namespace_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl HolderSpec {
    /// The hostname pattern, anchored at both ends, with a bounded compiled size.
    pub fn compiled_pattern(&self) -> Option<Result<regex::Regex, regex::Error>> {
        self.hostname_pattern.as_deref().map(|p| self.compiled_pattern_of(p))
    }

    fn compiled_pattern_of(&self, p: &str) -> Result<regex::Regex, regex::Error> {
        regex::RegexBuilder::new(&format!("^(?:{p})$")).size_limit(1 << 20).dfa_size_limit(1 << 20).build()
    }

    /// The namespaces whose pods may hold the locks of a LockSource in `own_namespace`.
    pub fn resolved_namespaces(&self, own_namespace: &str) -> crate::expiry::holder_liveness::HolderNamespaces {
        use crate::expiry::holder_liveness::HolderNamespaces;
        if self.namespaces.iter().any(|n| n == "*") {
            HolderNamespaces::All
        } else if self.namespaces.is_empty() {
            HolderNamespaces::Only(vec![own_namespace.to_owned()])
        } else {
            HolderNamespaces::Only(self.namespaces.clone())
        }
    }
}
