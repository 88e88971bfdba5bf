use super::*;

// Captured from Terraform 1.11.4 (../shared/reference/terraform-locking.md §2).
const REAL_INFO: &str = r#"{"ID":"c240b743-f498-e9aa-802f-72066a836876","Operation":"OperationTypeApply","Info":"","Who":"root@vm","Version":"1.11.4","Created":"2026-11-26T12:59:48.653763223Z","Path":"tfstate/demo/terraform.tfstate"}"#;

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
        let l = LockRecord::from_info("b/k".into(), &info);
        assert!(l.is_valid(), "{op}: {:?}", l.problems);
        assert_eq!(l.info.operation.as_deref(), Some(op));
    }
}

#[test]
fn huge_and_hostile_values_are_cut_not_fatal() {
    let who = format!("{}@host", "é".repeat(5000));
    let info =
        serde_json::json!({"ID": "x", "Operation": "p", "Who": who, "Created": "2026-11-26T13:02:20Z", "Path": "\u{0}\u{1b}[31m<script>"})
            .to_string();
    let l = LockRecord::from_info("b/k".into(), &info);
    assert!(l.info.who.as_deref().is_some_and(|w| w.len() <= MAX_FIELD_BYTES));
    assert!(l.problems.iter().any(|p| p.contains("Who is")));
    assert_eq!(l.info.path.as_deref(), Some("\u{0}\u{1b}[31m<script>"), "kept verbatim; Kubernetes stores any UTF-8");
}

#[test]
fn an_instance_is_its_exact_info_and_the_spec_keeps_raw_info_only_when_malformed() {
    let a = LockRecord::from_info("b/k".into(), REAL_INFO);
    let again = LockRecord::from_info("b/k".into(), REAL_INFO);
    let spaced = LockRecord::from_info("b/k".into(), &REAL_INFO.replace(",", ", "));
    assert_eq!(a.instance(), again.instance());
    assert_ne!(a.instance(), spaced.instance(), "the same fields written differently are another instance");
    assert_eq!(spaced.info, a.info);
    let spec = spec_for("src", &a);
    assert_eq!((spec.source.as_str(), spec.lock_id.as_str(), spec.raw_info), ("src", "b/k", None));
    assert_eq!(spec.info_sha256.as_deref(), a.instance());
    let bad = LockRecord::from_info("b/k".into(), &format!("{{{}", "x".repeat(10_000)));
    assert!(!bad.is_valid());
    assert_eq!(spec_for("src", &bad).raw_info.map(|r| r.len()), Some(MAX_RAW_INFO_BYTES));
    assert!(!LockRecord::without_info("b/k".into()).is_valid());
}

proptest::proptest! {
    #[test]
    fn parsing_info_never_panics(info in proptest::prelude::any::<String>()) {
        let r = LockRecord::from_info("b/k".into(), &info);
        proptest::prop_assert_eq!(r.raw_info.as_deref(), Some(info.as_str()));
        proptest::prop_assert_eq!(r.instance().map(str::len), Some(64));
        let i = &r.info;
        for f in [&i.id, &i.operation, &i.info, &i.who, &i.version, &i.created, &i.path].into_iter().flatten() {
            proptest::prop_assert!(f.len() <= MAX_FIELD_BYTES);
        }
        // Random text is almost never a lock: whatever it is, it is valid only with the required fields.
        proptest::prop_assert!(!r.is_valid() || (i.id.is_some() && i.who.is_some() && i.created.is_some()));
    }
}

#[test]
fn operations_read_as_people_say_them() {
    assert_eq!(operation_word("OperationTypeApply"), "apply");
    assert_eq!(operation_word("OperationTypePlan"), "plan");
    assert_eq!(operation_word("OperationTypeRefresh"), "refresh");
    assert_eq!(operation_word("OperationType"), "OperationType");
    assert_eq!(operation_word("state-rm"), "state-rm");
    let huge = "OperationType".to_owned() + &"X".repeat(10_000);
    let spec = spec_for("src", &LockRecord { info: LockInfo { operation: Some(huge), ..LockInfo::default() }, ..LockRecord::default() });
    assert_eq!(spec.operation.map(|o| o.len()), Some(MAX_OPERATION_BYTES), "a huge operation is cut, not written whole");
}
