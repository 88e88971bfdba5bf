//! The Helm chart: lint and render with every toggle, validate the output offline, keep its CRDs
//! equal to crds/, keep its RBAC equal to the README's table, and run a full mirror, expiry and
//! gateway cycle as the chart's ServiceAccount against the API emulator with RBAC on.
//!
//! Helm itself is the Helm 4 engine embedded in helm-python-sdk (tests/fixtures/helm.py); there
//! is no helm binary on these machines.

mod common;

use std::{collections::BTreeSet, path::Path, time::Duration};

use apiserver_emulator::User;
use common::{DynamoServer, Operator, TestCluster, eventually, free_port, python_tool, repo_root, terraform_info};
use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use statelock::crd::{StateLock, state_lock_name};

const CHART: &str = "charts/statelock";
const RELEASE: &str = "sl";
const NAMESPACE: &str = "statelock-system";

fn helm(args: &[&str]) -> std::process::Output {
    python_tool("python")
        .arg(repo_root().join("tests/fixtures/helm.py"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("python (bash .ci/install)")
}

/// `helm template` with these values (and API versions the cluster offers): the YAML stream.
fn render_text(release: &str, values: &Value, api_versions: &[&str]) -> Result<String, String> {
    let values = values.to_string();
    let mut args = vec!["template", CHART, release, NAMESPACE, values.as_str()];
    args.extend_from_slice(api_versions);
    let out = helm(&args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text).expect("rendered YAML parses").into_iter().filter(|d| !d.is_null()).collect()
}

fn render(values: &Value, api_versions: &[&str]) -> Vec<Value> {
    docs(&render_text(RELEASE, values, api_versions).unwrap_or_else(|e| panic!("render {values}: {e}")))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn container(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn env_value<'a>(docs: &'a [Value], name: &str) -> Option<&'a Value> {
    container(docs)["env"].as_array().and_then(|e| e.iter().find(|v| v["name"] == name))
}

/// kubernetes-validate --strict on the built-in kinds; custom resources against their CRD.
fn validate(text: &str, docs: &[Value], dir: &Path) {
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, text).expect("write");
    let out = python_tool("kubernetes-validate").arg("--strict").arg(&file).output().expect("kubernetes-validate (bash .ci/install)");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !report.contains("ERROR"), "kubernetes-validate: {report}");
    let builtin =
        docs.iter().filter(|d| !matches!(d["apiVersion"].as_str(), Some("statelock.dev/v1alpha1" | "monitoring.coreos.com/v1"))).count();
    assert_eq!(report.matches("passed for resource").count(), builtin, "every built-in object validated: {report}");
    for ls in &default_lock_sources(docs) {
        let crd = statelock::crd::all().into_iter().find(|c| c.spec.names.kind == "LockSource").expect("LockSource CRD");
        let schema = serde_json::to_value(&crd.spec.versions[0].schema.as_ref().expect("schema").open_api_v3_schema).expect("schema");
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let errors: Vec<String> = validator.iter_errors(ls).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "LockSource from values: {errors:?}");
    }
}

/// The LockSources the chart's hook Jobs apply (`statelock apply-lock-source`).
fn default_lock_sources(docs: &[Value]) -> Vec<Value> {
    of_kind(docs, "Job")
        .into_iter()
        .filter_map(|job| {
            let env = job["spec"]["template"]["spec"]["containers"][0]["env"].as_array()?;
            let manifest = env.iter().find(|e| e["name"] == "STATELOCK_LOCK_SOURCE")?["value"].as_str()?;
            Some(serde_json::from_str(manifest).expect("the hook's LockSource is JSON"))
        })
        .collect()
}

