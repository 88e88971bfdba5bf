//! The expiry controller: for each StateLock, resolve the holder, judge it
//! ([`holder_liveness::judge`]), record the verdict in status, and release the lock only on
//! evidence of death held for the grace period, through [`release_exact`].
//!
//! Reconciles are event-driven: pod changes map to the StateLocks whose holder they may be (by
//! hostname or recorded pod), and a pending decision is requeued for the moment its grace period
//! ends. Status is written with server-side apply as `statelock-controller`, only when it changed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::holder_liveness::{
    self, ContainerFacts, Established, Facts, HOLDER_CONTAINER_ANNOTATION, HolderLookup, HolderNamespaces, HolderPolicy, HostnameSpec,
    LockFacts, PodFacts, PodRef, PodView, Reason, Verdict,
};
use super::manual_unlock::{self, FORCE_UNLOCK_ANNOTATION, FORCE_UNLOCK_LIVE_ANNOTATION, UnlockDecision};
use crate::{
    admin::Readiness,
    crd::{
        DeathEvidence, EstablishedHolder, ExpiryMode, HolderIdentification, HolderState, HolderStatus, LockPhase, LockSource,
        ReleaseStatus, StateLock, StateLockStatus,
    },
    dynamo::{
        self,
        lock_item::{LockRecord, TableItem, parse_created, parse_item, split_who},
        release::{ReleaseOutcome, delete_if_info},
        source_credentials::SourceAccessError,
    },
    leader::Leadership,
    metrics::{ControllerLabels, ControllerName, ErrorLabels, ExpirationLabels, Metrics},
    reasons,
    tenancy::TenancyPolicy,
};

/// What the controller is given.
#[derive(Clone)]
pub struct Deps {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every replica judges nothing and writes nothing unless it leads.
    pub leader: Leadership,
    /// Which LockSources may be served, and with whose identity.
    pub tenancy: Arc<TenancyPolicy>,
}

/// Everything reconciles share.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub leader: Leadership,
    pub pods: Store<Pod>,
    pub sources: Store<LockSource>,
    pub pods_synced: AtomicBool,
    pub tenancy: Arc<TenancyPolicy>,
    /// One SDK client per LockSource, rebuilt when its spec (resource version) or credentials change.
    clients: std::sync::Mutex<std::collections::HashMap<(String, String), (String, aws_sdk_dynamodb::Client)>>,
}

impl Context {
    /// The LockSource's DynamoDB client (after the tenancy check, in [`dynamo::source_credentials`]).
    async fn dynamodb(&self, source: &LockSource) -> Result<aws_sdk_dynamodb::Client, ExpiryError> {
        let creds = dynamo::source_credentials::for_source(&self.client, &self.tenancy, source).await?;
        let key = (source.namespace().unwrap_or_default(), source.name_any());
        let fingerprint = format!(
            "{}/{}",
            source.resource_version().unwrap_or_default(),
            creds.as_ref().map(|c| format!("{}:{}", c.access_key_id, c.secret_access_key.len())).unwrap_or_default()
        );
        if let Some((f, c)) = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key)
            && *f == fingerprint
        {
            return Ok(c.clone());
        }
        let d = &source.spec.dynamodb;
        let client = dynamo::dynamodb_client(&d.region, d.endpoint.as_deref(), creds).await;
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, (fingerprint, client.clone()));
        Ok(client)
    }

    fn ensure_leader(&self) -> Result<(), ExpiryError> {
        if self.leader.is_leader() { Ok(()) } else { Err(ExpiryError::NotLeader) }
    }
}

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ExpiryError {
    #[error("failed to write the status of StateLock {name}: {error}")]
    WriteStatus { name: String, error: kube::Error },
    #[error(transparent)]
    Dynamo(#[from] dynamo::DynamoError),
    #[error(transparent)]
    Credentials(#[from] SourceAccessError),
    #[error("this replica stopped leading; nothing written")]
    NotLeader,
}

impl ExpiryError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::WriteStatus { .. } => "kubernetes_api",
            Self::Dynamo(e) => e.category(),
            Self::Credentials(e) => e.reason(),
            Self::NotLeader => "not_leader",
        }
    }
}

