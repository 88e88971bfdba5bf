//! Property tests of the API semantics (in-process, no HTTP).

mod common;

use apiserver_emulator::{
    Api, Clock, Options,
    api::{ListParams, PatchType, WriteParams},
    registry::ResourceType,
};
use proptest::prelude::*;
use serde_json::{Value, json};

fn api_with_widgets() -> (Api, ResourceType) {
    let api = Api::new(Options::default(), Clock::manual(1_700_000_000_000_000_000));
    let crds = api.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions").expect("crd type");
    let crd: Value = serde_saphyr::from_str(common::WIDGETS_CRD).expect("crd yaml");
    api.create(&crds, "", crd, &WriteParams::default()).expect("create CRD");
    let widgets = api.resource("example.com", "v1", "widgets").expect("registered");
    (api, widgets)
}

fn wp() -> WriteParams {
    WriteParams { field_manager: Some("test".into()), ..WriteParams::default() }
}

#[derive(Clone, Debug)]
enum Op {
    Create(u8, i64),
    SetSize(u8, i64),
    Label(u8, String),
    Status(u8, String),
    Delete(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 0i64..5).prop_map(|(n, s)| Op::Create(n, s)),
        (0u8..4, 0i64..5).prop_map(|(n, s)| Op::SetSize(n, s)),
        (0u8..4, "[a-c]").prop_map(|(n, l)| Op::Label(n, l)),
        (0u8..4, "[a-c]").prop_map(|(n, p)| Op::Status(n, p)),
        (0u8..4).prop_map(Op::Delete),
    ]
}

fn name(n: u8) -> String {
    format!("w{n}")
}

fn rv(o: &Value) -> u64 {
    o["metadata"]["resourceVersion"].as_str().and_then(|r| r.parse().ok()).unwrap_or(0)
}

/// Run one op; returns the object written (None when the op failed or deleted).
fn run(api: &Api, rt: &ResourceType, op: &Op) -> Option<Value> {
    let r = match op {
        Op::Create(n, s) => api
            .create(
                rt,
                "default",
                json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name(*n)}, "spec": {"size": s}}),
                &wp(),
            )
            .map(|o| (200, o)),
        Op::SetSize(n, s) => {
            api.patch(rt, "default", &name(*n), PatchType::Merge, json!({"spec": {"size": s}}).to_string().as_bytes(), None, &wp())
        }
        Op::Label(n, l) => api.patch(
            rt,
            "default",
            &name(*n),
            PatchType::Merge,
            json!({"metadata": {"labels": {"l": l}}}).to_string().as_bytes(),
            None,
            &wp(),
        ),
        Op::Status(n, p) => api.patch(
            rt,
            "default",
            &name(*n),
            PatchType::Merge,
            json!({"spec": {"size": 1000}, "metadata": {"labels": {"sneaky": "x"}}, "status": {"phase": p}}).to_string().as_bytes(),
            Some("status"),
            &wp(),
        ),
        Op::Delete(n) => api.delete(rt, "default", &name(*n), &json!({}), false).map(|_| (200, Value::Null)),
    };
    r.ok().map(|(_, o)| o).filter(|o| !o.is_null())
}

