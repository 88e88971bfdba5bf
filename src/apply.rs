//! `statelock apply-lock-source`: the Helm chart's post-install and post-upgrade hook for the
//! default LockSource.
//!
//! The LockSource cannot be an ordinary chart resource: on a fresh install Helm maps every
//! resource before it applies any, and the kind is not served until the chart's own CRDs are.
//! Nor can it be a hook resource itself: Helm re-creates hook resources on every upgrade, and a
//! re-created LockSource has a new UID, so the garbage collector deletes every StateLock it owns
//! (and the mirror writes them anew, with fresh `LockAcquired` events and reset timers). This
//! command runs in a hook Job instead: it creates the LockSource when there is none, and otherwise
//! sets the existing one's spec to the one given, keeping its UID and with it every StateLock.

use std::time::Duration;

use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, PostParams},
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{cli::ApplyLockSourceArgs, crd::LockSource, errors::ErrorCategory};

/// The field manager of the chart's hook.
pub const CHART_MANAGER: &str = "statelock-chart";

/// Why `statelock apply-lock-source` failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the LockSource manifest does not parse: {0}")]
    Manifest(#[source] serde_saphyr::Error),
    #[error("the LockSource manifest is a {0}, not a statelock.dev/v1alpha1 LockSource")]
    NotALockSource(String),
    #[error("the LockSource manifest has no metadata.name")]
    NoName,
    #[error("failed to load the Kubernetes client configuration: {0}")]
    Config(#[source] kube::config::InferConfigError),
    #[error("failed to build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("the API server refused LockSource {namespace}/{name}: {source}")]
    Refused { namespace: String, name: String, source: kube::Error },
    #[error("LockSource {namespace}/{name} was not applied within {timeout:?}; last error: {last}")]
    TimedOut { namespace: String, name: String, timeout: Duration, last: String },
}

/// What the apply did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Created { uid: String },
    Updated { uid: String },
}

/// The LockSource the manifest describes, checked to be one.
pub fn parse_manifest(text: &str) -> Result<LockSource, ApplyError> {
    #[derive(serde::Deserialize)]
    struct Types {
        #[serde(rename = "apiVersion", default)]
        api_version: String,
        #[serde(default)]
        kind: String,
    }
    let types: Types = serde_saphyr::from_str(text).map_err(ApplyError::Manifest)?;
    if types.api_version != "statelock.dev/v1alpha1" || types.kind != "LockSource" {
        return Err(ApplyError::NotALockSource(format!("{} {}", types.api_version, types.kind).trim().to_owned()));
    }
    let source: LockSource = serde_saphyr::from_str(text).map_err(ApplyError::Manifest)?;
    if source.metadata.name.as_deref().unwrap_or_default().is_empty() {
        return Err(ApplyError::NoName);
    }
    Ok(source)
}

/// `statelock apply-lock-source`.
pub async fn apply_lock_source(args: ApplyLockSourceArgs) -> Result<(), ApplyError> {
    let desired = parse_manifest(&args.manifest)?;
    let client = Client::try_from(kube::Config::infer().await.map_err(ApplyError::Config)?).map_err(ApplyError::Client)?;
    let namespace = desired.namespace().unwrap_or_else(|| client.default_namespace().to_owned());
    match apply(&client, &namespace, &desired, args.timeout).await? {
        Applied::Created { uid } => info!(namespace, name = desired.name_any(), uid, "created the LockSource"),
        Applied::Updated { uid } => {
            info!(namespace, name = desired.name_any(), uid, "updated the LockSource's spec; its StateLocks are kept")
        }
    }
    Ok(())
}

