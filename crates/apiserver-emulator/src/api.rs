//! The API semantics, independent of HTTP: create, get, list, update, patch (including
//! server-side apply), delete, with the apiserver's rules for system fields, generation,
//! subresources, finalizers, no-op writes, optimistic concurrency and garbage collection.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use serde_json::{Map, Value, json};

use crate::{
    clock::Clock,
    events,
    managed::{self, Entry, FieldSet, Scope},
    patch,
    registry::{Registry, ResourceType, StorageKey},
    schema,
    selectors::{FieldSelector, LabelSelector},
    status::{self, ApiError, Cause},
    store::{ChangeType, Store},
};

/// Knobs that change how strict the emulator is.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many changes the watch history keeps before older watches get 410.
    pub history: usize,
    /// Deterministic UIDs (`00000000-0000-4000-8000-<counter>`) instead of random v4 UUIDs.
    pub deterministic_uids: bool,
    /// Prune unknown fields, apply defaults and validate custom resources (a real server does).
    pub strict_schema: bool,
    /// Bump the resourceVersion even on no-op writes (a lenient, unrealistic mode).
    pub bump_on_noop: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { history: 10_000, deterministic_uids: false, strict_schema: true, bump_on_noop: false }
    }
}

/// Faults injected by tests.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// HTTP codes the next writes answer with (409 or 500), one per write, in order.
    pub next_writes: Vec<u16>,
    /// Extra latency before every response, in milliseconds.
    pub latency_ms: u64,
}

/// One authorized (or refused) resource request, as the apiserver's audit log would record it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub user: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    pub allowed: bool,
}

/// State behind one lock.
pub struct State {
    pub store: Store,
    pub registry: Registry,
    pub faults: Faults,
    /// Resource requests in arrival order (kept only with RBAC on, bounded).
    pub audit: std::collections::VecDeque<AuditRecord>,
    /// Requests by (user, verb, resource) since the start, never dropped.
    pub audit_counts: std::collections::BTreeMap<(String, String, String), u64>,
    uid_counter: u64,
    random: u64,
}

/// The emulator's API core. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    state: Arc<Mutex<State>>,
    pub clock: Clock,
    pub options: Arc<Options>,
    /// While true, new watch requests wait before they start (a test hook that makes "the
    /// client reconnects after the history it needs was compacted" deterministic).
    pub watches_paused: Arc<tokio::sync::watch::Sender<bool>>,
    /// Resources (`group/plural`, group empty for the core group) whose new watch requests wait
    /// until released: with their open streams ended, a client's cache of them falls behind while
    /// every other watch flows (a test hook for "one informer is broken or relisting").
    pub watches_held: Arc<tokio::sync::watch::Sender<std::collections::BTreeSet<String>>>,
}

/// The list parameters of a request.
#[derive(Clone, Debug, Default)]
pub struct ListParams {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

/// Who is writing, and how.
#[derive(Clone, Debug, Default)]
pub struct WriteParams {
    pub field_manager: Option<String>,
    pub user_agent: String,
    pub force: bool,
    pub dry_run: bool,
}

impl WriteParams {
    fn manager(&self) -> String {
        self.field_manager.clone().unwrap_or_else(|| {
            let ua = self.user_agent.split('/').next().unwrap_or_default();
            if ua.is_empty() { "unknown".into() } else { ua.to_owned() }
        })
    }
}

/// The patch types the apiserver accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        Some(match ct.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Self::Merge,
            "application/json-patch+json" => Self::Json,
            "application/strategic-merge-patch+json" => Self::Strategic,
            "application/apply-patch+yaml" | "application/apply-patch+json" | "application/apply-patch+cbor" => Self::Apply,
            _ => return None,
        })
    }
}

enum ManagerOp {
    Update(String),
    Apply(String, FieldSet),
}

fn meta<'a>(o: &'a Value, k: &str) -> &'a Value {
    &o["metadata"][k]
}

fn set_meta(o: &mut Value, k: &str, v: Value) {
    if !o["metadata"].is_object() {
        o["metadata"] = json!({});
    }
    if let Some(m) = o["metadata"].as_object_mut() {
        if v.is_null() {
            m.remove(k);
        } else {
            m.insert(k.to_owned(), v);
        }
    }
}

fn parse_rv(s: &str) -> Option<u64> {
    s.parse::<u64>().ok()
}

/// Standard base64 (continue tokens, protobuf bytes fields).
pub(crate) fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

const CONTINUE_TOO_OLD: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

