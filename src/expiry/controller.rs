//! The expiry controller: for each StateLock, resolve the holder, judge it
//! ([`holder_liveness::judge`]), record the verdict in status, and release the lock only on
//! evidence of death held for the grace period ([`super::decision`]), through deletes conditioned
//! on the exact instance read from each store ([`crate::lock_store`]: the Info of a DynamoDB item,
//! the ETag of a lock file).
//!
//! Reconciles are event-driven: pod changes map to the StateLocks whose holder they may be (by
//! hostname or recorded pod), and a pending decision is requeued for the moment its grace period
//! ends. Status is written with server-side apply as `statelock-controller`, only when it changed.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        Controller,
        controller::{self, Action},
        events::{Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::decision::{self, Blocked, ExpiryStep, UnlockRequest, UnlockStep};
use super::holder_liveness::{
    self, Established, Facts, HolderLookup, HolderNamespaces, HolderPolicy, LockFacts, PodFacts, PodRef, PodView, Reason, Verdict,
};
use super::manual_unlock::{
    FORCE_UNLOCK_ANNOTATION, FORCE_UNLOCK_LIVE_ANNOTATION, FORCE_UNLOCK_REQUEST_ANNOTATION, answer_mark, request_token,
};
use crate::{
    admin::Readiness,
    cluster::{
        Cluster, LockTriggers,
        aws::SourceClients,
        pods::{PodCache, pod_facts},
        writer::{LockWriter, Writer},
    },
    crd::{
        DeathEvidence, EstablishedHolder, HolderIdentification, HolderState, HolderStatus, LockPhase, LockSource, ReleaseStatus, StateLock,
        StateLockStatus,
    },
    dynamo::source_credentials::SourceAccessError,
    errors::ErrorCategory,
    leader::Leadership,
    lock_record::{LockRecord, parse_created, split_who},
    lock_store::{Combined, HeldPart, ReleaseOutcome, StoreError, StoreKind, combine, stores_of},
    metrics::{ControllerLabels, ControllerName, ErrorLabels, ExpirationLabels, Metrics, S3RequestLabels},
    reasons,
    tenancy::TenancyPolicy,
};

/// What the controller is given.
pub struct Deps {
    pub client: Client,
    pub recorder: Recorder,
    /// Who the recorder reports as (for answers to manual unlock requests, which are events of
    /// their own rather than a series).
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    /// Every replica judges nothing and writes nothing unless it leads.
    pub leader: Leadership,
    /// Which LockSources may be served, and with whose identity.
    pub tenancy: Arc<TenancyPolicy>,
    /// The shared caches.
    pub cluster: Arc<Cluster>,
    /// The StateLock watch, which this controller drives for everyone.
    pub lock_triggers: LockTriggers,
}

/// Everything reconciles share.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub leader: Leadership,
    pub pods: Arc<PodCache>,
    pub sources: Store<LockSource>,
    writer: LockWriter,
    pub tenancy: Arc<TenancyPolicy>,
    /// The shared SDK clients, one set per LockSource.
    aws: Arc<SourceClients>,
}

impl Context {
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
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] SourceAccessError),
    #[error("this replica stopped leading; nothing written")]
    NotLeader,
}

impl ExpiryError {
    pub fn category(&self) -> ErrorCategory {
        match self {
            Self::WriteStatus { error, .. } => ErrorCategory::of_kube(error),
            Self::Store(e) => e.category(),
            Self::Credentials(e) => e.category(),
            Self::NotLeader => ErrorCategory::NotLeader,
        }
    }
}

