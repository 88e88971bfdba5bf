//! The lock-store seam: where a Terraform lock record is kept, read from its authority and
//! released exactly. A state lock may have parts in several stores (a backend with both
//! `use_lockfile` and `dynamodb_table` writes a lock file and a DynamoDB item with the same Info);
//! each part is read and released through its store, conditioned on the exact instance judged
//! (the Info for an item, the ETag for a file).
//!
//! A new store (the Kubernetes backend's Leases, say) is a module implementing [`LockStore`] plus
//! an arm in [`stores_of`]; the expiry controller only sees parts.

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    crd::LockSourceSpec,
    dynamo::{
        self, DynamoError,
        lock_item::{TableItem, parse_item},
    },
    errors::ErrorCategory,
    lock_record::LockRecord,
    s3::{self, S3Error},
};

/// What a release attempt did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The lock instance was deleted.
    Released,
    /// There was no lock part any more: nothing to do.
    AlreadyGone,
    /// The part is another lock instance now (re-taken, or changed): nothing was deleted.
    HeldByAnother,
}

/// The kind of store a part of a lock is kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum StoreKind {
    /// An S3 lock file (`<state key>.tflock`).
    S3,
    /// A DynamoDB lock-table item.
    DynamoDB,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::S3 => "S3",
            Self::DynamoDB => "DynamoDB",
        }
    }

    /// The part in words, for events.
    pub fn part_name(self) -> &'static str {
        match self {
            Self::S3 => "lock file",
            Self::DynamoDB => "DynamoDB item",
        }
    }
}

/// One part of a lock as its authority returned it, and what an exact release of it is
/// conditioned on.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldPart {
    pub kind: StoreKind,
    pub record: LockRecord,
    /// The exact Info (DynamoDB) or the ETag (S3) of the instance read.
    pub condition: String,
    /// False when the authority holds something that is not a lock record (never released).
    pub is_lock: bool,
}

/// A store call that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Dynamo(#[from] DynamoError),
    #[error(transparent)]
    S3(#[from] S3Error),
    /// The store cannot release exactly (an S3-compatible endpoint that ignores `If-Match`).
    #[error("{0}")]
    CannotReleaseExactly(String),
}

impl StoreError {
    pub fn category(&self) -> ErrorCategory {
        match self {
            Self::Dynamo(e) => e.category(),
            Self::S3(e) => e.category(),
            Self::CannotReleaseExactly(_) => ErrorCategory::S3Refused,
        }
    }
}

/// A store of lock records: read one lock's part from the authority, release exactly that part.
pub trait LockStore: Send + Sync {
    fn kind(&self) -> StoreKind;
    /// Whether this store may read and release the part of `lock_id` (an S3 store only lock files
    /// under its LockSource's prefix, with keys no server could normalise into another).
    fn covers(&self, lock_id: &str) -> bool;
    /// The part of `lock_id` as a strongly consistent read returns it.
    fn read<'a>(&'a self, lock_id: &'a str) -> BoxFuture<'a, Result<Option<HeldPart>, StoreError>>;
    /// Delete the part only while it is the instance `part` describes.
    fn release<'a>(&'a self, lock_id: &'a str, part: &'a HeldPart) -> BoxFuture<'a, Result<ReleaseOutcome, StoreError>>;
}

/// A DynamoDB lock table.
pub struct DynamoStore {
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
}

impl LockStore for DynamoStore {
    fn kind(&self) -> StoreKind {
        StoreKind::DynamoDB
    }

    fn covers(&self, _lock_id: &str) -> bool {
        true
    }

    fn read<'a>(&'a self, lock_id: &'a str) -> BoxFuture<'a, Result<Option<HeldPart>, StoreError>> {
        Box::pin(async move {
            let (item, _) = dynamo::get_item(&self.client, &self.table, lock_id).await?;
            let Some(item) = item else { return Ok(None) };
            Ok(Some(match parse_item(&item) {
                TableItem::Lock(r) => {
                    let condition = r.raw_info.clone().unwrap_or_default();
                    // An item whose Info is not a string cannot be released exactly.
                    let is_lock = r.raw_info.is_some();
                    HeldPart { kind: StoreKind::DynamoDB, record: *r, condition, is_lock }
                }
                TableItem::Digest { .. } | TableItem::Unusable { .. } => HeldPart {
                    kind: StoreKind::DynamoDB,
                    record: LockRecord::without_info(lock_id.to_owned()),
                    condition: String::new(),
                    is_lock: false,
                },
            }))
        })
    }

    fn release<'a>(&'a self, lock_id: &'a str, part: &'a HeldPart) -> BoxFuture<'a, Result<ReleaseOutcome, StoreError>> {
        Box::pin(async move {
            if !part.is_lock {
                return Ok(ReleaseOutcome::HeldByAnother);
            }
            Ok(dynamo::release::delete_if_info(&self.client, &self.table, lock_id, &part.condition).await?)
        })
    }
}

