//! One set of AWS SDK clients per LockSource, shared by the mirror, the expiry controller and the
//! gateway (one connection pool per table), rebuilt when the LockSource's spec or its
//! credentials change.
//!
//! Credentials are read (with the tenancy check) at most once per [`CREDENTIALS_REFRESH`] per
//! LockSource, so that the gateway's request path reads no Secret and a rotated Secret is used
//! within that time by every component.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use aws_smithy_types::retry::RetryConfig;
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};

use crate::{
    crd::LockSource,
    dynamo::{
        StaticCredentials, sdk_config,
        source_credentials::{self, SourceAccessError},
    },
    tenancy::TenancyPolicy,
};

/// How long credentials read from a Secret are used before they are read again.
pub const CREDENTIALS_REFRESH: Duration = Duration::from_secs(60);

/// The clients of one LockSource, all built from one SDK configuration.
#[derive(Debug)]
pub struct SourceSdk {
    /// Retries as the SDK does by default: the mirror and the expiry controller.
    pub table: aws_sdk_dynamodb::Client,
    pub streams: aws_sdk_dynamodbstreams::Client,
    /// One attempt per call, for the gateway: its callers (Terraform's own SDK) retry throttling
    /// and server errors themselves, so retrying here too would multiply their attempts and hide
    /// DynamoDB's answer from them.
    pub passthrough: aws_sdk_dynamodb::Client,
    /// The lock files' bucket, when the LockSource names one (`spec.s3`).
    pub s3: Option<aws_sdk_s3::Client>,
    /// The lock files' event queue, when the LockSource names one (`spec.s3.events`): the
    /// bucket's region and credentials, the queue URL's origin as endpoint.
    pub sqs: Option<aws_sdk_sqs::Client>,
    /// Whether the bucket's endpoint honours `If-Match` on DeleteObject (probed before the first
    /// release through these clients).
    pub s3_if_match: Arc<tokio::sync::OnceCell<bool>>,
}

struct Entry {
    /// The LockSource's UID and generation: another spec (or another LockSource of the same
    /// name) gets new clients.
    spec: String,
    /// SHA-256 of the credentials of every part (never kept in clear outside the SDK).
    credentials: String,
    read_at: Instant,
    sdk: Arc<SourceSdk>,
}

/// The registry.
#[derive(Default)]
pub struct SourceClients {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

impl SourceClients {
    /// The clients of `source`, after the tenancy check; the Secret is read when the cached
    /// credentials are older than [`CREDENTIALS_REFRESH`] or the spec changed.
    pub async fn get(&self, client: &Client, tenancy: &TenancyPolicy, source: &LockSource) -> Result<Arc<SourceSdk>, SourceAccessError> {
        let key = (source.namespace().unwrap_or_default(), source.name_any());
        let spec = format!("{}/{}", source.uid().unwrap_or_default(), source.metadata.generation.unwrap_or_default());
        if let Some(e) = self.lock().get(&key)
            && e.spec == spec
            && e.read_at.elapsed() < CREDENTIALS_REFRESH
        {
            return Ok(e.sdk.clone());
        }
        let creds = source_credentials::for_source(client, tenancy, source).await?;
        let credentials = format!("{}/{}", fingerprint(creds.s3.as_ref()), fingerprint(creds.dynamodb.as_ref()));
        if let Some(e) = self.lock().get_mut(&key)
            && e.spec == spec
            && e.credentials == credentials
        {
            e.read_at = Instant::now();
            return Ok(e.sdk.clone());
        }
        // The DynamoDB clients are built for an S3-only LockSource too (with the bucket's region),
        // but nothing calls them: the stores are chosen by the spec (`lock_store::stores_of`).
        let (region, endpoint) = match (&source.spec.dynamodb, &source.spec.s3) {
            (Some(d), _) => (d.region.as_str(), d.endpoint.as_deref()),
            (None, Some(s)) => (s.region.as_str(), None),
            (None, None) => ("us-east-1", None),
        };
        let config = sdk_config(region, endpoint, creds.dynamodb).await;
        let sqs = match source.spec.s3.as_ref().and_then(|s| s.events.as_ref().map(|e| (s, e))) {
            Some((s, events)) => {
                let c = sdk_config(&s.region, events.endpoint(), creds.s3.clone()).await;
                Some(crate::s3::events::queue_client(&c))
            }
            None => None,
        };
        let s3 = match &source.spec.s3 {
            Some(s) => Some(crate::s3::client(&s.region, s.endpoint.as_deref(), creds.s3).await),
            None => None,
        };
        let sdk = Arc::new(SourceSdk {
            table: aws_sdk_dynamodb::Client::new(&config),
            streams: aws_sdk_dynamodbstreams::Client::new(&config),
            passthrough: aws_sdk_dynamodb::Client::from_conf(
                aws_sdk_dynamodb::config::Builder::from(&config).retry_config(RetryConfig::disabled()).build(),
            ),
            s3,
            sqs,
            s3_if_match: Arc::default(),
        });
        // Another caller may have built clients for the same spec and credentials meanwhile:
        // keep those, so that every component holds the same clients (the mirror reopens its
        // stream when its clients change).
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(&key)
            && e.spec == spec
            && e.credentials == credentials
        {
            e.read_at = Instant::now();
            return Ok(e.sdk.clone());
        }
        entries.insert(key, Entry { spec, credentials, read_at: Instant::now(), sdk: sdk.clone() });
        Ok(sdk)
    }

    /// Drop the clients of LockSources that no longer exist.
    pub fn retain(&self, exists: impl Fn(&str, &str) -> bool) {
        self.lock().retain(|(ns, name), _| exists(ns, name));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn fingerprint(creds: Option<&StaticCredentials>) -> String {
    let Some(c) = creds else { return "default-chain".into() };
    let mut h = Sha256::new();
    for part in [Some(c.access_key_id.as_str()), Some(c.secret_access_key.as_str()), c.session_token.as_deref()] {
        match part {
            Some(p) => {
                h.update([1]);
                h.update(p.len().to_le_bytes());
                h.update(p.as_bytes());
            }
            None => h.update([0]),
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_fingerprints_change_with_any_part_and_are_unambiguous() {
        let c = |k: &str, s: &str, t: Option<&str>| StaticCredentials {
            access_key_id: k.into(),
            secret_access_key: s.into(),
            session_token: t.map(Into::into),
        };
        let base = fingerprint(Some(&c("AKIA1", "secret", None)));
        assert_eq!(base, fingerprint(Some(&c("AKIA1", "secret", None))));
        assert_ne!(base, fingerprint(Some(&c("AKIA1", "secreT", None))), "a rotated secret of the same length");
        assert_ne!(base, fingerprint(Some(&c("AKIA1", "secret", Some("")))), "an empty session token is not no token");
        assert_ne!(fingerprint(Some(&c("AKIA1s", "ecret", None))), base, "parts cannot slide into each other");
        assert_ne!(fingerprint(None), base);
    }
}
