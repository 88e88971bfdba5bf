//! The DynamoDB-compatible gateway with real Terraform in front of moto: locks are recorded with
//! their exact holder at once, contention becomes events and waiters, access is checked.

mod common;

use std::{io::Write, process::Stdio, time::Duration};

use common::{DynamoServer, NetNs, Operator, Terraform, TestCluster, eventually, free_port, http_request};
use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use statelock::crd::{HolderIdentification, StateLock, state_lock_name};

const NS: &str = "terraform";
const TABLE: &str = "tf-locks";
const KEY: &str = "gw/terraform.tfstate";

struct Env {
    moto: DynamoServer,
    cluster: TestCluster,
    op: Operator,
    gateway: String,
}

/// `allow_loopback` admits callers from 127.0.0.1 by source range; `runner_pod` makes a pod own
/// the loopback address, so that the gateway identifies callers as that pod.
async fn env(allow_loopback: bool, runner_pod: bool) -> Env {
    env_backend(allow_loopback, runner_pod, "dynamodb").await
}

async fn env_backend(allow_loopback: bool, runner_pod: bool, backend: &str) -> Env {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    assert_eq!(http_request("PUT", &format!("{}/tfstate", moto.url()), ""), 200, "state bucket");
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    let client = cluster.client();
    cluster.create_namespace(NS).await;
    let ranges: Vec<&str> = if allow_loopback { vec!["127.0.0.1/32"] } else { vec![] };
    cluster.create_lock_source(NS, "tf-locks", json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url()}, "sync": {"mode": "Scan", "interval": "1s"}, "gateway": {"allowedSourceRanges": ranges}})).await;
    if runner_pod {
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": "atlantis-0"}, "spec": {"containers": [{"name": "atlantis", "image": "atlantis"}]}}),
        )
        .expect("pod");
        pods.create(&PostParams::default(), &pod).await.expect("pod");
        pods.patch_status(
            "atlantis-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}})),
        )
        .await
        .expect("status");
    }
    let port = free_port();
    let mut cmd = common::statelock_command();
    cmd.env("STATELOCK_GATEWAY_ADDR", format!("127.0.0.1:{port}"))
        .env("STATELOCK_GATEWAY_BACKEND", backend)
        .env("STATELOCK_GATEWAY_WAITER_TIMEOUT", "10s");
    let op = Operator::start_with(&cluster, cmd);
    let gateway = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "the gateway to listen", || {
        let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        async move { ok.then_some(()) }
    })
    .await;
    Env { moto, cluster, op, gateway }
}

fn workdir(e: &Env, tf: &Terraform, name: &str) -> std::path::PathBuf {
    let dir = e.cluster.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let backend = tf.backend_with(&e.moto.url(), &e.gateway, KEY, TABLE);
    std::fs::write(
        dir.join("main.tf"),
        format!("{backend}\nvariable \"v\" {{\n  default = \"a\"\n}}\noutput \"v\" {{\n  value = var.v\n}}\n"),
    )
    .expect("main.tf");
    let init = tf.command(&dir, "atlantis-0", &["init", "-input=false", "-no-color"]).output().expect("init");
    assert!(init.status.success(), "init through the gateway ({}): {}", tf.version, String::from_utf8_lossy(&init.stderr));
    dir
}

async fn lock_object(cluster: &TestCluster) -> Option<StateLock> {
    Api::<StateLock>::namespaced(cluster.client(), NS).get_opt(&state_lock_name(&format!("tfstate/{KEY}"))).await.expect("get")
}

