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
    sync::Arc,
    time::{Duration, Instant},
};

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Client, Resource, ResourceExt,
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
    caches::{Caches, Caller},
    convert,
    effects::{Effects, EffectsConfig},
    memory::MemoryTables,
    protocol::{self, Condition, DynamoErrorBody, Item, Request},
};
use crate::{
    cluster::pods::pod_facts,
    crd::LockSource,
    dynamo::lock_item::{TableItem, parse_item},
    lock_record::split_who,
    metrics::{AttemptLabels, AttemptResult, Metrics, Operation, OperationLabels, RequestLabels},
    reasons,
    tenancy::TenancyPolicy,
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
    client: Client,
    recorder: Recorder,
    caches: Caches,
    backend: Backend,
    effects: Arc<Effects>,
    metrics: Arc<Metrics>,
    tenancy: Arc<TenancyPolicy>,
}

impl Gateway {
    /// A gateway with caches of its own (for tests and benchmarks; the operator shares its caches
    /// through [`Self::with_caches`]).
    pub fn new(
        client: Client,
        recorder: Recorder,
        backend: Backend,
        metrics: Arc<Metrics>,
        config: EffectsConfig,
        tenancy: Arc<TenancyPolicy>,
    ) -> Arc<Self> {
        let caches = Caches::start(&client);
        Self::with_caches(client, caches, recorder, backend, metrics, config, tenancy)
    }

    pub fn with_caches(
        client: Client,
        caches: Caches,
        recorder: Recorder,
        backend: Backend,
        metrics: Arc<Metrics>,
        config: EffectsConfig,
        tenancy: Arc<TenancyPolicy>,
    ) -> Arc<Self> {
        let effects = Effects::new(client.clone(), recorder.clone(), caches.clone(), &metrics, config);
        Arc::new(Self { client, recorder, caches, backend, effects, metrics, tenancy })
    }

    /// Resolves once the pod and LockSource caches hold a complete list.
    pub async fn synced(&self) {
        self.caches.synced().await;
    }
}

/// Serve until `shutdown`; requests in flight are finished, then the StateLock updates they
/// queued are applied before this returns.
///
/// Nothing is accepted before the pod and LockSource caches have synced: until then a caller
/// could be refused or left unidentified. Connections wait in the listen backlog meanwhile.
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    tokio::select! {
        () = gw.synced() => {},
        () = shutdown.cancelled() => return Ok(()),
    }
    let effects = tokio::spawn(gw.effects.clone().run(shutdown.clone()));
    let app = Router::new().route("/", post(handle)).with_state(gw.clone());
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    gw.effects.close();
    let _ = effects.await;
    served
}

/// How long a client may take to send its request body: a slow or stalled client gets a
/// DynamoDB-style error instead of holding a connection and its buffers.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The region a SigV4-signed request was signed for (`Credential=<key>/<date>/<region>/dynamodb/aws4_request`).
pub fn signed_region(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    let cred = auth.split([',', ' ']).find_map(|part| part.trim().strip_prefix("Credential="))?;
    let mut parts = cred.split('/');
    let region = parts.nth(2)?;
    (!region.is_empty() && region.len() <= 64).then(|| region.to_owned())
}

