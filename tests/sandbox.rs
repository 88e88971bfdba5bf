//! `statelock sandbox`: the demo end to end with real Terraform, the sandbox as a user drives it
//! (its printed commands, its files, Terraform against them, Ctrl-C), and the README's quickstart
//! followed literally.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::repo_root;

/// A PATH with a Terraform 1.x (the machine's, else the one .ci/install puts in .tools) and kubectl.
fn path_with_terraform() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let has = Command::new("terraform").arg("version").output().is_ok_and(|o| o.status.success());
    if has { path } else { format!("{}:{path}", repo_root().join(".tools/bin115").display()) }
}

fn statelock() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_statelock"));
    cmd.env("PATH", path_with_terraform()).env("STATELOCK_LOG", "warn").env_remove("KUBECONFIG").stdin(Stdio::null());
    cmd
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> (bool, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return (status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("timed out after {timeout:?}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_story(ok: bool, out: &str) {
    assert!(ok, "the demo failed:\n{out}");
    for step in 1..=4 {
        assert!(out.contains(&format!("=== step {step}:")), "step {step} shown:\n{out}");
    }
    // What kubectl showed along the way.
    assert!(out.contains("atlantis-0") && out.contains("Alive"), "the held lock with its live holder:\n{out}");
    for reason in ["HolderDied", "LockExpired"] {
        assert!(out.contains(reason), "{reason} in the events shown:\n{out}");
    }
    // Terraform 1.11+ plays with lock files (whose waiters are not seen); older Terraform with
    // DynamoDB items through the gateway (LockContended).
    assert!(
        (out.contains("waits on A's lock file") && out.contains("STORED-IN") && out.contains("S3")) || out.contains("LockContended"),
        "runner B's wait shown:\n{out}"
    );
    assert!(out.contains("The story played as it should"), "{out}");
}

#[test]
fn the_demo_plays_the_story_with_real_terraform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = statelock();
    cmd.args(["sandbox", "--demo", "--dir"]).arg(dir.path());
    let (ok, out) = run_with_timeout(cmd, Duration::from_secs(300));
    assert_story(ok, &out);
}

#[test]
fn without_terraform_the_demo_says_how_to_get_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = statelock();
    cmd.args(["sandbox", "--demo", "--terraform", "/nonexistent/terraform", "--dir"]).arg(dir.path());
    let (ok, out) = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(!ok, "no Terraform, no story");
    assert!(out.contains("no Terraform at /nonexistent/terraform") && out.contains("developer.hashicorp.com/terraform/install"), "{out}");
}

/// The sandbox as a user drives it: start it, run what it prints, point a real Terraform at the
/// files it wrote, then Ctrl-C.
#[test]
fn the_sandbox_prints_what_to_run_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child =
        statelock().args(["sandbox", "--dir"]).arg(dir.path()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if line.contains("Ctrl-C stops everything") {
                let _ = tx.send(text.clone());
            }
        }
    });
    let printed = rx.recv_timeout(Duration::from_secs(60)).expect("the sandbox prints its instructions");
    let kubeconfig = dir.path().canonicalize().expect("dir").join("kubeconfig");
    let watch = format!("kubectl --kubeconfig {} get statelocks -n terraform -o wide -w", kubeconfig.display());
    assert!(printed.contains(&watch), "{printed}");
    for f in ["kubeconfig", "env.sh", "backend.tf"] {
        assert!(dir.path().join(f).exists(), "{f} written");
    }
    // The printed command, without -w (a test cannot watch forever).
    let get = |what: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("get")
            .args(what)
            .args(["-n", "terraform"])
            .output()
            .expect("kubectl");
        assert!(out.status.success(), "kubectl get {what:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(get(&["locksources"]).contains("sandbox"));
    // A real Terraform with the backend block the sandbox wrote: init, apply.
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("work");
    std::fs::copy(dir.path().join("backend.tf"), work.join("backend.tf")).expect("backend.tf");
    std::fs::write(work.join("main.tf"), "output \"hello\" {\n  value = \"sandbox\"\n}\n").expect("main.tf");
    let tf = |args: &[&str]| {
        let out = Command::new("terraform")
            .args(args)
            .current_dir(&work)
            .env("PATH", path_with_terraform())
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_IN_AUTOMATION", "1")
            .output()
            .expect("terraform");
        assert!(
            out.status.success(),
            "terraform {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tf(&["init", "-input=false", "-no-color"]);
    // The apply holds the lock at its prompt until the StateLock is seen (a lock file is listed
    // every second: an apply quicker than that could come and go unseen), then goes on.
    let mut apply = Command::new("terraform")
        .args(["apply", "-no-color"])
        .current_dir(&work)
        .env("PATH", path_with_terraform())
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_IN_AUTOMATION", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("terraform apply");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get(&["statelocks"]).contains("demo/terraform.tfstate") {
        assert!(Instant::now() < deadline, "the StateLock of the apply's lock");
        assert!(apply.try_wait().expect("wait").is_none(), "the apply ended before its lock was seen");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::io::Write::write_all(&mut apply.stdin.take().expect("stdin"), b"yes\n").expect("answer");
    let out = apply.wait_with_output().expect("apply");
    assert!(out.status.success(), "terraform apply: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // statelock saw the lock taken and released.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let events = get(&["events"]);
        if events.contains("LockAcquired") && events.contains("LockReleased") {
            break;
        }
        assert!(Instant::now() < deadline, "LockAcquired and LockReleased after an apply:\n{events}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Ctrl-C stops everything cleanly.
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "exit 0 after Ctrl-C, got {status}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the sandbox did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The README's quickstart, exactly as written: its first command is run as a user would type it
/// in the repository; its second (`bash .ci/run`) is how CI runs this very test, so it is checked
/// to be that command rather than run recursively.
#[test]
fn the_readme_quickstart_works_as_written() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    let section = readme.split("## Quick start").nth(1).expect("a Quick start section");
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("the quickstart commands");
    let commands: Vec<&str> = block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert_eq!(commands.len(), 2, "two commands: {commands:?}");
    assert_eq!(commands[1], "bash .ci/run");
    assert!(repo_root().join(".ci/run").exists());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", commands[0]])
        .current_dir(repo_root())
        .env("PATH", path_with_terraform())
        .env("STATELOCK_SANDBOX_DIR", dir.path())
        .env("STATELOCK_LOG", "warn")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null());
    let (ok, out) = run_with_timeout(cmd, Duration::from_secs(600));
    assert_story(ok, &out);
}
