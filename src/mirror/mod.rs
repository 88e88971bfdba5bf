//! The mirror: keeps each LockSource's StateLocks in step with its DynamoDB table.
//!
//! One task per LockSource scans the table, plans the changes ([`plan`]) and applies them with
//! server-side apply under the `statelock-mirror` field manager, writing only what changed. It
//! never touches a StateLock when the table could not be read: an outage is reported on the
//! LockSource, never mistaken for "every lock was released".

pub mod plan;

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{StreamExt, pin_mut};
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder},
        watcher,
    },
};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    admin::Readiness,
    crd::{LockSource, LockSourceStatus, StateLock, SyncMode},
    dynamo::{self, StaticCredentials, lock_item::TableItem},
    reasons,
};

/// Everything the mirror's tasks share.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
}

/// Why one sync pass failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("failed to read credentials Secret {namespace}/{name}: {reason}")]
    ReadCredentials { namespace: String, name: String, reason: String },
    #[error(transparent)]
    Dynamo(#[from] dynamo::DynamoError),
    #[error("failed to list the StateLocks of {source_name}: {error}")]
    ListStateLocks { source_name: String, error: kube::Error },
    #[error("failed to apply StateLock {name}: {error}")]
    ApplyStateLock { name: String, error: kube::Error },
    #[error("failed to delete StateLock {name}: {error}")]
    DeleteStateLock { name: String, error: kube::Error },
}

impl SyncError {
    /// Stable reason for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReadCredentials { .. } => "CredentialsUnavailable",
            Self::Dynamo(_) => "TableUnreadable",
            Self::ListStateLocks { .. } | Self::ApplyStateLock { .. } | Self::DeleteStateLock { .. } => "KubernetesApiError",
        }
    }
}

type SourceKey = (String, String);

struct Running {
    fingerprint: String,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Watch LockSources and run one sync task per source until `shutdown`.
pub async fn run(ctx: Arc<Context>, readiness: Readiness, shutdown: CancellationToken) {
    readiness.add_gate("locksources", "listing LockSources");
    let api: Api<LockSource> = Api::all(ctx.client.clone());
    let events = watcher(api, watcher::Config::default()).default_backoff();
    pin_mut!(events);
    let mut running: HashMap<SourceKey, Running> = HashMap::new();
    let mut seen: Vec<SourceKey> = Vec::new();
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = shutdown.cancelled() => break,
        };
        match event {
            Some(Ok(watcher::Event::Init)) => seen.clear(),
            Some(Ok(watcher::Event::InitApply(src))) => {
                seen.push(key(&src));
                ensure(&ctx, &mut running, src);
            }
            Some(Ok(watcher::Event::InitDone)) => {
                let stale: Vec<SourceKey> = running.keys().filter(|k| !seen.contains(k)).cloned().collect();
                for k in stale {
                    stop(&mut running, &k).await;
                }
                readiness.open("locksources");
            }
            Some(Ok(watcher::Event::Apply(src))) => ensure(&ctx, &mut running, src),
            Some(Ok(watcher::Event::Delete(src))) => stop(&mut running, &key(&src)).await,
            Some(Err(e)) => warn!(error = %e, "LockSource watch failed; retrying"),
            None => break,
        }
    }
    for k in running.keys().cloned().collect::<Vec<_>>() {
        stop(&mut running, &k).await;
    }
}

fn key(src: &LockSource) -> SourceKey {
    (src.namespace().unwrap_or_default(), src.name_any())
}

fn ensure(ctx: &Arc<Context>, running: &mut HashMap<SourceKey, Running>, src: LockSource) {
    let k = key(&src);
    let fingerprint = format!("{}/{}", src.uid().unwrap_or_default(), serde_json::to_string(&src.spec).unwrap_or_default());
    if running.get(&k).is_some_and(|r| r.fingerprint == fingerprint) {
        return;
    }
    if let Some(old) = running.remove(&k) {
        old.cancel.cancel();
    }
    let cancel = CancellationToken::new();
    let span = info_span!("locksource", namespace = %k.0, name = %k.1, table = %src.spec.dynamodb.table_name);
    let task = tokio::spawn(sync_source(ctx.clone(), src, cancel.clone()).instrument(span));
    running.insert(k, Running { fingerprint, cancel, task });
}

async fn stop(running: &mut HashMap<SourceKey, Running>, k: &SourceKey) {
    if let Some(r) = running.remove(k) {
        r.cancel.cancel();
        let _ = r.task.await;
    }
}

/// What one source's task remembers between passes.
#[derive(Default)]
struct SourceState {
    client: Option<(Option<String>, aws_sdk_dynamodb::Client)>,
    last_status: Option<(LockSourceStatus, Timestamp)>,
}