fn strip_volatile(o: &Value) -> Value {
    let mut c = o.clone();
    if let Some(m) = c["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn resource_versions_strictly_increase(ops in proptest::collection::vec(op(), 1..40)) {
        let (api, rt) = api_with_widgets();
        let mut last = api.lock().store.revision();
        for op in &ops {
            let before = api.lock().store.revision();
            if let Some(o) = run(&api, &rt, op) {
                let r = rv(&o);
                let after = api.lock().store.revision();
                if after != before {
                    prop_assert!(r > last, "{:?}: rv {} after {}", op, r, last);
                    last = r;
                }
            }
            prop_assert!(api.lock().store.revision() >= before);
        }
    }

    #[test]
    fn a_list_at_r_plus_a_watch_from_r_reproduces_the_final_state(
        before in proptest::collection::vec(op(), 0..20),
        after in proptest::collection::vec(op(), 0..20),
    ) {
        let (api, rt) = api_with_widgets();
        for op in &before { run(&api, &rt, op); }
        let (items, r, _) = api.list(&rt, Some("default"), &ListParams::default()).expect("list");
        let (_, backlog, _rx) = api.lock().store.watch(&rt.storage, r).expect("watch from r");
        prop_assert!(backlog.is_empty());
        for op in &after { run(&api, &rt, op); }
        let (_, events, _rx2) = api.lock().store.watch(&rt.storage, r).expect("watch from r again");
        let mut state: std::collections::BTreeMap<String, Value> = items.into_iter().map(|o| (o["metadata"]["name"].as_str().unwrap_or_default().to_owned(), o)).collect();
        for e in events {
            let obj = Api::view(&rt, &e.object);
            match e.kind {
                apiserver_emulator::store::ChangeType::Deleted => { state.remove(&e.name); }
                _ => { state.insert(e.name.clone(), obj); }
            }
        }
        let (final_items, _, _) = api.list(&rt, Some("default"), &ListParams::default()).expect("list");
        let final_state: std::collections::BTreeMap<String, Value> = final_items.into_iter().map(|o| (o["metadata"]["name"].as_str().unwrap_or_default().to_owned(), o)).collect();
        prop_assert_eq!(state, final_state);
    }

    #[test]
    fn no_op_writes_are_invisible(ops in proptest::collection::vec(op(), 1..20)) {
        let (api, rt) = api_with_widgets();
        for op in &ops {
            run(&api, &rt, op);
            // Repeating a write that just succeeded changes nothing.
            if !matches!(op, Op::Create(..) | Op::Delete(_)) {
                let rev = api.lock().store.revision();
                let counts: u64 = api.lock().store.write_counts().values().sum();
                run(&api, &rt, op);
                prop_assert_eq!(api.lock().store.revision(), rev, "{:?} twice bumped the revision", op);
                prop_assert_eq!(api.lock().store.write_counts().values().sum::<u64>(), counts);
            }
        }
    }

    #[test]
    fn status_writes_never_change_spec_or_metadata(ops in proptest::collection::vec(op(), 1..30)) {
        let (api, rt) = api_with_widgets();
        for op in &ops {
            let Op::Status(n, _) = op else { run(&api, &rt, op); continue };
            let before = api.get(&rt, "default", &name(*n)).ok();
            if let Some(after) = run(&api, &rt, op) {
                let before = before.expect("existed");
                prop_assert_eq!(&before["spec"], &after["spec"]);
                let (mut b, mut a) = (strip_volatile(&before), strip_volatile(&after));
                b.as_object_mut().map(|m| m.remove("status"));
                a.as_object_mut().map(|m| m.remove("status"));
                prop_assert_eq!(b, a);
            }
        }
    }

    #[test]
    fn generation_moves_exactly_when_spec_changes(ops in proptest::collection::vec(op(), 1..30)) {
        let (api, rt) = api_with_widgets();
        for op in &ops {
            let n = match op { Op::Create(n, _) | Op::SetSize(n, _) | Op::Label(n, _) | Op::Status(n, _) | Op::Delete(n) => *n };
            let before = api.get(&rt, "default", &name(n)).ok();
            let after = run(&api, &rt, op);
            if let (Some(b), Some(a)) = (before, after) {
                let spec_changed = b["spec"] != a["spec"];
                let generation = |o: &Value| o["metadata"]["generation"].as_i64().unwrap_or(0);
                prop_assert_eq!(generation(&a), generation(&b) + i64::from(spec_changed), "{:?}", op);
            }
        }
    }
}

#[test]
fn create_drops_status_and_sets_system_fields() {
    let (api, rt) = api_with_widgets();
    let o = api
        .create(&rt, "default", json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x", "uid": "forged", "generation": 9}, "spec": {"size": 1}, "status": {"phase": "Forged"}}), &wp())
        .expect("create");
    assert!(o.get("status").is_none(), "create drops status when the status subresource is on");
    assert_ne!(o["metadata"]["uid"], "forged");
    assert_eq!(o["metadata"]["generation"], 1);
    let ts = o["metadata"]["creationTimestamp"].as_str().expect("creationTimestamp");
    assert!(ts.ends_with('Z') && ts.len() == 20, "whole seconds, Z: {ts}");
}

#[test]
fn put_without_resource_version_is_rejected_for_custom_resources() {
    let (api, rt) = api_with_widgets();
    api.create(
        &rt,
        "default",
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}, "spec": {"size": 1}}),
        &wp(),
    )
    .expect("create");
    let err = api
        .update(
            &rt,
            "default",
            "x",
            json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}, "spec": {"size": 2}}),
            None,
            &wp(),
        )
        .expect_err("422");
    assert_eq!(err.code, 422);
    assert!(err.body["message"].as_str().unwrap_or_default().contains("must be specified for an update"));
}

