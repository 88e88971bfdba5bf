//! S3 lock files (`use_lockfile = true`, Terraform 1.11+ and OpenTofu 1.10+): the lock of state
//! `<key>` is the object `<key>.tflock` in the state bucket, whose body is the same LockInfo JSON
//! as DynamoDB's `Info` (see ../shared/reference/terraform-locking.md §8). Terraform takes it
//! with `If-None-Match: *` and releases it with an unconditional DeleteObject after comparing the
//! ID; statelock releases it with `If-Match: <ETag>`, so that only the exact file it judged is
//! ever deleted.
//!
//! Only `.tflock` keys are read; state objects are listed (the listing cannot skip them) but never
//! fetched.

use aws_sdk_s3::{
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    operation::{delete_object::DeleteObjectError, get_object::GetObjectError},
};

use crate::{errors::ErrorCategory, lock_record::LockRecord, lock_store::ReleaseOutcome};

pub mod events;

/// The S3 client for a bucket in `region`, at `endpoint` when given (S3-compatible servers, VPC
/// endpoints: path-style addressing), with `credentials` or the default chain; built on the
/// process's shared HTTPS client like every other SDK client.
pub async fn client(region: &str, endpoint: Option<&str>, credentials: Option<crate::dynamo::StaticCredentials>) -> aws_sdk_s3::Client {
    let config = crate::dynamo::sdk_config(region, endpoint, credentials).await;
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(endpoint.is_some()).build())
}

/// The suffix Terraform appends to a state key for its lock file.
pub const LOCK_SUFFIX: &str = ".tflock";
/// The largest lock file read; Terraform's are a few hundred bytes. A bigger object is reported
/// as malformed, never read whole.
pub const MAX_LOCK_FILE_BYTES: i64 = 64 * 1024;

/// An S3 call that failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("failed to list lock files in S3 bucket {bucket} under {prefix:?}: {message}")]
    List { bucket: String, prefix: String, message: String, category: ErrorCategory },
    #[error("failed to read lock file s3://{bucket}/{key}: {message}")]
    Get { bucket: String, key: String, message: String, category: ErrorCategory },
    #[error("failed to delete lock file s3://{bucket}/{key}: {message}")]
    Delete { bucket: String, key: String, message: String, category: ErrorCategory },
    #[error("failed to use the lock files' event queue {queue}: {message}")]
    Queue { queue: String, message: String, category: ErrorCategory },
    #[error("failed to read the event notification configuration of S3 bucket {bucket}: {message}")]
    Notifications { bucket: String, message: String, category: ErrorCategory },
}

impl S3Error {
    pub fn category(&self) -> ErrorCategory {
        match self {
            Self::List { category, .. }
            | Self::Get { category, .. }
            | Self::Delete { category, .. }
            | Self::Queue { category, .. }
            | Self::Notifications { category, .. } => *category,
        }
    }
}

fn category_of<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> ErrorCategory {
    match e {
        SdkError::ServiceError(s) => match s.err().code() {
            Some("SlowDown" | "ThrottlingException" | "RequestLimitExceeded") => ErrorCategory::S3Throttled,
            Some("InternalError" | "ServiceUnavailable" | "InternalFailure") | None => ErrorCategory::S3Unavailable,
            Some(_) => ErrorCategory::S3Refused,
        },
        SdkError::ConstructionFailure(_) => ErrorCategory::S3Refused,
        _ => ErrorCategory::S3Unavailable,
    }
}

fn message_of<E: std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>) -> String {
    DisplayErrorContext(e).to_string()
}

/// The LockID (as DynamoDB spells it, `<bucket>/<state key>`) of the lock file `key`, or `None`
/// when `key` is not a lock file.
pub fn lock_id_of(bucket: &str, key: &str) -> Option<String> {
    let state = key.strip_suffix(LOCK_SUFFIX)?;
    (!state.is_empty()).then(|| format!("{bucket}/{state}"))
}

/// The object key of the lock file for `lock_id` in `bucket` under `prefix`, or `None` when the
/// LockID is not in that bucket, not under the prefix, or has a key that a path-normalising
/// server or proxy could read as another one (empty, `.` or `..` segments): such a lock file is
/// shown, never read for a judgement nor deleted.
pub fn key_of(bucket: &str, prefix: &str, lock_id: &str) -> Option<String> {
    let state = lock_id.strip_prefix(bucket)?.strip_prefix('/')?;
    let key = format!("{state}{LOCK_SUFFIX}");
    let addressable = !state.is_empty() && key.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    (addressable && key.starts_with(prefix)).then_some(key)
}