async fn sync_source(ctx: Arc<Context>, source: LockSource, cancel: CancellationToken) {
    let interval = source.spec.sync.interval.get().max(Duration::from_secs(1));
    let mut state = SourceState::default();
    info!(interval = ?interval, "syncing LockSource");
    loop {
        let result = tokio::select! {
            r = sync_once(&ctx, &source, &mut state) => r,
            () = cancel.cancelled() => return,
        };
        let status = match &result {
            Ok(pass) => ready_status(
                &source,
                true,
                "Synced",
                format!("read {} items ({} locks) in {} pages", pass.items, pass.locks, pass.pages),
                Some(pass.locks),
            ),
            Err(e) => {
                warn!(error = %e, reason = e.reason(), "sync pass failed; StateLocks left as they were");
                ready_status(&source, false, e.reason(), e.to_string(), None)
            }
        };
        if let Err(e) = write_source_status(&ctx, &source, status, result.is_ok(), &mut state).await {
            warn!(error = %e, "failed to write LockSource status");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {},
            () = cancel.cancelled() => return,
        }
    }
}

struct PassSummary {
    items: usize,
    locks: i32,
    pages: u32,
}

async fn credentials(ctx: &Context, source: &LockSource) -> Result<Option<StaticCredentials>, SyncError> {
    let Some(r) = &source.spec.dynamodb.credentials_secret_ref else { return Ok(None) };
    let ns = source.namespace().unwrap_or_default();
    let err = |reason: String| SyncError::ReadCredentials { namespace: ns.clone(), name: r.name.clone(), reason };
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns).get(&r.name).await.map_err(|e| err(e.to_string()))?;
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(&v.0).trim().to_owned());
    Ok(Some(StaticCredentials {
        access_key_id: get(&r.access_key_id_key).ok_or_else(|| err(format!("key {} is missing", r.access_key_id_key)))?,
        secret_access_key: get(&r.secret_access_key_key).ok_or_else(|| err(format!("key {} is missing", r.secret_access_key_key)))?,
        session_token: get(&r.session_token_key),
    }))
}

async fn sync_once(ctx: &Context, source: &LockSource, state: &mut SourceState) -> Result<PassSummary, SyncError> {
    let creds = credentials(ctx, source).await?;
    let fingerprint = creds.as_ref().map(|c| format!("{}:{}", c.access_key_id, c.secret_access_key.len()));
    if state.client.as_ref().is_none_or(|(f, _)| *f != fingerprint) {
        let d = &source.spec.dynamodb;
        state.client = Some((fingerprint, dynamo::dynamodb_client(&d.region, d.endpoint.as_deref(), creds).await));
    }
    let Some((_, dynamodb)) = &state.client else { unreachable!("set above") };
    let table = &source.spec.dynamodb.table_name;
    let scan = dynamo::scan_table(dynamodb, table).await?;
    let mut records = Vec::new();
    for item in &scan.items {
        match dynamo::lock_item::parse_item(item) {
            TableItem::Lock(r) => records.push(*r),
            TableItem::Digest { .. } => {}
            TableItem::Unusable { reason } => warn!(%reason, "skipping an item that is not a lock"),
        }
    }
    let ns = source.namespace().unwrap_or_default();
    let name = source.name_any();
    let api: Api<StateLock> = Api::namespaced(ctx.client.clone(), &ns);
    let existing_objs = api
        .list(&ListParams::default().labels(&format!("{}={name}", reasons::SOURCE_LABEL)))
        .await
        .map_err(|error| SyncError::ListStateLocks { source_name: name.clone(), error })?
        .items;
    let existing: Vec<plan::ExistingLock> = existing_objs.iter().map(existing_lock).collect();
    let now = Timestamp::now();
    let p = plan::plan(&name, &records, &existing, now.as_nanosecond(), source.spec.expiry.stale_after.get().as_secs());
    execute(ctx, source, &api, &existing_objs, &p, now).await?;
    Ok(PassSummary { items: scan.items.len(), locks: i32::try_from(p.lock_count).unwrap_or(i32::MAX), pages: scan.pages })
}

fn existing_lock(o: &StateLock) -> plan::ExistingLock {
    let conditions = o
        .status
        .as_ref()
        .map(|s| s.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.message.clone())).collect())
        .unwrap_or_default();
    plan::ExistingLock {
        name: o.name_any(),
        uid: o.uid().unwrap_or_default(),
        spec: o.spec.clone(),
        conditions,
        created_at: o.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_nanosecond()),
    }
}

