//! What a DynamoDB lock-table item means: a Terraform/OpenTofu lock (parsed by
//! [`crate::lock_record`]), a state digest, or something unusable.
//!
//! Pure: no client here. Malformed input never panics; every problem is reported in words.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::lock_record::LockRecord;

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
    TableItem::Lock(Box::new(match info {
        None => LockRecord::without_info(lock_id),
        Some(AttributeValue::S(raw)) => LockRecord::from_info(lock_id, raw),
        Some(other) => LockRecord::with_unreadable_info(lock_id, type_name(other)),
    }))
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

    // Captured from Terraform 1.11.4 (../shared/reference/terraform-locking.md §2).
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

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(lock_id in proptest::prelude::any::<String>(), info in proptest::prelude::any::<String>()) {
            let _ = parse_item(&item(&[("LockID", s(&lock_id)), ("Info", s(&info))]));
        }
    }
}
