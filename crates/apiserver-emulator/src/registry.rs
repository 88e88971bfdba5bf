//! The resource types the emulator serves: built-in kinds and the custom resources that
//! CustomResourceDefinitions register live.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::status::Qualified;

/// How a resource type's objects are printed as a server-side Table.
#[derive(Clone, Debug, PartialEq)]
pub enum Printer {
    /// Name and Age.
    Default,
    /// CRD `additionalPrinterColumns` (raw JSON column definitions).
    Columns(Vec<Value>),
    Pod,
    Namespace,
    Event,
    Lease,
}

/// One resource type.
#[derive(Clone, Debug)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    /// `metadata.generation` is maintained (custom resources and a few built-ins).
    pub generation: bool,
    /// A custom resource (registered by a CRD).
    pub custom: bool,
    /// The structural schema of a custom resource, for pruning, defaults and validation.
    pub schema: Option<Value>,
    pub printer: Printer,
    /// Where objects are stored: types that are views of one store (core/v1 and
    /// events.k8s.io/v1 Events) share a storage key.
    pub storage: StorageKey,
}

/// Where a type's objects live.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey {
    pub group: String,
    pub plural: String,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    pub fn qualified(&self) -> Qualified<'_> {
        Qualified { group: &self.group, resource: &self.plural, kind: &self.kind }
    }

    /// Is this the core/v1 view of Events (stored in events.k8s.io/v1 form)?
    pub fn is_core_event(&self) -> bool {
        self.group.is_empty() && self.plural == "events"
    }

    /// The discovery entries (`APIResource`) for the type and its status subresource.
    pub fn discovery(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
    generation: bool,
    printer: Printer,
}

const fn b(group: &'static str, version: &'static str, kind: &'static str, plural: &'static str, namespaced: bool) -> Builtin {
    Builtin {
        group,
        version,
        kind,
        plural,
        namespaced,
        short: &[],
        categories: &[],
        status: false,
        generation: false,
        printer: Printer::Default,
    }
}