/// The facts about a pod the judge needs.
pub fn pod_facts(p: &Pod) -> PodFacts {
    let status = p.status.as_ref();
    let spec = p.spec.as_ref();
    let ts = |t: &Time| t.0.as_nanosecond();
    PodFacts {
        host: HostnameSpec {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            hostname: spec.and_then(|s| s.hostname.clone()).filter(|h| !h.is_empty()),
            subdomain: spec.and_then(|s| s.subdomain.clone()).filter(|h| !h.is_empty()),
            set_hostname_as_fqdn: spec.and_then(|s| s.set_hostname_as_fqdn).unwrap_or(false),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        },
        uid: p.uid().unwrap_or_default(),
        created: p.metadata.creation_timestamp.as_ref().map_or(0, ts),
        phase: status.and_then(|s| s.phase.clone()),
        terminating: p.metadata.deletion_timestamp.is_some(),
        containers: status
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| ContainerFacts {
                running_since: c.state.and_then(|s| s.running).and_then(|r| r.started_at).map(|t| ts(&t)),
                restart_count: c.restart_count,
                name: c.name,
            })
            .collect(),
        holder_container: p.annotations().get(HOLDER_CONTAINER_ANNOTATION).cloned(),
    }
}

fn hostname_of(lock: &StateLock) -> Option<String> {
    lock.spec.lock_info.who.as_deref().and_then(|w| split_who(w).1).map(str::to_owned)
}

/// The lock as the StateLock spec shows it: a hint (users may edit the spec; the mirror restores it).
fn hint_facts(lock: &StateLock) -> LockFacts {
    let i = &lock.spec.lock_info;
    let created = i.created.as_deref().and_then(parse_created);
    let malformed = if lock.spec.raw_info.is_some() || lock.spec.info_sha256.is_none() {
        Some("its Info could not be parsed".to_owned())
    } else if i.id.as_deref().is_none_or(str::is_empty) || created.is_none() || i.who.is_none() {
        Some("its Info lacks ID, Who or Created".to_owned())
    } else {
        None
    };
    LockFacts { created, hostname: hostname_of(lock), info_sha256: lock.spec.info_sha256.clone(), malformed }
}

/// The lock as the strongly consistent read returned it: the authority.
fn authoritative_facts(record: &LockRecord) -> LockFacts {
    LockFacts {
        created: record.info.created.as_deref().and_then(parse_created),
        hostname: record.info.who.as_deref().and_then(|w| split_who(w).1).map(str::to_owned),
        info_sha256: record.info_sha256.clone(),
        malformed: (!record.is_valid()).then(|| record.problems.join("; ")),
    }
}

/// The established holder recorded in status for this lock instance, or else the pod the gateway
/// saw take it. The judge checks them against the lock instance again (an edited spec or a
/// re-taken lock makes them irrelevant).
fn recorded_holder(
    status: &StateLockStatus,
    source: &str,
    lock_id: Option<&str>,
    info_sha256: Option<&str>,
    host: Option<&str>,
) -> Option<Established> {
    let sha = info_sha256?;
    // The gateway's record first: it saw the pod take the lock. It names the exact instance (the
    // SHA-256 of the Info it forwarded, which covers Who), so it holds for the host of whichever
    // facts carry that instance; and it counts only for the table it was granted in (a pod may not
    // claim, through another table, a lock of the same ID and Info).
    if let Some(g) = status
        .gateway_holder
        .as_ref()
        .filter(|g| lock_id == Some(g.lock_id.as_str()) && g.info_sha256.as_deref() == Some(sha) && g.source.as_deref() == Some(source))
        && let Some(host) = host
    {
        return Some(Established {
            namespace: g.namespace.clone(),
            name: g.pod.clone(),
            uid: g.uid.clone(),
            by: HolderIdentification::Gateway,
            hostname: host.to_owned(),
            info_sha256: sha.to_owned(),
            restarts: None,
        });
    }
    let e = status.holder.as_ref().and_then(|h| h.established.as_ref()).filter(|e| e.info_sha256 == sha)?;
    Some(Established {
        namespace: e.namespace.clone(),
        name: e.pod.clone(),
        uid: e.uid.clone(),
        by: e.by,
        hostname: e.hostname.clone(),
        info_sha256: e.info_sha256.clone(),
        restarts: e.restarts,
    })
}

fn policy(source: &LockSource) -> HolderPolicy {
    HolderPolicy {
        namespaces: source.spec.holders.resolved_namespaces(&source.namespace().unwrap_or_default()),
        // A pattern that does not compile refuses the LockSource (tenancy check) before this.
        hostname_pattern: source.spec.holders.compiled_pattern().and_then(Result::ok),
        skew_tolerance_ns: i128::try_from(source.spec.expiry.skew_tolerance.get().as_nanos()).unwrap_or(i128::MAX),
    }
}

