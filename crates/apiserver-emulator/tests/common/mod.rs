//! Shared helpers for the emulator's conformance tests.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use apiserver_emulator::{Config, Emulator};

pub const WIDGETS_CRD: &str = include_str!("../fixtures/widgets-crd.yaml");

/// A running emulator with a kubeconfig and a kubectl cache of its own.
pub struct Cluster {
    pub emulator: Emulator,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub async fn start() -> Self {
        Self::start_with(Config::default()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let emulator = Emulator::start("127.0.0.1:0".parse().expect("addr"), config).await.expect("start emulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        emulator.write_kubeconfig(&kubeconfig, None).expect("kubeconfig");
        Self { emulator, dir, kubeconfig }
    }

    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.emulator.url().parse().expect("url"));
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("client")
    }

    /// Write a file into the cluster's temp dir.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write fixture");
        p
    }

    /// Run kubectl (at -v=8, so the request log can be checked) and return its output.
    pub async fn kubectl(&self, args: &[&str]) -> Kubectl {
        let kubeconfig = self.kubeconfig.clone();
        let cache = self.dir.path().join("kube-cache");
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || run_kubectl(&kubeconfig, &cache, &args)).await.expect("kubectl task")
    }
}

/// The result of one kubectl run.
#[derive(Debug)]
pub struct Kubectl {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub log: String,
}

impl Kubectl {
    /// Assert success and that no discovery or OpenAPI request was answered 404 or 406.
    pub fn success(self) -> Self {
        assert!(self.ok, "kubectl failed:\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self.assert_clean_discovery();
        self
    }

    pub fn failure(self) -> Self {
        assert!(!self.ok, "kubectl should have failed:\nstdout:\n{}", self.stdout);
        self
    }

    pub fn assert_clean_discovery(&self) {
        for line in self.log.lines() {
            let failed = line.contains("status=\"404") || line.contains("status=\"406");
            let Some(url) = line.split("url=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
            let path = url.split("://").nth(1).and_then(|r| r.find('/').map(|i| &r[i..])).unwrap_or(url);
            let path = path.split('?').next().unwrap_or(path);
            let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
            let discovery = matches!(segs.as_slice(), ["api"] | ["apis"] | ["api", _] | ["apis", _] | ["apis", _, _] | ["version"])
                || path.starts_with("/openapi");
            assert!(!(failed && discovery), "kubectl saw a failed discovery request: {line}");
        }
    }

    /// The cell under a column header in data row `row` (1-based after the header), located by
    /// the header's offset, so that empty cells do not shift columns.
    pub fn cell(&self, row: usize, header: &str) -> String {
        let lines: Vec<&str> = self.stdout.lines().collect();
        let start = lines[0].find(header).unwrap_or_else(|| panic!("no column {header} in:\n{}", self.stdout));
        lines[row].get(start..).unwrap_or_default().split_whitespace().next().unwrap_or_default().to_owned()
    }

    /// The data rows of a table printout, split on runs of 2+ spaces.
    pub fn rows(&self) -> Vec<Vec<String>> {
        self.stdout.lines().map(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()).collect()
    }
}

fn run_kubectl(kubeconfig: &Path, cache: &Path, args: &[String]) -> Kubectl {
    let out = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--cache-dir={}", cache.display()))
        .arg("-v=8")
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("kubectl must be installed (it is part of the machine image)");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (log, errors): (Vec<&str>, Vec<&str>) =
        stderr.lines().partition(|l| l.starts_with('I') && l.get(1..5).is_some_and(|d| d.chars().all(|c| c.is_ascii_digit())));
    Kubectl {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: errors.join("\n"),
        log: log.join("\n"),
    }
}

/// Poll until `check` returns `Some`, or panic after `timeout`.
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

/// The repository's Python venv (made by .ci/install), else the system python3.
pub fn python() -> Command {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() { Command::new(venv) } else { Command::new("python3") }
}
