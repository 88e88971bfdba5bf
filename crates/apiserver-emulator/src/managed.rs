//! Server-side apply, approximated: per-manager sets of owned field paths (encoded as FieldsV1 in
//! `metadata.managedFields`), apply merges and conflicts, and ownership transfer on updates.
//!
//! Field types: objects are granular; lists are atomic unless the schema says
//! `x-kubernetes-list-type: set|map`. For built-in kinds (no schema here) the lists with a known
//! merge key are maps, `metadata.finalizers` is a set and `metadata.ownerReferences` a map keyed
//! by `uid`.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// An object field (`f:name`).
    F(String),
    /// A list-map item by its key fields (`k:{"type":"Ready"}`).
    K(String),
    /// A set item by value (`v:"x"`).
    V(String),
}

pub type Path = Vec<Step>;
pub type FieldSet = BTreeSet<Path>;

#[derive(Clone, Debug, PartialEq)]
enum ListType {
    Atomic,
    Set,
    Map(Vec<String>),
}

/// Which part of the object a write covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole object (no status subresource).
    Whole,
    /// Everything but `status` (main endpoint of a type with a status subresource).
    Main,
    /// Only `status`.
    Status,
}

fn builtin_list_type(field: &str) -> ListType {
    match field {
        "finalizers" => ListType::Set,
        "ownerReferences" => ListType::Map(vec!["uid".into()]),
        f => match crate::patch::strategic_merge_key(f) {
            Some(k) => ListType::Map(vec![k.into()]),
            None => ListType::Atomic,
        },
    }
}

fn schema_list_type(schema: &Value) -> ListType {
    match schema["x-kubernetes-list-type"].as_str() {
        Some("set") => ListType::Set,
        Some("map") => ListType::Map(
            schema["x-kubernetes-list-map-keys"]
                .as_array()
                .map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
        ),
        _ => ListType::Atomic,
    }
}

fn child_schema<'a>(schema: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    let s = schema?;
    s["properties"].get(key).or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

fn key_of(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        if let Some(v) = item.get(k) {
            m.insert(k.clone(), v.clone());
        }
    }
    Value::Object(m).to_string()
}

/// The leaf paths set in `obj` within `scope`. `schema` is a CRD's openAPIV3Schema, if any.
pub fn leaves(obj: &Value, schema: Option<&Value>, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, v) in m {
        match (k.as_str(), scope) {
            ("apiVersion" | "kind", _) => {}
            ("metadata", Scope::Status) => {}
            ("metadata", _) => {
                for mk in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(mv) = v.get(mk) {
                        let mut path = vec![Step::F("metadata".into()), Step::F(mk.into())];
                        collect(mv, &mut path, None, mk, &mut out);
                    }
                }
            }
            ("status", Scope::Main) => {}
            (_, Scope::Status) if k != "status" => {}
            _ => {
                let mut path = vec![Step::F(k.clone())];
                collect(v, &mut path, child_schema(schema, k), k, &mut out);
            }
        }
    }
    out
}

