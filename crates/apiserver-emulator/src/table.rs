//! Server-side Tables (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), as kubectl
//! requests for `get`: CRD printer columns, and the built-in printers for pods, namespaces,
//! events and leases.

use serde_json::{Value, json};

use crate::{
    clock::{human_duration, parse_rfc3339},
    events, jsonpath,
    registry::{Printer, ResourceType},
};

const NAME_DESC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DESC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

fn col(name: &str, ty: &str, format: &str, desc: &str, priority: i64) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": desc, "priority": priority})
}

fn age(ts: &Value, now: i64) -> Value {
    match ts.as_str().and_then(parse_rfc3339) {
        Some(t) => json!(human_duration(now - t)),
        None => json!("<unknown>"),
    }
}

/// The column definitions of a type.
pub fn columns(rt: &ResourceType) -> Vec<Value> {
    match &rt.printer {
        Printer::Default => vec![col("Name", "string", "name", NAME_DESC, 0), col("Age", "string", "", AGE_DESC, 0)],
        Printer::Columns(cols) => {
            let mut out = vec![col("Name", "string", "name", NAME_DESC, 0)];
            for c in cols {
                out.push(col(
                    c["name"].as_str().unwrap_or_default(),
                    c["type"].as_str().unwrap_or("string"),
                    c["format"].as_str().unwrap_or_default(),
                    c["description"].as_str().unwrap_or_default(),
                    c["priority"].as_i64().unwrap_or(0),
                ));
            }
            out
        }
        Printer::Pod => vec![
            col("Name", "string", "name", NAME_DESC, 0),
            col("Ready", "string", "", "The aggregate readiness state of this pod for accepting traffic.", 0),
            col("Status", "string", "", "The aggregate status of the containers in this pod.", 0),
            col(
                "Restarts",
                "string",
                "",
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
                0,
            ),
            col("Age", "string", "", AGE_DESC, 0),
            col(
                "IP",
                "string",
                "",
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
                1,
            ),
            col("Node", "string", "", "NodeName is a request to schedule this pod onto a specific node.", 1),
        ],
        Printer::Namespace => vec![
            col("Name", "string", "name", NAME_DESC, 0),
            col("Status", "string", "", "The status of the namespace", 0),
            col("Age", "string", "", AGE_DESC, 0),
        ],
        Printer::Lease => vec![
            col("Name", "string", "name", NAME_DESC, 0),
            col("Holder", "string", "", "holderIdentity contains the identity of the holder of a current lease.", 0),
            col("Age", "string", "", AGE_DESC, 0),
        ],
        Printer::Event => vec![
            col("Last Seen", "string", "", "", 0),
            col("Type", "string", "", "Type of this event (Normal, Warning), new types could be added in the future.", 0),
            col(
                "Reason",
                "string",
                "",
                "The reason this event is generated. 'reason' should be short and unique; it should be in UpperCamelCase format (starting with a capital letter).",
                0,
            ),
            col("Object", "string", "", "The object that this event is about.", 0),
            col("Subobject", "string", "", "", 1),
            col("Source", "string", "", "The component reporting this event. Should be a short machine understandable string.", 1),
            col("Message", "string", "", "A human-readable description of the status of this operation.", 0),
            col("First Seen", "string", "", "", 1),
            col("Count", "string", "", "The number of times this event has occurred.", 1),
            col("Name", "string", "name", NAME_DESC, 1),
        ],
    }
}

