//! The HTTP front: routing, content negotiation (JSON and Tables), discovery, watch streams
//! and the test hooks under `/emulator/`.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{Api, ListParams, PatchType, WriteParams},
    rbac::{self, Authorizer},
    registry::ResourceType,
    selectors::LabelSelector,
    status::{self, ApiError},
    store::{Change, ChangeType},
    table,
};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body accepted (the apiserver's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// How often an idle watch with `allowWatchBookmarks` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// `timeoutSeconds` when a watch names none.
    pub default_watch_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { bookmark_interval: Duration::from_secs(60), default_watch_timeout: Duration::from_secs(1800) }
    }
}

/// What a request handler needs.
pub struct Shared {
    pub api: Api,
    pub options: ServeOptions,
    pub authz: Authorizer,
    pub shutdown: CancellationToken,
    pub addr: SocketAddr,
}

fn full(code: StatusCode, ct: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = code;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap_or(HeaderValue::from_static("application/json")));
    r
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    full(StatusCode::from_u16(code).unwrap_or(StatusCode::OK), "application/json", serde_json::to_vec(v).unwrap_or_default())
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.body)
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.insert(percent_decode(k), percent_decode(v));
    }
    m
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() && i + 2 <= (b.len() - 1) => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Does the client ask for a Table?
fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table"))
}