/// Create `desired` in `namespace`, or set the existing LockSource's spec and labels to its own,
/// keeping everything else (UID, status, annotations other than Helm's hook ones). Retries while
/// the kind is not served (404 on create), on conflicts and on transient errors, until `timeout`.
pub async fn apply(client: &Client, namespace: &str, desired: &LockSource, timeout: Duration) -> Result<Applied, ApplyError> {
    let api: Api<LockSource> = Api::namespaced(client.clone(), namespace);
    let name = desired.name_any();
    let params = PostParams { field_manager: Some(CHART_MANAGER.into()), ..PostParams::default() };
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = match api.get_opt(&name).await {
            Ok(None) => {
                api.create(&params, &fresh(desired, namespace)).await.map(|s| Applied::Created { uid: s.uid().unwrap_or_default() })
            }
            Ok(Some(current)) => {
                let owners = current.owner_references().to_vec();
                let replaced = api.replace(&name, &params, &updated(current, desired)).await;
                if replaced.is_ok() {
                    for owner in owners {
                        warn!(namespace, name, kind = %owner.kind, owner = %owner.name, "removed an owner of the LockSource that the chart did not set");
                    }
                }
                replaced.map(|s| Applied::Updated { uid: s.uid().unwrap_or_default() })
            }
            Err(e) => Err(e),
        };
        let err = match attempt {
            Ok(applied) => return Ok(applied),
            Err(e) => e,
        };
        // A 404 on create is the kind not being served yet (the CRD is being established); a 409
        // is a race with another writer, or a create that lost to one: read again.
        let again = matches!(&err, kube::Error::Api(s) if s.code == 404) || ErrorCategory::of_kube(&err).is_transient();
        if !again {
            return Err(ApplyError::Refused { namespace: namespace.to_owned(), name, source: err });
        }
        if Instant::now() >= deadline {
            return Err(ApplyError::TimedOut { namespace: namespace.to_owned(), name, timeout, last: err.to_string() });
        }
        warn!(namespace, name, error = %err, "LockSource not applied yet; trying again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A new LockSource: the manifest's name, labels, annotations and spec, in `namespace`.
fn fresh(desired: &LockSource, namespace: &str) -> LockSource {
    LockSource {
        metadata: ObjectMeta {
            name: desired.metadata.name.clone(),
            namespace: Some(namespace.to_owned()),
            labels: desired.metadata.labels.clone(),
            annotations: desired.metadata.annotations.clone(),
            ..ObjectMeta::default()
        },
        spec: desired.spec.clone(),
        status: None,
    }
}

/// The existing LockSource with the manifest's spec and labels; the annotations Helm left on a
/// LockSource that earlier charts made a hook resource are dropped, and so are owner references:
/// the chart's LockSource has no owner, and one set by someone who created the object before the
/// chart did could have it (and every StateLock it owns) garbage-collected later.
fn updated(mut current: LockSource, desired: &LockSource) -> LockSource {
    current.spec = desired.spec.clone();
    current.metadata.owner_references = None;
    current.metadata.labels.get_or_insert_default().extend(desired.metadata.labels.clone().unwrap_or_default());
    let annotations = current.metadata.annotations.get_or_insert_default();
    annotations.retain(|k, _| !k.starts_with("helm.sh/hook"));
    annotations.extend(desired.metadata.annotations.clone().unwrap_or_default());
    // The status subresource ignores a status sent to the main resource; sending none is plainer.
    current.status = None;
    current.metadata.managed_fields = None;
    current
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const MANIFEST: &str = "apiVersion: statelock.dev/v1alpha1\nkind: LockSource\nmetadata:\n  name: terraform-locks\n  labels: {team: platform}\nspec:\n  dynamodb: {tableName: tf-locks, region: eu-west-1}\n";

    #[test]
    fn a_manifest_must_be_a_named_lock_source() {
        let s = parse_manifest(MANIFEST).expect("a LockSource");
        assert_eq!(s.name_any(), "terraform-locks");
        assert_eq!(s.spec.dynamodb.as_ref().map(|d| d.table_name.as_str()), Some("tf-locks"));
        let json = r#"{"apiVersion":"statelock.dev/v1alpha1","kind":"LockSource","metadata":{"name":"x"},"spec":{"dynamodb":{"tableName":"t","region":"r"}}}"#;
        assert!(parse_manifest(json).is_ok(), "JSON is YAML");
        assert!(
            matches!(parse_manifest(&MANIFEST.replace("kind: LockSource", "kind: StateLock")), Err(ApplyError::NotALockSource(k)) if k.ends_with("StateLock"))
        );
        assert!(matches!(parse_manifest(&MANIFEST.replace("statelock.dev/v1alpha1", "v1")), Err(ApplyError::NotALockSource(_))));
        assert!(matches!(parse_manifest(&MANIFEST.replace("name: terraform-locks", "name: ''")), Err(ApplyError::NoName)));
        assert!(matches!(parse_manifest("spec: [1, 2"), Err(ApplyError::Manifest(_))));
        assert!(matches!(parse_manifest(&MANIFEST.replace("tableName: tf-locks", "tableName: [1]")), Err(ApplyError::Manifest(_))));
    }

    #[test]
    fn an_update_keeps_identity_status_and_foreign_metadata_and_drops_helms_hook_annotations_and_owners() {
        let desired = parse_manifest(MANIFEST).expect("a LockSource");
        let mut current = parse_manifest(&MANIFEST.replace("tf-locks", "old-table")).expect("a LockSource");
        current.metadata.uid = Some("uid-1".into());
        current.metadata.resource_version = Some("7".into());
        current.metadata.finalizers = Some(vec!["example.com/keep".into()]);
        current.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "someone-elses".into(),
            uid: "uid-9".into(),
            ..Default::default()
        }]);
        current.metadata.labels = Some(BTreeMap::from([("app".into(), "x".into()), ("team".into(), "old".into())]));
        current.metadata.annotations = Some(BTreeMap::from([
            ("helm.sh/hook".into(), "post-install,post-upgrade".into()),
            ("helm.sh/hook-delete-policy".into(), "before-hook-creation".into()),
            ("note".into(), "kept".into()),
        ]));
        let u = updated(current, &desired);
        assert_eq!(u.metadata.uid.as_deref(), Some("uid-1"));
        assert_eq!(u.metadata.resource_version.as_deref(), Some("7"), "a replace is conditioned on what was read");
        assert_eq!(u.spec.dynamodb.as_ref().map(|d| d.table_name.as_str()), Some("tf-locks"));
        let labels = u.metadata.labels.expect("labels");
        assert_eq!((labels["app"].as_str(), labels["team"].as_str()), ("x", "platform"));
        let annotations = u.metadata.annotations.expect("annotations");
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["note"]);
        assert_eq!(u.metadata.owner_references, None, "an owner set before the chart could have the LockSource collected");
        assert_eq!(u.metadata.finalizers, Some(vec!["example.com/keep".to_owned()]), "a finalizer only delays a deletion");
    }
}
