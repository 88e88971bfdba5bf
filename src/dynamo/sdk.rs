//! The one place SDK clients are built.

use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_dynamodb::config::Credentials;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

/// Static credentials, e.g. from a LockSource's Secret.
#[derive(Clone, Debug)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// The SDK configuration for one table's region and endpoint.
///
/// Without static credentials it uses the default chain (environment, shared config, IRSA web
/// identity, ECS/EC2 metadata). TLS is rustls with the ring provider, the same as the kube
/// client, and the HTTP client is given explicitly (the SDK has none without its default features).
pub async fn sdk_config(region: &str, endpoint: Option<&str>, credentials: Option<StaticCredentials>) -> SdkConfig {
    let http = shared_https_client();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .http_client(http)
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .timeout_config(
            TimeoutConfig::builder().connect_timeout(Duration::from_secs(3)).operation_attempt_timeout(Duration::from_secs(10)).build(),
        );
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    if let Some(c) = credentials {
        loader = loader.credentials_provider(Credentials::new(
            c.access_key_id,
            c.secret_access_key,
            c.session_token,
            None,
            "statelock-locksource-secret",
        ));
    }
    loader.load().await
}

/// One HTTPS client (connection pool, TLS configuration and root certificates) for every SDK
/// client of the process: building one per LockSource cost each its own parsed root store and
/// pool (hundreds of LockSources made hundreds of them).
fn shared_https_client() -> aws_sdk_dynamodb::config::SharedHttpClient {
    static CLIENT: std::sync::OnceLock<aws_sdk_dynamodb::config::SharedHttpClient> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https()).clone()
}

/// A DynamoDB client for one table's region and endpoint.
pub async fn dynamodb_client(region: &str, endpoint: Option<&str>, credentials: Option<StaticCredentials>) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config(region, endpoint, credentials).await)
}

/// A DynamoDB client that makes exactly one attempt per call, for the gateway: its callers
/// (Terraform's own SDK) retry throttling and server errors themselves, so retrying here too
/// would multiply their attempts and hide DynamoDB's answer from them.
pub async fn passthrough_client(region: &str, endpoint: Option<&str>, credentials: Option<StaticCredentials>) -> aws_sdk_dynamodb::Client {
    let config = sdk_config(region, endpoint, credentials).await;
    aws_sdk_dynamodb::Client::from_conf(aws_sdk_dynamodb::config::Builder::from(&config).retry_config(RetryConfig::disabled()).build())
}
