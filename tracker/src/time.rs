//! Wall-clock time as the ledger and the usage API need it: milliseconds since the Unix
//! epoch (UTC), RFC 3339 text for people, and UTC hour/day buckets. Hand-written (a
//! page of calendar arithmetic) rather than a date crate, because this is all the
//! service needs and the build machine has two cores.

use std::time::{SystemTime, UNIX_EPOCH};

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// Earliest and latest times accepted anywhere: 1970-01-01 and the end of 9999, so every
/// time fits RFC 3339's four-digit year.
pub const MIN_MS: i64 = 0;
pub const MAX_MS: i64 = 253_402_300_799_999;

/// Now, in milliseconds since the epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(MAX_MS))
        .clamp(MIN_MS, MAX_MS)
}

/// The start of the bucket of `width` milliseconds that holds `ms` (UTC-aligned).
pub fn floor(ms: i64, width: i64) -> i64 {
    ms.div_euclid(width.max(1)) * width.max(1)
}

/// An event's `ts` (seconds, as the filter sends it) in milliseconds, if it is a time
/// the ledger can keep; `None` for absent, negative, non-finite or beyond-9999 values.
pub fn event_ms(ts: Option<f64>) -> Option<i64> {
    let ms = (ts? * 1000.0).floor();
    // MAX_MS is far below 2^53, so the comparison and the cast are exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    (ms.is_finite() && ms >= MIN_MS as f64 && ms <= MAX_MS as f64).then_some(ms as i64)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `2025-11-22T08:00:00Z`, with `.125` milliseconds when they are not zero.
pub fn format_rfc3339(ms: i64) -> String {
    let (days, rest) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
    let (year, month, day) = civil_from_days(days);
    let (secs, millis) = (rest / 1000, rest % 1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if millis == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
    }
}

/// Parses a time given in a query: Unix seconds (`1763800000`, `1763800000.5`), an
/// RFC 3339 date-time (`2025-11-22T08:00:00Z`, `…+01:00`, fractions allowed) or a date
/// (`2025-11-22`, midnight UTC). The error says what was expected.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let expected = || format!("expected Unix seconds or an RFC 3339 time like 2025-11-22T08:00:00Z, got {text:?}");
    let outside = || format!("{text:?} is outside 1970-01-01 to 9999-12-31");
    if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') && !text.is_empty() {
        let seconds: f64 = text.parse().map_err(|_| expected())?;
        event_ms(Some(seconds)).ok_or_else(outside)
    } else {
        let ms = parse_rfc3339(text).ok_or_else(expected)?;
        if (MIN_MS..=MAX_MS).contains(&ms) {
            Ok(ms)
        } else {
            Err(outside())
        }
    }
}

fn parse_rfc3339(text: &str) -> Option<i64> {
    let number = |from: usize, to: usize| -> Option<i64> {
        let part = text.get(from..to)?;
        part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let separator = |at: usize, allowed: &[u8]| text.as_bytes().get(at).is_some_and(|b| allowed.contains(b));
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    if !separator(4, b"-") || !separator(7, b"-") || !(1..=12).contains(&month) {
        return None;
    }
    let month_days =
        days_from_civil(year + i64::from(month == 12), month % 12 + 1, 1) - days_from_civil(year, month, 1);
    if !(1..=month_days).contains(&day) {
        return None;
    }
    let date_ms = days_from_civil(year, month, day) * DAY_MS;
    if text.len() == 10 {
        return Some(date_ms);
    }
    if !separator(10, b"Tt ") || !separator(13, b":") || !separator(16, b":") {
        return None;
    }
    let (h, m, s) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    if h > 23 || m > 59 || s > 59 {
        return None;
    }
    let mut rest = text.get(19..)?;
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let first3 = format!("{:0<3}", fraction.get(..digits.min(3))?);
        millis = first3.parse::<i64>().ok()?;
        rest = fraction.get(digits..)?;
    }
    let offset_ms = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let bytes = rest.as_bytes();
            if rest.len() != 6 || bytes.get(3) != Some(&b':') {
                return None;
            }
            let digits = |r: std::ops::Range<usize>| -> Option<i64> {
                let part = rest.get(r)?;
                part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
            };
            let (oh, om) = (digits(1..3)?, digits(4..6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * HOUR_MS + om * 60_000)
        }
    };
    Some(date_ms + h * HOUR_MS + m * 60_000 + s * 1000 + millis - offset_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (1_763_800_000_125, "2025-11-22T08:26:40.125Z"),
            (951_782_400_000, "2000-02-29T00:00:00Z"),
            (MAX_MS, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, text) in cases {
            assert_eq!(format_rfc3339(ms), text);
            assert_eq!(parse_time(text), Ok(ms), "{text}");
        }
    }

    #[test]
    fn parses() {
        let cases: [(&str, Option<i64>); 16] = [
            ("1763800000", Some(1_763_800_000_000)),
            ("1763800000.5", Some(1_763_800_000_500)),
            ("2025-11-22", Some(1_763_769_600_000)),
            ("2025-11-22T08:26:40Z", Some(1_763_800_000_000)),
            ("2025-11-22t08:26:40z", Some(1_763_800_000_000)),
            ("2025-11-22 08:26:40Z", Some(1_763_800_000_000)),
            ("2025-11-22T09:26:40+01:00", Some(1_763_800_000_000)),
            ("2025-11-22T08:26:40.1234567Z", Some(1_763_800_000_123)),
            ("2024-02-29", Some(1_709_164_800_000)),
            ("2025-02-29", None),
            ("2025-13-01", None),
            ("2025-11-22T24:00:00Z", None),
            ("2025-11-22T08:26:40", None),
            ("yesterday", None),
            ("", None),
            ("-5", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_time(text).ok(), want, "{text}");
        }
        assert!(parse_time("99999999999999").unwrap_err().contains("outside"));
    }

    #[test]
    fn buckets_and_event_times() {
        assert_eq!(floor(1_763_800_000_125, HOUR_MS), 1_763_798_400_000);
        assert_eq!(floor(1_763_800_000_125, DAY_MS), 1_763_769_600_000);
        let cases = [
            (None, None),
            (Some(1_763_800_000.125), Some(1_763_800_000_125)),
            (Some(-1.0), None),
            (Some(f64::NAN), None),
            (Some(f64::INFINITY), None),
            (Some(1e300), None),
        ];
        for (ts, want) in cases {
            assert_eq!(event_ms(ts), want, "{ts:?}");
        }
    }
}
