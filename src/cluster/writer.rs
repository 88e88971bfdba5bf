//! The one StateLock writer: every create, status write, annotation removal and delete of a
//! StateLock, and every event about one, goes through here, for the mirror, the expiry
//! controller and the gateway alike. Writes are server-side applies under the caller's field
//! manager; deletes carry the UID precondition, so that a StateLock re-created under the same
//! name is never deleted by a decision about its predecessor.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::{Value, json};
use tracing::warn;

use crate::{
    crd::{LockSource, StateLock, StateLockSpec},
    lock_record::truncate,
    reasons,
};

/// The longest event note published.
const MAX_NOTE_BYTES: usize = 1024;

/// Who writes, for events' `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    Mirror,
    Expire,
    Gateway,
}

impl Writer {
    fn action(self) -> &'static str {
        match self {
            Self::Mirror => "Mirror",
            Self::Expire => "Expire",
            Self::Gateway => "Gateway",
        }
    }
}

/// Writes StateLocks and publishes events about them.
#[derive(Clone)]
pub struct LockWriter {
    client: Client,
    recorder: Recorder,
    writer: Writer,
    /// Who [`LockWriter::publish_new`] reports as; without it, it publishes through the recorder.
    reporter: Option<Reporter>,
}

impl LockWriter {
    pub fn new(client: Client, recorder: Recorder, writer: Writer) -> Self {
        Self { client, recorder, writer, reporter: None }
    }

    /// The same writer, able to publish events of their own ([`LockWriter::publish_new`]) as
    /// `reporter` (the recorder's reporter).
    pub fn with_reporter(self, reporter: Reporter) -> Self {
        Self { reporter: Some(reporter), ..self }
    }

    fn api(&self, namespace: &str) -> Api<StateLock> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Create or update the spec of `name` in `source`'s namespace (server-side apply as the
    /// mirror's field manager, which the gateway shares so that neither fights the other over
    /// it), labelled with its LockSource and owned by it (not controlled: deleting a LockSource
    /// removes its StateLocks, nothing more).
    pub async fn apply_spec(&self, source: &LockSource, name: &str, spec: &StateLockSpec) -> kube::Result<StateLock> {
        let owner = source.controller_owner_ref(&()).map(|mut o| {
            o.controller = Some(false);
            o.block_owner_deletion = Some(false);
            o
        });
        let body = json!({
            "apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock",
            "metadata": {"name": name, "labels": {reasons::SOURCE_LABEL: source.name_any()}, "ownerReferences": owner.iter().collect::<Vec<_>>()},
            "spec": spec,
        });
        self.api(&source.namespace().unwrap_or_default())
            .patch(name, &PatchParams::apply(reasons::MIRROR_MANAGER).force(), &Patch::Apply(&body))
            .await
            .map(without_managed_fields)
    }

