//! The chart's alerts (charts/statelock/files/prometheus-rules.yaml) against the operator's real
//! `/metrics`: a running operator (moto, the API emulator, the gateway) is brought to the states
//! the alerts are about (a dead holder in Observe mode, a LockSource that cannot be read, a
//! gateway call); every metric a rule names must be in its exposition; then the real Prometheus
//! tools check the rules and run unit tests whose input series carry the label sets the operator
//! exposed (`promtool check rules`, `promtool test rules`; Debian's `prometheus` package, installed
//! by .ci/install).

mod common;

use std::{collections::BTreeSet, process::Command, time::Duration};

use common::{DynamoServer, Operator, TestCluster, eventually, http_fetch_with, metric, repo_root, take_lock};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::DeleteParams};
use serde_json::json;

const NS: &str = "terraform";
const TABLE: &str = "tf-locks";
const LOCK: &str = "tfstate/app/terraform.tfstate";

fn rules_file() -> std::path::PathBuf {
    repo_root().join("charts/statelock/files/prometheus-rules.yaml")
}

/// The metric names the rules' expressions use.
fn names_in_rules() -> BTreeSet<String> {
    let text = std::fs::read_to_string(rules_file()).expect("rules");
    let doc: serde_json::Value = serde_saphyr::from_str(&text).expect("yaml");
    let mut out = BTreeSet::new();
    for group in doc["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("statelock_") {
                let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[i + name.len()..];
                out.insert(name);
            }
        }
    }
    out
}

/// The metric names the dashboard's panels use.
fn names_in_dashboard() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("charts/statelock/files/grafana-dashboard.json")).expect("dashboard");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut out = BTreeSet::new();
    for panel in doc["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for prefix in ["statelock_", "process_"] {
                let mut rest = expr;
                while let Some(i) = rest.find(prefix) {
                    let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    rest = &rest[i + name.len()..];
                    out.insert(name);
                }
            }
        }
    }
    out
}

