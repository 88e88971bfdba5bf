//! Reading a lock table.

use std::collections::HashMap;

use aws_sdk_dynamodb::{error::DisplayErrorContext, types::AttributeValue};

use super::capacity;

/// A DynamoDB call that failed.
#[derive(Debug, thiserror::Error)]
pub enum DynamoError {
    #[error("failed to scan DynamoDB table {table}: {message}")]
    ScanTable { table: String, message: String },
    #[error("failed to describe DynamoDB table {table}: {message}")]
    DescribeTable { table: String, message: String },
    #[error("failed to read lock item {lock_id} from DynamoDB table {table}: {message}")]
    GetItem { table: String, lock_id: String, message: String },
    #[error("failed to delete lock item {lock_id} from DynamoDB table {table}: {message}")]
    DeleteItem { table: String, lock_id: String, message: String },
}

impl DynamoError {
    /// A stable category for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::ScanTable { .. } => "dynamodb_scan",
            Self::DescribeTable { .. } => "dynamodb_describe",
            Self::GetItem { .. } => "dynamodb_get",
            Self::DeleteItem { .. } => "dynamodb_delete",
        }
    }
}

/// A full scan.
#[derive(Debug, Default)]
pub struct ScanOutput {
    pub items: Vec<HashMap<String, AttributeValue>>,
    pub pages: u32,
    /// Read capacity units as DynamoDB bills this scan (see [`capacity`]).
    pub read_units: f64,
}

/// Read every item of a table with a paginated, eventually consistent Scan.
pub async fn scan_table(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<ScanOutput, DynamoError> {
    let mut out = ScanOutput::default();
    let mut start: Option<HashMap<String, AttributeValue>> = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .map_err(|e| DynamoError::ScanTable { table: table.to_owned(), message: DisplayErrorContext(&e).to_string() })?;
        let items = page.items.unwrap_or_default();
        out.read_units += capacity::scan_page_read_units(&items, false);
        out.items.extend(items);
        out.pages += 1;
        match page.last_evaluated_key {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => return Ok(out),
        }
    }
}

/// The stream of a table, when it has one enabled: its ARN.
pub async fn stream_arn(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<Option<String>, DynamoError> {
    let d = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| DynamoError::DescribeTable { table: table.to_owned(), message: DisplayErrorContext(&e).to_string() })?;
    let t = d.table;
    let enabled = t.as_ref().and_then(|t| t.stream_specification.as_ref()).is_some_and(|s| s.stream_enabled);
    Ok(if enabled { t.and_then(|t| t.latest_stream_arn) } else { None })
}

/// Read one item with a strongly consistent GetItem; returns it and the read units it cost.
pub async fn get_item(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    lock_id: &str,
) -> Result<(Option<HashMap<String, AttributeValue>>, f64), DynamoError> {
    let r = client
        .get_item()
        .table_name(table)
        .key("LockID", AttributeValue::S(lock_id.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| DynamoError::GetItem {
            table: table.to_owned(),
            lock_id: lock_id.to_owned(),
            message: DisplayErrorContext(&e).to_string(),
        })?;
    let units = capacity::get_item_read_units(r.item.as_ref(), true);
    Ok((r.item, units))
}
