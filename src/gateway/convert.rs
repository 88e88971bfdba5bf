//! DynamoDB JSON attribute values <-> the SDK's AttributeValue (for forwarding).

use std::collections::HashMap;

use aws_sdk_dynamodb::{primitives::Blob, types::AttributeValue};
use serde_json::{Map, Value, json};

use super::protocol::Item;

// Binary values travel base64-encoded in DynamoDB's JSON; the SDK's own codec reads and writes them.
//
// Invalid base64 decodes to empty bytes here, which would silently corrupt a value on its way to
// DynamoDB. That is safe only because `protocol::parse` is the gatekeeper: every attribute value it
// lets through (Item, Key, ExpressionAttributeValues) is exactly `{"S": "<string>"}`, the only type
// Terraform, OpenTofu and statelock's release use, so no request value ever reaches the B/BS arms of
// `to_sdk`. Those arms (and the other types) remain for the round trip with `from_sdk`, whose input,
// DynamoDB's answers, may hold any type. Whoever widens the parser to admit B or BS must first make
// this conversion fail on invalid base64 instead of returning empty bytes.
fn b64_decode(s: &str) -> Vec<u8> {
    aws_smithy_types::base64::decode(s).unwrap_or_default()
}

fn b64_encode(data: &[u8]) -> String {
    aws_smithy_types::base64::encode(data)
}

/// JSON form (already validated by the protocol parser, which admits only `{"S": ...}` values into
/// requests; see the note on `b64_decode`) to the SDK type.
pub fn to_sdk(v: &Value) -> AttributeValue {
    let Some((ty, inner)) = v.as_object().and_then(|o| o.iter().next()) else { return AttributeValue::Null(true) };
    let strings =
        |x: &Value| x.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect::<Vec<_>>()).unwrap_or_default();
    match ty.as_str() {
        "S" => AttributeValue::S(inner.as_str().unwrap_or_default().to_owned()),
        "N" => AttributeValue::N(inner.as_str().unwrap_or_default().to_owned()),
        "B" => AttributeValue::B(Blob::new(b64_decode(inner.as_str().unwrap_or_default()))),
        "BOOL" => AttributeValue::Bool(inner.as_bool().unwrap_or(false)),
        "NULL" => AttributeValue::Null(inner.as_bool().unwrap_or(true)),
        "SS" => AttributeValue::Ss(strings(inner)),
        "NS" => AttributeValue::Ns(strings(inner)),
        "BS" => AttributeValue::Bs(strings(inner).iter().map(|s| Blob::new(b64_decode(s))).collect()),
        "L" => AttributeValue::L(inner.as_array().map(|a| a.iter().map(to_sdk).collect()).unwrap_or_default()),
        "M" => AttributeValue::M(inner.as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), to_sdk(v))).collect()).unwrap_or_default()),
        _ => AttributeValue::Null(true),
    }
}

/// The SDK type back to JSON form.
pub fn from_sdk(v: &AttributeValue) -> Value {
    match v {
        AttributeValue::S(s) => json!({"S": s}),
        AttributeValue::N(n) => json!({"N": n}),
        AttributeValue::B(b) => json!({"B": b64_encode(b.as_ref())}),
        AttributeValue::Bool(b) => json!({"BOOL": b}),
        AttributeValue::Null(n) => json!({"NULL": n}),
        AttributeValue::Ss(s) => json!({"SS": s}),
        AttributeValue::Ns(n) => json!({"NS": n}),
        AttributeValue::Bs(b) => json!({"BS": b.iter().map(|x| b64_encode(x.as_ref())).collect::<Vec<_>>()}),
        AttributeValue::L(l) => json!({"L": l.iter().map(from_sdk).collect::<Vec<_>>()}),
        AttributeValue::M(m) => json!({"M": m.iter().map(|(k, v)| (k.clone(), from_sdk(v))).collect::<Map<_, _>>()}),
        _ => json!({"NULL": true}),
    }
}

pub fn item_to_sdk(item: &Item) -> HashMap<String, AttributeValue> {
    item.iter().map(|(k, v)| (k.clone(), to_sdk(v))).collect()
}

pub fn item_from_sdk(item: &HashMap<String, AttributeValue>) -> Item {
    item.iter().map(|(k, v)| (k.clone(), from_sdk(v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips() {
        for v in [
            json!({"S": "x"}),
            json!({"N": "12.5"}),
            json!({"B": "aGVsbG8="}),
            json!({"BOOL": true}),
            json!({"NULL": true}),
            json!({"SS": ["a", "b"]}),
            json!({"NS": ["1", "2"]}),
            json!({"BS": ["aGk="]}),
            json!({"L": [{"S": "a"}, {"N": "1"}]}),
            json!({"M": {"k": {"S": "v"}}}),
        ] {
            assert_eq!(from_sdk(&to_sdk(&v)), v);
        }
    }
}
