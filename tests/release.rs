//! Releasing a lock removes only the exact lock instance that was judged (moto and dynalite).

mod common;

use aws_sdk_dynamodb::types::AttributeValue;
use common::{DynamoServer, put_item, terraform_info};
use sha2::{Digest, Sha256};
use statelock::dynamo::release::{ReleaseOutcome, delete_if_info, release_exact};

const TABLE: &str = "tf-locks";
const LOCK: &str = "tfstate/app/terraform.tfstate";

fn sha(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

async fn item(db: &aws_sdk_dynamodb::Client, id: &str) -> Option<String> {
    let r = db.get_item().table_name(TABLE).key("LockID", AttributeValue::S(id.into())).consistent_read(true).send().await.expect("get");
    r.item.and_then(|i| i.get("Info").or(i.get("Digest")).and_then(|v| v.as_s().ok()).cloned())
}

async fn check(server: DynamoServer) {
    server.create_lock_table(TABLE).await;
    let db = server.dynamodb().await;
    let a = terraform_info("aaaa", "root@atlantis-0", LOCK, "2026-11-26T13:00:00Z");
    let b = terraform_info("bbbb", "root@atlantis-1", LOCK, "2026-11-26T13:05:00Z");
    put_item(&db, TABLE, &[("LockID", &format!("{LOCK}-md5")), ("Digest", "d41d8cd98f00b204e9800998ecf8427e")]).await;

    // The judged instance is still there: released.
    put_item(&db, TABLE, &[("LockID", LOCK), ("Info", &a)]).await;
    assert_eq!(release_exact(&db, TABLE, LOCK, &sha(&a)).await.expect("release").0, ReleaseOutcome::Released, "{}", server.kind);
    assert_eq!(item(&db, LOCK).await, None);

    // Nothing there any more.
    assert_eq!(release_exact(&db, TABLE, LOCK, &sha(&a)).await.expect("release").0, ReleaseOutcome::AlreadyGone);

    // Re-taken by another holder before the release: the new lock survives.
    put_item(&db, TABLE, &[("LockID", LOCK), ("Info", &b)]).await;
    assert_eq!(release_exact(&db, TABLE, LOCK, &sha(&a)).await.expect("release").0, ReleaseOutcome::HeldByAnother);
    assert_eq!(item(&db, LOCK).await.as_deref(), Some(b.as_str()));

    // Re-taken between the read and the delete: the condition on the exact Info refuses.
    assert_eq!(delete_if_info(&db, TABLE, LOCK, &a).await.expect("conditional delete"), ReleaseOutcome::HeldByAnother);
    assert_eq!(item(&db, LOCK).await.as_deref(), Some(b.as_str()), "the live lock survives");

    // The digest item is never touched.
    assert_eq!(item(&db, &format!("{LOCK}-md5")).await.as_deref(), Some("d41d8cd98f00b204e9800998ecf8427e"));
}

#[tokio::test(flavor = "multi_thread")]
async fn release_removes_only_the_judged_instance_on_moto() {
    check(DynamoServer::moto()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn release_removes_only_the_judged_instance_on_dynalite() {
    check(DynamoServer::dynalite()).await;
}