    /// Apply the status fields `manager` owns (`status` is the status object).
    pub async fn apply_status(&self, namespace: &str, name: &str, manager: &str, status: Value) -> kube::Result<StateLock> {
        let body = json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock", "metadata": {"name": name}, "status": status});
        self.api(namespace).patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&body)).await.map(without_managed_fields)
    }

    /// Remove the annotations `keys`, but only while each still has the value `lock` (as read)
    /// has, or is still absent: a JSON Patch of `test` operations, then the removals. Returns
    /// false when one changed meanwhile (a newer request, say) and nothing was removed.
    pub async fn remove_annotations_as_read(&self, lock: &StateLock, keys: &[&str]) -> kube::Result<bool> {
        let read = lock.annotations();
        let pointer = |k: &str| format!("/metadata/annotations/{}", k.replace('~', "~0").replace('/', "~1"));
        let mut ops: Vec<Value> = keys.iter().map(|k| json!({"op": "test", "path": pointer(k), "value": read.get(*k)})).collect();
        ops.extend(keys.iter().filter(|k| read.contains_key(**k)).map(|k| json!({"op": "remove", "path": pointer(k)})));
        if ops.len() == keys.len() {
            return Ok(true);
        }
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).map_err(kube::Error::SerdeError)?;
        match self
            .api(&lock.namespace().unwrap_or_default())
            .patch(&lock.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => Ok(true),
            // A failed test (422), or the StateLock gone (404).
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Delete exactly the StateLock with `uid`; gone already (or replaced: the precondition
    /// fails with 409) is fine.
    pub async fn delete(&self, namespace: &str, name: &str, uid: &str) -> kube::Result<()> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
            ..DeleteParams::default()
        };
        match self.api(namespace).delete(name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Publish an event about a StateLock (and the same on `also`, a pod it concerns); failures
    /// are logged, never fatal. A lock's `LockAcquired` and `LockReleased` (each about one lock
    /// instance, with a note of its own) are published as events of their own when the writer
    /// has a reporter: through the recorder, a second one within minutes would only bump the
    /// first one's count and hide its note, and the recorder would keep every one of them in
    /// memory for six minutes (10,000 at a start over 10,000 locks).
    pub async fn publish(&self, lock: &StateLock, reason: &str, warning: bool, note: &str, also: Option<ObjectReference>) {
        if let Some(reporter) = &self.reporter
            && matches!(reason, reasons::LOCK_ACQUIRED | reasons::LOCK_RELEASED)
        {
            self.create_event(reporter, lock, reason, warning, note).await;
        } else {
            self.publish_on(&lock.object_ref(&()), reason, warning, note).await;
        }
        if let Some(other) = also {
            self.publish_on(&other, reason, warning, note).await;
        }
    }

    /// Publish an event about any object.
    pub async fn publish_on(&self, regarding: &ObjectReference, reason: &str, warning: bool, note: &str) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(truncate(note, MAX_NOTE_BYTES).to_owned()),
            action: self.writer.action().into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            warn!(error = %e, reason, "failed to publish event");
        }
    }

    /// Publish an event about a StateLock as an event of its own: never folded into the series
    /// of an earlier event with the same reason (the recorder keeps a series' first note, so a
    /// note that must be read, such as an answer to a request, needs its own event).
    pub async fn publish_new(&self, lock: &StateLock, reason: &str, warning: bool, note: &str) {
        match &self.reporter {
            Some(reporter) => self.create_event(reporter, lock, reason, warning, note).await,
            None => self.publish_on(&lock.object_ref(&()), reason, warning, note).await,
        }
    }

    /// A new event about `lock`, reported as `reporter`, created as it is (no series, no cache).
    async fn create_event(&self, reporter: &Reporter, lock: &StateLock, reason: &str, warning: bool, note: &str) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let namespace = lock.namespace().unwrap_or_default();
        let event = k8s_openapi::api::events::v1::Event {
            metadata: kube::api::ObjectMeta {
                namespace: Some(namespace.clone()),
                name: Some(format!("{}.{:x}", lock.name_any(), now.as_nanosecond())),
                ..Default::default()
            },
            action: Some(self.writer.action().into()),
            event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now)),
            note: Some(truncate(note, MAX_NOTE_BYTES).to_owned()),
            reason: Some(reason.into()),
            regarding: Some(lock.object_ref(&())),
            reporting_controller: Some(reporter.controller.clone()),
            reporting_instance: Some(reporter.instance.clone().unwrap_or_else(|| reporter.controller.clone())),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            ..Default::default()
        };
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(e) = events.create(&kube::api::PostParams::default(), &event).await {
            warn!(error = %e, reason, "failed to publish event");
        }
    }
}

/// A written StateLock as callers keep it (the mirror holds its recent writes until the cache
/// shows them): without `managedFields`, which are most of a server-side-applied object's size
/// and which nothing here reads.
fn without_managed_fields(mut lock: StateLock) -> StateLock {
    lock.metadata.managed_fields = None;
    lock
}