/// Run the controller until `shutdown`.
pub async fn run(deps: Deps, readiness: Readiness, shutdown: CancellationToken) {
    let Deps { client, recorder, metrics, leader, tenancy } = deps;
    readiness.add_gate("pods", "syncing the pod cache");
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (sources, source_writer) = reflector::store::<LockSource>();
    // One pod watch feeds both the cache the judge reads and the reconcile triggers: the
    // reflector stores each event before passing it on, so a reconcile triggered by a pod event
    // always sees that event in the cache. (Two separate watches would race: a reconcile could
    // see the pod still alive in a cache that has not caught up, and nothing would re-trigger.)
    let pod_events = reflector::reflector(pod_writer, watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let source_stream = reflector::reflector(source_writer, watcher(Api::<LockSource>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        metrics,
        leader: leader.clone(),
        pods: pods.clone(),
        sources,
        pods_synced: AtomicBool::new(false),
        tenancy,
        clients: std::sync::Mutex::default(),
    });
    // Gaining leadership re-judges every lock (followers skip their reconciles).
    let gained = futures::stream::unfold(leader.changes(), |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            if *rx.borrow_and_update() {
                return Some(((), rx));
            }
        }
    });
    {
        let ctx = ctx.clone();
        let pods = pods.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            if pods.wait_until_ready().await.is_ok() {
                ctx.pods_synced.store(true, Ordering::SeqCst);
                readiness.open("pods");
            }
        });
    }
    tokio::spawn(source_stream.for_each(|_| async {}));
    let locks = Api::<StateLock>::all(client);
    let controller = Controller::new(locks, watcher::Config::default());
    let lock_store = controller.store();
    controller
        .watches_stream(pod_events, move |pod: Pod| {
            // A pod event concerns the StateLocks whose holder it may be.
            let facts = pod_facts(&pod);
            let names_it = |ns: &str, name: &str| ns == facts.namespace() && name == facts.name();
            lock_store
                .state()
                .into_iter()
                .filter(|l| {
                    hostname_of(l).is_some_and(|h| facts.host.yields(&h))
                        || l.status.as_ref().is_some_and(|s| {
                            s.holder.as_ref().is_some_and(|h| {
                                h.pod.as_deref().zip(h.namespace.as_deref()).is_some_and(|(p, n)| names_it(n, p))
                                    || h.established.as_ref().is_some_and(|e| names_it(&e.namespace, &e.pod))
                            }) || s.gateway_holder.as_ref().is_some_and(|g| names_it(&g.namespace, &g.pod))
                        })
                })
                .map(|l| ObjectRef::from_obj(&*l))
                .collect::<Vec<_>>()
        })
        .reconcile_all_on(gained)
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "expiry reconcile failed");
            }
        })
        .await;
}

fn error_policy(_: Arc<StateLock>, e: &ExpiryError, _: Arc<Context>) -> Action {
    warn!(error = %e, category = e.category(), "will retry");
    Action::requeue(Duration::from_secs(5))
}

/// What the authorities say right now: the lock item from a strongly consistent read, and the
/// pods read directly from the API (never from the cache).
#[allow(clippy::large_enum_variant)] // one per release decision
enum Authority {
    /// There is no lock item any more.
    LockGone,
    Present {
        record: Box<LockRecord>,
        /// The exact Info, which the conditional delete is conditioned on.
        raw_info: String,
        verdict: Verdict,
    },
}