/// Serve one request.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let latency = shared.api.lock().faults.latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let resp = match route(&shared, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    Ok(resp)
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(_) => Err(ApiError {
            code: 413,
            body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "the request body is too large", "reason": "RequestEntityTooLarge", "code": 413}),
        }),
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = query_map(req.uri().query());
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let accept = header("accept");
    let content_type = header("content-type");
    let user_agent = header("user-agent");
    let authorization = header("authorization");
    let mut body = read_body(req.into_body()).await?;
    if content_type.starts_with("application/vnd.kubernetes.protobuf") {
        let obj = crate::proto::decode(&body).map_err(status::unsupported_media_type)?;
        body = Bytes::from(serde_json::to_vec(&obj).unwrap_or_default());
    } else if content_type.starts_with("application/cbor") {
        return Err(status::unsupported_media_type(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type})"
        )));
    }

    if let Some(hook) = path.strip_prefix("/emulator/") {
        return hooks(shared, &method, hook, &body);
    }
    let user = shared.authz.authenticate(&authorization)?;
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => return Ok(json_response(200, &version())),
        ["healthz" | "livez" | "readyz"] => return Ok(full(StatusCode::OK, "text/plain", "ok")),
        ["api"] => {
            return Ok(json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]}),
            ));
        }
        ["apis"] => return Ok(json_response(200, &group_list(&shared.api))),
        ["apis", g] => {
            let list = group_list(&shared.api);
            return list["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == *g)
                .map(|grp| {
                    let mut grp = grp.clone();
                    grp["kind"] = json!("APIGroup");
                    grp["apiVersion"] = json!("v1");
                    json_response(200, &grp)
                })
                .ok_or_else(status::unknown_url);
        }
        ["api", "v1"] => return Ok(json_response(200, &resource_list(&shared.api, "", "v1"))),
        ["apis", g, v] => {
            let list = resource_list(&shared.api, g, v);
            return if list["resources"].as_array().is_some_and(|a| !a.is_empty()) {
                Ok(json_response(200, &list))
            } else {
                Err(status::unknown_url())
            };
        }
        ["openapi", "v3"] => return Ok(json_response(200, &openapi_index(&shared.api))),
        ["openapi", "v3", rest @ ..] => return openapi_gv(&shared.api, rest).map(|v| json_response(200, &v)),
        _ => {}
    }
    // Resource paths.
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(status::unknown_url()),
    };
    let (ns, plural, name, sub): (Option<&str>, &str, Option<&str>, Option<&str>) = match rest {
        ["namespaces", ns, plural, tail @ ..] if shared.api.resource(group, version, plural).is_some_and(|t| t.namespaced) => match tail {
            [] => (Some(ns), plural, None, None),
            [name] => (Some(ns), plural, Some(name), None),
            [name, sub] => (Some(ns), plural, Some(name), Some(sub)),
            _ => return Err(status::unknown_url()),
        },
        [plural] => (None, plural, None, None),
        [plural, name] => (None, plural, Some(name), None),
        [plural, name, sub] => (None, plural, Some(name), Some(sub)),
        _ => return Err(status::unknown_url()),
    };
    let rt = shared.api.resource(group, version, plural).ok_or_else(status::unknown_url)?;
    if !rt.namespaced && ns.is_some() {
        return Err(status::unknown_url());
    }
    if rt.namespaced && name.is_some() && ns.is_none() {
        return Err(status::unknown_url());
    }
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, name, watching) {
        (&Method::GET, None, true) => "watch",
        (&Method::GET, None, false) => "list",
        (&Method::GET, Some(_), _) => "get",
        (&Method::POST, None, _) => "create",
        (&Method::PUT, Some(_), _) => "update",
        (&Method::PATCH, Some(_), _) => "patch",
        (&Method::DELETE, Some(_), _) => "delete",
        (&Method::DELETE, None, _) => "deletecollection",
        _ => return Err(status::method_not_supported(&rt.qualified(), method.as_str())),
    };
    let attributes = |verb| rbac::Attributes {
        verb,
        group: &rt.group,
        resource: &rt.plural,
        subresource: sub.unwrap_or_default(),
        namespace: ns.unwrap_or_default(),
        name: name.unwrap_or_default(),
    };
    let authorize = |verb| {
        let a = attributes(verb);
        let result = shared.authz.authorize(&shared.api, &user, &a, &rt);
        if matches!(shared.authz, rbac::Authorizer::Rbac { .. }) {
            shared.api.record_audit(crate::api::AuditRecord {
                user: user.name.clone(),
                verb: verb.to_owned(),
                group: a.group.to_owned(),
                resource: a.resource.to_owned(),
                subresource: a.subresource.to_owned(),
                namespace: a.namespace.to_owned(),
                name: a.name.to_owned(),
                allowed: result.is_ok(),
            });
        }
        result
    };
    authorize(verb)?;
    // As the apiserver does: an apply that would create the object also needs `create`.
    if verb == "patch"
        && sub.is_none()
        && PatchType::from_content_type(&content_type) == Some(PatchType::Apply)
        && shared.api.get(&rt, ns.unwrap_or_default(), name.unwrap_or_default()).is_err()
    {
        authorize("create")?;
    }

    let wp = WriteParams {
        field_manager: query.get("fieldManager").cloned(),
        user_agent,
        force: query.get("force").is_some_and(|f| f == "true"),
        dry_run: query.get("dryRun").is_some_and(|d| d == "All"),
    };
    let ns_str = ns.unwrap_or_default();
    let parse_json = |b: &Bytes| -> Result<Value, ApiError> {
        serde_json::from_slice(b).map_err(|e| status::bad_request(format!("error decoding request body: {e}")))
    };
    match verb {
        "watch" => watch(shared.clone(), rt, ns.map(str::to_owned), &query, &accept).await,
        "list" => {
            if query.contains_key("sendInitialEvents") {
                return Err(status::invalid_options(
                    "ListOptions",
                    &[status::Cause {
                        reason: "FieldValueForbidden",
                        field: "sendInitialEvents".into(),
                        message: "Forbidden: sendInitialEvents is forbidden for list".into(),
                    }],
                ));
            }
            let p = list_params(&query);
            let (items, rev, cont) = shared.api.list(&rt, ns, &p)?;
            if wants_table(&accept) {
                let include = query.get("includeObject").map(String::as_str).unwrap_or("Metadata");
                return Ok(json_response(
                    200,
                    &table::table(&rt, &items, &rev.to_string(), cont.as_deref(), include, shared.api.clock.now_nanos()),
                ));
            }
            let items: Vec<Value> = if rt.custom {
                items
            } else {
                items
                    .into_iter()
                    .map(|mut i| {
                        if let Some(m) = i.as_object_mut() {
                            m.remove("apiVersion");
                            m.remove("kind");
                        }
                        i
                    })
                    .collect()
            };
            let mut md = json!({"resourceVersion": rev.to_string()});
            if let Some(c) = cont {
                md["continue"] = json!(c);
            }
            Ok(json_response(
                200,
                &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": md, "items": items}),
            ))
        }
        "get" => {
            let name = name.unwrap_or_default();
            if let Some(s) = sub
                && !(s == "status" && rt.status_subresource)
            {
                return Err(status::unknown_url());
            }
            let obj = shared.api.get(&rt, ns_str, name)?;
            if wants_table(&accept) {
                let include = query.get("includeObject").map(String::as_str).unwrap_or("Metadata");
                let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned();
                return Ok(json_response(200, &table::table(&rt, &[obj], &rv, None, include, shared.api.clock.now_nanos())));
            }
            Ok(json_response(200, &obj))
        }
        "create" => {
            if sub.is_some() {
                return Err(status::unknown_url());
            }
            let obj = shared.api.create(&rt, ns_str, parse_json(&body)?, &wp)?;
            Ok(json_response(201, &obj))
        }
        "update" => {
            let (code, obj) = shared.api.update(&rt, ns_str, name.unwrap_or_default(), parse_json(&body)?, sub, &wp)?;
            Ok(json_response(code, &obj))
        }
        "patch" => {
            let pt = PatchType::from_content_type(&content_type).ok_or_else(|| {
                status::unsupported_media_type(format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml{}", if rt.custom { "" } else { ", application/strategic-merge-patch+json" }))
            })?;
            let (code, obj) = shared.api.patch(&rt, ns_str, name.unwrap_or_default(), pt, &body, sub, &wp)?;
            Ok(json_response(code, &obj))
        }
        "delete" => {
            let opts: Value = if body.is_empty() { json!({}) } else { parse_json(&body)? };
            let (code, obj) = shared.api.delete(&rt, ns_str, name.unwrap_or_default(), &opts, wp.dry_run)?;
            Ok(json_response(code, &obj))
        }
        "deletecollection" => {
            let opts: Value = if body.is_empty() { json!({}) } else { parse_json(&body)? };
            let out = shared.api.delete_collection(&rt, ns, &list_params(&query), &opts)?;
            Ok(json_response(200, &out))
        }
        _ => Err(status::unknown_url()),
    }
}