/// The label set (`{a="b",...}`) of the first exposed sample of `series` whose labels contain
/// every `must` pair.
fn labels_of(text: &str, series: &str, must: &[(&str, &str)]) -> Option<String> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let labels = rest.strip_prefix('{')?.split_once('}')?.0;
        must.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))).then(|| format!("{{{labels}}}"))
    })
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool").args(args).output().expect("promtool (Debian's prometheus package; bash .ci/install)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn every_alert_names_real_metrics_and_fires_on_the_series_the_operator_exposes() {
    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace(NS).await;
    let source = |table: &str| {
        json!({
            "dynamodb": {"tableName": table, "region": "us-east-1", "endpoint": moto.url()},
            "sync": {"mode": "Scan", "interval": "1s"},
            "holders": {"hostnamePattern": "runner-[0-9]+"},
            "expiry": {"mode": "Observe", "gracePeriod": "0s"},
            "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}
        })
    };
    cluster.create_lock_source(NS, "prod-locks", source(TABLE)).await;
    // A LockSource whose table does not exist: not Ready, and the mirror's errors are counted.
    cluster.create_lock_source(NS, "missing-table", source("no-such-table")).await;
    cluster.running_pod(NS, "runner-0").await;
    take_lock(&db, TABLE, LOCK, "11111111-2222-3333-4444-555555555555", "root@runner-0").await;
    let gateway_port = common::free_port();
    let op = Operator::start_with_gateway(&cluster, gateway_port);
    eventually(Duration::from_secs(30), "the operator Ready", || async { op.ready().then_some(()) }).await;
    // The holder dies; in Observe mode the lock stays, and the leader counts it as Dead.
    eventually(Duration::from_secs(30), "a StateLock", || async {
        Api::<statelock::crd::StateLock>::namespaced(cluster.client(), NS)
            .get_opt(&statelock::crd::state_lock_name(LOCK))
            .await
            .ok()
            .flatten()
    })
    .await;
    Api::<Pod>::namespaced(cluster.client(), NS).delete("runner-0", &DeleteParams::default()).await.expect("delete pod");
    // One gateway call, so that its request counter has a series.
    let (status, _) = http_fetch_with(
        "POST",
        &format!("http://127.0.0.1:{gateway_port}/"),
        &json!({"TableName": TABLE}).to_string(),
        &[("X-Amz-Target", "DynamoDB_20120810.DescribeTable"), ("Content-Type", "application/x-amz-json-1.0")],
    );
    assert!(status > 0, "the gateway answered");
    let text = eventually(Duration::from_secs(60), "Dead counted, the broken LockSource not Ready, a mirror error", || async {
        let t = op.metrics();
        let dead = metric(&t, &format!("statelock_locks_by_holder_state{{namespace=\"{NS}\",source=\"prod-locks\",state=\"Dead\"}}"));
        let not_ready = metric(&t, &format!("statelock_locksource_ready{{namespace=\"{NS}\",source=\"missing-table\"}}"));
        let errors = labels_of(&t, "statelock_reconcile_errors_total", &[("controller", "mirror")]);
        (dead == Some(1.0) && not_ready == Some(0.0) && errors.is_some()).then_some(t)
    })
    .await;
    assert_eq!(metric(&text, &format!("statelock_locksource_ready{{namespace=\"{NS}\",source=\"prod-locks\"}}")), Some(1.0));
    assert_eq!(metric(&text, "statelock_leader"), Some(1.0));
    assert!(text.contains("# TYPE statelock_build_info gauge") && text.contains("statelock_build_info{version=\""), "{text}");
    let positive = |m: &str| {
        let v = metric(&text, m).unwrap_or_else(|| panic!("{m}: {text}"));
        assert!(v > 0.0, "{m} = {v}");
        v
    };
    for m in ["process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total", "process_start_time_seconds"] {
        positive(m);
    }
    // The allocator's own figures: what is allocated lies in active pages, which are resident.
    let heap = ["allocated", "active", "metadata", "resident"].map(|k| positive(&format!("statelock_heap_{k}_bytes")));
    assert!(heap[0] <= heap[1] && heap[1] <= heap[3], "allocated <= active <= resident: {heap:?}");
    assert!(text.trim_end().ends_with("# EOF") && text.matches("# EOF").count() == 1, "one OpenMetrics exposition");

    // A family appears once it has a series: a lock taken through the gateway (a lock attempt)
    // and the dead holder's lock released on request (an expiration).
    let put = json!({
        "TableName": TABLE,
        "Item": {"LockID": {"S": "tfstate/gw/terraform.tfstate"}, "Info": {"S": common::terraform_info("22222222-2222-3333-4444-555555555555", "ci@laptop", "tfstate/gw/terraform.tfstate", "2026-11-30T10:00:00Z")}},
        "ConditionExpression": "attribute_not_exists(LockID)"
    });
    let (status, body) = http_fetch_with(
        "POST",
        &format!("http://127.0.0.1:{gateway_port}/"),
        &put.to_string(),
        &[("X-Amz-Target", "DynamoDB_20120810.PutItem"), ("Content-Type", "application/x-amz-json-1.0")],
    );
    assert_eq!(status, 200, "{body}");
    Api::<statelock::crd::StateLock>::namespaced(cluster.client(), NS)
        .patch(
            &statelock::crd::state_lock_name(LOCK),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"annotations": {"statelock.dev/force-unlock": "11111111-2222-3333-4444-555555555555"}}}),
            ),
        )
        .await
        .expect("annotate");
    let later = eventually(Duration::from_secs(60), "an expiration and a lock attempt counted", || async {
        let t = op.metrics();
        (labels_of(&t, "statelock_expirations_total", &[("reason", "ForceUnlock")]).is_some()
            && labels_of(&t, "statelock_gateway_lock_attempts_total", &[]).is_some())
        .then_some(t)
    })
    .await;

    // Every metric the rules and the dashboard name is exposed (a counter's family is `x`, its
    // samples `x_total`; a unit is part of the name).
    let panels = names_in_dashboard();
    assert!(panels.len() >= 8, "{panels:?}");
    for name in names_in_rules().into_iter().chain(panels) {
        let family = name.strip_suffix("_total").unwrap_or(&name);
        let exposed = |t: &str| t.contains(&format!("# TYPE {family} "));
        assert!(exposed(&text) || exposed(&later), "{name} is named by a rule or panel, and the operator does not expose it");
    }

    // Unit tests for promtool, on the label sets the operator exposed.
    let dead = labels_of(&text, "statelock_locks_by_holder_state", &[("state", "Dead")]).expect("Dead series");
    let ready = labels_of(&text, "statelock_locksource_ready", &[("source", "prod-locks")]).expect("ready series");
    let broken = labels_of(&text, "statelock_locksource_ready", &[("source", "missing-table")]).expect("not ready series");
    let oldest = labels_of(&text, "statelock_lock_oldest_age_seconds", &[("source", "prod-locks")]).expect("oldest age series");
    let mirror_errors = labels_of(&text, "statelock_reconcile_errors_total", &[("controller", "mirror")]).expect("mirror errors");
    // The expiry controller's errors carry the same labels with controller="expiry".
    let expiry_errors = mirror_errors.replace("controller=\"mirror\"", "controller=\"expiry\"");
    let gw_ok = labels_of(&text, "statelock_gateway_requests_total", &[]).expect("a gateway request series");
    let gw_failed = {
        let result = gw_ok.split("result=\"").nth(1).and_then(|r| r.split('"').next()).expect("result label").to_owned();
        gw_ok.replace(&format!("result=\"{result}\""), "result=\"InternalServerError\"")
    };
    // The unit tests compare labels; annotations (checked as templates by `promtool check rules`)
    // are left out of the copy they run on, so that wording can change without touching the test.
    let dir = tempfile::tempdir().expect("dir");
    let mut doc: serde_json::Value = serde_saphyr::from_str(&std::fs::read_to_string(rules_file()).expect("rules")).expect("yaml");
    for group in doc["groups"].as_array_mut().expect("groups") {
        for rule in group["rules"].as_array_mut().expect("rules") {
            rule.as_object_mut().expect("rule").remove("annotations");
        }
    }
    let rules_copy = dir.path().join("rules.json");
    std::fs::write(&rules_copy, doc.to_string()).expect("write rules");
    let tests = format!(
        r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'statelock_locks_by_holder_state{dead}'
        values: '1x30'
      - series: 'statelock_locksource_ready{ready}'
        values: '1x30'
      - series: 'statelock_locksource_ready{broken}'
        values: '0x30'
      - series: 'statelock_lock_oldest_age_seconds{oldest}'
        values: '3600+600x30'
      - series: 'statelock_reconcile_errors_total{mirror_errors}'
        values: '0x30'
      - series: 'statelock_reconcile_errors_total{expiry_errors}'
        values: '0+3x30'
      - series: 'statelock_leader'
        values: '0x30'
      - series: 'statelock_gateway_requests_total{gw_ok}'
        values: '0+60x30'
      - series: 'statelock_gateway_requests_total{gw_failed}'
        values: '0+30x30'
    alert_rule_test:
      - eval_time: 5m
        alertname: StateLockDeadHolderNotReleased
        exp_alerts: []
      - eval_time: 15m
        alertname: StateLockDeadHolderNotReleased
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: {NS}, source: prod-locks}}
      - eval_time: 15m
        alertname: StateLockSourceNotReady
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: {NS}, source: missing-table}}
      - eval_time: 10m
        alertname: StateLockStale
        exp_alerts: []
      - eval_time: 20m
        alertname: StateLockStale
        exp_alerts:
          - exp_labels: {{severity: info, namespace: {NS}, source: prod-locks}}
      - eval_time: 20m
        alertname: StateLockExpiryErrors
        exp_alerts:
          - exp_labels: {{severity: warning, category: {category}}}
      - eval_time: 10m
        alertname: StateLockNoLeader
        exp_alerts:
          - exp_labels: {{severity: critical}}
      - eval_time: 15m
        alertname: StateLockGatewayErrors
        exp_alerts:
          - exp_labels: {{severity: warning}}
"#,
        rules = rules_copy.display(),
        category = mirror_errors.split("category=\"").nth(1).and_then(|r| r.split('"').next()).expect("category"),
    );
    let file = dir.path().join("alerts.test.yaml");
    std::fs::write(&file, tests).expect("write");
    promtool(&["check", "rules", &rules_file().display().to_string()]);
    let out = promtool(&["test", "rules", &file.display().to_string()]);
    assert!(out.contains("SUCCESS"), "{out}");
    op.stop().await;
}
