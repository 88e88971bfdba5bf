//! The gateway's HTTP server: identify the caller (its pod, by source address), check that it
//! may use the table, forward the call (to DynamoDB with the operator's credentials, or to the
//! in-memory table), answer exactly as DynamoDB would, and record what the call means on the
//! StateLock: the holder at once when a lock is granted, the waiter when it is refused, nothing
//! left behind when it is released.
//!
//! The caller's identity is its pod's network identity: the gateway cannot verify SigV4
//! signatures (it does not know the callers' secrets), and `Who` in a request body names a pod for
//! events but never grants access.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, DefaultBodyLimit, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::Store,
    },
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use super::{
    convert,
    memory::MemoryTables,
    protocol::{self, Condition, DynamoErrorBody, Item, Request},
};
use crate::{
    crd::{LockSource, StateLock, state_lock_name},
    dynamo::{
        self,
        lock_item::{TableItem, parse_item},
    },
    mirror::plan::spec_for,
    reasons,
};

/// Where calls go.
pub enum Backend {
    /// The LockSource's DynamoDB table, with the operator's credentials.
    Forward,
    /// The in-memory tables (sandbox and tests).
    Memory(Arc<MemoryTables>),
}

/// The gateway's shared state.
pub struct Gateway {
    pub client: Client,
    pub recorder: Recorder,
    pub pods: Store<Pod>,
    pub sources: Store<LockSource>,
    pub backend: Backend,
    clients: Mutex<HashMap<String, aws_sdk_dynamodb::Client>>,
}

impl Gateway {
    pub fn new(client: Client, recorder: Recorder, pods: Store<Pod>, sources: Store<LockSource>, backend: Backend) -> Self {
        Self { client, recorder, pods, sources, backend, clients: Mutex::new(HashMap::new()) }
    }
}

/// Serve until `shutdown`; requests in flight are finished.
///
/// Nothing is accepted before the pod and LockSource caches have synced: until then a caller
/// could be refused or left unidentified. Connections wait in the listen backlog meanwhile.
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    let synced = async {
        let _ = gw.pods.wait_until_ready().await;
        let _ = gw.sources.wait_until_ready().await;
    };
    tokio::select! {
        () = synced => {},
        () = shutdown.cancelled() => return Ok(()),
    }
    let app = Router::new().route("/", post(handle)).layer(DefaultBodyLimit::max(protocol::MAX_BODY_BYTES + 1)).with_state(gw);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

fn respond(result: Result<Value, DynamoErrorBody>) -> Response {
    let (status, body, error) = match result {
        Ok(v) => (StatusCode::OK, v, None),
        Err(e) => (StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST), e.body(), Some(e.code().to_owned())),
    };
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/x-amz-json-1.0"));
    h.insert("x-amzn-requestid", HeaderValue::from_str(&request_id()).unwrap_or(HeaderValue::from_static("statelock")));
    if let Some(code) = error.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert("x-amzn-errortype", code);
    }
    r
}

fn request_id() -> String {
    let n = Timestamp::now().as_nanosecond();
    format!("{:016X}{:016X}", n as u64, (n >> 64) as u64 ^ u64::from(std::process::id()))
}

