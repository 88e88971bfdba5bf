//! The static credentials a LockSource references, read from its Secret.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::StaticCredentials;
use crate::crd::LockSource;

/// `None` when the LockSource uses the default chain; an error says which Secret or key is missing.
pub async fn for_source(client: &Client, source: &LockSource) -> Result<Option<StaticCredentials>, String> {
    let Some(r) = &source.spec.dynamodb.credentials_secret_ref else { return Ok(None) };
    let ns = source.namespace().unwrap_or_default();
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(&r.name)
        .await
        .map_err(|e| format!("failed to read credentials Secret {ns}/{}: {e}", r.name))?;
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(&v.0).trim().to_owned());
    let missing = |k: &str| format!("failed to read credentials Secret {ns}/{}: key {k} is missing", r.name);
    Ok(Some(StaticCredentials {
        access_key_id: get(&r.access_key_id_key).ok_or_else(|| missing(&r.access_key_id_key))?,
        secret_access_key: get(&r.secret_access_key_key).ok_or_else(|| missing(&r.secret_access_key_key))?,
        session_token: get(&r.session_token_key),
    }))
}
