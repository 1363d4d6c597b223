//! Durations, sizes and times as people write them: `30s`, `512MiB`,
//! `2025-12-01T00:00:00Z`. The one place each is parsed and printed, for flags,
//! config files, rules and answers alike.

use std::io::Write as _;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate};

/// A value that does not read as the unit it should be; the message says what
/// was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUnit {
    /// Not a duration.
    #[error("{0}")]
    Duration(String),
    /// Not a size.
    #[error("{0}")]
    Size(String),
    /// Not an RFC 3339 time.
    #[error("'{text}' is not an RFC 3339 time: {reason}")]
    Time {
        /// The text given.
        text: String,
        /// What chrono found wrong.
        reason: String,
    },
    /// An RFC 3339 time outside what nanoseconds since 1970 in an `i64` hold.
    #[error("'{0}' is outside the years 1677 to 2262")]
    TimeOutOfRange(String),
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `2d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, InvalidUnit> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| InvalidUnit::Duration(format!("'{s}' is not a duration like 30s or 5m")))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(InvalidUnit::Duration(format!(
                "'{s}': unknown unit '{unit}' (use ms, s, m, h or d)"
            )))
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| InvalidUnit::Duration(format!("'{s}' is too long")))
}

/// Writes a duration in the largest unit `parse_duration` reads back exactly:
/// `30d`, `36h`, `90m`, `45s`, `500ms`.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() != 0 || d.is_zero() {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    for (unit, secs) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(secs) {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

/// Parses a size above zero: `1048576`, `512KiB`, `64MiB`, `1GiB` (also `KB`,
/// `MB`, `GB` as powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, InvalidUnit> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| InvalidUnit::Size(format!("'{s}' is not a size like 512MiB")))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        u => {
            return Err(InvalidUnit::Size(format!(
                "'{s}': unknown unit '{u}' (use B, KiB, MiB or GiB)"
            )))
        }
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| InvalidUnit::Size(format!("'{s}' is not a usable size")))
}

/// Parses an RFC 3339 time (`2025-12-01T08:00:00+08:00`) into Unix nanoseconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, InvalidUnit> {
    let t = DateTime::parse_from_rfc3339(s.trim()).map_err(|e| InvalidUnit::Time {
        text: s.to_string(),
        reason: e.to_string(),
    })?;
    t.timestamp_nanos_opt()
        .ok_or_else(|| InvalidUnit::TimeOutOfRange(s.to_string()))
}

/// Unix nanoseconds as RFC 3339 in UTC: `2025-12-01T00:00:00Z`,
/// `2025-12-01T00:00:00.5Z`.
pub fn rfc3339(nanos: i128) -> String {
    let mut s = String::with_capacity(30);
    push_rfc3339(&mut s, nanos);
    s
}

/// Appends [`rfc3339`] of `nanos` to `out`, without allocating for the common
/// years 0 to 9999. A time chrono cannot represent is printed as its number.
pub fn push_rfc3339(out: &mut String, nanos: i128) {
    Rfc3339Printer::default().push(out, nanos);
}

/// Prints times as [`push_rfc3339`] does, keeping the last date it printed: the
/// times of one answer mostly share their day, and the date is most of the cost.
#[derive(Debug, Default, Clone)]
pub struct Rfc3339Printer {
    /// The day (since 1970-01-01) whose `YYYY-MM-DDT` is in `date`.
    day: Option<i64>,
    date: [u8; 11],
}

impl Rfc3339Printer {
    /// Appends [`rfc3339`] of `nanos` to `out`.
    pub fn push(&mut self, out: &mut String, nanos: i128) {
        let mut text = Vec::with_capacity(40);
        self.write(&mut text, nanos);
        // Every byte written is ASCII, or chrono's and Rust's own formatting.
        out.push_str(std::str::from_utf8(&text).unwrap_or_default());
    }

    /// Appends the UTF-8 bytes of [`rfc3339`] of `nanos` to `out`: an answer's
    /// encoder prints one time per row, and this is its path.
    pub fn write(&mut self, out: &mut Vec<u8>, nanos: i128) {
        const NANOS: i64 = 1_000_000_000;
        // 64-bit arithmetic where it fits (every time an i64 of nanoseconds can
        // hold): 128-bit division is a software routine.
        let (secs, frac) = match i64::try_from(nanos) {
            Ok(n) => (n.div_euclid(NANOS), n.rem_euclid(NANOS) as u32),
            Err(_) => match i64::try_from(nanos.div_euclid(NANOS as i128)) {
                Ok(s) => (s, nanos.rem_euclid(NANOS as i128) as u32),
                Err(_) => {
                    let _ = write!(out, "{nanos}");
                    return;
                }
            },
        };
        let day = secs.div_euclid(86_400);
        if self.day != Some(day) && !self.set_day(day) {
            // Outside years 0 to 9999: ISO 8601 expanded years, as chrono writes them.
            match DateTime::from_timestamp(secs, frac) {
                Some(dt) => {
                    let _ = write!(out, "{}", dt.format("%Y-%m-%dT%H:%M:%S"));
                }
                None => {
                    let _ = write!(out, "{nanos}");
                    return;
                }
            }
        } else {
            // Digit by digit: chrono with `write!` costs several times as much.
            let of_day = secs.rem_euclid(86_400) as u32;
            let (h, mi, sec) = (two(of_day / 3600), two(of_day / 60 % 60), two(of_day % 60));
            out.extend_from_slice(&self.date);
            out.extend_from_slice(&[h[0], h[1], b':', mi[0], mi[1], b':', sec[0], sec[1]]);
        }
        if frac > 0 {
            let mut digits = *b".000000000";
            let mut rest = frac;
            for d in digits[1..].iter_mut().rev() {
                *d = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            let zeros = digits.iter().rev().take_while(|&&d| d == b'0').count();
            out.extend_from_slice(&digits[..10 - zeros]);
        }
        out.push(b'Z');
    }

    /// Makes `day` the remembered one; false (and nothing remembered) when its
    /// year is outside 0 to 9999.
    fn set_day(&mut self, day: i64) -> bool {
        self.day = None;
        // 719,163 days lie between 0001-01-01 and 1970-01-01.
        let Some(date) = i32::try_from(day.saturating_add(719_163))
            .ok()
            .and_then(NaiveDate::from_num_days_from_ce_opt)
            .filter(|d| (0..=9999).contains(&d.year()))
        else {
            return false;
        };
        let y = date.year() as u32;
        let (y1, y2) = (two(y / 100), two(y));
        let (mo, d) = (two(date.month()), two(date.day()));
        self.date = [
            y1[0], y1[1], y2[0], y2[1], b'-', mo[0], mo[1], b'-', d[0], d[1], b'T',
        ];
        self.day = Some(day);
        true
    }
}

/// The last two decimal digits of `v`.
fn two(v: u32) -> [u8; 2] {
    [b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8]
}

/// Unix nanoseconds now (0 before 1970, `i64::MAX` after 2262).
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    #[test]
    fn rfc3339_matches_chrono_at_every_digit() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut cases: Vec<i128> = vec![0, 1, -1, 999_999_999, -62_167_219_200_000_000_000];
        // 9999-12-31T23:59:59.999999999Z and 0000-01-01T00:00:00Z.
        cases.push(253_402_300_799_999_999_999);
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push((x as i64 / 2) as i128);
        }
        // One printer for every case (its remembered date must never leak into
        // another day), and each case twice in a row (the second from memory).
        let mut printer = Rfc3339Printer::default();
        for nanos in cases {
            let mut ours = String::new();
            push_rfc3339(&mut ours, nanos);
            let mut again = String::new();
            printer.push(&mut again, nanos);
            assert_eq!(again, ours, "{nanos}, printed after the case before");
            again.clear();
            printer.push(&mut again, nanos);
            assert_eq!(again, ours, "{nanos}, printed again");
            let secs = nanos.div_euclid(1_000_000_000) as i64;
            let frac = nanos.rem_euclid(1_000_000_000) as u32;
            let dt = DateTime::from_timestamp(secs, frac).unwrap();
            let theirs = dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            // chrono prints fractions in groups of three digits; ours trims zeros.
            let trimmed = match theirs.split_once('.') {
                Some((head, tail)) => {
                    let digits = tail.trim_end_matches('Z').trim_end_matches('0');
                    if digits.is_empty() {
                        format!("{head}Z")
                    } else {
                        format!("{head}.{digits}Z")
                    }
                }
                None => theirs,
            };
            assert_eq!(ours, trimmed, "{nanos}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 furlongs").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("99999999999999999d").is_err());
        for (d, text) in [
            (Duration::from_secs(30 * 86_400), "30d"),
            (Duration::from_secs(36 * 3600), "36h"),
            (Duration::from_secs(90 * 60), "90m"),
            (Duration::from_secs(45), "45s"),
            (Duration::from_millis(1500), "1500ms"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text} reads back");
        }
    }

    #[test]
    fn times_read_with_their_offset() {
        assert_eq!(
            parse_rfc3339("2025-12-01T08:00:00+08:00"),
            Ok(1_764_547_200_000_000_000)
        );
        assert!(matches!(
            parse_rfc3339("yesterday"),
            Err(InvalidUnit::Time { .. })
        ));
        assert!(matches!(
            parse_rfc3339("9999-01-01T00:00:00Z"),
            Err(InvalidUnit::TimeOutOfRange(_))
        ));
    }

    /// The old, allocating way: chrono's formatter and trimmed fraction digits.
    fn rfc3339_by_chrono(nanos: i128) -> String {
        let secs = nanos.div_euclid(1_000_000_000);
        let frac = nanos.rem_euclid(1_000_000_000) as u32;
        let Some(dt) = i64::try_from(secs)
            .ok()
            .and_then(|s| DateTime::from_timestamp(s, frac))
        else {
            return nanos.to_string();
        };
        let mut s = dt.format("%Y-%m-%dT%H:%M:%S").to_string();
        if frac > 0 {
            let digits = format!("{frac:09}");
            let _ = write!(s, ".{}", digits.trim_end_matches('0'));
        }
        s + "Z"
    }

    #[test]
    fn timestamps_print_as_chrono_would() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut cases: Vec<i128> = vec![
            0,
            1,
            -1,
            1_764_547_200_000_000_000,
            1_764_547_200_120_000_000,
            -62_135_596_800_000_000_000, // 0001-01-01
            -62_135_596_800_000_000_001, // the year 0
            253_402_300_800_000_000_000, // 10000-01-01
            i64::MIN as i128,
            i64::MAX as i128,
            i128::MAX,
            i128::MIN,
            // Past an i64 of nanoseconds, within an i64 of seconds.
            i64::MAX as i128 * 1_000,
            i64::MIN as i128 * 1_000_000_000 + 7,
        ];
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push(x as i64 as i128 * 1_000);
            cases.push(x as i64 as i128);
        }
        for n in cases {
            assert_eq!(rfc3339(n), rfc3339_by_chrono(n), "{n}");
        }
    }
}