/// Does `ip` fall in the CIDR `range` (IPv4 or IPv6)?
pub fn cidr_contains(range: &str, ip: IpAddr) -> bool {
    let (net, bits) = range.split_once('/').unwrap_or((range, ""));
    let Ok(net) = net.trim().parse::<IpAddr>() else { return false };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let bits: u32 = bits.parse().unwrap_or(32).min(32);
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let bits: u32 = bits.parse().unwrap_or(128).min(128);
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// The caller's pod, when exactly one pod has its address (host-network pods share the node's).
fn caller_pod(pods: &Store<Pod>, ip: IpAddr) -> Option<Arc<Pod>> {
    let ip = ip.to_string();
    let mut found = pods
        .state()
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(ip.as_str()) && p.metadata.deletion_timestamp.is_none());
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// The LockSource that serves `table` to this caller, or why none may.
fn choose_source(sources: &Store<LockSource>, table: &str, pod_ns: Option<&str>, ip: IpAddr) -> Result<Arc<LockSource>, DynamoErrorBody> {
    let mut candidates: Vec<Arc<LockSource>> = sources.state().into_iter().filter(|s| s.spec.dynamodb.table_name == table).collect();
    if candidates.is_empty() {
        return Err(DynamoErrorBody::resource_not_found(table));
    }
    candidates.sort_by_key(|s| (s.namespace(), s.name_any()));
    let allowed = |s: &LockSource| {
        let ns_ok = pod_ns.is_some_and(|ns| match &s.spec.gateway.allowed_namespaces {
            Some(list) => list.iter().any(|n| n == ns),
            None => s.namespace().as_deref() == Some(ns),
        });
        ns_ok || s.spec.gateway.allowed_source_ranges.iter().any(|r| cidr_contains(r, ip))
    };
    let ok: Vec<Arc<LockSource>> = candidates.into_iter().filter(|s| allowed(s)).collect();
    ok.iter().find(|s| pod_ns.is_some_and(|ns| s.namespace().as_deref() == Some(ns))).or(ok.first()).cloned().ok_or_else(|| {
        let who = pod_ns.map_or_else(|| format!("caller {ip} (not a known pod)"), |ns| format!("pods in namespace {ns}"));
        DynamoErrorBody::access_denied(format!("{who} may not use table {table} through the statelock gateway"))
    })
}

async fn handle(State(gw): State<Arc<Gateway>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let span =
        info_span!("gateway", op = %target.trim_start_matches("DynamoDB_20120810."), peer = %peer.ip(), lock_id = tracing::field::Empty);
    async move {
        let started = Instant::now();
        let result = process(&gw, &target, &body, peer.ip()).await;
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "gateway request");
        respond(result)
    }
    .instrument(span)
    .await
}

async fn process(gw: &Arc<Gateway>, target: &str, body: &[u8], ip: IpAddr) -> Result<Value, DynamoErrorBody> {
    let req = protocol::parse(target, body)?;
    if let Some(id) = req.lock_id() {
        tracing::Span::current().record("lock_id", id);
    }
    let pod = caller_pod(&gw.pods, ip);
    let pod_ns = pod.as_ref().and_then(|p| p.namespace());
    let source = match choose_source(&gw.sources, req.table(), pod_ns.as_deref(), ip) {
        Ok(s) => s,
        Err(e) => {
            if e.code() == "AccessDeniedException" {
                deny_event(gw, req.table(), pod.as_deref(), &e.message).await;
            }
            return Err(e);
        }
    };
    let outcome = execute(gw, &source, &req).await;
    effects(gw.clone(), source, req, pod, &outcome);
    outcome.map(|(v, _)| v)
}

/// Run the call on the backend; also returns the item a GetItem read.
async fn execute(gw: &Gateway, source: &LockSource, req: &Request) -> Result<(Value, Option<Item>), DynamoErrorBody> {
    match &gw.backend {
        Backend::Memory(m) => {
            // In-memory tables exist as soon as a LockSource names them.
            m.create(req.table());
            memory_call(m, req)
        }
        Backend::Forward => forward(gw, source, req).await,
    }
}

fn memory_call(m: &MemoryTables, req: &Request) -> Result<(Value, Option<Item>), DynamoErrorBody> {
    match req {
        Request::PutItem { table, item, condition } => m.put(table, item.clone(), condition.as_ref()).map(|()| (json!({}), None)),
        Request::GetItem { table, key, projection, .. } => {
            let item = m.get(table, key)?;
            Ok((protocol::success_body(item.as_ref(), projection.as_deref()), item))
        }
        Request::DeleteItem { table, key, condition } => m.delete(table, key, condition.as_ref()).map(|()| (json!({}), None)),
    }
}

type SdkValues = HashMap<String, aws_sdk_dynamodb::types::AttributeValue>;

/// A condition as the SDK's optional expression, names and values (all `None` without one).
fn condition_sdk(c: Option<&Condition>) -> (Option<String>, Option<HashMap<String, String>>, Option<SdkValues>) {
    match c {
        None => (None, None, None),
        Some(Condition::NotExists(a)) => (Some("attribute_not_exists(#a)".into()), Some([("#a".to_owned(), a.clone())].into()), None),
        Some(Condition::Equals(a, v)) => {
            (Some("#a = :v".into()), Some([("#a".to_owned(), a.clone())].into()), Some([(":v".to_owned(), convert::to_sdk(v))].into()))
        }
    }
}