/// The LockSource that serves `table` in `region` to this caller, or why none may.
///
/// A pod is admitted by its namespace only; `allowedSourceRanges` admits callers that are not
/// pods. When more than one LockSource could serve the call (two tables of one name in two
/// accounts, or another namespace's LockSource that admits the caller), the call is refused with
/// the conflict named: the gateway never guesses whose table a lock belongs in.
fn choose_source(
    sources: &Store<LockSource>,
    table: &str,
    region: Option<&str>,
    caller: &Caller,
    ip: IpAddr,
    servable: impl Fn(&LockSource) -> bool,
) -> Result<Arc<LockSource>, DynamoErrorBody> {
    let mut candidates: Vec<Arc<LockSource>> = sources
        .state()
        .into_iter()
        .filter(|s| s.spec.dynamodb.as_ref().is_some_and(|d| d.table_name == table && region.is_none_or(|r| d.region == r)))
        .collect();
    if candidates.is_empty() {
        return Err(DynamoErrorBody::resource_not_found(table));
    }
    candidates.sort_by_key(|s| (s.namespace(), s.name_any()));
    let pod_ns = caller.pod().and_then(|p| p.namespace());
    let allowed = |s: &LockSource| match &pod_ns {
        Some(ns) => match &s.spec.gateway.allowed_namespaces {
            Some(list) => list.iter().any(|n| n == ns),
            None => s.namespace().as_deref() == Some(ns.as_str()),
        },
        None => matches!(caller, Caller::NotAPod) && s.spec.gateway.allowed_source_ranges.iter().any(|r| cidr_contains(r, ip)),
    };
    let mut ok: Vec<Arc<LockSource>> = candidates.into_iter().filter(|s| allowed(s) && servable(s)).collect();
    // A LockSource of the caller's own namespace comes first: another namespace's LockSource that
    // lists the caller's namespace can neither capture its lock traffic nor make it conflict.
    if let Some(ns) = &pod_ns
        && ok.iter().any(|s| s.namespace().as_deref() == Some(ns.as_str()))
    {
        ok.retain(|s| s.namespace().as_deref() == Some(ns.as_str()));
    }
    match ok.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            let who = match (caller, &pod_ns) {
                (_, Some(ns)) => format!("pods in namespace {ns}"),
                (Caller::Unidentified { pods: 0 }, None) => format!("caller {ip} (no pod in the namespaces the LockSources name)"),
                (Caller::Unidentified { pods }, None) => {
                    format!("caller {ip} (an address {pods} pods share or a host-network pod's, so no pod in particular)")
                }
                _ => format!("caller {ip} (not a known pod)"),
            };
            let where_ = region.map(|r| format!(" in region {r}")).unwrap_or_default();
            Err(DynamoErrorBody::access_denied(format!("{who} may not use table {table}{where_} through the statelock gateway")))
        }
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|s| {
                    let region = s.spec.dynamodb.as_ref().map(|d| d.region.as_str()).unwrap_or_default();
                    format!("{}/{} ({region})", s.namespace().unwrap_or_default(), s.name_any())
                })
                .collect();
            Err(DynamoErrorBody::validation(format!(
                "the statelock gateway refuses to guess: LockSources {} all serve table {table}{} to this caller; sign the request for one region or narrow the LockSources' gateway.allowedNamespaces",
                names.join(", "),
                region.map(|r| format!(" in region {r}")).unwrap_or_default()
            )))
        }
    }
}

async fn handle(State(gw): State<Arc<Gateway>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap, body: Body) -> Response {
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let op = target.trim_start_matches("DynamoDB_20120810.");
    let operation = match op {
        "PutItem" => Operation::PutItem,
        "GetItem" => Operation::GetItem,
        "DeleteItem" => Operation::DeleteItem,
        "Scan" => Operation::Scan,
        "DescribeTable" => Operation::DescribeTable,
        _ => Operation::unknown,
    };
    let span = info_span!("gateway", %op, peer = %peer.ip(), lock_id = tracing::field::Empty);
    async move {
        let started = Instant::now();
        let result = match tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, protocol::MAX_BODY_BYTES).collect()).await {
            Ok(Ok(body)) => process(&gw, &target, signed_region(&headers).as_deref(), &body.to_bytes(), peer.ip()).await,
            Ok(Err(e)) if e.is::<LengthLimitError>() => Err(DynamoErrorBody::too_large()),
            Ok(Err(e)) => Err(DynamoErrorBody::serialization(format!("failed to read the request body: {e}"))),
            Err(_) => {
                Err(DynamoErrorBody::validation(format!("the request body was not received within {} s", BODY_READ_TIMEOUT.as_secs())))
            }
        };
        let elapsed = started.elapsed();
        tracing::debug!(elapsed_us = elapsed.as_micros() as u64, ok = result.is_ok(), "gateway request");
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.code().to_owned(),
        };
        gw.metrics.gateway.requests.get_or_create(&RequestLabels { operation, result: outcome }).inc();
        gw.metrics.gateway.request_duration.get_or_create(&OperationLabels { operation }).observe(elapsed.as_secs_f64());
        respond(result)
    }
    .instrument(span)
    .await
}

