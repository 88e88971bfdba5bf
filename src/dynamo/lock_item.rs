//! What a lock-table item means: a Terraform/OpenTofu lock, a state digest, or something
//! unusable, parsed exactly as Terraform writes them (see terraform-locking.md §2).
//!
//! Pure: no client here. Malformed input never panics; every problem is reported in words.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use sha2::{Digest, Sha256};

use crate::crd::LockInfo;

/// The longest value kept for one Info field; longer values are cut (and reported).
pub const MAX_FIELD_BYTES: usize = 1024;
/// The longest raw Info kept on a StateLock when it cannot be parsed.
pub const MAX_RAW_INFO_BYTES: usize = 4096;

/// One item of a lock table.
#[derive(Clone, Debug, PartialEq)]
pub enum TableItem {
    /// A state lock (possibly malformed: see `problems`).
    Lock(Box<LockRecord>),
    /// A `<LockID>-md5` digest item: statelock never writes or deletes these.
    Digest { lock_id: String },
    /// An item without a usable string `LockID`.
    Unusable { reason: String },
}

/// A lock item, parsed.
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
}

impl LockRecord {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

fn type_name(v: &AttributeValue) -> &'static str {
    match v {
        AttributeValue::S(_) => "S",
        AttributeValue::N(_) => "N",
        AttributeValue::B(_) => "B",
        AttributeValue::Bool(_) => "BOOL",
        AttributeValue::Null(_) => "NULL",
        AttributeValue::M(_) => "M",
        AttributeValue::L(_) => "L",
        AttributeValue::Ss(_) => "SS",
        AttributeValue::Ns(_) => "NS",
        AttributeValue::Bs(_) => "BS",
        _ => "unknown",
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

/// Classify and parse one item.
pub fn parse_item(item: &HashMap<String, AttributeValue>) -> TableItem {
    let lock_id = match item.get("LockID") {
        Some(AttributeValue::S(s)) if !s.is_empty() => s.clone(),
        Some(AttributeValue::S(_)) => return TableItem::Unusable { reason: "LockID is empty".into() },
        Some(other) => return TableItem::Unusable { reason: format!("LockID is of type {}, expected S", type_name(other)) },
        None => return TableItem::Unusable { reason: "the item has no LockID attribute".into() },
    };
    let info = item.get("Info");
    if info.is_none() && (item.contains_key("Digest") || lock_id.ends_with("-md5")) {
        return TableItem::Digest { lock_id };
    }
    let mut record = LockRecord { lock_id, ..LockRecord::default() };
    match info {
        None => record.problems.push("the item has no Info attribute".into()),
        Some(AttributeValue::S(raw)) => {
            record.info_sha256 = Some(hex(&Sha256::digest(raw.as_bytes())));
            parse_info(raw, &mut record);
            record.raw_info = Some(raw.clone());
        }
        Some(other) => record.problems.push(format!("Info is of type {}, expected S (a JSON string)", type_name(other))),
    }
    TableItem::Lock(Box::new(record))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.to_owned())
    }

    // Captured from Terraform 1.11.4 (terraform-locking.md §2).
    const REAL_INFO: &str = r#"{"ID":"c240b743-f498-e9aa-802f-72066a836876","Operation":"OperationTypeApply","Info":"","Who":"root@vm","Version":"1.11.4","Created":"2026-11-26T12:59:48.653763223Z","Path":"tfstate/demo/terraform.tfstate"}"#;

    fn lock(t: TableItem) -> LockRecord {
        match t {
            TableItem::Lock(l) => *l,
            other => panic!("expected a lock, got {other:?}"),
        }
    }

    #[test]
    fn a_real_terraform_lock_parses_completely() {
        let l = lock(parse_item(&item(&[("LockID", s("tfstate/demo/terraform.tfstate")), ("Info", s(REAL_INFO))])));
        assert!(l.is_valid(), "{:?}", l.problems);
        assert_eq!(l.info.id.as_deref(), Some("c240b743-f498-e9aa-802f-72066a836876"));
        assert_eq!(l.info.operation.as_deref(), Some("OperationTypeApply"));
        assert_eq!(l.info.who.as_deref(), Some("root@vm"));
        assert_eq!(l.info.version.as_deref(), Some("1.11.4"));
        assert_eq!(l.info.created.as_deref(), Some("2026-11-26T12:59:48.653763223Z"));
        assert_eq!(l.info.path.as_deref(), Some("tfstate/demo/terraform.tfstate"));
        assert_eq!(l.info.info.as_deref(), Some(""));
        assert_eq!(l.info_sha256.as_deref().map(str::len), Some(64));
        assert_eq!(l.raw_info.as_deref(), Some(REAL_INFO));
    }

    #[test]
    fn digest_items_are_recognised_and_never_locks() {
        let d =
            parse_item(&item(&[("LockID", s("tfstate/demo/terraform.tfstate-md5")), ("Digest", s("68018aa8c310c3abe7ba9ee609fcf862"))]));
        assert_eq!(d, TableItem::Digest { lock_id: "tfstate/demo/terraform.tfstate-md5".into() });
        // A key that happens to end in -md5 but carries Info is a lock.
        let l = parse_item(&item(&[("LockID", s("b/x-md5")), ("Info", s(REAL_INFO))]));
        assert!(matches!(l, TableItem::Lock(_)));
    }