fn sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    e: aws_sdk_dynamodb::error::SdkError<E, R>,
) -> DynamoErrorBody
where
    aws_sdk_dynamodb::error::SdkError<E, R>: std::error::Error,
{
    match e.as_service_error() {
        Some(svc) => {
            let code = svc.code().unwrap_or("InternalServerError").to_owned();
            let status = if code.contains("InternalServerError") || code.contains("ServiceUnavailable") { 500 } else { 400 };
            DynamoErrorBody {
                status,
                type_: format!("com.amazonaws.dynamodb.v20120810#{code}"),
                message: svc.message().unwrap_or_default().to_owned(),
            }
        }
        None => DynamoErrorBody::internal(format!(
            "the statelock gateway could not reach DynamoDB: {}",
            aws_sdk_dynamodb::error::DisplayErrorContext(&e)
        )),
    }
}

async fn client_for(gw: &Gateway, source: &LockSource) -> Result<aws_sdk_dynamodb::Client, DynamoErrorBody> {
    let key = format!("{}/{}/{}", source.namespace().unwrap_or_default(), source.name_any(), source.resource_version().unwrap_or_default());
    if let Some(c) = gw.clients.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
        return Ok(c.clone());
    }
    let creds = dynamo::source_credentials::for_source(&gw.client, source).await.map_err(DynamoErrorBody::internal)?;
    let d = &source.spec.dynamodb;
    let c = dynamo::dynamodb_client(&d.region, d.endpoint.as_deref(), creds).await;
    gw.clients.lock().unwrap_or_else(PoisonError::into_inner).insert(key, c.clone());
    Ok(c)
}

async fn forward(gw: &Gateway, source: &LockSource, req: &Request) -> Result<(Value, Option<Item>), DynamoErrorBody> {
    let db = client_for(gw, source).await?;
    // The caller's table name is the LockSource's; forward to it (never to another table).
    let table = source.spec.dynamodb.table_name.as_str();
    match req {
        Request::PutItem { item, condition, .. } => {
            let (expr, names, values) = condition_sdk(condition.as_ref());
            db.put_item()
                .table_name(table)
                .set_item(Some(convert::item_to_sdk(item)))
                .set_condition_expression(expr)
                .set_expression_attribute_names(names)
                .set_expression_attribute_values(values)
                .send()
                .await
                .map_err(sdk_error)?;
            Ok((json!({}), None))
        }
        Request::GetItem { key, consistent, projection, .. } => {
            let mut call = db.get_item().table_name(table).set_key(Some(convert::item_to_sdk(key))).consistent_read(*consistent);
            if let Some(p) = projection {
                let names: HashMap<String, String> = p.iter().enumerate().map(|(i, a)| (format!("#p{i}"), a.clone())).collect();
                let expr = (0..p.len()).map(|i| format!("#p{i}")).collect::<Vec<_>>().join(", ");
                call = call.projection_expression(expr).set_expression_attribute_names(Some(names));
            }
            let out = call.send().await.map_err(sdk_error)?;
            let item = out.item.as_ref().map(convert::item_from_sdk);
            Ok((protocol::success_body(item.as_ref(), None), item))
        }
        Request::DeleteItem { key, condition, .. } => {
            let (expr, names, values) = condition_sdk(condition.as_ref());
            db.delete_item()
                .table_name(table)
                .set_key(Some(convert::item_to_sdk(key)))
                .set_condition_expression(expr)
                .set_expression_attribute_names(names)
                .set_expression_attribute_values(values)
                .send()
                .await
                .map_err(sdk_error)?;
            Ok((json!({}), None))
        }
    }
}

/// What the call means for the StateLock, applied in the background so the caller is not kept
/// waiting on the Kubernetes API.
fn effects(
    gw: Arc<Gateway>,
    source: Arc<LockSource>,
    req: Request,
    pod: Option<Arc<Pod>>,
    outcome: &Result<(Value, Option<Item>), DynamoErrorBody>,
) {
    let lock_attempt = matches!(&req, Request::PutItem { condition: Some(Condition::NotExists(a)), item, .. } if a == "LockID" && protocol::info_of(item).is_some());
    let released = matches!(&req, Request::DeleteItem { .. }) && req.lock_id().is_some_and(|id| !id.ends_with("-md5"));
    let granted = outcome.is_ok();
    let contended = outcome.as_ref().err().is_some_and(|e| e.code() == "ConditionalCheckFailedException");
    if !(lock_attempt && (granted || contended)) && !(released && granted) {
        return;
    }
    tokio::spawn(async move {
        let result = if lock_attempt && granted {
            record_holder(&gw, &source, &req, pod.as_deref()).await
        } else if lock_attempt {
            record_waiter(&gw, &source, &req, pod.as_deref()).await
        } else {
            remove_lock(&gw, &source, &req).await
        };
        if let Err(e) = result {
            warn!(error = %e, "gateway failed to update the StateLock; the mirror will catch up");
        }
    });
}

