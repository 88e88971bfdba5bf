//! The DynamoDB JSON 1.0 protocol for the calls Terraform's S3 backend makes (PutItem, GetItem,
//! DeleteItem): parsing requests and writing responses and errors the way DynamoDB does, so that
//! Terraform (which parses `ConditionalCheckFailedException`) cannot tell the gateway from AWS.
//! Pure: no I/O here.
//!
//! # What the parser accepts
//!
//! [`parse`] is a closed allow-list of the request shapes Terraform and OpenTofu send (captured
//! from Terraform 1.0.3, 1.11.4 and 1.15.5), plus statelock's own exact release and the mirror's
//! reads of in-memory tables. Key order is not significant (aws-sdk-go-v2 randomises it):
//!
//! - lock PutItem: `Item` = exactly {`LockID`, `Info`}, `ConditionExpression` =
//!   `attribute_not_exists(LockID)` (surrounding whitespace allowed), no placeholders;
//! - digest PutItem: `Item` = exactly {`LockID` ending in `-md5`, `Digest`}, unconditional;
//! - GetItem: `Key` = {`LockID`}, optional boolean `ConsistentRead`, optional
//!   `ProjectionExpression` listing `LockID`, `Info`, `Digest` (directly or through `#name`
//!   placeholders that `ExpressionAttributeNames` maps to them);
//! - DeleteItem: `Key` = {`LockID`}, unconditional (Terraform's unlock), or statelock's exact
//!   release `#info = :info` with `#info` mapped to `Info` and `:info` a string (the attribute may
//!   also be written `Info` directly, without a names map);
//! - Scan (optionally with a boolean `ConsistentRead`) and DescribeTable with only `TableName`.
//!
//! Every attribute value must be `{"S": "<string>"}` and `LockID` must not be empty.
//! Anything else (compound or other conditions, `Expected`, `ReturnValues`, `UpdateExpression`,
//! other attribute types, extra attributes, unused placeholders, ...) is refused with a
//! `ValidationException` saying what was refused and why. The gateway forwards what it parsed,
//! never the caller's bytes, so what it cannot represent exactly it must refuse, not approximate.

use std::{collections::BTreeMap, fmt::Display};

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
    /// `attribute_not_exists(<attr>)`: Terraform's lock. [`parse`] produces it only as
    /// `NotExists("LockID")`.
    NotExists(String),
    /// `<attr> = <value>`: statelock's own exact release. [`parse`] produces it only as
    /// `Equals("Info", {"S": <info>})`.
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

/// Said at the end of every refusal: why the gateway is narrower than DynamoDB.
const SCOPE: &str = "the statelock gateway accepts only the DynamoDB requests Terraform's and OpenTofu's S3 backend send \
                     (and statelock's own exact release), and refuses everything else rather than approximate it";

/// The one condition a lock PutItem may carry.
const LOCK_CONDITION: &str = "attribute_not_exists(LockID)";

/// The attributes a GetItem may project.
const PROJECTABLE: [&str; 3] = ["LockID", "Info", "Digest"];

/// The suffix of Terraform's digest items' LockIDs.
const DIGEST_SUFFIX: &str = "-md5";

/// A `ValidationException` for a request outside the accepted shapes.
fn refuse(what: impl Display) -> DynamoErrorBody {
    DynamoErrorBody::validation(format!("{what}; {SCOPE}"))
}

/// A caller's string, quoted and cut short, for an error message.
fn quote(s: &str) -> String {
    const MAX: usize = 120;
    let mut q: String = s.chars().take(MAX).collect();
    if s.chars().nth(MAX).is_some() {
        q.push('…');
    }
    format!("{q:?}")
}

/// A few quoted names, for an error message.
fn list(names: &[&str]) -> String {
    const MAX: usize = 8;
    let mut shown: Vec<String> = names.iter().take(MAX).map(|n| quote(n)).collect();
    if names.len() > MAX {
        shown.push("…".into());
    }
    format!("[{}]", shown.join(", "))
}

/// What kind of JSON value `v` is, for an error message.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `s` without surrounding ASCII whitespace (what DynamoDB's expression grammar skips).
fn trim_ws(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_whitespace())
}

/// The part after `#` or `:` of an expression placeholder: letters, digits and `_`.
fn is_word(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The operations the gateway serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    PutItem,
    GetItem,
    DeleteItem,
    Scan,
    DescribeTable,
}

impl Op {
    fn of(name: &str) -> Option<Self> {
        match name {
            "PutItem" => Some(Self::PutItem),
            "GetItem" => Some(Self::GetItem),
            "DeleteItem" => Some(Self::DeleteItem),
            "Scan" => Some(Self::Scan),
            "DescribeTable" => Some(Self::DescribeTable),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::PutItem => "PutItem",
            Self::GetItem => "GetItem",
            Self::DeleteItem => "DeleteItem",
            Self::Scan => "Scan",
            Self::DescribeTable => "DescribeTable",
        }
    }

    /// The top-level parameters the operation may carry (which combinations are allowed is
    /// checked per operation).
    fn parameters(self) -> &'static [&'static str] {
        match self {
            Self::PutItem => &["TableName", "Item", "ConditionExpression"],
            Self::GetItem => &["TableName", "Key", "ConsistentRead", "ProjectionExpression", "ExpressionAttributeNames"],
            Self::DeleteItem => &["TableName", "Key", "ConditionExpression", "ExpressionAttributeNames", "ExpressionAttributeValues"],
            Self::Scan => &["TableName", "ConsistentRead"],
            Self::DescribeTable => &["TableName"],
        }
    }
}

fn unknown_parameter(op: Op, key: &str) -> DynamoErrorBody {
    let why = match (op, key) {
        (Op::PutItem, "ExpressionAttributeNames" | "ExpressionAttributeValues") => {
            "the only PutItem condition accepted is the literal attribute_not_exists(LockID), which uses no placeholders"
        }
        (Op::GetItem, "ConditionExpression" | "ExpressionAttributeValues") => "Terraform's GetItem is unconditional",
        (Op::Scan | Op::DescribeTable, _) => "statelock reads in-memory tables with a plain, single-page Scan and DescribeTable",
        _ => "Terraform's and OpenTofu's S3 backend never send it",
    };
    refuse(format!("{} does not accept the parameter {} ({why})", op.name(), quote(key)))
}

/// Parse a request from its `X-Amz-Target` header and body. Never panics: whatever is not one of
/// the accepted shapes (see the module documentation) is an error.
pub fn parse(target: &str, body: &[u8]) -> Result<Request, DynamoErrorBody> {
    if body.len() > MAX_BODY_BYTES {
        return Err(DynamoErrorBody::too_large());
    }
    let name = target.strip_prefix("DynamoDB_20120810.").ok_or_else(|| DynamoErrorBody::unknown_operation(target))?;
    let op = Op::of(name).ok_or_else(|| DynamoErrorBody::unknown_operation(name))?;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| DynamoErrorBody::serialization(format!("Start of structure or map found where not expected: {e}")))?;
    let Value::Object(obj) = v else { return Err(DynamoErrorBody::serialization("the request body must be a JSON object")) };
    if let Some(key) = obj.keys().find(|k| !op.parameters().contains(&k.as_str())) {
        return Err(unknown_parameter(op, key));
    }
    let table = table_name(&obj)?;
    match op {
        Op::PutItem => put_item(table, &obj),
        Op::GetItem => get_item(table, &obj),
        Op::DeleteItem => delete_item(table, &obj),
        Op::Scan => {
            consistent_read(&obj)?;
            Ok(Request::Scan { table })
        }
        Op::DescribeTable => Ok(Request::DescribeTable { table }),
    }
}

