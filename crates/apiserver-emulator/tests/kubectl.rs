//! Conformance: the real kubectl 1.32 against the emulator.

mod common;

use common::{Cluster, WIDGETS_CRD};

async fn with_widgets() -> Cluster {
    let c = Cluster::start().await;
    let crd = c.file("crd.yaml", WIDGETS_CRD);
    c.kubectl(&["apply", "--server-side", "-f", crd.to_str().expect("path")]).await.success();
    c.kubectl(&["wait", "--for=condition=established", "--timeout=10s", "crd/widgets.example.com"]).await.success();
    c
}

const W1: &str = "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n  color: blue\n  unknown: dropped\n";

#[tokio::test(flavor = "multi_thread")]
async fn get_prints_crd_printer_columns_with_wide_and_all_namespaces() {
    let c = with_widgets().await;
    let f = c.file("w1.yaml", W1);
    c.kubectl(&["apply", "-f", f.to_str().expect("path")]).await.success();

    let out = c.kubectl(&["get", "widgets"]).await.success();
    let rows = out.rows();
    assert_eq!(rows[0], ["NAME", "SIZE", "READY", "AGE"], "{}", out.stdout);
    assert_eq!(rows[1][..2], ["w1".to_owned(), "3".to_owned()], "{}", out.stdout);
    assert!(!out.log.contains("Falling back to hardcoded types"), "the server must answer with a Table");

    let wide = c.kubectl(&["get", "wd", "-o", "wide"]).await.success();
    assert_eq!(wide.rows()[0], ["NAME", "SIZE", "COLOR", "READY", "AGE"], "{}", wide.stdout);
    assert_eq!(wide.rows()[1][2], "blue");

    let all = c.kubectl(&["get", "widgets", "-A"]).await.success();
    assert_eq!(all.rows()[0][0], "NAMESPACE");
    assert_eq!(all.rows()[1][..2], ["default".to_owned(), "w1".to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_side_apply_then_reapply_merges_and_unknown_fields_are_pruned() {
    let c = with_widgets().await;
    let f = c.file("w1.yaml", W1);
    c.kubectl(&["apply", "-f", f.to_str().expect("path")]).await.success();
    let f2 = c.file("w1b.yaml", &W1.replace("size: 3", "size: 5"));
    let out = c.kubectl(&["apply", "-f", f2.to_str().expect("path")]).await.success();
    assert!(out.stdout.contains("configured"), "{}", out.stdout);
    assert!(out.log.contains("application/merge-patch+json"), "kubectl re-applies CRs with a JSON merge patch");
    let size = c.kubectl(&["get", "widget", "w1", "-o", "jsonpath={.spec.size}"]).await.success();
    assert_eq!(size.stdout, "5");
    let spec = c.kubectl(&["get", "widget", "w1", "-o", "jsonpath={.spec}"]).await.success();
    assert!(!spec.stdout.contains("unknown"), "unknown fields are pruned: {}", spec.stdout);
    let generation = c.kubectl(&["get", "widget", "w1", "-o", "jsonpath={.metadata.generation}"]).await.success();
    assert_eq!(generation.stdout, "2");
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_violations_are_rejected_with_the_apiserver_message() {
    let c = with_widgets().await;
    let f = c.file("bad.yaml", "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: bad\nspec:\n  size: -1\n  color: green\n");
    let out = c.kubectl(&["apply", "--server-side", "-f", f.to_str().expect("path")]).await.failure();
    assert!(out.stderr.contains("Unsupported value: \"green\": supported values: \"red\", \"blue\""), "{}", out.stderr);
    assert!(out.stderr.contains("spec.size: Invalid value: -1"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_patch_goes_through_the_subresource_only() {
    let c = with_widgets().await;
    let f = c.file("w1.yaml", W1);
    c.kubectl(&["apply", "--server-side", "-f", f.to_str().expect("path")]).await.success();
    c.kubectl(&[
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"spec":{"size":99},"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ])
    .await
    .success();
    let out = c.kubectl(&["get", "widgets"]).await.success();
    assert_eq!(out.rows()[1][2], "True", "{}", out.stdout);
    assert_eq!(out.rows()[1][1], "3", "a /status patch must not change spec");
    let generation = c.kubectl(&["get", "widget", "w1", "-o", "jsonpath={.metadata.generation}"]).await.success();
    assert_eq!(generation.stdout, "1", "status writes do not bump generation");
    // The main endpoint ignores status.
    c.kubectl(&["patch", "widget", "w1", "--type=merge", "-p", r#"{"status":{"phase":"Main"}}"#]).await.success();
    let phase = c.kubectl(&["get", "widget", "w1", "-o", "jsonpath={.status.phase}"]).await.success();
    assert_eq!(phase.stdout, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_waits_for_finalizers_and_wait_for_delete_returns() {
    let c = with_widgets().await;
    let f = c.file(
        "w2.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w2\n  finalizers: [example.com/hold]\nspec:\n  size: 1\n",
    );
    c.kubectl(&["apply", "--server-side", "-f", f.to_str().expect("path")]).await.success();
    c.kubectl(&["delete", "widget", "w2", "--wait=false"]).await.success();
    let ts = c.kubectl(&["get", "widget", "w2", "-o", "jsonpath={.metadata.deletionTimestamp}"]).await.success();
    assert!(!ts.stdout.is_empty(), "a finalizer keeps the object, with deletionTimestamp set");
    c.kubectl(&["patch", "widget", "w2", "--type=json", "-p", r#"[{"op":"remove","path":"/metadata/finalizers"}]"#]).await.success();
    c.kubectl(&["wait", "--for=delete", "--timeout=10s", "widget/w2"]).await.success();
    let gone = c.kubectl(&["get", "widget", "w2"]).await.failure();
    assert!(gone.stderr.contains("widgets.example.com \"w2\" not found"), "{}", gone.stderr);

    let f3 = c.file("w3.yaml", "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w3\nspec:\n  size: 1\n");
    c.kubectl(&["apply", "--server-side", "-f", f3.to_str().expect("path")]).await.success();
    let del = c.kubectl(&["delete", "widget", "w3"]).await.success();
    assert!(del.stdout.contains("widget.example.com \"w3\" deleted"), "{}", del.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_listed_and_shown_by_describe() {
    let c = with_widgets().await;
    let f = c.file("w1.yaml", W1);
    c.kubectl(&["apply", "--server-side", "-f", f.to_str().expect("path")]).await.success();
    let uid = c.kubectl(&["get", "widget", "w1", "-o", "jsonpath={.metadata.uid}"]).await.success().stdout;
    let event = format!(
        r#"{{"apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{{"name":"w1.1","namespace":"default"}},"eventTime":"2026-11-26T10:00:00.000000Z","action":"Check","reason":"WidgetChecked","note":"the widget was checked","type":"Warning","regarding":{{"apiVersion":"example.com/v1","kind":"Widget","name":"w1","namespace":"default","uid":"{uid}"}},"reportingController":"example.com/checker","reportingInstance":"checker-0"}}"#
    );
    let ef = c.file("event.json", &event);
    c.kubectl(&["create", "-f", ef.to_str().expect("path")]).await.success();
    let events = c.kubectl(&["get", "events"]).await.success();
    let rows = events.rows();
    assert_eq!(rows[0], ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"], "{}", events.stdout);
    assert_eq!(rows[1][1..], ["Warning".to_owned(), "WidgetChecked".into(), "widget/w1".into(), "the widget was checked".into()]);
    let described = c.kubectl(&["describe", "widget", "w1"]).await.success();
    assert!(described.stdout.contains("WidgetChecked"), "describe lists the widget's events:\n{}", described.stdout);
    assert!(described.stdout.contains("the widget was checked"), "{}", described.stdout);
    let core = c.kubectl(&["get", "events", "-o", "jsonpath={.items[0].message}"]).await.success();
    assert_eq!(core.stdout, "the widget was checked", "core/v1 view maps note to message");
}

#[tokio::test(flavor = "multi_thread")]
async fn imperative_creates_and_built_in_printers_work() {
    let c = Cluster::start().await;
    c.kubectl(&["create", "namespace", "team-a"]).await.success();
    c.kubectl(&["create", "configmap", "cfg", "-n", "team-a", "--from-literal=a=b"]).await.success();
    c.kubectl(&["create", "secret", "generic", "creds", "-n", "team-a", "--from-literal=AWS_ACCESS_KEY_ID=AKIA"]).await.success();
    let secret = c.kubectl(&["get", "secret", "creds", "-n", "team-a", "-o", "jsonpath={.data.AWS_ACCESS_KEY_ID}"]).await.success();
    assert_eq!(secret.stdout, "QUtJQQ==");
    let ns = c.kubectl(&["get", "ns", "team-a"]).await.success();
    assert_eq!(ns.rows()[0], ["NAME", "STATUS", "AGE"]);
    assert_eq!(ns.rows()[1][..2], ["team-a".to_owned(), "Active".to_owned()]);
    let missing = c.kubectl(&["create", "configmap", "x", "-n", "nope"]).await.failure();
    assert!(missing.stderr.contains("namespaces \"nope\" not found"), "{}", missing.stderr);
    c.kubectl(&["delete", "namespace", "team-a"]).await.success();
    let gone = c.kubectl(&["get", "configmap", "cfg", "-n", "team-a"]).await.failure();
    assert!(gone.stderr.contains("not found"), "deleting a namespace deletes its contents");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_conflicts_between_managers() {
    let c = with_widgets().await;
    let f = c.file("w1.yaml", "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n");
    c.kubectl(&["apply", "--server-side", "--field-manager=alice", "-f", f.to_str().expect("path")]).await.success();
    let f2 = c.file("w1b.yaml", "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 4\n");
    let out = c.kubectl(&["apply", "--server-side", "--field-manager=bob", "-f", f2.to_str().expect("path")]).await.failure();
    assert!(out.stderr.contains("conflict with \"alice\""), "{}", out.stderr);
    assert!(out.stderr.contains(".spec.size"), "{}", out.stderr);
    c.kubectl(&["apply", "--server-side", "--field-manager=bob", "--force-conflicts", "-f", f2.to_str().expect("path")]).await.success();
    let mf =
        c.kubectl(&["get", "widget", "w1", "--show-managed-fields", "-o", "jsonpath={.metadata.managedFields[*].manager}"]).await.success();
    assert!(mf.stdout.contains("bob"), "{}", mf.stdout);
    // Same value from a second manager: shared ownership, no conflict.
    c.kubectl(&["apply", "--server-side", "--field-manager=carol", "-f", f2.to_str().expect("path")]).await.success();
}

#[tokio::test(flavor = "multi_thread")]
async fn get_watch_prints_table_rows_as_objects_change() {
    let c = with_widgets().await;
    let kubeconfig = c.kubeconfig.clone();
    let cache = c.dir.path().join("kube-cache");
    // `kubectl get -w` runs until stopped; coreutils `timeout` ends it after 4 s.
    let watcher = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .args([
                "4",
                "kubectl",
                &format!("--kubeconfig={}", kubeconfig.display()),
                &format!("--cache-dir={}", cache.display()),
                "get",
                "widgets",
                "-w",
            ])
            .output()
            .expect("timeout and kubectl")
    });
    // The watch's first listing is empty; wait until kubectl has its watch open before writing.
    common::eventually(std::time::Duration::from_secs(3), "kubectl's watch to open", || {
        let n = c.emulator.api.lock().store.watcher_count();
        async move { (n > 0).then_some(()) }
    })
    .await;
    let f = c.file("w1.yaml", W1);
    c.kubectl(&["apply", "--server-side", "-f", f.to_str().expect("path")]).await.success();
    c.kubectl(&["patch", "widget", "w1", "--type=merge", "-p", r#"{"spec":{"size":7}}"#]).await.success();
    let out = watcher.await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = stdout.lines().collect();
    assert!(rows.first().is_some_and(|h| h.starts_with("NAME") && h.contains("SIZE")), "a header from the server's columns:\n{stdout}");
    assert!(rows.iter().any(|r| r.starts_with("w1") && r.split_whitespace().nth(1) == Some("3")), "{stdout}");
    assert!(rows.iter().any(|r| r.starts_with("w1") && r.split_whitespace().nth(1) == Some("7")), "{stdout}");
}