    #[test]
    fn created_with_zero_to_nine_fractional_digits() {
        for c in [
            "2026-11-26T13:02:20Z",
            "2026-11-26T13:02:20.2Z",
            "2026-11-26T13:02:20.23832569Z",
            "2026-11-26T13:02:20.238325691Z",
            "2026-11-26T14:02:20.5+01:00",
        ] {
            assert!(parse_created(c).is_some(), "{c}");
        }
        assert_eq!(parse_created("2026-11-26T13:02:20.23832569Z"), parse_created("2026-11-26T13:02:20.238325690Z"));
        for c in ["2026-11-26 13:02:20Z", "yesterday", "2026-11-26T13:02:20.1234567891Z", "", "2026-13-26T13:02:20Z"] {
            assert!(parse_created(c).is_none(), "{c}");
        }
    }

    #[test]
    fn who_with_an_empty_user_part_and_workspaces() {
        assert_eq!(split_who("@tf-runner-pod-7d9f8-x2abc"), ("", Some("tf-runner-pod-7d9f8-x2abc")));
        assert_eq!(split_who("runner@atlantis-0"), ("runner", Some("atlantis-0")));
        assert_eq!(split_who("a@b@host"), ("a@b", Some("host")));
        assert_eq!(split_who("nohost"), ("nohost", None));
        assert_eq!(split_who("user@"), ("user", None));
        assert_eq!(workspace("tfstate/env:/dev/app/terraform.tfstate"), Some("dev"));
        assert_eq!(workspace("tfstate/app/terraform.tfstate"), None);
    }

    #[test]
    fn ids_need_not_be_uuids_and_any_operation_is_kept() {
        for op in [
            "OperationTypeApply",
            "OperationTypePlan",
            "OperationTypeRefresh",
            "OperationTypeInvalid",
            "taint",
            "untaint",
            "state-rm",
            "state-mv",
            "init",
            "migration source state",
            "backend from plan",
        ] {
            let info = REAL_INFO
                .replace("OperationTypeApply", op)
                .replace("c240b743-f498-e9aa-802f-72066a836876", "1edde332-0dcf-0332-cbb0-ed1b3daf868d");
            let l = lock(parse_item(&item(&[("LockID", s("b/k")), ("Info", s(&info))])));
            assert!(l.is_valid(), "{op}: {:?}", l.problems);
            assert_eq!(l.info.operation.as_deref(), Some(op));
        }
    }

    #[test]
    fn malformed_items_say_what_is_wrong() {
        let cases: Vec<(HashMap<String, AttributeValue>, &str)> = vec![
            (item(&[("LockID", s("b/k")), ("Info", s("not json"))]), "Info is not valid JSON"),
            (item(&[("LockID", s("b/k")), ("Info", s("[1,2]"))]), "not an object"),
            (item(&[("LockID", s("b/k")), ("Info", AttributeValue::N("7".into()))]), "Info is of type N"),
            (item(&[("LockID", s("b/k")), ("Info", AttributeValue::M(HashMap::new()))]), "Info is of type M"),
            (
                item(&[("LockID", s("b/k")), ("Info", s(r#"{"ID":"x","Operation":1,"Who":"a@b","Created":"2026-11-26T13:02:20Z"}"#))]),
                "Operation is a number",
            ),
            (item(&[("LockID", s("b/k")), ("Info", s(r#"{"ID":"x","Operation":"p","Who":"a@b"}"#))]), "no Created field"),
            (
                item(&[("LockID", s("b/k")), ("Info", s(r#"{"ID":"x","Operation":"p","Who":"a@b","Created":"soon"}"#))]),
                "Created is not an RFC 3339 time",
            ),
            (item(&[("LockID", s("b/k"))]), "no Info attribute"),
        ];
        for (it, want) in cases {
            let l = lock(parse_item(&it));
            assert!(!l.is_valid());
            assert!(l.problems.iter().any(|p| p.contains(want)), "{want:?} not in {:?}", l.problems);
        }
        assert!(matches!(parse_item(&item(&[("Info", s(REAL_INFO))])), TableItem::Unusable { .. }));
        assert!(matches!(parse_item(&item(&[("LockID", AttributeValue::N("1".into()))])), TableItem::Unusable { .. }));
    }

    #[test]
    fn huge_and_hostile_values_are_cut_not_fatal() {
        let who = format!("{}@host", "é".repeat(5000));
        let info = serde_json::json!({"ID": "x", "Operation": "p", "Who": who, "Created": "2026-11-26T13:02:20Z", "Path": "\u{0}\u{1b}[31m<script>"}).to_string();
        let l = lock(parse_item(&item(&[("LockID", s("b/k")), ("Info", s(&info))])));
        assert!(l.info.who.as_deref().is_some_and(|w| w.len() <= MAX_FIELD_BYTES));
        assert!(l.problems.iter().any(|p| p.contains("Who is")));
        assert_eq!(l.info.path.as_deref(), Some("\u{0}\u{1b}[31m<script>"), "kept verbatim; Kubernetes stores any UTF-8");
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(lock_id in proptest::prelude::any::<String>(), info in proptest::prelude::any::<String>()) {
            let _ = parse_item(&item(&[("LockID", s(&lock_id)), ("Info", s(&info))]));
        }
    }
}
