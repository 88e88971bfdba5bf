//! S3 lock files (`use_lockfile = true`) end to end: moto's S3 (and DynamoDB), the API emulator
//! (no kubelet: the tests set pod status), real Terraform 1.11+ processes and `statelock run` as
//! a process. A lock file is mirrored as a StateLock; a dead holder's lock file is released with
//! `If-Match` on the ETag judged, after which the next Terraform run takes the lock; with a
//! DynamoDB table too, the file and the item are one StateLock and both are released.

mod common;

use std::{os::unix::process::CommandExt, process::Stdio, time::Duration};

use aws_sdk_dynamodb::types::AttributeValue;
use common::{DynamoServer, Operator, Terraform, TestCluster, eventually, http_request, metric, s3_client, terraform_info};
use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use statelock::{
    crd::{HolderState, StateLock, state_lock_name},
    lock_store::{LockStore, ReleaseOutcome, S3Store, StoreKind},
};

const NS: &str = "terraform";
const RUNNERS: &str = "atlantis";
const TABLE: &str = "tf-locks";
const BUCKET: &str = "tfstate";

struct Env {
    moto: DynamoServer,
    cluster: TestCluster,
    op: Operator,
    s3: aws_sdk_s3::Client,
}

/// moto with the state bucket (and the lock table when `with_table`), a LockSource on the
/// bucket (and the table), and an operator.
async fn env(with_table: bool, prefix: &str) -> Env {
    let moto = DynamoServer::moto();
    assert_eq!(http_request("PUT", &format!("{}/{BUCKET}", moto.url()), ""), 200, "state bucket");
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    for ns in [NS, RUNNERS] {
        cluster.create_namespace(ns).await;
    }
    let mut spec = json!({
        "s3": {"bucket": BUCKET, "prefix": prefix, "region": "us-east-1", "endpoint": moto.url()},
        "sync": {"mode": "Scan", "interval": "1s"},
        "holders": {"namespaces": [RUNNERS], "hostnamePattern": "atlantis-[0-9]+"},
        "expiry": {"mode": "Release", "gracePeriod": "0s", "staleAfter": "1h", "skewTolerance": "2s"}
    });
    if with_table {
        moto.create_lock_table(TABLE).await;
        spec["dynamodb"] = json!({"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url()});
    }
    cluster.create_lock_source(NS, "state-bucket", spec).await;
    let op = Operator::start(&cluster);
    let s3 = s3_client(&moto.url()).await;
    Env { moto, cluster, op, s3 }
}

async fn runner_pod(cluster: &TestCluster, name: &str) {
    let api: Api<Pod> = Api::namespaced(cluster.client(), RUNNERS);
    let pod: Pod =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "atlantis", "image": "atlantis"}]}}))
            .expect("pod");
    let pod = api.create(&PostParams::default(), &pod).await.expect("create pod");
    let started = pod.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    let status = json!({"status": {"phase": "Running", "containerStatuses": [{"name": "atlantis", "ready": true, "restartCount": 0, "image": "atlantis", "imageID": "", "state": {"running": {"startedAt": started}}}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.expect("pod status");
}

async fn lock_file(s3: &aws_sdk_s3::Client, key: &str) -> Option<String> {
    match s3.get_object().bucket(BUCKET).key(key).send().await {
        Ok(o) => Some(String::from_utf8(o.body.collect().await.expect("body").into_bytes().to_vec()).expect("utf-8")),
        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => None,
        Err(e) => panic!("GetObject {key}: {e:?}"),
    }
}

async fn lock_item(db: &aws_sdk_dynamodb::Client, lock_id: &str) -> Option<String> {
    let r =
        db.get_item().table_name(TABLE).key("LockID", AttributeValue::S(lock_id.into())).consistent_read(true).send().await.expect("get");
    r.item.and_then(|i| i.get("Info").and_then(|v| v.as_s().ok()).cloned())
}

async fn state_lock(cluster: &TestCluster, lock_id: &str) -> Option<StateLock> {
    Api::<StateLock>::namespaced(cluster.client(), NS).get_opt(&state_lock_name(lock_id)).await.expect("get")
}

async fn events_on(cluster: &TestCluster, lock_id: &str) -> Vec<(String, String)> {
    let name = state_lock_name(lock_id);
    Api::<Event>::namespaced(cluster.client(), NS)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

fn workdir(e: &Env, tf: &Terraform, name: &str, key: &str, table: Option<&str>) -> std::path::PathBuf {
    let dir = e.cluster.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let config = format!(
        "{}\nvariable \"v\" {{\n  default = \"a\"\n}}\noutput \"v\" {{\n  value = var.v\n}}\n",
        tf.backend_lockfile(&e.moto.url(), key, table)
    );
    std::fs::write(dir.join("main.tf"), config).expect("main.tf");
    dir
}

/// How runner A's pod shows that A is dead.
#[derive(Clone, Copy, Debug)]
enum Death {
    PodDeleted,
    PodFailed,
    ContainerRestarted,
}

/// Runner A (pod atlantis-0) holds the lock at its approval prompt and is killed with SIGKILL;
/// its pod is then deleted. The lock (file, and item with a table) is released on that evidence,
/// exactly once, and runner B (pod atlantis-1) applies with locking on.
async fn sigkill_then_pod_deleted(tf: Terraform, with_table: bool, workspace: Option<&str>) {
    sigkill_then(tf, with_table, workspace, Death::PodDeleted).await;
}

/// [`sigkill_then_pod_deleted`] with the evidence `death`.
async fn sigkill_then(tf: Terraform, with_table: bool, workspace: Option<&str>, death: Death) {
    let e = env(with_table, "").await;
    runner_pod(&e.cluster, "atlantis-0").await;
    runner_pod(&e.cluster, "atlantis-1").await;
    let key = "app/terraform.tfstate";
    let table = with_table.then_some(TABLE);
    let (dir_a, dir_b) = (workdir(&e, &tf, "runner-a", key, table), workdir(&e, &tf, "runner-b", key, table));
    for (dir, host) in [(&dir_a, "atlantis-0"), (&dir_b, "atlantis-1")] {
        let init = tf.command(dir, host, &["init", "-input=false", "-no-color"]).output().expect("init");
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        if let Some(ws) = workspace {
            let new = tf.command(dir, host, &["workspace", "select", "-or-create", "-no-color", ws]).output().expect("workspace");
            assert!(new.status.success(), "{}", String::from_utf8_lossy(&new.stderr));
        }
    }
    let (state_key, lock_id) = match workspace {
        Some(ws) => (format!("env:/{ws}/{key}"), format!("{BUCKET}/env:/{ws}/{key}")),
        None => (key.to_owned(), format!("{BUCKET}/{key}")),
    };
    let file_key = format!("{state_key}.tflock");
    let mut a = tf
        .command(&dir_a, "atlantis-0", &["apply", "-no-color", "-var", "v=a2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("apply A");
    let lock = eventually(Duration::from_secs(60), "A's lock mirrored and judged Alive", || async {
        state_lock(&e.cluster, &lock_id)
            .await
            .filter(|l| l.status.as_ref().and_then(|s| s.holder.as_ref()).is_some_and(|h| h.state == HolderState::Alive))
    })
    .await;
    let held = lock_file(&e.s3, &file_key).await.expect("A holds the lock file");
    assert!(held.contains("root@atlantis-0"), "{held}");
    let expected_parts: &[StoreKind] = if with_table { &[StoreKind::S3, StoreKind::DynamoDB] } else { &[StoreKind::S3] };
    assert_eq!(lock.spec.stored_in, expected_parts, "one StateLock, its parts named");
    assert_eq!(lock.spec.lock_info.who.as_deref(), Some("root@atlantis-0"));
    let db = e.moto.dynamodb().await;
    if with_table {
        assert_eq!(lock_item(&db, &lock_id).await.as_deref(), Some(held.as_str()), "Terraform writes the same Info to both parts");
    }
    let statelocks = Api::<StateLock>::namespaced(e.cluster.client(), NS).list(&ListParams::default()).await.expect("list").items;
    assert_eq!(statelocks.len(), 1, "one StateLock per state lock: {:?}", statelocks.iter().map(|l| l.name_any()).collect::<Vec<_>>());

    let pgid = a.id();
    assert!(std::process::Command::new("kill").args(["-9", "--", &format!("-{pgid}")]).status().expect("kill").success());
    let _ = a.wait();
    // The process is gone but its pod is not: the lock stands, B is blocked.
    let blocked = tf.command(&dir_b, "atlantis-1", &["apply", "-no-color", "-auto-approve", "-var", "v=b"]).output().expect("apply B");
    assert!(!blocked.status.success(), "B must be blocked while A's lock stands");
    assert_eq!(lock_file(&e.s3, &file_key).await.as_deref(), Some(held.as_str()), "a stale lock whose pod lives is kept");

    let pods = Api::<Pod>::namespaced(e.cluster.client(), RUNNERS);
    match death {
        Death::PodDeleted => pods.delete("atlantis-0", &DeleteParams::default()).await.map(|_| ()).expect("delete pod"),
        Death::PodFailed => pods
            .patch_status("atlantis-0", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Failed"}})))
            .await
            .map(|_| ())
            .expect("fail pod"),
        Death::ContainerRestarted => {
            // A restart counts only once the lock is older than the skew tolerance (2 s here).
            let created = lock.spec.lock_info.created.clone().unwrap_or_default();
            let created = created.parse::<k8s_openapi::jiff::Timestamp>().expect("created");
            eventually(Duration::from_secs(15), "the lock to be older than the skew tolerance", || async {
                (k8s_openapi::jiff::Timestamp::now().duration_since(created).as_secs() > 3).then_some(())
            })
            .await;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = json!({"status": {"containerStatuses": [{"name": "atlantis", "ready": true, "restartCount": 1, "image": "atlantis", "imageID": "", "state": {"running": {"startedAt": now}}}]}});
            pods.patch_status("atlantis-0", &PatchParams::default(), &Patch::Merge(status)).await.expect("restart");
        }
    }
    eventually(Duration::from_secs(30), "the lock file released", || async { lock_file(&e.s3, &file_key).await.is_none().then_some(()) })
        .await;
    if with_table {
        eventually(Duration::from_secs(30), "the DynamoDB part released too", || async {
            lock_item(&db, &lock_id).await.is_none().then_some(())
        })
        .await;
    }
    let events = eventually(Duration::from_secs(15), "a LockExpired event", || async {
        let ev = events_on(&e.cluster, &lock_id).await;
        ev.iter().any(|(r, _)| r == "LockExpired").then_some(ev)
    })
    .await;
    let (_, note) = events.iter().find(|(r, _)| r == "LockExpired").expect("LockExpired");
    let expected = match death {
        Death::PodDeleted => "no longer exists",
        Death::PodFailed => "has phase Failed",
        Death::ContainerRestarted => "started",
    };
    assert!(note.contains(expected), "{death:?}: the release rests on that evidence: {note}");
    if with_table {
        assert!(note.contains("lock file and DynamoDB item released"), "both parts named: {note}");
    }
    assert!(!events.iter().any(|(r, _)| r == "LockPartiallyReleased" || r == "ReleaseSkipped"), "{events:?}");
    let ok = tf.command(&dir_b, "atlantis-1", &["apply", "-no-color", "-auto-approve", "-var", "v=b"]).output().expect("apply B");
    assert!(ok.status.success(), "B applies once the dead holder's lock is released: {}", String::from_utf8_lossy(&ok.stderr));
    eventually(Duration::from_secs(30), "B's lock released by B and its StateLock gone", || async {
        state_lock(&e.cluster, &lock_id).await.is_none().then_some(())
    })
    .await;
    assert_eq!(lock_file(&e.s3, &file_key).await, None);
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_11_plus_lock_file_is_released_when_its_pod_is_deleted() {
    sigkill_then_pod_deleted(Terraform::modern(), false, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_15_lock_file_in_a_workspace_is_released_when_its_pod_is_deleted() {
    sigkill_then_pod_deleted(Terraform::v1_15(), false, Some("staging")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_11_plus_lock_file_is_released_when_its_pod_failed() {
    sigkill_then(Terraform::modern(), false, None, Death::PodFailed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_11_plus_lock_file_is_released_when_its_container_restarted() {
    sigkill_then(Terraform::modern(), false, None, Death::ContainerRestarted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_with_lock_file_and_dynamodb_is_one_state_lock_and_both_parts_are_released() {
    sigkill_then_pod_deleted(Terraform::modern(), true, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_15_with_lock_file_and_dynamodb_releases_both_parts() {
    sigkill_then_pod_deleted(Terraform::v1_15(), true, None).await;
}

/// A lock file re-taken between the judgement (the ETag read) and the delete survives: the
/// delete is conditioned on the ETag judged.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_file_retaken_after_it_was_read_survives_the_release() {
    let moto = DynamoServer::moto();
    assert_eq!(http_request("PUT", &format!("{}/{BUCKET}", moto.url()), ""), 200, "state bucket");
    let s3 = s3_client(&moto.url()).await;
    let store = S3Store { client: s3.clone(), bucket: BUCKET.into(), prefix: "app/".into(), if_match: Default::default() };
    let (lock_id, key) = (format!("{BUCKET}/app/terraform.tfstate"), "app/terraform.tfstate.tflock");
    let put = |info: String| {
        let s3 = s3.clone();
        async move { s3.put_object().bucket(BUCKET).key(key).body(info.into_bytes().into()).send().await.expect("put") }
    };
    let old = terraform_info("11111111-0000-0000-0000-000000000000", "root@atlantis-0", &lock_id, "2026-01-01T00:00:00Z");
    put(old.clone()).await;
    let judged = store.read(&lock_id).await.expect("read").expect("a lock file");
    assert_eq!(judged.record.info.id.as_deref(), Some("11111111-0000-0000-0000-000000000000"));
    // The holder releases; another runner takes the lock before statelock's delete.
    s3.delete_object().bucket(BUCKET).key(key).send().await.expect("release");
    let new = terraform_info("22222222-0000-0000-0000-000000000000", "root@atlantis-1", &lock_id, "2026-01-01T00:00:05Z");
    put(new.clone()).await;
    assert_eq!(store.release(&lock_id, &judged).await.expect("release"), ReleaseOutcome::HeldByAnother);
    assert_eq!(lock_file(&s3, key).await.as_deref(), Some(new.as_str()), "the new holder's lock survives");
    // The current file, read afresh, is released exactly once. (Equal bodies have equal ETags, so
    // If-Match cannot tell a rewrite of the same bytes apart; those bytes are the same lock
    // instance, since Terraform's lock IDs are random UUIDs.)
    let current = store.read(&lock_id).await.expect("read").expect("a lock file");
    assert_eq!(store.release(&lock_id, &current).await.expect("release"), ReleaseOutcome::Released);
    assert_eq!(store.release(&lock_id, &current).await.expect("release"), ReleaseOutcome::AlreadyGone);
    assert_eq!(store.if_match.get(), Some(&true), "the endpoint was probed and honours If-Match");
    // Not a lock file of this bucket, or outside the prefix: nothing is read or released.
    assert!(store.read("other-bucket/app/terraform.tfstate").await.expect("read").is_none());
    put(old.clone()).await;
    let outside = format!("{BUCKET}/team-b/terraform.tfstate");
    s3.put_object().bucket(BUCKET).key("team-b/terraform.tfstate.tflock").body(old.clone().into_bytes().into()).send().await.expect("put");
    assert!(!store.covers(&outside) && store.read(&outside).await.expect("read").is_none());
    let forged = statelock::lock_store::HeldPart {
        kind: StoreKind::S3,
        record: statelock::lock_record::LockRecord::from_info(outside.clone(), &old),
        condition: current.condition.clone(),
        is_lock: true,
    };
    assert_eq!(store.release(&outside, &forged).await.expect("release"), ReleaseOutcome::HeldByAnother);
    assert!(lock_file(&s3, "team-b/terraform.tfstate.tflock").await.is_some(), "a lock file outside the prefix is never deleted");
}

/// A bucket with thousands of state objects and a few lock files (one malformed, one too big):
/// only lock files are read, each once while its ETag stays the same; the malformed ones are
/// shown with InfoValid=False; a released file's StateLock goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_big_bucket_is_listed_and_only_its_lock_files_are_read_once() {
    let e = env(false, "").await;
    let put = |key: String, body: Vec<u8>| {
        let s3 = e.s3.clone();
        async move {
            s3.put_object().bucket(BUCKET).key(key).body(body.into()).send().await.expect("put");
        }
    };
    // Eight at a time: moto serves requests one by one.
    futures::StreamExt::for_each_concurrent(futures::stream::iter(0..2500), 8, |i| {
        put(format!("team-{}/stack-{i}/terraform.tfstate", i % 7), b"{\"version\":4}".to_vec())
    })
    .await;
    let ids: Vec<String> = (0..3).map(|i| format!("{BUCKET}/team-{i}/stack-{i}/terraform.tfstate")).collect();
    for (i, id) in ids.iter().enumerate() {
        let info = terraform_info(&format!("0000000{i}-aaaa-bbbb-cccc-dddddddddddd"), "laptop@ws", id, "2026-01-01T00:00:00Z");
        put(format!("{}.tflock", id.strip_prefix("tfstate/").expect("in the bucket")), info.into_bytes()).await;
    }
    let malformed = format!("{BUCKET}/broken/terraform.tfstate");
    put("broken/terraform.tfstate.tflock".into(), b"{\"ID\": 42, <script>".to_vec()).await;
    let huge = format!("{BUCKET}/huge/terraform.tfstate");
    put("huge/terraform.tfstate.tflock".into(), vec![b'x'; 200 * 1024]).await;

    let all: Vec<String> = ids.iter().chain([&malformed, &huge]).cloned().collect();
    eventually(Duration::from_secs(60), "five StateLocks", || async {
        let mut n = 0;
        for id in &all {
            n += usize::from(state_lock(&e.cluster, id).await.is_some());
        }
        (n == 5).then_some(())
    })
    .await;
    for id in [&malformed, &huge] {
        let l = state_lock(&e.cluster, id).await.expect("shown");
        let valid = l
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "InfoValid"))
            .map(|c| (c.status.clone(), c.message.clone()));
        assert!(matches!(&valid, Some((s, _)) if s == "False"), "{id}: {valid:?}");
        assert_eq!(l.spec.stored_in, [StoreKind::S3]);
    }
    let huge_msg = state_lock(&e.cluster, &huge)
        .await
        .and_then(|l| l.status)
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "InfoValid"))
        .map(|c| c.message)
        .unwrap_or_default();
    assert!(huge_msg.contains("bytes"), "the size is the reason: {huge_msg}");
    let gets = |m: &str| metric(m, &format!("statelock_s3_requests_total{{namespace=\"{NS}\",source=\"state-bucket\",request=\"GET\"}}"));
    let lists = |m: &str| metric(m, &format!("statelock_s3_requests_total{{namespace=\"{NS}\",source=\"state-bucket\",request=\"LIST\"}}"));
    // Several more passes: the listing repeats (three pages per pass), the reads do not.
    let first = e.op.metrics();
    let lists_before = lists(&first).expect("LIST counted");
    eventually(Duration::from_secs(60), "three more passes", || async { (lists(&e.op.metrics())? >= lists_before + 9.0).then_some(()) })
        .await;
    let later = e.op.metrics();
    assert_eq!(gets(&later), Some(4.0), "each small lock file read once (the huge one never), no state object ever: {later}");

    // A released file's StateLock goes; the others stay.
    e.s3.delete_object().bucket(BUCKET).key("team-0/stack-0/terraform.tfstate.tflock").send().await.expect("delete");
    eventually(Duration::from_secs(30), "the released lock's StateLock gone", || async {
        state_lock(&e.cluster, &ids[0]).await.is_none().then_some(())
    })
    .await;
    assert!(state_lock(&e.cluster, &ids[1]).await.is_some());
    e.op.stop().await;
}

/// The state bucket sends its lock files' events to a queue (moto delivers S3 Event
/// Notifications to SQS): after one listing, locks appear and go through events alone (no
/// further LIST), garbage on the queue is deleted without holding anything up, and a bucket that
/// does not send its events there is found out and listed every pass instead.
#[tokio::test(flavor = "multi_thread")]
async fn event_mode_follows_the_queue_and_lists_only_as_a_safety_net() {
    use aws_sdk_s3::types::{
        Event as S3Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter, QueueConfiguration,
        S3KeyFilter,
    };
    let moto = DynamoServer::moto();
    assert_eq!(http_request("PUT", &format!("{}/{BUCKET}", moto.url()), ""), 200, "state bucket");
    let sqs = common::sqs_client(&moto.url()).await;
    let s3 = s3_client(&moto.url()).await;
    let queue_url = sqs.create_queue().queue_name("statelock-tfstate").send().await.expect("queue").queue_url.expect("url");
    // The bucket sends the queue created lock files but not removed ones: found out, and listed
    // every pass.
    let arn = "arn:aws:sqs:us-east-1:123456789012:statelock-tfstate";
    let rule = |events: &[&str]| {
        let mut b = QueueConfiguration::builder().queue_arn(arn).filter(
            NotificationConfigurationFilter::builder()
                .key(
                    S3KeyFilter::builder()
                        .filter_rules(FilterRule::builder().name(FilterRuleName::Suffix).value(".tflock").build())
                        .build(),
                )
                .build(),
        );
        for e in events {
            b = b.events(S3Event::from(*e));
        }
        b.build().expect("queue configuration")
    };
    let configure = |events: &'static [&'static str]| {
        let s3 = s3.clone();
        let rule = rule(events);
        async move {
            s3.put_bucket_notification_configuration()
                .bucket(BUCKET)
                .notification_configuration(NotificationConfiguration::builder().queue_configurations(rule).build())
                .send()
                .await
                .expect("notification configuration");
        }
    };
    configure(&["s3:ObjectCreated:*"]).await;
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    for ns in [NS, RUNNERS] {
        cluster.create_namespace(ns).await;
    }
    let spec = json!({
        "s3": {"bucket": BUCKET, "region": "us-east-1", "endpoint": moto.url(), "events": {"queueUrl": queue_url, "resyncInterval": "1h"}},
        "sync": {"mode": "Scan", "interval": "1s"},
        "holders": {"namespaces": [RUNNERS], "hostnamePattern": "atlantis-[0-9]+"},
    });
    cluster.create_lock_source(NS, "state-bucket", spec).await;
    let op = Operator::start(&cluster);
    let ready = |want: &'static str| {
        let client = cluster.client();
        async move {
            let src = Api::<statelock::crd::LockSource>::namespaced(client, NS).get("state-bucket").await.expect("LockSource");
            let c = src.status.and_then(|s| s.conditions.into_iter().next())?;
            (c.reason == want).then_some(c.message)
        }
    };
    let why = eventually(Duration::from_secs(30), "ListingFallback", || ready("ListingFallback")).await;
    assert!(why.contains("sends no s3:ObjectRemoved events"), "{why}");
    configure(&["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]).await;
    eventually(Duration::from_secs(30), "Synced once the bucket sends to the queue", || ready("Synced")).await;
    let lists = || metric(&op.metrics(), "statelock_s3_requests_total{namespace=\"terraform\",source=\"state-bucket\",request=\"LIST\"}");
    let lists_before = lists();
    assert!(lists_before >= Some(1.0));

    // A real Terraform's lock file appears and goes through events alone.
    let tf = Terraform::modern();
    let dir = e_dir(&cluster, &tf, &moto.url(), "events/terraform.tfstate");
    let init = tf.command(&dir, "atlantis-0", &["init", "-input=false", "-no-color"]).output().expect("init");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut apply = tf
        .command(&dir, "atlantis-0", &["apply", "-no-color", "-var", "v=b"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("apply");
    let lock_id = format!("{BUCKET}/events/terraform.tfstate");
    let seen = eventually(Duration::from_secs(30), "the lock file's StateLock", || state_lock(&cluster, &lock_id)).await;
    assert_eq!(seen.spec.operation.as_deref(), Some("apply"));
    std::io::Write::write_all(&mut apply.stdin.take().expect("stdin"), b"no\n").expect("answer");
    let _ = apply.wait();
    eventually(Duration::from_secs(30), "the StateLock gone with the file", || async {
        state_lock(&cluster, &lock_id).await.is_none().then_some(())
    })
    .await;

    // Garbage on the queue is deleted and holds nothing up.
    sqs.send_message().queue_url(&queue_url).message_body("not an S3 notification").send().await.expect("send");
    let key = "other/terraform.tfstate.tflock";
    let info = terraform_info(
        "aaaaaaaa-2222-3333-4444-555555555555",
        "root@atlantis-9",
        "tfstate/other/terraform.tfstate",
        "2026-11-30T00:00:00Z",
    );
    s3.put_object().bucket(BUCKET).key(key).body(info.into_bytes().into()).send().await.expect("put");
    let other = format!("{BUCKET}/other/terraform.tfstate");
    eventually(Duration::from_secs(30), "a lock file put after the garbage", || state_lock(&cluster, &other)).await;
    s3.delete_object().bucket(BUCKET).key(key).send().await.expect("delete");
    eventually(Duration::from_secs(30), "its StateLock gone", || async { state_lock(&cluster, &other).await.is_none().then_some(()) })
        .await;
    eventually(Duration::from_secs(30), "the queue emptied (garbage included)", || {
        let sqs = sqs.clone();
        let url = queue_url.clone();
        async move {
            let attrs = sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
                .send()
                .await
                .expect("attributes")
                .attributes
                .unwrap_or_default();
            let n = |k: aws_sdk_sqs::types::QueueAttributeName| attrs.get(&k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
            (n(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages) == 0
                && n(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible) == 0)
                .then_some(())
        }
    })
    .await;
    let m = op.metrics();
    assert_eq!(lists(), lists_before, "no listing: everything came through events\n{m}");
    assert!(
        metric(&m, "statelock_sqs_requests_total{namespace=\"terraform\",source=\"state-bucket\",request=\"DeleteMessageBatch\"}")
            >= Some(3.0),
        "{m}"
    );
    op.stop().await;
}

fn e_dir(cluster: &TestCluster, tf: &Terraform, moto: &str, key: &str) -> std::path::PathBuf {
    let dir = cluster.dir.path().join("events");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = format!(
        "{}\nvariable \"v\" {{\n  default = \"a\"\n}}\noutput \"v\" {{\n  value = var.v\n}}\n",
        tf.backend_lockfile(moto, key, None)
    );
    std::fs::write(dir.join("main.tf"), config).expect("main.tf");
    dir
}

/// A proxy in front of moto's S3 that can hold one ListObjectsV2 request (never answer it): the
/// first page of a listing (`Hold::FirstPage`) or a later one (`Hold::LaterPage`). `held` is
/// notified once it holds one; the hold is then cleared.
struct HoldingProxy {
    url: String,
    hold: std::sync::Arc<std::sync::Mutex<Option<Hold>>>,
    held: std::sync::Arc<tokio::sync::Notify>,
}

#[derive(Clone, Copy, PartialEq)]
enum Hold {
    FirstPage,
    LaterPage,
}

async fn holding_proxy(upstream: u16) -> HoldingProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let hold: std::sync::Arc<std::sync::Mutex<Option<Hold>>> = std::sync::Arc::default();
    let held = std::sync::Arc::new(tokio::sync::Notify::new());
    let (h, n) = (hold.clone(), held.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (hold, held) = (h.clone(), n.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, body)) = common::read_http_request(&mut conn, &mut buf).await {
                    let text = String::from_utf8_lossy(&head).to_string();
                    let line = text.lines().next().unwrap_or_default().to_owned();
                    if line.starts_with("GET ") && line.contains("list-type=2") {
                        let page = if line.contains("continuation-token=") { Hold::LaterPage } else { Hold::FirstPage };
                        let take = {
                            let mut h = hold.lock().expect("hold");
                            let take = *h == Some(page);
                            if take {
                                *h = None;
                            }
                            take
                        };
                        if take {
                            held.notify_one();
                            // Never answered: the caller dies waiting.
                            let mut rest = [0u8; 1];
                            let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut rest).await;
                            return;
                        }
                    }
                    let reply = common::forward_http(upstream, &text, &body)
                        .await
                        .unwrap_or_else(|| b"HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n".to_vec());
                    if tokio::io::AsyncWriteExt::write_all(&mut conn, &reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    HoldingProxy { url, hold, held }
}

/// Operators killed (SIGKILL) in the middle of a listing, first on a later page and then on the
/// first, while lock files come and go: nothing is ever written from a partial listing (no
/// StateLock of a lock file that stayed is ever deleted), and the next operator converges on
/// exactly the lock files there are.
#[tokio::test(flavor = "multi_thread")]
async fn operators_killed_mid_listing_write_nothing_from_it_and_the_next_converges() {
    let moto = DynamoServer::moto();
    assert_eq!(http_request("PUT", &format!("{}/{BUCKET}", moto.url()), ""), 200, "state bucket");
    let s3 = s3_client(&moto.url()).await;
    let put = |key: String, body: Vec<u8>| {
        let s3 = s3.clone();
        async move {
            s3.put_object().bucket(BUCKET).key(key).body(body.into()).send().await.expect("put");
        }
    };
    // 2,500 state objects: a listing is three pages.
    futures::StreamExt::for_each_concurrent(futures::stream::iter(0..2500), 8, |i| {
        put(format!("s{i:04}/terraform.tfstate"), b"{}".to_vec())
    })
    .await;
    let lock = |i: usize| format!("s{i:04}/terraform.tfstate");
    let take = |i: usize| {
        let info = terraform_info(
            &format!("{i:08}-aaaa-bbbb-cccc-dddddddddddd"),
            "root@atlantis-0",
            &format!("{BUCKET}/{}", lock(i)),
            "2026-01-01T00:00:00Z",
        );
        put(format!("{}.tflock", lock(i)), info.into_bytes())
    };
    // Locks on every page: 10 that stay throughout, 10 that are released meanwhile.
    let stay: Vec<usize> = (0..10).map(|k| k * 250 + 3).collect();
    let go: Vec<usize> = (0..10).map(|k| k * 250 + 7).collect();
    let come: Vec<usize> = (0..10).map(|k| k * 250 + 11).collect();
    for i in stay.iter().chain(&go) {
        take(*i).await;
    }
    let upstream: u16 = moto.url().rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let proxy = holding_proxy(upstream).await;
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    cluster
        .create_lock_source(
            NS,
            "state-bucket",
            json!({"s3": {"bucket": BUCKET, "region": "us-east-1", "endpoint": proxy.url}, "sync": {"mode": "Scan", "interval": "1s"}}),
        )
        .await;
    // Every StateLock deletion, by name, from a watch.
    let deleted: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
    let d = deleted.clone();
    let api: Api<StateLock> = Api::namespaced(cluster.client(), NS);
    let watch = tokio::spawn(async move {
        use futures::StreamExt;
        let mut s = kube::runtime::watcher(api, kube::runtime::watcher::Config::default()).boxed();
        while let Some(Ok(ev)) = s.next().await {
            if let kube::runtime::watcher::Event::Delete(o) = ev {
                d.lock().expect("deleted").push(o.name_any());
            }
        }
    });
    let present = |ids: Vec<usize>| {
        let cluster = &cluster;
        async move {
            for i in ids {
                state_lock(cluster, &format!("{BUCKET}/{}", lock(i))).await?;
            }
            Some(())
        }
    };
    let first = Operator::start(&cluster);
    eventually(Duration::from_secs(60), "the first StateLocks", || present(stay.iter().chain(&go).copied().collect())).await;
    // Killed on a later page of a listing while locks change...
    *proxy.hold.lock().expect("hold") = Some(Hold::LaterPage);
    for k in 0..5 {
        s3.delete_object().bucket(BUCKET).key(format!("{}.tflock", lock(go[k]))).send().await.expect("release");
        take(come[k]).await;
    }
    proxy.held.notified().await;
    first.kill().await;
    // ... and the next one on the very first page it asks for, before it has listed anything.
    *proxy.hold.lock().expect("hold") = Some(Hold::FirstPage);
    let second = Operator::start(&cluster);
    proxy.held.notified().await;
    for k in 5..10 {
        s3.delete_object().bucket(BUCKET).key(format!("{}.tflock", lock(go[k]))).send().await.expect("release");
        take(come[k]).await;
    }
    second.kill().await;
    // The last operator converges on exactly the lock files there are.
    let last = Operator::start(&cluster);
    eventually(Duration::from_secs(60), "exactly the lock files there are", || async {
        let names: std::collections::BTreeSet<String> = Api::<StateLock>::namespaced(cluster.client(), NS)
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        let want: std::collections::BTreeSet<String> =
            stay.iter().chain(&come).map(|i| statelock::crd::state_lock_name(&format!("{BUCKET}/{}", lock(*i)))).collect();
        (names == want).then_some(())
    })
    .await;
    let deleted = deleted.lock().expect("deleted").clone();
    for i in &stay {
        let name = state_lock_name(&format!("{BUCKET}/{}", lock(*i)));
        assert!(!deleted.contains(&name), "the StateLock of a lock file that stayed was deleted: {name}; deletions: {deleted:?}");
    }
    watch.abort();
    last.stop().await;
}