async fn read_authorities(ctx: &Context, source: &LockSource, lock: &StateLock, policy: &HolderPolicy) -> Result<Authority, ExpiryError> {
    let db = ctx.dynamodb(source).await?;
    let table = &source.spec.dynamodb.table_name;
    let (item, _) = dynamo::get_item(&db, table, &lock.spec.lock_id).await?;
    let Some(item) = item else { return Ok(Authority::LockGone) };
    let record = match parse_item(&item) {
        TableItem::Lock(r) => r,
        TableItem::Digest { .. } | TableItem::Unusable { .. } => {
            return Ok(Authority::Present {
                record: Box::default(),
                raw_info: String::new(),
                verdict: unknown(Reason::LockMalformed, "the item under this LockID is not a lock record; nothing is released"),
            });
        }
    };
    let facts = authoritative_facts(&record);
    let raw_info = record.raw_info.clone().unwrap_or_default();
    let status = lock.status.clone().unwrap_or_default();
    let recorded =
        recorded_holder(&status, &source.name_any(), record.info.id.as_deref(), facts.info_sha256.as_deref(), facts.hostname.as_deref());
    let lookup = match &recorded {
        Some(e) => Some(match Api::<Pod>::namespaced(ctx.client.clone(), &e.namespace).get_opt(&e.name).await {
            Ok(Some(p)) => HolderLookup::Found(Box::new(pod_facts(&p))),
            Ok(None) => HolderLookup::NotFound,
            Err(_) => HolderLookup::Failed,
        }),
        None => None,
    };
    let listed = list_holder_pods(ctx, &policy.namespaces).await;
    let view = match &listed {
        Ok(p) => PodView::Listed(p),
        Err(_) => PodView::ListFailed,
    };
    let mut verdict =
        holder_liveness::judge(&Facts { lock: &facts, established: recorded.as_ref(), holder_lookup: lookup.as_ref(), pods: view, policy });
    // A runner is gone only if no pod anywhere has its hostname: the holder namespaces may be
    // narrower than where runners run (an upgrade from "every namespace", a misconfiguration).
    if verdict.reason == Reason::RunnerGone && policy.namespaces != HolderNamespaces::All {
        let everywhere = list_holder_pods(ctx, &HolderNamespaces::All).await;
        let view = match &everywhere {
            Ok(p) => PodView::Listed(p),
            Err(_) => PodView::ListFailed,
        };
        verdict = holder_liveness::judge(&Facts {
            lock: &facts,
            established: recorded.as_ref(),
            holder_lookup: lookup.as_ref(),
            pods: view,
            policy,
        });
    }
    Ok(Authority::Present { record, raw_info, verdict })
}