fn pod_fields(pod: Option<&Pod>) -> Value {
    match pod {
        Some(p) => json!({"namespace": p.namespace(), "pod": p.name_any(), "uid": p.uid()}),
        None => json!({}),
    }
}

async fn record_holder(gw: &Gateway, source: &LockSource, req: &Request, pod: Option<&Pod>) -> Result<(), kube::Error> {
    let Request::PutItem { item, .. } = req else { return Ok(()) };
    let sdk_item = convert::item_to_sdk(item);
    let TableItem::Lock(record) = parse_item(&sdk_item) else { return Ok(()) };
    let ns = source.namespace().unwrap_or_default();
    let name = state_lock_name(&record.lock_id);
    let api: Api<StateLock> = Api::namespaced(gw.client.clone(), &ns);
    let owner = source.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o.block_owner_deletion = Some(false);
        o
    });
    let spec = spec_for(&source.name_any(), &record);
    let body = json!({
        "apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock",
        "metadata": {"name": name, "labels": {reasons::SOURCE_LABEL: source.name_any()}, "ownerReferences": owner.iter().collect::<Vec<_>>()},
        "spec": spec,
    });
    let obj = api.patch(&name, &PatchParams::apply(reasons::MIRROR_MANAGER).force(), &Patch::Apply(&body)).await?;
    if let (Some(p), Some(lock_id)) = (pod, record.info.id.as_deref()) {
        let holder = json!({"namespace": p.namespace(), "pod": p.name_any(), "uid": p.uid(), "lockId": lock_id, "seenAt": Timestamp::now().to_string()});
        let status = json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock", "metadata": {"name": name}, "status": {"gatewayHolder": holder}});
        api.patch_status(&name, &PatchParams::apply(reasons::GATEWAY_MANAGER).force(), &Patch::Apply(&status)).await?;
    }
    let who = record.info.who.as_deref().unwrap_or("unknown");
    publish(
        gw,
        &obj,
        reasons::LOCK_ACQUIRED,
        false,
        &format!("{who} took the lock on {} for {} through the gateway", record.lock_id, record.info.operation.as_deref().unwrap_or("?")),
        None,
    )
    .await;
    Ok(())
}

async fn record_waiter(gw: &Gateway, source: &LockSource, req: &Request, pod: Option<&Pod>) -> Result<(), kube::Error> {
    let Request::PutItem { item, .. } = req else { return Ok(()) };
    let TableItem::Lock(waiter) = parse_item(&convert::item_to_sdk(item)) else { return Ok(()) };
    let ns = source.namespace().unwrap_or_default();
    let name = state_lock_name(&waiter.lock_id);
    let api: Api<StateLock> = Api::namespaced(gw.client.clone(), &ns);
    let Some(lock) = api.get_opt(&name).await? else { return Ok(()) };
    let now = Timestamp::now().to_string();
    let Some(waiter_id) = waiter.info.id.clone() else { return Ok(()) };
    let mut waiters: Vec<Value> = lock
        .status
        .as_ref()
        .and_then(|s| s.contention.as_ref())
        .map(|c| c.waiters.iter().filter_map(|w| serde_json::to_value(w).ok()).collect())
        .unwrap_or_default();
    match waiters.iter_mut().find(|w| w["id"] == waiter_id.as_str()) {
        Some(w) => {
            w["attempts"] = json!(w["attempts"].as_i64().unwrap_or(0) + 1);
            w["lastAttempt"] = json!(now);
        }
        None => {
            let mut w = json!({"id": waiter_id, "who": waiter.info.who, "operation": waiter.info.operation, "firstAttempt": now, "lastAttempt": now, "attempts": 1});
            if let (Some(m), Some(extra)) = (w.as_object_mut(), pod_fields(pod).as_object()) {
                m.extend(extra.iter().filter(|(k, _)| *k != "uid").map(|(k, v)| (k.clone(), v.clone())));
            }
            waiters.push(w);
        }
    }
    let status = json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock", "metadata": {"name": name}, "status": {"contention": {"waiterCount": waiters.len(), "waiters": waiters}}});
    api.patch_status(&name, &PatchParams::apply(reasons::GATEWAY_WAITERS_MANAGER).force(), &Patch::Apply(&status)).await?;
    let holder_who = lock.spec.lock_info.who.as_deref().unwrap_or("unknown");
    let holder_pod =
        lock.status.as_ref().and_then(|s| s.holder.as_ref()).and_then(|h| h.pod.clone()).map(|p| format!(" (pod {p})")).unwrap_or_default();
    let waiter_pod = pod.map(|p| format!(" (pod {}/{})", p.namespace().unwrap_or_default(), p.name_any())).unwrap_or_default();
    let note = format!(
        "{}{waiter_pod} waits to {} {}: held by {holder_who}{holder_pod} for {} since {}",
        waiter.info.who.as_deref().unwrap_or("unknown"),
        waiter.info.operation.as_deref().unwrap_or("use"),
        waiter.lock_id,
        lock.spec.lock_info.operation.as_deref().unwrap_or("?"),
        lock.spec.lock_info.created.as_deref().unwrap_or("?")
    );
    publish(gw, &lock, reasons::LOCK_CONTENDED, true, &note, pod).await;
    Ok(())
}