async fn execute(
    ctx: &Context,
    source: &LockSource,
    api: &Api<StateLock>,
    existing: &[StateLock],
    p: &plan::Plan,
    now: Timestamp,
) -> Result<(), SyncError> {
    let owner = source.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o.block_owner_deletion = Some(false);
        o
    });
    let pp = PatchParams::apply(reasons::MIRROR_MANAGER).force();
    for u in &p.upserts {
        let mut obj = existing.iter().find(|e| e.name_any() == u.name).cloned();
        if u.write_spec {
            let body = json!({
                "apiVersion": "statelock.dev/v1alpha1",
                "kind": "StateLock",
                "metadata": {"name": u.name, "labels": {reasons::SOURCE_LABEL: source.name_any()}, "ownerReferences": owner.iter().collect::<Vec<_>>()},
                "spec": u.spec,
            });
            obj = Some(
                api.patch(&u.name, &pp, &Patch::Apply(&body))
                    .await
                    .map_err(|error| SyncError::ApplyStateLock { name: u.name.clone(), error })?,
            );
        }
        let Some(current) = obj else { continue };
        if u.write_conditions {
            let old: &[Condition] = current.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
            let conditions: Vec<Condition> = u
                .conditions
                .iter()
                .map(|c| {
                    let kept = old.iter().find(|o| o.type_ == c.type_ && o.status == c.status).map(|o| o.last_transition_time.clone());
                    Condition {
                        type_: c.type_.into(),
                        status: c.status.into(),
                        reason: c.reason.into(),
                        message: c.message.clone(),
                        last_transition_time: kept.unwrap_or(Time(now)),
                        observed_generation: current.metadata.generation,
                    }
                })
                .collect();
            let body = json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock", "metadata": {"name": u.name}, "status": {"conditions": conditions}});
            api.patch_status(&u.name, &pp, &Patch::Apply(&body))
                .await
                .map_err(|error| SyncError::ApplyStateLock { name: u.name.clone(), error })?;
        }
        for e in &u.events {
            publish(ctx, &current, e.reason, e.warning, &e.note).await;
        }
    }
    for r in &p.removals {
        if let Some(obj) = existing.iter().find(|e| e.name_any() == r.name) {
            let held = r.held_for_secs.map(plan::human).unwrap_or_else(|| "an unknown time".into());
            publish(ctx, obj, reasons::LOCK_RELEASED, false, &format!("lock on {} released after {held}", r.lock_id)).await;
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(r.uid.clone()), resource_version: None }),
            ..DeleteParams::default()
        };
        match api.delete(&r.name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(error) => return Err(SyncError::DeleteStateLock { name: r.name.clone(), error }),
        }
    }
    for (name, lock_id) in &p.collisions {
        warn!(%name, %lock_id, "two LockIDs map to one StateLock name; the second is not mirrored");
        if let Some(obj) = existing.iter().find(|e| e.name_any() == *name) {
            publish(
                ctx,
                obj,
                reasons::LOCK_NAME_COLLISION,
                true,
                &format!("LockID {lock_id} maps to this object's name too and is not mirrored"),
            )
            .await;
        }
    }
    Ok(())
}

async fn publish(ctx: &Context, obj: &StateLock, reason: &str, warning: bool, note: &str) {
    let event = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(crate::dynamo::lock_item::truncate(note, 1024).to_owned()),
        action: "Mirror".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, reason, "failed to publish event");
    }
}

fn ready_status(source: &LockSource, ok: bool, reason: &str, message: String, locks: Option<i32>) -> LockSourceStatus {
    let old = source.status.clone().unwrap_or_default();
    let condition = Condition {
        type_: reasons::CONDITION_READY.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(Timestamp::now()),
        observed_generation: source.metadata.generation,
    };
    LockSourceStatus {
        observed_generation: source.metadata.generation,
        conditions: vec![condition],
        lock_count: locks.or(old.lock_count),
        last_sync_time: old.last_sync_time,
        sync_mode: Some(match source.spec.sync.mode {
            SyncMode::Streams => SyncMode::Streams,
            _ => SyncMode::Scan,
        }),
    }
}

/// Write the LockSource status when it changed; `lastSyncTime` alone is refreshed at most once a
/// minute, so that a quiet table costs one write a minute, not one per pass.
async fn write_source_status(
    ctx: &Context,
    source: &LockSource,
    mut status: LockSourceStatus,
    synced: bool,
    state: &mut SourceState,
) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let comparable = |s: &LockSourceStatus| {
        let mut c = s.clone();
        c.last_sync_time = None;
        for cond in &mut c.conditions {
            cond.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        c
    };
    let previous = state.last_status.as_ref();
    let unchanged = previous.is_some_and(|(p, _)| comparable(p) == comparable(&status));
    let sync_fresh = previous.is_some_and(|(_, at)| now.duration_since(*at).as_secs() < 60);
    if unchanged && (sync_fresh || !synced) {
        return Ok(());
    }
    if synced {
        status.last_sync_time = Some(Time(now));
    } else if let Some((p, _)) = previous {
        status.last_sync_time = p.last_sync_time.clone();
    }
    // Keep the transition time while the Ready status stays the same.
    if let Some((p, _)) = previous
        && let (Some(old), Some(new)) = (p.conditions.first(), status.conditions.first_mut())
        && old.status == new.status
    {
        new.last_transition_time = old.last_transition_time.clone();
    }
    let api: Api<LockSource> = Api::namespaced(ctx.client.clone(), &source.namespace().unwrap_or_default());
    let body =
        json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "LockSource", "metadata": {"name": source.name_any()}, "status": status});
    api.patch_status(&source.name_any(), &PatchParams::apply(reasons::MIRROR_MANAGER).force(), &Patch::Apply(&body)).await?;
    let written_at = if synced || previous.is_none() { now } else { previous.map_or(now, |p| p.1) };
    state.last_status = Some((status, written_at));
    Ok(())
}