/// Every pod of the holder namespaces, read directly (paginated), so that a pod yielding the
/// hostname is found under any name.
async fn list_holder_pods(ctx: &Context, namespaces: &HolderNamespaces) -> Result<Vec<PodFacts>, kube::Error> {
    let apis: Vec<Api<Pod>> = match namespaces {
        HolderNamespaces::All => vec![Api::all(ctx.client.clone())],
        HolderNamespaces::Only(list) => list.iter().map(|ns| Api::namespaced(ctx.client.clone(), ns)).collect(),
    };
    let mut out = Vec::new();
    for api in apis {
        let mut params = ListParams::default().limit(500);
        loop {
            let page = api.list(&params).await?;
            out.extend(page.items.iter().map(pod_facts));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(out)
}

fn unknown(reason: Reason, message: impl Into<String>) -> Verdict {
    Verdict { state: HolderState::Unknown, reason, message: message.into(), pod: None, established: None, candidates: vec![] }
}

async fn reconcile(lock: Arc<StateLock>, ctx: Arc<Context>) -> Result<Action, ExpiryError> {
    if !ctx.leader.is_leader() {
        // The new leader re-judges everything when it takes over.
        return Ok(Action::await_change());
    }
    let started = std::time::Instant::now();
    let result = judge_and_act(lock, &ctx).await;
    let controller = ControllerLabels { controller: ControllerName::expiry };
    ctx.metrics.controllers.reconcile_duration.get_or_create(&controller).observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        let labels = ErrorLabels { controller: ControllerName::expiry, category: e.category().to_owned() };
        ctx.metrics.controllers.reconcile_errors.get_or_create(&labels).inc();
    }
    result
}

/// Why a release did not happen (written to `status.release`, published once per reason).
struct Blocked {
    reason: std::borrow::Cow<'static, str>,
    message: String,
    /// Worth an event (a pending grace period is not).
    event: bool,
}

async fn judge_and_act(lock: Arc<StateLock>, ctx: &Arc<Context>) -> Result<Action, ExpiryError> {
    let ctx = ctx.clone();
    let ns = lock.namespace().unwrap_or_default();
    let previous = lock.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let Some(source) = ctx.sources.get(&ObjectRef::new(&lock.spec.source).within(&ns)) else {
        let verdict = unknown(Reason::SourceNotFound, format!("LockSource {} is not known (yet)", lock.spec.source));
        write_status(&ctx, &lock, &previous, &verdict, false, None, LockPhase::Held, None, now).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    if let Err(refusal) = ctx.tenancy.check(&source) {
        let verdict = unknown(Reason::SourceRefused, refusal.to_string());
        let blocked = Blocked { reason: "SourceRefused".into(), message: refusal.to_string(), event: true };
        report_blocked(&ctx, &lock, &previous, Some(&blocked), None).await;
        write_status(&ctx, &lock, &previous, &verdict, false, None, LockPhase::Held, Some(&blocked), now).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let pol = policy(&source);

    // 1. A hint from the caches and the spec: may trigger a judgement, never decides one.
    let hint = hint_facts(&lock);
    let recorded = recorded_holder(
        &previous,
        &source.name_any(),
        lock.spec.lock_info.id.as_deref(),
        hint.info_sha256.as_deref(),
        hint.hostname.as_deref(),
    );
    let synced = ctx.pods_synced.load(Ordering::SeqCst);
    let pods: Vec<PodFacts> = if synced { ctx.pods.state().iter().map(|p| pod_facts(p)).collect() } else { Vec::new() };
    let lookup = recorded.as_ref().map(|e| {
        ctx.pods
            .get(&ObjectRef::new(&e.name).within(&e.namespace))
            .map_or(HolderLookup::NotFound, |p| HolderLookup::Found(Box::new(pod_facts(&p))))
    });
    let view = if synced { PodView::Cache(&pods) } else { PodView::CacheNotSynced };
    let mut verdict = holder_liveness::judge(&Facts {
        lock: &hint,
        established: recorded.as_ref(),
        holder_lookup: lookup.as_ref(),
        pods: view,
        policy: &pol,
    });

    // 2. The authorities, when a release may follow (a dead holder, or a manual unlock request).
    let unlock_request = lock.annotations().get(FORCE_UNLOCK_ANNOTATION).cloned();
    let mut authority = None;
    let mut blocked: Option<Blocked> = None;
    // A holder is recorded only from the authorities: a new one found in the caches is confirmed
    // first (once per lock instance), so that a lagging cache or an edited spec never records a
    // pod whose later death would count.
    let new_holder = verdict.established.is_some() && recorded.is_none();
    let mut from_authority = false;
    if verdict.is_dead() || unlock_request.is_some() || new_holder {
        let hint_verdict = verdict.clone();
        match read_authorities(&ctx, &source, &lock, &pol).await {
            Ok(Authority::LockGone) => {
                // Released by its holder (or someone) meanwhile: the mirror removes the StateLock.
                if unlock_request.is_some() {
                    consume_unlock_request(&ctx, &lock).await?;
                }
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            Ok(Authority::Present { record, raw_info, verdict: v }) => {
                verdict = v;
                from_authority = true;
                authority = Some((record, raw_info));
            }
            Err(e) => {
                warn!(error = %e, lock = %lock.spec.lock_id, "could not read the authorities; nothing is decided");
                verdict = unknown(Reason::ApiError, format!("the authorities could not be read ({e}); nothing is decided"));
            }
        }
        if hint_verdict.is_dead() && !verdict.is_dead() {
            blocked = Some(Blocked {
                reason: "NotConfirmed".into(),
                message: format!("the caches suggested {} but the authorities say: {}", hint_verdict.message, verdict.message),
                event: true,
            });
        }
    }

    // Evidence is held from when it was first seen, for this lock instance; a new kind of evidence,
    // or another instance (the lock re-taken), starts anew.
    let instance = authority.as_ref().and_then(|(r, _)| r.info_sha256.clone()).or_else(|| hint.info_sha256.clone());
    let observed_at = match (verdict.is_dead(), previous.holder.as_ref().and_then(|h| h.evidence.as_ref())) {
        (true, Some(prev)) if prev.reason == verdict.reason.as_str() && prev.info_sha256.is_some() && prev.info_sha256 == instance => {
            Some(prev.observed_at.0)
        }
        (true, _) => Some(now),
        (false, _) => None,
    };
    let mut phase = if verdict.is_dead() { LockPhase::HolderDead } else { LockPhase::Held };
    if verdict.is_dead() && previous.holder.as_ref().is_none_or(|h| h.state != HolderState::Dead) {
        publish(&ctx, &lock, reasons::HOLDER_DIED, &verdict.message, verdict.pod.as_ref()).await;
    }
    // Pod events drive most reconciles; these are safety nets. An undecided verdict is looked at
    // again soon.
    let mut action = match (verdict.state, verdict.reason) {
        (_, Reason::CacheNotSynced) => Action::requeue(Duration::from_secs(1)),
        (HolderState::Unknown, _) => Action::requeue(Duration::from_secs(5)),
        _ => Action::requeue(Duration::from_secs(300)),
    };

    if let Some(requested) = unlock_request {
        let live = lock.annotations().get(FORCE_UNLOCK_LIVE_ANNOTATION).map(String::as_str);
        match &authority {
            None => {
                blocked = Some(Blocked {
                    reason: "UnlockNotDecided".into(),
                    message: format!("force-unlock {requested}: {}", verdict.message),
                    event: false,
                });
                publish(
                    &ctx,
                    &lock,
                    reasons::UNLOCK_REFUSED,
                    &format!("force-unlock {requested} was not carried out: {}", verdict.message),
                    None,
                )
                .await;
            }
            Some((record, raw_info)) => match manual_unlock::decide(&requested, record.info.id.as_deref(), verdict.state, live) {
                UnlockDecision::Release => {
                    let report = ReleaseReport {
                        metric_reason: "ForceUnlock".into(),
                        event_reason: reasons::FORCE_UNLOCKED,
                        note: format!("released lock {requested} on request (holder {:?}: {})", verdict.state, verdict.message),
                        pod: None,
                        skipped_note: "the lock item changed since it was read; nothing was released",
                    };
                    if release_and_report(&ctx, &source, &lock, raw_info, report).await? {
                        phase = LockPhase::Released;
                    }
                }
                UnlockDecision::WrongId { requested, actual } => {
                    publish(
                        &ctx,
                        &lock,
                        reasons::UNLOCK_ID_MISMATCH,
                        &format!(
                            "force-unlock names lock ID {requested} but the lock item's ID is {}; nothing was released",
                            actual.as_deref().unwrap_or("unknown")
                        ),
                        None,
                    )
                    .await;
                }
                UnlockDecision::RefusedLiveHolder => {
                    let message = format!(
                        "the holder is {:?} ({}); only a Dead or External holder is released on request, set {FORCE_UNLOCK_LIVE_ANNOTATION}=\"true\" as well to release it anyway",
                        verdict.state, verdict.message
                    );
                    publish(&ctx, &lock, reasons::UNLOCK_REFUSED, &message, verdict.pod.as_ref()).await;
                    blocked = Some(Blocked { reason: "UnlockRefused".into(), message, event: false });
                }
            },
        }
        consume_unlock_request(&ctx, &lock).await?;
    }

    if let (true, Some(seen), false) = (verdict.is_dead(), observed_at, phase == LockPhase::Released) {
        match release_timing(seen, source.spec.expiry.grace_period.get(), now) {
            ReleaseTiming::Wait(d) => {
                action = Action::requeue(d);
                blocked = Some(Blocked {
                    reason: "GracePeriod".into(),
                    message: format!("evidence must hold for {} before the release", source.spec.expiry.grace_period),
                    event: false,
                });
            }
            ReleaseTiming::Never => {
                blocked = Some(Blocked {
                    reason: "GracePeriodOverflow".into(),
                    message: "the grace period cannot be added to the evidence time; nothing is released".into(),
                    event: true,
                });
            }
            ReleaseTiming::Due if source.spec.expiry.mode == ExpiryMode::Observe => {
                blocked = Some(Blocked {
                    reason: "ObserveMode".into(),
                    message: "the holder is dead; the LockSource's expiry mode is Observe, so statelock only reports".into(),
                    event: false,
                });
            }
            ReleaseTiming::Due => {
                if let Some((record, raw_info)) = &authority {
                    let report = ReleaseReport {
                        metric_reason: verdict.reason.as_str().to_owned(),
                        event_reason: reasons::LOCK_EXPIRED,
                        note: format!(
                            "released lock {} ({}) held by {}: {}",
                            record.info.id.as_deref().unwrap_or("?"),
                            record.lock_id,
                            record.info.who.as_deref().unwrap_or("?"),
                            verdict.message
                        ),
                        pod: verdict.pod.as_ref(),
                        skipped_note: "the lock item changed since it was judged (re-taken or updated); nothing was released",
                    };
                    if release_and_report(&ctx, &source, &lock, raw_info, report).await? {
                        phase = LockPhase::Released;
                    } else {
                        blocked = Some(Blocked {
                            reason: "LockChanged".into(),
                            message: "the lock item changed between the judgement and the delete; nothing was released".into(),
                            event: false,
                        });
                    }
                    action = Action::requeue(Duration::from_secs(5));
                }
            }
        }
    }
    if phase == LockPhase::Released {
        blocked = None;
    } else if blocked.is_none()
        && let Some(prev) = previous.release.as_ref().filter(|r| r.reason.starts_with("Unlock"))
        && previous.holder.as_ref().is_some_and(|h| h.state == verdict.state)
    {
        // A refused unlock request is consumed; its reason stays in status while nothing changed.
        blocked = Some(Blocked { reason: prev.reason.clone().into(), message: prev.message.clone(), event: false });
    }
    report_blocked(&ctx, &lock, &previous, blocked.as_ref(), verdict.pod.as_ref()).await;
    let evidence = observed_at.filter(|_| verdict.is_dead()).map(|at| DeathEvidence {
        reason: verdict.reason.as_str().into(),
        message: verdict.message.clone(),
        observed_at: Time(at),
        info_sha256: instance.clone(),
    });
    write_status(&ctx, &lock, &previous, &verdict, from_authority, evidence, phase, blocked.as_ref(), now).await?;
    Ok(action)
}

/// When a release is due, from when the evidence was first seen (pure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseTiming {
    Due,
    Wait(Duration),
    /// The deadline cannot be computed: fail closed.
    Never,
}

pub fn release_timing(evidence_seen: Timestamp, grace: Duration, now: Timestamp) -> ReleaseTiming {
    let Ok(span) = k8s_openapi::jiff::SignedDuration::try_from(grace) else { return ReleaseTiming::Never };
    let Ok(due) = evidence_seen.checked_add(span) else { return ReleaseTiming::Never };
    if now >= due {
        return ReleaseTiming::Due;
    }
    match u64::try_from(due.as_nanosecond() - now.as_nanosecond()) {
        Ok(ns) => ReleaseTiming::Wait(Duration::from_nanos(ns).max(Duration::from_millis(50))),
        Err(_) => ReleaseTiming::Never,
    }
}

/// Publish a ReleaseBlocked event the first time a reason appears.
async fn report_blocked(ctx: &Context, lock: &StateLock, previous: &StateLockStatus, blocked: Option<&Blocked>, pod: Option<&PodRef>) {
    let Some(b) = blocked.filter(|b| b.event) else { return };
    if previous.release.as_ref().is_some_and(|r| r.reason == b.reason) {
        return;
    }
    info!(lock = %lock.spec.lock_id, reason = %b.reason, "release blocked");
    publish(ctx, lock, reasons::RELEASE_BLOCKED, &format!("{}: {}", b.reason, b.message), pod).await;
}

/// Remove the force-unlock annotations: a request is handled once.
async fn consume_unlock_request(ctx: &Context, lock: &StateLock) -> Result<(), ExpiryError> {
    let api: Api<StateLock> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"annotations": {FORCE_UNLOCK_ANNOTATION: null, FORCE_UNLOCK_LIVE_ANNOTATION: null}}});
    api.patch(&lock.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|error| ExpiryError::WriteStatus { name: lock.name_any(), error })?;
    Ok(())
}