fn lint(values: &Value) {
    let v = values.to_string();
    let out = helm(&["lint", CHART, &v]);
    assert!(
        out.status.success(),
        "helm lint --strict with {values}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_toggle_lints_renders_and_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    type Check = fn(&[Value]);
    let cases: Vec<(&str, Value, Vec<&str>, Check)> = vec![
        ("defaults", json!({}), vec![], |d| {
            let dep = one(d, "Deployment");
            assert_eq!(dep["spec"]["replicas"], 2);
            let pod = &dep["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
            let c = container(d);
            assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
            assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
            assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
            assert!(c["resources"]["requests"]["memory"].is_string());
            assert_eq!(env_value(d, "STATELOCK_LEADER_ELECTION").expect("env")["value"], "true");
            assert_eq!(env_value(d, "STATELOCK_POD_NAME").expect("env")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
            let crds = of_kind(d, "CustomResourceDefinition");
            assert_eq!(crds.len(), 2);
            assert!(crds.iter().all(|c| c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"));
            assert_eq!(one(d, "PodDisruptionBudget")["spec"]["maxUnavailable"], 1);
            // No namespace may use the gateway yet: only the admin port is open.
            let np = one(d, "NetworkPolicy");
            assert_eq!(np["spec"]["ingress"].as_array().map(Vec::len), Some(1));
            assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], "admin");
            let gw = of_kind(d, "Service").into_iter().find(|s| s["metadata"]["name"] == "sl-statelock-gateway").expect("gateway Service");
            assert_eq!(gw["spec"]["sessionAffinity"], "ClientIP");
            assert!(of_kind(d, "Service").iter().any(|s| s["metadata"]["name"] == "sl-statelock-metrics"));
            assert!(of_kind(d, "ServiceMonitor").is_empty() && of_kind(d, "LockSource").is_empty());
            assert_eq!(of_kind(d, "Role").len(), 1, "only the Lease Role: no Secret access by default");
        }),
        ("crds off", json!({"crds": {"install": false}}), vec![], |d| assert!(of_kind(d, "CustomResourceDefinition").is_empty())),
        ("crds not kept", json!({"crds": {"keep": false}}), vec![], |d| {
            assert!(of_kind(d, "CustomResourceDefinition").iter().all(|c| c["metadata"]["annotations"].is_null()));
        }),
        ("gateway off", json!({"gateway": {"enabled": false}}), vec![], |d| {
            assert!(env_value(d, "STATELOCK_GATEWAY_ADDR").is_none());
            assert!(of_kind(d, "NetworkPolicy").is_empty());
            assert_eq!(of_kind(d, "Service").len(), 1, "only the metrics Service");
        }),
        ("single replica, no election", json!({"replicaCount": 1, "leaderElection": {"enabled": false}}), vec![], |d| {
            assert_eq!(env_value(d, "STATELOCK_LEADER_ELECTION").expect("env")["value"], "false");
            assert!(of_kind(d, "Role").is_empty() && of_kind(d, "PodDisruptionBudget").is_empty());
        }),
        ("existing service account with IRSA", json!({"serviceAccount": {"create": false, "name": "tf-ops"}}), vec![], |d| {
            assert!(of_kind(d, "ServiceAccount").is_empty());
            assert_eq!(one(d, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"], "tf-ops");
            assert_eq!(one(d, "ClusterRoleBinding")["subjects"][0]["name"], "tf-ops");
        }),
        (
            "service account annotations",
            json!({"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}}}),
            vec![],
            |d| {
                assert_eq!(one(d, "ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"], "arn:aws:iam::1:role/x");
            },
        ),
        ("rbac off", json!({"rbac": {"create": false}}), vec![], |d| {
            assert!(of_kind(d, "ClusterRole").is_empty() && of_kind(d, "Role").is_empty() && of_kind(d, "RoleBinding").is_empty());
        }),
        ("secret access opt-in", json!({"rbac": {"secretNamespaces": ["team-a", "team-b"], "secretNames": ["aws"]}}), vec![], |d| {
            let roles: Vec<&Value> = of_kind(d, "Role").into_iter().filter(|r| r["rules"][0]["resources"] == json!(["secrets"])).collect();
            let namespaces: BTreeSet<&str> = of_kind(d, "Role")
                .into_iter()
                .filter(|r| r["rules"][0]["resources"] == json!(["secrets"]))
                .filter_map(|r| r["metadata"]["namespace"].as_str())
                .collect();
            assert_eq!(roles.len(), 2);
            assert_eq!(namespaces, BTreeSet::from(["team-a", "team-b"]));
            assert!(roles.iter().all(|r| r["rules"][0]["resourceNames"] == json!(["aws"]) && r["rules"][0]["verbs"] == json!(["get"])));
        }),
        (
            "gateway namespaces",
            json!({"gateway": {"networkPolicy": {"allowedNamespaces": ["atlantis"], "extraFrom": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}}}),
            vec![],
            |d| {
                let np = one(d, "NetworkPolicy");
                let gw = &np["spec"]["ingress"][0];
                assert_eq!(gw["ports"][0]["port"], "gateway");
                assert_eq!(gw["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "atlantis");
                assert_eq!(gw["from"][1]["ipBlock"]["cidr"], "10.9.0.0/16");
            },
        ),
        (
            "prometheus rule with its CRD",
            json!({"metrics": {"prometheusRule": {"enabled": true, "labels": {"release": "prom"}}}}),
            vec!["monitoring.coreos.com/v1/PrometheusRule", "monitoring.coreos.com/v1"],
            |d| {
                let rule = one(d, "PrometheusRule");
                assert_eq!(rule["metadata"]["labels"]["release"], "prom");
                // The rule file as it is: the one promtool checks (tests/alerts.rs).
                let file: Value = serde_saphyr::from_str(
                    &std::fs::read_to_string(repo_root().join("charts/statelock/files/prometheus-rules.yaml")).expect("rules"),
                )
                .expect("yaml");
                assert_eq!(rule["spec"], file);
                let text = serde_json::to_string(&rule["spec"]).expect("json");
                assert!(text.contains("{{ $labels.namespace }}"), "Prometheus templates are left for Prometheus");
            },
        ),
        ("grafana dashboard", json!({"metrics": {"grafanaDashboard": {"enabled": true}}}), vec![], |d| {
            let cm = of_kind(d, "ConfigMap")
                .into_iter()
                .find(|c| c["metadata"]["name"] == "sl-statelock-dashboard")
                .expect("dashboard ConfigMap");
            assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
            let dashboard: Value =
                serde_json::from_str(cm["data"]["statelock.json"].as_str().expect("json text")).expect("the dashboard is JSON");
            assert_eq!(dashboard["uid"], "statelock");
        }),
        ("prometheus rule without its CRD", json!({"metrics": {"prometheusRule": {"enabled": true}}}), vec![], |d| {
            assert!(of_kind(d, "PrometheusRule").is_empty(), "not rendered where the API does not exist");
        }),
        ("service monitor without its CRD", json!({"metrics": {"serviceMonitor": {"enabled": true}}}), vec![], |d| {
            assert!(of_kind(d, "ServiceMonitor").is_empty(), "not rendered where the API does not exist");
        }),
        (
            "service monitor with its CRD",
            json!({"metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}}}),
            vec!["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1"],
            |d| {
                let sm = one(d, "ServiceMonitor");
                assert_eq!(sm["metadata"]["labels"]["release"], "prom");
                assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
                let svc =
                    of_kind(d, "Service").into_iter().find(|s| s["metadata"]["name"] == "sl-statelock-metrics").expect("metrics Service");
                for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().expect("selector") {
                    assert_eq!(&svc["metadata"]["labels"][k], v, "the ServiceMonitor selects the metrics Service");
                }
            },
        ),
        (
            "default LockSource",
            json!({"defaultLockSource": {"enabled": true, "spec": {"dynamodb": {"tableName": "tf-locks", "region": "eu-west-1"}, "expiry": {"mode": "Release"}}}}),
            vec![],
            |d| {
                // Not a resource of the release (a fresh install could not map it, and a hook
                // resource would be re-created, with a new UID, on every upgrade): a hook Job
                // applies it after the CRDs exist.
                assert!(of_kind(d, "LockSource").is_empty());
                let ls = &default_lock_sources(d)[0];
                assert_eq!(ls["spec"]["dynamodb"]["tableName"], "tf-locks");
                assert_eq!(ls["metadata"]["namespace"], NAMESPACE);
                let job = one(d, "Job");
                assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"], "post-install,post-upgrade");
                let pod = &job["spec"]["template"];
                assert_eq!(pod["spec"]["containers"][0]["args"], json!(["apply-lock-source"]));
                assert_eq!(pod["spec"]["serviceAccountName"], "sl-statelock-locksource", "the hook's own identity");
                assert_eq!(pod["metadata"]["annotations"]["sidecar.istio.io/inject"], "false", "no sidecar to keep the Job running");
                // The hook pod is not one of the operator's: no Service, PDB or NetworkPolicy selects it.
                let selector = &one(d, "Deployment")["spec"]["selector"]["matchLabels"];
                let labels = &pod["metadata"]["labels"];
                assert!(
                    selector.as_object().expect("selector").iter().any(|(k, v)| &labels[k] != v),
                    "{labels} is not selected by {selector}"
                );
            },
        ),
        (
            "default LockSource on lock files",
            json!({"defaultLockSource": {"enabled": true, "spec": {"s3": {"bucket": "tfstate", "region": "eu-west-1"}}}}),
            vec![],
            |d| assert_eq!(default_lock_sources(d)[0]["spec"]["s3"]["bucket"], "tfstate"),
        ),
        (
            "overrides a platform team needs (subchart, OpenShift, a CA bundle, zones, a digest)",
            json!({
                "global": {"imageRegistry": "mirror.example"},
                "commonLabels": {"team": "platform"},
                "image": {"digest": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
                "extraArgs": ["--log-format=plain"],
                "extraVolumes": [{"name": "ca", "configMap": {"name": "corp-ca"}}],
                "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/certs/corp", "readOnly": true}],
                "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "statelock"}}}],
                "podSecurityContext": {"runAsNonRoot": true, "runAsUser": null, "runAsGroup": null, "seccompProfile": {"type": "RuntimeDefault"}},
                "readinessProbe": {"periodSeconds": 2, "failureThreshold": 5}
            }),
            vec![],
            |d| {
                let dep = one(d, "Deployment");
                let pod = &dep["spec"]["template"]["spec"];
                let c = container(d);
                assert_eq!(dep["metadata"]["labels"]["team"], "platform");
                assert_eq!(one(d, "ServiceAccount")["metadata"]["labels"]["team"], "platform");
                assert_eq!(
                    c["image"],
                    "ghcr.io/statelock/statelock@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                );
                assert_eq!(c["args"], json!(["run", "--log-format=plain"]));
                assert_eq!(c["volumeMounts"][0]["mountPath"], "/etc/ssl/certs/corp");
                assert_eq!(pod["volumes"][0]["configMap"]["name"], "corp-ca");
                assert_eq!(pod["topologySpreadConstraints"][0]["topologyKey"], "topology.kubernetes.io/zone");
                assert!(
                    pod["securityContext"]["runAsUser"].is_null() && pod["securityContext"]["runAsNonRoot"] == true,
                    "OpenShift assigns the UID"
                );
                assert_eq!(c["readinessProbe"]["periodSeconds"], 2);
                assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
                assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "the container stays hardened");
                let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
                assert_eq!(annotations["traffic.sidecar.istio.io/excludeInboundPorts"], "8081", "no sidecar before the gateway");
                assert_eq!(annotations["config.linkerd.io/skip-inbound-ports"], "8081");
            },
        ),
        ("no aggregated user roles", json!({"rbac": {"aggregateToDefaultRoles": false}}), vec![], |d| {
            assert_eq!(of_kind(d, "ClusterRole").len(), 1, "only the operator's own");
        }),
        (
            "no PDB, no NetworkPolicy",
            json!({"podDisruptionBudget": {"enabled": false}, "gateway": {"networkPolicy": {"enabled": false}}}),
            vec![],
            |d| {
                assert!(of_kind(d, "PodDisruptionBudget").is_empty() && of_kind(d, "NetworkPolicy").is_empty());
            },
        ),
    ];
    for (name, values, api_versions, check) in &cases {
        lint(values);
        let text = render_text(RELEASE, values, api_versions).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d = docs(&text);
        validate(&text, &d, dir.path());
        check(&d);
    }
    // Unknown keys and a LockSource without a table are refused.
    for bad in [json!({"bogus": 1}), json!({"gateway": {"port": 1}}), json!({"defaultLockSource": {"enabled": true, "spec": {}}})] {
        let err = render_text(RELEASE, &bad, &[]).expect_err("invalid values are refused");
        assert!(err.contains("additional properties") || err.contains("needs s3.bucket or dynamodb.tableName"), "{bad}: {err}");
    }
}

#[test]
fn notes_tell_how_to_point_terraform_and_atlantis_at_the_gateway() {
    let out = helm(&["notes", CHART, RELEASE, NAMESPACE, "{}"]);
    let notes = String::from_utf8_lossy(&out.stdout);
    assert!(notes.contains("endpoints = { dynamodb = \"http://sl-statelock-gateway.statelock-system.svc:8081\" }"), "{notes}");
    assert!(
        notes.contains("dynamodb_endpoint = \"http://sl-statelock-gateway")
            && notes.contains("Atlantis")
            && notes.contains("Not AWS_ENDPOINT_URL_DYNAMODB"),
        "{notes}"
    );
    assert!(notes.contains("admits nobody"), "warns while no namespace may reach the gateway: {notes}");
}

#[test]
fn the_charts_crds_are_the_generated_crds() {
    let root = repo_root();
    for entry in std::fs::read_dir(root.join("crds")).expect("crds/") {
        let path = entry.expect("entry").path();
        let copy = root.join("charts/statelock/files/crds").join(path.file_name().expect("name"));
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            std::fs::read_to_string(&copy).unwrap_or_default(),
            "{} differs from crds/; run: cargo run -- crds --write-dir crds && cp crds/*.yaml charts/statelock/files/crds/",
            copy.display()
        );
    }
    let rendered = render(&json!({}), &[]);
    for crd in of_kind(&rendered, "CustomResourceDefinition") {
        let name = crd["metadata"]["name"].as_str().expect("name");
        let generated: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(root.join(format!("crds/{name}.yaml"))).expect("crd file")).expect("yaml");
        let mut c = crd.clone();
        c["metadata"].as_object_mut().expect("metadata").retain(|k, _| k == "name");
        assert_eq!(c, generated, "rendered {name} equals crds/ apart from labels and annotations");
    }
}

/// (where, API group, resource, verbs) of every rule in the rendered chart.
fn rendered_rules(d: &[Value]) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for role in of_kind(d, "ClusterRole").into_iter().chain(of_kind(d, "Role")) {
        let labels = &role["metadata"]["labels"];
        let aggregated =
            ["view", "edit", "admin"].into_iter().find(|r| labels[format!("rbac.authorization.k8s.io/aggregate-to-{r}")] == "true");
        let hook = role["metadata"]["annotations"]["helm.sh/hook"].is_string();
        let scope = match (role["kind"].as_str(), role["metadata"]["namespace"].as_str()) {
            (_, Some(NAMESPACE)) if hook => "release namespace, install hook".to_owned(),
            (Some("ClusterRole"), _) if aggregated.is_some() => format!("users: {}", aggregated.unwrap_or_default()),
            (Some("ClusterRole"), _) => "cluster".to_owned(),
            (_, Some(NAMESPACE)) => "release namespace".to_owned(),
            _ => "secret namespaces".to_owned(),
        };
        for rule in role["rules"].as_array().expect("rules") {
            let groups = rule["apiGroups"].as_array().expect("apiGroups");
            for g in groups {
                for r in rule["resources"].as_array().expect("resources") {
                    let verbs: Vec<&str> = rule["verbs"].as_array().expect("verbs").iter().filter_map(Value::as_str).collect();
                    assert!(!verbs.contains(&"*") && g != "*" && r != "*", "no wildcards: {rule}");
                    out.insert((
                        scope.clone(),
                        g.as_str().unwrap_or_default().to_owned(),
                        r.as_str().unwrap_or_default().to_owned(),
                        verbs.join(", "),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn the_charts_rbac_is_exactly_the_documented_table() {
    let d = render(
        &json!({"rbac": {"secretNamespaces": ["team-a"], "secretNames": ["aws"]},
                "defaultLockSource": {"enabled": true, "spec": {"dynamodb": {"tableName": "tf-locks", "region": "eu-west-1"}}}}),
        &[],
    );
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    let table =
        readme.split("<!-- rbac:begin -->").nth(1).and_then(|t| t.split("<!-- rbac:end -->").next()).expect("the RBAC table in README.md");
    let documented: BTreeSet<(String, String, String, String)> = table
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| where"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let scope = match cells[0] {
                c if c.contains("secretNamespaces") => "secret namespaces",
                c if c.contains("defaultLockSource") => "release namespace, install hook",
                c => c,
            };
            let group = if cells[1] == "(core)" { "" } else { cells[1] };
            let resource = cells[2].split_whitespace().next().unwrap_or_default();
            (scope.to_owned(), group.to_owned(), resource.to_owned(), cells[3].to_owned())
        })
        .collect();
    assert_eq!(rendered_rules(&d), documented, "the chart grants exactly what README.md documents");
    // The Lease rule that can be limited by name is; so is the Secret rule when names are given.
    let lease_role = of_kind(&d, "Role")
        .into_iter()
        .find(|r| r["metadata"]["namespace"] == NAMESPACE && r["metadata"]["annotations"]["helm.sh/hook"].is_null())
        .expect("Lease Role");
    let named = lease_role["rules"].as_array().expect("rules").iter().find(|r| r["verbs"] == json!(["get", "update"])).expect("get/update");
    assert_eq!(named["resourceNames"], json!(["sl-statelock"]));
}

/// Server-side apply of any object, as a user would `kubectl apply --server-side` it.
async fn apply(client: &kube::Client, obj: &Value) {
    let obj: DynamicObject = serde_json::from_value(obj.clone()).expect("object");
    let gvk = kube::core::GroupVersionKind::try_from(obj.types.as_ref().expect("types")).expect("gvk");
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("discover {gvk:?}: {e}"));
    let api: Api<DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
        (kube::discovery::Scope::Namespaced, ns) => Api::namespaced_with(client.clone(), ns.unwrap_or(NAMESPACE), &ar),
        _ => Api::all_with(client.clone(), &ar),
    };
    let name = obj.metadata.name.clone().expect("name");
    api.patch(&name, &PatchParams::apply("helm").force(), &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|e| panic!("apply {gvk:?} {name}: {e}"));
}

/// The rendered chart applied to the emulator with RBAC on, and the operator run with the
/// Deployment's own arguments and environment and a token of the chart's ServiceAccount: a full
/// mirror, expiry and gateway cycle works with no request refused, and uses every permission the
/// chart grants. Then one rule is removed, and the part of the cycle that needs it fails.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_cycle_as_the_charts_service_account_uses_every_permission_and_needs_each() {
    const RUNNERS: &str = "runners";
    const TABLE: &str = "tf-locks";
    let sa_user = "system:serviceaccount:statelock-system:statelock";
    let cluster = TestCluster::start_rbac(&[("sa-token", User::service_account(NAMESPACE, "statelock"))]).await;
    let values = json!({"rbac": {"secretNamespaces": [RUNNERS]}, "gateway": {"networkPolicy": {"allowedNamespaces": [RUNNERS]}}, "leaderElection": {"leaseDuration": "4s"}, "aws": {"allowedEndpoints": ["http://127.0.0.1:*"]}});
    let text = render_text("statelock", &values, &[]).expect("render");
    let rendered = docs(&text);
    // As admin, with kube-rs: kubectl (client-go) never sends a bearer token over plain HTTP.
    cluster.create_namespace(NAMESPACE).await;
    cluster.create_namespace(RUNNERS).await;
    for doc in &rendered {
        apply(&cluster.client(), doc).await;
    }

    let moto = DynamoServer::moto();
    moto.create_lock_table(TABLE).await;
    let db = moto.dynamodb().await;
    apply(
        &cluster.client(),
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "aws", "namespace": RUNNERS},
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake"}}),
    )
    .await;
    cluster
        .create_lock_source(
            RUNNERS,
            "tf-locks",
            json!({
                "dynamodb": {"tableName": TABLE, "region": "us-east-1", "endpoint": moto.url(), "credentialsSecretRef": {"name": "aws"}},
                "sync": {"mode": "Scan", "interval": "1s"},
                "holders": {"namespaces": [RUNNERS], "hostnamePattern": "runner-[0-9]+"},
                "expiry": {"mode": "Release", "gracePeriod": "0s"},
                "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}
            }),
        )
        .await;

    // The operator exactly as the Deployment runs it, but on free loopback ports.
    let c = container(&rendered);
    let (admin_port, gateway_port) = (free_port(), free_port());
    let mut cmd = common::statelock_command();
    cmd.args(c["args"].as_array().expect("args").iter().filter_map(Value::as_str));
    for e in c["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("name");
        let value = match (name, e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            ("STATELOCK_ADMIN_ADDR", _, _) => format!("127.0.0.1:{admin_port}"),
            ("STATELOCK_GATEWAY_ADDR", _, _) => format!("127.0.0.1:{gateway_port}"),
            (_, Some(v), _) => v.to_owned(),
            (_, None, Some("metadata.name")) => "statelock-7d9f-abcde".to_owned(),
            (_, None, Some("metadata.namespace")) => NAMESPACE.to_owned(),
            other => panic!("unexpected env {other:?}"),
        };
        cmd.env(name, value);
    }
    cmd.env("KUBECONFIG", cluster.kubeconfig_for("sa-token")).env("STATELOCK_LOG", "info,statelock=debug");
    let log = cluster.dir.path().join("operator.log");
    let op = Operator::spawn(cmd, admin_port, &log);
    eventually(Duration::from_secs(60), "the operator to be ready", || {
        let ready = op.ready();
        async move { ready.then_some(()) }
    })
    .await;

    // Mirror and expiry: a lock held by a live runner pod, then the pod dies.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), RUNNERS);
    cluster.running_pod(RUNNERS, "runner-1").await;
    let lock_id = "tfstate/app/terraform.tfstate";
    common::take_lock(&db, TABLE, lock_id, "1edde332-0dcf-0332-cbb0-ed1b3daf868d", "root@runner-1").await;
    common::wait_holder_alive(&cluster, RUNNERS, lock_id, "the lock mirrored and its holder judged alive").await;
    let locks: Api<StateLock> = Api::namespaced(cluster.client(), RUNNERS);
    pods.delete("runner-1", &DeleteParams::default()).await.expect("delete pod");
    eventually(Duration::from_secs(30), "the dead holder's lock released", || async {
        (!common::lock_item_exists(&db, TABLE, lock_id).await).then_some(())
    })
    .await;

    // Gateway: a lock, two refused attempts (a contention event series), the release.
    let gw = format!("http://127.0.0.1:{gateway_port}");
    let call = |target: &str, body: Value| {
        let addr = format!("127.0.0.1:{gateway_port}");
        let body = body.to_string();
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        use std::io::{Read, Write};
        write!(s, "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: DynamoDB_20120810.{target}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0)
    };
    let gw_lock = "tfstate/gw/terraform.tfstate";
    let put = |id: &str, who: &str| {
        json!({"ConditionExpression": "attribute_not_exists(LockID)", "TableName": TABLE,
               "Item": {"LockID": {"S": gw_lock}, "Info": {"S": terraform_info(id, who, gw_lock, &k8s_openapi::jiff::Timestamp::now().to_string())}}})
    };
    assert_eq!(call("PutItem", put("aaaaaaaa-0000-0000-0000-000000000001", "root@ci-a")), 200, "gateway {gw}");
    eventually(Duration::from_secs(10), "the gateway's StateLock", || async {
        locks.get_opt(&state_lock_name(gw_lock)).await.expect("get")
    })
    .await;
    // B retries as Terraform does (if faster), until its attempts form an event series.
    let events: Api<Event> = Api::namespaced(cluster.client(), RUNNERS);
    let mut attempts = 0;
    loop {
        assert_eq!(call("PutItem", put("bbbbbbbb-0000-0000-0000-000000000002", "root@ci-b")), 400);
        attempts += 1;
        let list = events.list(&ListParams::default()).await.expect("events").items;
        if list.iter().any(|e| e.reason.as_deref() == Some("LockContended") && e.series.as_ref().is_some_and(|s| s.count >= 2)) {
            break;
        }
        assert!(attempts < 40, "no LockContended series after {attempts} refused attempts");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(call("DeleteItem", json!({"TableName": TABLE, "Key": {"LockID": {"S": gw_lock}}})), 200);
    eventually(Duration::from_secs(10), "the released lock's StateLock to go", || async {
        locks.get_opt(&state_lock_name(gw_lock)).await.expect("get").is_none().then_some(())
    })
    .await;

    // Nothing was refused, and every permission the chart grants was used.
    let audit: Vec<_> = cluster.emulator.audit().into_iter().filter(|r| r.user == sa_user).collect();
    let refused: Vec<_> = audit.iter().filter(|r| !r.allowed).collect();
    assert!(refused.is_empty(), "requests refused: {refused:#?}");
    let used: BTreeSet<(String, String, String)> = audit
        .iter()
        .map(|r| {
            let resource = if r.subresource.is_empty() { r.resource.clone() } else { format!("{}/{}", r.resource, r.subresource) };
            (r.group.clone(), resource, r.verb.clone())
        })
        .collect();
    // The operator's own permissions (the roles for users are not the operator's).
    let granted: BTreeSet<(String, String, String)> = rendered_rules(&rendered)
        .into_iter()
        .filter(|(scope, ..)| !scope.starts_with("users: "))
        .flat_map(|(_, g, r, verbs)| verbs.split(", ").map(|v| (g.clone(), r.clone(), v.to_owned())).collect::<Vec<_>>())
        .collect();
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(unused.is_empty(), "granted but never used in a full cycle (least privilege): {unused:?}");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    // A refusal is logged as the API's Status (`code: 403`, reason Forbidden); a bare "403" can be
    // part of a timestamp or a UID.
    let refusals: Vec<&str> = log_text.lines().filter(|l| l.contains("code: 403") || l.to_lowercase().contains("forbidden")).collect();
    assert!(refusals.is_empty(), "no 403 in the operator's log: {refusals:#?}");

    // Without the StateLock status rule, holders can no longer be recorded.
    let mut role = of_kind(&rendered, "ClusterRole")
        .into_iter()
        .find(|r| {
            r["metadata"]["labels"].as_object().is_none_or(|l| !l.keys().any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to")))
        })
        .expect("the operator's ClusterRole")
        .clone();
    role["rules"].as_array_mut().expect("rules").retain(|r| r["resources"] != json!(["statelocks/status"]));
    apply(&cluster.client(), &role).await;
    let second = "tfstate/second/terraform.tfstate";
    common::take_lock(&db, TABLE, second, "cccccccc-0000-0000-0000-000000000003", "root@runner-2").await;
    eventually(Duration::from_secs(30), "a refused status write", || async {
        cluster
            .emulator
            .audit()
            .into_iter()
            .find(|r| r.user == sa_user && !r.allowed && r.resource == "statelocks" && r.subresource == "status")
    })
    .await;
    let l = eventually(Duration::from_secs(10), "the second lock mirrored", || async {
        locks.get_opt(&state_lock_name(second)).await.expect("get")
    })
    .await;
    assert!(
        l.status.as_ref().and_then(|s| s.holder.as_ref()).is_none() && l.status.as_ref().is_none_or(|s| s.conditions.is_empty()),
        "no status without the rule: {:?}",
        l.status
    );
    op.stop().await;
}

/// Stand in for the Job controller and the kubelet while `helm` runs: every hook Job the chart
/// creates is run, with its container's arguments and environment, as the statelock binary with
/// a token of the Job's ServiceAccount (so the hook's Role is what authorizes it), and its
/// status is then set as the Job controller would. Returns helm's output once it exits.
async fn helm_with_hook_jobs(cluster: &TestCluster, args: &[&str], tokens: &[(&str, &str)]) -> std::process::Output {
    use futures::StreamExt;
    use k8s_openapi::api::batch::v1::Job;
    use kube::runtime::{WatchStreamExt, watcher};
    let child = tokio::process::Command::from(python_tool("python"))
        .arg(repo_root().join("tests/fixtures/helm.py"))
        .args(args)
        .current_dir(repo_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python (bash .ci/install)");
    let jobs: Api<Job> = Api::namespaced(cluster.client(), NAMESPACE);
    let events = watcher(jobs.clone(), watcher::Config::default()).applied_objects();
    futures::pin_mut!(events);
    let mut ran = BTreeSet::new();
    let mut helm_done = std::pin::pin!(async { child.wait_with_output().await.expect("helm") });
    loop {
        let job = tokio::select! {
            out = &mut helm_done => return out,
            job = events.next() => job.expect("the Job watch goes on").expect("Job watch"),
        };
        let uid = job.metadata.uid.clone().unwrap_or_default();
        if job.status.is_some() || !ran.insert(uid) {
            continue;
        }
        let pod = job.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod template");
        let sa = pod.service_account_name.clone().unwrap_or_default();
        let token = tokens.iter().find(|(s, _)| *s == sa).map(|(_, t)| *t).unwrap_or_else(|| panic!("no token for {sa}"));
        let container = &pod.containers[0];
        let mut run = tokio::process::Command::new(env!("CARGO_BIN_EXE_statelock"));
        run.args(container.args.iter().flatten()).env("KUBECONFIG", cluster.kubeconfig_for(token)).env_remove("STATELOCK_LOG");
        for e in container.env.iter().flatten() {
            run.env(&e.name, e.value.as_deref().unwrap_or_default());
        }
        let out = run.output().await.expect("the hook runs");
        let name = job.metadata.name.clone().unwrap_or_default();
        assert!(out.status.success(), "hook Job {name} failed: {}", String::from_utf8_lossy(&out.stderr));
        let status = json!({"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}});
        jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("Job status");
    }
}

/// Real Helm (the Helm 4 engine) installs and upgrades the chart with a default LockSource into
/// the emulator with RBAC on; the hook Job runs as its own ServiceAccount. The LockSource is
/// created once, and an upgrade that changes its spec updates it in place: same UID, so the
/// StateLocks it owns are not garbage-collected. The hook's identity is gone afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn helm_install_then_upgrade_keeps_the_default_lock_source_and_its_state_locks() {
    use statelock::crd::LockSource;
    let hook_sa = "sl-statelock-locksource";
    let cluster = TestCluster::start_rbac(&[("hook-token", User::service_account(NAMESPACE, hook_sa))]).await;
    // client-go (Helm) never sends a bearer token over plain HTTP: Helm acts unauthenticated,
    // bound here to a cluster-admin role. The hook acts with its ServiceAccount's token.
    apply(
        &cluster.client(),
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "helm-admin"},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
    )
    .await;
    apply(
        &cluster.client(),
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "helm-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "helm-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}]}),
    )
    .await;
    let helm_kubeconfig = cluster.dir.path().join("helm-kubeconfig");
    cluster.emulator.write_kubeconfig(&helm_kubeconfig, None).expect("kubeconfig");
    let kubeconfig = helm_kubeconfig.to_str().expect("path");
    let values = |mode: &str| {
        json!({"defaultLockSource": {"enabled": true, "spec": {"dynamodb": {"tableName": "tf-locks", "region": "eu-west-1"}, "expiry": {"mode": mode}}}})
            .to_string()
    };
    let tokens = [(hook_sa, "hook-token")];

    let v1 = values("Observe");
    let out = helm_with_hook_jobs(&cluster, &["install", CHART, RELEASE, NAMESPACE, &v1, kubeconfig], &tokens).await;
    assert!(out.status.success(), "helm install: {}", String::from_utf8_lossy(&out.stderr));
    let sources: Api<LockSource> = Api::namespaced(cluster.client(), NAMESPACE);
    let installed = sources.get("terraform-locks").await.expect("the default LockSource exists after install");
    let uid = installed.metadata.uid.clone().expect("uid");
    assert_eq!(serde_json::to_value(&installed.spec).expect("spec")["expiry"]["mode"], "Observe");

    // A StateLock the LockSource owns, as the mirror writes it.
    let locks: Api<StateLock> = Api::namespaced(cluster.client(), NAMESPACE);
    let lock: StateLock = serde_json::from_value(json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock",
        "metadata": {"name": "held", "ownerReferences": [{"apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource", "name": "terraform-locks", "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"lockId": "tfstate/app/terraform.tfstate", "source": "terraform-locks"}}))
    .expect("StateLock");
    let lock_uid = locks.create(&Default::default(), &lock).await.expect("create StateLock").metadata.uid;

    let v2 = values("Release");
    let out = helm_with_hook_jobs(&cluster, &["upgrade", CHART, RELEASE, NAMESPACE, &v2, kubeconfig], &tokens).await;
    assert!(out.status.success(), "helm upgrade: {}", String::from_utf8_lossy(&out.stderr));
    let upgraded = sources.get("terraform-locks").await.expect("the default LockSource exists after upgrade");
    assert_eq!(upgraded.metadata.uid.as_deref(), Some(uid.as_str()), "the upgrade updated the LockSource in place");
    assert_eq!(serde_json::to_value(&upgraded.spec).expect("spec")["expiry"]["mode"], "Release", "the upgrade's spec is applied");
    assert!(
        upgraded.metadata.annotations.iter().flatten().all(|(k, _)| !k.starts_with("helm.sh/hook")),
        "the LockSource is not a hook resource"
    );
    assert_eq!(locks.get("held").await.expect("the owned StateLock survives the upgrade").metadata.uid, lock_uid);

    // The hook's identity and Job were deleted once they succeeded (hook-succeeded).
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(cluster.client(), NAMESPACE);
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(cluster.client(), NAMESPACE);
    assert!(sas.get_opt(hook_sa).await.expect("get").is_none(), "the hook's ServiceAccount is deleted");
    assert!(jobs.get_opt(hook_sa).await.expect("get").is_none(), "the hook Job is deleted");
}
