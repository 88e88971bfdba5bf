//! Which LockSources the operator serves, and with whose AWS identity. Pure.
//!
//! Anyone who may create a LockSource could otherwise make the operator mirror and release locks
//! in any table its own AWS identity reaches, and send requests signed with that identity to any
//! host named as `endpoint`. The administrator decides (operator flags, chart values):
//! - which namespaces may declare LockSources that use the operator's own identity (the default
//!   credential chain: environment, IRSA, instance profile); others must bring a credentials
//!   Secret of their own;
//! - which endpoints a LockSource may name at all. Without an `endpoint` a LockSource reaches
//!   the AWS regional endpoint, which is always allowed. The operator never signs a request for an
//!   endpoint outside the list, whatever credentials the LockSource brings.
//!
//! Every check here runs before a client is built ([`crate::dynamo::source_credentials`]), so the
//! mirror, the expiry controller and the gateway cannot bypass it.

use crate::crd::LockSource;

/// The administrator's tenancy settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenancyPolicy {
    /// Namespaces whose LockSources may use the operator's own AWS identity; `*` is every one.
    pub identity_namespaces: Vec<String>,
    /// Endpoints (`scheme://host[:port]`, port `*` for any) LockSources may name.
    pub allowed_endpoints: Vec<String>,
}

/// Why a LockSource is not served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "LockSource {namespace}/{name} names no credentials Secret, and LockSources in namespace {namespace} may not use the operator's own AWS identity (operator flag --aws-identity-namespaces); add credentialsSecretRef to spec.s3 and spec.dynamodb"
    )]
    OperatorIdentityNotAllowed { namespace: String, name: String },
    #[error(
        "LockSource {namespace}/{name} names endpoint {endpoint:?}, which is not in the operator's allow-list (operator flag --allowed-endpoints); the operator sends no request there"
    )]
    EndpointNotAllowed { namespace: String, name: String, endpoint: String },
    #[error("LockSource {namespace}/{name} is invalid: {problem}")]
    InvalidSpec { namespace: String, name: String, problem: String },
}

impl Refusal {
    /// The reason on the LockSource's Ready condition and in StateLock status messages.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OperatorIdentityNotAllowed { .. } => "OperatorIdentityNotAllowed",
            Self::EndpointNotAllowed { .. } => "EndpointNotAllowed",
            Self::InvalidSpec { .. } => "InvalidSpec",
        }
    }
}

/// `scheme://host[:port]` of a URL, lowercased, with the scheme's default port made explicit.
fn origin(url: &str) -> Option<(String, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal without a port: `[::1]`.
        Some((h, p)) if !p.contains(']') => (h, p),
        _ => (authority, default_port),
    };
    if host.is_empty() || port.is_empty() {
        return None;
    }
    Some((scheme, host.to_ascii_lowercase(), port.to_owned()))
}

impl TenancyPolicy {
    /// Whether a LockSource may be served, and so whether a client may be built for it.
    pub fn check(&self, source: &LockSource) -> Result<(), Refusal> {
        let namespace = source.metadata.namespace.clone().unwrap_or_default();
        let name = source.metadata.name.clone().unwrap_or_default();
        if let Some(problem) = source.spec.problems().into_iter().next() {
            return Err(Refusal::InvalidSpec { namespace, name, problem });
        }
        // Every part's endpoint must be allowed, and every part without a Secret of its own uses
        // the operator's identity.
        let parts = [
            source.spec.s3.as_ref().map(|s| (s.endpoint.as_deref(), s.credentials_secret_ref.is_some())),
            source.spec.dynamodb.as_ref().map(|d| (d.endpoint.as_deref(), d.credentials_secret_ref.is_some())),
        ];
        // The lock files' event queue is reached with the bucket's identity; AWS's own SQS
        // endpoint of the bucket's region needs no allow-listing, any other origin does.
        if let Some((s3, events)) = source.spec.s3.as_ref().and_then(|s| s.events.as_ref().map(|e| (s, e)))
            && !events.is_aws_endpoint(&s3.region)
        {
            let endpoint = events.endpoint().unwrap_or(&events.queue_url);
            if !self.endpoint_allowed(endpoint) {
                return Err(Refusal::EndpointNotAllowed { namespace, name, endpoint: endpoint.to_owned() });
            }
        }
        for (endpoint, has_secret) in parts.into_iter().flatten() {
            if let Some(endpoint) = endpoint
                && !self.endpoint_allowed(endpoint)
            {
                return Err(Refusal::EndpointNotAllowed { namespace, name, endpoint: endpoint.to_owned() });
            }
            if !has_secret && !self.identity_namespaces.iter().any(|n| n == "*" || *n == namespace) {
                return Err(Refusal::OperatorIdentityNotAllowed { namespace, name });
            }
        }
        Ok(())
    }