/// How a release is reported, for a force-unlock or an expiry.
struct ReleaseReport<'a> {
    metric_reason: String,
    event_reason: &'static str,
    note: String,
    pod: Option<&'a PodRef>,
    skipped_note: &'static str,
}

/// Release the exact lock instance (the Info read from the authority) and report the outcome;
/// true when the item is gone (released now, or already), false when it had changed and nothing
/// was released.
async fn release_and_report(
    ctx: &Context,
    source: &LockSource,
    lock: &StateLock,
    raw_info: &str,
    report: ReleaseReport<'_>,
) -> Result<bool, ExpiryError> {
    let db = ctx.dynamodb(source).await?;
    // The last moment to notice that another replica may be judging this lock now.
    ctx.ensure_leader()?;
    match delete_if_info(&db, &source.spec.dynamodb.table_name, &lock.spec.lock_id, raw_info).await? {
        ReleaseOutcome::Released => {
            ctx.metrics.locks.expirations.get_or_create(&ExpirationLabels { reason: report.metric_reason }).inc();
            info!(lock = %lock.spec.lock_id, reason = report.event_reason, "lock released");
            publish(ctx, lock, report.event_reason, &report.note, report.pod).await;
            Ok(true)
        }
        ReleaseOutcome::AlreadyGone => Ok(true),
        ReleaseOutcome::HeldByAnother => {
            publish(ctx, lock, reasons::RELEASE_SKIPPED, report.skipped_note, None).await;
            Ok(false)
        }
    }
}

