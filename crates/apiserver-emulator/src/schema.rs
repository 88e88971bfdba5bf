//! Structural-schema handling for custom resources, in the apiserver's order: prune unknown
//! fields, apply defaults, validate (types, enums, patterns, lengths, bounds, required,
//! nullable, `date-time`). CEL rules (`x-kubernetes-validations`) are not evaluated.

use std::{collections::HashMap, sync::Mutex};

use regex::Regex;
use serde_json::{Map, Value};

use crate::status::Cause;

const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Drop unknown `metadata` fields, as the ObjectMeta decoder does.
pub fn prune_metadata(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.retain(|k, _| OBJECT_META_FIELDS.contains(&k.as_str()));
    }
}

/// Prune and default a custom resource in place.
pub fn prune_and_default(obj: &mut Value, schema: &Value) {
    if let Some(m) = obj.as_object_mut() {
        let props = &schema["properties"];
        m.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata") || props.get(k).is_some() || preserves(schema));
        for (k, v) in m.iter_mut() {
            if let Some(s) = props.get(k) {
                walk_prune(v, s);
            }
        }
        apply_defaults(m, schema);
    }
    prune_metadata(obj);
}

fn preserves(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true)
}

fn walk_prune(v: &mut Value, schema: &Value) {
    match v {
        Value::Object(m) => {
            if schema["x-kubernetes-embedded-resource"].as_bool() == Some(true) {
                // apiVersion, kind and metadata of an embedded object are kept.
            }
            let props = schema.get("properties").filter(|p| p.is_object());
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if let Some(props) = props {
                let embedded = schema["x-kubernetes-embedded-resource"].as_bool() == Some(true);
                m.retain(|k, _| {
                    props.get(k).is_some() || preserves(schema) || (embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
                });
                for (k, c) in m.iter_mut() {
                    if let Some(s) = props.get(k) {
                        walk_prune(c, s);
                    }
                }
            } else if let Some(a) = additional {
                for c in m.values_mut() {
                    walk_prune(c, a);
                }
            } else if !preserves(schema) && schema["type"] == "object" {
                m.clear();
            }
            apply_defaults(m, schema);
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for i in items {
                    walk_prune(i, s);
                }
            }
        }
        _ => {}
    }
}

fn apply_defaults(m: &mut Map<String, Value>, schema: &Value) {
    let Some(props) = schema["properties"].as_object() else { return };
    for (k, s) in props {
        let nullable = s["nullable"].as_bool() == Some(true);
        if m.get(k).is_some_and(Value::is_null) && !nullable {
            m.remove(k);
        }
        if !m.contains_key(k)
            && let Some(d) = s.get("default")
        {
            let mut d = d.clone();
            walk_prune(&mut d, s);
            m.insert(k.clone(), d);
        }
    }
}

/// Validate a (pruned, defaulted) custom resource against its schema.
pub fn validate(obj: &Value, schema: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    if let Some(m) = obj.as_object() {
        for (k, v) in m {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if let Some(s) = schema["properties"].get(k) {
                check(v, s, k, &mut out);
            }
        }
        required(m, schema, "", &mut out);
    }
    out
}

fn required(m: &Map<String, Value>, schema: &Value, path: &str, out: &mut Vec<Cause>) {
    for r in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        if !m.contains_key(r) {
            let field = if path.is_empty() { r.to_owned() } else { format!("{path}.{r}") };
            out.push(Cause { reason: "FieldValueRequired", field, message: "Required value".into() });
        }
    }
}