fn builtins() -> Vec<Builtin> {
    vec![
        Builtin { short: &["ns"], status: true, printer: Printer::Namespace, ..b("", "v1", "Namespace", "namespaces", false) },
        Builtin { short: &["po"], categories: &["all"], status: true, printer: Printer::Pod, ..b("", "v1", "Pod", "pods", true) },
        Builtin { short: &["svc"], categories: &["all"], status: true, ..b("", "v1", "Service", "services", true) },
        Builtin { short: &["cm"], ..b("", "v1", "ConfigMap", "configmaps", true) },
        b("", "v1", "Secret", "secrets", true),
        Builtin { short: &["sa"], ..b("", "v1", "ServiceAccount", "serviceaccounts", true) },
        Builtin { short: &["ev"], printer: Printer::Event, ..b("", "v1", "Event", "events", true) },
        Builtin { short: &["no"], status: true, ..b("", "v1", "Node", "nodes", false) },
        Builtin { short: &["ev"], printer: Printer::Event, ..b("events.k8s.io", "v1", "Event", "events", true) },
        Builtin { printer: Printer::Lease, ..b("coordination.k8s.io", "v1", "Lease", "leases", true) },
        Builtin {
            short: &["deploy"],
            categories: &["all"],
            status: true,
            generation: true,
            ..b("apps", "v1", "Deployment", "deployments", true)
        },
        Builtin {
            short: &["sts"],
            categories: &["all"],
            status: true,
            generation: true,
            ..b("apps", "v1", "StatefulSet", "statefulsets", true)
        },
        Builtin {
            short: &["rs"],
            categories: &["all"],
            status: true,
            generation: true,
            ..b("apps", "v1", "ReplicaSet", "replicasets", true)
        },
        Builtin { categories: &["all"], status: true, generation: true, ..b("batch", "v1", "Job", "jobs", true) },
        b("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
        b("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", true),
        b("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", false),
        b("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", false),
        Builtin { short: &["netpol"], generation: true, ..b("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", true) },
        Builtin {
            short: &["pdb"],
            status: true,
            generation: true,
            ..b("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true)
        },
        Builtin {
            short: &["crd", "crds"],
            categories: &["api-extensions"],
            status: true,
            generation: true,
            ..b("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", false)
        },
    ]
}

/// All types, keyed by (group, version, plural).
#[derive(Clone, Debug)]
pub struct Registry {
    types: BTreeMap<(String, String, String), ResourceType>,
}

impl Default for Registry {
    fn default() -> Self {
        let mut types = BTreeMap::new();
        for bt in builtins() {
            let storage = if bt.plural == "events" {
                StorageKey { group: "events.k8s.io".into(), plural: "events".into() }
            } else {
                StorageKey { group: bt.group.into(), plural: bt.plural.into() }
            };
            let rt = ResourceType {
                group: bt.group.into(),
                version: bt.version.into(),
                kind: bt.kind.into(),
                plural: bt.plural.into(),
                singular: bt.kind.to_lowercase(),
                namespaced: bt.namespaced,
                short_names: bt.short.iter().map(|s| (*s).to_owned()).collect(),
                categories: bt.categories.iter().map(|s| (*s).to_owned()).collect(),
                status_subresource: bt.status,
                generation: bt.generation,
                custom: false,
                schema: None,
                printer: bt.printer,
                storage,
            };
            types.insert((rt.group.clone(), rt.version.clone(), rt.plural.clone()), rt);
        }
        Self { types }
    }
}

impl Registry {
    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types.get(&(group.to_owned(), version.to_owned(), plural.to_owned()))
    }

    /// Any served version of a (group, plural).
    pub fn find_by_storage(&self, key: &StorageKey) -> Option<&ResourceType> {
        self.types.values().find(|t| t.storage == *key)
    }

    /// The type with this apiVersion and kind.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        self.types.values().find(|t| t.api_version() == api_version && t.kind == kind)
    }

    pub fn all(&self) -> impl Iterator<Item = &ResourceType> {
        self.types.values()
    }

    /// Group versions served, core first, each group once per version.
    pub fn group_versions(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for t in self.types.values() {
            let gv = (t.group.clone(), t.version.clone());
            if !out.contains(&gv) {
                out.push(gv);
            }
        }
        out
    }

    /// Register (or re-register) the versions a CRD serves. Returns the names it accepted.
    pub fn register_crd(&mut self, crd: &Value) -> Result<(), String> {
        let spec = &crd["spec"];
        let group = spec["group"].as_str().ok_or("spec.group is required")?.to_owned();
        let names = &spec["names"];
        let plural = names["plural"].as_str().ok_or("spec.names.plural is required")?.to_owned();
        let kind = names["kind"].as_str().ok_or("spec.names.kind is required")?.to_owned();
        let singular = names["singular"].as_str().map(str::to_owned).unwrap_or_else(|| kind.to_lowercase());
        let namespaced = spec["scope"].as_str() != Some("Cluster");
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
        };
        self.unregister_crd(&group, &plural);
        for v in spec["versions"].as_array().into_iter().flatten() {
            if v["served"].as_bool() == Some(false) {
                continue;
            }
            let version = v["name"].as_str().ok_or("spec.versions[].name is required")?.to_owned();
            let cols = v["additionalPrinterColumns"].as_array().cloned().unwrap_or_default();
            let rt = ResourceType {
                group: group.clone(),
                version: version.clone(),
                kind: kind.clone(),
                plural: plural.clone(),
                singular: singular.clone(),
                namespaced,
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                status_subresource: v["subresources"]["status"].is_object(),
                generation: true,
                custom: true,
                schema: v["schema"]["openAPIV3Schema"].as_object().map(|o| Value::Object(o.clone())),
                printer: if cols.is_empty() { Printer::Default } else { Printer::Columns(cols) },
                storage: StorageKey { group: group.clone(), plural: plural.clone() },
            };
            self.types.insert((group.clone(), version, plural.clone()), rt);
        }
        Ok(())
    }

    pub fn unregister_crd(&mut self, group: &str, plural: &str) {
        self.types.retain(|(g, _, p), t| !(t.custom && g == group && p == plural));
    }

    /// Resolve a kubectl-style name (plural, singular or short name) within a group, for RBAC
    /// and tests.
    pub fn resolve(&self, name: &str) -> Option<&ResourceType> {
        self.types.values().find(|t| t.plural == name || t.singular == name || t.short_names.iter().any(|s| s == name))
    }
}
