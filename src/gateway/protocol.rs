//! The DynamoDB JSON 1.0 protocol for the calls Terraform's S3 backend makes (PutItem, GetItem,
//! DeleteItem): parsing requests and writing responses and errors the way DynamoDB does, so that
//! Terraform (which parses `ConditionalCheckFailedException`) cannot tell the gateway from AWS.
//! Pure: no I/O here.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// The largest request body accepted (DynamoDB's own limit is 16 MB per request; a lock call is
/// well under 4 KB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An attribute value in DynamoDB's JSON form (`{"S": "..."}`), kept as JSON after validation.
pub type Item = BTreeMap<String, Value>;

/// A parsed request.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    PutItem {
        table: String,
        item: Item,
        condition: Option<Condition>,
    },
    GetItem {
        table: String,
        key: Item,
        consistent: bool,
        projection: Option<Vec<String>>,
    },
    DeleteItem {
        table: String,
        key: Item,
        condition: Option<Condition>,
    },
    /// Served by the in-memory tables only (the sandbox's mirror reads them this way).
    Scan {
        table: String,
    },
    /// Served by the in-memory tables only.
    DescribeTable {
        table: String,
    },
}

impl Request {
    pub fn table(&self) -> &str {
        match self {
            Self::PutItem { table, .. }
            | Self::GetItem { table, .. }
            | Self::DeleteItem { table, .. }
            | Self::Scan { table }
            | Self::DescribeTable { table } => table,
        }
    }

    pub fn operation(&self) -> &'static str {
        match self {
            Self::PutItem { .. } => "PutItem",
            Self::GetItem { .. } => "GetItem",
            Self::DeleteItem { .. } => "DeleteItem",
            Self::Scan { .. } => "Scan",
            Self::DescribeTable { .. } => "DescribeTable",
        }
    }

    /// The LockID the request is about.
    pub fn lock_id(&self) -> Option<&str> {
        let m = match self {
            Self::PutItem { item, .. } => item,
            Self::GetItem { key, .. } | Self::DeleteItem { key, .. } => key,
            Self::Scan { .. } | Self::DescribeTable { .. } => return None,
        };
        m.get("LockID").and_then(|v| v.get("S")).and_then(Value::as_str)
    }
}

/// The condition expressions the gateway understands.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// `attribute_not_exists(<attr>)`: Terraform's lock.
    NotExists(String),
    /// `<attr> = <value>`: statelock's own exact release (and any client doing the same).
    Equals(String, Value),
}

/// A DynamoDB error: HTTP status, `__type` and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamoErrorBody {
    pub status: u16,
    pub type_: String,
    pub message: String,
}

impl DynamoErrorBody {
    fn new(status: u16, type_: &str, message: impl Into<String>) -> Self {
        Self { status, type_: type_.into(), message: message.into() }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(400, "com.amazon.coral.validate#ValidationException", message)
    }

    pub fn serialization(message: impl Into<String>) -> Self {
        Self::new(400, "com.amazon.coral.service#SerializationException", message)
    }

    pub fn unknown_operation(op: &str) -> Self {
        Self::new(
            400,
            "com.amazon.coral.service#UnknownOperationException",
            format!("The statelock gateway does not support the operation {op}"),
        )
    }

    pub fn conditional_check_failed() -> Self {
        Self::new(400, "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException", "The conditional request failed")
    }

    pub fn resource_not_found(table: &str) -> Self {
        Self::new(
            400,
            "com.amazonaws.dynamodb.v20120810#ResourceNotFoundException",
            format!("Requested resource not found: Table: {table} not found"),
        )
    }

    pub fn access_denied(message: impl Into<String>) -> Self {
        Self::new(400, "com.amazon.coral.service#AccessDeniedException", message)
    }

    pub fn too_large() -> Self {
        Self::new(413, "com.amazon.coral.service#RequestEntityTooLarge", format!("Request body larger than {MAX_BODY_BYTES} bytes"))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "com.amazonaws.dynamodb.v20120810#InternalServerError", message)
    }

    /// The short error code (what `X-Amzn-ErrorType` carries), e.g. `ConditionalCheckFailedException`.
    pub fn code(&self) -> &str {
        self.type_.rsplit('#').next().unwrap_or(&self.type_)
    }

    /// The response body.
    pub fn body(&self) -> Value {
        json!({"__type": self.type_, "message": self.message})
    }
}