/// The cells of one object (already in the served view).
pub fn cells(rt: &ResourceType, obj: &Value, now: i64) -> Vec<Value> {
    let name = obj["metadata"]["name"].clone();
    let created = &obj["metadata"]["creationTimestamp"];
    match &rt.printer {
        Printer::Default => vec![name, age(created, now)],
        Printer::Columns(cols) => {
            let mut out = vec![name];
            for c in cols {
                let v = jsonpath::eval(obj, c["jsonPath"].as_str().unwrap_or_default()).cloned().unwrap_or(Value::Null);
                out.push(match (c["type"].as_str(), &v) {
                    (_, Value::Null) => Value::Null,
                    (Some("date"), Value::String(_)) => age(&v, now),
                    (Some("string"), Value::String(_)) => v,
                    (Some("string"), other) => json!(other.to_string()),
                    (Some("integer"), Value::Number(n)) if n.is_i64() || n.is_u64() => v,
                    (Some("number"), Value::Number(_)) => v,
                    (Some("boolean"), Value::Bool(_)) => v,
                    (_, Value::String(_)) => v,
                    (_, other) => json!(other.to_string()),
                });
            }
            out
        }
        Printer::Pod => {
            let specs = obj["spec"]["containers"].as_array().map_or(0, Vec::len);
            let statuses = obj["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
            let ready = statuses.iter().filter(|s| s["ready"].as_bool() == Some(true)).count();
            let restarts: i64 = statuses.iter().filter_map(|s| s["restartCount"].as_i64()).sum();
            let phase = if !obj["metadata"]["deletionTimestamp"].is_null() {
                "Terminating".to_owned()
            } else {
                obj["status"]["reason"].as_str().or(obj["status"]["phase"].as_str()).unwrap_or("Pending").to_owned()
            };
            let ip = obj["status"]["podIP"].as_str().unwrap_or("<none>");
            let node = obj["spec"]["nodeName"].as_str().unwrap_or("<none>");
            vec![
                name,
                json!(format!("{ready}/{specs}")),
                json!(phase),
                json!(restarts.to_string()),
                age(created, now),
                json!(ip),
                json!(node),
            ]
        }
        Printer::Namespace => vec![name, json!(obj["status"]["phase"].as_str().unwrap_or("Active")), age(created, now)],
        Printer::Lease => vec![name, json!(obj["spec"]["holderIdentity"].as_str().unwrap_or("")), age(created, now)],
        Printer::Event => {
            let e = if obj["apiVersion"] == "v1" { obj.clone() } else { events::to_core(obj) };
            let last_ts = [&e["series"]["lastObservedTime"], &e["lastTimestamp"], &e["eventTime"]]
                .into_iter()
                .find(|v| v.is_string())
                .cloned()
                .unwrap_or(Value::Null);
            let first_ts = [&e["firstTimestamp"], &e["eventTime"]].into_iter().find(|v| v.is_string()).cloned().unwrap_or(Value::Null);
            let kind = e["involvedObject"]["kind"].as_str().unwrap_or_default().to_lowercase();
            let object = format!("{kind}/{}", e["involvedObject"]["name"].as_str().unwrap_or_default());
            let source = match (e["source"]["component"].as_str(), e["reportingComponent"].as_str()) {
                (Some(c), _) if !c.is_empty() => match e["source"]["host"].as_str() {
                    Some(h) if !h.is_empty() => format!("{c}, {h}"),
                    _ => c.to_owned(),
                },
                (_, Some(r)) => r.to_owned(),
                _ => String::new(),
            };
            let count = e["series"]["count"].as_i64().or(e["count"].as_i64()).unwrap_or(1);
            vec![
                age(&last_ts, now),
                json!(e["type"].as_str().unwrap_or_default()),
                json!(e["reason"].as_str().unwrap_or_default()),
                json!(object),
                json!(e["involvedObject"]["fieldPath"].as_str().unwrap_or_default()),
                json!(source),
                json!(e["message"].as_str().unwrap_or_default().trim()),
                age(&first_ts, now),
                json!(count),
                name,
            ]
        }
    }
}

/// What a row carries besides its cells (`includeObject`).
pub fn row_object(obj: &Value, include: &str) -> Option<Value> {
    match include {
        "None" => None,
        "Object" => Some(obj.clone()),
        _ => Some(json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})),
    }
}

/// A whole Table.
pub fn table(rt: &ResourceType, items: &[Value], rv: &str, cont: Option<&str>, include: &str, now: i64) -> Value {
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(rt, o, now)});
            if let Some(obj) = row_object(o, include) {
                row["object"] = obj;
            }
            row
        })
        .collect();
    let mut md = json!({"resourceVersion": rv});
    if let Some(c) = cont {
        md["continue"] = json!(c);
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": md, "columnDefinitions": columns(rt), "rows": rows})
}