fn table_name(obj: &Map<String, Value>) -> Result<String, DynamoErrorBody> {
    match obj.get("TableName") {
        None | Some(Value::Null) => {
            Err(refuse("1 validation error detected: Value null at 'tableName' failed to satisfy constraint: Member must not be null"))
        }
        Some(Value::String(t)) if !t.is_empty() => Ok(t.clone()),
        Some(Value::String(_)) => Err(refuse(
            "1 validation error detected: Value '' at 'tableName' failed to satisfy constraint: Member must have length greater than or equal to 1",
        )),
        Some(other) => Err(refuse(format!("TableName must be a string, not {}", kind(other)))),
    }
}

fn consistent_read(obj: &Map<String, Value>) -> Result<bool, DynamoErrorBody> {
    match obj.get("ConsistentRead") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(refuse(format!("ConsistentRead must be a boolean, not {}", kind(other)))),
    }
}

/// `ExpressionAttributeNames` or `ExpressionAttributeValues`, when present: a non-empty map.
fn expression_map<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a Map<String, Value>>, DynamoErrorBody> {
    match obj.get(field) {
        None => Ok(None),
        Some(Value::Object(m)) if m.is_empty() => Err(refuse(format!("{field} must not be empty"))),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(refuse(format!("{field} must be a map, not {}", kind(other)))),
    }
}

/// Refuse placeholders that were supplied but not used (as DynamoDB does).
fn no_unused(map: Option<&Map<String, Value>>, used: &[&str], field: &str) -> Result<(), DynamoErrorBody> {
    let unused: Vec<&str> = map.into_iter().flat_map(|m| m.keys()).map(String::as_str).filter(|k| !used.contains(k)).collect();
    if unused.is_empty() {
        Ok(())
    } else {
        Err(refuse(format!("Value provided in {field} unused in expressions: keys: {}", list(&unused))))
    }
}

/// The string of an attribute value, which must be exactly `{"S": "<string>"}`.
///
/// This is the gatekeeper for `super::convert`: no other type gets through, so e.g. a B value
/// with invalid base64 can never be turned into empty bytes on its way to DynamoDB.
fn string_value<'a>(v: &'a Value, what: &str) -> Result<&'a str, DynamoErrorBody> {
    let Value::Object(o) = v else {
        return Err(refuse(format!("{what} is not an attribute value (expected {{\"S\": \"...\"}}, got {})", kind(v))));
    };
    let mut types = o.iter();
    match (types.next(), types.next()) {
        (Some((ty, Value::String(s))), None) if ty.as_str() == "S" => Ok(s.as_str()),
        (Some((ty, other)), None) if ty.as_str() == "S" => {
            Err(refuse(format!("{what} has the type S but its value is {}, not a string", kind(other))))
        }
        (Some((ty, _)), None) => Err(refuse(format!(
            "{what} has the type {}: only strings (S) are accepted, the only type Terraform's lock and digest items use",
            quote(ty)
        ))),
        (None, _) => Err(refuse(format!("Supplied AttributeValue is empty, must contain exactly one of the supported datatypes ({what})"))),
        (Some(_), Some(_)) => Err(refuse(format!(
            "Supplied AttributeValue has more than one datatypes set, must contain exactly one of the supported datatypes ({what})"
        ))),
    }
}

/// An `Item` or `Key`: every value a string, and a non-empty `LockID` among them.
fn attributes(v: Option<&Value>, field: &str, member: &str) -> Result<BTreeMap<String, String>, DynamoErrorBody> {
    let m = match v {
        None | Some(Value::Null) => {
            return Err(refuse(format!(
                "1 validation error detected: Value null at '{member}' failed to satisfy constraint: Member must not be null"
            )));
        }
        Some(Value::Object(m)) => m,
        Some(other) => return Err(refuse(format!("{field} must be a map of attribute names to values, not {}", kind(other)))),
    };
    let mut out = BTreeMap::new();
    for (name, value) in m {
        let s = string_value(value, &format!("{field} attribute {}", quote(name)))?;
        out.insert(name.clone(), s.to_owned());
    }
    match out.get("LockID") {
        Some(id) if !id.is_empty() => Ok(out),
        Some(_) => Err(refuse(
            "One or more parameter values are not valid. The AttributeValue for a key attribute cannot contain an empty string value. Key: LockID",
        )),
        None => Err(refuse(format!("One of the required keys was not given a value: {field} has no LockID"))),
    }
}

/// Validated attributes in the JSON form the rest of the gateway uses.
fn item_of(attrs: BTreeMap<String, String>) -> Item {
    attrs.into_iter().map(|(k, s)| (k, json!({"S": s}))).collect()
}

/// A GetItem's or DeleteItem's `Key`: exactly `LockID`.
fn key_of(obj: &Map<String, Value>) -> Result<Item, DynamoErrorBody> {
    let attrs = attributes(obj.get("Key"), "Key", "key")?;
    if attrs.len() != 1 {
        let names: Vec<&str> = attrs.keys().map(String::as_str).collect();
        return Err(refuse(format!(
            "The provided key element does not match the schema: a lock table's key is LockID alone, not {}",
            list(&names)
        )));
    }
    Ok(item_of(attrs))
}

fn put_item(table: String, obj: &Map<String, Value>) -> Result<Request, DynamoErrorBody> {
    let attrs = attributes(obj.get("Item"), "Item", "item")?;
    let condition = match obj.get("ConditionExpression") {
        None => None,
        Some(Value::String(e)) if trim_ws(e) == LOCK_CONDITION => Some(Condition::NotExists("LockID".into())),
        Some(Value::String(e)) => {
            return Err(refuse(format!(
                "Unsupported ConditionExpression {} on PutItem: the only condition accepted there is {LOCK_CONDITION} exactly, \
                 as Terraform sends it to take a lock",
                quote(e)
            )));
        }
        Some(other) => return Err(refuse(format!("ConditionExpression must be a string, not {}", kind(other)))),
    };
    let names: Vec<&str> = attrs.keys().map(String::as_str).collect();
    match (&condition, names.as_slice()) {
        (Some(_), ["Info", "LockID"]) => {}
        (Some(_), _) => {
            return Err(refuse(format!(
                "A lock PutItem (with {LOCK_CONDITION}) must carry exactly the attributes LockID and Info, not {}",
                list(&names)
            )));
        }
        (None, ["Digest", "LockID"]) => {
            let id = attrs.get("LockID").map(String::as_str).unwrap_or_default();
            if id.strip_suffix(DIGEST_SUFFIX).is_none_or(str::is_empty) {
                return Err(refuse(format!(
                    "An unconditional PutItem is accepted only for Terraform's digest item, whose LockID ends in {DIGEST_SUFFIX}, not for {}",
                    quote(id)
                )));
            }
        }
        (None, ["Info", "LockID"]) => {
            return Err(refuse(format!(
                "A PutItem of a lock item (LockID and Info) must carry the ConditionExpression {LOCK_CONDITION}: \
                 an unconditional one would overwrite another holder's lock"
            )));
        }
        (None, _) => {
            return Err(refuse(format!(
                "An unconditional PutItem is accepted only for Terraform's digest item (exactly LockID and Digest), not for the attributes {}",
                list(&names)
            )));
        }
    }
    Ok(Request::PutItem { table, item: item_of(attrs), condition })
}

fn get_item(table: String, obj: &Map<String, Value>) -> Result<Request, DynamoErrorBody> {
    let key = key_of(obj)?;
    let consistent = consistent_read(obj)?;
    let names = expression_map(obj, "ExpressionAttributeNames")?;
    let projection = match obj.get("ProjectionExpression") {
        None if names.is_some() => {
            return Err(refuse(
                "ExpressionAttributeNames can only be specified when using expressions, and this GetItem has no ProjectionExpression",
            ));
        }
        None => None,
        Some(Value::String(p)) => Some(projection(p, names)?),
        Some(other) => return Err(refuse(format!("ProjectionExpression must be a string, not {}", kind(other)))),
    };
    Ok(Request::GetItem { table, key, consistent, projection })
}

