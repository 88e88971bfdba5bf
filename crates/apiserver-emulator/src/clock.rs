//! Time: an injectable clock, RFC 3339 formatting and parsing, and kubectl's age strings.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// The emulator's clock: the system clock, or a manual one tests move.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Nanoseconds since the epoch when manual; `None` for the system clock.
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A manual clock starting at `unix_nanos`.
    pub fn manual(unix_nanos: i64) -> Self {
        Self { manual: Some(Arc::new(AtomicI64::new(unix_nanos))) }
    }

    /// Nanoseconds since the Unix epoch.
    pub fn now_nanos(&self) -> i64 {
        match &self.manual {
            Some(n) => n.load(Ordering::SeqCst),
            None => SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0),
        }
    }

    /// Move a manual clock forward (a no-op on the system clock); returns whether it moved.
    pub fn advance(&self, nanos: i64) -> bool {
        match &self.manual {
            Some(n) => {
                n.fetch_add(nanos, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Set a manual clock; returns whether it is manual.
    pub fn set(&self, unix_nanos: i64) -> bool {
        match &self.manual {
            Some(n) => {
                n.store(unix_nanos, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// `meta/v1.Time`: RFC 3339, whole seconds, `Z`.
    pub fn now_rfc3339(&self) -> String {
        format_rfc3339(self.now_nanos().div_euclid(1_000_000_000), None)
    }

    /// `meta/v1.MicroTime`: RFC 3339 with 6 fractional digits.
    pub fn now_micro(&self) -> String {
        let n = self.now_nanos();
        format_rfc3339(n.div_euclid(1_000_000_000), Some((n.rem_euclid(1_000_000_000) / 1000) as u32))
    }
}

/// Format seconds since the epoch (plus optional microseconds) as RFC 3339 UTC.
pub fn format_rfc3339(secs: i64, micros: Option<u32>) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let base = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, (rem % 3600) / 60, rem % 60);
    match micros {
        Some(us) => format!("{base}.{us:06}Z"),
        None => format!("{base}Z"),
    }
}

/// Parse RFC 3339 (any fractional precision, `Z` or an offset) to nanoseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse::<i64>().ok() };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() || digits.len() > 9 {
            return None;
        }
        frac_nanos = digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32);
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && &tz[3..4] == ":" => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (tz[1..3].parse::<i64>().ok()? * 3600 + tz[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset) * 1_000_000_000 + frac_nanos)
}

// Howard Hinnant's civil-from-days and days-from-civil algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// apimachinery `util/duration.HumanDuration`, the age strings kubectl prints.
pub fn human_duration(nanos: i64) -> String {
    let seconds = nanos.div_euclid(1_000_000_000);
    if seconds < -1 {
        return "<invalid>".into();
    } else if seconds < 0 {
        return "0s".into();
    } else if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 { format!("{minutes}m") } else { format!("{minutes}m{s}s") };
    } else if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 { format!("{hours}h") } else { format!("{hours}h{m}m") };
    } else if hours < 48 {
        return format!("{hours}h");
    } else if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 { format!("{}d", hours / 24) } else { format!("{}d{h}h", hours / 24) };
    } else if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    } else if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 { format!("{}y", hours / 24 / 365) } else { format!("{}y{dy}d", hours / 24 / 365) };
    }
    format!("{}y", hours / 24 / 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_reads_terraform_created_times() {
        let n = parse_rfc3339("2026-11-26T13:02:20.23832569Z").expect("8 digits");
        assert_eq!(n % 1_000_000_000, 238_325_690);
        assert_eq!(format_rfc3339(n / 1_000_000_000, None), "2026-11-26T13:02:20Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("2026-02-30T00:00:00"), None);
        assert_eq!(format_rfc3339(951_782_400, Some(5)), "2000-02-29T00:00:00.000005Z");
    }

    #[test]
    fn human_duration_matches_apimachinery() {
        // Expected strings from apimachinery util/duration duration_test.go.
        let s = 1_000_000_000i64;
        for (d, want) in [
            (0, "0s"),
            (119 * s, "119s"),
            (120 * s, "2m"),
            (121 * s, "2m1s"),
            (600 * s, "10m"),
            (3 * 3600 * s, "3h"),
            (3 * 3600 * s + 60 * s, "3h1m"),
            (8 * 3600 * s, "8h"),
            (48 * 3600 * s, "2d"),
            (50 * 3600 * s, "2d2h"),
            (8 * 24 * 3600 * s, "8d"),
            (2 * 365 * 24 * 3600 * s, "2y"),
            (-2 * s, "<invalid>"),
        ] {
            assert_eq!(human_duration(d), want, "{d}");
        }
    }
}
