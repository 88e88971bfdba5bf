//! Authentication by bearer token and authorization by RBAC, as the apiserver's RBAC
//! authorizer evaluates Roles, ClusterRoles and their bindings. Off by default.

use std::collections::HashMap;

use serde_json::Value;

use crate::{
    api::Api,
    registry::{ResourceType, StorageKey},
    status::{self, ApiError},
};

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    /// The user a service account token authenticates as.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{namespace}"), "system:authenticated".into()],
        }
    }

    /// A cluster administrator (group `system:masters`).
    pub fn admin(name: &str) -> Self {
        Self { name: name.into(), groups: vec!["system:masters".into(), "system:authenticated".into()] }
    }
}

/// What a request asks to do.
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// Who may do what.
#[derive(Clone, Debug, Default)]
pub enum Authorizer {
    /// Every request is allowed (no tokens needed).
    #[default]
    AllowAll,
    /// Bearer tokens map to users; requests are checked against RBAC objects.
    Rbac { tokens: HashMap<String, User> },
}

impl Authorizer {
    pub fn authenticate(&self, header: &str) -> Result<User, ApiError> {
        match self {
            Self::AllowAll => Ok(User::admin("system:admin")),
            Self::Rbac { tokens } => match header.strip_prefix("Bearer ").map(str::trim) {
                Some(t) => tokens.get(t).cloned().ok_or_else(status::unauthorized),
                None => Ok(User { name: "system:anonymous".into(), groups: vec!["system:unauthenticated".into()] }),
            },
        }
    }

    pub fn authorize(&self, api: &Api, user: &User, a: &Attributes<'_>, rt: &ResourceType) -> Result<(), ApiError> {
        if matches!(self, Self::AllowAll) || user.groups.iter().any(|g| g == "system:masters") {
            return Ok(());
        }
        if allowed(api, user, a) {
            return Ok(());
        }
        let resource = if a.subresource.is_empty() { a.resource.to_owned() } else { format!("{}/{}", a.resource, a.subresource) };
        let scope =
            if a.namespace.is_empty() { "at the cluster scope".to_owned() } else { format!("in the namespace \"{}\"", a.namespace) };
        let reason = format!("User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}", user.name, a.verb, a.group);
        Err(status::forbidden(&rt.qualified(), a.name, reason))
    }
}

fn subject_matches(s: &Value, user: &User) -> bool {
    let name = s["name"].as_str().unwrap_or_default();
    match s["kind"].as_str() {
        Some("User") => name == user.name,
        Some("Group") => user.groups.iter().any(|g| g == name),
        Some("ServiceAccount") => user.name == format!("system:serviceaccount:{}:{name}", s["namespace"].as_str().unwrap_or_default()),
        _ => false,
    }
}

fn rule_allows(rule: &Value, a: &Attributes<'_>) -> bool {
    let has = |field: &str, want: &str| rule[field].as_array().is_some_and(|l| l.iter().any(|v| v == "*" || v == want));
    let resource = if a.subresource.is_empty() { a.resource.to_owned() } else { format!("{}/{}", a.resource, a.subresource) };
    let names_ok = match rule["resourceNames"].as_array() {
        Some(n) if !n.is_empty() => !a.name.is_empty() && n.iter().any(|v| v == a.name),
        _ => true,
    };
    has("verbs", a.verb)
        && has("apiGroups", a.group)
        && (has("resources", &resource) || (a.subresource.is_empty() && has("resources", a.resource)))
        && names_ok
}

fn allowed(api: &Api, user: &User, a: &Attributes<'_>) -> bool {
    let st = api.lock();
    let key = |plural: &str| StorageKey { group: "rbac.authorization.k8s.io".into(), plural: plural.into() };
    let rules_of = |kind: &str, name: &str, ns: &str| -> Vec<Value> {
        let obj = if kind == "ClusterRole" { st.store.get(&key("clusterroles"), "", name) } else { st.store.get(&key("roles"), ns, name) };
        obj.and_then(|o| o["rules"].as_array().cloned()).unwrap_or_default()
    };
    for b in st.store.all(&key("clusterrolebindings")) {
        if b["subjects"].as_array().is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
            && rules_of("ClusterRole", b["roleRef"]["name"].as_str().unwrap_or_default(), "").iter().any(|r| rule_allows(r, a))
        {
            return true;
        }
    }
    if a.namespace.is_empty() {
        return false;
    }
    for b in st.store.all(&key("rolebindings")) {
        if b["metadata"]["namespace"].as_str() != Some(a.namespace) {
            continue;
        }
        if b["subjects"].as_array().is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
            && rules_of(b["roleRef"]["kind"].as_str().unwrap_or_default(), b["roleRef"]["name"].as_str().unwrap_or_default(), a.namespace)
                .iter()
                .any(|r| rule_allows(r, a))
        {
            return true;
        }
    }
    false
}