fn collect(v: &Value, path: &mut Path, schema: Option<&Value>, field: &str, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                path.push(Step::F(k.clone()));
                collect(c, path, child_schema(schema, k), k, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            let lt = match schema {
                Some(s) => schema_list_type(s),
                None => builtin_list_type(field),
            };
            let item_schema = schema.map(|s| &s["items"]);
            match lt {
                ListType::Atomic => {
                    out.insert(path.clone());
                }
                ListType::Set => {
                    for i in items {
                        path.push(Step::V(i.to_string()));
                        out.insert(path.clone());
                        path.pop();
                    }
                }
                ListType::Map(keys) => {
                    for i in items {
                        path.push(Step::K(key_of(i, &keys)));
                        out.insert(path.clone());
                        if let Some(m) = i.as_object() {
                            for (k, c) in m {
                                path.push(Step::F(k.clone()));
                                collect(c, path, child_schema(item_schema, k), k, out);
                                path.pop();
                            }
                        }
                        path.pop();
                    }
                }
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

fn item_matches(item: &Value, step: &Step) -> bool {
    match step {
        Step::K(k) => {
            let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(k) else { return false };
            keys.iter().all(|(kk, kv)| item.get(kk) == Some(kv))
        }
        Step::V(v) => serde_json::from_str::<Value>(v).is_ok_and(|want| *item == want),
        Step::F(_) => false,
    }
}

/// The value at a path.
pub fn get_at<'a>(obj: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut cur = obj;
    for step in path {
        cur = match step {
            Step::F(k) => cur.get(k)?,
            s => cur.as_array()?.iter().find(|i| item_matches(i, s))?,
        };
    }
    Some(cur)
}

/// Remove the value at a path (a field, a list-map item or a set item).
pub fn remove_at(obj: &mut Value, path: &[Step]) {
    let Some((last, parent)) = path.split_last() else { return };
    let mut cur = obj;
    for step in parent {
        let next = match step {
            Step::F(k) => cur.get_mut(k),
            s => cur.as_array_mut().and_then(|a| a.iter_mut().find(|i| item_matches(i, s))),
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        Step::F(k) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(k);
            }
        }
        s => {
            if let Some(a) = cur.as_array_mut() {
                a.retain(|i| !item_matches(i, s));
            }
        }
    }
}

/// After `path` was removed: remove the objects above it that are left empty, nearest first, as
/// structured-merge-diff does (an emptied struct becomes null, and a CRD drops a null field that
/// is not nullable), unless `kept` says an ancestor is owned or applied as such. Top-level
/// sections (`spec`, `status`, `metadata`) stay.
pub fn prune_empty_parents(obj: &mut Value, path: &[Step], kept: impl Fn(&[Step]) -> bool) {
    for len in (2..path.len()).rev() {
        let parent = &path[..len];
        let empty = get_at(obj, parent).is_some_and(|v| v.as_object().is_some_and(Map::is_empty));
        if !empty || kept(parent) || !matches!(parent.last(), Some(Step::F(_))) {
            return;
        }
        remove_at(obj, parent);
    }
}

/// Merge an applied configuration into the live object, following the field types.
pub fn merge_applied(live: &mut Value, applied: &Value, schema: Option<&Value>, field: &str) {
    match applied {
        Value::Object(a) => {
            if !live.is_object() {
                *live = Value::Object(Map::new());
            }
            if let Value::Object(l) = live {
                for (k, v) in a {
                    let child = if field.is_empty() && k == "metadata" { None } else { child_schema(schema, k) };
                    merge_applied(l.entry(k.clone()).or_insert(Value::Null), v, child, k);
                }
            }
        }
        Value::Array(items) => {
            let lt = match schema {
                Some(s) => schema_list_type(s),
                None => builtin_list_type(field),
            };
            match (lt, live.as_array_mut()) {
                (ListType::Set, Some(l)) => {
                    for i in items {
                        if !l.contains(i) {
                            l.push(i.clone());
                        }
                    }
                }
                (ListType::Map(keys), Some(l)) => {
                    let item_schema = schema.map(|s| &s["items"]);
                    for i in items {
                        let step = Step::K(key_of(i, &keys));
                        match l.iter_mut().find(|e| item_matches(e, &step)) {
                            Some(e) => merge_applied(e, i, item_schema, ""),
                            None => l.push(i.clone()),
                        }
                    }
                }
                _ => *live = applied.clone(),
            }
        }
        _ => *live = applied.clone(),
    }
}

/// One `metadata.managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

impl Entry {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": encode(&self.fields),
        });
        if let Some(s) = &self.subresource {
            v["subresource"] = json!(s);
        }
        v
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            manager: v["manager"].as_str()?.to_owned(),
            operation: v["operation"].as_str().unwrap_or("Update").to_owned(),
            api_version: v["apiVersion"].as_str().unwrap_or_default().to_owned(),
            time: v["time"].as_str().unwrap_or_default().to_owned(),
            subresource: v["subresource"].as_str().map(str::to_owned),
            fields: decode(&v["fieldsV1"]),
        })
    }
}

/// Encode a field set as FieldsV1.
pub fn encode(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for step in path {
            let key = match step {
                Step::F(f) => format!("f:{f}"),
                Step::K(k) => format!("k:{k}"),
                Step::V(v) => format!("v:{v}"),
            };
            node = node.entry(key).or_insert_with(|| Value::Object(Map::new())).as_object_mut().expect("fieldsV1 nodes are objects");
        }
        if !node.is_empty() || matches!(path.last(), Some(Step::K(_))) {
            node.insert(".".into(), json!({}));
        }
    }
    // A node that gained children after being marked a leaf must carry "." too.
    fn mark(set: &FieldSet, node: &mut Map<String, Value>, path: &mut Path) {
        for (k, child) in node.iter_mut() {
            if k == "." {
                continue;
            }
            let step = match k.split_at(2) {
                ("f:", r) => Step::F(r.into()),
                ("k:", r) => Step::K(r.into()),
                (_, r) => Step::V(r.into()),
            };
            path.push(step);
            if let Some(m) = child.as_object_mut() {
                if !m.is_empty() && set.contains(path) {
                    m.insert(".".into(), json!({}));
                }
                mark(set, m, path);
            }
            path.pop();
        }
    }
    mark(set, &mut root, &mut Vec::new());
    Value::Object(root)
}

