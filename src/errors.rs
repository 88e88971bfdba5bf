//! One vocabulary of error categories for the whole operator. A category says whether trying
//! again soon can help (transient) or only a change of configuration will (permanent); it drives
//! the requeue and is the `category` label of `statelock_reconcile_errors_total`. Errors keep
//! their sources; the category is decided where the error is made, from what it is.

use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

/// What kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    /// The Kubernetes API timed out, was unreachable, throttled or failed (5xx, 429).
    KubernetesUnavailable,
    /// A write lost a race (409): retried at once with fresh state.
    KubernetesConflict,
    /// The Kubernetes API refused the request (400, 401, 403, 404, 422).
    KubernetesRefused,
    /// DynamoDB throttled the call.
    DynamoThrottled,
    /// DynamoDB (or its stream) timed out, was unreachable or failed (5xx).
    DynamoUnavailable,
    /// DynamoDB refused the call: access denied, no such table, invalid request.
    DynamoRefused,
    /// S3 throttled the call (SlowDown).
    S3Throttled,
    /// S3 timed out, was unreachable or failed (5xx).
    S3Unavailable,
    /// S3 refused the call: access denied, no such bucket, invalid request.
    S3Refused,
    /// The LockSource's credentials Secret is missing or incomplete.
    CredentialsUnavailable,
    /// The tenancy policy refuses the LockSource.
    SourceRefused,
    /// This replica does not lead (not a failure of the work itself).
    NotLeader,
}

impl ErrorCategory {
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::KubernetesUnavailable
                | Self::KubernetesConflict
                | Self::DynamoThrottled
                | Self::DynamoUnavailable
                | Self::S3Throttled
                | Self::S3Unavailable
                | Self::NotLeader
        )
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KubernetesUnavailable => "kubernetes_unavailable",
            Self::KubernetesConflict => "kubernetes_conflict",
            Self::KubernetesRefused => "kubernetes_refused",
            Self::DynamoThrottled => "dynamodb_throttled",
            Self::DynamoUnavailable => "dynamodb_unavailable",
            Self::DynamoRefused => "dynamodb_refused",
            Self::S3Throttled => "s3_throttled",
            Self::S3Unavailable => "s3_unavailable",
            Self::S3Refused => "s3_refused",
            Self::CredentialsUnavailable => "credentials_unavailable",
            Self::SourceRefused => "source_refused",
            Self::NotLeader => "not_leader",
        }
    }

    /// When to try again: soon for a transient failure, after a minute for one that needs a
    /// change (which an event on the object triggers sooner anyway).
    pub fn retry_after(self) -> Duration {
        match self {
            Self::KubernetesConflict => Duration::from_millis(200),
            Self::DynamoThrottled | Self::S3Throttled => Duration::from_secs(10),
            Self::NotLeader => Duration::from_secs(30),
            c if c.is_transient() => Duration::from_secs(5),
            _ => Duration::from_secs(60),
        }
    }

    /// A Kubernetes client error.
    pub fn of_kube(e: &kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 409 => Self::KubernetesConflict,
            kube::Error::Api(s) if s.code == 429 || s.code >= 500 => Self::KubernetesUnavailable,
            kube::Error::Api(_) => Self::KubernetesRefused,
            _ => Self::KubernetesUnavailable,
        }
    }

    /// An AWS SDK error, by its service code (or the failure to get an answer at all).
    pub fn of_sdk<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Self {
        match e {
            SdkError::ServiceError(s) => Self::of_code(s.err().code()),
            SdkError::ConstructionFailure(_) => Self::DynamoRefused,
            _ => Self::DynamoUnavailable,
        }
    }

    /// A DynamoDB error code.
    pub fn of_code(code: Option<&str>) -> Self {
        match code {
            Some("ThrottlingException" | "ProvisionedThroughputExceededException" | "RequestLimitExceeded" | "LimitExceededException") => {
                Self::DynamoThrottled
            }
            Some("InternalServerError" | "InternalFailure" | "ServiceUnavailable" | "TransactionConflictException") | None => {
                Self::DynamoUnavailable
            }
            Some(_) => Self::DynamoRefused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_say_whether_retrying_helps() {
        assert_eq!(ErrorCategory::of_code(Some("ThrottlingException")), ErrorCategory::DynamoThrottled);
        assert_eq!(ErrorCategory::of_code(Some("ProvisionedThroughputExceededException")), ErrorCategory::DynamoThrottled);
        assert_eq!(ErrorCategory::of_code(Some("InternalServerError")), ErrorCategory::DynamoUnavailable);
        assert_eq!(ErrorCategory::of_code(None), ErrorCategory::DynamoUnavailable);
        assert_eq!(ErrorCategory::of_code(Some("AccessDeniedException")), ErrorCategory::DynamoRefused);
        assert_eq!(ErrorCategory::of_code(Some("ResourceNotFoundException")), ErrorCategory::DynamoRefused);
        let api = |code: u16| kube::Error::Api(Box::new(kube::core::Status { code, ..kube::core::Status::default() }));
        assert_eq!(ErrorCategory::of_kube(&api(409)), ErrorCategory::KubernetesConflict);
        assert_eq!(ErrorCategory::of_kube(&api(503)), ErrorCategory::KubernetesUnavailable);
        assert_eq!(ErrorCategory::of_kube(&api(429)), ErrorCategory::KubernetesUnavailable);
        assert_eq!(ErrorCategory::of_kube(&api(403)), ErrorCategory::KubernetesRefused);
        for c in [ErrorCategory::KubernetesUnavailable, ErrorCategory::DynamoThrottled, ErrorCategory::NotLeader] {
            assert!(c.is_transient() && c.retry_after() <= Duration::from_secs(30), "{c:?}");
        }
        for c in [ErrorCategory::DynamoRefused, ErrorCategory::CredentialsUnavailable, ErrorCategory::SourceRefused] {
            assert!(!c.is_transient() && c.retry_after() == Duration::from_secs(60), "{c:?}");
        }
    }
}