fn quote(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn regex_cached(pattern: &str) -> Option<Regex> {
    static CACHE: Mutex<Option<HashMap<String, Regex>>> = Mutex::new(None);
    let mut guard = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(r) = map.get(pattern) {
        return Some(r.clone());
    }
    let r = Regex::new(pattern).ok()?;
    map.insert(pattern.to_owned(), r.clone());
    Some(r)
}

fn check(v: &Value, s: &Value, path: &str, out: &mut Vec<Cause>) {
    let invalid = |out: &mut Vec<Cause>, msg: String| {
        out.push(Cause { reason: "FieldValueInvalid", field: path.to_owned(), message: format!("Invalid value: {}: {msg}", quote(v)) })
    };
    if v.is_null() {
        if s["nullable"].as_bool() != Some(true) {
            out.push(Cause {
                reason: "FieldValueTypeInvalid",
                field: path.to_owned(),
                message: format!(
                    "Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                    s["type"].as_str().unwrap_or("object")
                ),
            });
        }
        return;
    }
    let int_or_string = s["x-kubernetes-int-or-string"].as_bool() == Some(true);
    if let Some(t) = s["type"].as_str() {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string() || (int_or_string && v.is_i64()),
            "integer" => v.is_i64() || v.is_u64() || (int_or_string && v.is_string()),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            let got = match v {
                Value::Object(_) => "object",
                Value::Array(_) => "array",
                Value::String(_) => "string",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_f64() => "number",
                Value::Number(_) => "integer",
                Value::Null => "null",
            };
            out.push(Cause {
                reason: "FieldValueTypeInvalid",
                field: path.to_owned(),
                message: format!("Invalid value: {}: {path} in body must be of type {t}: \"{got}\"", quote(v)),
            });
            return;
        }
    }
    if let Some(allowed) = s["enum"].as_array()
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(quote).collect();
        out.push(Cause {
            reason: "FieldValueNotSupported",
            field: path.to_owned(),
            message: format!("Unsupported value: {}: supported values: {}", quote(v), list.join(", ")),
        });
    }
    match v {
        Value::String(text) => {
            let chars = text.chars().count() as u64;
            if let Some(max) = s["maxLength"].as_u64()
                && chars > max
            {
                out.push(Cause {
                    reason: "FieldValueTooLong",
                    field: path.to_owned(),
                    message: format!("Too long: may not be more than {max} bytes"),
                });
            }
            if let Some(min) = s["minLength"].as_u64()
                && chars < min
            {
                invalid(out, format!("{path} in body should be at least {min} chars long"));
            }
            if let Some(p) = s["pattern"].as_str()
                && regex_cached(p).is_some_and(|r| !r.is_match(text))
            {
                invalid(out, format!("{path} in body should match '{p}'"));
            }
            if s["format"] == "date-time" && crate::clock::parse_rfc3339(text).is_none() {
                invalid(out, format!("{path} in body must be of type date-time: {text:?}"));
            }
        }
        Value::Number(n) => {
            if let (Some(min), Some(x)) = (s["minimum"].as_f64(), n.as_f64())
                && x < min
            {
                invalid(out, format!("{path} in body should be greater than or equal to {min}"));
            }
            if let (Some(max), Some(x)) = (s["maximum"].as_f64(), n.as_f64())
                && x > max
            {
                invalid(out, format!("{path} in body should be less than or equal to {max}"));
            }
        }
        Value::Array(items) => {
            if let Some(max) = s["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                out.push(Cause {
                    reason: "FieldValueTooMany",
                    field: path.to_owned(),
                    message: format!("Too many: {}: must have at most {max} items", items.len()),
                });
            }
            if let Some(min) = s["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                invalid(out, format!("{path} in body should have at least {min} items"));
            }
            if let Some(is) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item, is, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::Object(m) => {
            if let Some(props) = s["properties"].as_object() {
                for (k, c) in m {
                    if let Some(cs) = props.get(k) {
                        check(c, cs, &format!("{path}.{k}"), out);
                    }
                }
            } else if let Some(a) = s.get("additionalProperties").filter(|a| a.is_object()) {
                for (k, c) in m {
                    check(c, a, &format!("{path}[{k}]"), out);
                }
            }
            required(m, s, path, out);
        }
        _ => {}
    }
}