/// Parse a request from its `X-Amz-Target` header and body.
pub fn parse(target: &str, body: &[u8]) -> Result<Request, DynamoErrorBody> {
    if body.len() > MAX_BODY_BYTES {
        return Err(DynamoErrorBody::too_large());
    }
    let op = target.strip_prefix("DynamoDB_20120810.").ok_or_else(|| DynamoErrorBody::unknown_operation(target))?;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| DynamoErrorBody::serialization(format!("Start of structure or map found where not expected: {e}")))?;
    let obj = v.as_object().ok_or_else(|| DynamoErrorBody::serialization("the request body must be a JSON object"))?;
    let table = obj.get("TableName").and_then(Value::as_str).filter(|t| !t.is_empty()).ok_or_else(|| {
        DynamoErrorBody::validation(
            "1 validation error detected: Value null at 'tableName' failed to satisfy constraint: Member must not be null",
        )
    })?;
    let names = obj.get("ExpressionAttributeNames").and_then(Value::as_object);
    let values = obj.get("ExpressionAttributeValues").and_then(Value::as_object);
    let condition = match obj.get("ConditionExpression").and_then(Value::as_str) {
        Some(expr) => Some(parse_condition(expr, names, values)?),
        None => None,
    };
    match op {
        "PutItem" => Ok(Request::PutItem { table: table.into(), item: item_of(obj.get("Item"), "item")?, condition }),
        "GetItem" => {
            let projection = obj
                .get("ProjectionExpression")
                .and_then(Value::as_str)
                .map(|p| p.split(',').map(|a| resolve_name(a.trim(), names)).collect::<Vec<_>>());
            Ok(Request::GetItem {
                table: table.into(),
                key: item_of(obj.get("Key"), "key")?,
                consistent: obj.get("ConsistentRead").and_then(Value::as_bool).unwrap_or(false),
                projection,
            })
        }
        "DeleteItem" => Ok(Request::DeleteItem { table: table.into(), key: item_of(obj.get("Key"), "key")?, condition }),
        "Scan" => Ok(Request::Scan { table: table.into() }),
        "DescribeTable" => Ok(Request::DescribeTable { table: table.into() }),
        other => Err(DynamoErrorBody::unknown_operation(other)),
    }
}

fn resolve_name(token: &str, names: Option<&Map<String, Value>>) -> String {
    if token.starts_with('#') {
        names.and_then(|n| n.get(token)).and_then(Value::as_str).unwrap_or(token).to_owned()
    } else {
        token.to_owned()
    }
}

fn parse_condition(
    expr: &str,
    names: Option<&Map<String, Value>>,
    values: Option<&Map<String, Value>>,
) -> Result<Condition, DynamoErrorBody> {
    let e = expr.trim();
    if let Some(inner) = e.strip_prefix("attribute_not_exists(").and_then(|r| r.strip_suffix(')')) {
        return Ok(Condition::NotExists(resolve_name(inner.trim(), names)));
    }
    if let Some((lhs, rhs)) = e.split_once('=') {
        let attr = resolve_name(lhs.trim(), names);
        let placeholder = rhs.trim();
        let value = values.and_then(|v| v.get(placeholder)).cloned().ok_or_else(|| {
            DynamoErrorBody::validation(format!("Invalid ConditionExpression: An expression attribute value used in expression is not defined; attribute value: {placeholder}"))
        })?;
        check_value(&value, "ConditionExpression")?;
        return Ok(Condition::Equals(attr, value));
    }
    Err(DynamoErrorBody::validation(format!(
        "The statelock gateway supports only attribute_not_exists(a) and a = :v conditions, not: {expr}"
    )))
}

/// Validate an attribute value's JSON form: exactly one type key of a DynamoDB type.
fn check_value(v: &Value, field: &str) -> Result<(), DynamoErrorBody> {
    let o = v
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or_else(|| DynamoErrorBody::validation(format!("Supplied AttributeValue in {field} has multiple datatypes or none")))?;
    let (ty, inner) = o.iter().next().expect("one entry");
    let ok = match ty.as_str() {
        "S" | "N" | "B" => inner.is_string(),
        "BOOL" | "NULL" => inner.is_boolean(),
        "SS" | "NS" | "BS" => inner.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string)),
        "L" => inner.as_array().is_some_and(|a| a.iter().all(|x| check_value(x, field).is_ok())),
        "M" => inner.as_object().is_some_and(|m| m.values().all(|x| check_value(x, field).is_ok())),
        _ => false,
    };
    if ok { Ok(()) } else { Err(DynamoErrorBody::serialization(format!("Unexpected attribute value type {ty:?} in {field}"))) }
}