async fn process(gw: &Arc<Gateway>, target: &str, region: Option<&str>, body: &[u8], ip: IpAddr) -> Result<Value, DynamoErrorBody> {
    let req = protocol::parse(target, body)?;
    if let Some(id) = req.lock_id() {
        tracing::Span::current().record("lock_id", id);
    }
    let caller = gw.caches.confirmed_caller(&gw.client, ip).await;
    // LockSources the operator refuses (tenancy) serve nobody, so they cannot take part in routing.
    let servable = |s: &LockSource| matches!(gw.backend, Backend::Memory(_)) || gw.tenancy.check(s).is_ok();
    let source = match choose_source(&gw.caches.sources, req.table(), region, &caller, ip, servable) {
        Ok(s) => s,
        Err(e) => {
            if e.code() != "ResourceNotFoundException" {
                deny_event(gw, req.table(), caller.pod().map(|p| &**p), &e.message).await;
            }
            return Err(e);
        }
    };
    let pod = holder_candidate(gw, &req, caller.pod().cloned());
    let sent = std::time::Instant::now();
    let outcome = execute(gw, &source, &req).await;
    note_effects(gw, &source, &req, pod, &outcome, sent);
    outcome.map(|(v, _)| v)
}

/// The caller's pod as the holder of a lock it takes, only when the pod's hostname (as the
/// kubelet gives it) is the host in the lock's `Who`: otherwise the call is forwarded all the same,
/// but the pod is not recorded as the holder, and an event says why.
fn holder_candidate(gw: &Arc<Gateway>, req: &Request, pod: Option<Arc<Pod>>) -> Option<Arc<Pod>> {
    let pod = pod?;
    let Request::PutItem { item, .. } = req else { return Some(pod) };
    let Some(info) = protocol::info_of(item) else { return Some(pod) };
    let who: Option<String> =
        serde_json::from_str::<Value>(info).ok().and_then(|v| v.get("Who").and_then(Value::as_str).map(str::to_owned));
    let host = who.as_deref().and_then(|w| split_who(w).1);
    let facts = pod_facts(&pod);
    if host.is_some_and(|h| facts.host.yields(h)) {
        return Some(pod);
    }
    let message = format!(
        "pod {}/{} took a lock whose Who ({}) names another host than the pod's hostname ({}); it is not recorded as the holder",
        facts.namespace(),
        facts.name(),
        crate::lock_record::truncate(who.as_deref().unwrap_or("none"), 256),
        facts.host.short_hostname().unwrap_or("the node's, host network")
    );
    warn!(%message, "gateway holder mismatch");
    let (recorder, pod_ref) = (gw.recorder.clone(), pod.object_ref(&()));
    tokio::spawn(async move {
        let event = Event {
            type_: EventType::Warning,
            reason: reasons::GATEWAY_HOLDER_MISMATCH.into(),
            note: Some(message),
            action: "Gateway".into(),
            secondary: None,
        };
        let _ = recorder.publish(&event, &pod_ref).await;
    });
    None
}

