//! The mirror, end to end: moto (a real DynamoDB-compatible server over HTTP), the Kubernetes
//! API emulator, and `statelock run` as a separate process.

mod common;

use std::time::Duration;

use common::{DynamoServer, Operator, TestCluster, eventually, put_item, release_lock, terraform_info};
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;
use statelock::crd::{LockSource, StateLock, state_lock_name};

const NS: &str = "terraform";
const TABLE: &str = "tf-locks";

async fn setup(moto: &DynamoServer, interval: &str) -> TestCluster {
    setup_mode(moto, interval, "Scan").await
}

async fn setup_mode(moto: &DynamoServer, interval: &str, mode: &str) -> TestCluster {
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    cluster.create_lock_source(NS, "prod-locks", json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url()}, "sync": {"mode": mode, "interval": interval}})).await;
    cluster
}

async fn statelocks(cluster: &TestCluster) -> Vec<StateLock> {
    Api::<StateLock>::namespaced(cluster.client(), NS).list(&ListParams::default()).await.expect("list").items
}

async fn events_for(cluster: &TestCluster, name: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(cluster.client(), NS)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name) && e.reason.as_deref() == Some(reason))
        .collect()
}

async fn source_status(cluster: &TestCluster) -> statelock::crd::LockSourceStatus {
    Api::<LockSource>::namespaced(cluster.client(), NS).get("prod-locks").await.expect("LockSource").status.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_item_becomes_a_statelock_and_its_release_removes_it() {
    lifecycle(DynamoServer::moto()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_item_becomes_a_statelock_and_its_release_removes_it_on_dynalite() {
    lifecycle(DynamoServer::dynalite()).await;
}

async fn lifecycle(moto: DynamoServer) {
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let cluster = setup(&moto, "1s").await;
    let op = Operator::start(&cluster);

    let lock_id = "tfstate/env:/dev/network/terraform.tfstate";
    let info = terraform_info("1edde332-0dcf-0332-cbb0-ed1b3daf868d", "@atlantis-0", lock_id, "2026-11-26T13:02:20.23832569Z");
    put_item(&db, TABLE, &[("LockID", lock_id), ("Info", &info)]).await;
    put_item(&db, TABLE, &[("LockID", &format!("{lock_id}-md5")), ("Digest", "68018aa8c310c3abe7ba9ee609fcf862")]).await;
    let name = state_lock_name(lock_id);

    let lock = eventually(Duration::from_secs(30), "the StateLock to appear", || async {
        statelocks(&cluster)
            .await
            .into_iter()
            .find(|s| s.name_any() == name && s.status.as_ref().is_some_and(|st| !st.conditions.is_empty()))
    })
    .await;
    assert_eq!(lock.spec.lock_id, lock_id);
    assert_eq!(lock.spec.source, "prod-locks");
    assert_eq!(lock.spec.lock_info.who.as_deref(), Some("@atlantis-0"));
    assert_eq!(lock.spec.lock_info.id.as_deref(), Some("1edde332-0dcf-0332-cbb0-ed1b3daf868d"));
    assert_eq!(lock.spec.lock_info.created.as_deref(), Some("2026-11-26T13:02:20.23832569Z"));
    assert_eq!(lock.labels().get("statelock.dev/source").map(String::as_str), Some("prod-locks"));
    let conds = &lock.status.as_ref().expect("status").conditions;
    assert!(conds.iter().any(|c| c.type_ == "InfoValid" && c.status == "True"), "{conds:?}");
    assert_eq!(statelocks(&cluster).await.len(), 1, "the digest item is not a lock");
    let acquired = eventually(Duration::from_secs(10), "LockAcquired", || async {
        let e = events_for(&cluster, &name, "LockAcquired").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert!(acquired[0].note.as_deref().unwrap_or_default().contains("@atlantis-0"));
    let status = eventually(Duration::from_secs(10), "LockSource Ready", || async {
        let s = source_status(&cluster).await;
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(s)
    })
    .await;
    assert_eq!(status.lock_count, Some(1));
    assert!(status.last_sync_time.is_some());

    // Release: Terraform deletes the lock item (never the digest).
    release_lock(&db, TABLE, lock_id).await;
    eventually(Duration::from_secs(30), "the StateLock to go away", || async { statelocks(&cluster).await.is_empty().then_some(()) }).await;
    let released = eventually(Duration::from_secs(10), "LockReleased", || async {
        let e = events_for(&cluster, &name, "LockReleased").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert!(released[0].note.as_deref().unwrap_or_default().contains("released after"));
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_items_become_statelocks_with_a_condition_and_one_warning() {
    malformed(DynamoServer::moto()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_items_become_statelocks_with_a_condition_and_one_warning_on_dynalite() {
    malformed(DynamoServer::dynalite()).await;
}

async fn malformed(moto: DynamoServer) {
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    put_item(&db, TABLE, &[("LockID", "tfstate/bad/terraform.tfstate"), ("Info", "{not json")]).await;
    db.put_item()
        .table_name(TABLE)
        .item("LockID", aws_sdk_dynamodb::types::AttributeValue::S("tfstate/num/terraform.tfstate".into()))
        .item("Info", aws_sdk_dynamodb::types::AttributeValue::N("42".into()))
        .send()
        .await
        .expect("put");
    let good = terraform_info("x-1", "root@runner", "tfstate/good/terraform.tfstate", "2026-11-26T13:02:20Z");
    put_item(&db, TABLE, &[("LockID", "tfstate/good/terraform.tfstate"), ("Info", &good)]).await;
    let cluster = setup(&moto, "1s").await;
    let op = Operator::start(&cluster);
    let locks = eventually(Duration::from_secs(30), "three StateLocks with conditions", || async {
        let l = statelocks(&cluster).await;
        (l.len() == 3 && l.iter().all(|s| s.status.as_ref().is_some_and(|st| !st.conditions.is_empty()))).then_some(l)
    })
    .await;
    let bad = locks.iter().find(|l| l.spec.lock_id == "tfstate/bad/terraform.tfstate").expect("bad");
    let cond = bad.status.as_ref().expect("status").conditions.iter().find(|c| c.type_ == "InfoValid").expect("InfoValid");
    assert_eq!(cond.status, "False");
    assert!(cond.message.contains("not valid JSON"), "{}", cond.message);
    assert_eq!(bad.spec.raw_info.as_deref(), Some("{not json"));
    let num = locks.iter().find(|l| l.spec.lock_id == "tfstate/num/terraform.tfstate").expect("num");
    assert!(num.status.as_ref().expect("status").conditions.iter().any(|c| c.message.contains("type N")));
    // Several passes later there is still exactly one warning per malformed lock.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(events_for(&cluster, &bad.name_any(), "LockMalformed").await.len(), 1);
    assert_eq!(events_for(&cluster, &num.name_any(), "LockMalformed").await.len(), 1);
    assert!(events_for(&cluster, &state_lock_name("tfstate/good/terraform.tfstate"), "LockMalformed").await.is_empty());
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_operator_creates_no_duplicates_and_no_spurious_events() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    for i in 0..20 {
        let id = format!("tfstate/app{i}/terraform.tfstate");
        put_item(&db, TABLE, &[("LockID", &id), ("Info", &terraform_info(&format!("id-{i}"), "root@runner", &id, "2026-11-26T13:02:20Z"))])
            .await;
    }
    let cluster = setup(&moto, "1s").await;
    let op = Operator::start(&cluster);
    // Every StateLock complete: spec, the mirror's conditions and the controller's holder status.
    eventually(Duration::from_secs(30), "20 complete StateLocks", || async {
        let locks = statelocks(&cluster).await;
        let complete = locks.iter().filter(|l| l.status.as_ref().is_some_and(|s| s.holder.is_some() && !s.conditions.is_empty())).count();
        (complete == 20).then_some(())
    })
    .await;
    // SIGKILL: nothing graceful.
    op.kill().await;
    let writes_before = cluster.emulator.writes("statelock.dev", "statelocks");
    let op2 = Operator::start(&cluster);
    eventually(Duration::from_secs(30), "the second operator to sync", || async {
        let s = source_status(&cluster).await;
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(statelocks(&cluster).await.len(), 20);
    assert_eq!(cluster.emulator.writes("statelock.dev", "statelocks"), writes_before, "a restart rewrites nothing that is already right");
    for i in 0..20 {
        let name = state_lock_name(&format!("tfstate/app{i}/terraform.tfstate"));
        assert_eq!(events_for(&cluster, &name, "LockAcquired").await.len(), 1, "{name}: one LockAcquired across the restart");
    }
    op2.stop().await;
}

/// Accept on `from` and forward every connection to `to`, from now on.
async fn forward(from: u16, to: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", from)).await.expect("bind the old port");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_table_is_reported_and_statelocks_are_kept() {
    let port = common::free_port();
    let moto = DynamoServer::moto_on(port);
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let id = "tfstate/keep/terraform.tfstate";
    put_item(&db, TABLE, &[("LockID", id), ("Info", &terraform_info("k-1", "root@runner", id, "2026-11-26T13:02:20Z"))]).await;
    let cluster = setup(&moto, "1s").await;
    let op = Operator::start(&cluster);
    eventually(Duration::from_secs(30), "the StateLock", || async { (statelocks(&cluster).await.len() == 1).then_some(()) }).await;
    moto.stop();
    let status = eventually(Duration::from_secs(60), "Ready=False", || async {
        let s = source_status(&cluster).await;
        s.conditions.iter().find(|c| c.type_ == "Ready" && c.status == "False").cloned()
    })
    .await;
    assert_eq!(status.reason, "TableUnreadable");
    assert!(status.message.contains(TABLE), "{}", status.message);
    assert_eq!(statelocks(&cluster).await.len(), 1, "an outage never looks like a release");
    assert!(events_for(&cluster, &state_lock_name(id), "LockReleased").await.is_empty());

    // Back: a new moto, with the lock still held, reachable on the same port only once its table
    // holds the lock (a table seen empty in between would rightly count as a release).
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    put_item(&moto.dynamodb().await, TABLE, &[("LockID", id), ("Info", &terraform_info("k-1", "root@runner", id, "2026-11-26T13:02:20Z"))])
        .await;
    forward(port, moto.port).await;
    eventually(Duration::from_secs(60), "Ready=True again", || async {
        let s = source_status(&cluster).await;
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    assert_eq!(statelocks(&cluster).await.len(), 1);
    assert_eq!(events_for(&cluster, &state_lock_name(id), "LockAcquired").await.len(), 1, "the same lock: no second LockAcquired");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_with_5000_digest_items_and_many_locks() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
    for chunk in 0..200 {
        let reqs: Vec<WriteRequest> = (0..25)
            .map(|i| {
                let n = chunk * 25 + i;
                let put = PutRequest::builder()
                    .item("LockID", AttributeValue::S(format!("tfstate/state{n}/terraform.tfstate-md5")))
                    .item("Digest", AttributeValue::S(format!("{n:032x}")))
                    .build()
                    .expect("put request");
                WriteRequest::builder().put_request(put).build()
            })
            .collect();
        db.batch_write_item().request_items(TABLE, reqs).send().await.expect("batch write");
    }
    for i in 0..60 {
        let id = format!("tfstate/state{i}/terraform.tfstate");
        put_item(&db, TABLE, &[("LockID", &id), ("Info", &terraform_info(&format!("id-{i}"), "root@runner", &id, "2026-11-26T13:02:20Z"))])
            .await;
    }
    let cluster = setup(&moto, "2s").await;
    let op = Operator::start(&cluster);
    let status = eventually(Duration::from_secs(60), "60 locks mirrored", || async {
        let s = source_status(&cluster).await;
        (s.lock_count == Some(60) && statelocks(&cluster).await.len() == 60).then_some(s)
    })
    .await;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready");
    assert!(ready.message.contains("5060 items"), "{}", ready.message);
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_mode_mirrors_changes_long_before_the_interval() {
    let moto = DynamoServer::moto();
    moto.create_lock_table_with_stream(TABLE).await;
    let db = moto.dynamodb().await;
    let early = "tfstate/early/terraform.tfstate";
    put_item(&db, TABLE, &[("LockID", early), ("Info", &terraform_info("e-1", "root@runner", early, "2026-11-26T13:02:20Z"))]).await;
    // An interval of 5 minutes: only the stream can deliver the later changes in time.
    let cluster = setup_mode(&moto, "5m", "Streams").await;
    let op = Operator::start(&cluster);
    let status = eventually(Duration::from_secs(30), "the first full sync", || async {
        let s = source_status(&cluster).await;
        (s.lock_count == Some(1)).then_some(s)
    })
    .await;
    assert_eq!(status.sync_mode, Some(statelock::crd::SyncMode::Streams));
    let id = "tfstate/streamed/terraform.tfstate";
    put_item(&db, TABLE, &[("LockID", id), ("Info", &terraform_info("s-1", "root@runner", id, "2026-11-26T13:02:20Z"))]).await;
    put_item(&db, TABLE, &[("LockID", &format!("{id}-md5")), ("Digest", "00")]).await;
    eventually(Duration::from_secs(20), "the streamed lock", || async { (statelocks(&cluster).await.len() == 2).then_some(()) }).await;
    release_lock(&db, TABLE, early).await;
    eventually(Duration::from_secs(20), "the released lock to go", || async {
        let l = statelocks(&cluster).await;
        (l.len() == 1 && l[0].spec.lock_id == id).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_mode_on_a_table_without_a_stream_is_not_ready_and_auto_falls_back_to_scan() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let cluster = setup_mode(&moto, "1s", "Streams").await;
    let op = Operator::start(&cluster);
    let cond = eventually(Duration::from_secs(30), "Ready=False", || async {
        source_status(&cluster).await.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")
    })
    .await;
    assert_eq!(cond.reason, "StreamNotEnabled");
    op.stop().await;

    let api = Api::<LockSource>::namespaced(cluster.client(), NS);
    api.patch("prod-locks", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(json!({"spec": {"sync": {"mode": "Auto"}}})))
        .await
        .expect("switch to Auto");
    let op = Operator::start(&cluster);
    let status = eventually(Duration::from_secs(30), "Ready=True in Scan mode", || async {
        let s = source_status(&cluster).await;
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(s)
    })
    .await;
    assert_eq!(status.sync_mode, Some(statelock::crd::SyncMode::Scan));
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_older_than_stale_after_gets_a_stale_condition_and_one_warning() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let id = "tfstate/old/terraform.tfstate";
    put_item(&db, TABLE, &[("LockID", id), ("Info", &terraform_info("o-1", "root@runner", id, "2020-01-01T00:00:00Z"))]).await;
    let fresh = "tfstate/fresh/terraform.tfstate";
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    put_item(&db, TABLE, &[("LockID", fresh), ("Info", &terraform_info("f-1", "root@runner", fresh, &now))]).await;
    let cluster = setup(&moto, "1s").await;
    let op = Operator::start(&cluster);
    let name = state_lock_name(id);
    let lock = eventually(Duration::from_secs(30), "the Stale condition", || async {
        statelocks(&cluster).await.into_iter().find(|l| {
            l.name_any() == name && l.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Stale" && c.status == "True"))
        })
    })
    .await;
    let cond = lock.status.expect("status").conditions.into_iter().find(|c| c.type_ == "Stale").expect("Stale");
    assert_eq!(cond.reason, "HeldTooLong");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(events_for(&cluster, &name, "LockStale").await.len(), 1, "one warning, not one per pass");
    assert!(events_for(&cluster, &state_lock_name(fresh), "LockStale").await.is_empty());
    assert_eq!(statelocks(&cluster).await.len(), 2, "age never releases a lock");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_in_the_middle_of_a_sync_leaves_no_duplicates() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    for i in 0..60 {
        let id = format!("tfstate/mid{i}/terraform.tfstate");
        put_item(&db, TABLE, &[("LockID", &id), ("Info", &terraform_info(&format!("m-{i}"), "root@runner", &id, "2026-11-26T13:02:20Z"))])
            .await;
    }
    let cluster = setup(&moto, "1s").await;
    let op = Operator::start(&cluster);
    let partial = eventually(Duration::from_secs(30), "the first StateLocks", || async {
        let n = statelocks(&cluster).await.len();
        (n >= 1).then_some(n)
    })
    .await;
    op.kill().await;
    let op2 = Operator::start(&cluster);
    eventually(Duration::from_secs(30), "all 60 StateLocks", || async { (statelocks(&cluster).await.len() == 60).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let locks = statelocks(&cluster).await;
    assert_eq!(locks.len(), 60, "killed after {partial} objects: no duplicates, nothing lost");
    for l in &locks {
        assert!(events_for(&cluster, &l.name_any(), "LockAcquired").await.len() <= 1, "{}: at most one LockAcquired", l.name_any());
        assert!(
            l.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "InfoValid")),
            "{} got its conditions",
            l.name_any()
        );
    }
    op2.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_come_from_the_referenced_secret_and_a_missing_one_is_reported() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let id = "tfstate/cred/terraform.tfstate";
    put_item(&db, TABLE, &[("LockID", id), ("Info", &terraform_info("c-1", "root@runner", id, "2026-11-26T13:02:20Z"))]).await;
    let cluster = setup(&moto, "1s").await;
    let api = Api::<LockSource>::namespaced(cluster.client(), NS);
    api.patch(
        "prod-locks",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"dynamodb": {"credentialsSecretRef": {"name": "aws-creds"}}}})),
    )
    .await
    .expect("reference a Secret");
    let op = Operator::start(&cluster);
    let cond = eventually(Duration::from_secs(30), "Ready=False without the Secret", || async {
        source_status(&cluster).await.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")
    })
    .await;
    assert_eq!(cond.reason, "CredentialsUnavailable");
    assert!(cond.message.contains("aws-creds"), "{}", cond.message);
    assert!(statelocks(&cluster).await.is_empty());
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        json!({"metadata": {"name": "aws-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "AKIASECRET", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}}),
    )
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(cluster.client(), NS)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
    eventually(Duration::from_secs(30), "the lock mirrored with the Secret's credentials", || async {
        (statelocks(&cluster).await.len() == 1).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_chain_takes_irsa_web_identity_credentials() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let id = "tfstate/irsa/terraform.tfstate";
    put_item(&db, TABLE, &[("LockID", id), ("Info", &terraform_info("i-1", "root@runner", id, "2026-11-26T13:02:20Z"))]).await;
    let cluster = setup(&moto, "1s").await;
    // What EKS injects for IRSA: a role ARN and a projected token file, no static keys. STS is moto.
    let token = cluster.dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6c3RhdGVsb2NrIn0.c2ln").expect("token");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_statelock"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/statelock")
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", &token)
        .env("AWS_ENDPOINT_URL_STS", moto.url())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // The operator's own identity (IRSA) for this namespace, and moto as an allowed endpoint.
        .env("STATELOCK_AWS_IDENTITY_NAMESPACES", NS)
        .env("STATELOCK_ALLOWED_ENDPOINTS", moto.url())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let op = Operator::start_with(&cluster, cmd);
    eventually(Duration::from_secs(30), "the lock mirrored with web identity credentials", || async {
        (statelocks(&cluster).await.len() == 1).then_some(())
    })
    .await;
    op.stop().await;
}

/// `/readyz` waits for a first DynamoDB read, and `/metrics` then shows the mirror's figures.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_for_dynamodb_and_metrics_show_the_mirror() {
    let port = common::free_port();
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    cluster.create_lock_source(NS, "prod-locks", json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": endpoint}, "sync": {"mode": "Scan", "interval": "1s"}})).await;
    let op = Operator::start(&cluster);
    let readyz = |op: &Operator| {
        let addr = format!("127.0.0.1:{}", op.admin_port);
        std::net::TcpStream::connect(&addr).ok().map(|_| common::http_fetch("GET", &format!("http://{addr}/readyz"), ""))
    };
    // Nothing listens at the table's endpoint yet: not ready, and /readyz says why.
    let (status, body) = eventually(Duration::from_secs(30), "a /readyz answer naming DynamoDB", || {
        let r = readyz(&op).filter(|(_, b)| b.contains("stores: no LockSource's lock store has been read yet; last error"));
        async move { r }
    })
    .await;
    assert_eq!(status, 503, "{body}");
    let moto = DynamoServer::moto_on(port);
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let id = "tfstate/app/terraform.tfstate";
    put_item(
        &db,
        TABLE,
        &[("LockID", id), ("Info", &terraform_info("1edde332-0dcf-0332-cbb0-ed1b3daf868d", "root@runner", id, "2026-11-26T13:02:20Z"))],
    )
    .await;
    eventually(Duration::from_secs(30), "ready once the table can be read", || {
        let ok = readyz(&op).is_some_and(|(s, _)| s == 200);
        async move { ok.then_some(()) }
    })
    .await;
    let m = eventually(Duration::from_secs(30), "the mirror's metrics", || {
        let m = op.metrics();
        let held = common::metric(&m, "statelock_locks_held{namespace=\"terraform\",source=\"prod-locks\"}");
        async move { (held == Some(1.0)).then_some(m) }
    })
    .await;
    assert!(common::metric(&m, "statelock_dynamodb_read_units_total{namespace=\"terraform\",source=\"prod-locks\"}") > Some(0.0), "{m}");
    assert!(common::metric(&m, "statelock_reconcile_duration_seconds_count{controller=\"mirror\"}") >= Some(1.0), "{m}");
    assert_eq!(common::metric(&m, "statelock_mirror_lag_seconds_count"), Some(1.0), "{m}");
    assert!(common::metric(&m, "statelock_lock_oldest_age_seconds{namespace=\"terraform\",source=\"prod-locks\"}") > Some(0.0), "{m}");
    assert_eq!(common::metric(&m, "statelock_leader"), Some(1.0), "{m}");
    assert!(m.ends_with("# EOF\n"), "OpenMetrics text");
    op.stop().await;
}
