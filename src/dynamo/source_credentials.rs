//! The credentials a LockSource may be served with: the administrator's tenancy policy first
//! ([`crate::tenancy`]), then the static credentials of its Secret, if it names one.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::StaticCredentials;
use crate::{crd::LockSource, tenancy::TenancyPolicy};

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

/// `None` when the LockSource uses the operator's default chain (only where the policy allows
/// it); an error says which rule refused it, or which Secret or key is missing.
pub async fn for_source(
    client: &Client,
    policy: &TenancyPolicy,
    source: &LockSource,
) -> Result<Option<StaticCredentials>, SourceAccessError> {
    policy.check(source)?;
    let Some(r) = &source.spec.dynamodb.credentials_secret_ref else { return Ok(None) };
    let ns = source.namespace().unwrap_or_default();
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(&r.name)
        .await
        .map_err(|e| SourceAccessError::Secret(format!("failed to read credentials Secret {ns}/{}: {e}", r.name)))?;
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(&v.0).trim().to_owned());
    let missing = |k: &str| SourceAccessError::Secret(format!("failed to read credentials Secret {ns}/{}: key {k} is missing", r.name));
    Ok(Some(StaticCredentials {
        access_key_id: get(&r.access_key_id_key).ok_or_else(|| missing(&r.access_key_id_key))?,
        secret_access_key: get(&r.secret_access_key_key).ok_or_else(|| missing(&r.secret_access_key_key))?,
        session_token: get(&r.session_token_key),
    }))
}
