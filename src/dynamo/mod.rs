//! DynamoDB: building SDK clients (one function, so the TLS set-up cannot be forgotten),
//! reading lock tables, and the pure meaning of their items.

pub mod capacity;
pub mod lock_item;
pub mod release;
mod sdk;
pub mod source_credentials;
pub mod streams;
mod table;

pub use sdk::{StaticCredentials, dynamodb_client, passthrough_client, sdk_config};
pub use table::{DynamoError, ScanOutput, SdkFailure, get_item, scan_table, stream_arn};
