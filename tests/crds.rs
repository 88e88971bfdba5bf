//! The CRDs: generated from the Rust types, committed under `crds/`, and valid.

mod common;

use std::{fs, path::Path};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{CustomResourceDefinition, JSONSchemaProps};
use kube::CustomResourceExt;
use serde_json::{Value, json};
use statelock::crd::{self, LockSource, StateLock};

fn crds_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/crds"))
}

#[test]
fn committed_crds_equal_the_rust_types() {
    let mut expected: Vec<String> = Vec::new();
    for def in crd::all() {
        let name = crd::file_name(&def);
        expected.push(name.clone());
        let committed = fs::read_to_string(crds_dir().join(&name)).unwrap_or_default();
        assert_eq!(committed, crd::to_yaml(&def).expect("render"), "crds/{name} is out of date: run `cargo run -- crds --write-dir crds`");
    }
    let mut present: Vec<String> =
        fs::read_dir(crds_dir()).expect("crds/ exists").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    present.sort();
    expected.sort();
    assert_eq!(present, expected, "crds/ holds exactly one file per CRD");
}

#[test]
fn statelocks_print_exactly_the_documented_columns() {
    let crd = StateLock::crd();
    let cols: Vec<(String, String, String, i32)> = crd.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|c| (c.name, c.type_, c.json_path, c.priority.unwrap_or(0)))
        .collect();
    let expected = [
        ("Path", "string", ".spec.lockInfo.path", 0),
        ("Operation", "string", ".spec.operation", 0),
        ("Holder", "string", ".spec.lockInfo.who", 0),
        ("Holder-State", "string", ".status.holder.state", 0),
        ("Age", "date", ".spec.lockInfo.created", 0),
        ("Lock-ID", "string", ".spec.lockInfo.id", 1),
        ("Source", "string", ".spec.source", 1),
        ("Stored-In", "string", ".spec.storedIn", 1),
        ("Waiters", "integer", ".status.contention.waiterCount", 1),
    ]
    .map(|(n, t, p, pr)| (n.to_owned(), t.to_owned(), p.to_owned(), pr));
    assert_eq!(cols, expected);
    let names = &crd.spec.names;
    assert_eq!(names.plural, "statelocks");
    assert_eq!(names.short_names.as_deref(), Some(&["slock".to_owned()][..]));
    assert_eq!(
        names.categories.as_deref(),
        Some(&["tflock".to_owned()][..]),
        "not `terraform`: the singular name of Flux tofu-controller's Terraform kind"
    );
    assert_eq!(crd.spec.scope, "Namespaced");
}

/// Collect the paths of schema properties that have no description. `metadata` is the API
/// server's own and is left out, as are the built-in fields every object has.
fn undocumented(path: &str, schema: &JSONSchemaProps, out: &mut Vec<String>) {
    if let Some(props) = &schema.properties {
        for (name, prop) in props {
            let p = format!("{path}.{name}");
            if path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if prop.description.as_deref().is_none_or(str::is_empty) {
                out.push(p.clone());
            }
            undocumented(&p, prop, out);
        }
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
        undocumented(&format!("{path}[]"), items, out);
    }
}

#[test]
fn every_crd_field_has_a_description() {
    for def in crd::all() {
        let schema = def.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema");
        assert!(schema.description.is_some(), "{} has no top-level description", def.metadata.name.unwrap_or_default());
        let mut missing = Vec::new();
        undocumented("", schema, &mut missing);
        assert!(missing.is_empty(), "{}: fields without description: {missing:?}", def.metadata.name.unwrap_or_default());
    }
}

#[test]
fn both_crds_have_the_status_subresource() {
    for def in crd::all() {
        let sub = def.spec.versions[0].subresources.as_ref().and_then(|s| s.status.as_ref());
        assert!(sub.is_some(), "{:?}", def.metadata.name);
    }
}