/// Record what the call means for the StateLock; [`Effects`] applies it off the request path.
fn note_effects(
    gw: &Gateway,
    source: &Arc<LockSource>,
    req: &Request,
    pod: Option<Arc<Pod>>,
    outcome: &Result<(Value, Option<Item>), DynamoErrorBody>,
    sent: std::time::Instant,
) {
    match req {
        Request::PutItem { condition: Some(Condition::NotExists(a)), item, .. } if a == "LockID" && protocol::info_of(item).is_some() => {
            let contended = outcome.as_ref().err().is_some_and(|e| e.code() == "ConditionalCheckFailedException");
            if outcome.is_err() && !contended {
                return;
            }
            let TableItem::Lock(record) = parse_item(&convert::item_to_sdk(item)) else { return };
            let result = if contended { AttemptResult::contended } else { AttemptResult::granted };
            gw.metrics.gateway.lock_attempts.get_or_create(&AttemptLabels { result }).inc();
            if contended {
                gw.effects.contended(source, &record, pod);
            } else {
                gw.caches.nudge(source, &record.lock_id, sent);
                gw.effects.granted(source, *record, pod);
            }
        }
        Request::DeleteItem { condition, .. } if outcome.is_ok() => {
            if let Some(id) = req.lock_id() {
                gw.caches.nudge(source, id, sent);
            }
            // A conditional delete is statelock's own exact release (expiry, manual unlock),
            // which the expiry controller announces: no "released through the gateway" for it.
            if condition.is_none()
                && let Some(id) = req.lock_id().filter(|id| !id.ends_with("-md5"))
            {
                gw.effects.released(source, id);
            }
        }
        _ => {}
    }
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
        Request::Scan { table } => m.scan(table).map(|items| (protocol::scan_body(&items), None)),
        Request::DescribeTable { table } => m.scan(table).map(|items| (protocol::describe_body(table, items.len()), None)),
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

/// DynamoDB's answer as the caller should see it: its status code, error type and message
/// unchanged (throttling stays a 400 `ProvisionedThroughputExceededException`, a 5xx stays a 5xx).
fn sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static>(e: SdkError<E, HttpResponse>) -> DynamoErrorBody
where
    SdkError<E, HttpResponse>: std::error::Error,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    match e.as_service_error() {
        Some(svc) => {
            let code = svc.code().unwrap_or("InternalServerError").to_owned();
            let status = status.filter(|s| (400..600).contains(s)).unwrap_or(if code.contains("InternalServerError") { 500 } else { 400 });
            DynamoErrorBody {
                status,
                type_: format!("com.amazonaws.dynamodb.v20120810#{code}"),
                message: svc.message().unwrap_or_default().to_owned(),
            }
        }
        None => match status {
            // An answer the SDK could not parse as an error (e.g. a proxy's 503 page): keep its status.
            Some(s) if (500..600).contains(&s) => DynamoErrorBody {
                status: s,
                type_: "com.amazonaws.dynamodb.v20120810#ServiceUnavailable".into(),
                message: format!("DynamoDB answered {s}"),
            },
            _ => DynamoErrorBody::internal(format!(
                "the statelock gateway could not reach DynamoDB: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(&e)
            )),
        },
    }
}

async fn client_for(gw: &Gateway, source: &LockSource) -> Result<aws_sdk_dynamodb::Client, DynamoErrorBody> {
    // The LockSource's shared clients: the one-attempt client of the same SDK configuration.
    let sdk = gw
        .caches
        .aws()
        .get(&gw.client, &gw.tenancy, source)
        .await
        .map_err(|e| DynamoErrorBody::access_denied(format!("the statelock gateway does not serve this table: {e}")))?;
    Ok(sdk.passthrough.clone())
}

