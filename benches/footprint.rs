//! Footprint of one operator replica in a big cluster: the emulator holds 50,000 pods (two
//! containers, twenty env vars, labels and annotations each) in 200 namespaces, 100 LockSources
//! (ten namespaces, holders in their own) over 100 moto tables with 100 locks each (10,000
//! StateLocks), with churn: pods created and deleted across all namespaces, locks taken and
//! released. The operator (release build, gateway on, leader election off) runs as a process of
//! its own; this prints resident memory at steady state, CPU per 1,000 pod events, time from
//! start to Ready, API requests per minute by verb and the allocator's own figures (from the
//! operator's `/metrics`), for this build and for a baseline binary measured in the same run, with
//! their ratios; it keeps the operator's log and a sample StateLock of each kind under
//! `target/tmp`. Prints figures; asserts nothing about speed. Run: `cargo bench --bench
//! footprint`. The baseline runs second, and the second replica of a run takes up to twice as
//! long to write every StateLock whatever it is, and shows less CPU per pod event (the same binary
//! did both: 92 s against 46 s, 0.58 s against 0.63 s): read those ratios with that in mind. Its
//! memory barely leans: the same binary, run second with one jemalloc arena, came within 1 MiB of
//! anonymous memory.
//!
//! Environment: `STATELOCK_FOOTPRINT_PODS` (50000), `STATELOCK_FOOTPRINT_WINDOW_SECS` (60),
//! `STATELOCK_BASELINE_BINARY` (a statelock binary to compare with; unset: the bench builds
//! `STATELOCK_BASELINE_REV`, default d46efe8 (before the footprint work of the allocator, bounded
//! concurrency and awaited writes; 00f87e3, before the shared caches, is never Ready here), into `target/baseline` with a git worktree;
//! `none`: no baseline).

mod common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apiserver_emulator::{Authorizer, Config, Emulator, User};
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use futures::{StreamExt, stream};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Secret},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use statelock::crd::{LockSource, StateLock};

const NAMESPACES: usize = 200;
const SOURCES: usize = 100;
const SOURCE_NAMESPACES: usize = 10;
const LOCKS_PER_SOURCE: usize = 100;
/// Locks per source whose `Who` names a pod of the holder namespace (the rest name laptops).
const POD_HELD_PER_SOURCE: usize = 2;
const OPERATOR_USER: &str = "system:serviceaccount:statelock:statelock";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ns_name(i: usize) -> String {
    format!("ns-{i:03}")
}

fn pod_body(name: &str) -> Value {
    let env: Vec<Value> =
        (0..20).map(|i| json!({"name": format!("SETTING_{i}"), "value": format!("value-{i}-{}", "x".repeat(24))})).collect();
    json!({
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "app", "app.kubernetes.io/part-of": "shop", "pod-template-hash": "7d9f8c6b5"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-01T10:00:00Z", "checksum/config": "9".repeat(64)},
        },
        "spec": {"containers": [
            {"name": "app", "image": "registry.example.com/shop/app:1.42.0", "env": env,
             "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}},
            {"name": "proxy", "image": "registry.example.com/infra/proxy:2.7.1", "env": env},
        ]},
    })
}

fn pod_status(ip: &str) -> Value {
    let started = "2026-11-30T00:00:00Z";
    let cs = |name: &str| json!({"name": name, "image": "i", "imageID": "sha256:abc", "ready": true, "restartCount": 0, "started": true, "state": {"running": {"startedAt": started}}});
    json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1", "startTime": started,
                      "containerStatuses": [cs("app"), cs("proxy")]}})
}

async fn create_pod(api: &Api<Pod>, name: &str, ip: &str) {
    let pod: Pod = serde_json::from_value(pod_body(name)).expect("pod");
    api.create(&PostParams::default(), &pod).await.expect("create pod");
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(pod_status(ip))).await.expect("pod status");
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path)?.split_whitespace().nth(1)?.parse().ok()
}

/// A metric's value in the operator's `/metrics` (0 when absent: an older binary).
fn metric(addr: &str, name: &str) -> u64 {
    http_get(addr, "/metrics")
        .and_then(|text| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()))
        .map_or(0, |v| v as u64)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    status_field(pid, "VmRSS") * 1024
}