async fn remove_lock(gw: &Gateway, source: &LockSource, req: &Request) -> Result<(), kube::Error> {
    let Some(lock_id) = req.lock_id() else { return Ok(()) };
    let ns = source.namespace().unwrap_or_default();
    let name = state_lock_name(lock_id);
    let api: Api<StateLock> = Api::namespaced(gw.client.clone(), &ns);
    let Some(lock) = api.get_opt(&name).await? else { return Ok(()) };
    if lock.spec.lock_id != lock_id {
        return Ok(());
    }
    let held = lock
        .spec
        .lock_info
        .created
        .as_deref()
        .and_then(dynamo::lock_item::parse_created)
        .map(|c| ((Timestamp::now().as_nanosecond() - c) / 1_000_000_000) as i64);
    publish(
        gw,
        &lock,
        reasons::LOCK_RELEASED,
        false,
        &format!(
            "lock on {lock_id} released after {} (through the gateway)",
            held.map(crate::mirror::plan::human).unwrap_or_else(|| "an unknown time".into())
        ),
        None,
    )
    .await;
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions { uid: lock.uid(), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn publish(gw: &Gateway, lock: &StateLock, reason: &str, warning: bool, note: &str, pod: Option<&Pod>) {
    let event = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(dynamo::lock_item::truncate(note, 1024).to_owned()),
        action: "Gateway".into(),
        secondary: None,
    };
    if let Err(e) = gw.recorder.publish(&event, &lock.object_ref(&())).await {
        warn!(error = %e, reason, "failed to publish event");
    }
    if let Some(p) = pod
        && let Err(e) = gw.recorder.publish(&event, &p.object_ref(&())).await
    {
        warn!(error = %e, reason, "failed to publish event on the pod");
    }
}

async fn deny_event(gw: &Gateway, table: &str, pod: Option<&Pod>, message: &str) {
    warn!(%table, %message, "gateway access denied");
    let event = Event {
        type_: EventType::Warning,
        reason: reasons::GATEWAY_ACCESS_DENIED.into(),
        note: Some(message.to_owned()),
        action: "Gateway".into(),
        secondary: None,
    };
    for s in gw.sources.state().iter().filter(|s| s.spec.dynamodb.table_name == table) {
        let _ = gw.recorder.publish(&event, &s.object_ref(&())).await;
    }
    if let Some(p) = pod {
        let _ = gw.recorder.publish(&event, &p.object_ref(&())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(cidr_contains("10.0.0.0/8", ip("10.1.2.3")));
        assert!(!cidr_contains("10.0.0.0/8", ip("11.1.2.3")));
        assert!(cidr_contains("127.0.0.1/32", ip("127.0.0.1")));
        assert!(cidr_contains("127.0.0.1", ip("127.0.0.1")));
        assert!(cidr_contains("0.0.0.0/0", ip("192.0.2.1")));
        assert!(cidr_contains("fd00::/8", ip("fd12::1")));
        assert!(!cidr_contains("fd00::/8", ip("10.0.0.1")));
        assert!(!cidr_contains("garbage", ip("10.0.0.1")));
    }
}