async fn publish(ctx: &Context, lock: &StateLock, reason: &str, note: &str, pod: Option<&PodRef>) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(dynamo::lock_item::truncate(note, 1024).to_owned()),
        action: "Expire".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &lock.object_ref(&())).await {
        warn!(error = %e, reason, "failed to publish event");
    }
    // Also on the holder pod, while it exists.
    if let Some(p) = pod
        && let Some(pod) = ctx.pods.get(&ObjectRef::new(&p.name).within(&p.namespace))
        && let Err(e) = ctx.recorder.publish(&event, &pod.object_ref(&())).await
    {
        warn!(error = %e, reason, "failed to publish event on the holder pod");
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_status(
    ctx: &Context,
    lock: &StateLock,
    previous: &StateLockStatus,
    v: &Verdict,
    from_authority: bool,
    evidence: Option<DeathEvidence>,
    phase: LockPhase,
    blocked: Option<&Blocked>,
    now: Timestamp,
) -> Result<(), ExpiryError> {
    let prev_holder = previous.holder.as_ref();
    let since = match prev_holder {
        Some(h) if h.state == v.state => h.since.clone(),
        _ => Some(Time(now)),
    };
    // The established holder is recorded the first time it is established for a lock instance,
    // and kept (a record for another instance is ignored by the judge, never trusted).
    let prev_established = prev_holder.and_then(|h| h.established.clone());
    let established = match (&v.established, prev_established) {
        // The gateway's record (operator-written, exact) supersedes a holder found by hostname.
        (Some(e), Some(prev)) if prev.info_sha256 == e.info_sha256 && (prev.by == e.by || e.by == HolderIdentification::Hostname) => {
            Some(prev)
        }
        (Some(e), _) if from_authority || e.by == HolderIdentification::Gateway => Some(EstablishedHolder {
            namespace: e.namespace.clone(),
            pod: e.name.clone(),
            uid: e.uid.clone(),
            by: e.by,
            hostname: e.hostname.clone(),
            info_sha256: e.info_sha256.clone(),
            restarts: e.restarts,
            at: Time(now),
        }),
        (_, prev) => prev,
    };
    let holder = HolderStatus {
        state: v.state,
        reason: v.reason.as_str().into(),
        message: Some(v.message.clone()),
        hostname: hostname_of(lock),
        identified_by: v.pod.as_ref().and(v.identified_by()),
        namespace: v.pod.as_ref().map(|p| p.namespace.clone()),
        pod: v.pod.as_ref().map(|p| p.name.clone()),
        uid: v.pod.as_ref().and_then(|p| p.uid.clone()),
        candidates: v.candidates.clone(),
        evidence,
        established,
        since,
    };
    let release = blocked.map(|b| ReleaseStatus {
        reason: b.reason.to_string(),
        message: b.message.clone(),
        since: previous.release.as_ref().filter(|r| r.reason == b.reason).map_or(Time(now), |r| r.since.clone()),
    });
    if previous.holder.as_ref() == Some(&holder)
        && previous.phase == Some(phase)
        && previous.release == release
        && previous.observed_generation == lock.metadata.generation
    {
        return Ok(());
    }
    let body = json!({
        "apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock", "metadata": {"name": lock.name_any()},
        "status": {"observedGeneration": lock.metadata.generation, "phase": phase, "holder": holder, "release": release},
    });
    let api: Api<StateLock> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
    ctx.ensure_leader()?;
    api.patch_status(&lock.name_any(), &PatchParams::apply(reasons::CONTROLLER_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(|error| ExpiryError::WriteStatus { name: lock.name_any(), error })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_timing_is_due_after_the_grace_period_and_fails_closed_on_overflow() {
        let t0: Timestamp = "2026-11-30T00:00:00Z".parse().expect("time");
        let at = |secs: i64| t0.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs)).expect("time");
        let s = Duration::from_secs;
        let cases = [
            ("no grace", s(0), at(0), ReleaseTiming::Due),
            ("grace over", s(15), at(15), ReleaseTiming::Due),
            ("grace running", s(15), at(5), ReleaseTiming::Wait(s(10))),
            (
                "a moment left waits at least 50 ms",
                s(15),
                at(15) - k8s_openapi::jiff::SignedDuration::from_millis(1),
                ReleaseTiming::Wait(Duration::from_millis(50)),
            ),
            ("evidence seen on a clock ahead of ours: wait, never release early", s(0), at(-30), ReleaseTiming::Wait(s(30))),
            ("a grace that overflows a timestamp", Duration::MAX, at(0), ReleaseTiming::Never),
            ("a grace of centuries waits", s(400 * 365 * 24 * 3600), at(0), ReleaseTiming::Wait(s(400 * 365 * 24 * 3600))),
            ("a grace past the calendar's end", s(9000 * 365 * 24 * 3600), at(0), ReleaseTiming::Never),
        ];
        for (what, grace, now, want) in cases {
            assert_eq!(release_timing(t0, grace, now), want, "{what}");
        }
    }
}
