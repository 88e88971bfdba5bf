//! The credentials a LockSource may be served with: the administrator's tenancy policy first
//! ([`crate::tenancy`]), then the static credentials of its Secret, if it names one.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::StaticCredentials;
use crate::{
    crd::{CredentialsSecretRef, LockSource},
    tenancy::TenancyPolicy,
};

/// Why no client may be built for a LockSource.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SourceAccessError {
    #[error(transparent)]
    Refused(#[from] crate::tenancy::Refusal),
    #[error("{0}")]
    Secret(String),
}

impl SourceAccessError {
    pub fn category(&self) -> crate::errors::ErrorCategory {
        match self {
            Self::Refused(_) => crate::errors::ErrorCategory::SourceRefused,
            Self::Secret(_) => crate::errors::ErrorCategory::CredentialsUnavailable,
        }
    }

    /// The reason on the LockSource's Ready condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Refused(r) => r.reason(),
            Self::Secret(_) => "CredentialsUnavailable",
        }
    }
}

/// The credentials of each part of a LockSource (`None`: the operator's default chain).
#[derive(Clone, Debug, Default)]
pub struct PartCredentials {
    pub s3: Option<StaticCredentials>,
    pub dynamodb: Option<StaticCredentials>,
}

/// The credentials of every part of `source`, after the tenancy check. `None` for a part that
/// uses the operator's default chain (only where the policy allows it); an error says which rule
/// refused it, or which Secret or key is missing.
pub async fn for_source(client: &Client, policy: &TenancyPolicy, source: &LockSource) -> Result<PartCredentials, SourceAccessError> {
    policy.check(source)?;
    let ns = source.namespace().unwrap_or_default();
    let mut out = PartCredentials::default();
    if let Some(r) = source.spec.s3.as_ref().and_then(|s| s.credentials_secret_ref.as_ref()) {
        out.s3 = Some(read_secret(client, &ns, r).await?);
    }
    if let Some(r) = source.spec.dynamodb.as_ref().and_then(|d| d.credentials_secret_ref.as_ref()) {
        out.dynamodb = Some(read_secret(client, &ns, r).await?);
    }
    Ok(out)
}

async fn read_secret(client: &Client, ns: &str, r: &CredentialsSecretRef) -> Result<StaticCredentials, SourceAccessError> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&r.name)
        .await
        .map_err(|e| SourceAccessError::Secret(format!("failed to read credentials Secret {ns}/{}: {e}", r.name)))?;
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(&v.0).trim().to_owned());
    let missing = |k: &str| SourceAccessError::Secret(format!("failed to read credentials Secret {ns}/{}: key {k} is missing", r.name));
    Ok(StaticCredentials {
        access_key_id: get(&r.access_key_id_key).ok_or_else(|| missing(&r.access_key_id_key))?,
        secret_access_key: get(&r.secret_access_key_key).ok_or_else(|| missing(&r.secret_access_key_key))?,
        session_token: get(&r.session_token_key),
    })
}
