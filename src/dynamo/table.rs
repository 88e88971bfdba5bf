//! Reading a lock table.

use std::collections::HashMap;

use aws_sdk_dynamodb::{error::DisplayErrorContext, types::AttributeValue};

use super::capacity;

/// A DynamoDB call that failed.
#[derive(Debug, thiserror::Error)]
pub enum DynamoError {
    #[error("failed to scan DynamoDB table {table}: {message}")]
    ScanTable { table: String, message: String },
}

impl DynamoError {
    /// A stable category for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::ScanTable { .. } => "dynamodb_scan",
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