/// A lock file as listed: its key and ETag (the identity of this version of the object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedFile {
    pub key: String,
    pub etag: String,
    pub size: i64,
}

/// One listing: the lock files under the prefix, and the billed requests it took.
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<ListedFile>,
    /// ListObjectsV2 calls (pages).
    pub list_requests: u64,
    /// Objects listed that were not lock files (state objects, anything else).
    pub other_objects: u64,
}

/// List every lock file under `prefix` (paginated ListObjectsV2).
pub async fn list_lock_files(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Result<Listing, S3Error> {
    let mut out = Listing::default();
    let mut token: Option<String> = None;
    loop {
        let page =
            client.list_objects_v2().bucket(bucket).prefix(prefix).set_continuation_token(token.take()).send().await.map_err(|e| {
                S3Error::List { bucket: bucket.into(), prefix: prefix.into(), category: category_of(&e), message: message_of(&e) }
            })?;
        out.list_requests += 1;
        for o in page.contents() {
            match (o.key(), o.e_tag()) {
                (Some(key), Some(etag)) if key.ends_with(LOCK_SUFFIX) => {
                    out.files.push(ListedFile { key: key.to_owned(), etag: etag.to_owned(), size: o.size().unwrap_or_default() })
                }
                _ => out.other_objects += 1,
            }
        }
        match page.next_continuation_token() {
            Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
            _ => return Ok(out),
        }
    }
}

/// A lock file as read: the record its body holds and the ETag of exactly that body.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadFile {
    pub record: LockRecord,
    pub etag: String,
}

/// Read one lock file (S3 reads are strongly consistent). `None` when there is none.
pub async fn read_lock_file(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<Option<ReadFile>, S3Error> {
    let get_err = |e: String, category| S3Error::Get { bucket: bucket.into(), key: key.into(), message: e, category };
    let Some(lock_id) = lock_id_of(bucket, key) else { return Ok(None) };
    let r = match client.get_object().bucket(bucket).key(key).send().await {
        Ok(r) => r,
        // Only "no such key" means no lock file (a missing bucket or a proxy's 404 is an error).
        Err(e) if matches!(e.as_service_error(), Some(GetObjectError::NoSuchKey(_))) => return Ok(None),
        Err(e) if e.as_service_error().and_then(ProvideErrorMetadata::code) == Some("NoSuchKey") => return Ok(None),
        Err(e) => return Err(get_err(message_of(&e), category_of(&e))),
    };
    let etag = r.e_tag().unwrap_or_default().to_owned();
    if r.content_length().unwrap_or_default() > MAX_LOCK_FILE_BYTES {
        let mut record = LockRecord::without_info(lock_id);
        record.problems = vec![format!(
            "the lock file is {} bytes, more than the {MAX_LOCK_FILE_BYTES} a lock file can be",
            r.content_length().unwrap_or_default()
        )];
        return Ok(Some(ReadFile { record, etag }));
    }
    let body = r.body.collect().await.map_err(|e| get_err(e.to_string(), ErrorCategory::S3Unavailable))?.into_bytes();
    let record = match std::str::from_utf8(&body) {
        Ok(text) => LockRecord::from_info(lock_id, text),
        Err(_) => {
            let mut record = LockRecord::without_info(lock_id);
            record.problems = vec!["the lock file is not UTF-8 text".into()];
            record
        }
    };
    Ok(Some(ReadFile { record, etag }))
}

/// Delete the lock file only while its ETag is `etag` (`If-Match`): a file re-taken since it
/// was judged has another ETag and survives.
pub async fn delete_if_etag(client: &aws_sdk_s3::Client, bucket: &str, key: &str, etag: &str) -> Result<ReleaseOutcome, S3Error> {
    match client.delete_object().bucket(bucket).key(key).if_match(etag).send().await {
        Ok(_) => Ok(ReleaseOutcome::Released),
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            let code = e.as_service_error().and_then(ProvideErrorMetadata::code).map(str::to_owned);
            match (status, code.as_deref()) {
                (Some(412), _) | (_, Some("PreconditionFailed")) => Ok(ReleaseOutcome::HeldByAnother),
                (_, Some("NoSuchKey")) => Ok(ReleaseOutcome::AlreadyGone),
                _ => {
                    let _: Option<&DeleteObjectError> = e.as_service_error();
                    Err(S3Error::Delete { bucket: bucket.into(), key: key.into(), category: category_of(&e), message: message_of(&e) })
                }
            }
        }
    }
}