/// What a `#name` placeholder stands for.
fn resolve_name<'n>(token: &str, names: Option<&'n Map<String, Value>>, expression: &str) -> Result<&'n str, DynamoErrorBody> {
    if !token.strip_prefix('#').is_some_and(is_word) {
        return Err(refuse(format!("Invalid {expression}: {} is not an expression attribute name placeholder", quote(token))));
    }
    match names.and_then(|n| n.get(token)) {
        Some(Value::String(name)) => Ok(name.as_str()),
        Some(other) => Err(refuse(format!("ExpressionAttributeNames maps {} to {}, not to a string", quote(token), kind(other)))),
        None => Err(refuse(format!(
            "Invalid {expression}: An expression attribute name used in the document path is not defined; attribute name: {}",
            quote(token)
        ))),
    }
}

/// A ProjectionExpression: a comma-separated list of distinct attributes among LockID, Info and
/// Digest, each written plainly or as a `#name` placeholder.
fn projection(expr: &str, names: Option<&Map<String, Value>>) -> Result<Vec<String>, DynamoErrorBody> {
    let mut out: Vec<String> = Vec::new();
    let mut used: Vec<&str> = Vec::new();
    for raw in expr.split(',') {
        let token = trim_ws(raw);
        let attr = if token.starts_with('#') {
            used.push(token);
            resolve_name(token, names, "ProjectionExpression")?
        } else {
            token
        };
        if !PROJECTABLE.contains(&attr) {
            return Err(refuse(format!(
                "Unsupported ProjectionExpression {}: it may list only the attributes LockID, Info and Digest \
                 (as Terraform's \"LockID, Info\" and \"LockID, Digest\" do), not {}",
                quote(expr),
                quote(attr)
            )));
        }
        if out.iter().any(|a| a == attr) {
            return Err(refuse(format!("Invalid ProjectionExpression {}: {} is listed twice", quote(expr), quote(attr))));
        }
        out.push(attr.to_owned());
    }
    no_unused(names, &used, "ExpressionAttributeNames")?;
    Ok(out)
}

fn delete_item(table: String, obj: &Map<String, Value>) -> Result<Request, DynamoErrorBody> {
    let key = key_of(obj)?;
    let names = expression_map(obj, "ExpressionAttributeNames")?;
    let values = expression_map(obj, "ExpressionAttributeValues")?;
    let condition = match obj.get("ConditionExpression") {
        None if names.is_some() || values.is_some() => {
            return Err(refuse(
                "ExpressionAttributeNames and ExpressionAttributeValues can only be specified when using expressions, \
                 and this DeleteItem has no ConditionExpression",
            ));
        }
        None => None,
        Some(Value::String(e)) => Some(release_condition(e, names, values)?),
        Some(other) => return Err(refuse(format!("ConditionExpression must be a string, not {}", kind(other)))),
    };
    Ok(Request::DeleteItem { table, key, condition })
}

