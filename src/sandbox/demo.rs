//! `statelock sandbox --demo`: a short story with real Terraform processes.
//!
//! Runner A (pod `atlantis-0`) applies and holds the lock (its apply waits at the approval
//! prompt); runner B (pod `atlantis-1`) waits for it; A's process is killed and its pod deleted,
//! so HolderDied and LockExpired appear; B proceeds. With Terraform 1.11+ the lock is an S3 lock
//! file (`use_lockfile`), whose waiters statelock does not see (there is no S3 gateway); with
//! older Terraform it is a DynamoDB item taken through the gateway, and LockContended appears. Each runner gets
//! its pod's hostname through `unshare` (its own UTS namespace), so Terraform's `Who` names the
//! pod, as it does in a cluster. Every step is checked; the demo fails at the first that does not
//! happen.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::process::{Child, Command};

use super::{Endpoints, NAMESPACE, backend_block};
use crate::crd::{HolderState, StateLock, state_lock_name};

const KEY: &str = "demo/terraform.tfstate";

pub struct Demo {
    pub client: Client,
    pub endpoints: Endpoints,
    pub terraform: PathBuf,
    pub version: Option<(u32, u32)>,
}

fn step(n: u32, text: &str) {
    println!("\n=== step {n}: {text}");
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not happen within {} s", timeout.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How to give a process its own hostname: `unshare -u` as root, `unshare -r -u` (a user
/// namespace) otherwise.
fn unshare_args() -> Result<Vec<&'static str>, String> {
    for args in [vec!["-u"], vec!["-r", "-u"]] {
        let ok = std::process::Command::new("unshare")
            .args(&args)
            .args(["sh", "-c", "hostname statelock-probe"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(args);
        }
    }
    Err("the demo gives each runner its pod's hostname with unshare(1) (util-linux), which needs root or unprivileged user namespaces; \
         neither works here"
        .into())
}

impl Demo {
    fn terraform_cmd(&self, unshare: &[&str], dir: &Path, hostname: &str, args: &[&str]) -> Command {
        let mut script = format!("hostname {hostname} && exec \"$0\"");
        for i in 1..=args.len() {
            script.push_str(&format!(" \"${i}\""));
        }
        let mut cmd = Command::new("unshare");
        cmd.args(unshare)
            .args(["sh", "-c", &script])
            .arg(&self.terraform)
            .args(args)
            .current_dir(dir)
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env_remove("AWS_PROFILE")
            .kill_on_drop(true);
        cmd
    }

    async fn pod(&self, name: &str) -> Result<(), String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": "atlantis"}}, "spec": {"containers": [{"name": "atlantis", "image": "ghcr.io/runatlantis/atlantis"}]}}))
            .map_err(|e| e.to_string())?;
        let created = pods.create(&PostParams::default(), &pod).await.map_err(|e| format!("create pod {name}: {e}"))?;
        let started = created.metadata.creation_timestamp.map(|t| t.0.to_string()).unwrap_or_default();
        let status = json!({"status": {"phase": "Running", "containerStatuses": [{"name": "atlantis", "ready": true, "restartCount": 0, "image": "atlantis", "imageID": "", "state": {"running": {"startedAt": started}}}]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.map_err(|e| format!("pod {name} status: {e}"))?;
        Ok(())
    }

    /// Show the cluster's view the way a user would look at it (async: the API emulator runs on
    /// this same runtime).
    async fn show(&self, what: &[&str]) {
        println!("$ kubectl get {} -n {NAMESPACE}", what.join(" "));
        let out = Command::new("kubectl")
            .arg(format!("--kubeconfig={}", self.endpoints.kubeconfig.display()))
            .arg("get")
            .args(what)
            .args(["-n", NAMESPACE])
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(30), out).await {
            Ok(Ok(o)) => print!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("(kubectl is not on PATH; install it to look at the sandbox yourself)");
            }
            Ok(Err(e)) => println!("(kubectl failed: {e})"),
            Err(_) => println!("(kubectl did not answer within 30 s)"),
        }
    }

    async fn events(&self) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), NAMESPACE).list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default()
    }

    async fn has_event(&self, reason: &str, mentions: &str) -> Option<()> {
        self.events()
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some(reason) && e.note.as_deref().is_some_and(|n| n.contains(mentions)))
            .then_some(())
    }

    async fn init(&self, unshare: &[&str], dir: &Path, hostname: &str) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config = format!(
            "{}\nvariable \"run\" {{\n  type = string\n}}\n\noutput \"run\" {{\n  value = var.run\n}}\n",
            backend_block(self.version, &self.endpoints.s3, &self.endpoints.gateway, KEY)
        );
        std::fs::write(dir.join("main.tf"), config).map_err(|e| e.to_string())?;
        let out =
            self.terraform_cmd(unshare, dir, hostname, &["init", "-input=false", "-no-color"]).output().await.map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("terraform init failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    pub async fn play(self) -> Result<(), String> {
        let result = self.story().await;
        match &result {
            Ok(()) => println!("\nThe story played as it should: the dead runner's lock was released on evidence, and B proceeded."),
            Err(e) => println!("\nThe demo stopped: {e}"),
        }
        result
    }

    async fn story(&self) -> Result<(), String> {
        let Some((major, minor)) = self.version else {
            return Err(format!(
                "no Terraform at {}: install Terraform 1.x (https://developer.hashicorp.com/terraform/install) or pass --terraform PATH",
                self.terraform.display()
            ));
        };
        println!("statelock sandbox demo with Terraform {major}.{minor} ({})", self.terraform.display());
        let unshare = tokio::task::spawn_blocking(unshare_args).await.map_err(|e| e.to_string())??;
        let locks: Api<StateLock> = Api::namespaced(self.client.clone(), NAMESPACE);
        let lock_name = state_lock_name(&format!("{}/{KEY}", super::BUCKET));
        self.pod("atlantis-0").await?;
        self.pod("atlantis-1").await?;
        let (a_dir, b_dir) = (self.endpoints.dir.join("demo/runner-a"), self.endpoints.dir.join("demo/runner-b"));
        self.init(&unshare, &a_dir, "atlantis-0").await?;
        self.init(&unshare, &b_dir, "atlantis-1").await?;

        step(1, "runner A (pod atlantis-0) applies and holds the lock (its apply waits at the approval prompt)");
        let mut a: Child = self
            .terraform_cmd(&unshare, &a_dir, "atlantis-0", &["apply", "-no-color", "-var", "run=a"])
            .env("TF_INPUT", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        wait_for("A's lock, held by pod atlantis-0", Duration::from_secs(60), || async {
            locks.get_opt(&lock_name).await.ok().flatten().filter(|l| {
                l.status
                    .as_ref()
                    .and_then(|s| s.holder.as_ref())
                    .is_some_and(|h| h.state == HolderState::Alive && h.pod.as_deref() == Some("atlantis-0"))
            })
        })
        .await?;
        self.show(&["statelocks", "-o", "wide"]).await;

        let lock_files = !(major == 1 && minor < 11);
        if lock_files {
            step(
                2,
                "runner B (pod atlantis-1) wants the same state and waits on A's lock file (statelock does not see waiters on lock files: there is no S3 gateway)",
            );
        } else {
            step(2, "runner B (pod atlantis-1) wants the same state and waits (through the gateway: LockContended)");
        }
        let mut b = self
            .terraform_cmd(&unshare, &b_dir, "atlantis-1", &["apply", "-no-color", "-auto-approve", "-lock-timeout=120s", "-var", "run=b"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        // B's output, as it comes: Terraform says when it starts waiting for a lock.
        let b_out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(stdout) = b.stdout.take() {
            let out = b_out.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let mut o = out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    o.push_str(&l);
                    o.push('\n');
                }
            });
        }
        if lock_files {
            wait_for("runner B waiting for the lock", Duration::from_secs(60), || {
                let waiting = b_out.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains("Acquiring state lock");
                async move { waiting.then_some(()) }
            })
            .await?;
            println!("runner B: Acquiring state lock. This may take a few moments...");
            self.show(&["statelocks", "-o", "wide"]).await;
        } else {
            wait_for("LockContended naming atlantis-1", Duration::from_secs(30), || self.has_event("LockContended", "atlantis-1")).await?;
            self.show(&["statelocks", "-o", "wide"]).await;
            self.show(&["events", "--field-selector", "reason=LockContended"]).await;
        }

        step(3, "runner A's process is killed (SIGKILL) and its pod deleted: the lock is left behind");
        a.kill().await.map_err(|e| format!("kill A: {e}"))?;
        Api::<Pod>::namespaced(self.client.clone(), NAMESPACE)
            .delete("atlantis-0", &DeleteParams::default())
            .await
            .map_err(|e| format!("delete pod atlantis-0: {e}"))?;
        wait_for("HolderDied", Duration::from_secs(60), || self.has_event("HolderDied", "")).await?;
        wait_for("LockExpired", Duration::from_secs(60), || self.has_event("LockExpired", "root@atlantis-0")).await?;
        self.show(&["events"]).await;

        step(4, "runner B gets the lock and proceeds");
        let out = tokio::time::timeout(Duration::from_secs(150), b.wait_with_output())
            .await
            .map_err(|_| "B did not finish within 150 s".to_owned())?
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("B failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        println!("runner B: apply complete (output run = \"b\")");
        wait_for("B's release", Duration::from_secs(30), || async {
            locks.get_opt(&lock_name).await.ok().flatten().is_none().then_some(())
        })
        .await?;
        self.show(&["statelocks"]).await;
        self.show(&["events"]).await;
        Ok(())
    }
}