    /// Whether `endpoint` is on the allow-list.
    pub fn endpoint_allowed(&self, endpoint: &str) -> bool {
        let Some((scheme, host, port)) = origin(endpoint) else { return false };
        self.allowed_endpoints.iter().filter_map(|a| origin(a)).any(|(s, h, p)| s == scheme && h == host && (p == "*" || p == port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::LockSourceSpec;

    fn source(ns: &str, endpoint: Option<&str>, secret: bool) -> LockSource {
        let mut spec = serde_json::json!({"dynamodb": {"tableName": "tf-locks", "region": "us-east-1"}});
        if let Some(e) = endpoint {
            spec["dynamodb"]["endpoint"] = e.into();
        }
        if secret {
            spec["dynamodb"]["credentialsSecretRef"] = serde_json::json!({"name": "creds"});
        }
        let spec: LockSourceSpec = serde_json::from_value(spec).expect("spec");
        let mut s = LockSource::new("locks", spec);
        s.metadata.namespace = Some(ns.into());
        s
    }

    fn policy() -> TenancyPolicy {
        TenancyPolicy {
            identity_namespaces: vec!["statelock".into()],
            allowed_endpoints: vec!["https://dynamodb.internal.example:8443".into(), "http://127.0.0.1:*".into()],
        }
    }

    #[test]
    fn the_operators_identity_only_where_the_administrator_allows_it() {
        assert_eq!(policy().check(&source("statelock", None, false)), Ok(()));
        assert_eq!(policy().check(&source("team-a", None, true)), Ok(()), "a Secret of its own");
        assert_eq!(policy().check(&source("team-a", None, false)).map_err(|e| e.reason()), Err("OperatorIdentityNotAllowed"));
        let all = TenancyPolicy { identity_namespaces: vec!["*".into()], ..policy() };
        assert_eq!(all.check(&source("team-a", None, false)), Ok(()));
    }

    #[test]
    fn endpoints_only_from_the_allow_list_whatever_the_credentials() {
        for (endpoint, ok) in [
            ("https://dynamodb.internal.example:8443", true),
            ("https://DYNAMODB.internal.example:8443/", true),
            ("https://dynamodb.internal.example", false),
            ("http://dynamodb.internal.example:8443", false),
            ("http://127.0.0.1:4566", true),
            ("http://127.0.0.1", true),
            ("http://127.0.0.2:4566", false),
            ("https://attacker.example", false),
            ("https://dynamodb.internal.example:8443@attacker.example", false),
            ("https://attacker.example/https://dynamodb.internal.example:8443", false),
            ("not a url", false),
        ] {
            let got = policy().check(&source("statelock", Some(endpoint), true));
            assert_eq!(got.is_ok(), ok, "{endpoint}: {got:?}");
        }
        assert!(!TenancyPolicy::default().endpoint_allowed("http://127.0.0.1:8000"), "no endpoint by default");
    }

    #[test]
    fn every_part_of_a_lock_source_is_checked() {
        let with_s3 = |endpoint: &str, secret: bool| {
            let mut s = source("team-a", None, true);
            let mut part = serde_json::json!({"bucket": "tfstate", "region": "us-east-1", "endpoint": endpoint});
            if secret {
                part["credentialsSecretRef"] = serde_json::json!({"name": "s3-creds"});
            }
            s.spec.s3 = Some(serde_json::from_value(part).expect("s3 part"));
            s
        };
        assert_eq!(policy().check(&with_s3("http://127.0.0.1:9000", true)), Ok(()));
        assert_eq!(
            policy().check(&with_s3("https://attacker.example", true)).map_err(|e| e.reason()),
            Err("EndpointNotAllowed"),
            "the bucket's endpoint is checked like the table's"
        );
        assert_eq!(
            policy().check(&with_s3("http://127.0.0.1:9000", false)).map_err(|e| e.reason()),
            Err("OperatorIdentityNotAllowed"),
            "a bucket without a Secret of its own would use the operator's identity"
        );
        let mut s3_only = with_s3("http://127.0.0.1:9000", true);
        s3_only.spec.dynamodb = None;
        assert_eq!(policy().check(&s3_only), Ok(()));
        s3_only.spec.s3 = None;
        assert_eq!(policy().check(&s3_only).map_err(|e| e.reason()), Err("InvalidSpec"), "a LockSource with no store");
    }
}