impl Api {
    pub fn new(options: Options, clock: Clock) -> Self {
        let random = clock.now_nanos() as u64 ^ (std::process::id() as u64) << 32;
        let mut state = State {
            store: Store::new(options.history),
            registry: Registry::default(),
            faults: Faults::default(),
            audit: Default::default(),
            audit_counts: Default::default(),
            uid_counter: 0,
            random,
        };
        let api_clock = clock.clone();
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let rt = state.registry.get("", "v1", "namespaces").cloned().expect("namespaces are built in");
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
            let now = api_clock.now_rfc3339();
            let mut o = obj;
            let uid = next_uid(&mut state, options.deterministic_uids);
            set_meta(&mut o, "uid", json!(uid));
            set_meta(&mut o, "creationTimestamp", json!(now));
            let rev = state.store.next_revision();
            set_meta(&mut o, "resourceVersion", json!(rev.to_string()));
            state.store.commit(&rt.storage, "", ns, ChangeType::Added, o);
        }
        Self {
            state: Arc::new(Mutex::new(state)),
            clock,
            options: Arc::new(options),
            watches_paused: Arc::new(tokio::sync::watch::channel(false).0),
            watches_held: Arc::new(tokio::sync::watch::channel(std::collections::BTreeSet::new()).0),
        }
    }

    /// Lock the state.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Append to the audit log (bounded: the oldest records go first).
    pub fn record_audit(&self, record: AuditRecord) {
        let mut st = self.lock();
        *st.audit_counts.entry((record.user.clone(), record.verb.clone(), record.resource.clone())).or_default() += 1;
        if st.audit.len() >= 100_000 {
            st.audit.pop_front();
        }
        st.audit.push_back(record);
    }

    /// Resolve a type.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock().registry.get(group, version, plural).cloned()
    }

    /// The object as served by `rt` (view conversion and apiVersion of the requested version).
    pub fn view(rt: &ResourceType, stored: &Value) -> Value {
        let mut v = if rt.is_core_event() { events::to_core(stored) } else { stored.clone() };
        if rt.custom {
            v["apiVersion"] = json!(rt.api_version());
        }
        v
    }

    fn to_storage(rt: &ResourceType, body: Value) -> Value {
        if rt.is_core_event() { events::from_core(&body) } else { body }
    }

    // ----- reads -------------------------------------------------------------------------

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        let st = self.lock();
        st.store.get(&rt.storage, ns, name).map(|o| Self::view(rt, &o)).ok_or_else(|| status::not_found(&rt.qualified(), name))
    }

    /// Validate list options; the field selector check depends on the type.
    pub fn field_selector(&self, rt: &ResourceType, s: Option<&str>) -> Result<FieldSelector, ApiError> {
        let supported = |f: &str| -> bool {
            if matches!(f, "metadata.name" | "metadata.namespace") {
                return true;
            }
            match (rt.group.as_str(), rt.plural.as_str()) {
                ("", "events") => events::core_field_supported(f),
                ("events.k8s.io", "events") => events::events_field_supported(f),
                ("", "pods") => matches!(
                    f,
                    "spec.nodeName"
                        | "spec.restartPolicy"
                        | "spec.schedulerName"
                        | "spec.serviceAccountName"
                        | "spec.hostNetwork"
                        | "status.phase"
                        | "status.podIP"
                        | "status.nominatedNodeName"
                ),
                ("", "secrets") => f == "type",
                ("", "namespaces") => f == "status.phase",
                _ => false,
            }
        };
        FieldSelector::parse(s.unwrap_or_default(), &supported).map_err(status::bad_request)
    }

    /// A list: `(items, resourceVersion, continue)`.
    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, p: &ListParams) -> Result<(Vec<Value>, u64, Option<String>), ApiError> {
        if p.resource_version_match.is_some() && p.resource_version.as_deref().unwrap_or_default().is_empty() {
            return Err(status::invalid_options(
                "ListOptions",
                &[Cause {
                    reason: "FieldValueForbidden",
                    field: "resourceVersionMatch".into(),
                    message: "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
                }],
            ));
        }
        let labels = LabelSelector::parse(p.label_selector.as_deref().unwrap_or_default()).map_err(status::bad_request)?;
        let fields = self.field_selector(rt, p.field_selector.as_deref())?;
        let st = self.lock();
        let (rev, after) = match &p.continue_token {
            Some(tok) if !tok.is_empty() => {
                let decoded: Value = unb64(tok).and_then(|b| serde_json::from_slice(&b).ok()).ok_or_else(|| {
                    status::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
                })?;
                let rev = decoded["rv"].as_u64().unwrap_or(0);
                if rev < st.store.compacted_revision() {
                    return Err(status::expired(CONTINUE_TOO_OLD));
                }
                let start =
                    (decoded["ns"].as_str().unwrap_or_default().to_owned(), decoded["name"].as_str().unwrap_or_default().to_owned());
                (rev, Some(start))
            }
            _ => {
                let rev = match (p.resource_version.as_deref(), p.resource_version_match.as_deref()) {
                    (Some(rv), Some("Exact")) => {
                        let r = parse_rv(rv).ok_or_else(|| status::bad_request(format!("invalid resource version: {rv}")))?;
                        if r < st.store.compacted_revision() {
                            return Err(status::too_old_resource_version(r, st.store.compacted_revision()));
                        }
                        r.min(st.store.revision())
                    }
                    _ => st.store.revision(),
                };
                (rev, None)
            }
        };
        let limit = p.limit.filter(|l| *l > 0);
        let mut items = Vec::new();
        let mut next = None;
        for (key, obj) in st.store.list_at(&rt.storage, ns, rev, after.as_ref()) {
            let view = Self::view(rt, &obj);
            if !labels.matches(&view) || !fields.matches(&view) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                next =
                    Some(b64(json!({"rv": rev, "ns": items_last_key(&items).0, "name": items_last_key(&items).1}).to_string().as_bytes()));
                let _ = key;
                break;
            }
            items.push(view);
        }
        Ok((items, rev, next))
    }

    // ----- writes ------------------------------------------------------------------------

    fn take_fault(st: &mut State, rt: &ResourceType, name: &str) -> Result<(), ApiError> {
        if st.faults.next_writes.is_empty() {
            return Ok(());
        }
        match st.faults.next_writes.remove(0) {
            409 => Err(status::conflict_modified(&rt.qualified(), name)),
            code => Err(ApiError { code, ..status::internal("injected fault") }),
        }
    }

    /// POST.
    pub fn create(&self, rt: &ResourceType, ns: &str, body: Value, wp: &WriteParams) -> Result<Value, ApiError> {
        let mut body = Self::to_storage(rt, body);
        if !body.is_object() {
            return Err(status::bad_request("the body of the request was not a JSON object"));
        }
        self.check_type_meta(rt, &mut body)?;
        let mut st = self.lock();
        let mut name = meta(&body, "name").as_str().unwrap_or_default().to_owned();
        if name.is_empty() {
            if let Some(prefix) = meta(&body, "generateName").as_str() {
                name = format!("{prefix}{}", random_suffix(&mut st));
                set_meta(&mut body, "name", json!(name));
            } else {
                return Err(status::invalid(
                    &rt.qualified(),
                    "",
                    &[Cause {
                        reason: "FieldValueRequired",
                        field: "metadata.name".into(),
                        message: "Required value: name or generateName is required".into(),
                    }],
                ));
            }
        }
        self.check_namespace(&st, rt, ns, &mut body)?;
        Self::take_fault(&mut st, rt, &name)?;
        if st.store.get(&rt.storage, ns, &name).is_some() {
            return Err(status::already_exists(&rt.qualified(), &name));
        }
        let scope = if rt.status_subresource { Scope::Main } else { Scope::Whole };
        let (_, obj) = self.write(&mut st, rt, ns, &name, None, body, scope, ManagerOp::Update(wp.manager()), wp.dry_run)?;
        Ok(Self::view(rt, &obj))
    }

    fn check_type_meta(&self, rt: &ResourceType, body: &mut Value) -> Result<(), ApiError> {
        let want_av = if rt.is_core_event() { "events.k8s.io/v1".to_owned() } else { rt.api_version() };
        match body["apiVersion"].as_str() {
            None | Some("") => body["apiVersion"] = json!(want_av),
            Some(av) if av == want_av || (rt.custom && av.starts_with(&format!("{}/", rt.group))) => body["apiVersion"] = json!(want_av),
            Some(av) => {
                return Err(status::bad_request(format!(
                    "the API version in the data ({av}) does not match the expected API version ({want_av})"
                )));
            }
        }
        match body["kind"].as_str() {
            None | Some("") => body["kind"] = json!(rt.kind),
            Some(k) if k == rt.kind => {}
            Some(k) => {
                return Err(status::bad_request(format!("the kind in the data ({k}) does not match the expected kind ({})", rt.kind)));
            }
        }
        Ok(())
    }

    fn check_namespace(&self, st: &State, rt: &ResourceType, ns: &str, body: &mut Value) -> Result<(), ApiError> {
        if !rt.namespaced {
            if let Some(m) = body["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            return Ok(());
        }
        match meta(body, "namespace").as_str() {
            None | Some("") => set_meta(body, "namespace", json!(ns)),
            Some(n) if n == ns => {}
            Some(_) => {
                return Err(status::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
            }
        }
        let ns_key = StorageKey { group: String::new(), plural: "namespaces".into() };
        if st.store.get(&ns_key, "", ns).is_none() {
            return Err(status::not_found(&status::Qualified { group: "", resource: "namespaces", kind: "Namespace" }, ns));
        }
        Ok(())
    }

    /// PUT (main resource or `/status`).
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        subresource: Option<&str>,
        wp: &WriteParams,
    ) -> Result<(u16, Value), ApiError> {
        let mut body = Self::to_storage(rt, body);
        if !body.is_object() {
            return Err(status::bad_request("the body of the request was not a JSON object"));
        }
        self.check_type_meta(rt, &mut body)?;
        let body_name = meta(&body, "name").as_str().unwrap_or_default().to_owned();
        if !body_name.is_empty() && body_name != name {
            return Err(status::bad_request(format!("the name of the object ({body_name}) does not match the name on the URL ({name})")));
        }
        set_meta(&mut body, "name", json!(name));
        let mut st = self.lock();
        self.check_namespace(&st, rt, ns, &mut body)?;
        let scope = scope_for(rt, subresource)?;
        let old = st.store.get(&rt.storage, ns, name).ok_or_else(|| status::not_found(&rt.qualified(), name))?;
        let rv = meta(&body, "resourceVersion").as_str().unwrap_or_default().to_owned();
        if rv.is_empty() && rt.custom {
            return Err(status::invalid(
                &rt.qualified(),
                name,
                &[Cause {
                    reason: "FieldValueInvalid",
                    field: "metadata.resourceVersion".into(),
                    message: "Invalid value: 0x0: must be specified for an update".into(),
                }],
            ));
        }
        if !rv.is_empty() && rv != meta(&old, "resourceVersion").as_str().unwrap_or_default() {
            return Err(status::conflict_modified(&rt.qualified(), name));
        }
        Self::take_fault(&mut st, rt, name)?;
        let new = match scope {
            Scope::Status => {
                let mut n = (*old).clone();
                n["status"] = body.get("status").cloned().unwrap_or(Value::Null);
                if n["status"].is_null()
                    && let Some(m) = n.as_object_mut()
                {
                    m.remove("status");
                }
                n
            }
            _ => body,
        };
        let (code, obj) = self.write(&mut st, rt, ns, name, Some(old), new, scope, ManagerOp::Update(wp.manager()), wp.dry_run)?;
        Ok((code, Self::view(rt, &obj)))
    }

    /// PATCH of any type (server-side apply included).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        pt: PatchType,
        body: &[u8],
        subresource: Option<&str>,
        wp: &WriteParams,
    ) -> Result<(u16, Value), ApiError> {
        if pt != PatchType::Apply && wp.force {
            return Err(status::invalid_options(
                "PatchOptions",
                &[Cause {
                    reason: "FieldValueForbidden",
                    field: "force".into(),
                    message: "Forbidden: may not be specified for non-apply patch".into(),
                }],
            ));
        }
        if pt == PatchType::Strategic && rt.custom {
            return Err(status::strategic_merge_on_cr());
        }
        let scope = scope_for(rt, subresource)?;
        if pt == PatchType::Apply {
            return self.apply(rt, ns, name, body, scope, wp);
        }
        let patch_doc: Value = serde_json::from_slice(body).map_err(|e| status::bad_request(format!("error decoding patch: {e}")))?;
        let mut st = self.lock();
        let old = st.store.get(&rt.storage, ns, name).ok_or_else(|| status::not_found(&rt.qualified(), name))?;
        let mut doc = Self::view(rt, &old);
        match pt {
            PatchType::Merge => patch::merge_patch(&mut doc, &patch_doc),
            PatchType::Strategic => patch::strategic_merge_patch(&mut doc, &patch_doc),
            PatchType::Json => patch::json_patch(&mut doc, &patch_doc)
                .map_err(|e| ApiError { code: 422, ..status::invalid_options("Patch", &[]) }.with_message(e.0))?,
            PatchType::Apply => unreachable!("handled above"),
        }
        // A merge patch that is not an object replaces the whole document (RFC 7386); what it
        // leaves cannot be decoded as an object, and the apiserver answers 400.
        if !doc.is_object() {
            return Err(status::bad_request(format!(
                "the patch leaves a JSON {} where an object is expected",
                match doc {
                    Value::Array(_) => "array",
                    Value::String(_) => "string",
                    Value::Number(_) => "number",
                    Value::Bool(_) => "boolean",
                    _ => "null",
                }
            )));
        }
        // A resourceVersion in the patched object is a precondition (kubernetes#63104).
        if let Some(rv) = meta(&doc, "resourceVersion").as_str()
            && rv != meta(&old, "resourceVersion").as_str().unwrap_or_default()
        {
            return Err(status::conflict_modified(&rt.qualified(), name));
        }
        let mut doc = Self::to_storage(rt, doc);
        self.check_type_meta(rt, &mut doc)?;
        if meta(&doc, "name").as_str() != Some(name) {
            return Err(status::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta(&doc, "name").as_str().unwrap_or_default()
            )));
        }
        Self::take_fault(&mut st, rt, name)?;
        let new = match scope {
            Scope::Status => {
                let mut n = (*old).clone();
                match doc.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        if let Some(m) = n.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                n
            }
            _ => doc,
        };
        let (code, obj) = self.write(&mut st, rt, ns, name, Some(old), new, scope, ManagerOp::Update(wp.manager()), wp.dry_run)?;
        Ok((code, Self::view(rt, &obj)))
    }

    fn apply(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: &[u8],
        scope: Scope,
        wp: &WriteParams,
    ) -> Result<(u16, Value), ApiError> {
        let Some(manager) = wp.field_manager.clone().filter(|m| !m.is_empty()) else {
            return Err(status::invalid_options(
                "PatchOptions",
                &[Cause {
                    reason: "FieldValueRequired",
                    field: "fieldManager".into(),
                    message: "Required value: is required for apply patch".into(),
                }],
            ));
        };
        let text = std::str::from_utf8(body).map_err(|_| status::bad_request("the body of the request was not valid UTF-8"))?;
        let applied: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => serde_saphyr::from_str(text).map_err(|e| status::bad_request(format!("error decoding YAML: {e}")))?,
        };
        let mut applied = Self::to_storage(rt, applied);
        if !applied.is_object() {
            return Err(status::bad_request("the body of the request was not an object"));
        }
        self.check_type_meta(rt, &mut applied)?;
        if let Some(n) = meta(&applied, "name").as_str()
            && n != name
        {
            return Err(status::bad_request(format!("the name of the object ({n}) does not match the name on the URL ({name})")));
        }
        if rt.namespaced
            && let Some(n) = meta(&applied, "namespace").as_str()
            && !n.is_empty()
            && n != ns
        {
            return Err(status::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
        }
        let mut st = self.lock();
        let old = st.store.get(&rt.storage, ns, name);
        if let (Some(o), Some(rv)) = (&old, meta(&applied, "resourceVersion").as_str())
            && rv != meta(o, "resourceVersion").as_str().unwrap_or_default()
        {
            return Err(status::conflict_modified(&rt.qualified(), name));
        }
        if old.is_none() && scope == Scope::Status {
            return Err(status::not_found(&rt.qualified(), name));
        }
        let schema = rt.schema.as_ref();
        let subresource = (scope == Scope::Status).then(|| "status".to_owned());
        let mut entries: Vec<Entry> = old.as_ref().map(|o| decode_entries(o)).unwrap_or_default();
        let applied_set = managed::leaves(&applied, schema, scope);
        // Conflicts: a leaf whose value differs and that another manager owns.
        let mut conflicts: Vec<(String, String, managed::Path)> = Vec::new();
        if let Some(o) = &old {
            for p in &applied_set {
                if matches!(p.last(), Some(managed::Step::K(_) | managed::Step::V(_))) {
                    continue;
                }
                let cur = managed::get_at(o, p);
                if cur.is_none() || cur == managed::get_at(&applied, p) {
                    continue;
                }
                for e in &entries {
                    if e.manager != manager && e.subresource == subresource && managed::owns(&e.fields, p) {
                        conflicts.push((e.manager.clone(), e.api_version.clone(), p.clone()));
                    }
                }
            }
        }
        if !conflicts.is_empty() {
            if !wp.force {
                return Err(conflict_error(rt, name, &conflicts));
            }
            for e in entries.iter_mut() {
                if e.manager != manager {
                    e.fields.retain(|f| !conflicts.iter().any(|(_, _, p)| p == f || p.starts_with(f)));
                }
            }
        }
        let mut merged = old
            .as_ref()
            .map(|o| (**o).clone())
            .unwrap_or_else(|| json!({"apiVersion": applied["apiVersion"], "kind": applied["kind"], "metadata": {"name": name}}));
        let mut scoped = applied.clone();
        if let Some(m) = scoped.as_object_mut() {
            match scope {
                Scope::Main => {
                    m.remove("status");
                }
                Scope::Status => m.retain(|k, _| k == "status"),
                Scope::Whole => {}
            }
            if let Some(md) = m.get_mut("metadata").and_then(Value::as_object_mut) {
                md.retain(|k, _| {
                    matches!(
                        k.as_str(),
                        "name" | "namespace" | "labels" | "annotations" | "finalizers" | "ownerReferences" | "generateName"
                    )
                });
            }
        }
        managed::merge_applied(&mut merged, &scoped, schema, "");
        // Fields this manager applied before but not now are removed, unless someone else owns them.
        if let Some(prev) = entries.iter().find(|e| e.manager == manager && e.operation == "Apply" && e.subresource == subresource) {
            let removed: Vec<managed::Path> = prev.fields.difference(&applied_set).cloned().collect();
            for p in removed {
                let others_own = entries.iter().any(|e| {
                    !(e.manager == manager && e.operation == "Apply" && e.subresource == subresource)
                        && e.fields.iter().any(|f| f.starts_with(&p) || p.starts_with(f))
                });
                if !others_own && !applied_set.iter().any(|a| a.starts_with(&p)) {
                    managed::remove_at(&mut merged, &p);
                    managed::prune_empty_parents(&mut merged, &p, |parent| {
                        applied_set.iter().any(|a| a.as_slice() == parent)
                            || entries.iter().any(|e| e.fields.iter().any(|f| f.as_slice() == parent))
                    });
                }
            }
        }
        entries.retain(|e| !(e.manager == manager && e.operation == "Apply" && e.subresource == subresource));
        let rest = serde_json::to_value(entries.iter().map(Entry::to_json).collect::<Vec<_>>()).unwrap_or_default();
        set_meta(&mut merged, "managedFields", rest);
        if old.is_none() {
            drop(st);
            let mut body = merged;
            let mut st = self.lock();
            self.check_namespace(&st, rt, ns, &mut body)?;
            Self::take_fault(&mut st, rt, name)?;
            if st.store.get(&rt.storage, ns, name).is_some() {
                return Err(status::conflict_modified(&rt.qualified(), name));
            }
            let (_, obj) = self.write(&mut st, rt, ns, name, None, body, scope, ManagerOp::Apply(manager, applied_set), wp.dry_run)?;
            return Ok((201, Self::view(rt, &obj)));
        }
        self.check_namespace(&st, rt, ns, &mut merged)?;
        Self::take_fault(&mut st, rt, name)?;
        let (code, obj) = self.write(&mut st, rt, ns, name, old, merged, scope, ManagerOp::Apply(manager, applied_set), wp.dry_run)?;
        Ok((code, Self::view(rt, &obj)))
    }

    /// The common end of every create and update.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        st: &mut State,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        old: Option<Arc<Value>>,
        mut new: Value,
        scope: Scope,
        op: ManagerOp,
        dry_run: bool,
    ) -> Result<(u16, Arc<Value>), ApiError> {
        let q = rt.qualified();
        // Status subresource rules.
        if rt.status_subresource && scope == Scope::Main {
            match old.as_ref().and_then(|o| o.get("status")) {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        // Schema: prune, default, validate.
        if let (Some(schema), true) = (&rt.schema, self.options.strict_schema) {
            schema::prune_and_default(&mut new, schema);
            let causes = schema::validate(&new, schema);
            if !causes.is_empty() {
                return Err(status::invalid(&q, name, &causes));
            }
        } else {
            schema::prune_metadata(&mut new);
        }
        let mut causes = Vec::new();
        if old.is_none()
            && let Some(c) = schema::validate_name(name, rt.plural == "namespaces")
        {
            causes.push(c);
        }
        causes.extend(schema::validate_labels(&new));
        if rt.group == "events.k8s.io" && old.is_none() {
            for f in ["eventTime", "reportingController", "reportingInstance", "action", "reason"] {
                if new.get(f).is_none_or(|v| v.is_null() || v == "") {
                    causes.push(Cause { reason: "FieldValueRequired", field: f.into(), message: "Required value".into() });
                }
            }
        }
        if !causes.is_empty() {
            return Err(status::invalid(&q, name, &causes));
        }
        if rt.plural == "customresourcedefinitions" {
            crd_accept(&mut new, name)?;
        }
        builtin_strategy(rt, &mut new, old.is_none(), name);
        let now = self.clock.now_rfc3339();
        match &old {
            None => {
                let uid = next_uid(st, self.options.deterministic_uids);
                set_meta(&mut new, "uid", json!(uid));
                set_meta(&mut new, "creationTimestamp", json!(now));
                for k in ["deletionTimestamp", "deletionGracePeriodSeconds", "generation", "selfLink"] {
                    set_meta(&mut new, k, Value::Null);
                }
                if rt.generation {
                    set_meta(&mut new, "generation", json!(1));
                }
            }
            Some(o) => {
                for k in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"] {
                    set_meta(&mut new, k, meta(o, k).clone());
                }
                if rt.namespaced {
                    set_meta(&mut new, "namespace", json!(ns));
                }
                if !meta(o, "deletionTimestamp").is_null() {
                    let before: Vec<&Value> = meta(o, "finalizers").as_array().map(|a| a.iter().collect()).unwrap_or_default();
                    let added: Vec<String> = meta(&new, "finalizers")
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|f| !before.contains(f))
                        .map(|f| f.to_string())
                        .collect();
                    if !added.is_empty() {
                        return Err(status::invalid(
                            &q,
                            name,
                            &[Cause {
                                reason: "FieldValueForbidden",
                                field: "metadata.finalizers".into(),
                                message: format!(
                                    "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                                    added.join(", ")
                                ),
                            }],
                        ));
                    }
                }
                if rt.generation && scope != Scope::Status && spec_changed(o, &new) {
                    let g = meta(o, "generation").as_i64().unwrap_or(1);
                    set_meta(&mut new, "generation", json!(g + 1));
                }
            }
        }
        // Managed fields.
        let mut entries = match (&op, &old) {
            (ManagerOp::Apply(..), _) => decode_entries(&new),
            (_, Some(o)) => decode_entries(o),
            (_, None) => Vec::new(),
        };
        let subresource = (scope == Scope::Status).then(|| "status".to_owned());
        let api_version = rt.api_version();
        match &op {
            ManagerOp::Update(manager) => {
                let empty = json!({});
                let before = old.as_deref().unwrap_or(&empty);
                let before_set = managed::leaves(before, rt.schema.as_ref(), scope);
                let after_set = managed::leaves(&new, rt.schema.as_ref(), scope);
                let changed: FieldSet =
                    after_set.iter().filter(|p| managed::get_at(before, p) != managed::get_at(&new, p)).cloned().collect();
                let removed: FieldSet = before_set.difference(&after_set).cloned().collect();
                if !changed.is_empty() || !removed.is_empty() {
                    for e in entries.iter_mut() {
                        e.fields.retain(|f| !changed.contains(f) && !removed.contains(f));
                    }
                    match entries.iter_mut().find(|e| e.manager == *manager && e.operation == "Update" && e.subresource == subresource) {
                        Some(e) => {
                            e.fields.extend(changed);
                            e.time = now.clone();
                            e.api_version = api_version.clone();
                        }
                        None => entries.push(Entry {
                            manager: manager.clone(),
                            operation: "Update".into(),
                            api_version: api_version.clone(),
                            time: now.clone(),
                            subresource: subresource.clone(),
                            fields: changed,
                        }),
                    }
                }
            }
            ManagerOp::Apply(manager, set) => {
                let prev = old.as_ref().map(|o| decode_entries(o)).unwrap_or_default();
                let unchanged = prev
                    .iter()
                    .find(|e| e.manager == *manager && e.operation == "Apply" && e.subresource == subresource)
                    .filter(|e| e.fields == *set)
                    .map(|e| e.time.clone());
                entries.push(Entry {
                    manager: manager.clone(),
                    operation: "Apply".into(),
                    api_version: api_version.clone(),
                    time: unchanged.unwrap_or_else(|| now.clone()),
                    subresource: subresource.clone(),
                    fields: set.clone(),
                });
                // Keep the original order of entries where possible.
                let order: Vec<(String, String, Option<String>)> =
                    prev.iter().map(|e| (e.manager.clone(), e.operation.clone(), e.subresource.clone())).collect();
                entries.sort_by_key(|e| {
                    order.iter().position(|o| o.0 == e.manager && o.1 == e.operation && o.2 == e.subresource).unwrap_or(usize::MAX)
                });
            }
        }
        entries.retain(|e| !e.fields.is_empty());
        set_meta(
            &mut new,
            "managedFields",
            if entries.is_empty() { Value::Null } else { Value::Array(entries.iter().map(Entry::to_json).collect()) },
        );

        // No-op writes are invisible.
        if let Some(o) = &old {
            let mut cmp = new.clone();
            set_meta(&mut cmp, "resourceVersion", meta(o, "resourceVersion").clone());
            if cmp == **o && !self.options.bump_on_noop {
                return Ok((200, o.clone()));
            }
        }
        if dry_run {
            return Ok((if old.is_some() { 200 } else { 201 }, Arc::new(new)));
        }
        let rev = st.store.next_revision();
        set_meta(&mut new, "resourceVersion", json!(rev.to_string()));
        // An update that empties the finalizers of a deleting object deletes it.
        let deleting = !meta(&new, "deletionTimestamp").is_null();
        let no_finalizers = meta(&new, "finalizers").as_array().is_none_or(Vec::is_empty);
        if deleting && no_finalizers {
            let uid = meta(&new, "uid").as_str().unwrap_or_default().to_owned();
            let obj = Arc::new(new.clone());
            st.store.commit(&rt.storage, ns, name, ChangeType::Deleted, new);
            self.after_delete(st, rt, name, &uid);
            return Ok((200, obj));
        }
        let kind = if old.is_some() { ChangeType::Modified } else { ChangeType::Added };
        let obj = Arc::new(new.clone());
        st.store.commit(&rt.storage, ns, name, kind, new);
        if rt.plural == "customresourcedefinitions"
            && let Err(e) = st.registry.register_crd(&obj)
        {
            tracing::warn!(error = %e, "CRD registered with problems");
        }
        let code = if old.is_some() { 200 } else { 201 };
        Ok((code, obj))
    }

    /// DELETE of one object.
    pub fn delete(&self, rt: &ResourceType, ns: &str, name: &str, options: &Value, dry_run: bool) -> Result<(u16, Value), ApiError> {
        let mut st = self.lock();
        let q = rt.qualified();
        let old = st.store.get(&rt.storage, ns, name).ok_or_else(|| status::not_found(&q, name))?;
        let pre = &options["preconditions"];
        if let Some(uid) = pre["uid"].as_str() {
            let have = meta(&old, "uid").as_str().unwrap_or_default();
            if uid != have {
                return Err(status::conflict(
                    &q,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                ));
            }
        }
        if let Some(rv) = pre["resourceVersion"].as_str() {
            let have = meta(&old, "resourceVersion").as_str().unwrap_or_default();
            if rv != have {
                return Err(status::conflict(
                    &q,
                    name,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {have}"),
                ));
            }
        }
        Self::take_fault(&mut st, rt, name)?;
        let has_finalizers = meta(&old, "finalizers").as_array().is_some_and(|a| !a.is_empty());
        if has_finalizers {
            if !meta(&old, "deletionTimestamp").is_null() {
                return Ok((200, Self::view(rt, &old)));
            }
            let mut new = (*old).clone();
            set_meta(&mut new, "deletionTimestamp", json!(self.clock.now_rfc3339()));
            set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
            if rt.generation {
                let g = meta(&old, "generation").as_i64().unwrap_or(1);
                set_meta(&mut new, "generation", json!(g + 1));
            }
            if dry_run {
                return Ok((200, Self::view(rt, &new)));
            }
            let rev = st.store.next_revision();
            set_meta(&mut new, "resourceVersion", json!(rev.to_string()));
            let view = Self::view(rt, &new);
            st.store.commit(&rt.storage, ns, name, ChangeType::Modified, new);
            return Ok((200, view));
        }
        let uid = meta(&old, "uid").as_str().unwrap_or_default().to_owned();
        if dry_run {
            return Ok((200, Self::view(rt, &old)));
        }
        let mut last = (*old).clone();
        let rev = st.store.next_revision();
        set_meta(&mut last, "resourceVersion", json!(rev.to_string()));
        st.store.commit(&rt.storage, ns, name, ChangeType::Deleted, last);
        if options["propagationPolicy"].as_str() != Some("Orphan") {
            self.after_delete(&mut st, rt, name, &uid);
        }
        if rt.custom { Ok((200, status::delete_success(&q, name, &uid))) } else { Ok((200, Self::view(rt, &old))) }
    }

    /// Cascades after an object is gone: a CRD's type and objects, a namespace's contents, and
    /// dependents whose owners are all gone (background garbage collection).
    fn after_delete(&self, st: &mut State, rt: &ResourceType, name: &str, uid: &str) {
        if rt.plural == "customresourcedefinitions"
            && let Some((plural, group)) = name.split_once('.')
        {
            let key = StorageKey { group: group.into(), plural: plural.into() };
            for obj in st.store.all(&key) {
                let (n, o_ns) = (
                    meta(&obj, "name").as_str().unwrap_or_default().to_owned(),
                    meta(&obj, "namespace").as_str().unwrap_or_default().to_owned(),
                );
                let mut last = (*obj).clone();
                set_meta(&mut last, "resourceVersion", json!(st.store.next_revision().to_string()));
                st.store.commit(&key, &o_ns, &n, ChangeType::Deleted, last);
            }
            st.registry.unregister_crd(group, plural);
        }
        if rt.plural == "namespaces" && rt.group.is_empty() {
            for key in st.store.keys() {
                for obj in st.store.all(&key) {
                    if meta(&obj, "namespace").as_str() == Some(name) {
                        let n = meta(&obj, "name").as_str().unwrap_or_default().to_owned();
                        let mut last = (*obj).clone();
                        set_meta(&mut last, "resourceVersion", json!(st.store.next_revision().to_string()));
                        st.store.commit(&key, name, &n, ChangeType::Deleted, last);
                    }
                }
            }
        }
        // Garbage collection by ownerReferences, through the store's owner index.
        let mut gone = vec![uid.to_owned()];
        while let Some(owner) = gone.pop() {
            for (key, obj) in st.store.dependents_of(&owner) {
                let refs = meta(&obj, "ownerReferences").as_array().map(Vec::as_slice).unwrap_or_default();
                let live_owner = refs.iter().any(|r| {
                    let ruid = r["uid"].as_str().unwrap_or_default();
                    ruid != owner && st.store.uid_exists(ruid)
                });
                if live_owner {
                    continue;
                }
                let n = meta(&obj, "name").as_str().unwrap_or_default().to_owned();
                let o_ns = meta(&obj, "namespace").as_str().unwrap_or_default().to_owned();
                let mut last = (*obj).clone();
                set_meta(&mut last, "resourceVersion", json!(st.store.next_revision().to_string()));
                if meta(&obj, "finalizers").as_array().is_some_and(|a| !a.is_empty()) {
                    if meta(&obj, "deletionTimestamp").is_null() {
                        set_meta(&mut last, "deletionTimestamp", json!(self.clock.now_rfc3339()));
                        set_meta(&mut last, "deletionGracePeriodSeconds", json!(0));
                        st.store.commit(&key, &o_ns, &n, ChangeType::Modified, last);
                    }
                    continue;
                }
                st.store.commit(&key, &o_ns, &n, ChangeType::Deleted, last);
                gone.push(meta(&obj, "uid").as_str().unwrap_or_default().to_owned());
            }
        }
    }

    /// DELETE of a collection.
    pub fn delete_collection(&self, rt: &ResourceType, ns: Option<&str>, p: &ListParams, options: &Value) -> Result<Value, ApiError> {
        let (items, rev, _) = self.list(rt, ns, &ListParams { limit: None, continue_token: None, ..p.clone() })?;
        let mut deleted = Vec::new();
        for item in items {
            let name = meta(&item, "name").as_str().unwrap_or_default().to_owned();
            let item_ns = meta(&item, "namespace").as_str().unwrap_or_default().to_owned();
            match self.delete(rt, &item_ns, &name, options, false) {
                Ok(_) => deleted.push(item),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let list_kind = format!("{}List", rt.kind);
        Ok(json!({"kind": list_kind, "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rev.to_string()}, "items": deleted}))
    }
}

impl ApiError {
    fn with_message(mut self, m: String) -> Self {
        self.body["message"] = json!(m);
        self.body["reason"] = json!("Invalid");
        self
    }
}

fn items_last_key(items: &[Value]) -> (String, String) {
    items
        .last()
        .map(|o| (meta(o, "namespace").as_str().unwrap_or_default().to_owned(), meta(o, "name").as_str().unwrap_or_default().to_owned()))
        .unwrap_or_default()
}

fn scope_for(rt: &ResourceType, subresource: Option<&str>) -> Result<Scope, ApiError> {
    match subresource {
        None => Ok(if rt.status_subresource { Scope::Main } else { Scope::Whole }),
        Some("status") if rt.status_subresource => Ok(Scope::Status),
        Some(_) => Err(status::unknown_url()),
    }
}

/// Did anything outside `metadata` (and `status`) change?
fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| -> Value {
        let mut c = v.clone();
        if let Some(m) = c.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        c
    };
    strip(old) != strip(new)
}

fn decode_entries(o: &Value) -> Vec<Entry> {
    meta(o, "managedFields").as_array().map(|a| a.iter().filter_map(Entry::from_json).collect()).unwrap_or_default()
}

fn conflict_error(rt: &ResourceType, name: &str, conflicts: &[(String, String, managed::Path)]) -> ApiError {
    let q = rt.qualified();
    let mut by_manager: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (m, av, p) in conflicts {
        by_manager.entry((m.clone(), av.clone())).or_default().push(managed::display(p));
    }
    let n = conflicts.len();
    let message = if n == 1 {
        let (m, av, p) = &conflicts[0];
        format!("Apply failed with 1 conflict: conflict with \"{m}\" using {av}: {}", managed::display(p))
    } else {
        let parts: Vec<String> =
            by_manager.iter().map(|((m, av), ps)| format!("conflicts with \"{m}\" using {av}:\n- {}", ps.join("\n- "))).collect();
        format!("Apply failed with {n} conflicts: {}", parts.join("\n"))
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, av, p)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\" using {av}"), "field": managed::display(p)}))
        .collect();
    let mut d = Map::new();
    d.insert("name".into(), json!(name));
    if !q.group.is_empty() {
        d.insert("group".into(), json!(q.group));
    }
    d.insert("kind".into(), json!(q.resource));
    d.insert("causes".into(), Value::Array(causes));
    ApiError {
        code: 409,
        body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": "Conflict", "details": Value::Object(d), "code": 409}),
    }
}

