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
    api::{Patch, PatchParams},
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
    self, Cache, ContainerFacts, DirectRead, HOLDER_CONTAINER_ANNOTATION, HolderPolicy, LockFacts, PodFacts, PodRef, Verdict,
};
use super::manual_unlock::{self, FORCE_UNLOCK_ANNOTATION, FORCE_UNLOCK_LIVE_ANNOTATION, UnlockDecision};
use crate::{
    admin::Readiness,
    crd::{DeathEvidence, ExpiryMode, HolderIdentification, HolderState, HolderStatus, LockPhase, LockSource, StateLock, StateLockStatus},
    dynamo::{
        self,
        lock_item::{parse_created, split_who},
        release::{ReleaseOutcome, release_exact},
    },
    leader::Leadership,
    metrics::{ControllerLabels, ControllerName, ErrorLabels, ExpirationLabels, Metrics},
    reasons,
};

/// What the controller is given.
#[derive(Clone)]
pub struct Deps {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every replica judges nothing and writes nothing unless it leads.
    pub leader: Leadership,
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
    Dynamo(#[from] dynamo::DynamoError),
    #[error("{0}")]
    Credentials(String),
    #[error("this replica stopped leading; nothing written")]
    NotLeader,
}

impl ExpiryError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::WriteStatus { .. } => "kubernetes_api",
            Self::Dynamo(e) => e.category(),
            Self::Credentials(_) => "credentials",
            Self::NotLeader => "not_leader",
        }
    }
}

/// The facts about a pod the judge needs.
pub fn pod_facts(p: &Pod) -> PodFacts {
    let status = p.status.as_ref();
    let ts = |t: &Time| t.0.as_nanosecond();
    PodFacts {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        hostname: p.spec.as_ref().and_then(|s| s.hostname.clone()).filter(|h| !h.is_empty()),
        created: p.metadata.creation_timestamp.as_ref().map_or(0, ts),
        phase: status.and_then(|s| s.phase.clone()),
        terminating: p.metadata.deletion_timestamp.is_some(),
        containers: status
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| ContainerFacts {
                running_since: c.state.and_then(|s| s.running).and_then(|r| r.started_at).map(|t| ts(&t)),
                name: c.name,
            })
            .collect(),
        holder_container: p.annotations().get(HOLDER_CONTAINER_ANNOTATION).cloned(),
    }
}

fn hostname_of(lock: &StateLock) -> Option<String> {
    lock.spec.lock_info.who.as_deref().and_then(|w| split_who(w).1).map(str::to_owned)
}

fn policy(source: &LockSource) -> HolderPolicy {
    let pattern = source.spec.holders.hostname_pattern.as_deref().and_then(|p| regex::Regex::new(&format!("^(?:{p})$")).ok());
    HolderPolicy {
        namespaces: source.spec.holders.namespaces.clone(),
        hostname_pattern: pattern,
        skew_tolerance_ns: i128::try_from(source.spec.expiry.skew_tolerance.get().as_nanos()).unwrap_or(i128::MAX),
    }
}

