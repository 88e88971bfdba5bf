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
    problem: Option<String>,
}

/// Why a duration string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GoDurationError {
    #[error("invalid duration {text:?}: {reason}")]
    Invalid { text: String, reason: String },
    #[error("invalid duration {text:?}: durations must not be negative")]
    Negative { text: String },
    #[error("invalid duration {text:?}: longer than the maximum of {max}h")]
    TooLarge { text: String, max: u64 },
}

impl GoDuration {
    /// The parsed value. A value that did not parse (only possible when read from the API, see
    /// [`GoDuration::problem`]) reads as [`MAX_DURATION`]: the longest grace, the rarest sync.
    pub fn get(&self) -> Duration {
        self.value
    }

    /// Why the text is not a valid duration, when it is not. Objects read from the API keep an
    /// invalid text instead of failing to decode (one bad LockSource must not break the watch of
    /// every LockSource); the operator refuses such a LockSource with a condition.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A duration of whole seconds, rendered as `<n>s`.
    pub fn from_secs(secs: u64) -> Self {
        Self { text: format!("{secs}s"), value: Duration::from_secs(secs), problem: None }
    }

    /// A duration of whole milliseconds, rendered as `<n>ms`.
    pub fn from_millis(ms: u64) -> Self {
        Self { text: format!("{ms}ms"), value: Duration::from_millis(ms), problem: None }
    }

    /// A duration of whole hours, rendered as `<n>h`.
    pub fn from_hours(hours: u64) -> Self {
        Self { text: format!("{hours}h"), value: Duration::from_secs(hours * 3600), problem: None }
    }
}

impl FromStr for GoDuration {
    type Err = GoDurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self { text: text.to_owned(), value: parse_go_duration(text)?, problem: None })
    }
}