#[test]
fn a_resource_version_in_a_patch_body_is_a_precondition() {
    let (api, rt) = api_with_widgets();
    api.create(
        &rt,
        "default",
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}, "spec": {"size": 1}}),
        &wp(),
    )
    .expect("create");
    for pt in [PatchType::Merge, PatchType::Apply] {
        let body = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x", "resourceVersion": "1"}, "spec": {"size": 2}});
        let err = api.patch(&rt, "default", "x", pt, body.to_string().as_bytes(), None, &wp()).expect_err("stale");
        assert_eq!(err.code, 409, "{pt:?}");
    }
    let smp = api.patch(&rt, "default", "x", PatchType::Strategic, b"{}", None, &wp()).expect_err("415");
    assert_eq!(smp.code, 415);
}

#[test]
fn emptying_finalizers_of_a_deleting_object_deletes_it() {
    let (api, rt) = api_with_widgets();
    api.create(
        &rt,
        "default",
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x", "finalizers": ["f"]}, "spec": {"size": 1}}),
        &wp(),
    )
    .expect("create");
    let (_, pending) = api.delete(&rt, "default", "x", &json!({}), false).expect("delete");
    assert!(pending["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(pending["metadata"]["generation"], 2, "markAsDeleting bumps generation");
    let add = api
        .patch(&rt, "default", "x", PatchType::Merge, br#"{"metadata":{"finalizers":["f","g"]}}"#, None, &wp())
        .expect_err("no new finalizers");
    assert_eq!(add.code, 422);
    api.patch(&rt, "default", "x", PatchType::Merge, br#"{"metadata":{"finalizers":null}}"#, None, &wp()).expect("remove finalizer");
    assert_eq!(api.get(&rt, "default", "x").expect_err("gone").code, 404);
}

proptest! {
    /// Patch bodies of every JSON shape, with every patch type and scope: each is applied or
    /// refused with a 4xx, never a panic (a panic in the HTTP server drops the client's
    /// connection instead of answering). A merge patch whose body is an array once did.
    #[test]
    fn patch_bodies_of_any_shape_get_an_answer(
        body in prop_oneof![
            Just(json!([])),
            Just(json!([1, 2])),
            Just(json!("text")),
            Just(json!(7)),
            Just(json!(true)),
            Just(Value::Null),
            Just(json!({"metadata": []})),
            Just(json!({"metadata": {"name": 5}})),
            Just(json!({"metadata": {"labels": "x"}})),
            Just(json!({"spec": null, "status": []})),
            Just(json!([{"op": "add", "path": "/spec/size", "value": 1}])),
            Just(json!([{"op": "replace", "path": "", "value": []}])),
            Just(json!([{"op": "remove", "path": "/metadata"}])),
            Just(json!([{"op": "move", "from": "/spec", "path": "/spec/x"}])),
            any::<String>().prop_map(Value::String),
        ],
        pt in prop_oneof![Just(PatchType::Merge), Just(PatchType::Json), Just(PatchType::Strategic)],
        status in any::<bool>(),
    ) {
        let (api, widgets) = api_with_widgets();
        api.create(&widgets, "default", json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}}), &wp())
            .expect("create");
        let bytes = serde_json::to_vec(&body).expect("json");
        match api.patch(&widgets, "default", "w", pt, &bytes, status.then_some("status"), &wp()) {
            Ok((code, v)) => {
                prop_assert!(code < 300);
                prop_assert!(v.is_object(), "a patched object is an object: {}", v);
            }
            Err(e) => prop_assert!((400..500).contains(&e.code), "{:?}", e),
        }
    }
}
