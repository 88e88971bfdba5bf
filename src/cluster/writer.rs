//! The one StateLock writer: every create, status write, annotation removal and delete of a
//! StateLock, and every event about one, goes through here, for the mirror, the expiry
//! controller and the gateway alike. Writes are server-side applies under the caller's field
//! manager; deletes carry the UID precondition, so that a StateLock re-created under the same
//! name is never deleted by a decision about its predecessor.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::events::{Event, EventType, Recorder},
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
}

impl LockWriter {
    pub fn new(client: Client, recorder: Recorder, writer: Writer) -> Self {
        Self { client, recorder, writer }
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
    }

    /// Apply the status fields `manager` owns (`status` is the status object).
    pub async fn apply_status(&self, namespace: &str, name: &str, manager: &str, status: Value) -> kube::Result<StateLock> {
        let body = json!({"apiVersion": "statelock.dev/v1alpha1", "kind": "StateLock", "metadata": {"name": name}, "status": status});
        self.api(namespace).patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&body)).await
    }

    /// Remove annotations (a consumed request).
    pub async fn remove_annotations(&self, lock: &StateLock, keys: &[&str]) -> kube::Result<()> {
        let nulls: serde_json::Map<String, Value> = keys.iter().map(|k| ((*k).to_owned(), Value::Null)).collect();
        let patch = json!({"metadata": {"annotations": nulls}});
        self.api(&lock.namespace().unwrap_or_default()).patch(&lock.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
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
    /// are logged, never fatal.
    pub async fn publish(&self, lock: &StateLock, reason: &str, warning: bool, note: &str, also: Option<ObjectReference>) {
        self.publish_on(&lock.object_ref(&()), reason, warning, note).await;
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
}
