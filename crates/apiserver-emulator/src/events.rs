//! Events are stored once, in `events.k8s.io/v1` form, and served as both that and `core/v1`
//! (kubernetes pkg/apis/events/v1/conversion.go).

use serde_json::{Map, Value, json};

const RENAMES: &[(&str, &str)] = &[
    // (events.k8s.io/v1, core/v1)
    ("note", "message"),
    ("regarding", "involvedObject"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
];

/// Stored (events.k8s.io/v1) → core/v1.
pub fn to_core(stored: &Value) -> Value {
    let mut out = Map::new();
    out.insert("kind".into(), json!("Event"));
    out.insert("apiVersion".into(), json!("v1"));
    if let Some(m) = stored.as_object() {
        for (k, v) in m {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            let name = RENAMES.iter().find(|(e, _)| e == k).map_or(k.as_str(), |(_, c)| c);
            out.insert(name.to_owned(), v.clone());
        }
    }
    Value::Object(out)
}

/// core/v1 → stored (events.k8s.io/v1).
pub fn from_core(core: &Value) -> Value {
    let mut out = Map::new();
    out.insert("kind".into(), json!("Event"));
    out.insert("apiVersion".into(), json!("events.k8s.io/v1"));
    if let Some(m) = core.as_object() {
        for (k, v) in m {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            let name = RENAMES.iter().find(|(_, c)| c == k).map_or(k.as_str(), |(e, _)| e);
            out.insert(name.to_owned(), v.clone());
        }
    }
    Value::Object(out)
}

/// The fields a core/v1 Event list can be selected by (pkg/registry/core/event/strategy.go).
pub fn core_field_supported(field: &str) -> bool {
    matches!(
        field,
        "metadata.name"
            | "metadata.namespace"
            | "involvedObject.kind"
            | "involvedObject.namespace"
            | "involvedObject.name"
            | "involvedObject.uid"
            | "involvedObject.apiVersion"
            | "involvedObject.resourceVersion"
            | "involvedObject.fieldPath"
            | "reason"
            | "reportingComponent"
            | "source"
            | "type"
    )
}

/// The fields an events.k8s.io/v1 Event list can be selected by.
pub fn events_field_supported(field: &str) -> bool {
    matches!(
        field,
        "metadata.name"
            | "metadata.namespace"
            | "regarding.kind"
            | "regarding.namespace"
            | "regarding.name"
            | "regarding.uid"
            | "regarding.apiVersion"
            | "regarding.resourceVersion"
            | "regarding.fieldPath"
            | "reason"
            | "reportingController"
            | "type"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_and_events_views_convert_both_ways() {
        let stored = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "note": "n", "regarding": {"name": "x"}, "reason": "R", "reportingController": "statelock", "series": {"count": 2}});
        let core = to_core(&stored);
        assert_eq!(core["message"], "n");
        assert_eq!(core["involvedObject"]["name"], "x");
        assert_eq!(core["reportingComponent"], "statelock");
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(from_core(&core), stored);
    }
}
