//! The `apiserver-emulator` binary and its HTTP test hooks.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

fn http(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).expect("path");
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn the_binary_prints_its_url_serves_kubectl_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let kubeconfig = dir.path().join("kc");
    let mut child = Command::new(env!("CARGO_BIN_EXE_apiserver-emulator"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kubeconfig)
        .args(["--manual-clock", "2026-01-01T00:00:00Z", "--deterministic-uids"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut url = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut url).expect("first line is the URL");
    let url = url.trim().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let out = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--cache-dir={}", dir.path().join("cache").display()))
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "namespace/default\nnamespace/kube-node-lease\nnamespace/kube-public\nnamespace/kube-system\n"
    );

    // Test hooks over HTTP.
    let (code, ns) = http("GET", &format!("{url}/api/v1/namespaces/default"), None);
    assert_eq!(code, 200);
    assert_eq!(ns["metadata"]["uid"], "00000000-0000-4000-8000-000000000001", "deterministic UIDs");
    assert_eq!(ns["metadata"]["creationTimestamp"], "2026-01-01T00:00:00Z", "the manual clock");
    let (code, now) = http("POST", &format!("{url}/emulator/clock"), Some(json!({"advanceSeconds": 3600})));
    assert_eq!((code, now["now"].as_str()), (200, Some("2026-01-01T01:00:00Z")));
    let (_, faults) = http("POST", &format!("{url}/emulator/faults"), Some(json!({"nextWrites": [500]})));
    assert_eq!(faults["nextWrites"], json!([500]));
    let (code, _) = http("POST", &format!("{url}/api/v1/namespaces/default/configmaps"), Some(json!({"metadata": {"name": "x"}})));
    assert_eq!(code, 500, "the injected fault answers the next write");
    let (code, _) = http("POST", &format!("{url}/api/v1/namespaces/default/configmaps"), Some(json!({"metadata": {"name": "x"}})));
    assert_eq!(code, 201);
    let (_, counters) = http("GET", &format!("{url}/emulator/counters"), None);
    assert_eq!(counters["writes"]["configmaps"], 1);
    let (_, compacted) = http("POST", &format!("{url}/emulator/compact"), None);
    assert_eq!(compacted["revision"], counters["revision"]);
    let (code, _) = http("POST", &format!("{url}/emulator/drop-watches"), None);
    assert_eq!(code, 200);

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the emulator did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