async fn events(cluster: &TestCluster, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(cluster.client(), NS)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

async fn lock_and_unlock_through_the_gateway(tf: Terraform) {
    let e = env(true, true).await;
    let dir = workdir(&e, &tf, "a");
    let mut apply = tf
        .command(&dir, "atlantis-0", &["apply", "-no-color", "-var", "v=b"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("apply");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let lock = loop {
        if let Some(l) = lock_object(&e.cluster).await.filter(|l| {
            l.status.as_ref().and_then(|s| s.holder.as_ref()).is_some_and(|h| h.identified_by == Some(HolderIdentification::Gateway))
        }) {
            break l;
        }
        if std::time::Instant::now() > deadline || matches!(apply.try_wait(), Ok(Some(_))) {
            let _ = apply.kill();
            let out = apply.wait_with_output().expect("output");
            let lock = lock_object(&e.cluster).await;
            panic!(
                "no StateLock with the gateway's holder ({}): {lock:?}\n{}\n{}",
                tf.version,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = lock.status.expect("status");
    let seen = status.gateway_holder.expect("the gateway's record");
    assert_eq!((seen.namespace.as_str(), seen.pod.as_str()), (NS, "atlantis-0"), "the exact pod, from the caller's address");
    let holder = status.holder.expect("holder");
    assert_eq!(
        (holder.namespace.as_deref(), holder.pod.as_deref(), holder.uid.as_deref()),
        (Some(NS), Some("atlantis-0"), Some(seen.uid.as_str()))
    );
    apply.stdin.take().expect("stdin").write_all(b"no\n").expect("answer");
    let out = apply.wait_with_output().expect("apply ends");
    assert!(out.status.code() == Some(1), "apply cancelled");
    eventually(Duration::from_secs(10), "the StateLock removed at once", || async {
        lock_object(&e.cluster).await.is_none().then_some(())
    })
    .await;
    assert!(!events(&e.cluster, "LockAcquired").await.is_empty());
    assert!(!events(&e.cluster, "LockReleased").await.is_empty());
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_11_plus_locks_and_unlocks_through_endpoints_dynamodb() {
    lock_and_unlock_through_the_gateway(Terraform::modern()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_0_locks_and_unlocks_through_dynamodb_endpoint() {
    lock_and_unlock_through_the_gateway(Terraform::v1_0()).await;
}

/// What the Atlantis guide tells users to do: the gateway is set for the backend only
/// (`-backend-config`, never `AWS_ENDPOINT_URL_DYNAMODB` on the whole runner), so the lock goes
/// through the gateway while a DynamoDB call made the way the AWS provider makes it, from the same
/// runner during the same apply, reaches DynamoDB directly (the gateway would refuse it).
async fn the_backend_alone_uses_the_gateway(tf: Terraform) {
    let e = env(true, true).await;
    let dir = e.cluster.dir.path().join("backend-only");
    std::fs::create_dir_all(&dir).expect("dir");
    // The runner's environment stands for AWS itself: every AWS call the runner makes resolves
    // its endpoint through it (moto here, AWS in production), as the AWS provider does.
    let runner_env = [
        ("AWS_ENDPOINT_URL", e.moto.url()),
        ("AWS_ACCESS_KEY_ID", "AKIAFAKE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "fake".to_owned()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
    ];
    let (backend, backend_config) = if tf.is_legacy() {
        // Terraform 1.0 - 1.10: `dynamodb_endpoint`, which `-backend-config` can set as key=value.
        let block: String = tf
            .backend_with(&e.moto.url(), "unused", KEY, TABLE)
            .lines()
            .filter(|l| !l.contains("dynamodb_endpoint"))
            .map(|l| format!("{l}\n"))
            .collect();
        (block, format!("-backend-config=dynamodb_endpoint={}", e.gateway))
    } else {
        // Terraform 1.11+: `endpoints`, an object, from a file. The S3 endpoint comes from the
        // environment like every other AWS call's (a file's `endpoints` replaces the block's whole).
        let block = format!(
            "terraform {{\n  backend \"s3\" {{\n    bucket = \"tfstate\"\n    key = \"{KEY}\"\n    region = \"us-east-1\"\n    dynamodb_table = \"{TABLE}\"\n    access_key = \"AKIAFAKE\"\n    secret_key = \"fake\"\n    use_path_style = true\n    skip_credentials_validation = true\n    skip_requesting_account_id = true\n    skip_metadata_api_check = true\n  }}\n}}\n"
        );
        std::fs::write(dir.join("statelock-gateway.s3.tfbackend"), format!("endpoints = {{ dynamodb = \"{}\" }}\n", e.gateway))
            .expect("tfbackend");
        (block, "-backend-config=statelock-gateway.s3.tfbackend".to_owned())
    };
    std::fs::write(
        dir.join("main.tf"),
        format!("{backend}\nvariable \"v\" {{\n  default = \"a\"\n}}\noutput \"v\" {{\n  value = var.v\n}}\n"),
    )
    .expect("main.tf");
    let mut init = tf.command(&dir, "atlantis-0", &["init", "-input=false", "-no-color", &backend_config]);
    let init = init.envs(runner_env.clone()).output().expect("init");
    assert!(init.status.success(), "init ({}): {}", tf.version, String::from_utf8_lossy(&init.stderr));
    // The apply holds the lock while it waits for its answer.
    let mut apply = tf.command(&dir, "atlantis-0", &["apply", "-no-color", "-var", "v=b"]);
    let mut apply =
        apply.envs(runner_env.clone()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("apply");
    let lock = eventually(Duration::from_secs(60), "the lock recorded by the gateway", || {
        let ended = matches!(apply.try_wait(), Ok(Some(_)));
        let cluster = &e.cluster;
        async move {
            if ended {
                return Some(None);
            }
            let by_gateway = lock_object(cluster).await.filter(|l| {
                l.status.as_ref().and_then(|s| s.holder.as_ref()).is_some_and(|h| h.identified_by == Some(HolderIdentification::Gateway))
            });
            by_gateway.map(Some)
        }
    })
    .await;
    let Some(lock) = lock else {
        let out = apply.wait_with_output().expect("output");
        panic!(
            "apply ended before its lock was seen ({}): {}{}",
            tf.version,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    assert_eq!(
        lock.status.and_then(|s| s.gateway_holder).map(|g| g.pod),
        Some("atlantis-0".to_owned()),
        "the lock went through the gateway"
    );
    // Meanwhile the runner manages a DynamoDB table the way the AWS provider would: an AWS SDK
    // resolving its endpoint from the runner's environment. It reaches DynamoDB itself.
    let provider_call = "import boto3\n\
        c = boto3.client('dynamodb')\n\
        c.create_table(TableName='app-data', KeySchema=[{'AttributeName': 'id', 'KeyType': 'HASH'}], \
        AttributeDefinitions=[{'AttributeName': 'id', 'AttributeType': 'S'}], BillingMode='PAY_PER_REQUEST')\n\
        c.put_item(TableName='app-data', Item={'id': {'S': 'written-by-the-runner'}})\n";
    let call = common::python_tool("python").args(["-c", provider_call]).envs(runner_env).current_dir(&dir).output().expect("python");
    assert!(call.status.success(), "the provider-style calls succeed: {}", String::from_utf8_lossy(&call.stderr));
    let item = e
        .moto
        .dynamodb()
        .await
        .get_item()
        .table_name("app-data")
        .key("id", aws_sdk_dynamodb::types::AttributeValue::S("written-by-the-runner".into()))
        .send()
        .await
        .expect("the runner's table exists in DynamoDB");
    assert!(item.item.is_some(), "the runner's item is in DynamoDB");
    apply.stdin.take().expect("stdin").write_all(b"yes\n").expect("answer");
    let out = apply.wait_with_output().expect("apply ends");
    assert!(
        out.status.success(),
        "apply ({}): {}{}",
        tf.version,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(10), "the StateLock removed at once", || async {
        lock_object(&e.cluster).await.is_none().then_some(())
    })
    .await;
    // The gateway saw the lock's calls and nothing else: no CreateTable, no foreign PutItem.
    let m = e.op.metrics();
    assert!(common::metric(&m, "statelock_gateway_requests_total{operation=\"PutItem\",result=\"ok\"}") >= Some(1.0), "{m}");
    let seen: Vec<&str> = m.lines().filter(|l| l.starts_with("statelock_gateway_requests_total{")).collect();
    assert!(
        seen.iter().all(|l| !l.contains("operation=\"unknown\"") && l.contains("result=\"ok\"")),
        "only the lock's calls, all served, reached the gateway: {seen:?}"
    );
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_11_plus_backend_config_file_sends_only_the_lock_to_the_gateway() {
    the_backend_alone_uses_the_gateway(Terraform::modern()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn terraform_1_0_backend_config_sends_only_the_lock_to_the_gateway() {
    the_backend_alone_uses_the_gateway(Terraform::v1_0()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn contention_becomes_a_counted_event_series_and_a_waiter_in_status() {
    let e = env(true, true).await;
    let tf = Terraform::modern();
    let a = workdir(&e, &tf, "a");
    let b = workdir(&e, &tf, "b");
    let mut holder = tf
        .command(&a, "atlantis-0", &["apply", "-no-color", "-var", "v=b"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("apply A");
    eventually(Duration::from_secs(30), "A's lock", || async { lock_object(&e.cluster).await }).await;
    // B retries for 4 s (attempts at about 0, 1 and 3 s), then gives up.
    let waiter = tf.command(&b, "atlantis-1", &["plan", "-no-color", "-lock-timeout=4s"]).output().expect("plan B");
    assert!(!waiter.status.success(), "B cannot take a held lock");
    let text = String::from_utf8_lossy(&waiter.stderr);
    assert!(text.contains("ConditionalCheckFailedException"), "Terraform parsed DynamoDB's error from the gateway: {text}");
    let lock = eventually(Duration::from_secs(10), "the waiter in status", || async {
        lock_object(&e.cluster).await.filter(|l| {
            l.status.as_ref().and_then(|s| s.contention.as_ref()).is_some_and(|c| c.waiters.first().is_some_and(|w| w.attempts >= 2))
        })
    })
    .await;
    let contention = lock.status.and_then(|s| s.contention).expect("contention");
    assert_eq!(contention.waiter_count, 1);
    assert_eq!(contention.waiters[0].who.as_deref(), Some("root@atlantis-1"));
    let contended = eventually(Duration::from_secs(10), "LockContended", || async {
        let ev = events(&e.cluster, "LockContended").await;
        ev.into_iter().find(|x| x.series.as_ref().is_some_and(|s| s.count >= 2))
    })
    .await;
    let note = contended.note.unwrap_or_default();
    assert!(note.contains("root@atlantis-1") && note.contains("root@atlantis-0"), "the event names both sides: {note}");
    // B stopped retrying: after the waiter timeout (10 s here) it is no longer listed, and its
    // wait counts as given up.
    eventually(Duration::from_secs(30), "the waiter that gave up to leave status", || async {
        lock_object(&e.cluster).await.filter(|l| l.status.as_ref().and_then(|s| s.contention.as_ref()).is_some_and(|c| c.waiter_count == 0))
    })
    .await;
    let m = e.op.metrics();
    assert_eq!(common::metric(&m, "statelock_gateway_lock_wait_seconds_count{outcome=\"gave_up\"}"), Some(1.0), "{m}");
    assert!(common::metric(&m, "statelock_gateway_lock_attempts_total{result=\"contended\"}") >= Some(2.0), "{m}");
    assert_eq!(common::metric(&m, "statelock_gateway_waiters"), Some(0.0), "{m}");
    holder.stdin.take().expect("stdin").write_all(b"no\n").expect("answer");
    let _ = holder.wait();
    let ok = tf.command(&b, "atlantis-1", &["plan", "-no-color", "-lock-timeout=20s"]).output().expect("plan B again");
    assert!(ok.status.success(), "B proceeds once A is done: {}", String::from_utf8_lossy(&ok.stderr));
    e.op.stop().await;
}

/// Two runners with the same hostname (so `Who` cannot tell them apart) in their own network
/// namespaces: the gateway tells them apart by their real source addresses.
#[tokio::test(flavor = "multi_thread")]
async fn runners_are_told_apart_by_their_source_addresses() {
    let (na, nb) = (NetNs::create(1), NetNs::create(2));
    let moto = DynamoServer::moto_at(&na.host_addr, free_port());
    moto.create_lock_table(TABLE).await;
    assert_eq!(http_request("PUT", &format!("{}/tfstate", moto.url()), ""), 200, "state bucket");
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    // Only pods of this namespace may use the table (the default); no source ranges.
    cluster.create_lock_source(NS, "tf-locks", json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url()}, "sync": {"mode": "Scan", "interval": "1s"}})).await;
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let mut uids = Vec::new();
    for (name, ip) in [("runner-a", &na.addr), ("runner-b", &nb.addr)] {
        // Both pods set the same spec.hostname: Who cannot tell them apart, the address can.
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"hostname": "runner", "containers": [{"name": "tf", "image": "tf"}]}}),
        )
        .expect("pod");
        let created = pods.create(&PostParams::default(), &pod).await.expect("pod");
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})),
        )
        .await
        .expect("status");
        uids.push(created.metadata.uid.expect("uid"));
    }
    let port = free_port();
    let mut cmd = common::statelock_command();
    cmd.env("STATELOCK_GATEWAY_ADDR", format!("{}:{port}", na.host_addr)).env("STATELOCK_ALLOWED_ENDPOINTS", moto.url());
    let op = Operator::start_with(&cluster, cmd);
    let gateway = format!("http://{}:{port}", na.host_addr);
    let addr = format!("{}:{port}", na.host_addr);
    eventually(Duration::from_secs(30), "the gateway to listen", || {
        let ok = std::net::TcpStream::connect(&addr).is_ok();
        async move { ok.then_some(()) }
    })
    .await;
    let tf = Terraform::modern();
    let dir = |name: &str, ns: &NetNs| {
        let dir = cluster.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("main.tf"),
            format!("{}\noutput \"v\" {{\n  value = \"{name}\"\n}}\n", tf.backend_with(&moto.url(), &gateway, KEY, TABLE)),
        )
        .expect("main.tf");
        let init = tf.command_in(Some(ns), &dir, "runner", &["init", "-input=false", "-no-color"]).output().expect("init");
        assert!(init.status.success(), "init in {}: {}", ns.name, String::from_utf8_lossy(&init.stderr));
        dir
    };
    let (a, b) = (dir("a", &na), dir("b", &nb));
    let mut holder = tf
        .command_in(Some(&na), &a, "runner", &["apply", "-no-color"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("apply A");
    let lock = eventually(Duration::from_secs(30), "A's exact holder record", || async {
        lock_object(&cluster).await.filter(|l| l.status.as_ref().is_some_and(|s| s.gateway_holder.is_some()))
    })
    .await;
    let gh = lock.status.and_then(|s| s.gateway_holder).expect("gatewayHolder");
    assert_eq!((gh.namespace.as_str(), gh.pod.as_str(), gh.uid.as_str()), (NS, "runner-a", uids[0].as_str()));
    assert_eq!(lock.spec.lock_info.who.as_deref(), Some("root@runner"), "Who alone could not tell the runners apart");
    let waiter = tf
        .command_in(Some(&nb), &b, "runner", &["plan", "-no-color", "-lock-timeout=60s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plan B");
    let lock = eventually(Duration::from_secs(20), "B listed as a waiter", || async {
        lock_object(&cluster).await.filter(|l| {
            l.status.as_ref().and_then(|s| s.contention.as_ref()).is_some_and(|c| c.waiters.first().is_some_and(|w| w.attempts >= 2))
        })
    })
    .await;
    let w = &lock.status.as_ref().and_then(|s| s.contention.as_ref()).expect("contention").waiters[0];
    assert_eq!((w.namespace.as_deref(), w.pod.as_deref()), (Some(NS), Some("runner-b")));
    let on_b = eventually(Duration::from_secs(10), "LockContended on pod runner-b", || async {
        events(&cluster, "LockContended")
            .await
            .into_iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("runner-b"))
    })
    .await;
    let note = on_b.note.unwrap_or_default();
    assert!(note.contains(&format!("(pod {NS}/runner-b)")) && note.contains("(pod runner-a)"), "the event names both pods: {note}");
    // A finishes; B, still retrying, gets the lock: its wait ends as acquired.
    holder.stdin.take().expect("stdin").write_all(b"no\n").expect("answer");
    let _ = holder.wait();
    let out = waiter.wait_with_output().expect("B");
    assert!(out.status.success(), "B proceeds once A is done: {}", String::from_utf8_lossy(&out.stderr));
    let m = eventually(Duration::from_secs(10), "B's wait to be measured", || {
        let m = op.metrics();
        async move { (common::metric(&m, "statelock_gateway_lock_wait_seconds_count{outcome=\"acquired\"}") == Some(1.0)).then_some(m) }
    })
    .await;
    assert_eq!(common::metric(&m, "statelock_gateway_waiters"), Some(0.0), "{m}");
    assert!(
        common::metric(&m, "statelock_gateway_requests_total{operation=\"PutItem\",result=\"ConditionalCheckFailedException\"}")
            >= Some(2.0),
        "{m}"
    );
    eventually(Duration::from_secs(10), "the released lock's StateLock to go", || async {
        lock_object(&cluster).await.is_none().then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_that_may_not_use_the_table_get_access_denied() {
    let e = env(false, false).await;
    let tf = Terraform::modern();
    let dir = e.cluster.dir.path().join("denied");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("main.tf"), tf.backend_with(&e.moto.url(), &e.gateway, KEY, TABLE)).expect("main.tf");
    let init = tf.command(&dir, "laptop", &["init", "-input=false", "-no-color"]).output().expect("init");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let plan = tf.command(&dir, "laptop", &["plan", "-no-color"]).output().expect("plan");
    assert!(!plan.status.success());
    assert!(String::from_utf8_lossy(&plan.stderr).contains("AccessDeniedException"), "{}", String::from_utf8_lossy(&plan.stderr));
    eventually(Duration::from_secs(10), "a GatewayAccessDenied event", || async {
        (!events(&e.cluster, "GatewayAccessDenied").await.is_empty()).then_some(())
    })
    .await;
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_requests_get_dynamodb_errors() {
    let e = env(true, false).await;
    let post = |target: &str, body: &[u8]| -> (u16, String, String) {
        use std::io::Read;
        let addr = e.gateway.trim_start_matches("http://").to_owned();
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        write!(s, "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: {target}\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).expect("head");
        let _ = s.write_all(body);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (code, head.to_lowercase(), body.to_owned())
    };
    let (code, head, body) = post("DynamoDB_20120810.PutItem", b"{not json");
    assert_eq!(code, 400);
    assert!(head.contains("x-amzn-errortype: serializationexception"), "{head}");
    assert!(body.contains("SerializationException"), "{body}");
    let (code, _, body) = post("DynamoDB_20120810.Scan", br#"{"TableName":"tf-locks"}"#);
    assert_eq!(code, 400);
    assert!(body.contains("UnknownOperationException"), "{body}");
    let (code, _, body) = post("DynamoDB_20120810.GetItem", br#"{"TableName":"other","Key":{"LockID":{"S":"x"}}}"#);
    assert_eq!(code, 400);
    assert!(body.contains("ResourceNotFoundException"), "{body}");
    let (code, _, _) = post("DynamoDB_20120810.PutItem", &vec![b'x'; 200 * 1024]);
    assert_eq!(code, 413);
    e.op.stop().await;
}

/// A DynamoDB stand-in that answers every call with the next of `answers` (status, error type;
/// an empty type is a success) and counts the calls: throttling and server errors on demand,
/// over real HTTP, each answer `delay` late.
fn failing_dynamodb(answers: Vec<(u16, &'static str)>, delay: Duration) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (counter, answers) = (counter.clone(), answers.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut conn = conn;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    let mut saw_request = false;
                    let mut target = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        saw_request = true;
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if let Some(v) = lower.strip_prefix("x-amz-target:") {
                            target = v.trim().to_owned();
                        }
                        if line == "\r\n" {
                            break;
                        }
                        line.clear();
                    }
                    if !saw_request {
                        break;
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        break;
                    }
                    // The operator's own reads (the mirror's Scan, the readiness DescribeTable) are
                    // answered with an empty table and not counted: only forwarded calls are.
                    if !["putitem", "getitem", "deleteitem"].iter().any(|op| target.ends_with(op)) {
                        let body = if target.ends_with("describetable") {
                            "{\"Table\":{\"TableName\":\"t\",\"TableStatus\":\"ACTIVE\"}}"
                        } else {
                            "{\"Items\":[],\"Count\":0,\"ScannedCount\":0}"
                        };
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(reply.as_bytes()).is_err() {
                            break;
                        }
                        continue;
                    }
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let (status, code) = answers[n % answers.len()];
                    let body = if code.is_empty() {
                        "{}".to_owned()
                    } else {
                        format!("{{\"__type\":\"com.amazonaws.dynamodb.v20120810#{code}\",\"message\":\"injected {code}\"}}")
                    };
                    std::thread::sleep(delay);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/x-amz-json-1.0\r\nx-amzn-RequestId: R{n}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, calls)
}

/// Throttling and server errors reach the caller exactly as DynamoDB gave them, after exactly one
/// upstream attempt (retrying is the caller's job); a client that stalls mid-body is cut off
/// without holding up anyone else.
#[tokio::test(flavor = "multi_thread")]
async fn dynamodb_errors_pass_through_once_and_slow_clients_are_cut_off() {
    use std::sync::atomic::Ordering;
    let answers = vec![
        (400, "ProvisionedThroughputExceededException"),
        (400, "ThrottlingException"),
        (500, "InternalServerError"),
        (503, "ServiceUnavailable"),
    ];
    let (upstream, calls) = failing_dynamodb(answers.clone(), Duration::ZERO);
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    cluster.create_lock_source(NS, "tf-locks", json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": upstream}, "sync": {"mode": "Scan", "interval": "1h"}, "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}})).await;
    let port = free_port();
    let op = Operator::start_with_gateway(&cluster, port);
    let addr = format!("127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "the gateway to listen", || {
        let ok = std::net::TcpStream::connect(&addr).is_ok();
        async move { ok.then_some(()) }
    })
    .await;
    let post = |body: &str| -> (u16, String) {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        write!(s, "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: DynamoDB_20120810.PutItem\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        (out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), out.to_lowercase())
    };
    let put = json!({"ConditionExpression": "attribute_not_exists(LockID)", "Item": {"LockID": {"S": "tfstate/x"}, "Info": {"S": "{\"ID\":\"1\"}"}}, "TableName": TABLE}).to_string();
    // The first call may wait for the gateway's caches; the scan of the table failing is fine.
    let before = calls.load(Ordering::SeqCst);
    for (i, (status, code)) in answers.iter().enumerate() {
        // The mirror's scans share the stand-in; take the answer the gateway's call will get.
        let (got, text) = loop {
            let n = calls.load(Ordering::SeqCst);
            let (got, text) = post(&put);
            if calls.load(Ordering::SeqCst) == n + 1 && text.contains(&code.to_lowercase()) {
                break (got, text);
            }
            assert!(calls.load(Ordering::SeqCst) < before + 200, "answer {i} never came back: {text}");
        };
        assert_eq!(got, *status, "{code}: {text}");
        assert!(text.contains(&format!("x-amzn-errortype: {}", code.to_lowercase())), "{text}");
        assert!(text.contains(&format!("injected {}", code.to_lowercase())), "DynamoDB's message kept: {text}");
    }
    // A client that sends half its body and stalls is answered 400 after the read timeout, while
    // others are served meanwhile.
    let stall_addr = addr.clone();
    let (sent, half_sent) = std::sync::mpsc::channel();
    let stalled = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&stall_addr).expect("connect");
        write!(s, "POST / HTTP/1.1\r\nHost: gw\r\nX-Amz-Target: DynamoDB_20120810.GetItem\r\nContent-Length: 100\r\n\r\n{{\"TableName\"")
            .expect("write");
        sent.send(()).expect("signal");
        let started = std::time::Instant::now();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        (started.elapsed(), out)
    });
    half_sent.recv().expect("the stalled client has sent half its request");
    let (got, _) = post(&put);
    assert!(got == 400 || got == 500 || got == 503, "others are served while a client stalls");
    assert!(!stalled.is_finished(), "the stalled client is still waiting while the other was served");
    let (waited, out) = stalled.join().expect("stalled client");
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("was not received within 10 s"), "{out}");
    assert!(waited >= Duration::from_secs(9), "cut off by the read timeout, after {waited:?}");
    op.stop().await;
}

/// SIGTERM while a call is in flight: the caller still gets DynamoDB's answer; new connections
/// are no longer accepted.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_calls_in_flight() {
    let (upstream, calls) = failing_dynamodb(vec![(200, "")], Duration::from_secs(2));
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    cluster.create_lock_source(NS, "tf-locks", json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": upstream}, "sync": {"mode": "Scan", "interval": "1h"}, "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}})).await;
    let port = free_port();
    let op = Operator::start_with_gateway(&cluster, port);
    let addr = format!("127.0.0.1:{port}");
    // Ready means the gateway's caches have synced: calls are served from then on.
    eventually(Duration::from_secs(30), "readiness", || {
        let admin = format!("127.0.0.1:{}", op.admin_port);
        let ready = std::net::TcpStream::connect(&admin).is_ok() && http_request("GET", &format!("http://{admin}/readyz"), "") == 200;
        async move { ready.then_some(()) }
    })
    .await;
    let a = addr.clone();
    let in_flight = std::thread::spawn(move || {
        use std::io::Read;
        let body = json!({"Item": {"LockID": {"S": "tfstate/y-md5"}, "Digest": {"S": "d"}}, "TableName": TABLE}).to_string();
        let mut s = std::net::TcpStream::connect(&a).expect("connect");
        write!(s, "POST / HTTP/1.1\r\nHost: gw\r\nX-Amz-Target: DynamoDB_20120810.PutItem\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    let n = calls.load(std::sync::atomic::Ordering::SeqCst);
    eventually(Duration::from_secs(5), "the call to reach DynamoDB", || {
        let seen = calls.load(std::sync::atomic::Ordering::SeqCst) > n;
        async move { seen.then_some(()) }
    })
    .await;
    op.stop().await;
    let out = in_flight.join().expect("caller");
    assert!(out.starts_with("HTTP/1.1 200"), "the call in flight was answered: {out}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "no new connections after shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_concurrent_clients_never_hold_one_lock_together() {
    use std::{
        io::Read,
        sync::{Arc, Mutex},
        time::Instant,
    };
    let e = env_backend(true, false, "memory").await;
    let addr = e.gateway.trim_start_matches("http://").to_owned();
    let history: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let threads: Vec<_> = (0..64)
        .map(|w| {
            let (addr, history) = (addr.clone(), history.clone());
            std::thread::spawn(move || {
                let call = |target: &str, body: &str| -> u16 {
                    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
                    write!(s, "POST / HTTP/1.1\r\nHost: gw\r\nX-Amz-Target: DynamoDB_20120810.{target}\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("write");
                    let mut out = String::new();
                    let _ = s.read_to_string(&mut out);
                    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
                };
                let mut grants = 0;
                for attempt in 0..8 {
                    let info = json!({"ID": format!("{w}-{attempt}"), "Operation": "OperationTypeApply", "Info": "", "Who": format!("root@client-{w}"), "Version": "1.11.4", "Created": "2026-11-26T13:00:00Z", "Path": "tfstate/shared/terraform.tfstate"}).to_string();
                    let put = json!({"ConditionExpression": "attribute_not_exists(LockID)", "Item": {"LockID": {"S": "tfstate/shared/terraform.tfstate"}, "Info": {"S": info}}, "TableName": TABLE}).to_string();
                    match call("PutItem", &put) {
                        200 => {
                            let start = Instant::now();
                            std::thread::sleep(Duration::from_millis(2));
                            let end = Instant::now();
                            history.lock().expect("history").push((start, end));
                            let del = json!({"Key": {"LockID": {"S": "tfstate/shared/terraform.tfstate"}}, "TableName": TABLE, "ConditionExpression": "Info = :i", "ExpressionAttributeValues": {":i": {"S": info}}}).to_string();
                            assert_eq!(call("DeleteItem", &del), 200, "a holder can always release its own lock");
                            grants += 1;
                        }
                        400 => {}
                        other => panic!("unexpected status {other}"),
                    }
                }
                grants
            })
        })
        .collect();
    let grants: usize = threads.into_iter().map(|t| t.join().expect("client")).sum();
    let mut h = history.lock().expect("history").clone();
    assert_eq!(h.len(), grants);
    assert!(grants > 0);
    h.sort();
    for pair in h.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "two holders at once: {:?} overlaps {:?}", pair[0], pair[1]);
    }
    e.op.stop().await;
}

/// In process, with a tiny queue: a call is answered at once even when its Kubernetes update
/// cannot be queued (the drop is counted), and a lock taken and released many times in a burst
/// costs a handful of writes, ending in the right state.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_effects_queue_drops_and_counts_and_bursts_coalesce() {
    use kube::runtime::events::{Recorder, Reporter};
    use statelock::gateway::{effects::EffectsConfig, memory::MemoryTables, server};
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    cluster.create_lock_source(NS, "tf-locks", json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": "http://127.0.0.1:9"}, "sync": {"mode": "Scan", "interval": "1h"}, "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}})).await;
    let client = cluster.client();
    let metrics = statelock::metrics::Metrics::new();
    let recorder = Recorder::new(client.clone(), Reporter { controller: "test".into(), instance: None });
    let config = EffectsConfig { workers: 1, min_interval: Duration::from_secs(2), max_pending: 2, ..EffectsConfig::default() };
    let gw = server::Gateway::new(
        client.clone(),
        recorder,
        server::Backend::Memory(std::sync::Arc::new(MemoryTables::default())),
        metrics.clone(),
        config,
        std::sync::Arc::new(statelock::tenancy::TenancyPolicy::default()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(server::serve(gw, listener, cancel.clone()));
    let call = move |target: &'static str, body: serde_json::Value| {
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let body = body.to_string();
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            write!(s, "POST / HTTP/1.1\r\nHost: gw\r\nX-Amz-Target: DynamoDB_20120810.{target}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("write");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0)
        })
    };
    let put = |id: &str, lock_id: &str| {
        let info = common::terraform_info(id, "root@ci", lock_id, "2026-11-26T13:00:00Z");
        json!({"ConditionExpression": "attribute_not_exists(LockID)", "TableName": TABLE, "Item": {"LockID": {"S": lock_id}, "Info": {"S": info}}})
    };
    // Ten distinct locks at once: one is being written, two wait, the rest are dropped. The API
    // answers slowly meanwhile, so that the one worker cannot drain the queue during the burst
    // however busy the machine is (the outcome must not depend on the machine's speed).
    cluster.emulator.set_latency(Duration::from_secs(5));
    for i in 0..10 {
        let lock_id = format!("tfstate/many{i}/terraform.tfstate");
        assert_eq!(call("PutItem", put(&format!("id-{i}"), &lock_id)).await.expect("call"), 200, "answered at once");
    }
    let dropped = metrics.gateway.effects_dropped.get();
    cluster.emulator.set_latency(Duration::ZERO);
    assert!(dropped >= 7, "updates beyond the queue (1 in flight, 2 pending) are dropped and counted: {dropped}");
    // A burst on one lock, once the queue has drained: 30 grants and 29 releases, ending held by
    // the last grant.
    let m = metrics.clone();
    eventually(Duration::from_secs(60), "the queue to drain", || {
        let empty = m.gateway.effects_queued.get() == 0;
        async move { empty.then_some(()) }
    })
    .await;
    let before = cluster.emulator.writes("statelock.dev", "statelocks");
    let burst = "tfstate/burst/terraform.tfstate";
    for i in 0..30 {
        assert_eq!(call("PutItem", put(&format!("burst-{i}"), burst)).await.expect("call"), 200);
        if i < 29 {
            assert_eq!(call("DeleteItem", json!({"TableName": TABLE, "Key": {"LockID": {"S": burst}}})).await.expect("call"), 200);
        }
    }
    let lock = eventually(Duration::from_secs(20), "the burst's final state", || async {
        Api::<StateLock>::namespaced(cluster.client(), NS)
            .get_opt(&state_lock_name(burst))
            .await
            .expect("get")
            .filter(|l| l.spec.lock_info.id.as_deref() == Some("burst-29"))
    })
    .await;
    assert_eq!(lock.spec.lock_id, burst);
    let writes = cluster.emulator.writes("statelock.dev", "statelocks") - before;
    println!("59 lock calls in a burst cost {writes} StateLock writes");
    assert!(writes < 20, "a burst is coalesced, not written call by call: {writes} writes for 59 calls");
    cancel.cancel();
    let _ = served.await;
}

/// The safety issue's gateway class, end to end: a completed pod that kept the runner's address
/// is not taken for the caller; another namespace's LockSource that lists the runner's namespace
/// does not capture its calls; a compound condition that would overwrite the held lock is
/// refused. The live lock survives all of it; the holder's death still releases it.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_never_misattributes_misroutes_or_rewrites() {
    use std::os::unix::process::CommandExt;
    let e = env(false, true).await;
    let client = e.cluster.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    // A finished pod with the runner's address (CNIs reuse addresses; completed pods keep theirs).
    let old: Pod = serde_json::from_value(
        json!({"metadata": {"name": "old-runner"}, "spec": {"containers": [{"name": "atlantis", "image": "atlantis"}]}}),
    )
    .expect("pod");
    pods.create(&PostParams::default(), &old).await.expect("pod");
    pods.patch_status(
        "old-runner",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded", "podIP": "127.0.0.1"}})),
    )
    .await
    .expect("status");
    // Another team's LockSource for a table of the same name, listing this namespace.
    e.cluster.create_namespace("team-x").await;
    e.cluster
        .create_lock_source(
            "team-x",
            "grabber",
            json!({"dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": e.moto.url()}, "sync": {"mode": "Scan", "interval": "1h"}, "gateway": {"allowedNamespaces": [NS]}}),
        )
        .await;
    Api::<statelock::crd::LockSource>::namespaced(client.clone(), NS)
        .patch("tf-locks", &PatchParams::default(), &Patch::Merge(json!({"spec": {"expiry": {"mode": "Release", "gracePeriod": "0s"}}})))
        .await
        .expect("Release mode");
    let tf = Terraform::modern();
    let dir = workdir(&e, &tf, "holder");
    let init = tf.command(&dir, "atlantis-0", &["init", "-input=false", "-no-color"]).output().expect("init");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut apply = tf
        .command(&dir, "atlantis-0", &["apply", "-no-color", "-var", "v=b"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("apply");
    let lock = eventually(Duration::from_secs(60), "the holder established by the gateway", || async {
        lock_object(&e.cluster).await.filter(|l| {
            l.status.as_ref().and_then(|s| s.holder.as_ref()).is_some_and(|h| {
                h.state == statelock::crd::HolderState::Alive
                    && h.established.as_ref().is_some_and(|x| x.by == HolderIdentification::Gateway)
            })
        })
    })
    .await;
    let gh = lock.status.as_ref().and_then(|s| s.gateway_holder.clone()).expect("gatewayHolder");
    assert_eq!(gh.pod, "atlantis-0", "the running pod, not the completed one with the same address");
    assert_eq!(gh.source.as_deref(), Some("tf-locks"), "routed to the caller's own namespace's LockSource");
    assert!(
        Api::<StateLock>::namespaced(client.clone(), "team-x").list(&ListParams::default()).await.expect("list").items.is_empty(),
        "the other namespace's LockSource captured nothing"
    );
    // A compound condition that DynamoDB would let overwrite the held lock is refused.
    let db = e.moto.dynamodb().await;
    let lock_id = format!("tfstate/{KEY}");
    let held = |db: aws_sdk_dynamodb::Client, id: String| async move {
        db.get_item()
            .table_name(TABLE)
            .key("LockID", aws_sdk_dynamodb::types::AttributeValue::S(id))
            .consistent_read(true)
            .send()
            .await
            .expect("get")
            .item
            .and_then(|i| i.get("Info").and_then(|v| v.as_s().ok()).cloned())
    };
    let before = held(db.clone(), lock_id.clone()).await.expect("held");
    let body = json!({"TableName": TABLE, "Item": {"LockID": {"S": lock_id}, "Info": {"S": "{}"}}, "ConditionExpression": "attribute_not_exists(LockID) OR attribute_exists(LockID)"});
    let (status, answer) = common::http_fetch_with(
        "POST",
        &e.gateway,
        &body.to_string(),
        &[("x-amz-target", "DynamoDB_20120810.PutItem"), ("content-type", "application/x-amz-json-1.0")],
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("ValidationException"), "{answer}");
    assert_eq!(held(db.clone(), lock_id.clone()).await.as_deref(), Some(before.as_str()), "the held lock is untouched");
    // The holder dies: released through the gateway holder's record.
    let pgid = apply.id();
    assert!(std::process::Command::new("kill").args(["-9", "--", &format!("-{pgid}")]).status().expect("kill").success());
    let _ = apply.wait();
    pods.delete("atlantis-0", &kube::api::DeleteParams::default()).await.expect("delete pod");
    eventually(Duration::from_secs(30), "the dead holder's lock released", || {
        let (db, id) = (db.clone(), lock_id.clone());
        async move { held(db, id).await.is_none().then_some(()) }
    })
    .await;
    e.op.stop().await;
}