/// Whether the endpoint honours `If-Match` on DeleteObject: a conditional delete of a key that
/// does not exist must be refused (404 or 412). A server that ignores the header answers 204, as
/// S3 answers an unconditional delete of a missing key; it would make statelock's exact release
/// Terraform's unconditional one, so releases are refused there. The key is under `prefix`, where
/// statelock may delete lock files; no object can match the ETag asked for.
pub async fn honours_if_match(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Result<bool, S3Error> {
    let probe = |n: u64| format!("{prefix}statelock-if-match-probe-{n:016x}{LOCK_SUFFIX}");
    // A server that answers 404 to any delete of a missing key proves nothing by refusing the
    // conditional one: an unconditional delete of a missing key must succeed (as on S3).
    let plain = probe(rand_u64());
    if let Err(e) = client.delete_object().bucket(bucket).key(&plain).send().await {
        return match e.raw_response().map(|r| r.status().as_u16()) {
            Some(404) => Ok(false),
            _ => Err(S3Error::Delete { bucket: bucket.into(), key: plain, category: category_of(&e), message: message_of(&e) }),
        };
    }
    let key = probe(rand_u64().rotate_left(17));
    match client.delete_object().bucket(bucket).key(&key).if_match("\"statelock-probe\"").send().await {
        Ok(_) => Ok(false),
        Err(e) => match e.as_service_error().and_then(ProvideErrorMetadata::code) {
            Some("NoSuchKey" | "PreconditionFailed") => Ok(true),
            _ => Err(S3Error::Delete { bucket: bucket.into(), key, category: category_of(&e), message: message_of(&e) }),
        },
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ids_and_keys_round_trip_and_reject_what_is_not_a_lock_file() {
        assert_eq!(lock_id_of("tfstate", "a/b/terraform.tfstate.tflock").as_deref(), Some("tfstate/a/b/terraform.tfstate"));
        assert_eq!(lock_id_of("tfstate", "env:/dev/k.tfstate.tflock").as_deref(), Some("tfstate/env:/dev/k.tfstate"));
        assert_eq!(lock_id_of("tfstate", "a/terraform.tfstate"), None, "state objects are not lock files");
        assert_eq!(lock_id_of("tfstate", ".tflock"), None, "a bare suffix names no state");
        assert_eq!(key_of("tfstate", "", "tfstate/a/terraform.tfstate").as_deref(), Some("a/terraform.tfstate.tflock"));
        assert_eq!(key_of("tfstate", "", "other/a/terraform.tfstate"), None, "a LockID of another bucket");
        assert_eq!(key_of("tfstate", "", "tfstate-2/a"), None, "a bucket whose name merely starts the same");
        assert_eq!(key_of("tfstate", "", "tfstate/"), None);
        // The prefix bounds what a LockSource may touch (an edited spec.lockId cannot leave it).
        assert_eq!(key_of("tfstate", "team-a/", "tfstate/team-a/k").as_deref(), Some("team-a/k.tflock"));
        assert_eq!(key_of("tfstate", "team-a/", "tfstate/team-b/k"), None);
        assert_eq!(
            key_of("tfstate", "team-a/", "tfstate/team-a/../team-b/k"),
            None,
            "no way out of the prefix through a normalising server"
        );
        for id in ["tfstate/./k", "tfstate/a//k", "tfstate/../x/k", "tfstate//k"] {
            assert_eq!(key_of("tfstate", "", id), None, "{id}");
        }
        for key in ["x.tflock", "env:/w/s/k.tflock", "ünïcode/ key.tflock", "a/%2e%2e/b.tflock"] {
            let id = lock_id_of("b", key).expect("a lock file");
            assert_eq!(key_of("b", "", &id).as_deref(), Some(key));
        }
    }
}