fn list_params(q: &HashMap<String, String>) -> ListParams {
    ListParams {
        label_selector: q.get("labelSelector").cloned(),
        field_selector: q.get("fieldSelector").cloned(),
        limit: q.get("limit").and_then(|l| l.parse().ok()),
        continue_token: q.get("continue").cloned(),
        resource_version: q.get("resourceVersion").cloned().filter(|s| !s.is_empty()),
        resource_version_match: q.get("resourceVersionMatch").cloned().filter(|s| !s.is_empty()),
    }
}

fn version() -> Value {
    json!({"major": "1", "minor": "32", "emulationMajor": "1", "emulationMinor": "32", "gitVersion": "v1.32.0", "gitCommit": "statelock-apiserver-emulator", "gitTreeState": "clean", "buildDate": "2026-11-01T00:00:00Z", "goVersion": "go1.23.0", "compiler": "gc", "platform": "linux/amd64"})
}

fn group_list(api: &Api) -> Value {
    let st = api.lock();
    let mut groups: Vec<Value> = Vec::new();
    for (g, v) in st.registry.group_versions() {
        if g.is_empty() {
            continue;
        }
        let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
        match groups.iter_mut().find(|x| x["name"] == g.as_str()) {
            Some(x) => {
                if let Some(a) = x["versions"].as_array_mut() {
                    a.push(gv);
                }
            }
            None => groups.push(json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})),
        }
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(api: &Api, group: &str, version: &str) -> Value {
    let st = api.lock();
    let resources: Vec<Value> =
        st.registry.all().filter(|t| t.group == group && t.version == version).flat_map(ResourceType::discovery).collect();
    let gv = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn openapi_index(api: &Api) -> Value {
    let st = api.lock();
    let mut paths = serde_json::Map::new();
    for (g, v) in st.registry.group_versions() {
        let p = if g.is_empty() { format!("api/{v}") } else { format!("apis/{g}/{v}") };
        paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=0")}));
    }
    json!({"paths": paths})
}

/// A minimal per-group-version OpenAPI v3 document: enough for kubectl to learn that PATCH
/// takes `fieldValidation` (so `kubectl apply` with its default `--validate=strict` works).
fn openapi_gv(api: &Api, rest: &[&str]) -> Result<Value, ApiError> {
    let (group, version) = match rest {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return Err(status::unknown_url()),
    };
    let st = api.lock();
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for t in st.registry.all().filter(|t| t.group == group && t.version == version) {
        let base = if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
        let p = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{base}/{}/{{name}}", t.plural)
        };
        let gvk = json!({"group": group, "version": version, "kind": t.kind});
        let op = json!({"x-kubernetes-group-version-kind": gvk, "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}], "responses": {"200": {"description": "OK"}}});
        paths.insert(p, json!({"patch": op, "put": op.clone()}));
        let schema_name = format!("{}.{}.{}", if group.is_empty() { "io.k8s.api.core" } else { group }, version, t.kind);
        let mut s = t.schema.clone().unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        s["x-kubernetes-group-version-kind"] = json!([gvk]);
        schemas.insert(schema_name, s);
    }
    if paths.is_empty() {
        return Err(status::unknown_url());
    }
    Ok(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths, "components": {"schemas": schemas}}),
    )
}