/// Accept a CRD: check its names and set the NamesAccepted and Established conditions.
fn crd_accept(crd: &mut Value, name: &str) -> Result<(), ApiError> {
    let q = status::Qualified { group: "apiextensions.k8s.io", resource: "customresourcedefinitions", kind: "CustomResourceDefinition" };
    let group = crd["spec"]["group"].as_str().unwrap_or_default().to_owned();
    let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default().to_owned();
    if name != format!("{plural}.{group}") {
        return Err(status::invalid(
            &q,
            name,
            &[Cause {
                reason: "FieldValueInvalid",
                field: "metadata.name".into(),
                message: format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
            }],
        ));
    }
    let versions: Vec<String> = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let mut names = crd["spec"]["names"].clone();
    if names["singular"].is_null() {
        names["singular"] = json!(crd["spec"]["names"]["kind"].as_str().unwrap_or_default().to_lowercase());
    }
    if names["listKind"].is_null() {
        names["listKind"] = json!(format!("{}List", crd["spec"]["names"]["kind"].as_str().unwrap_or_default()));
    }
    let ts = crd["metadata"]["creationTimestamp"].clone();
    let cond =
        |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "lastTransitionTime": ts, "reason": reason, "message": msg});
    crd["status"] = json!({
        "conditions": [cond("NamesAccepted", "NoConflicts", "no conflicts found"), cond("Established", "InitialNamesAccepted", "the initial names have been accepted")],
        "acceptedNames": names,
        "storedVersions": versions,
    });
    Ok(())
}