/// The longest duration any field accepts (ten years). Larger values are refused rather than
/// saturated, so that no arithmetic on a duration can overflow (a grace period that overflows a
/// timestamp would otherwise make a release due at once).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parse Go's `time.ParseDuration` syntax (non-negative): `0`, or one or more
/// `<digits>[.<digits>]<unit>` groups with units `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`.
///
/// Every step is checked: no input panics, and values above [`MAX_DURATION`] are refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, GoDurationError> {
    let invalid =
        |reason: &str| GoDurationError::Invalid { text: crate::lock_record::truncate(text, 64).to_owned(), reason: reason.to_owned() };
    if text.starts_with('-') {
        return Err(GoDurationError::Negative { text: crate::lock_record::truncate(text, 64).to_owned() });
    }
    if text.len() > 64 {
        return Err(invalid("longer than 64 characters"));
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(invalid("expected e.g. 15s, 1m30s or 1h"));
    }
    let too_large = || GoDurationError::TooLarge { text: text.to_owned(), max: MAX_DURATION.as_secs() / 3600 };
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let has_dot = after.starts_with('.');
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after),
        };
        // The CRD pattern's grammar exactly: digits, optionally a dot followed by digits.
        if int_part.is_empty() || (has_dot && frac_part.is_empty()) {
            return Err(invalid("expected a number before each unit, e.g. 15s, 1m30s or 1h"));
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(invalid("missing unit (ns, us, ms, s, m or h)")),
            _ => return Err(invalid("unknown unit (use ns, us, ms, s, m or h)")),
        };
        // Integer part: at most 20 digits are meaningful below the cap; more is too large.
        let int_digits = int_part.trim_start_matches('0');
        if int_digits.len() > 20 {
            return Err(too_large());
        }
        let int: u128 = if int_digits.is_empty() { 0 } else { int_digits.parse().map_err(|_| too_large())? };
        let mut nanos = int.checked_mul(per_unit).ok_or_else(too_large)?;
        // Fraction: nanosecond precision is all Go keeps too; further digits are dropped.
        let mut scale = per_unit;
        for d in frac_part.bytes().take(30) {
            scale /= 10;
            nanos = nanos.checked_add(u128::from(d - b'0') * scale).ok_or_else(too_large)?;
        }
        total = total.checked_add(nanos).ok_or_else(too_large)?;
        if total > MAX_DURATION.as_nanos() {
            return Err(too_large());
        }
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_large())?;
    let sub = u32::try_from(total % 1_000_000_000).map_err(|_| too_large())?;
    Ok(Duration::new(secs, sub))
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
        Ok(text.parse().unwrap_or_else(|e: GoDurationError| Self {
            value: MAX_DURATION,
            problem: Some(e.to_string()),
            text: crate::lock_record::truncate(&text, 64).to_owned(),
        }))
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
            "maxLength": 64,
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
        for text in ["-5s", "5", "", "+5s", "five seconds", "5 s", "5d", ".s", "1.h5", "1e400s", "s", "5sm", "00", "1..5s"] {
            assert!(text.parse::<GoDuration>().is_err(), "{text} must be rejected");
            // Read from the API, it decodes (so one bad object never breaks a watch) but says why.
            let d: GoDuration = serde_json::from_value(serde_json::json!(text)).expect("decodes");
            assert!(d.problem().is_some(), "{text}");
            assert_eq!(d.get(), MAX_DURATION, "{text}: reads as the longest duration");
        }
    }

    #[test]
    fn huge_values_are_refused_not_saturated_and_never_panic() {
        for text in [
            "87601h",
            "99999999999999999999999999h",
            "18446744073709551616s",
            "9223372036854775807ns9223372036854775807ns",
            "315360001s",
            "0.99999999999999999999999999999999h9999999999h",
        ] {
            assert!(
                matches!(text.parse::<GoDuration>(), Err(GoDurationError::TooLarge { .. }) | Err(GoDurationError::Invalid { .. })),
                "{text}"
            );
        }
        let max: GoDuration = "87600h".parse().expect("the maximum itself");
        assert_eq!(max.get(), MAX_DURATION);
        assert_eq!("1.000000001s".parse::<GoDuration>().expect("ns precision").get(), Duration::new(1, 1));
        assert_eq!("1.0000000019s".parse::<GoDuration>().expect("digits past ns dropped").get(), Duration::new(1, 1));
        assert_eq!("1h1m1s1ms1us1µs1ns".parse::<GoDuration>().expect("every unit").get(), Duration::new(3661, 1_002_001));
    }

    proptest::proptest! {
        /// No string panics the parser, and whatever it accepts is within the cap.
        #[test]
        fn no_input_panics_and_accepted_values_are_bounded(text in proptest::prelude::any::<String>()) {
            if let Ok(d) = text.parse::<GoDuration>() {
                proptest::prop_assert!(d.get() <= MAX_DURATION);
            }
        }

        /// Strings made of the grammar's own pieces (digits, dots, units) in any order: the shapes
        /// where a hand-written parser slips.
        #[test]
        fn grammar_shaped_strings_never_panic(parts in proptest::collection::vec(proptest::prop_oneof![
            proptest::prelude::Just("0".to_owned()), "[0-9]{1,25}", proptest::prelude::Just(".".to_owned()),
            proptest::prelude::Just("h".to_owned()), proptest::prelude::Just("m".to_owned()), proptest::prelude::Just("s".to_owned()),
            proptest::prelude::Just("ms".to_owned()), proptest::prelude::Just("µs".to_owned()), proptest::prelude::Just("ns".to_owned()),
            proptest::prelude::Just("-".to_owned()), proptest::prelude::Just("+".to_owned()),
        ], 0..12)) {
            let text = parts.concat();
            if let Ok(d) = text.parse::<GoDuration>() {
                proptest::prop_assert!(d.get() <= MAX_DURATION, "{}", text);
                proptest::prop_assert!(regex::Regex::new(GO_DURATION_PATTERN).expect("pattern").is_match(&text), "accepted {} but the CRD pattern refuses it", text);
            }
        }

        /// Whole seconds, minutes and hours parse to exactly their value.
        #[test]
        fn well_formed_values_parse_exactly(h in 0u64..1000, m in 0u64..1000, s in 0u64..100_000) {
            let d: GoDuration = format!("{h}h{m}m{s}s").parse().expect("valid");
            proptest::prop_assert_eq!(d.get(), Duration::from_secs(h * 3600 + m * 60 + s));
        }
    }
}