/// A `/proc/<pid>/status` field's first number (kB for sizes).
fn status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds(pid: u32, ticks_per_second: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / ticks_per_second
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

#[derive(Debug, Default)]
/// A replica that did not get there within the limit: what it had used by then.
struct Stalled {
    what: &'static str,
    waited_secs: f64,
    rss: u64,
    cpu_secs: f64,
}

struct Figures {
    ready_secs: f64,
    mirrored_secs: f64,
    /// Until the expiry controller had judged every StateLock once.
    judged_secs: f64,
    rss_steady: u64,
    /// Of `rss_steady`: anonymous memory (heap, stacks) and file-backed pages (mostly the binary's code).
    rss_anon: u64,
    rss_file: u64,
    threads: u64,
    open_fds: usize,
    /// jemalloc's allocated, active, metadata and resident bytes, from the operator's `/metrics`
    /// (0 for a binary without them).
    heap: [u64; 4],
    rss_max: u64,
    cpu_per_1000_pod_events: f64,
    cpu_total_window: f64,
    pod_events: u64,
    requests_per_minute: BTreeMap<String, f64>,
    lists_per_minute: f64,
}

struct Setup {
    emulator: Emulator,
    admin: kube::Client,
    db: aws_sdk_dynamodb::Client,
    moto_url: String,
    dir: tempfile::TempDir,
    pods_per_namespace: usize,
}

async fn setup(pods: usize) -> (Setup, common::Moto) {
    let moto = common::moto();
    let db = common::db(&moto.url).await;
    let tokens = [("bench".to_owned(), User::admin("bench")), ("operator".to_owned(), User::admin(OPERATOR_USER))];
    let config = Config { authorizer: Authorizer::Rbac { tokens: tokens.into_iter().collect() }, ..Config::default() };
    let emulator = Emulator::start("127.0.0.1:0".parse().expect("addr"), config).await.expect("emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let admin_kc = dir.path().join("admin");
    emulator.write_kubeconfig(&admin_kc, Some("bench")).expect("kubeconfig");
    emulator.write_kubeconfig(&dir.path().join("operator"), Some("operator")).expect("kubeconfig");
    let kc = kube::config::Kubeconfig::read_from(&admin_kc).expect("read kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
    config.default_namespace = "default".into();
    let admin = kube::Client::try_from(config).expect("client");

    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in statelock::crd::all() {
        crds.patch(&crd.name_any(), &PatchParams::apply("bench").force(), &Patch::Apply(&crd)).await.expect("crd");
    }
    let t0 = Instant::now();
    let pods_per_namespace = pods.div_ceil(NAMESPACES);
    for n in 0..NAMESPACES {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name(n)}})).expect("ns");
        Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await.expect("namespace");
    }
    let jobs: Vec<(usize, usize)> = (0..NAMESPACES).flat_map(|n| (0..pods_per_namespace).map(move |i| (n, i))).collect();
    stream::iter(jobs)
        .for_each_concurrent(32, |(n, i)| {
            let api: Api<Pod> = Api::namespaced(admin.clone(), &ns_name(n));
            async move { create_pod(&api, &format!("app-{i:03}"), &format!("10.{}.{}.{}", n, i / 250, i % 250 + 1)).await }
        })
        .await;
    eprintln!("loaded {} pods in {NAMESPACES} namespaces in {:.0?}", NAMESPACES * pods_per_namespace, t0.elapsed());

    let t0 = Instant::now();
    let created = k8s_openapi::jiff::Timestamp::now().to_string();
    for s in 0..SOURCE_NAMESPACES {
        let secret: Secret = serde_json::from_value(
            json!({"metadata": {"name": "aws"}, "stringData": {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake"}}),
        )
        .expect("secret");
        Api::<Secret>::namespaced(admin.clone(), &ns_name(s)).create(&PostParams::default(), &secret).await.expect("secret");
    }
    for s in 0..SOURCES {
        let table = format!("tf-locks-{s:02}");
        common::create_table(&db, &table, false).await;
        let items: Vec<WriteRequest> = (0..LOCKS_PER_SOURCE)
            .map(|j| {
                let id = format!("tfstate/src-{s:02}/stack-{j:03}/terraform.tfstate");
                let who = if j < POD_HELD_PER_SOURCE { format!("root@app-{j:03}") } else { format!("dev@laptop-{j}") };
                let put = PutRequest::builder()
                    .item("LockID", AttributeValue::S(id.clone()))
                    .item("Info", AttributeValue::S(common::info(j, &who, &id, &created)))
                    .build()
                    .expect("put");
                WriteRequest::builder().put_request(put).build()
            })
            .collect();
        for chunk in items.chunks(25) {
            db.batch_write_item().request_items(&table, chunk.to_vec()).send().await.expect("batch write");
        }
        let ns = ns_name(s % SOURCE_NAMESPACES);
        let src: LockSource = serde_json::from_value(json!({
            "apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource",
            "metadata": {"name": format!("src-{s:02}"), "namespace": ns},
            "spec": {"dynamodb": {"tableName": table, "region": "us-east-1", "endpoint": moto.url, "credentialsSecretRef": {"name": "aws"}},
                     "sync": {"mode": "Scan", "interval": "30s"}, "expiry": {"mode": "Release"}},
        }))
        .expect("source");
        Api::<LockSource>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &src).await.expect("LockSource");
    }
    eprintln!("created {SOURCES} tables with {} locks and {SOURCES} LockSources in {:.0?}", SOURCES * LOCKS_PER_SOURCE, t0.elapsed());
    let moto_url = moto.url.clone();
    (Setup { emulator, admin, db, moto_url, dir, pods_per_namespace }, moto)
}

/// Churn until `stop`: a pod created (and made Running) and an older one deleted every 50 ms,
/// round the namespaces; a lock taken and an older one released every 200 ms. Counts pod events.
async fn churn(setup: &Setup, stop: Arc<AtomicBool>, pod_events: Arc<AtomicU64>) {
    let mut n: usize = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let ns = ns_name(n % NAMESPACES);
        let api: Api<Pod> = Api::namespaced(setup.admin.clone(), &ns);
        create_pod(&api, &format!("churn-{n}"), &format!("10.250.{}.{}", (n / 250) % 250, n % 250 + 1)).await;
        pod_events.fetch_add(2, Ordering::SeqCst);
        if n >= NAMESPACES {
            let old = n - NAMESPACES;
            let api: Api<Pod> = Api::namespaced(setup.admin.clone(), &ns_name(old % NAMESPACES));
            if api.delete(&format!("churn-{old}"), &DeleteParams::default()).await.is_ok() {
                pod_events.fetch_add(1, Ordering::SeqCst);
            }
        }
        if n.is_multiple_of(4) {
            let s = (n / 4) % SOURCES;
            let table = format!("tf-locks-{s:02}");
            let id = format!("tfstate/src-{s:02}/churn-{n}/terraform.tfstate");
            let created = k8s_openapi::jiff::Timestamp::now().to_string();
            let _ = setup
                .db
                .put_item()
                .table_name(&table)
                .item("LockID", AttributeValue::S(id))
                .item("Info", AttributeValue::S(common::info(n, "ci@runner", "x", &created)))
                .send()
                .await;
            if n >= 40 {
                let old = n - 40;
                let s = (old / 4) % SOURCES;
                let _ = setup
                    .db
                    .delete_item()
                    .table_name(format!("tf-locks-{s:02}"))
                    .key("LockID", AttributeValue::S(format!("tfstate/src-{s:02}/churn-{old}/terraform.tfstate")))
                    .send()
                    .await;
            }
        }
        n += 1;
    }
}