fn hooks(shared: &Arc<Shared>, method: &Method, hook: &str, body: &Bytes) -> Result<Response<Body>, ApiError> {
    let arg: Value =
        if body.is_empty() { json!({}) } else { serde_json::from_slice(body).map_err(|e| status::bad_request(e.to_string()))? };
    let api = &shared.api;
    match (method, hook) {
        (&Method::POST, "compact") => Ok(json_response(200, &json!({"revision": api.lock().store.compact()}))),
        (&Method::POST, "drop-watches") => Ok(json_response(200, &json!({"dropped": api.lock().store.drop_watches()}))),
        (&Method::POST, "faults") => {
            let mut st = api.lock();
            if let Some(w) = arg["nextWrites"].as_array() {
                st.faults.next_writes = w.iter().filter_map(|c| c.as_u64().map(|c| c as u16)).collect();
            }
            if let Some(l) = arg["latencyMs"].as_u64() {
                st.faults.latency_ms = l;
            }
            Ok(json_response(200, &json!({"nextWrites": st.faults.next_writes, "latencyMs": st.faults.latency_ms})))
        }
        (&Method::POST, "clock") => {
            let moved = if let Some(s) = arg["advanceSeconds"].as_f64() {
                api.clock.advance((s * 1e9) as i64)
            } else if let Some(t) = arg["set"].as_str().and_then(crate::clock::parse_rfc3339) {
                api.clock.set(t)
            } else {
                return Err(status::bad_request("expected advanceSeconds or set"));
            };
            if !moved {
                return Err(status::bad_request("the emulator runs on the system clock; start it with a manual clock"));
            }
            Ok(json_response(200, &json!({"now": api.clock.now_rfc3339()})))
        }
        (&Method::GET, "counters") => {
            let st = api.lock();
            let writes: serde_json::Map<String, Value> = st
                .store
                .write_counts()
                .iter()
                .map(|(k, n)| (if k.group.is_empty() { k.plural.clone() } else { format!("{}.{}", k.plural, k.group) }, json!(n)))
                .collect();
            Ok(json_response(
                200,
                &json!({"revision": st.store.revision(), "compactedRevision": st.store.compacted_revision(), "watchers": st.store.watcher_count(), "writes": writes}),
            ))
        }
        _ => Err(status::unknown_url()),
    }
}

struct WatchFilter {
    rt: ResourceType,
    ns: Option<String>,
    labels: LabelSelector,
    fields: crate::selectors::FieldSelector,
    table: Option<String>,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn line(&self, kind: &str, obj: &Value, now: i64) -> Bytes {
        let object = match &self.table {
            Some(include) => {
                let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned();
                table::table(&self.rt, std::slice::from_ref(obj), &rv, None, include, now)
            }
            None => obj.clone(),
        };
        let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    }

    /// The event a watcher sees for a change, with selector transitions.
    fn translate(&self, c: &Change) -> Option<(&'static str, Value)> {
        if self.ns.as_deref().is_some_and(|n| n != c.namespace) {
            return None;
        }
        let view = Api::view(&self.rt, &c.object);
        let prev = c.prev.as_ref().map(|p| Api::view(&self.rt, p));
        let now_m = self.matches(&view);
        let was_m = prev.as_ref().is_some_and(|p| self.matches(p));
        match c.kind {
            ChangeType::Added => now_m.then_some(("ADDED", view)),
            ChangeType::Deleted => (was_m || now_m).then_some(("DELETED", view)),
            ChangeType::Modified => match (was_m, now_m) {
                (true, true) => Some(("MODIFIED", view)),
                (false, true) => Some(("ADDED", view)),
                (true, false) => {
                    let mut last = prev.unwrap_or(view.clone());
                    last["metadata"]["resourceVersion"] = view["metadata"]["resourceVersion"].clone();
                    Some(("DELETED", last))
                }
                (false, false) => None,
            },
        }
    }
}