#[test]
fn crds_pass_offline_validation_with_kubernetes_validate() {
    let files: Vec<String> = crd::all().iter().map(|d| crds_dir().join(crd::file_name(d)).display().to_string()).collect();
    let out = common::python_tool("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.32.0"])
        .args(&files)
        .output()
        .expect("kubernetes-validate must be installed (bash .ci/run installs it into .venv)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    for file in &files {
        assert!(text.contains(&format!("{file} passed")), "kubernetes-validate did not report {file} as passed:\n{text}");
    }
}

fn schema_of(def: &CustomResourceDefinition) -> Value {
    let schema = def.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema");
    // The CRD dialect marks optional fields `nullable`; plain JSON Schema spells that as a type union.
    fn to_json_schema(v: &mut Value) {
        if let Value::Object(m) = v {
            if m.remove("nullable") == Some(Value::Bool(true))
                && let Some(Value::String(t)) = m.get("type").cloned()
            {
                m.insert("type".into(), json!([t, "null"]));
            }
            m.retain(|k, _| !k.starts_with("x-kubernetes"));
            for child in m.values_mut() {
                to_json_schema(child);
            }
        } else if let Value::Array(a) = v {
            a.iter_mut().for_each(to_json_schema);
        }
    }
    let mut v = serde_json::to_value(schema).expect("json");
    to_json_schema(&mut v);
    v
}

#[test]
fn the_documented_locksource_example_is_valid_and_bad_values_are_rejected() {
    let schema = schema_of(&LockSource::crd());
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let example = json!({
        "apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource",
        "metadata": {"name": "prod-locks", "namespace": "terraform"},
        "spec": {
            "dynamodb": {"tableName": "tf-locks", "region": "eu-west-1", "endpoint": null, "credentialsSecretRef": null},
            "sync": {"mode": "Auto", "interval": "5s"},
            "holders": {"namespaces": ["atlantis"], "hostnamePattern": null},
            "expiry": {"mode": "Release", "gracePeriod": "15s", "staleAfter": "1h", "skewTolerance": "2s"},
            "gateway": {"allowedNamespaces": ["atlantis"], "allowedSourceRanges": []}
        }
    });
    let errors: Vec<String> = validator.iter_errors(&example).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let parsed: LockSource = serde_json::from_value(example.clone()).expect("the example deserializes");
    assert_eq!(parsed.spec.expiry.grace_period.get().as_secs(), 15);
    assert_eq!(parsed.spec.expiry.stale_after.get().as_secs(), 3600);

    for (pointer, bad) in [
        ("/spec/expiry/gracePeriod", json!("15")),
        ("/spec/expiry/gracePeriod", json!("-5s")),
        ("/spec/expiry/mode", json!("Delete")),
        ("/spec/sync/mode", json!("Sometimes")),
        ("/spec/dynamodb/tableName", json!("x")),
        ("/spec/dynamodb/endpoint", json!("ftp://example")),
    ] {
        let mut doc = example.clone();
        *doc.pointer_mut(pointer).expect(pointer) = bad.clone();
        assert!(!validator.is_valid(&doc), "{pointer} = {bad} must be rejected");
    }
}

#[test]
fn a_minimal_locksource_gets_the_safe_defaults() {
    let src: LockSource = serde_json::from_value(json!({
        "apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource",
        "metadata": {"name": "m", "namespace": "n"},
        "spec": {"dynamodb": {"tableName": "tf-locks", "region": "us-east-1"}}
    }))
    .expect("minimal LockSource");
    assert_eq!(src.spec.expiry.mode, crd::ExpiryMode::Observe, "releasing must be opt-in");
    assert_eq!(src.spec.sync.mode, crd::SyncMode::Auto);
    assert_eq!(src.spec.sync.interval.as_str(), "5s");
    assert!(src.spec.holders.namespaces.is_empty());
    assert!(src.spec.gateway.allowed_namespaces.is_none());
    assert!(src.spec.gateway.allowed_source_ranges.is_empty());
}
