//! Reading a lock table.

use std::collections::HashMap;

use aws_sdk_dynamodb::{
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    types::AttributeValue,
};

use crate::errors::ErrorCategory;

use super::capacity;

/// A DynamoDB call that failed.
#[derive(Debug, thiserror::Error)]
pub enum DynamoError {
    #[error("failed to scan DynamoDB table {table}: {source}")]
    ScanTable { table: String, source: SdkFailure },
    #[error("failed to describe DynamoDB table {table}: {source}")]
    DescribeTable { table: String, source: SdkFailure },
    #[error("failed to read lock item {lock_id} from DynamoDB table {table}: {source}")]
    GetItem { table: String, lock_id: String, source: SdkFailure },
    #[error("failed to delete lock item {lock_id} from DynamoDB table {table}: {source}")]
    DeleteItem { table: String, lock_id: String, source: SdkFailure },
}

impl DynamoError {
    pub fn category(&self) -> ErrorCategory {
        match self {
            Self::ScanTable { source, .. }
            | Self::DescribeTable { source, .. }
            | Self::GetItem { source, .. }
            | Self::DeleteItem { source, .. } => source.category,
        }
    }
}

/// An AWS SDK call that failed: the error itself (as its source), its category, and its
/// message with the whole chain of causes.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SdkFailure {
    pub category: ErrorCategory,
    message: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl SdkFailure {
    pub fn new<E, R>(e: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        Self { category: ErrorCategory::of_sdk(&e), message: DisplayErrorContext(&e).to_string(), source: Box::new(e) }
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

/// Read every item of a table with a paginated Scan; `consistent`: strongly consistent (twice the
/// read units), so that no lagging replica can answer with an older state than one already seen.
pub async fn scan_table(client: &aws_sdk_dynamodb::Client, table: &str, consistent: bool) -> Result<ScanOutput, DynamoError> {
    let mut out = ScanOutput::default();
    let mut start: Option<HashMap<String, AttributeValue>> = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start.take())
            .consistent_read(consistent)
            .send()
            .await
            .map_err(|e| DynamoError::ScanTable { table: table.to_owned(), source: SdkFailure::new(e) })?;
        let items = page.items.unwrap_or_default();
        out.read_units += capacity::scan_page_read_units(&items, consistent);
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
        .map_err(|e| DynamoError::DescribeTable { table: table.to_owned(), source: SdkFailure::new(e) })?;
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
        .map_err(|e| DynamoError::GetItem { table: table.to_owned(), lock_id: lock_id.to_owned(), source: SdkFailure::new(e) })?;
    let units = capacity::get_item_read_units(r.item.as_ref(), true);
    Ok((r.item, units))
}