fn operator_counts(e: &Emulator) -> BTreeMap<(String, String), u64> {
    e.audit_counts().into_iter().filter(|((u, _, _), _)| u == OPERATOR_USER).map(|((_, v, r), n)| ((v, r), n)).collect()
}

async fn measure(setup: &Setup, binary: &Path, label: &str, window: Duration, limit: Duration) -> Result<Figures, Stalled> {
    let (admin_port, gateway_port) = (free_port(), free_port());
    let log = std::fs::File::create(setup.dir.path().join(format!("{label}.log"))).expect("log");
    let started = Instant::now();
    let mut child: Child = Command::new(binary)
        .args(["run", "--leader-election=false"])
        .args(["--admin-addr", &format!("127.0.0.1:{admin_port}"), "--gateway-addr", &format!("127.0.0.1:{gateway_port}")])
        .env("KUBECONFIG", setup.dir.path().join("operator"))
        .env("STATELOCK_ALLOWED_ENDPOINTS", "http://127.0.0.1:*")
        .env("STATELOCK_AWS_IDENTITY_NAMESPACES", "*")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("operator starts");
    let pid = child.id();
    let admin = format!("127.0.0.1:{admin_port}");
    let ticks = ticks_per_second();
    let give_up = |child: &mut Child, what: &'static str| {
        let stalled =
            Stalled { what, waited_secs: started.elapsed().as_secs_f64(), rss: rss_bytes(pid), cpu_secs: cpu_seconds(pid, ticks) };
        eprintln!(
            "{label}: {what} after {:.0} s; resident {}, CPU {:.0} s; stopped",
            stalled.waited_secs,
            mib(stalled.rss),
            stalled.cpu_secs
        );
        let _ = child.kill();
        let _ = child.wait();
        stalled
    };
    while http_status(&admin, "/readyz") != Some(200) {
        assert!(child.try_wait().expect("wait").is_none(), "{label}: the operator exited; see {label}.log");
        if started.elapsed() >= limit {
            return Err(give_up(&mut child, "not Ready"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_secs = started.elapsed().as_secs_f64();
    // Mirrored: every lock has its StateLock.
    let want = SOURCES * LOCKS_PER_SOURCE;
    loop {
        let mut have = 0;
        for s in 0..SOURCE_NAMESPACES {
            let api: Api<StateLock> = Api::namespaced(setup.admin.clone(), &ns_name(s));
            have += api.list_metadata(&ListParams::default()).await.expect("list").items.len();
        }
        if have >= want {
            break;
        }
        if started.elapsed() >= limit + Duration::from_secs(300) {
            return Err(give_up(&mut child, "not every StateLock written"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mirrored_secs = started.elapsed().as_secs_f64();
    // Steady state begins once the expiry controller has judged every StateLock once (the first
    // pass after a start): each then has a status.phase.
    loop {
        let mut judged = 0;
        for s in 0..SOURCE_NAMESPACES {
            let api: Api<StateLock> = Api::namespaced(setup.admin.clone(), &ns_name(s));
            judged += api
                .list(&ListParams::default())
                .await
                .expect("list")
                .items
                .iter()
                .filter(|l| l.status.as_ref().is_some_and(|s| s.phase.is_some()))
                .count();
        }
        if judged >= want {
            break;
        }
        if started.elapsed() >= limit + Duration::from_secs(600) {
            return Err(give_up(&mut child, "not every StateLock judged"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let judged_secs = started.elapsed().as_secs_f64();
    // What a StateLock weighs as served (without managedFields, which the operator drops), and a
    // sample of each kind kept for reading: a lock held from a pod, and one held from a laptop.
    {
        let api: Api<StateLock> = Api::namespaced(setup.admin.clone(), &ns_name(0));
        let mut locks = api.list(&ListParams::default()).await.expect("list").items;
        for l in &mut locks {
            l.metadata.managed_fields = None;
        }
        let bytes: usize = locks.iter().map(|l| serde_json::to_vec(l).expect("json").len()).sum();
        eprintln!("{label}: a StateLock is {} bytes of JSON on average ({} in {})", bytes / locks.len().max(1), locks.len(), ns_name(0));
        for (kind, l) in [
            ("pod", locks.iter().find(|l| l.spec.lock_info.who.as_deref().is_some_and(|w| w.starts_with("root@")))),
            ("laptop", locks.iter().find(|l| l.spec.lock_info.who.as_deref().is_some_and(|w| w.starts_with("dev@")))),
        ] {
            if let Some(l) = l {
                let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("footprint-{label}-statelock-{kind}.json"));
                let _ = std::fs::write(&path, serde_json::to_vec_pretty(l).expect("json"));
            }
        }
    }
    eprintln!(
        "{label}: Ready after {ready_secs:.2} s, {want} StateLocks after {mirrored_secs:.1} s, all judged after {judged_secs:.1} s; steady-state window {window:?}"
    );

    let (stop, pod_events) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let (cpu0, counts0) = (cpu_seconds(pid, ticks), operator_counts(&setup.emulator));
    let t0 = Instant::now();
    let mut rss_max = 0;
    {
        let churner = churn(setup, stop.clone(), pod_events.clone());
        let sampler = async {
            while t0.elapsed() < window {
                rss_max = rss_max.max(rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            stop.store(true, Ordering::SeqCst);
        };
        futures::join!(churner, sampler);
    }
    let elapsed = t0.elapsed();
    let (cpu1, counts1) = (cpu_seconds(pid, ticks), operator_counts(&setup.emulator));
    let rss_steady = rss_bytes(pid);
    let (rss_anon, rss_file, threads) =
        (status_field(pid, "RssAnon") * 1024, status_field(pid, "RssFile") * 1024, status_field(pid, "Threads"));
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let heap = ["allocated", "active", "metadata", "resident"].map(|k| metric(&admin, &format!("statelock_heap_{k}_bytes")));
    let events = pod_events.load(Ordering::SeqCst);
    let minutes = elapsed.as_secs_f64() / 60.0;
    let mut requests_per_minute = BTreeMap::new();
    let mut lists = 0;
    for ((verb, resource), n) in &counts1 {
        let d = n - counts0.get(&(verb.clone(), resource.clone())).copied().unwrap_or(0);
        if d > 0 {
            *requests_per_minute.entry(verb.clone()).or_insert(0.0) += d as f64 / minutes;
            if verb == "list" {
                lists += d;
                eprintln!("{label}: {d} LISTs of {resource} in the window");
            }
        }
    }
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    // The operator's log outlives the run's directory.
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("footprint-{label}.log"));
    if std::fs::copy(setup.dir.path().join(format!("{label}.log")), &kept).is_ok() {
        eprintln!("{label}: the operator's log is {}", kept.display());
    }
    Ok(Figures {
        ready_secs,
        mirrored_secs,
        judged_secs,
        rss_steady,
        rss_anon,
        rss_file,
        threads,
        open_fds,
        heap,
        rss_max: rss_max.max(rss_steady),
        cpu_per_1000_pod_events: (cpu1 - cpu0) / events.max(1) as f64 * 1000.0,
        cpu_total_window: cpu1 - cpu0,
        pod_events: events,
        requests_per_minute,
        lists_per_minute: lists as f64 / minutes,
    })
}

/// Remove what a run left (StateLocks, churn pods) so the next starts from the same cluster.
async fn reset(setup: &Setup) {
    for s in 0..SOURCE_NAMESPACES {
        let api: Api<StateLock> = Api::namespaced(setup.admin.clone(), &ns_name(s));
        api.delete_collection(&DeleteParams::default(), &ListParams::default()).await.expect("delete StateLocks");
    }
    for n in 0..NAMESPACES {
        let api: Api<Pod> = Api::namespaced(setup.admin.clone(), &ns_name(n));
        for p in api.list_metadata(&ListParams::default()).await.expect("list").items {
            if p.name_any().starts_with("churn-") {
                let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
            }
        }
    }
    let _ = setup.pods_per_namespace;
}

fn baseline_binary() -> Option<PathBuf> {
    match std::env::var("STATELOCK_BASELINE_BINARY") {
        Ok(v) if v == "none" => return None,
        Ok(v) => return Some(PathBuf::from(v)),
        Err(_) => {}
    }
    let rev = std::env::var("STATELOCK_BASELINE_REV").unwrap_or_else(|_| "d46efe8".into());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/baseline");
    let bin = target.join("release/statelock");
    let src = target.join(format!("src-{rev}"));
    if !src.exists() {
        let ok = Command::new("git")
            .current_dir(&root)
            .args(["worktree", "add", "--detach"])
            .arg(&src)
            .arg(&rev)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "git worktree add {rev} failed");
    }
    eprintln!("building the baseline ({rev}) into {}", target.display());
    let ok = Command::new("cargo")
        .current_dir(&src)
        .args(["build", "--release", "--bin", "statelock"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "building the baseline failed");
    Some(bin)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1024.0 / 1024.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let pods = env_usize("STATELOCK_FOOTPRINT_PODS", 50_000);
    let window = Duration::from_secs(env_usize("STATELOCK_FOOTPRINT_WINDOW_SECS", 60) as u64);
    let limit = Duration::from_secs(env_usize("STATELOCK_FOOTPRINT_READY_LIMIT_SECS", 600) as u64);
    let baseline = baseline_binary();
    let (setup, _moto) = setup(pods).await;
    let _ = &setup.moto_url;
    let candidate = match measure(&setup, Path::new(env!("CARGO_BIN_EXE_statelock")), "this-build", window, limit).await {
        Ok(f) => f,
        Err(s) => panic!("this build: {} after {:.0} s (resident {})", s.what, s.waited_secs, mib(s.rss)),
    };
    let base = match &baseline {
        Some(bin) => {
            reset(&setup).await;
            match measure(&setup, bin, "baseline", window, limit).await {
                Ok(f) => Some(f),
                Err(s) => {
                    println!(
                        "baseline: {} within {:.0} s; when stopped it was resident at {} and had used {:.0} s of CPU (this build: Ready after {:.2} s, resident {} at steady state)",
                        s.what,
                        s.waited_secs,
                        mib(s.rss),
                        s.cpu_secs,
                        candidate.ready_secs,
                        mib(candidate.rss_steady)
                    );
                    None
                }
            }
        }
        None => None,
    };
    println!(
        "footprint: {} pods in {NAMESPACES} namespaces, {SOURCES} LockSources, {} locks, one replica, window {window:?}",
        NAMESPACES * setup.pods_per_namespace,
        SOURCES * LOCKS_PER_SOURCE
    );
    let row = |name: &str, c: String, b: Option<String>, ratio: Option<f64>| {
        println!(
            "  {name:<34} {c:>14} {:>14} {:>8}",
            b.unwrap_or_else(|| "-".into()),
            ratio.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
        );
    };
    println!("  {:<34} {:>14} {:>14} {:>8}", "figure", "this build", "baseline", "ratio");
    let r = |c: f64, b: Option<f64>| b.filter(|b| *b > 0.0).map(|b| c / b);
    let b = base.as_ref();
    row(
        "resident memory, steady",
        mib(candidate.rss_steady),
        b.map(|b| mib(b.rss_steady)),
        r(candidate.rss_steady as f64, b.map(|b| b.rss_steady as f64)),
    );
    row(
        "  of which anonymous",
        mib(candidate.rss_anon),
        b.map(|b| mib(b.rss_anon)),
        r(candidate.rss_anon as f64, b.map(|b| b.rss_anon as f64)),
    );
    row("  of which file-backed", mib(candidate.rss_file), b.map(|b| mib(b.rss_file)), None);
    for (i, what) in ["heap allocated (jemalloc)", "heap active", "heap metadata", "heap resident"].iter().enumerate() {
        // A binary without these figures (older than them) shows none.
        let base = b.filter(|b| b.heap[i] > 0);
        row(what, mib(candidate.heap[i]), base.map(|b| mib(b.heap[i])), r(candidate.heap[i] as f64, base.map(|b| b.heap[i] as f64)));
    }
    row("threads", candidate.threads.to_string(), b.map(|b| b.threads.to_string()), None);
    row("open file descriptors", candidate.open_fds.to_string(), b.map(|b| b.open_fds.to_string()), None);
    row(
        "resident memory, max in window",
        mib(candidate.rss_max),
        b.map(|b| mib(b.rss_max)),
        r(candidate.rss_max as f64, b.map(|b| b.rss_max as f64)),
    );
    row(
        "start to Ready",
        format!("{:.2} s", candidate.ready_secs),
        b.map(|b| format!("{:.2} s", b.ready_secs)),
        r(candidate.ready_secs, b.map(|b| b.ready_secs)),
    );
    row(
        "start to all StateLocks",
        format!("{:.1} s", candidate.mirrored_secs),
        b.map(|b| format!("{:.1} s", b.mirrored_secs)),
        r(candidate.mirrored_secs, b.map(|b| b.mirrored_secs)),
    );
    row(
        "start to every StateLock judged",
        format!("{:.1} s", candidate.judged_secs),
        b.map(|b| format!("{:.1} s", b.judged_secs)),
        r(candidate.judged_secs, b.map(|b| b.judged_secs)),
    );
    row(
        "CPU per 1,000 pod events",
        format!("{:.3} s", candidate.cpu_per_1000_pod_events),
        b.map(|b| format!("{:.3} s", b.cpu_per_1000_pod_events)),
        r(candidate.cpu_per_1000_pod_events, b.map(|b| b.cpu_per_1000_pod_events)),
    );
    row(
        "CPU in window (all work)",
        format!("{:.2} s", candidate.cpu_total_window),
        b.map(|b| format!("{:.2} s", b.cpu_total_window)),
        r(candidate.cpu_total_window, b.map(|b| b.cpu_total_window)),
    );
    row("pod events in window", candidate.pod_events.to_string(), b.map(|b| b.pod_events.to_string()), None);
    row("LISTs per minute", format!("{:.1}", candidate.lists_per_minute), b.map(|b| format!("{:.1}", b.lists_per_minute)), None);
    let verbs: std::collections::BTreeSet<&String> =
        candidate.requests_per_minute.keys().chain(b.iter().flat_map(|b| b.requests_per_minute.keys())).collect();
    for v in verbs {
        let c = candidate.requests_per_minute.get(v).copied().unwrap_or(0.0);
        let bv = b.map(|b| b.requests_per_minute.get(v).copied().unwrap_or(0.0));
        row(&format!("API {v} per minute"), format!("{c:.1}"), bv.map(|x| format!("{x:.1}")), r(c, bv));
    }
}
