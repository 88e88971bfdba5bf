//! DynamoDB: building SDK clients (one function, so the TLS set-up cannot be forgotten),
//! reading lock tables, and the pure meaning of their items.

pub mod capacity;
pub mod lock_item;
mod sdk;
mod table;

pub use sdk::{StaticCredentials, dynamodb_client};
pub use table::{DynamoError, ScanOutput, scan_table};
