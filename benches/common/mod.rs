//! Helpers shared by the benchmarks: moto, tables, and a cluster with statelock in-process.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apiserver_emulator::{Config, Emulator};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, StreamSpecification, StreamViewType,
};
use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        events::{Recorder, Reporter},
        watcher,
    },
};
use serde_json::{Value, json};
use statelock::{
    admin::Readiness,
    crd::{LockSource, StateLock},
    dynamo::{self, StaticCredentials},
    expiry, mirror,
};
use tokio_util::sync::CancellationToken;

pub struct Moto {
    pub url: String,
    child: std::process::Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/moto_server");
    let child = std::process::Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server in .venv (bash .ci/install)");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    Moto { url: format!("http://127.0.0.1:{port}"), child }
}

pub async fn db(url: &str) -> aws_sdk_dynamodb::Client {
    dynamo::dynamodb_client("us-east-1", Some(url), Some(fake_credentials())).await
}

/// The credentials moto takes.
pub fn fake_credentials() -> StaticCredentials {
    StaticCredentials { access_key_id: "AKIAFAKE".into(), secret_access_key: "fake".into(), session_token: None }
}

pub async fn create_table(db: &aws_sdk_dynamodb::Client, name: &str, stream: bool) {
    db.create_table()
        .table_name(name)
        .key_schema(KeySchemaElement::builder().attribute_name("LockID").key_type(KeyType::Hash).build().expect("key"))
        .attribute_definitions(
            AttributeDefinition::builder().attribute_name("LockID").attribute_type(ScalarAttributeType::S).build().expect("attr"),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .set_stream_specification(
            stream.then(|| {
                StreamSpecification::builder().stream_enabled(true).stream_view_type(StreamViewType::NewImage).build().expect("spec")
            }),
        )
        .send()
        .await
        .expect("create table");
}

pub fn info(i: usize, who: &str, lock_id: &str, created: &str) -> String {
    json!({"ID": format!("id-{i}"), "Operation": "OperationTypeApply", "Info": "", "Who": who, "Version": "1.11.4", "Created": created, "Path": lock_id}).to_string()
}

pub async fn put_lock(db: &aws_sdk_dynamodb::Client, table: &str, i: usize, prefix: &str) {
    let id = format!("tfstate/{prefix}{i}/terraform.tfstate");
    db.put_item()
        .table_name(table)
        .item("LockID", AttributeValue::S(id.clone()))
        .item("Info", AttributeValue::S(info(i, "root@runner", &id, "2026-11-26T13:02:20.238325691Z")))
        .send()
        .await
        .expect("put");
}

/// A cluster with the CRDs, one LockSource (`spec` merged over a Scan source) and statelock's
/// mirror and expiry controller running in this process.
pub struct Rig {
    pub emulator: Emulator,
    pub client: kube::Client,
    pub mirror: Arc<mirror::Context>,
    pub cancel: CancellationToken,
}

pub async fn rig(url: &str, table: &str, spec: Value) -> Rig {
    let emulator = Emulator::start("127.0.0.1:0".parse().expect("addr"), Config::default()).await.expect("emulator");
    let mut config = kube::Config::new(emulator.url().parse().expect("url"));
    config.default_namespace = "default".into();
    let client = kube::Client::try_from(config).expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in statelock::crd::all() {
        crds.patch(&crd.name_any(), &PatchParams::apply("bench").force(), &Patch::Apply(&crd)).await.expect("crd");
    }
    // Credentials through a Secret: this process has no AWS environment.
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        json!({"metadata": {"name": "aws"}, "stringData": {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake"}}),
    )
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
    let mut full = json!({"dynamodb": {"tableName": table, "region": "us-east-1", "endpoint": url, "credentialsSecretRef": {"name": "aws"}}, "sync": {"mode": "Scan", "interval": "1s"}});
    if let (Some(base), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    let src: LockSource = serde_json::from_value(json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource", "metadata": {"name": "bench", "namespace": "default"}, "spec": full})).expect("src");
    Api::<LockSource>::namespaced(client.clone(), "default").create(&PostParams::default(), &src).await.expect("LockSource");
    let reporter = Reporter { controller: "statelock-bench".into(), instance: None };
    let recorder = Recorder::new(client.clone(), reporter.clone());
    let metrics = statelock::metrics::Metrics::new();
    let leader = statelock::leader::Leadership::always();
    let cancel = CancellationToken::new();
    let (cluster, lock_triggers) = statelock::cluster::Cluster::start(&client, |_| true, &cancel);
    let mirror =
        Arc::new(mirror::Context::new(client.clone(), recorder.clone(), metrics.clone(), leader.clone(), open_tenancy(), cluster.clone()));
    tokio::spawn(mirror::run(mirror.clone(), Readiness::default(), cancel.clone()));
    let deps = expiry::controller::Deps {
        client: client.clone(),
        recorder,
        reporter,
        metrics,
        leader,
        tenancy: open_tenancy(),
        cluster,
        lock_triggers,
    };
    tokio::spawn(expiry::controller::run(deps, Readiness::default(), cancel.clone()));
    Rig { emulator, client, mirror, cancel }
}

/// Start the gateway in-process on a free port, with its own caches, in front of `backend`.
pub async fn gateway(rig: &Rig, backend: statelock::gateway::server::Backend) -> std::net::SocketAddr {
    let recorder = Recorder::new(rig.client.clone(), Reporter { controller: "statelock-bench".into(), instance: None });
    let metrics = statelock::metrics::Metrics::new();
    let gw = statelock::gateway::server::Gateway::new(rig.client.clone(), recorder, backend, metrics, Default::default(), open_tenancy());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(statelock::gateway::server::serve(gw, listener, rig.cancel.clone()));
    addr
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The benchmarks' moto runs on a loopback port and every namespace may use its fake identity.
pub fn open_tenancy() -> std::sync::Arc<statelock::tenancy::TenancyPolicy> {
    std::sync::Arc::new(statelock::tenancy::TenancyPolicy {
        identity_namespaces: vec!["*".into()],
        allowed_endpoints: vec!["http://127.0.0.1:*".into()],
    })
}

/// Watches the StateLocks of `default` and records when each LockID first became visible.
pub struct Seen {
    at: Arc<Mutex<HashMap<String, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Seen {
    pub fn start(emulator_url: &str) -> Self {
        let mut config = kube::Config::new(emulator_url.parse().expect("url"));
        config.default_namespace = "default".into();
        let api: Api<StateLock> = Api::namespaced(kube::Client::try_from(config).expect("client"), "default");
        let at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let w = at.clone();
        let task = tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default()).default_backoff().applied_objects().boxed();
            while let Some(Ok(o)) = s.next().await {
                w.lock().expect("seen").entry(o.spec.lock_id.clone()).or_insert_with(Instant::now);
            }
        });
        Self { at, task }
    }

    pub async fn wait(&self, id: &str) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(t) = self.at.lock().expect("seen").get(id) {
                return *t;
            }
            assert!(Instant::now() < deadline, "{id} never became visible");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Seen {
    fn drop(&mut self) {
        self.task.abort();
    }
}