/// statelock's exact release (`#info = :info`, see `dynamo::release::delete_if_info`): the only
/// condition a DeleteItem may carry.
fn release_condition(
    expr: &str,
    names: Option<&Map<String, Value>>,
    values: Option<&Map<String, Value>>,
) -> Result<Condition, DynamoErrorBody> {
    let unsupported = || {
        refuse(format!(
            "Unsupported ConditionExpression {} on DeleteItem: Terraform's DeleteItem is unconditional, and the only condition \
             accepted is statelock's exact release, #name = :value with #name mapped to Info and :value a string",
            quote(expr)
        ))
    };
    let (lhs, rhs) = trim_ws(expr).split_once('=').ok_or_else(unsupported)?;
    let (lhs, rhs) = (trim_ws(lhs), trim_ws(rhs));
    let placeholder = lhs.strip_prefix('#').is_some_and(is_word);
    if !(placeholder || lhs == "Info") || !rhs.strip_prefix(':').is_some_and(is_word) {
        return Err(unsupported());
    }
    let attr = if placeholder { resolve_name(lhs, names, "ConditionExpression")? } else { lhs };
    if attr != "Info" {
        return Err(refuse(format!("Unsupported ConditionExpression on DeleteItem: the exact release compares Info, not {}", quote(attr))));
    }
    let info = match values.and_then(|v| v.get(rhs)) {
        Some(v) => string_value(v, &format!("ExpressionAttributeValues {}", quote(rhs)))?,
        None => {
            return Err(refuse(format!(
                "Invalid ConditionExpression: An expression attribute value used in expression is not defined; attribute value: {}",
                quote(rhs)
            )));
        }
    };
    let lhs_used = [lhs];
    let used_names: &[&str] = if placeholder { &lhs_used } else { &[] };
    no_unused(names, used_names, "ExpressionAttributeNames")?;
    no_unused(values, &[rhs], "ExpressionAttributeValues")?;
    Ok(Condition::Equals("Info".into(), json!({"S": info})))
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

    const PUT: &str = "DynamoDB_20120810.PutItem";
    const GET: &str = "DynamoDB_20120810.GetItem";
    const DEL: &str = "DynamoDB_20120810.DeleteItem";
    const SCAN: &str = "DynamoDB_20120810.Scan";
    const DESCRIBE: &str = "DynamoDB_20120810.DescribeTable";

    // Bodies captured from Terraform 1.0.3 (sorted keys), 1.11.4 and 1.15.5 (../shared/reference/terraform-locking.md §2, §3).
    const LOCK_PUT_103: &str = r#"{"ConditionExpression":"attribute_not_exists(LockID)","Item":{"Info":{"S":"{\"ID\":\"1edde332-0dcf-0332-cbb0-ed1b3daf868d\",\"Operation\":\"OperationTypeApply\",\"Info\":\"\",\"Who\":\"root@vm\",\"Version\":\"1.0.3\",\"Created\":\"2026-11-26T13:00:23.486227413Z\",\"Path\":\"tfstate/v103/terraform.tfstate\"}"},"LockID":{"S":"tfstate/v103/terraform.tfstate"}},"TableName":"tf-locks"}"#;
    const LOCK_PUT: &str = r#"{"ConditionExpression":"attribute_not_exists(LockID)","Item":{"LockID":{"S":"tfstate/demo/terraform.tfstate"},"Info":{"S":"{\"ID\":\"c240b743-f498-e9aa-802f-72066a836876\",\"Operation\":\"OperationTypeApply\",\"Info\":\"\",\"Who\":\"root@vm\",\"Version\":\"1.11.4\",\"Created\":\"2026-11-26T12:59:48.653763223Z\",\"Path\":\"tfstate/demo/terraform.tfstate\"}"}},"TableName":"tf-locks"}"#;
    const LOCK_PUT_115: &str = r#"{"ConditionExpression":"attribute_not_exists(LockID)","Item":{"LockID":{"S":"tfstate/v115/terraform.tfstate"},"Info":{"S":"{\"ID\":\"d74de581-5c53-4a14-60fd-af3ebd51f1f3\",\"Operation\":\"OperationTypeApply\",\"Info\":\"\",\"Who\":\"root@vm\",\"Version\":\"1.15.5\",\"Created\":\"2026-11-26T13:00:16.138619884Z\",\"Path\":\"tfstate/v115/terraform.tfstate\"}"}},"TableName":"tf-locks"}"#;
    const DIGEST_PUT_103: &str = r#"{"Item":{"Digest":{"S":"6d1a9a668bc70d77fddedffc18d5bcca"},"LockID":{"S":"tfstate/v103/terraform.tfstate-md5"}},"TableName":"tf-locks"}"#;
    const DIGEST_PUT_111: &str = r#"{"Item":{"Digest":{"S":"68018aa8c310c3abe7ba9ee609fcf862"},"LockID":{"S":"tfstate/demo/terraform.tfstate-md5"}},"TableName":"tf-locks"}"#;
    const DIGEST_PUT_115: &str = r#"{"Item":{"LockID":{"S":"tfstate/v115/terraform.tfstate-md5"},"Digest":{"S":"9756b325620579e6dc09b5f0aa174e41"}},"TableName":"tf-locks"}"#;
    const DIGEST_GET: &str = r#"{"ConsistentRead":true,"Key":{"LockID":{"S":"tfstate/demo/terraform.tfstate-md5"}},"ProjectionExpression":"LockID, Digest","TableName":"tf-locks"}"#;
    const INFO_GET: &str = r#"{"ConsistentRead":true,"Key":{"LockID":{"S":"tfstate/demo/terraform.tfstate"}},"ProjectionExpression":"LockID, Info","TableName":"tf-locks"}"#;
    const UNLOCK: &str = r#"{"Key":{"LockID":{"S":"tfstate/demo/terraform.tfstate"}},"TableName":"tf-locks"}"#;
    // statelock's own exact release (src/dynamo/release.rs `delete_if_info`), as aws-sdk-rust writes it.
    const RELEASE: &str = r##"{"ConditionExpression":"#info = :info","ExpressionAttributeNames":{"#info":"Info"},"ExpressionAttributeValues":{":info":{"S":"{\"ID\":\"c240b743-f498-e9aa-802f-72066a836876\"}"}},"Key":{"LockID":{"S":"tfstate/demo/terraform.tfstate"}},"TableName":"tf-locks"}"##;

    const VALIDATION: &str = "ValidationException";
    const SERIALIZATION: &str = "SerializationException";
    const UNKNOWN: &str = "UnknownOperationException";

    fn s(v: &str) -> Value {
        json!({"S": v})
    }

    fn item(pairs: &[(&str, &str)]) -> Item {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), s(v))).collect()
    }

    fn attr_names(m: &Item) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    fn all_strings(m: &Item) -> bool {
        m.values().all(|v| v.as_object().is_some_and(|o| o.len() == 1 && o.get("S").is_some_and(Value::is_string)))
    }

    fn as_json(m: &Item) -> Value {
        Value::Object(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn only(body: &Map<String, Value>, keys: &[&str]) -> bool {
        body.keys().all(|k| keys.contains(&k.as_str()))
    }

    /// Whatever `parse` accepts is one of the shapes Terraform, OpenTofu or statelock send, and
    /// says exactly what the body says.
    fn assert_allowed(op: &str, body: &Map<String, Value>, req: &Request) {
        assert_eq!(req.operation(), op, "{body:?}");
        assert_eq!(body.get("TableName"), Some(&json!(req.table())), "{body:?}");
        assert!(!req.table().is_empty());
        assert!(matches!(req, Request::Scan { .. } | Request::DescribeTable { .. }) || req.lock_id().is_some_and(|id| !id.is_empty()));
        let consistent_ok = body.get("ConsistentRead").is_none_or(Value::is_boolean);
        match req {
            Request::PutItem { item, condition, .. } => {
                assert!(only(body, &["TableName", "Item", "ConditionExpression"]), "{body:?}");
                assert!(all_strings(item), "{body:?}");
                assert_eq!(body.get("Item"), Some(&as_json(item)));
                match condition {
                    Some(c) => {
                        assert_eq!(c, &Condition::NotExists("LockID".into()));
                        assert_eq!(attr_names(item), ["Info", "LockID"], "{body:?}");
                        assert_eq!(
                            body.get("ConditionExpression").and_then(Value::as_str).map(str::trim),
                            Some("attribute_not_exists(LockID)")
                        );
                    }
                    None => {
                        assert_eq!(attr_names(item), ["Digest", "LockID"], "{body:?}");
                        assert!(body.get("ConditionExpression").is_none());
                        assert!(req.lock_id().is_some_and(|id| id.len() > DIGEST_SUFFIX.len() && id.ends_with(DIGEST_SUFFIX)));
                    }
                }
            }
            Request::GetItem { key, consistent, projection, .. } => {
                assert!(
                    only(body, &["TableName", "Key", "ConsistentRead", "ProjectionExpression", "ExpressionAttributeNames"]),
                    "{body:?}"
                );
                assert!(all_strings(key) && attr_names(key) == ["LockID"], "{body:?}");
                assert_eq!(body.get("Key"), Some(&as_json(key)));
                assert!(consistent_ok, "{body:?}");
                assert_eq!(*consistent, body.get("ConsistentRead") == Some(&Value::Bool(true)));
                match projection {
                    Some(p) => assert!(!p.is_empty() && p.iter().all(|a| PROJECTABLE.contains(&a.as_str())), "{body:?}"),
                    None => {
                        assert!(body.get("ProjectionExpression").is_none() && body.get("ExpressionAttributeNames").is_none(), "{body:?}")
                    }
                }
            }
            Request::DeleteItem { key, condition, .. } => {
                assert!(all_strings(key) && attr_names(key) == ["LockID"], "{body:?}");
                assert_eq!(body.get("Key"), Some(&as_json(key)));
                match condition {
                    None => assert!(only(body, &["TableName", "Key"]), "{body:?}"),
                    Some(c) => {
                        let allowed = ["TableName", "Key", "ConditionExpression", "ExpressionAttributeNames", "ExpressionAttributeValues"];
                        assert!(only(body, &allowed), "{body:?}");
                        let values = body.get("ExpressionAttributeValues").and_then(Value::as_object).expect("a release carries its value");
                        assert_eq!(values.len(), 1, "{body:?}");
                        let v = values.values().next().expect("one value");
                        assert!(v.as_object().is_some_and(|o| o.len() == 1) && v.get("S").is_some_and(Value::is_string), "{body:?}");
                        assert_eq!(c, &Condition::Equals("Info".into(), v.clone()));
                        if let Some(names) = body.get("ExpressionAttributeNames") {
                            let names = names.as_object().expect("a names map");
                            assert_eq!(names.len(), 1, "{body:?}");
                            assert_eq!(names.values().next(), Some(&json!("Info")), "{body:?}");
                        }
                    }
                }
            }
            Request::Scan { .. } => assert!(only(body, &["TableName", "ConsistentRead"]) && consistent_ok, "{body:?}"),
            Request::DescribeTable { .. } => assert!(only(body, &["TableName"]), "{body:?}"),
        }
    }

    fn parses_as_allowed(target: &str, body: &str) -> Request {
        let req = parse(target, body.as_bytes()).unwrap_or_else(|e| panic!("{target} {body}: {e:?}"));
        let v: Value = serde_json::from_str(body).expect("json");
        let op = target.trim_start_matches("DynamoDB_20120810.");
        assert_allowed(op, v.as_object().expect("object"), &req);
        req
    }

    #[test]
    fn terraforms_calls_parse() {
        for (body, id, version) in [
            (LOCK_PUT_103, "tfstate/v103/terraform.tfstate", "1.0.3"),
            (LOCK_PUT, "tfstate/demo/terraform.tfstate", "1.11.4"),
            (LOCK_PUT_115, "tfstate/v115/terraform.tfstate", "1.15.5"),
        ] {
            let put = parses_as_allowed(PUT, body);
            assert_eq!(put.lock_id(), Some(id));
            let Request::PutItem { table, condition, item } = &put else { panic!("put: {put:?}") };
            assert_eq!(table, "tf-locks");
            assert_eq!(condition, &Some(Condition::NotExists("LockID".into())));
            assert_eq!(attr_names(item), ["Info", "LockID"]);
            let info: Value = serde_json::from_str(info_of(item).expect("Info")).expect("Info is JSON");
            assert_eq!(info["Version"], version);
            assert_eq!(info["Path"], id);
            assert_eq!(info["Operation"], "OperationTypeApply");
        }
        for (body, id, digest) in [
            (DIGEST_PUT_103, "tfstate/v103/terraform.tfstate-md5", "6d1a9a668bc70d77fddedffc18d5bcca"),
            (DIGEST_PUT_111, "tfstate/demo/terraform.tfstate-md5", "68018aa8c310c3abe7ba9ee609fcf862"),
            (DIGEST_PUT_115, "tfstate/v115/terraform.tfstate-md5", "9756b325620579e6dc09b5f0aa174e41"),
        ] {
            assert_eq!(
                parses_as_allowed(PUT, body),
                Request::PutItem { table: "tf-locks".into(), item: item(&[("LockID", id), ("Digest", digest)]), condition: None }
            );
        }
        assert_eq!(
            parses_as_allowed(GET, DIGEST_GET),
            Request::GetItem {
                table: "tf-locks".into(),
                key: [("LockID".to_owned(), json!({"S": "tfstate/demo/terraform.tfstate-md5"}))].into(),
                consistent: true,
                projection: Some(vec!["LockID".into(), "Digest".into()])
            }
        );
        assert_eq!(
            parses_as_allowed(GET, INFO_GET),
            Request::GetItem {
                table: "tf-locks".into(),
                key: item(&[("LockID", "tfstate/demo/terraform.tfstate")]),
                consistent: true,
                projection: Some(vec!["LockID".into(), "Info".into()])
            }
        );
        assert_eq!(
            parses_as_allowed(DEL, UNLOCK),
            Request::DeleteItem { table: "tf-locks".into(), key: item(&[("LockID", "tfstate/demo/terraform.tfstate")]), condition: None }
        );
        assert_eq!(
            parses_as_allowed(DEL, RELEASE),
            Request::DeleteItem {
                table: "tf-locks".into(),
                key: item(&[("LockID", "tfstate/demo/terraform.tfstate")]),
                condition: Some(Condition::Equals("Info".into(), s(r#"{"ID":"c240b743-f498-e9aa-802f-72066a836876"}"#)))
            }
        );
    }

    #[test]
    fn harmless_variations_of_the_real_calls_parse() {
        let lock = parses_as_allowed(
            PUT,
            r#"{"TableName":"t","ConditionExpression":"  attribute_not_exists(LockID)\n","Item":{"Info":{"S":"{}"},"LockID":{"S":"b/k"}}}"#,
        );
        assert!(matches!(&lock, Request::PutItem { condition: Some(Condition::NotExists(a)), .. } if a == "LockID"));
        for (body, consistent, projection) in [
            (r#"{"TableName":"t","Key":{"LockID":{"S":"b/k"}}}"#, false, None),
            (r#"{"TableName":"t","Key":{"LockID":{"S":"b/k"}},"ConsistentRead":false}"#, false, None),
            (r#"{"TableName":"t","Key":{"LockID":{"S":"b/k"}},"ProjectionExpression":"LockID,Info"}"#, false, Some(vec!["LockID", "Info"])),
            (
                r#"{"TableName":"t","Key":{"LockID":{"S":"b/k"}},"ProjectionExpression":" Digest , LockID "}"#,
                false,
                Some(vec!["Digest", "LockID"]),
            ),
            (
                r##"{"TableName":"t","Key":{"LockID":{"S":"b/k"}},"ConsistentRead":true,"ProjectionExpression":"#p0, #p1","ExpressionAttributeNames":{"#p0":"LockID","#p1":"Info"}}"##,
                true,
                Some(vec!["LockID", "Info"]),
            ),
        ] {
            let Request::GetItem { consistent: c, projection: p, .. } = parses_as_allowed(GET, body) else { panic!("get") };
            assert_eq!(c, consistent, "{body}");
            assert_eq!(p, projection.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>()), "{body}");
        }
        // statelock's release with other placeholders, compact spacing, or the attribute written directly.
        for body in [
            r##"{"TableName":"t","Key":{"LockID":{"S":"b/k"}},"ConditionExpression":"#i=:v","ExpressionAttributeNames":{"#i":"Info"},"ExpressionAttributeValues":{":v":{"S":"x"}}}"##,
            r##"{"TableName":"t","Key":{"LockID":{"S":"b/k"}},"ConditionExpression":"Info = :i","ExpressionAttributeValues":{":i":{"S":"x"}}}"##,
        ] {
            let Request::DeleteItem { condition, .. } = parses_as_allowed(DEL, body) else { panic!("delete") };
            assert_eq!(condition, Some(Condition::Equals("Info".into(), s("x"))), "{body}");
        }
        parses_as_allowed(SCAN, r#"{"TableName":"t","ConsistentRead":true}"#);
    }

    #[test]
    fn malformed_requests_get_dynamodb_errors_not_panics() {
        for (target, body, code) in [
            ("DynamoDB_20120810.Query", "{\"TableName\":\"t\"}", UNKNOWN),
            ("DynamoDB_20120810.UpdateItem", "{\"TableName\":\"t\"}", UNKNOWN),
            ("DynamoDB_20120810.BatchWriteItem", "{}", UNKNOWN),
            ("DynamoDB_20120810.TransactWriteItems", "{}", UNKNOWN),
            ("DynamoDB_20120811.PutItem", "{}", UNKNOWN),
            ("Bogus", "{}", UNKNOWN),
            (PUT, "{not json", SERIALIZATION),
            (PUT, "[]", SERIALIZATION),
            (PUT, "\"x\"", SERIALIZATION),
            (PUT, "", SERIALIZATION),
            (PUT, "{\"TableName\":\"t\"} trailing", SERIALIZATION),
            (PUT, "{\"Item\":{\"LockID\":{\"S\":\"x\"}}}", VALIDATION),
            (PUT, "{\"TableName\":\"t\",\"Item\":{\"LockID\":{\"Q\":\"x\"}}}", VALIDATION),
            (PUT, "{\"TableName\":\"t\",\"Item\":{\"Info\":{\"S\":\"x\"}}}", VALIDATION),
            (PUT, "{\"TableName\":\"t\",\"Item\":{\"LockID\":{\"S\":\"x\",\"N\":\"1\"}}}", VALIDATION),
            (DEL, "{\"TableName\":\"t\",\"Key\":{\"LockID\":{\"S\":\"x\"}},\"ConditionExpression\":\"Info = :i\"}", VALIDATION),
            (DEL, "{\"TableName\":\"t\",\"Key\":{\"LockID\":{\"S\":\"x\"}},\"ConditionExpression\":\"size(Info) > :n\"}", VALIDATION),
        ] {
            let e = parse(target, body.as_bytes()).expect_err(body);
            assert_eq!(e.code(), code, "{target} {body}: {e:?}");
            assert_eq!(e.status, 400);
        }
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(parse(PUT, &huge).expect_err("too large").status, 413);
    }

    /// Each row: a request one change away from a real one (or from statelock's release), and
    /// refused. The bases themselves are accepted, so each refusal is the change's.
    #[test]
    fn anything_but_the_real_shapes_is_refused() {
        let lock = json!({"TableName": "tf-locks", "ConditionExpression": "attribute_not_exists(LockID)", "Item": {"LockID": {"S": "b/k"}, "Info": {"S": "{}"}}});
        let digest =
            json!({"TableName": "tf-locks", "Item": {"LockID": {"S": "b/k-md5"}, "Digest": {"S": "d41d8cd98f00b204e9800998ecf8427e"}}});
        let get = json!({"TableName": "tf-locks", "ConsistentRead": true, "Key": {"LockID": {"S": "b/k"}}, "ProjectionExpression": "LockID, Info"});
        let del = json!({"TableName": "tf-locks", "Key": {"LockID": {"S": "b/k"}}});
        let release = json!({"TableName": "tf-locks", "Key": {"LockID": {"S": "b/k"}}, "ConditionExpression": "#info = :info",
            "ExpressionAttributeNames": {"#info": "Info"}, "ExpressionAttributeValues": {":info": {"S": "{}"}}});
        let scan = json!({"TableName": "tf-locks"});
        for (op, base) in [(PUT, &lock), (PUT, &digest), (GET, &get), (DEL, &del), (DEL, &release), (SCAN, &scan), (DESCRIBE, &scan)] {
            parses_as_allowed(op, &base.to_string());
        }
        let with = |base: &Value, changes: Value| -> String {
            let mut m = base.as_object().cloned().unwrap_or_default();
            if let Value::Object(c) = changes {
                m.extend(c);
            }
            Value::Object(m).to_string()
        };
        let info_as = |v: Value| with(&lock, json!({"Item": {"LockID": {"S": "b/k"}, "Info": v}}));
        let rows: Vec<(&str, String)> = vec![
            // Compound and other conditions on the lock PutItem.
            (
                PUT,
                with(
                    &lock,
                    json!({"ConditionExpression": "attribute_not_exists(LockID) AND Info = :i", "ExpressionAttributeValues": {":i": {"S": "{}"}}}),
                ),
            ),
            (PUT, with(&lock, json!({"ConditionExpression": "attribute_not_exists(LockID) AND Info = :i"}))),
            (PUT, with(&lock, json!({"ConditionExpression": "attribute_not_exists(LockID) OR attribute_exists(LockID)"}))),
            (PUT, with(&lock, json!({"ConditionExpression": "NOT attribute_exists(LockID)"}))),
            (PUT, with(&lock, json!({"ConditionExpression": "attribute_not_exists(#a)", "ExpressionAttributeNames": {"#a": "LockID"}}))),
            (PUT, with(&lock, json!({"ExpressionAttributeNames": {"#a": "LockID"}}))),
            (PUT, with(&lock, json!({"ExpressionAttributeValues": {":i": {"S": "{}"}}}))),
            (PUT, with(&lock, json!({"ConditionExpression": "attribute_not_exists(Info)"}))),
            (PUT, with(&lock, json!({"ConditionExpression": "attribute_not_exists( LockID )"}))),
            (PUT, with(&lock, json!({"ConditionExpression": "attribute_not_exists(LockID))"}))),
            (PUT, with(&lock, json!({"ConditionExpression": "attribute_not_exists(LockID) AND"}))),
            (PUT, with(&lock, json!({"ConditionExpression": "Info = :i", "ExpressionAttributeValues": {":i": {"S": "{}"}}}))),
            (PUT, with(&lock, json!({"ConditionExpression": "Info = :i"}))),
            (PUT, with(&lock, json!({"ConditionExpression": ""}))),
            (PUT, with(&lock, json!({"ConditionExpression": true}))),
            (PUT, with(&lock, json!({"ConditionExpression": null}))),
            // Conditions on the digest PutItem.
            (PUT, with(&digest, json!({"ConditionExpression": "attribute_not_exists(LockID)"}))),
            (PUT, with(&digest, json!({"ConditionExpression": "Digest = :d", "ExpressionAttributeValues": {":d": {"S": "x"}}}))),
            // Legacy and other parameters.
            (PUT, with(&lock, json!({"Expected": {"LockID": {"Exists": false}}}))),
            (PUT, with(&digest, json!({"Expected": {"LockID": {"Exists": false}}}))),
            (PUT, with(&lock, json!({"ConditionalOperator": "AND"}))),
            (PUT, with(&lock, json!({"ReturnValues": "ALL_OLD"}))),
            (PUT, with(&lock, json!({"ReturnValuesOnConditionCheckFailure": "ALL_OLD"}))),
            (PUT, with(&lock, json!({"ReturnConsumedCapacity": "TOTAL"}))),
            (PUT, with(&lock, json!({"ReturnItemCollectionMetrics": "SIZE"}))),
            (PUT, with(&lock, json!({"UpdateExpression": "SET Info = :i"}))),
            // Attribute types other than S, and malformed values.
            (PUT, info_as(json!({"B": "aGVsbG8="}))),
            (PUT, info_as(json!({"B": "!!! not base64 !!!"}))),
            (PUT, info_as(json!({"N": "1"}))),
            (PUT, info_as(json!({"M": {"k": {"S": "v"}}}))),
            (PUT, info_as(json!({"L": [{"S": "v"}]}))),
            (PUT, info_as(json!({"BOOL": true}))),
            (PUT, info_as(json!({"NULL": true}))),
            (PUT, info_as(json!({"SS": ["a"]}))),
            (PUT, info_as(json!({"BS": ["aGk="]}))),
            (PUT, info_as(json!({"s": "lower-case tag"}))),
            (PUT, info_as(json!({"S": 5}))),
            (PUT, info_as(json!({"S": null}))),
            (PUT, info_as(json!({"S": "x", "N": "1"}))),
            (PUT, info_as(json!({}))),
            (PUT, info_as(json!("bare string"))),
            (PUT, with(&lock, json!({"Item": {"LockID": {"B": "aGk="}, "Info": {"S": "{}"}}}))),
            (PUT, with(&lock, json!({"Item": {"LockID": {"S": ""}, "Info": {"S": "{}"}}}))),
            // Other attribute sets.
            (PUT, with(&lock, json!({"Item": {"LockID": {"S": "b/k"}, "Info": {"S": "{}"}, "Owner": {"S": "me"}}}))),
            (PUT, with(&lock, json!({"Item": {"LockID": {"S": "b/k"}, "Info": {"S": "{}"}, "Digest": {"S": "d"}}}))),
            (PUT, with(&digest, json!({"Item": {"LockID": {"S": "b/k-md5"}, "Info": {"S": "{}"}, "Digest": {"S": "d"}}}))),
            (PUT, with(&lock, json!({"Item": {"LockID": {"S": "b/k"}}}))),
            (PUT, with(&lock, json!({"Item": {"LockID": {"S": "b/k"}, "Digest": {"S": "d"}}}))),
            (PUT, with(&lock, json!({"Item": {}}))),
            (PUT, with(&lock, json!({"Item": []}))),
            (PUT, with(&digest, json!({"Item": {"LockID": {"S": "b/k"}, "Info": {"S": "{}"}}}))),
            (PUT, with(&digest, json!({"Item": {"LockID": {"S": "b/k"}, "Digest": {"S": "d"}}}))),
            (PUT, with(&digest, json!({"Item": {"LockID": {"S": "-md5"}, "Digest": {"S": "d"}}}))),
            (PUT, with(&digest, json!({"Item": {"LockID": {"S": "b/k-md5"}}}))),
            (PUT, with(&lock, json!({"Key": {"LockID": {"S": "b/k"}}}))),
            // TableName.
            (PUT, with(&lock, json!({"TableName": 5}))),
            (PUT, with(&lock, json!({"TableName": ""}))),
            (PUT, with(&lock, json!({"TableName": null}))),
            (PUT, with(&lock, json!({"TableName": ["tf-locks"]}))),
            // GetItem.
            (GET, with(&get, json!({"Key": {"LockID": {"S": "b/k"}, "Info": {"S": "{}"}}}))),
            (GET, with(&get, json!({"Key": {}}))),
            (GET, with(&get, json!({"Key": {"LockID": {"N": "1"}}}))),
            (GET, with(&get, json!({"Key": {"LockId": {"S": "b/k"}}}))),
            (GET, with(&get, json!({"ConditionExpression": "attribute_exists(LockID)"}))),
            (GET, with(&get, json!({"ProjectionExpression": "LockID, Info, Owner"}))),
            (GET, with(&get, json!({"ProjectionExpression": "LockID, LockID"}))),
            (GET, with(&get, json!({"ProjectionExpression": "LockID,, Info"}))),
            (GET, with(&get, json!({"ProjectionExpression": ""}))),
            (GET, with(&get, json!({"ProjectionExpression": "Info.ID"}))),
            (GET, with(&get, json!({"ProjectionExpression": "LockID Info"}))),
            (GET, with(&get, json!({"ProjectionExpression": 5}))),
            (GET, with(&get, json!({"ProjectionExpression": "#p", "ExpressionAttributeNames": {"#p": "Owner"}}))),
            (GET, with(&get, json!({"ProjectionExpression": "#p", "ExpressionAttributeNames": {"#q": "Info"}}))),
            (GET, with(&get, json!({"ProjectionExpression": "#p", "ExpressionAttributeNames": {"#p": 1}}))),
            (GET, with(&get, json!({"ProjectionExpression": "#p, LockID", "ExpressionAttributeNames": {"#p": "LockID"}}))),
            (GET, with(&get, json!({"ProjectionExpression": "LockID, Info", "ExpressionAttributeNames": {"#p": "Info"}}))),
            (GET, with(&get, json!({"ExpressionAttributeNames": {}}))),
            (GET, with(&get, json!({"ExpressionAttributeValues": {":v": {"S": "x"}}}))),
            (GET, with(&get, json!({"ConsistentRead": "true"}))),
            (GET, with(&get, json!({"AttributesToGet": ["LockID"]}))),
            (GET, with(&get, json!({"ReturnConsumedCapacity": "TOTAL"}))),
            // Conditions on DeleteItem other than the exact release.
            (
                DEL,
                with(
                    &release,
                    json!({"ConditionExpression": "#info = :info AND #x = :y", "ExpressionAttributeNames": {"#info": "Info", "#x": "LockID"},
                           "ExpressionAttributeValues": {":info": {"S": "{}"}, ":y": {"S": "b/k"}}}),
                ),
            ),
            (DEL, with(&release, json!({"ConditionExpression": "#info <> :info"}))),
            (DEL, with(&release, json!({"ConditionExpression": "#info <= :info"}))),
            (DEL, with(&release, json!({"ConditionExpression": "#info == :info"}))),
            (DEL, with(&release, json!({"ConditionExpression": "(#info = :info)"}))),
            (DEL, with(&release, json!({"ConditionExpression": "#info = :info OR attribute_not_exists(LockID)"}))),
            (DEL, with(&release, json!({"ConditionExpression": ":info = #info"}))),
            (DEL, with(&release, json!({"ConditionExpression": "#info = #info"}))),
            (DEL, with(&release, json!({"ExpressionAttributeValues": {":info": {"N": "1"}}}))),
            (DEL, with(&release, json!({"ExpressionAttributeValues": {":info": {"B": "e30="}}}))),
            (DEL, with(&release, json!({"ExpressionAttributeValues": {":info": {"S": "{}", "N": "1"}}}))),
            (DEL, with(&release, json!({"ExpressionAttributeNames": {"#info": "LockID"}}))),
            (DEL, with(&release, json!({"ExpressionAttributeNames": {"#info": "Info", "#x": "LockID"}}))),
            (DEL, with(&release, json!({"ExpressionAttributeValues": {":info": {"S": "{}"}, ":unused": {"S": "x"}}}))),
            (DEL, with(&release, json!({"ExpressionAttributeValues": {":other": {"S": "{}"}}}))),
            (DEL, with(&release, json!({"ExpressionAttributeNames": {}}))),
            (DEL, with(&release, json!({"ConditionExpression": "Info = :info"}))),
            (DEL, with(&release, json!({"ReturnValues": "ALL_OLD"}))),
            (DEL, with(&release, json!({"Key": {"LockID": {"S": "b/k"}, "Info": {"S": "{}"}}}))),
            (DEL, with(&del, json!({"ConditionExpression": "#info = :info", "ExpressionAttributeValues": {":info": {"S": "{}"}}}))),
            (DEL, with(&del, json!({"ExpressionAttributeValues": {":info": {"S": "{}"}}}))),
            (DEL, with(&del, json!({"ExpressionAttributeNames": {"#info": "Info"}}))),
            (DEL, with(&del, json!({"ConditionExpression": "attribute_not_exists(LockID)"}))),
            (DEL, with(&del, json!({"ConditionExpression": "attribute_exists(Info)"}))),
            (DEL, with(&del, json!({"ConditionExpression": "LockID = :i", "ExpressionAttributeValues": {":i": {"S": "b/k"}}}))),
            (DEL, with(&del, json!({"ConditionExpression": "size(Info) > :n", "ExpressionAttributeValues": {":n": {"N": "1"}}}))),
            (DEL, with(&del, json!({"Expected": {"Info": {"Value": {"S": "{}"}}}}))),
            (DEL, with(&del, json!({"ReturnValues": "ALL_OLD"}))),
            (DEL, with(&del, json!({"Key": {"LockID": {"S": "b/k"}, "Info": {"S": "{}"}}}))),
            (DEL, with(&del, json!({"Key": {"LockID": {"S": ""}}}))),
            (DEL, with(&del, json!({"Item": {"LockID": {"S": "b/k"}}}))),
            // Scan and DescribeTable.
            (SCAN, with(&scan, json!({"Limit": 10}))),
            (SCAN, with(&scan, json!({"ExclusiveStartKey": {"LockID": {"S": "b/k"}}}))),
            (SCAN, with(&scan, json!({"FilterExpression": "attribute_exists(Info)"}))),
            (SCAN, with(&scan, json!({"Segment": 0, "TotalSegments": 2}))),
            (SCAN, with(&scan, json!({"ConsistentRead": 1}))),
            (SCAN, with(&scan, json!({"TableName": 5}))),
            (DESCRIBE, with(&scan, json!({"ConsistentRead": true}))),
            (DESCRIBE, "{}".to_owned()),
        ];
        for (op, body) in rows {
            let e = parse(op, body.as_bytes()).expect_err(&format!("{op} {body}"));
            assert_eq!(e.code(), VALIDATION, "{op} {body}: {e:?}");
            assert_eq!(e.status, 400);
            assert_eq!(e.type_, "com.amazon.coral.validate#ValidationException");
            assert!(e.message.contains("statelock gateway accepts only"), "{op} {body}: {}", e.message);
        }
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
        let Request::DeleteItem { condition, .. } = parse(DEL, body.as_bytes()).expect("parse") else { panic!("delete") };
        assert_eq!(condition, Some(Condition::Equals("Info".into(), json!({"S": "v"}))));
        let body = r##"{"TableName":"t","Key":{"LockID":{"S":"x"}},"ProjectionExpression":"#a, #b","ExpressionAttributeNames":{"#a":"LockID","#b":"Digest"}}"##;
        let Request::GetItem { projection, .. } = parse(GET, body.as_bytes()).expect("parse") else { panic!("get") };
        assert_eq!(projection, Some(vec!["LockID".to_owned(), "Digest".to_owned()]));
    }

    #[test]
    fn refusals_say_what_and_why_without_echoing_whole_bodies() {
        let long = "x".repeat(10_000);
        let body = json!({"TableName": "t", "ConditionExpression": format!("attribute_not_exists(LockID) AND {long}"),
            "Item": {"LockID": {"S": "b/k"}, "Info": {"S": "{}"}}})
        .to_string();
        let e = parse(PUT, body.as_bytes()).expect_err("compound");
        assert!(e.message.contains("ConditionExpression") && e.message.contains("attribute_not_exists(LockID)"), "{}", e.message);
        assert!(e.message.contains("Terraform") && e.message.len() < 1_000, "{}", e.message);
        let e = parse(PUT, with_info_type("N").as_bytes()).expect_err("N");
        assert!(e.message.contains("\"N\"") && e.message.contains("only strings (S)"), "{}", e.message);
    }

    fn with_info_type(ty: &str) -> String {
        let mut info = Map::new();
        info.insert(ty.to_owned(), json!("1"));
        json!({"TableName": "t", "ConditionExpression": "attribute_not_exists(LockID)", "Item": {"LockID": {"S": "b/k"}, "Info": info}})
            .to_string()
    }

    /// Request bodies assembled from the real requests' parts, mixed at random.
    mod plausible {
        use proptest::{
            collection, option,
            prelude::{Just, Strategy},
            sample::select,
        };
        use serde_json::{Map, Value, json};

        const STRINGS: [&str; 8] = ["b/k", "b/k", "b/k-md5", "", "aGk=", "!!not base64", "1", "{\"ID\":\"x\"}"];
        const TOKENS: [&str; 24] = [
            "attribute_not_exists(",
            "attribute_exists(",
            "size(",
            "begins_with(",
            "LockID",
            "Info",
            "Digest",
            ")",
            "(",
            " AND ",
            " OR ",
            "NOT ",
            " = ",
            "=",
            " <> ",
            " < ",
            ":i",
            ":info",
            "#n",
            "#info",
            " ",
            ",",
            "\n",
            "attribute_not_exists(LockID)",
        ];

        fn object(pairs: Vec<(&'static str, Value)>) -> Value {
            Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        }

        fn attr_value() -> impl Strategy<Value = Value> {
            let string = select(STRINGS.to_vec()).prop_map(|s| json!({"S": s}));
            let odd = (select(vec!["S", "N", "B", "BOOL", "NULL", "M", "L", "SS", "BS", "Q", "s"]), select(STRINGS.to_vec()), 0u8..6)
                .prop_map(|(ty, s, shape)| {
                    let mut m = Map::new();
                    match (ty, shape) {
                        (_, 0) => {}
                        (_, 1) => {
                            m.insert(ty.to_owned(), json!(s));
                            m.insert("N".to_owned(), json!("1"));
                        }
                        (_, 2) => return json!(s),
                        ("BOOL" | "NULL", _) => {
                            m.insert(ty.to_owned(), json!(true));
                        }
                        ("M", _) => {
                            m.insert(ty.to_owned(), json!({"k": {"S": s}}));
                        }
                        ("L", _) => {
                            m.insert(ty.to_owned(), json!([{"S": s}]));
                        }
                        ("SS" | "BS", _) => {
                            m.insert(ty.to_owned(), json!([s]));
                        }
                        (_, 3) => {
                            m.insert(ty.to_owned(), json!(5));
                        }
                        _ => {
                            m.insert(ty.to_owned(), json!(s));
                        }
                    }
                    Value::Object(m)
                });
            proptest::prop_oneof![4 => string, 1 => odd]
        }

        fn attributes() -> impl Strategy<Value = Value> {
            collection::vec((select(vec!["LockID", "LockID", "Info", "Digest", "Owner"]), attr_value()), 0..4).prop_map(object)
        }

        fn condition() -> impl Strategy<Value = String> {
            proptest::prop_oneof![
                1 => select(vec!["attribute_not_exists(LockID)", " attribute_not_exists(LockID)\n", "#info = :info", "Info = :i", "#n = :i", "#info=:info"])
                    .prop_map(|s| s.to_owned()),
                3 => collection::vec(select(TOKENS.to_vec()), 0..7).prop_map(|t| t.concat()),
            ]
        }

        fn projection() -> impl Strategy<Value = String> {
            proptest::prop_oneof![
                1 => select(vec!["LockID, Info", "LockID, Digest", "#n, LockID", "LockID,Info"]).prop_map(|s| s.to_owned()),
                2 => collection::vec(select(vec!["LockID", "Info", "Digest", "Owner", "#n", "#info", " ", "", "Info.ID"]), 0..4)
                    .prop_map(|v| v.join(", ")),
            ]
        }

        fn placeholders(keys: Vec<&'static str>, value: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
            option::weighted(0.3, collection::vec((select(keys), value), 0..3).prop_map(object))
        }

        fn name() -> impl Strategy<Value = Value> {
            proptest::prop_oneof![
                4 => select(vec!["LockID", "Info", "Info", "Digest", "Owner"]).prop_map(|s| json!(s)),
                1 => Just(json!(1)),
            ]
        }

        /// An operation and a body for it.
        pub fn request() -> impl Strategy<Value = (&'static str, Value)> {
            let parts = (
                select(vec!["PutItem", "GetItem", "DeleteItem", "Scan", "DescribeTable"]),
                select(vec![
                    Some(json!("tf-locks")),
                    Some(json!("tf-locks")),
                    Some(json!("tf-locks")),
                    Some(json!("")),
                    Some(json!(5)),
                    None,
                ]),
                option::weighted(0.9, attributes()),
                select(vec!["natural", "natural", "natural", "natural", "Item", "Key"]),
                option::of(condition()),
            );
            let more = (
                placeholders(vec!["#n", "#info", "#", "n"], name()),
                placeholders(vec![":i", ":info", ":", "i"], attr_value()),
                option::weighted(0.3, projection()),
                option::weighted(0.3, select(vec![json!(true), json!(false), json!("true"), Value::Null])),
                select(vec![
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    Some(("Expected", json!({"LockID": {"Exists": false}}))),
                    Some(("ReturnValues", json!("ALL_OLD"))),
                    Some(("Limit", json!(1))),
                    Some(("UpdateExpression", json!("SET a = :v"))),
                    Some(("ReturnConsumedCapacity", json!("TOTAL"))),
                    Some(("ConditionalOperator", json!("AND"))),
                ]),
            );
            (parts, more).prop_map(|((op, table, attrs, field, cond), (names, values, projection, consistent, extra))| {
                let mut m = Map::new();
                if let Some(t) = table {
                    m.insert("TableName".to_owned(), t);
                }
                if let Some(a) = attrs {
                    let field = match field {
                        "natural" if op == "PutItem" => "Item",
                        "natural" => "Key",
                        other => other,
                    };
                    m.insert(field.to_owned(), a);
                }
                if let Some(c) = cond {
                    m.insert("ConditionExpression".to_owned(), json!(c));
                }
                if let Some(n) = names {
                    m.insert("ExpressionAttributeNames".to_owned(), n);
                }
                if let Some(v) = values {
                    m.insert("ExpressionAttributeValues".to_owned(), v);
                }
                if let Some(p) = projection {
                    m.insert("ProjectionExpression".to_owned(), json!(p));
                }
                if let Some(c) = consistent {
                    m.insert("ConsistentRead".to_owned(), c);
                }
                if let Some((k, v)) = extra {
                    m.insert(k.to_owned(), v);
                }
                (op, Value::Object(m))
            })
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            op in "PutItem|GetItem|DeleteItem|Scan|DescribeTable|Query",
        ) {
            let _ = parse(&format!("DynamoDB_20120810.{op}"), &body);
        }

        #[test]
        fn plausible_bodies_never_panic_and_only_allowed_shapes_pass((op, body) in plausible::request()) {
            let text = body.to_string();
            match parse(&format!("DynamoDB_20120810.{op}"), text.as_bytes()) {
                Ok(req) => {
                    let Value::Object(m) = &body else { panic!("bodies are objects") };
                    assert_allowed(op, m, &req);
                }
                Err(e) => {
                    assert_eq!(e.status, 400, "{text}: {e:?}");
                    assert_eq!(e.code(), VALIDATION, "{text}: {e:?}");
                }
            }
        }
    }

    #[test]
    fn scan_and_describe_table_parse_and_answer_like_dynamodb() {
        assert_eq!(parse(SCAN, br#"{"TableName":"t"}"#), Ok(Request::Scan { table: "t".into() }));
        assert_eq!(parse(SCAN, br#"{"TableName":"t","ConsistentRead":false}"#), Ok(Request::Scan { table: "t".into() }));
        assert_eq!(parse(DESCRIBE, br#"{"TableName":"t"}"#), Ok(Request::DescribeTable { table: "t".into() }));
        assert_eq!(Request::Scan { table: "t".into() }.lock_id(), None);
        let item: Item = [("LockID".to_owned(), json!({"S": "b/k"}))].into();
        assert_eq!(scan_body(std::slice::from_ref(&item)), json!({"Items": [{"LockID": {"S": "b/k"}}], "Count": 1, "ScannedCount": 1}));
        let d = describe_body("t", 3);
        assert_eq!(d["Table"]["KeySchema"][0]["AttributeName"], "LockID");
        assert!(d["Table"].get("StreamSpecification").is_none(), "no stream: the mirror scans");
    }
}