/// Run the controller until `shutdown`.
pub async fn run(deps: Deps, readiness: Readiness, shutdown: CancellationToken) {
    let Deps { client, recorder, metrics, leader } = deps;
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
            let host = facts.effective_hostname().to_owned();
            lock_store
                .state()
                .into_iter()
                .filter(|l| {
                    hostname_of(l).as_deref() == Some(host.as_str())
                        || l.status.as_ref().and_then(|s| s.holder.as_ref()).is_some_and(|h| {
                            h.pod.as_deref() == Some(facts.name.as_str()) && h.namespace.as_deref() == Some(facts.namespace.as_str())
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

async fn direct_read(client: &Client, ns: &str, name: &str) -> DirectRead {
    match Api::<Pod>::namespaced(client.clone(), ns).get_opt(name).await {
        Ok(None) => DirectRead::NotFound,
        Ok(Some(_)) => DirectRead::Exists,
        Err(_) => DirectRead::Failed,
    }
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

async fn judge_and_act(lock: Arc<StateLock>, ctx: &Arc<Context>) -> Result<Action, ExpiryError> {
    let ctx = ctx.clone();
    let ns = lock.namespace().unwrap_or_default();
    let previous = lock.status.clone().unwrap_or_default();
    let source = ctx.sources.get(&ObjectRef::new(&lock.spec.source).within(&ns));
    let now = Timestamp::now();
    let Some(source) = source else {
        let verdict = Verdict {
            state: HolderState::Unknown,
            reason: "SourceNotFound",
            message: format!("LockSource {} is not known (yet)", lock.spec.source),
            pod: None,
            identified_by_gateway: false,
            candidates: vec![],
            evidence: None,
            needs_direct_read: None,
        };
        write_status(&ctx, &lock, &previous, &verdict, None, LockPhase::Held, now).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    let facts = LockFacts {
        created: lock.spec.lock_info.created.as_deref().and_then(parse_created),
        hostname: hostname_of(&lock),
        // The gateway's record counts for the lock instance it saw granted, not a later one.
        gateway_pod: previous
            .gateway_holder
            .as_ref()
            .filter(|g| lock.spec.lock_info.id.as_deref() == Some(g.lock_id.as_str()))
            .map(|g| PodRef { namespace: g.namespace.clone(), name: g.pod.clone(), uid: Some(g.uid.clone()) }),
    };
    let pods: Vec<PodFacts> = ctx.pods.state().iter().map(|p| pod_facts(p)).collect();
    let cache = if ctx.pods_synced.load(Ordering::SeqCst) { Cache::Synced } else { Cache::NotSynced };
    let pol = policy(&source);
    let mut verdict = holder_liveness::judge(&facts, &pods, &pol, cache, DirectRead::NotDone);
    if let Some((pns, pname)) = verdict.needs_direct_read.clone() {
        let direct = direct_read(&ctx.client, &pns, &pname).await;
        verdict = holder_liveness::judge(&facts, &pods, &pol, cache, direct);
    }
    // Evidence is held from when it was first seen; a new kind of evidence starts anew.
    let same_instance = previous.observed_generation == lock.metadata.generation;
    let observed_at = match (&verdict.evidence, previous.holder.as_ref().and_then(|h| h.evidence.as_ref())) {
        (Some(e), Some(prev)) if prev.reason == e.reason && same_instance => Some(prev.observed_at.0),
        (Some(_), _) => Some(now),
        (None, _) => None,
    };
    let grace = source.spec.expiry.grace_period.get();
    let mut phase = if verdict.state == HolderState::Dead { LockPhase::HolderDead } else { LockPhase::Held };
    let newly_dead = verdict.state == HolderState::Dead && previous.holder.as_ref().is_none_or(|h| h.state != HolderState::Dead);
    if newly_dead {
        publish(&ctx, &lock, reasons::HOLDER_DIED, &verdict.message, verdict.pod.as_ref()).await;
    }
    // Pod events drive most reconciles; these are safety nets. An undecided verdict (cache not
    // synced yet, a direct read that failed or saw the cache behind) is looked at again soon.
    let mut action = match (verdict.state, verdict.reason) {
        (_, "CacheNotSynced") => Action::requeue(Duration::from_secs(1)),
        (HolderState::Unknown, _) => Action::requeue(Duration::from_secs(5)),
        _ => Action::requeue(Duration::from_secs(300)),
    };
    if let Some(requested) = lock.annotations().get(FORCE_UNLOCK_ANNOTATION) {
        let live = lock.annotations().get(FORCE_UNLOCK_LIVE_ANNOTATION).map(String::as_str);
        match manual_unlock::decide(requested, lock.spec.lock_info.id.as_deref(), verdict.state, live) {
            UnlockDecision::Release => {
                let report = ReleaseReport {
                    metric_reason: "ForceUnlock".into(),
                    event_reason: reasons::FORCE_UNLOCKED,
                    note: format!("released lock {requested} on request (holder {:?}: {})", verdict.state, verdict.message),
                    pod: None,
                    skipped_note: "the lock item changed since it was mirrored; nothing was released",
                };
                if release_and_report(&ctx, &source, &lock, report).await? {
                    phase = LockPhase::Released;
                }
            }
            UnlockDecision::WrongId { requested, actual } => {
                publish(
                    &ctx,
                    &lock,
                    reasons::UNLOCK_ID_MISMATCH,
                    &format!(
                        "force-unlock names lock ID {requested} but this lock's ID is {}; nothing was released",
                        actual.as_deref().unwrap_or("unknown")
                    ),
                    None,
                )
                .await;
            }
            UnlockDecision::RefusedLiveHolder => {
                publish(
                    &ctx,
                    &lock,
                    reasons::UNLOCK_REFUSED,
                    &format!(
                        "the holder is alive ({}); set {FORCE_UNLOCK_LIVE_ANNOTATION}=\"true\" as well to release it anyway",
                        verdict.message
                    ),
                    verdict.pod.as_ref(),
                )
                .await;
            }
        }
        consume_unlock_request(&ctx, &lock).await?;
    }
    if let (HolderState::Dead, Some(seen), false) = (verdict.state, observed_at, phase == LockPhase::Released) {
        let due = seen.checked_add(jiff_span(grace)).unwrap_or(seen);
        let releasable = source.spec.expiry.mode == ExpiryMode::Release && lock.spec.info_sha256.is_some();
        if now < due {
            action = Action::requeue(
                Duration::from_nanos(u64::try_from(due.as_nanosecond() - now.as_nanosecond()).unwrap_or(0)).max(Duration::from_millis(50)),
            );
        } else if releasable {
            let evidence = verdict.evidence.as_ref();
            let report = ReleaseReport {
                metric_reason: evidence.map_or("Unknown", |e| e.reason).to_owned(),
                event_reason: reasons::LOCK_EXPIRED,
                note: format!(
                    "released lock {} ({}) held by {}: {}",
                    lock.spec.lock_info.id.as_deref().unwrap_or("?"),
                    lock.spec.lock_id,
                    lock.spec.lock_info.who.as_deref().unwrap_or("?"),
                    evidence.map(|e| e.message.as_str()).unwrap_or_default()
                ),
                pod: verdict.pod.as_ref(),
                skipped_note: "the lock item changed since it was judged (re-taken or updated); nothing was released",
            };
            if release_and_report(&ctx, &source, &lock, report).await? {
                phase = LockPhase::Released;
            }
            action = Action::requeue(Duration::from_secs(5));
        }
    }
    write_status(&ctx, &lock, &previous, &verdict, observed_at, phase, now).await?;
    Ok(action)
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

fn jiff_span(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
}

/// How a release is reported, for a force-unlock or an expiry.
struct ReleaseReport<'a> {
    metric_reason: String,
    event_reason: &'static str,
    note: String,
    pod: Option<&'a PodRef>,
    skipped_note: &'static str,
}

/// Release the exact lock instance and report the outcome; true when the item is gone (released
/// now, or already), false when it had changed and nothing was released.
async fn release_and_report(ctx: &Context, source: &LockSource, lock: &StateLock, report: ReleaseReport<'_>) -> Result<bool, ExpiryError> {
    match release(ctx, source, lock).await? {
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

async fn release(ctx: &Context, source: &LockSource, lock: &StateLock) -> Result<ReleaseOutcome, ExpiryError> {
    let Some(sha) = lock.spec.info_sha256.as_deref() else { return Ok(ReleaseOutcome::HeldByAnother) };
    let d = &source.spec.dynamodb;
    let creds = dynamo::source_credentials::for_source(&ctx.client, source).await.map_err(ExpiryError::Credentials)?;
    let client = dynamo::dynamodb_client(&d.region, d.endpoint.as_deref(), creds).await;
    // The last moment to notice that another replica may be judging this lock now.
    ctx.ensure_leader()?;
    Ok(release_exact(&client, &d.table_name, &lock.spec.lock_id, sha).await?.0)
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

async fn write_status(
    ctx: &Context,
    lock: &StateLock,
    previous: &StateLockStatus,
    v: &Verdict,
    observed_at: Option<Timestamp>,
    phase: LockPhase,
    now: Timestamp,
) -> Result<(), ExpiryError> {
    let prev_holder = previous.holder.as_ref();
    let since = match prev_holder {
        Some(h) if h.state == v.state => h.since.clone(),
        _ => Some(Time(now)),
    };
    let holder = HolderStatus {
        state: v.state,
        reason: v.reason.into(),
        message: Some(v.message.clone()),
        hostname: hostname_of(lock),
        identified_by: v
            .pod
            .as_ref()
            .map(|_| if v.identified_by_gateway { HolderIdentification::Gateway } else { HolderIdentification::Hostname }),
        namespace: v.pod.as_ref().map(|p| p.namespace.clone()),
        pod: v.pod.as_ref().map(|p| p.name.clone()),
        uid: v
            .pod
            .as_ref()
            .and_then(|p| p.uid.clone())
            .or_else(|| prev_holder.filter(|h| h.pod == v.pod.as_ref().map(|p| p.name.clone())).and_then(|h| h.uid.clone())),
        candidates: v.candidates.clone(),
        evidence: v.evidence.as_ref().zip(observed_at).map(|(e, at)| DeathEvidence {
            reason: e.reason.into(),
            message: e.message.clone(),
            observed_at: Time(at),
        }),
        since,
    };
    if previous.holder.as_ref() == Some(&holder)
        && previous.phase == Some(phase)
        && previous.observed_generation == lock.metadata.generation
    {
        return Ok(());
    }
    let body = json!({
        "apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock", "metadata": {"name": lock.name_any()},
        "status": {"observedGeneration": lock.metadata.generation, "phase": phase, "holder": holder},
    });
    let api: Api<StateLock> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
    ctx.ensure_leader()?;
    api.patch_status(&lock.name_any(), &PatchParams::apply(reasons::CONTROLLER_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(|error| ExpiryError::WriteStatus { name: lock.name_any(), error })?;
    Ok(())
}