/// The lock files of an S3 state bucket, under a prefix.
pub struct S3Store {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    pub prefix: String,
    /// Whether the endpoint honours `If-Match` on DeleteObject, learnt once per client.
    pub if_match: std::sync::Arc<tokio::sync::OnceCell<bool>>,
}

impl LockStore for S3Store {
    fn kind(&self) -> StoreKind {
        StoreKind::S3
    }

    fn covers(&self, lock_id: &str) -> bool {
        s3::key_of(&self.bucket, &self.prefix, lock_id).is_some()
    }

    fn read<'a>(&'a self, lock_id: &'a str) -> BoxFuture<'a, Result<Option<HeldPart>, StoreError>> {
        Box::pin(async move {
            let Some(key) = s3::key_of(&self.bucket, &self.prefix, lock_id) else { return Ok(None) };
            let Some(file) = s3::read_lock_file(&self.client, &self.bucket, &key).await? else { return Ok(None) };
            let is_lock = !file.etag.is_empty() && file.record.raw_info.is_some();
            Ok(Some(HeldPart { kind: StoreKind::S3, record: file.record, condition: file.etag, is_lock }))
        })
    }

    fn release<'a>(&'a self, lock_id: &'a str, part: &'a HeldPart) -> BoxFuture<'a, Result<ReleaseOutcome, StoreError>> {
        Box::pin(async move {
            let Some(key) = s3::key_of(&self.bucket, &self.prefix, lock_id) else { return Ok(ReleaseOutcome::HeldByAnother) };
            if !part.is_lock {
                return Ok(ReleaseOutcome::HeldByAnother);
            }
            let honoured = self.if_match.get_or_try_init(|| s3::honours_if_match(&self.client, &self.bucket, &self.prefix)).await?;
            if !honoured {
                return Err(StoreError::CannotReleaseExactly(format!(
                    "the S3 endpoint of bucket {} ignores If-Match on DeleteObject (a conditional delete of a missing key succeeded), so a lock file cannot be released exactly there; statelock does not release lock files on it",
                    self.bucket
                )));
            }
            Ok(s3::delete_if_etag(&self.client, &self.bucket, &key, &part.condition).await?)
        })
    }
}

/// The stores of a LockSource, in the order Terraform takes a lock's parts (the file first).
pub fn stores_of(spec: &LockSourceSpec, sdk: &crate::cluster::aws::SourceSdk) -> Vec<Box<dyn LockStore>> {
    let mut out: Vec<Box<dyn LockStore>> = Vec::new();
    if let (Some(s), Some(client)) = (&spec.s3, &sdk.s3) {
        out.push(Box::new(S3Store {
            client: client.clone(),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            if_match: sdk.s3_if_match.clone(),
        }));
    }
    if let Some(d) = &spec.dynamodb {
        out.push(Box::new(DynamoStore { client: sdk.table.clone(), table: d.table_name.clone() }));
    }
    out
}

/// The parts of one lock, read from their authorities, taken together: the record to judge, or
/// why none can be judged.
#[derive(Clone, Debug, PartialEq)]
pub enum Combined {
    /// No part exists: the lock is gone.
    Gone,
    /// One lock instance (every part that exists holds the same Info).
    Lock(LockRecord),
    /// The parts do not hold one lock instance (another client's lock in one store, a damaged
    /// part): judged as malformed, never released.
    Disagree(LockRecord),
}

/// Put the parts of one lock together. Parts agree when every one is a lock record with the
/// same Info (Terraform writes the same bytes to the lock file and the item).
pub fn combine(lock_id: &str, parts: &[HeldPart]) -> Combined {
    let Some(first) = parts.first() else { return Combined::Gone };
    let agree = parts.iter().all(|p| p.is_lock && p.record.info_sha256.is_some() && p.record.info_sha256 == first.record.info_sha256);
    if agree {
        return Combined::Lock(first.record.clone());
    }
    let mut record = first.record.clone();
    record.lock_id = lock_id.to_owned();
    if let [only] = parts {
        // One part that is not a lock record (an oversized file, an Info that is not a string):
        // its own problems say why.
        if record.problems.is_empty() {
            record.problems.push(format!("the {} is not a lock record statelock can release exactly", only.kind.part_name()));
        }
        return Combined::Disagree(record);
    }
    // Which lock the parts hold is unknown: no ID is taken from either (a force-unlock naming
    // one of them must not release the other).
    record.info.id = None;
    let describe = |p: &HeldPart| {
        format!(
            "the {} holds {}",
            p.kind.part_name(),
            p.record.info.id.as_deref().map_or("no readable lock".to_owned(), |id| format!("lock ID {id}"))
        )
    };
    record
        .problems
        .push(format!("the parts of this lock do not hold one lock: {}", parts.iter().map(describe).collect::<Vec<_>>().join(", ")));
    Combined::Disagree(record)
}