async fn forward(gw: &Gateway, source: &LockSource, req: &Request) -> Result<(Value, Option<Item>), DynamoErrorBody> {
    let db = client_for(gw, source).await?;
    // The caller's table name is the LockSource's; forward to it (never to another table).
    // Only LockSources with a table are ever chosen (see `choose_source`).
    let table = source.spec.dynamodb.as_ref().map(|d| d.table_name.as_str()).unwrap_or_default();
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
        Request::Scan { .. } | Request::DescribeTable { .. } => Err(DynamoErrorBody::unknown_operation(&format!(
            "{} (the gateway forwards only PutItem, GetItem and DeleteItem to DynamoDB)",
            req.operation()
        ))),
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

async fn deny_event(gw: &Gateway, table: &str, pod: Option<&Pod>, message: &str) {
    warn!(%table, %message, "gateway access denied");
    let event = Event {
        type_: EventType::Warning,
        reason: reasons::GATEWAY_ACCESS_DENIED.into(),
        note: Some(message.to_owned()),
        action: "Gateway".into(),
        secondary: None,
    };
    for s in gw.caches.sources.state().iter().filter(|s| s.spec.dynamodb.as_ref().is_some_and(|d| d.table_name == table)) {
        let _ = gw.recorder.publish(&event, &s.object_ref(&())).await;
    }
    if let Some(p) = pod {
        let _ = gw.recorder.publish(&event, &p.object_ref(&())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(list: &[(&str, &str, &str, serde_json::Value)]) -> Store<LockSource> {
        let (reader, mut writer) = kube::runtime::reflector::store::<LockSource>();
        for (ns, name, region, gateway) in list {
            let spec = serde_json::json!({"dynamodb": {"tableName": "tf-locks", "region": region}, "gateway": gateway});
            let mut s = LockSource::new(name, serde_json::from_value(spec).expect("spec"));
            s.metadata.namespace = Some((*ns).into());
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(s));
        }
        reader
    }

    fn pod_caller(ns: &str) -> Caller {
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "runner", "namespace": ns}})).expect("pod");
        Caller::Pod(Arc::new(pod))
    }

    fn routed(store: &Store<LockSource>, region: Option<&str>, caller: &Caller) -> Result<String, String> {
        let ip: IpAddr = "10.0.0.7".parse().expect("ip");
        choose_source(store, "tf-locks", region, caller, ip, |_| true)
            .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
            .map_err(|e| format!("{}: {}", e.code(), e.message))
    }

    #[test]
    fn routing_by_table_region_and_namespace_never_guesses() {
        use serde_json::json;
        let store = sources(&[
            ("team-a", "locks", "us-east-1", json!({})),
            ("team-b", "locks-eu", "eu-west-1", json!({"allowedNamespaces": ["team-a"]})),
            ("team-x", "grabber", "us-east-1", json!({"allowedNamespaces": ["team-a", "team-c"]})),
            ("team-y", "other", "us-east-1", json!({"allowedNamespaces": ["team-c"]})),
            ("infra", "ci", "us-east-1", json!({"allowedSourceRanges": ["10.0.0.0/8"]})),
        ]);
        // The caller's own namespace's LockSource wins over another namespace's that lists it.
        assert_eq!(routed(&store, Some("us-east-1"), &pod_caller("team-a")), Ok("team-a/locks".into()));
        // The signed region routes to the table in that region.
        assert_eq!(routed(&store, Some("eu-west-1"), &pod_caller("team-a")), Ok("team-b/locks-eu".into()));
        // Unsigned: two regions could serve it; own namespace first still decides.
        assert_eq!(routed(&store, None, &pod_caller("team-a")), Ok("team-a/locks".into()));
        // Two other namespaces' LockSources could serve team-c: refused, both named.
        let conflict = routed(&store, Some("us-east-1"), &pod_caller("team-c")).expect_err("conflict");
        assert!(
            conflict.starts_with("ValidationException") && conflict.contains("team-x/grabber") && conflict.contains("team-y/other"),
            "{conflict}"
        );
        // Source ranges admit non-pods only; a pod is never admitted by a range.
        assert_eq!(routed(&store, Some("us-east-1"), &Caller::NotAPod), Ok("infra/ci".into()));
        assert!(
            routed(&store, Some("us-east-1"), &Caller::Unidentified { pods: 2 }).is_err_and(|e| e.starts_with("AccessDeniedException"))
        );
        assert!(routed(&store, Some("us-east-1"), &pod_caller("team-z")).is_err_and(|e| e.starts_with("AccessDeniedException")));
        // An unknown table is DynamoDB's ResourceNotFound.
        let ip: IpAddr = "10.0.0.7".parse().expect("ip");
        assert_eq!(
            choose_source(&store, "nope", None, &Caller::NotAPod, ip, |_| true).expect_err("none").code(),
            "ResourceNotFoundException"
        );
        // A LockSource the operator refuses takes no part in routing.
        let only_own_refused = choose_source(&store, "tf-locks", Some("us-east-1"), &pod_caller("team-a"), ip, |s| s.name_any() != "locks");
        assert_eq!(only_own_refused.map(|s| s.name_any()).ok().as_deref(), Some("grabber"));
    }

    #[test]
    fn the_signed_region_is_read_from_sigv4() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static(
                "AWS4-HMAC-SHA256 Credential=AKIAFAKE/20261126/eu-west-1/dynamodb/aws4_request, SignedHeaders=host, Signature=abc",
            ),
        );
        assert_eq!(signed_region(&h).as_deref(), Some("eu-west-1"));
        h.insert("authorization", HeaderValue::from_static("garbage"));
        assert_eq!(signed_region(&h), None);
        assert_eq!(signed_region(&HeaderMap::new()), None);
    }

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