/// `metadata.name` validation: DNS-1123 subdomain (label for namespaces).
pub fn validate_name(name: &str, label_only: bool) -> Option<Cause> {
    const SUB: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
    const LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
    let (re, max, msg) = if label_only {
        (
            LABEL,
            63,
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        )
    } else {
        (
            SUB,
            253,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        )
    };
    if name.len() > max {
        return Some(Cause {
            reason: "FieldValueInvalid",
            field: "metadata.name".into(),
            message: format!("Invalid value: {name:?}: must be no more than {max} characters"),
        });
    }
    if regex_cached(re).is_some_and(|r| r.is_match(name)) {
        None
    } else {
        Some(Cause { reason: "FieldValueInvalid", field: "metadata.name".into(), message: format!("Invalid value: {name:?}: {msg}") })
    }
}

/// Label keys and values (apimachinery validation.IsQualifiedName / IsValidLabelValue), simplified.
pub fn validate_labels(obj: &Value) -> Vec<Cause> {
    const VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
    let mut out = Vec::new();
    if let Some(labels) = obj["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            let value = v.as_str().unwrap_or_default();
            if value.len() > 63 || regex_cached(VALUE).is_some_and(|r| !r.is_match(value)) {
                out.push(Cause {
                    reason: "FieldValueInvalid",
                    field: "metadata.labels".to_string(),
                    message: format!("Invalid value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"),
                });
            }
            if k.is_empty() || k.len() > 317 {
                out.push(Cause {
                    reason: "FieldValueInvalid",
                    field: "metadata.labels".into(),
                    message: format!("Invalid value: {k:?}: name part must be non-empty"),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["a"], "properties": {
                "a": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                "mode": {"type": "string", "enum": ["X", "Y"], "default": "X"},
                "n": {"type": "integer", "minimum": 1},
                "opt": {"type": "string", "nullable": true},
                "nested": {"type": "object", "default": {}, "properties": {"d": {"type": "string", "default": "dd"}}}
            }},
            "status": {"type": "object", "properties": {"ok": {"type": "boolean"}}}
        }})
    }

    #[test]
    fn prunes_unknown_fields_and_applies_defaults() {
        let mut o = json!({"apiVersion": "g/v1", "kind": "K", "metadata": {"name": "x", "bogus": 1}, "spec": {"a": "abc", "junk": 1}, "status": {"ok": true, "extra": 2}, "top": 1});
        prune_and_default(&mut o, &schema());
        assert_eq!(
            o,
            json!({"apiVersion": "g/v1", "kind": "K", "metadata": {"name": "x"}, "spec": {"a": "abc", "mode": "X", "nested": {"d": "dd"}}, "status": {"ok": true}})
        );
    }

    #[test]
    fn validation_messages() {
        let o = json!({"spec": {"mode": "Z", "n": 0, "a": "ABCDEFG"}});
        let causes: Vec<String> = validate(&o, &schema()).into_iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        assert!(causes.contains(&"spec.mode: Unsupported value: \"Z\": supported values: \"X\", \"Y\"".to_owned()), "{causes:?}");
        assert!(causes.iter().any(|c| c.starts_with("spec.n: Invalid value: 0")), "{causes:?}");
        assert!(causes.iter().any(|c| c.starts_with("spec.a: Too long")), "{causes:?}");
        assert!(causes.iter().any(|c| c.contains("should match '^[a-z]+$'")), "{causes:?}");
        let missing: Vec<String> =
            validate(&json!({"spec": {}}), &schema()).into_iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        assert_eq!(missing, vec!["spec.a: Required value".to_owned()]);
    }

    #[test]
    fn names_are_dns1123() {
        assert!(validate_name("tfstate-demo-abc", false).is_none());
        assert!(validate_name("a.b", false).is_none());
        assert!(validate_name("a.b", true).is_some());
        assert!(validate_name("Bad_Name", false).is_some());
        assert!(validate_name(&"a".repeat(254), false).is_some());
    }
}
