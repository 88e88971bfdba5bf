//! Durations written the way Kubernetes users know them (`15s`, `1h`, `1m30s`).

use std::{borrow::Cow, fmt, str::FromStr, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern every duration field is validated against by the API server: one or more
/// `<number><unit>` groups with Go's units, no sign.
pub const GO_DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$|^0$";

/// A non-negative duration in Go's `time.ParseDuration` syntax.
///
/// It keeps the text the user wrote, so that a value read and written back is unchanged
/// (`1h` stays `1h`, not `3600s`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoDuration {
    text: String,
    value: Duration,
}

/// Why a duration string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GoDurationError {
    #[error("invalid duration {text:?}: {reason}")]
    Invalid { text: String, reason: String },
    #[error("invalid duration {text:?}: durations must not be negative")]
    Negative { text: String },
}

impl GoDuration {
    /// The parsed value.
    pub fn get(&self) -> Duration {
        self.value
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A duration of whole seconds, rendered as `<n>s`.
    pub fn from_secs(secs: u64) -> Self {
        Self { text: format!("{secs}s"), value: Duration::from_secs(secs) }
    }

    /// A duration of whole hours, rendered as `<n>h`.
    pub fn from_hours(hours: u64) -> Self {
        Self { text: format!("{hours}h"), value: Duration::from_secs(hours * 3600) }
    }
}

impl FromStr for GoDuration {
    type Err = GoDurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.starts_with('-') {
            return Err(GoDurationError::Negative { text: text.to_owned() });
        }
        if text.starts_with('+') || text.is_empty() {
            return Err(GoDurationError::Invalid { text: text.to_owned(), reason: "expected e.g. 15s, 1m30s or 1h".into() });
        }
        let parsed: kube::core::Duration = text
            .parse()
            .map_err(|e: kube::core::duration::ParseError| GoDurationError::Invalid { text: text.to_owned(), reason: e.to_string() })?;
        Ok(Self { text: text.to_owned(), value: parsed.into() })
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": GO_DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_write_and_keeps_their_text() {
        for (text, secs) in [("15s", 15.0), ("1h", 3600.0), ("1m30s", 90.0), ("250ms", 0.25), ("0", 0.0), ("1.5h", 5400.0)] {
            let d: GoDuration = text.parse().expect(text);
            assert_eq!(d.get().as_secs_f64(), secs, "{text}");
            assert_eq!(d.to_string(), text);
            assert_eq!(serde_json::to_value(&d).expect("serialize"), serde_json::json!(text));
        }
    }

    #[test]
    fn rejects_negative_unitless_and_garbage() {
        for text in ["-5s", "5", "", "+5s", "five seconds", "5 s", "5d"] {
            assert!(text.parse::<GoDuration>().is_err(), "{text} must be rejected");
        }
    }
}