fn hostname_of(lock: &StateLock) -> Option<&str> {
    lock.spec.lock_info.who.as_deref().and_then(|w| split_who(w).1)
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
    LockFacts { created, hostname: hostname_of(lock).map(str::to_owned), info_sha256: lock.spec.info_sha256.clone(), malformed }
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

/// Run the controller until `shutdown`. Its readiness gate is closed when this is called, before
/// the returned future first runs.
pub fn run(deps: Deps, readiness: Readiness, shutdown: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
    readiness.add_gate("pods", "syncing the pod cache");
    judge(deps, readiness, shutdown)
}

async fn judge(deps: Deps, readiness: Readiness, shutdown: CancellationToken) {
    let Deps { client, recorder, reporter, metrics, leader, tenancy, cluster, lock_triggers } = deps;
    // Pod changes come from the shared cache, which stores each change before announcing it, so
    // a reconcile triggered by a pod event always sees that event in the cache. A subscriber
    // that fell behind re-judges every lock instead.
    let (lagged_tx, lagged_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let pod_events = futures::stream::unfold((cluster.pods.subscribe(), lagged_tx), |(mut rx, lagged)| async move {
        loop {
            match rx.recv().await {
                Ok(p) => return Some((Ok::<Pod, watcher::Error>((*p).clone()), (rx, lagged))),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(missed, "pod changes came faster than they were mapped; re-judging every lock");
                    let _ = lagged.send(());
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let lagged = futures::stream::unfold(lagged_rx, |mut rx| async move { rx.recv().await.map(|()| ((), rx)) });
    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics,
        leader: leader.clone(),
        pods: cluster.pods.clone(),
        sources: cluster.sources.clone(),
        writer: LockWriter::new(client.clone(), recorder, Writer::Expire).with_reporter(reporter),
        tenancy,
        aws: cluster.aws.clone(),
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
        let (pods, readiness) = (cluster.pods.clone(), readiness.clone());
        tokio::spawn(async move {
            pods.wait_complete().await;
            readiness.open("pods");
        });
    }
    let lock_store = cluster.locks.clone();
    Controller::for_stream(lock_triggers, cluster.locks.clone())
        .watches_stream(pod_events, move |pod: Pod| {
            // A pod event concerns the StateLocks whose holder it may be.
            let facts = pod_facts(&pod);
            let names_it = |ns: &str, name: &str| ns == facts.namespace() && name == facts.name();
            lock_store
                .state()
                .into_iter()
                .filter(|l| {
                    hostname_of(l).is_some_and(|h| facts.host.yields(h))
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
        .reconcile_all_on(futures::stream::select(gained, lagged))
        .with_config(controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                // A StateLock deleted (its lock released) while a reconcile of it was queued:
                // nothing is wrong, there is just nothing left to judge.
                Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(lock = %obj.name, "StateLock gone before its reconcile; nothing to do");
                }
                Err(e) => warn!(error = %e, "expiry reconcile failed"),
                Ok(_) => {}
            }
        })
        .await;
}

/// How many StateLocks are judged at once. Unbounded, a start (or a regained lead) over 10,000
/// StateLocks opened hundreds of API connections at once, each keeping its buffers: the
/// replica's memory peaked there and stayed. A reconcile is a few requests; a queue of them is
/// worked off quickly, and a lock's own changes are never starved (the queue is deduplicated).
const RECONCILE_CONCURRENCY: u16 = 64;

fn error_policy(_: Arc<StateLock>, e: &ExpiryError, _: Arc<Context>) -> Action {
    let category = e.category();
    warn!(error = %e, category = category.as_str(), transient = category.is_transient(), "will retry");
    Action::requeue(category.retry_after())
}

/// What the authorities say right now: every part of the lock from strongly consistent reads of
/// its stores, and the pods read directly from the API (never from the cache).
#[allow(clippy::large_enum_variant)] // one per release decision
enum Authority {
    /// No part of the lock exists any more.
    LockGone,
    Present {
        record: Box<LockRecord>,
        /// The parts as read, each with the exact instance its conditional delete is conditioned on.
        parts: Vec<HeldPart>,
        verdict: Verdict,
    },
}

async fn read_authorities(ctx: &Context, source: &LockSource, lock: &StateLock, policy: &HolderPolicy) -> Result<Authority, ExpiryError> {
    let sdk = ctx.aws.get(&ctx.client, &ctx.tenancy, source).await?;
    let stores = stores_of(&source.spec, &sdk);
    // A lock some store of the LockSource may not touch (a lock file outside its prefix, through an
    // edited spec.lockId, say) is judged by none: releasing only the other part would not free it.
    if let Some(store) = stores.iter().find(|s| !s.covers(&lock.spec.lock_id)) {
        let message = format!(
            "the {} of {} is outside what this LockSource may touch (spec.s3.prefix, or a key with empty, . or .. segments); nothing is released",
            store.kind().part_name(),
            lock.spec.lock_id
        );
        return Ok(Authority::Present { record: Box::default(), parts: Vec::new(), verdict: unknown(Reason::LockMalformed, message) });
    }
    let mut parts = Vec::new();
    for store in &stores {
        if let Some(part) = store.read(&lock.spec.lock_id).await? {
            parts.push(part);
        }
    }
    let record = match combine(&lock.spec.lock_id, &parts) {
        Combined::Gone => return Ok(Authority::LockGone),
        Combined::Lock(r) => Box::new(r),
        Combined::Disagree(r) => {
            let message = format!("{}; nothing is released", r.problems.join("; "));
            return Ok(Authority::Present { record: Box::new(r), parts, verdict: unknown(Reason::LockMalformed, message) });
        }
    };
    let facts = authoritative_facts(&record);
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
    Ok(Authority::Present { record, parts, verdict })
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
        let labels = ErrorLabels { controller: ControllerName::expiry, category: e.category().as_str().to_owned() };
        ctx.metrics.controllers.reconcile_errors.get_or_create(&labels).inc();
    }
    result
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
    let synced = ctx.pods.is_complete();
    let pods: Vec<PodFacts> =
        if synced { ctx.pods.in_namespaces(&pol.namespaces).iter().map(|p| pod_facts(p)).collect() } else { Vec::new() };
    let lookup = recorded
        .as_ref()
        .map(|e| ctx.pods.get(&e.namespace, &e.name).map_or(HolderLookup::NotFound, |p| HolderLookup::Found(Box::new(pod_facts(&p)))));
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
    if unlock_request.is_none() {
        clear_orphaned_unlock_annotations(&ctx, &lock).await?;
    }
    // A pod cache still listing (start-up, a new namespace) decides nothing; a lock that already
    // has a holder status keeps it rather than flapping to Unknown and back (on a restart, that
    // would be two writes per StateLock for nothing).
    if verdict.reason == Reason::CacheNotSynced && previous.holder.is_some() && unlock_request.is_none() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mut authority = None;
    let mut not_confirmed: Option<String> = None;
    // A holder is recorded only from the authorities: a new one found in the caches is confirmed
    // first (once per lock instance), so that a lagging cache or an edited spec never records a
    // pod whose later death would count.
    let new_holder = verdict.established.is_some() && recorded.is_none();
    let mut from_authority = false;
    if verdict.is_dead() || unlock_request.is_some() || new_holder {
        let hint_verdict = verdict.clone();
        match read_authorities(&ctx, &source, &lock, &pol).await {
            Ok(Authority::LockGone) => {
                // Released by its holder (or someone) meanwhile: the mirror removes the StateLock,
                // and a request with it, which its asker reads as the lock released. No answer
                // is published and the request stays: the key read comes from the spec, which
                // anyone who may edit the StateLock can point at a key (or a LockSource) that
                // holds nothing, and "nothing to release" would then be said of a held lock.
                // Once the mirror restores the spec, the request is judged on the real lock.
                // Looked at again unhurried: the mirror's removal ends it, and a mirror that
                // cannot read the source must not turn into a read every few seconds.
                return Ok(Action::requeue(GONE_RECHECK));
            }
            Ok(Authority::Present { record, parts, verdict: v }) => {
                verdict = v;
                from_authority = true;
                authority = Some((record, parts));
            }
            Err(e) => {
                warn!(error = %e, lock = %lock.spec.lock_id, "could not read the authorities; nothing is decided");
                verdict = unknown(Reason::ApiError, format!("the authorities could not be read ({e}); nothing is decided"));
            }
        }
        if hint_verdict.is_dead() && !verdict.is_dead() {
            not_confirmed = Some(format!("the caches suggested {} but the authorities say: {}", hint_verdict.message, verdict.message));
        }
    }

    // 3. The decision (pure), its steps, and what their outcome means.
    let instance = authority.as_ref().and_then(|(r, _)| r.info_sha256.clone()).or_else(|| hint.info_sha256.clone());
    let live_override = lock.annotations().get(FORCE_UNLOCK_LIVE_ANNOTATION).cloned();
    let grace_text = source.spec.expiry.grace_period.to_string();
    let input = decision::Input {
        verdict: &verdict,
        authority_id: authority.as_ref().map(|(r, _)| r.info.id.as_deref()),
        not_confirmed,
        previous: &previous,
        instance: instance.as_deref(),
        unlock: unlock_request.as_deref().map(|requested| UnlockRequest { requested, live_override: live_override.as_deref() }),
        mode: source.spec.expiry.mode,
        grace: source.spec.expiry.grace_period.get(),
        grace_text: &grace_text,
        now,
    };
    let decided = decision::decide(&input);
    if decided.announce_death {
        publish(&ctx, &lock, reasons::HOLDER_DIED, &verdict.message, verdict.pod.as_ref()).await;
    }
    let mut unlock_released = false;
    if let (Some(step), Some(requested)) = (&decided.unlock, unlock_request.as_deref()) {
        // Every event that answers the request carries its token, when it has one.
        let mark = answer_mark(request_token(lock.annotations().get(FORCE_UNLOCK_REQUEST_ANNOTATION).map(String::as_str)));
        match step {
            UnlockStep::NotDecided => {
                let note = format!("{mark}force-unlock {requested} was not carried out: {}", verdict.message);
                publish_answer(&ctx, &lock, reasons::UNLOCK_REFUSED, &note, None, &mark).await;
            }
            UnlockStep::Release => {
                if let Some((_, parts)) = &authority {
                    let report = ReleaseReport {
                        metric_reason: "ForceUnlock".into(),
                        event_reason: reasons::FORCE_UNLOCKED,
                        note: format!("released lock {requested} on request (holder {:?}: {})", verdict.state, verdict.message),
                        pod: None,
                        skipped_note: "the lock item changed since it was read; nothing was released",
                        mark: mark.clone(),
                    };
                    match release_and_report(&ctx, &source, &lock, parts, report).await {
                        Ok(Released::Yes) => unlock_released = true,
                        // Gone since it was read: the request stays, as above.
                        Ok(Released::AlreadyGone) => return Ok(Action::requeue(GONE_RECHECK)),
                        Ok(Released::No) => {}
                        Err(e) => {
                            // The request stays and is tried again; its asker hears why it waits.
                            let note =
                                format!("{mark}force-unlock {requested}: the release failed ({e}); the request is kept and tried again");
                            publish_answer(&ctx, &lock, reasons::UNLOCK_FAILED, &note, None, &mark).await;
                            return Err(e);
                        }
                    }
                }
            }
            UnlockStep::WrongId { requested, actual } => {
                let note = format!(
                    "{mark}force-unlock names lock ID {requested} but the lock item's ID is {}; nothing was released",
                    actual.as_deref().unwrap_or("unknown")
                );
                publish_answer(&ctx, &lock, reasons::UNLOCK_ID_MISMATCH, &note, None, &mark).await;
            }
            UnlockStep::RefusedLiveHolder => {
                let note = format!("{mark}{}", decision::refused_message(&verdict));
                publish_answer(&ctx, &lock, reasons::UNLOCK_REFUSED, &note, verdict.pod.as_ref(), &mark).await;
            }
        }
        consume_unlock_request(&ctx, &lock).await?;
    }
    let mut expired = None;
    if decided.expiry == ExpiryStep::Release
        && !unlock_released
        && let Some((record, parts)) = &authority
    {
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
            mark: String::new(),
        };
        // A lock gone before its release was not released by statelock: no phase Released.
        expired = match release_and_report(&ctx, &source, &lock, parts, report).await? {
            Released::Yes => Some(true),
            Released::No => Some(false),
            Released::AlreadyGone => None,
        };
    }
    let outcome = decision::settle(&input, &decided, unlock_released, expired);
    report_blocked(&ctx, &lock, &previous, outcome.blocked.as_ref(), verdict.pod.as_ref()).await;
    let evidence = decided.evidence_since.map(|at| DeathEvidence {
        reason: verdict.reason.as_str().into(),
        message: verdict.message.clone(),
        observed_at: Time(at),
        info_sha256: instance.clone(),
    });
    write_status(&ctx, &lock, &previous, &verdict, from_authority, evidence, outcome.phase, outcome.blocked.as_ref(), now).await?;
    Ok(Action::requeue(outcome.requeue))
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

/// Remove the force-unlock annotations: a request is handled once. Only what was read is removed:
/// the lock ID and the request's token go together, and stay if either changed meanwhile (a newer
/// request, handled next); the live override goes if it is still what was read, so that it never
/// carries over to a request that did not ask for it.
async fn consume_unlock_request(ctx: &Context, lock: &StateLock) -> Result<(), ExpiryError> {
    let err = |error| ExpiryError::WriteStatus { name: lock.name_any(), error };
    let removed =
        ctx.writer.remove_annotations_as_read(lock, &[FORCE_UNLOCK_ANNOTATION, FORCE_UNLOCK_REQUEST_ANNOTATION]).await.map_err(err)?;
    ctx.writer.remove_annotations_as_read(lock, &[FORCE_UNLOCK_LIVE_ANNOTATION]).await.map_err(err)?;
    if !removed {
        info!(lock = %lock.spec.lock_id, "a newer force-unlock request arrived while one was handled; it is handled next");
    }
    Ok(())
}

/// A live override or a token without a request (left by a request that was handled, or set on
/// its own) is removed: an override counts only with the request it was set with.
async fn clear_orphaned_unlock_annotations(ctx: &Context, lock: &StateLock) -> Result<(), ExpiryError> {
    let a = lock.annotations();
    if a.contains_key(FORCE_UNLOCK_ANNOTATION) {
        return Ok(());
    }
    for key in [FORCE_UNLOCK_LIVE_ANNOTATION, FORCE_UNLOCK_REQUEST_ANNOTATION] {
        if a.contains_key(key) {
            ctx.writer
                .remove_annotations_as_read(lock, &[FORCE_UNLOCK_ANNOTATION, key])
                .await
                .map_err(|error| ExpiryError::WriteStatus { name: lock.name_any(), error })?;
        }
    }
    Ok(())
}

/// How a release is reported, for a force-unlock or an expiry.
struct ReleaseReport<'a> {
    metric_reason: String,
    event_reason: &'static str,
    note: String,
    pod: Option<&'a PodRef>,
    skipped_note: &'static str,
    /// Begins every note: the request's mark for a manual unlock, else empty.
    mark: String,
}

/// When a lock that no store holds is looked at again, while its StateLock is still there.
const GONE_RECHECK: Duration = Duration::from_secs(30);

/// What a release came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Released {
    /// Statelock released the lock (every part it found).
    Yes,
    /// Every part was gone already: nothing was released, and nothing is left to release.
    AlreadyGone,
    /// Nothing was released (the lock changed, or its parts are not one instance); said in events.
    No,
}

/// Release every part of the exact lock instance read from the authorities (each delete
/// conditioned on that part's instance: the Info of an item, the ETag of a file) and report the
/// outcome ([`Released`]): every part released now, every part gone already, or nothing
/// released because a part had changed and the release stopped there. A release that removed
/// some parts and then failed is reported as partial (never as a release) and tried again: the
/// remaining parts are read and judged afresh.
async fn release_and_report(
    ctx: &Context,
    source: &LockSource,
    lock: &StateLock,
    parts: &[HeldPart],
    report: ReleaseReport<'_>,
) -> Result<Released, ExpiryError> {
    // Only the parts of one lock instance are ever released together (the judgement holds for
    // that instance alone).
    if !matches!(combine(&lock.spec.lock_id, parts), Combined::Lock(_)) {
        let note = format!("{}the parts of this lock do not hold one lock instance; nothing was released", report.mark);
        publish_answer(ctx, lock, reasons::RELEASE_SKIPPED, &note, None, &report.mark).await;
        return Ok(Released::No);
    }
    let sdk = ctx.aws.get(&ctx.client, &ctx.tenancy, source).await?;
    let stores = stores_of(&source.spec, &sdk);
    // The last moment to notice that another replica may be judging this lock now.
    ctx.ensure_leader()?;
    let mut released: Vec<StoreKind> = Vec::new();
    for part in parts {
        let Some(store) = stores.iter().find(|s| s.kind() == part.kind) else { continue };
        match store.release(&lock.spec.lock_id, part).await {
            Ok(ReleaseOutcome::Released) => {
                if part.kind == StoreKind::S3 {
                    count_s3(ctx, source, "DELETE");
                }
                released.push(part.kind);
            }
            Ok(ReleaseOutcome::AlreadyGone) => {}
            // A conditional DeleteItem also fails when the item is gone (its holder unlocked in
            // the meantime): only a part that is still there is another lock.
            Ok(ReleaseOutcome::HeldByAnother) if matches!(store.read(&lock.spec.lock_id).await, Ok(None)) => {}
            Ok(ReleaseOutcome::HeldByAnother) => {
                if released.is_empty() {
                    publish_answer(
                        ctx,
                        lock,
                        reasons::RELEASE_SKIPPED,
                        &format!("{}{}", report.mark, report.skipped_note),
                        None,
                        &report.mark,
                    )
                    .await;
                } else {
                    let note = format!(
                        "{}released the {} of lock {}, but the {} changed since it was judged (re-taken or updated) and was not released",
                        report.mark,
                        parts_text(&released),
                        lock.spec.lock_id,
                        part.kind.part_name()
                    );
                    publish_answer(ctx, lock, reasons::LOCK_PARTIALLY_RELEASED, &note, None, &report.mark).await;
                }
                return Ok(Released::No);
            }
            Err(e) => {
                if !released.is_empty() {
                    let note = format!(
                        "{}released the {} of lock {} but not the {}: {e}; trying again",
                        report.mark,
                        parts_text(&released),
                        lock.spec.lock_id,
                        part.kind.part_name()
                    );
                    warn!(lock = %lock.spec.lock_id, error = %e, "partial release");
                    publish_answer(ctx, lock, reasons::LOCK_PARTIALLY_RELEASED, &note, None, &report.mark).await;
                }
                return Err(e.into());
            }
        }
    }
    if released.is_empty() {
        // Every part was gone already: released by its holder since it was read.
        return Ok(Released::AlreadyGone);
    }
    ctx.metrics.locks.expirations.get_or_create(&ExpirationLabels { reason: report.metric_reason }).inc();
    info!(lock = %lock.spec.lock_id, reason = report.event_reason, parts = %parts_text(&released), "lock released");
    let note = if parts.len() > 1 { format!("{} ({} released)", report.note, parts_text(&released)) } else { report.note };
    let note = format!("{}{note}", report.mark);
    publish_answer(ctx, lock, report.event_reason, &note, report.pod, &report.mark).await;
    Ok(Released::Yes)
}

fn parts_text(kinds: &[StoreKind]) -> String {
    kinds.iter().map(|k| k.part_name()).collect::<Vec<_>>().join(" and ")
}

fn count_s3(ctx: &Context, source: &LockSource, request: &str) {
    let labels = S3RequestLabels { namespace: source.namespace().unwrap_or_default(), source: source.name_any(), request: request.into() };
    ctx.metrics.locks.s3_requests.get_or_create(&labels).inc();
}

/// [`publish`], for an event that answers a manual unlock request marked `mark` (empty: no
/// request, or one without a token): a new event of its own, never folded into an earlier
/// event's series (a series keeps its first note, and the mark would be lost).
async fn publish_answer(ctx: &Context, lock: &StateLock, reason: &str, note: &str, pod: Option<&PodRef>, mark: &str) {
    if mark.is_empty() {
        return publish(ctx, lock, reason, note, pod).await;
    }
    ctx.writer.publish_new(lock, reason, true, note).await;
    if let Some(p) = pod.and_then(|p| ctx.pods.get(&p.namespace, &p.name)) {
        ctx.writer.publish_on(&p.object_ref(&()), reason, true, note).await;
    }
}

async fn publish(ctx: &Context, lock: &StateLock, reason: &str, note: &str, pod: Option<&PodRef>) {
    // Also on the holder pod, while it exists.
    let on_pod = pod.and_then(|p| ctx.pods.get(&p.namespace, &p.name)).map(|p| p.object_ref(&()));
    ctx.writer.publish(lock, reason, true, note, on_pod).await;
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
        (Some(e), _) if from_authority || e.by == HolderIdentification::Gateway => Some(Box::new(EstablishedHolder {
            namespace: e.namespace.clone(),
            pod: e.name.clone(),
            uid: e.uid.clone(),
            by: e.by,
            hostname: e.hostname.clone(),
            info_sha256: e.info_sha256.clone(),
            restarts: e.restarts,
            at: Time(now),
        })),
        (_, prev) => prev,
    };
    let holder = HolderStatus {
        state: v.state,
        reason: v.reason.as_str().into(),
        message: Some(v.message.clone()),
        hostname: hostname_of(lock).map(str::to_owned),
        identified_by: v.pod.as_ref().and(v.identified_by()),
        namespace: v.pod.as_ref().map(|p| p.namespace.clone()),
        pod: v.pod.as_ref().map(|p| p.name.clone()),
        uid: v.pod.as_ref().and_then(|p| p.uid.clone()),
        candidates: v.candidates.clone(),
        evidence: evidence.map(Box::new),
        established,
        since,
    };
    let release = blocked.map(|b| {
        Box::new(ReleaseStatus {
            reason: b.reason.to_string(),
            message: b.message.clone(),
            since: previous.release.as_ref().filter(|r| r.reason == b.reason).map_or(Time(now), |r| r.since.clone()),
        })
    });
    if previous.holder.as_ref() == Some(&holder)
        && previous.phase == Some(phase)
        && previous.release == release
        && previous.observed_generation == lock.metadata.generation
    {
        return Ok(());
    }
    let status = json!({"observedGeneration": lock.metadata.generation, "phase": phase, "holder": holder, "release": release});
    ctx.ensure_leader()?;
    ctx.writer
        .apply_status(&lock.namespace().unwrap_or_default(), &lock.name_any(), reasons::CONTROLLER_MANAGER, status)
        .await
        .map_err(|error| ExpiryError::WriteStatus { name: lock.name_any(), error })?;
    Ok(())
}