fn bookmark(rt: &ResourceType, rev: u64, initial_end: bool) -> Bytes {
    let mut md = json!({"resourceVersion": rev.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let mut v =
        serde_json::to_vec(&json!({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": md}}))
            .unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

async fn watch(
    shared: Arc<Shared>,
    rt: ResourceType,
    ns: Option<String>,
    q: &HashMap<String, String>,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let mut paused = shared.api.watches_paused.subscribe();
    while *paused.borrow_and_update() {
        if paused.changed().await.is_err() {
            break;
        }
    }
    let held_key = format!("{}/{}", rt.group, rt.plural);
    let mut held = shared.api.watches_held.subscribe();
    while held.borrow_and_update().contains(&held_key) {
        if held.changed().await.is_err() {
            break;
        }
    }
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or_default()).map_err(status::bad_request)?;
    let fields = shared.api.field_selector(&rt, q.get("fieldSelector").map(String::as_str))?;
    let send_initial = q.get("sendInitialEvents").is_some_and(|s| s == "true");
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|s| s == "true");
    let rv = q.get("resourceVersion").cloned().unwrap_or_default();
    if send_initial && q.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
        return Err(status::invalid_options(
            "ListOptions",
            &[status::Cause {
                reason: "FieldValueForbidden",
                field: "resourceVersionMatch".into(),
                message: "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan".into(),
            }],
        ));
    }
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(shared.options.default_watch_timeout);
    let table = wants_table(accept).then(|| q.get("includeObject").cloned().unwrap_or_else(|| "Metadata".into()));
    let filter = WatchFilter { rt: rt.clone(), ns: ns.clone(), labels, fields, table };
    let now = shared.api.clock.now_nanos();

    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let replay = rv.is_empty() || rv == "0" || send_initial;
    let (watch_id, backlog, mut changes, initial, start_rev, expired) = {
        let mut st = shared.api.lock();
        let current = st.store.revision();
        let from =
            if replay { current } else { rv.parse::<u64>().map_err(|_| status::bad_request(format!("invalid resource version: {rv}")))? };
        let initial: Vec<Value> = if replay {
            st.store
                .list_at(&rt.storage, ns.as_deref(), current, None)
                .map(|(_, o)| Api::view(&rt, &o))
                .filter(|o| filter.matches(o))
                .collect()
        } else {
            Vec::new()
        };
        match st.store.watch(&rt.storage, from) {
            Ok((id, backlog, changes)) => (id, backlog, changes, initial, from, None),
            Err(oldest) => {
                let (_dead_tx, dead_rx) = mpsc::unbounded_channel();
                (0, Vec::new(), dead_rx, Vec::new(), from, Some(oldest))
            }
        }
    };
    let shutdown = shared.shutdown.clone();
    let interval = shared.options.bookmark_interval;
    let api = shared.api.clone();
    tokio::spawn(async move {
        let mut last_rev = start_rev;
        if let Some(oldest) = expired {
            let mut v = serde_json::to_vec(&json!({"type": "ERROR", "object": status::too_old_resource_version(start_rev, oldest).body}))
                .unwrap_or_default();
            v.push(b'\n');
            let _ = tx.send(Bytes::from(v)).await;
            return;
        }
        for obj in &initial {
            if tx.send(filter.line("ADDED", obj, now)).await.is_err() {
                api.lock().store.unwatch(watch_id);
                return;
            }
        }
        if send_initial && bookmarks {
            let _ = tx.send(bookmark(&filter.rt, start_rev, true)).await;
        }
        for c in backlog {
            last_rev = c.rev;
            if let Some((kind, obj)) = filter.translate(&c)
                && tx.send(filter.line(kind, &obj, api.clock.now_nanos())).await.is_err()
            {
                api.lock().store.unwatch(watch_id);
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                c = changes.recv() => match c {
                    Some(c) => {
                        last_rev = last_rev.max(c.rev);
                        if let Some((kind, obj)) = filter.translate(&c)
                            && tx.send(filter.line(kind, &obj, api.clock.now_nanos())).await.is_err() { break; }
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    if bookmarks {
                        let rev = api.lock().store.revision();
                        // Every change up to `rev` is already queued: send those first.
                        while let Ok(c) = changes.try_recv() {
                            last_rev = last_rev.max(c.rev);
                            if let Some((kind, obj)) = filter.translate(&c) {
                                let _ = tx.send(filter.line(kind, &obj, api.clock.now_nanos())).await;
                            }
                        }
                        last_rev = last_rev.max(rev);
                        if tx.send(bookmark(&filter.rt, last_rev, false)).await.is_err() { break; }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let rev = api.lock().store.revision();
                        while let Ok(c) = changes.try_recv() {
                            last_rev = last_rev.max(c.rev);
                            if let Some((kind, obj)) = filter.translate(&c) {
                                let _ = tx.send(filter.line(kind, &obj, api.clock.now_nanos())).await;
                            }
                        }
                        let _ = tx.send(bookmark(&filter.rt, last_rev.max(rev), false)).await;
                    }
                    break;
                }
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
            }
        }
        api.lock().store.unwatch(watch_id);
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx)) });
    let mut resp = Response::new(StreamBody::new(stream.boxed()).boxed_unsync());
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}
