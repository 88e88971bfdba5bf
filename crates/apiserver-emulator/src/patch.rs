//! Patch types: RFC 7386 merge patch, RFC 6902 JSON patch (with the evanphx/json-patch v4
//! behaviour the apiserver has), and strategic merge for built-in kinds.

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` deletes, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        if let Value::Object(t) = target {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
    } else {
        *target = patch.clone();
    }
}

/// Why a JSON patch could not be applied.
#[derive(Debug, PartialEq, Eq)]
pub struct JsonPatchError(pub String);

/// RFC 6902 with the apiserver's library semantics: a `test` of `null` passes on a missing path
/// (kube-runtime's finalizer helper relies on this), and `-` appends to an array.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops = patch.as_array().ok_or_else(|| JsonPatchError("a JSON patch must be an array of operations".into()))?;
    for op in ops {
        let kind = op["op"].as_str().ok_or_else(|| JsonPatchError("missing op".into()))?;
        let path = op["path"].as_str().ok_or_else(|| JsonPatchError(format!("missing path in {kind} operation")))?;
        match kind {
            "add" => add(doc, path, op.get("value").cloned().ok_or_else(|| JsonPatchError("missing value".into()))?)?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                let value = op.get("value").cloned().ok_or_else(|| JsonPatchError("missing value".into()))?;
                let slot = doc
                    .pointer_mut(path)
                    .ok_or_else(|| JsonPatchError(format!("replace operation does not apply: doc is missing key: {path}")))?;
                *slot = value;
            }
            "move" => {
                let from = op["from"].as_str().ok_or_else(|| JsonPatchError("missing from".into()))?;
                let v = remove(doc, from)?;
                add(doc, path, v)?;
            }
            "copy" => {
                let from = op["from"].as_str().ok_or_else(|| JsonPatchError("missing from".into()))?;
                let v = doc
                    .pointer(from)
                    .cloned()
                    .ok_or_else(|| JsonPatchError(format!("copy operation does not apply: doc is missing from path: {from}")))?;
                add(doc, path, v)?;
            }
            "test" => {
                let want = op.get("value").cloned().unwrap_or(Value::Null);
                let got = doc.pointer(path).cloned().unwrap_or(Value::Null);
                if got != want {
                    return Err(JsonPatchError(format!("testing value {path} failed: test failed")));
                }
            }
            other => return Err(JsonPatchError(format!("Unexpected kind: {other}"))),
        }
    }
    Ok(())
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_parent(path: &str) -> Result<(&str, String), JsonPatchError> {
    let i = path.rfind('/').ok_or_else(|| JsonPatchError(format!("invalid path {path:?}")))?;
    Ok((&path[..i], unescape(&path[i + 1..])))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), JsonPatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_parent(path)?;
    let target =
        doc.pointer_mut(parent).ok_or_else(|| JsonPatchError(format!("add operation does not apply: doc is missing path: {path:?}")))?;
    match target {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last.parse().map_err(|_| JsonPatchError(format!("invalid array index {last:?}")))?;
            if i > a.len() {
                return Err(JsonPatchError(format!("Unable to access invalid index: {i}")));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(JsonPatchError(format!("add operation does not apply: doc is missing path: {path:?}"))),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, JsonPatchError> {
    let (parent, last) = split_parent(path)?;
    let missing = || JsonPatchError(format!("remove operation does not apply: doc is missing path: {path:?}"));
    match doc.pointer_mut(parent).ok_or_else(missing)? {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() { Ok(a.remove(i)) } else { Err(missing()) }
        }
        _ => Err(missing()),
    }
}

/// The merge key of well-known lists in built-in kinds (the `patchMergeKey` tags).
pub fn strategic_merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses" => "name",
        "volumeMounts" => "mountPath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "ports" => "containerPort",
        _ => return None,
    })
}

/// Strategic merge patch, approximated for built-in kinds: like a merge patch, except that
/// lists with a known merge key merge item by item, `$patch: delete` removes an item, and the
/// `$setElementOrder` / `$retainKeys` directives kubectl sends are accepted and ignored.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    smp(target, patch, None);
}

fn smp(target: &mut Value, patch: &Value, field: Option<&str>) {
    match patch {
        Value::Object(p) => {
            if p.get("$patch").and_then(Value::as_str) == Some("replace") {
                let mut clean = patch.clone();
                if let Value::Object(m) = &mut clean {
                    m.remove("$patch");
                }
                *target = clean;
                return;
            }
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
                        continue;
                    }
                    if let Some(list) = k.strip_prefix("$deleteFromPrimitiveList/") {
                        if let (Some(Value::Array(items)), Some(del)) = (t.get_mut(list), v.as_array()) {
                            items.retain(|i| !del.contains(i));
                        }
                        continue;
                    }
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        smp(t.entry(k.clone()).or_insert(Value::Null), v, Some(k));
                    }
                }
            }
        }
        Value::Array(items) => match (field.and_then(strategic_merge_key), target) {
            (Some(key), Value::Array(existing)) => {
                for item in items {
                    let id = &item[key];
                    let pos = existing.iter().position(|e| &e[key] == id && !id.is_null());
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            existing.remove(i);
                        }
                        (Some(i), false) => smp(&mut existing[i], item, None),
                        (None, true) => {}
                        (None, false) => existing.push(item.clone()),
                    }
                }
            }
            (_, t) => *t = patch.clone(),
        },
        _ => *target = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386_examples() {
        // RFC 7386 appendix A, a selection.
        for (orig, patch, want) in [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": {"b": "c"}}), json!({"a": {"b": "d", "c": null}}), json!({"a": {"b": "d"}})),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!([1, 2]), json!({"a": "b", "c": null}), json!({"a": "b"})),
        ] {
            let mut doc = orig.clone();
            merge_patch(&mut doc, &patch);
            assert_eq!(doc, want, "{orig} + {patch}");
        }
    }

    #[test]
    fn json_patch_test_null_passes_on_a_missing_path_like_the_apiserver() {
        let mut doc = json!({"metadata": {"name": "x"}});
        json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}, {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]),
        )
        .expect("kube-runtime finalizer patch applies");
        assert_eq!(doc["metadata"]["finalizers"], json!(["f"]));
        json_patch(&mut doc, &json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "g"}])).expect("append");
        assert_eq!(doc["metadata"]["finalizers"], json!(["f", "g"]));
        assert!(json_patch(&mut doc, &json!([{"op": "test", "path": "/metadata/name", "value": "y"}])).is_err());
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(&mut doc, &json!([{"op": "replace", "path": "/metadata/name", "value": "z"}])).is_ok());
        assert_eq!(doc["metadata"]["name"], "z");
    }

    #[test]
    fn strategic_merge_merges_containers_by_name_and_deletes() {
        let mut doc = json!({"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}});
        strategic_merge_patch(
            &mut doc,
            &json!({"$setElementOrder/containers": [{"name": "a"}], "spec": {"containers": [{"name": "a", "image": "2"}, {"name": "b", "$patch": "delete"}]}}),
        );
        assert_eq!(doc, json!({"spec": {"containers": [{"name": "a", "image": "2"}]}}));
    }
}
