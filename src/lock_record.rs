//! The Terraform/OpenTofu lock record, independent of where it is stored: the Info JSON
//! (`ID, Operation, Info, Who, Version, Created, Path`) parsed exactly as Terraform writes it
//! (see ../shared/reference/terraform-locking.md §2), `Created` times, `Who`'s host, workspaces, a lock instance's
//! identity, and the StateLock spec built from a record. The DynamoDB adapter
//! ([`crate::dynamo::lock_item`]), the gateway and the mirror use it; S3 lock files will too.
//!
//! Pure: no client here. Malformed input never panics; every problem is reported in words.

use sha2::{Digest, Sha256};

use crate::crd::{LockInfo, StateLockSpec};

/// The longest value kept for one Info field; longer values are cut (and reported).
pub const MAX_FIELD_BYTES: usize = 1024;
/// The longest raw Info kept on a StateLock when it cannot be parsed.
pub const MAX_RAW_INFO_BYTES: usize = 4096;

/// One lock record (a DynamoDB item's or an S3 lock file's), parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LockRecord {
    pub lock_id: String,
    /// The fields of the Info record that could be read.
    pub info: LockInfo,
    /// The exact Info attribute, when it is a string.
    pub raw_info: Option<String>,
    /// Lowercase hex SHA-256 of the exact Info attribute: the identity of this lock instance.
    pub info_sha256: Option<String>,
    /// What is wrong with the item; empty when it is a well-formed Terraform lock.
    pub problems: Vec<String>,
    /// The stores this record was read from (set when the parts of a lock are put together).
    pub stored_in: Vec<crate::lock_store::StoreKind>,
}

impl LockRecord {
    /// A record with no Info at all (a store's item without one).
    pub fn without_info(lock_id: String) -> Self {
        Self { lock_id, problems: vec!["the item has no Info attribute".into()], ..Self::default() }
    }

    /// Parse the exact Info JSON Terraform wrote for `lock_id`. Never panics; every problem is
    /// reported in `problems`.
    pub fn from_info(lock_id: String, raw: &str) -> Self {
        let mut record = Self { lock_id, info_sha256: Some(hex(&Sha256::digest(raw.as_bytes()))), ..Self::default() };
        parse_info(raw, &mut record);
        record.raw_info = Some(raw.to_owned());
        record
    }

    /// A record whose Info is not a string (`kind` names what it is instead).
    pub fn with_unreadable_info(lock_id: String, kind: &str) -> Self {
        Self { lock_id, problems: vec![format!("Info is of type {kind}, expected S (a JSON string)")], ..Self::default() }
    }

    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }

    /// The identity of this lock instance: the exact Info's SHA-256 (a lock re-taken on the same
    /// LockID is another instance).
    pub fn instance(&self) -> Option<&str> {
        self.info_sha256.as_deref()
    }
}

/// Cut a string to at most `max` bytes at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_info(raw: &str, record: &mut LockRecord) {
    let value: serde_json::Value = match serde_json::from_str(raw) {
        Ok(v) => v,
        Err(e) => {
            record.problems.push(format!("Info is not valid JSON: {e}"));
            return;
        }
    };
    let Some(obj) = value.as_object() else {
        record.problems.push("Info is JSON but not an object".into());
        return;
    };
    let mut field = |name: &str, required: bool| -> Option<String> {
        match obj.get(name) {
            Some(serde_json::Value::String(s)) => {
                if s.len() > MAX_FIELD_BYTES {
                    record.problems.push(format!("Info field {name} is {} bytes long; kept its first {MAX_FIELD_BYTES}", s.len()));
                }
                Some(truncate(s, MAX_FIELD_BYTES).to_owned())
            }
            Some(other) => {
                let kind = match other {
                    serde_json::Value::Null => "null",
                    serde_json::Value::Bool(_) => "a boolean",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::Object(_) => "an object",
                    serde_json::Value::String(_) => "a string",
                };
                record.problems.push(format!("Info field {name} is {kind}, expected a string"));
                None
            }
            None if required => {
                record.problems.push(format!("Info has no {name} field"));
                None
            }
            None => None,
        }
    };
    let id = field("ID", true);
    let operation = field("Operation", true);
    let info = field("Info", false);
    let who = field("Who", true);
    let version = field("Version", false);
    let created_raw = field("Created", true);
    let path = field("Path", false);
    let created = created_raw.and_then(|c| {
        if parse_created(&c).is_some() {
            Some(c)
        } else {
            record.problems.push(format!("Info field Created is not an RFC 3339 time: {:?}", truncate(&c, 64)));
            None
        }
    });
    if id.as_deref() == Some("") {
        record.problems.push("Info field ID is empty".into());
    }
    record.info = LockInfo { id, operation, info, who, version, created, path };
}

/// Parse Terraform's Created time (RFC 3339, UTC or offset, 0 to 9 fractional digits) into
/// nanoseconds since the Unix epoch.
pub fn parse_created(s: &str) -> Option<i128> {
    let ts: k8s_openapi::jiff::Timestamp = s.parse().ok()?;
    // jiff accepts more than RFC 3339 (e.g. lowercase or a space separator); require the form
    // Terraform writes: YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM).
    let b = s.as_bytes();
    let shape_ok = b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':';
    shape_ok.then(|| ts.as_nanosecond())
}

/// The user and host parts of `Who` (`user@host`; the user part may be empty). The host is
/// the part after the last `@`, since hostnames cannot contain one.
pub fn split_who(who: &str) -> (&str, Option<&str>) {
    match who.rsplit_once('@') {
        Some((user, host)) if !host.is_empty() => (user, Some(host)),
        Some((user, _)) => (user, None),
        None => (who, None),
    }
}

/// The workspace of a LockID (`<bucket>/env:/<workspace>/<key>`), `None` for the default one.
pub fn workspace(lock_id: &str) -> Option<&str> {
    let (_, rest) = lock_id.split_once("/env:/")?;
    rest.split_once('/').map(|(ws, _)| ws)
}

/// `3h2m` style durations for event notes.
pub fn human(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 48 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The longest `spec.operation` written; Terraform's own words are a few bytes.
const MAX_OPERATION_BYTES: usize = 256;

/// `OperationTypeApply` as people say it: `apply`. Anything that is not one of Terraform's
/// `OperationType…` words is kept as written.
pub fn operation_word(op: &str) -> String {
    op.strip_prefix("OperationType").filter(|w| !w.is_empty()).map_or_else(|| op.to_owned(), str::to_lowercase)
}

/// The StateLock spec that mirrors `record` for the LockSource `source`.
pub fn spec_for(source: &str, record: &LockRecord) -> StateLockSpec {
    StateLockSpec {
        source: source.to_owned(),
        lock_id: record.lock_id.clone(),
        lock_info: record.info.clone(),
        operation: record.info.operation.as_deref().map(|op| truncate(&operation_word(op), MAX_OPERATION_BYTES).to_owned()),
        info_sha256: record.info_sha256.clone(),
        raw_info: if record.is_valid() { None } else { record.raw_info.as_deref().map(|r| truncate(r, MAX_RAW_INFO_BYTES).to_owned()) },
        stored_in: record.stored_in.clone(),
    }
}

#[cfg(test)]
mod tests;