/// The locks of a LockSource from what its stores hold (lock files, items): one record per
/// LockID, with the stores it was seen in. Parts that do not hold one lock instance give a record
/// with a problem (shown, never released).
pub fn merge_parts<'a>(parts: impl IntoIterator<Item = (StoreKind, &'a LockRecord)>) -> Vec<LockRecord> {
    let mut by_id: std::collections::BTreeMap<&str, Vec<HeldPart>> = std::collections::BTreeMap::new();
    for (kind, record) in parts {
        let is_lock = record.raw_info.is_some();
        by_id.entry(record.lock_id.as_str()).or_default().push(HeldPart {
            kind,
            record: record.clone(),
            condition: String::new(),
            is_lock,
        });
    }
    by_id
        .into_iter()
        .map(|(lock_id, mut parts)| {
            parts.sort_by_key(|p| p.kind);
            let mut record = match combine(lock_id, &parts) {
                Combined::Lock(r) | Combined::Disagree(r) => r,
                Combined::Gone => LockRecord::without_info(lock_id.to_owned()),
            };
            // One part alone keeps the record as it was (its own problems, if any).
            record.stored_in = parts.iter().map(|p| p.kind).collect();
            record
        })
        .collect()
}

/// The SHA-256 of a lock file's body or an item's Info, as [`LockRecord::instance`] gives it.
pub fn instance_of(raw: &str) -> String {
    Sha256::digest(raw.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock_record::LockRecord;

    const INFO_A: &str = r#"{"ID":"a","Operation":"OperationTypeApply","Info":"","Who":"u@h","Version":"1.15.5","Created":"2026-01-01T00:00:00Z","Path":"b/k"}"#;
    const INFO_B: &str = r#"{"ID":"b","Operation":"OperationTypeApply","Info":"","Who":"u@h","Version":"1.0.3","Created":"2026-01-01T00:00:00Z","Path":"b/k"}"#;

    fn part(kind: StoreKind, raw: &str) -> HeldPart {
        HeldPart { kind, record: LockRecord::from_info("b/k".into(), raw), condition: "c".into(), is_lock: true }
    }

    #[test]
    fn parts_with_the_same_info_are_one_lock_and_anything_else_is_never_judged_as_one() {
        assert_eq!(combine("b/k", &[]), Combined::Gone);
        let one = combine("b/k", &[part(StoreKind::S3, INFO_A)]);
        assert!(matches!(&one, Combined::Lock(r) if r.info.id.as_deref() == Some("a")));
        let both = combine("b/k", &[part(StoreKind::S3, INFO_A), part(StoreKind::DynamoDB, INFO_A)]);
        assert!(matches!(&both, Combined::Lock(r) if r.instance() == Some(instance_of(INFO_A).as_str())));
        // A 1.0.3 client holds the item while a 1.15 client's file is there (or the reverse).
        let Combined::Disagree(r) = combine("b/k", &[part(StoreKind::S3, INFO_A), part(StoreKind::DynamoDB, INFO_B)]) else {
            panic!("two different locks must not be combined")
        };
        assert!(!r.is_valid());
        assert!(r.problems.iter().any(|p| p.contains("lock ID a") && p.contains("lock ID b")), "{:?}", r.problems);
        // Same Info text but one part is not a lock record (a digest, unreadable Info).
        let mut broken = part(StoreKind::DynamoDB, INFO_A);
        broken.is_lock = false;
        assert!(matches!(combine("b/k", &[part(StoreKind::S3, INFO_A), broken]), Combined::Disagree(_)));
        // Whitespace differences are another instance (the identity is the exact bytes).
        let spaced = format!("{INFO_A} ");
        assert!(matches!(combine("b/k", &[part(StoreKind::S3, INFO_A), part(StoreKind::DynamoDB, &spaced)]), Combined::Disagree(_)));
    }

    #[test]
    fn merged_parts_are_one_record_per_lock_id_and_say_where_they_were_seen() {
        let file = LockRecord::from_info("b/k".into(), INFO_A);
        let item = LockRecord::from_info("b/k".into(), INFO_A);
        let other_item = LockRecord::from_info("b/other".into(), INFO_B);
        let bad_file = LockRecord::from_info("b/bad".into(), "{not json");
        let merged = merge_parts([
            (StoreKind::DynamoDB, &item),
            (StoreKind::S3, &file),
            (StoreKind::DynamoDB, &other_item),
            (StoreKind::S3, &bad_file),
        ]);
        let ids: Vec<(&str, &[StoreKind])> = merged.iter().map(|r| (r.lock_id.as_str(), r.stored_in.as_slice())).collect();
        assert_eq!(
            ids,
            [("b/bad", &[StoreKind::S3][..]), ("b/k", &[StoreKind::S3, StoreKind::DynamoDB][..]), ("b/other", &[StoreKind::DynamoDB][..])]
        );
        assert!(merged[1].is_valid() && merged[2].is_valid());
        assert!(!merged[0].is_valid(), "a malformed lock file alone stays malformed");
        // Disagreeing parts: one record, marked, so it is shown and never released.
        let merged = merge_parts([(StoreKind::S3, &file), (StoreKind::DynamoDB, &LockRecord::from_info("b/k".into(), INFO_B))]);
        assert_eq!(merged.len(), 1);
        assert!(!merged[0].is_valid());
        assert_eq!(merged[0].stored_in, [StoreKind::S3, StoreKind::DynamoDB]);
    }
}