fn item_of(v: Option<&Value>, field: &str) -> Result<Item, DynamoErrorBody> {
    let m = v.and_then(Value::as_object).ok_or_else(|| {
        DynamoErrorBody::validation(format!(
            "1 validation error detected: Value null at '{field}' failed to satisfy constraint: Member must not be null"
        ))
    })?;
    let mut out = Item::new();
    for (k, v) in m {
        check_value(v, field)?;
        out.insert(k.clone(), v.clone());
    }
    match out.get("LockID") {
        Some(Value::Object(o)) if o.get("S").and_then(Value::as_str).is_some_and(|s| !s.is_empty()) => Ok(out),
        _ => Err(DynamoErrorBody::validation("One of the required keys was not given a value: LockID (a non-empty string)")),
    }
}

/// The JSON body of a successful response.
pub fn success_body(item: Option<&Item>, projection: Option<&[String]>) -> Value {
    match item {
        None => json!({}),
        Some(i) => {
            let m: Map<String, Value> = i
                .iter()
                .filter(|(k, _)| projection.is_none_or(|p| p.iter().any(|x| x == *k)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            json!({"Item": m})
        }
    }
}

/// The Info a lock PutItem carries (the lock record Terraform is writing), when it has one.
pub fn info_of(item: &Item) -> Option<&str> {
    item.get("Info").and_then(|v| v.get("S")).and_then(Value::as_str)
}

/// A Scan's answer: every item in one page.
pub fn scan_body(items: &[Item]) -> Value {
    json!({"Items": items, "Count": items.len(), "ScannedCount": items.len()})
}

/// A DescribeTable answer for a lock table (key `LockID`, no stream).
pub fn describe_body(table: &str, items: usize) -> Value {
    json!({"Table": {
        "TableName": table,
        "TableStatus": "ACTIVE",
        "KeySchema": [{"AttributeName": "LockID", "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": "LockID", "AttributeType": "S"}],
        "ItemCount": items,
        "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"},
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies captured from Terraform 1.11.4 (terraform-locking.md §2, §3).
    const LOCK_PUT: &str = r#"{"ConditionExpression":"attribute_not_exists(LockID)","Item":{"LockID":{"S":"tfstate/demo/terraform.tfstate"},"Info":{"S":"{\"ID\":\"c240b743-f498-e9aa-802f-72066a836876\",\"Operation\":\"OperationTypeApply\",\"Info\":\"\",\"Who\":\"root@vm\",\"Version\":\"1.11.4\",\"Created\":\"2026-11-26T12:59:48.653763223Z\",\"Path\":\"tfstate/demo/terraform.tfstate\"}"}},"TableName":"tf-locks"}"#;
    const DIGEST_GET: &str = r#"{"ConsistentRead":true,"Key":{"LockID":{"S":"tfstate/demo/terraform.tfstate-md5"}},"ProjectionExpression":"LockID, Digest","TableName":"tf-locks"}"#;
    const UNLOCK: &str = r#"{"Key":{"LockID":{"S":"tfstate/demo/terraform.tfstate"}},"TableName":"tf-locks"}"#;

    #[test]
    fn terraforms_calls_parse() {
        let put = parse("DynamoDB_20120810.PutItem", LOCK_PUT.as_bytes()).expect("lock");
        assert_eq!(put.lock_id(), Some("tfstate/demo/terraform.tfstate"));
        let Request::PutItem { condition, item, .. } = &put else { panic!("put") };
        assert_eq!(condition, &Some(Condition::NotExists("LockID".into())));
        assert!(info_of(item).is_some_and(|i| i.contains("OperationTypeApply")));
        let get = parse("DynamoDB_20120810.GetItem", DIGEST_GET.as_bytes()).expect("get");
        assert_eq!(
            get,
            Request::GetItem {
                table: "tf-locks".into(),
                key: [("LockID".to_owned(), json!({"S": "tfstate/demo/terraform.tfstate-md5"}))].into(),
                consistent: true,
                projection: Some(vec!["LockID".into(), "Digest".into()])
            }
        );
        let del = parse("DynamoDB_20120810.DeleteItem", UNLOCK.as_bytes()).expect("delete");
        assert!(matches!(del, Request::DeleteItem { condition: None, .. }));
    }

    #[test]
    fn malformed_requests_get_dynamodb_errors_not_panics() {
        for (target, body, code) in [
            ("DynamoDB_20120810.Query", "{\"TableName\":\"t\"}", "UnknownOperationException"),
            ("Bogus", "{}", "UnknownOperationException"),
            ("DynamoDB_20120810.PutItem", "{not json", "SerializationException"),
            ("DynamoDB_20120810.PutItem", "[]", "SerializationException"),
            ("DynamoDB_20120810.PutItem", "{\"Item\":{\"LockID\":{\"S\":\"x\"}}}", "ValidationException"),
            ("DynamoDB_20120810.PutItem", "{\"TableName\":\"t\",\"Item\":{\"LockID\":{\"Q\":\"x\"}}}", "SerializationException"),
            ("DynamoDB_20120810.PutItem", "{\"TableName\":\"t\",\"Item\":{\"Info\":{\"S\":\"x\"}}}", "ValidationException"),
            ("DynamoDB_20120810.PutItem", "{\"TableName\":\"t\",\"Item\":{\"LockID\":{\"S\":\"x\",\"N\":\"1\"}}}", "ValidationException"),
            (
                "DynamoDB_20120810.DeleteItem",
                "{\"TableName\":\"t\",\"Key\":{\"LockID\":{\"S\":\"x\"}},\"ConditionExpression\":\"Info = :i\"}",
                "ValidationException",
            ),
            (
                "DynamoDB_20120810.DeleteItem",
                "{\"TableName\":\"t\",\"Key\":{\"LockID\":{\"S\":\"x\"}},\"ConditionExpression\":\"size(Info) > :n\"}",
                "ValidationException",
            ),
        ] {
            let e = parse(target, body.as_bytes()).expect_err(body);
            assert_eq!(e.code(), code, "{target} {body}: {e:?}");
            assert_eq!(e.status, 400);
        }
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(parse("DynamoDB_20120810.PutItem", &huge).expect_err("too large").status, 413);
    }

    #[test]
    fn the_conditional_check_error_is_byte_for_byte_dynamodbs() {
        let e = DynamoErrorBody::conditional_check_failed();
        assert_eq!(e.code(), "ConditionalCheckFailedException");
        assert_eq!(
            e.body().to_string(),
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException","message":"The conditional request failed"}"#
        );
    }

    #[test]
    fn named_conditions_and_projections_resolve() {
        let body = r##"{"TableName":"t","Key":{"LockID":{"S":"x"}},"ConditionExpression":"#i = :i","ExpressionAttributeNames":{"#i":"Info"},"ExpressionAttributeValues":{":i":{"S":"v"}}}"##;
        let Request::DeleteItem { condition, .. } = parse("DynamoDB_20120810.DeleteItem", body.as_bytes()).expect("parse") else {
            panic!("delete")
        };
        assert_eq!(condition, Some(Condition::Equals("Info".into(), json!({"S": "v"}))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), op in "PutItem|GetItem|DeleteItem|Query") {
            let _ = parse(&format!("DynamoDB_20120810.{op}"), &body);
        }
    }

    #[test]
    fn scan_and_describe_table_parse_and_answer_like_dynamodb() {
        assert_eq!(parse("DynamoDB_20120810.Scan", br#"{"TableName":"t"}"#), Ok(Request::Scan { table: "t".into() }));
        assert_eq!(parse("DynamoDB_20120810.DescribeTable", br#"{"TableName":"t"}"#), Ok(Request::DescribeTable { table: "t".into() }));
        assert_eq!(Request::Scan { table: "t".into() }.lock_id(), None);
        let item: Item = [("LockID".to_owned(), json!({"S": "b/k"}))].into();
        assert_eq!(scan_body(std::slice::from_ref(&item)), json!({"Items": [{"LockID": {"S": "b/k"}}], "Count": 1, "ScannedCount": 1}));
        let d = describe_body("t", 3);
        assert_eq!(d["Table"]["KeySchema"][0]["AttributeName"], "LockID");
        assert!(d["Table"].get("StreamSpecification").is_none(), "no stream: the mirror scans");
    }
}
