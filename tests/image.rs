//! The container image, built and run offline with Debian's podman: the final stage of the
//! `Containerfile` (an empty base with the binary, exactly the shared libraries it links and the
//! CA bundle, made by `.ci/image-rootfs`) around this test build's binary. It runs as 65532 with a
//! read-only root filesystem against the API emulator, opens `/readyz`, and exits 0 on SIGTERM.
//! Needs root, podman and runc (bash .ci/install installs them). The release image's size is
//! measured with the commands in the README, not here (this binary is a debug build, unless
//! `STATELOCK_IMAGE_BINARY` names another, e.g. a release build with the Containerfile's flags).

mod common;

use std::{
    process::{Command, Output},
    time::Duration,
};

use common::{TestCluster, eventually, free_port, http_request, repo_root};

/// podman as this machine allows it: runc with cgroupfs (crun refuses the hybrid cgroup layout
/// of these machines), and ulimits no higher than the hard limits here.
fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .args(args)
        .output()
        .expect("podman (apt-get install podman runc; bash .ci/install)")
}

fn ok(out: &Output, what: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what}: {text}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_runs_as_65532_read_only_opens_readyz_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let rootfs = dir.path().join("rootfs");
    let built = Command::new("sh")
        .arg(repo_root().join(".ci/image-rootfs"))
        .arg(std::env::var("STATELOCK_IMAGE_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_statelock").to_owned()))
        .arg(&rootfs)
        .output()
        .expect("sh");
    ok(&built, ".ci/image-rootfs");
    // The Containerfile's final stage, with the root filesystem made here instead of in its
    // build stage (which needs the network for its base image).
    let containerfile = std::fs::read_to_string(repo_root().join("Containerfile")).expect("Containerfile");
    let final_stage = containerfile.split("FROM scratch").nth(1).expect("a FROM scratch stage");
    assert!(final_stage.contains("COPY --from=build /rootfs/ /") && final_stage.contains("USER 65532:65532"), "{final_stage}");
    std::fs::write(
        dir.path().join("Containerfile"),
        format!("FROM scratch{}", final_stage.replace("COPY --from=build /rootfs/ /", "COPY rootfs/ /")),
    )
    .expect("write");
    let tag = format!("localhost/statelock-test:{}", std::process::id());
    ok(&podman(&["build", "--quiet", "-t", &tag, &dir.path().display().to_string()]), "podman build");
    let size = ok(&podman(&["image", "inspect", "--format", "{{.Size}}", &tag]), "inspect");
    println!("image {tag}: {:.1} MB", size.parse::<f64>().unwrap_or(0.0) / 1e6);
    // Nothing but the binary, its libraries and the CA bundle: no shell.
    let shell = podman(&[
        "run",
        "--rm",
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
        "--entrypoint",
        "/bin/sh",
        &tag,
        "-c",
        "true",
    ]);
    assert!(!shell.status.success(), "the image has no shell");

    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).expect("dir");
    std::fs::copy(&cluster.kubeconfig, config_dir.join("kubeconfig")).expect("kubeconfig");
    // Readable by the container's user (65532).
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [(config_dir.clone(), 0o755), (config_dir.join("kubeconfig"), 0o644)] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let admin_port = free_port();
    let name = format!("statelock-test-{}", std::process::id());
    let volume = format!("{}:/config:ro", config_dir.display());
    let admin = format!("127.0.0.1:{admin_port}");
    ok(
        &podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--read-only",
            "--user",
            "65532:65532",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
            "-v",
            &volume,
            "-e",
            "KUBECONFIG=/config/kubeconfig",
            &tag,
            "run",
            "--leader-election=false",
            "--admin-addr",
            &admin,
            "--pod-name",
            "image-test",
        ]),
        "podman run",
    );
    let logs = || {
        let out = podman(&["logs", &name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    eventually(Duration::from_secs(60), "/readyz 200 from the container", || async {
        (std::net::TcpStream::connect(&admin).is_ok() && http_request("GET", &format!("http://{admin}/readyz"), "") == 200).then_some(())
    })
    .await;
    let user = ok(&podman(&["inspect", "--format", "{{.Config.User}}", &name]), "inspect user");
    assert_eq!(user, "65532:65532");
    ok(&podman(&["kill", "--signal", "TERM", &name]), "SIGTERM");
    let code = ok(&podman(&["wait", &name]), "wait");
    let log = logs();
    assert_eq!(code, "0", "exit code on SIGTERM; logs: {log}");
    assert!(log.contains("stopped"), "a clean shutdown is logged: {log}");
    let _ = podman(&["rm", "-f", &name]);
    let _ = podman(&["rmi", "-f", &tag]);
}
