//! Authorization: bearer tokens and RBAC, with the apiserver's Forbidden messages.

mod common;

use std::collections::HashMap;

use apiserver_emulator::{Authorizer, Config, User};
use common::Cluster;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;

fn client_with_token(c: &Cluster, token: &str) -> kube::Client {
    let mut config = kube::Config::new(c.emulator.url().parse().expect("url"));
    config.default_namespace = "default".into();
    config.auth_info.token = Some(token.to_owned().into());
    kube::Client::try_from(config).expect("client")
}

async fn rbac_cluster() -> Cluster {
    let tokens = HashMap::from([
        ("admin-token".to_owned(), User::admin("admin")),
        ("runner-token".to_owned(), User::service_account("default", "runner")),
    ]);
    Cluster::start_with(Config { authorizer: Authorizer::Rbac { tokens }, ..Config::default() }).await
}

async fn apply(client: &kube::Client, obj: serde_json::Value) {
    let obj: DynamicObject = serde_json::from_value(obj).expect("object");
    let gvk = kube::core::GroupVersionKind::try_from(obj.types.as_ref().expect("types")).expect("gvk");
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await.expect("discover");
    let api: Api<DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    };
    api.patch(obj.metadata.name.as_deref().expect("name"), &PatchParams::apply("test").force(), &Patch::Apply(&obj)).await.expect("apply");
}

#[tokio::test(flavor = "multi_thread")]
async fn rbac_allows_exactly_the_granted_verbs_with_the_real_forbidden_message() {
    let c = rbac_cluster().await;
    let admin = client_with_token(&c, "admin-token");
    apply(
        &admin,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-cm", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]}),
    )
    .await;
    apply(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "runner-read-cm", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-cm"},
        "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": "default"}]})).await;

    let runner: Api<ConfigMap> = Api::namespaced(client_with_token(&c, "runner-token"), "default");
    runner.list(&Default::default()).await.expect("list is granted");
    let err = runner
        .create(
            &PostParams::default(),
            &ConfigMap { metadata: kube::api::ObjectMeta { name: Some("x".into()), ..Default::default() }, ..Default::default() },
        )
        .await
        .expect_err("create is not granted");
    let kube::Error::Api(status) = err else { panic!("expected an API error, got {err:?}") };
    assert_eq!(status.code, 403);
    assert_eq!(status.reason, "Forbidden");
    assert_eq!(
        status.message,
        "configmaps is forbidden: User \"system:serviceaccount:default:runner\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"default\""
    );

    let other_ns: Api<ConfigMap> = Api::namespaced(client_with_token(&c, "runner-token"), "kube-system");
    let err = other_ns.list(&Default::default()).await.expect_err("a Role grants nothing in other namespaces");
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 403 && s.message.contains("in the namespace \"kube-system\"")), "{err:?}");

    let all: Api<ConfigMap> = Api::all(client_with_token(&c, "runner-token"));
    let err = all.list(&Default::default()).await.expect_err("cluster-wide list needs a ClusterRole");
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 403 && s.message.ends_with("at the cluster scope")), "{err:?}");

    let unknown: Api<ConfigMap> = Api::namespaced(client_with_token(&c, "wrong-token"), "default");
    let err = unknown.list(&Default::default()).await.expect_err("unknown token");
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 401), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_roles_subresources_and_resource_names() {
    let c = rbac_cluster().await;
    let admin = client_with_token(&c, "admin-token");
    apply(
        &admin,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "cm-status"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]},
                  {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"], "resourceNames": ["only-this"]}]}),
    )
    .await;
    apply(
        &admin,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "runner-cm"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cm-status"},
        "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": "default"}]}),
    )
    .await;
    let admin_cm: Api<ConfigMap> = Api::namespaced(admin.clone(), "default");
    for n in ["only-this", "other"] {
        admin_cm
            .create(
                &PostParams::default(),
                &ConfigMap { metadata: kube::api::ObjectMeta { name: Some(n.into()), ..Default::default() }, ..Default::default() },
            )
            .await
            .expect("admin creates");
    }
    let runner_all: Api<ConfigMap> = Api::all(client_with_token(&c, "runner-token"));
    runner_all.list(&Default::default()).await.expect("a ClusterRoleBinding grants cluster-wide list");
    let runner: Api<ConfigMap> = Api::namespaced(client_with_token(&c, "runner-token"), "default");
    let patch = Patch::Merge(json!({"data": {"a": "b"}}));
    runner.patch("only-this", &PatchParams::default(), &patch).await.expect("patch on the named object");
    let err = runner.patch("other", &PatchParams::default(), &patch).await.expect_err("resourceNames limits patch");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 403 && s.message.starts_with("configmaps \"other\" is forbidden")),
        "{err:?}"
    );
}

/// As in the apiserver: `patch` alone lets a server-side apply change an existing object, but an
/// apply that would create one is also authorized as `create`.
#[tokio::test(flavor = "multi_thread")]
async fn apply_that_creates_also_needs_create() {
    let c = rbac_cluster().await;
    let admin = client_with_token(&c, "admin-token");
    let grant = |verbs: serde_json::Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "cm", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": verbs}]})
    };
    apply(&admin, grant(json!(["get", "patch"]))).await;
    apply(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "runner-cm", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm"},
        "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": "default"}]})).await;
    let runner: Api<ConfigMap> = Api::namespaced(client_with_token(&c, "runner-token"), "default");
    let body = |v: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"v": v}});
    let pp = PatchParams::apply("runner");
    let err = runner.patch("x", &pp, &Patch::Apply(body("1"))).await.expect_err("apply-create needs create");
    let kube::Error::Api(s) = err else { panic!("expected a Status, got {err:?}") };
    assert_eq!(s.code, 403);
    assert!(s.message.contains("cannot create resource \"configmaps\""), "{}", s.message);
    // Once the object exists, patch suffices.
    Api::<ConfigMap>::namespaced(admin.clone(), "default").patch("x", &pp, &Patch::Apply(body("0"))).await.expect("admin creates");
    runner.patch("x", &PatchParams::apply("runner").force(), &Patch::Apply(body("2"))).await.expect("apply to an existing object");
    apply(&admin, grant(json!(["get", "patch", "create"]))).await;
    runner
        .patch("y", &pp, &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "y"}})))
        .await
        .expect("with create");
}