/// What the built-in registries' strategies do on write: namespaces get their name label, phase
/// and finalizer; a Secret's write-only `stringData` is folded into `data`.
fn builtin_strategy(rt: &ResourceType, obj: &mut Value, create: bool, name: &str) {
    if rt.custom || !rt.group.is_empty() {
        return;
    }
    match rt.plural.as_str() {
        "namespaces" => {
            if !obj["metadata"]["labels"].is_object() {
                set_meta(obj, "labels", json!({}));
            }
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            if create {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
            }
        }
        "secrets" => {
            if let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
                if !obj["data"].is_object() {
                    obj["data"] = json!({});
                }
                for (k, v) in sd {
                    obj["data"][k] = json!(b64(v.as_str().unwrap_or_default().as_bytes()));
                }
            }
            if obj["type"].is_null() {
                obj["type"] = json!("Opaque");
            }
        }
        _ => {}
    }
}

fn next_uid(st: &mut State, deterministic: bool) -> String {
    st.uid_counter += 1;
    if deterministic {
        return format!("00000000-0000-4000-8000-{:012x}", st.uid_counter);
    }
    let a = splitmix(&mut st.random);
    let b = splitmix(&mut st.random);
    let h = format!("{a:016x}{b:016x}");
    let variant = ['8', '9', 'a', 'b'][(b & 3) as usize];
    format!("{}-{}-4{}-{}{}-{}", &h[0..8], &h[8..12], &h[13..16], variant, &h[17..20], &h[20..32])
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_suffix(st: &mut State) -> String {
    // apiserver names.SimpleNameGenerator: 5 characters from bcdfghjklmnpqrstvwxz2456789.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut r = splitmix(&mut st.random);
    (0..5)
        .map(|_| {
            let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
            r /= ALPHABET.len() as u64;
            c
        })
        .collect()
}