/// Decode FieldsV1 into a field set.
pub fn decode(v: &Value) -> FieldSet {
    fn walk(node: &Map<String, Value>, path: &mut Path, out: &mut FieldSet) {
        for (k, child) in node {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            let Some((prefix, rest)) = k.split_once(':') else { continue };
            path.push(match prefix {
                "f" => Step::F(rest.into()),
                "k" => Step::K(rest.into()),
                _ => Step::V(rest.into()),
            });
            match child.as_object() {
                Some(m) if !m.is_empty() => walk(m, path, out),
                _ => {
                    out.insert(path.clone());
                }
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    if let Some(m) = v.as_object() {
        walk(m, &mut Vec::new(), &mut out);
    }
    out
}

/// Render a path as the apiserver prints it in conflict messages: `.spec.x`, `.status.conditions[type="Ready"]`.
pub fn display(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::F(f) => {
                s.push('.');
                s.push_str(f);
            }
            Step::K(k) => {
                let inner: Vec<String> = serde_json::from_str::<Map<String, Value>>(k)
                    .map(|m| m.iter().map(|(kk, vv)| format!("{kk}={vv}")).collect())
                    .unwrap_or_default();
                s.push_str(&format!("[{}]", inner.join(",")));
            }
            Step::V(v) => s.push_str(&format!("[={v}]")),
        }
    }
    s
}

/// A path is covered by a set when the set holds it or any prefix of it (an atomic owner).
pub fn owns(set: &FieldSet, path: &[Step]) -> bool {
    (1..=path.len()).any(|n| set.contains(&path[..n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_struct_goes_with_its_last_field_unless_someone_owns_it() {
        let f = |names: &[&str]| names.iter().map(|n| Step::F((*n).to_owned())).collect::<Vec<_>>();
        let mut obj = json!({"status": {"holder": {"state": "Alive", "evidence": {"reason": "PodNotFound"}}}});
        remove_at(&mut obj, &f(&["status", "holder", "evidence", "reason"]));
        prune_empty_parents(&mut obj, &f(&["status", "holder", "evidence", "reason"]), |_| false);
        assert_eq!(obj, json!({"status": {"holder": {"state": "Alive"}}}), "no empty evidence left to fail validation");
        // A struct someone owns (or applies) as such stays, even empty; top-level sections stay.
        let mut obj = json!({"status": {"holder": {"evidence": {"reason": "x"}}}});
        remove_at(&mut obj, &f(&["status", "holder", "evidence", "reason"]));
        prune_empty_parents(&mut obj, &f(&["status", "holder", "evidence", "reason"]), |p| {
            p == f(&["status", "holder", "evidence"]).as_slice()
        });
        assert_eq!(obj, json!({"status": {"holder": {"evidence": {}}}}));
        let mut obj = json!({"status": {"a": {"b": 1}}});
        remove_at(&mut obj, &f(&["status", "a", "b"]));
        prune_empty_parents(&mut obj, &f(&["status", "a", "b"]), |_| false);
        assert_eq!(obj, json!({"status": {}}));
    }

    #[test]
    fn fields_v1_round_trips() {
        let schema = json!({"properties": {"status": {"properties": {"conditions": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"], "items": {"properties": {"type": {}, "status": {}}}}}}}});
        let obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"labels": {"a": "b"}, "finalizers": ["f"]}, "spec": {"x": 1, "l": [1, 2]}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let set = leaves(&obj, Some(&schema), Scope::Whole);
        let enc = encode(&set);
        assert_eq!(decode(&enc), set);
        assert_eq!(
            enc,
            json!({"f:metadata": {"f:labels": {"f:a": {}}, "f:finalizers": {"v:\"f\"": {}}}, "f:spec": {"f:x": {}, "f:l": {}}, "f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:type": {}, "f:status": {}}}}})
        );
    }

    #[test]
    fn merge_applied_merges_list_maps_by_key() {
        let schema =
            json!({"properties": {"c": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}}});
        let mut live = json!({"c": [{"type": "A", "v": 1}, {"type": "B", "v": 1}], "l": [1]});
        merge_applied(&mut live, &json!({"c": [{"type": "B", "v": 2}], "l": [2]}), Some(&schema), "");
        assert_eq!(live, json!({"c": [{"type": "A", "v": 1}, {"type": "B", "v": 2}], "l": [2]}));
    }
}
