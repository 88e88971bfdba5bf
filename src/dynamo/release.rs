//! Releasing a lock: only the exact lock instance that was judged, never Terraform's
//! unconditional delete.

use aws_sdk_dynamodb::{operation::delete_item::DeleteItemError, types::AttributeValue};
use sha2::{Digest, Sha256};

use super::{DynamoError, SdkFailure, get_item};

pub use crate::lock_store::ReleaseOutcome;

/// Delete the lock item `lock_id` only if it still carries the `Info` whose SHA-256 is
/// `info_sha256`: a consistent read first, then a DeleteItem conditioned on that exact Info, so
/// that a lock re-taken between the decision and the delete survives.
pub async fn release_exact(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    lock_id: &str,
    info_sha256: &str,
) -> Result<(ReleaseOutcome, f64), DynamoError> {
    let (item, units) = get_item(client, table, lock_id).await?;
    let Some(item) = item else { return Ok((ReleaseOutcome::AlreadyGone, units)) };
    let Some(AttributeValue::S(info)) = item.get("Info") else { return Ok((ReleaseOutcome::HeldByAnother, units)) };
    let observed: String = Sha256::digest(info.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    if observed != info_sha256 {
        return Ok((ReleaseOutcome::HeldByAnother, units));
    }
    Ok((delete_if_info(client, table, lock_id, info).await?, units))
}

/// Delete the lock item only while its `Info` is exactly `info` (a conditional DeleteItem).
pub async fn delete_if_info(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    lock_id: &str,
    info: &str,
) -> Result<ReleaseOutcome, DynamoError> {
    let result = client
        .delete_item()
        .table_name(table)
        .key("LockID", AttributeValue::S(lock_id.to_owned()))
        .condition_expression("#info = :info")
        .expression_attribute_names("#info", "Info")
        .expression_attribute_values(":info", AttributeValue::S(info.to_owned()))
        .send()
        .await;
    match result {
        Ok(_) => Ok(ReleaseOutcome::Released),
        Err(e) if matches!(e.as_service_error(), Some(DeleteItemError::ConditionalCheckFailedException(_))) => {
            Ok(ReleaseOutcome::HeldByAnother)
        }
        Err(e) => Err(DynamoError::DeleteItem { table: table.to_owned(), lock_id: lock_id.to_owned(), source: SdkFailure::new(e) }),
    }
}
