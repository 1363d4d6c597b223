//! The city workload: manhole covers reporting tilt, water level, battery and lid
//! state, generated deterministically from a seed.
//!
//! [`Workload::writes`] gives the readings in the order a city's gateways send
//! them, quirks included: retries of a reading already sent (some identical, some
//! with changed values, some carrying only a few fields), and late readings that
//! arrive after newer ones. [`Workload::expected`] gives the rows the database must
//! hold afterwards, under InfluxDB's merge rule: a later write of the same series
//! and time replaces the fields it carries and keeps the others.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// 2025-12-01T00:00:00Z, the default first reading time, in unix seconds.
pub const DEFAULT_START: i64 = 1_764_547_200;

/// Seconds in a UTC day.
pub const DAY: i64 = 86_400;

/// The districts devices are placed in: UTF-8 names, an ASCII one, and one with a
/// space that line protocol must escape (`high\ tech`).
pub const DISTRICTS: [&str; 7] = [
    "金水区",
    "二七区",
    "中原区",
    "管城区",
    "惠济区",
    "zhengdong",
    "high tech",
];

/// A tiny xorshift64* generator: deterministic, no dependencies.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator seeded from `seed` (any value, zero included).
    pub fn new(seed: u64) -> XorShift {
        XorShift(splitmix(seed) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finaliser: spreads any seed over all 64 bits.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One seed from several numbers, so each (device, step, purpose) has its own
/// independent random stream.
pub fn seed_of(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x51_7CC1_B727_220A, |h, &p| splitmix(h ^ p))
}

const SALT_DEVICE: u64 = 1;
const SALT_READING: u64 = 2;
const SALT_RAIN: u64 = 3;
const SALT_QUIRK: u64 = 4;
const SALT_OVERWRITE: u64 = 5;
const SALT_DISTRICT: u64 = 6;

/// `x` rounded to `decimals` decimal places, never `-0`.
pub fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    let r = (x * scale).round() / scale;
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

/// The device name line protocol and SQL use: `mh-00042`.
pub fn device_name(device: u32) -> String {
    format!("mh-{device:05}")
}

/// A tag key or value escaped for line protocol (commas, equals signs, spaces).
pub fn escape_tag(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        if matches!(c, ',' | '=' | ' ' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// (year, month, day) of a day number counted from 1970-01-01 (Howard Hinnant's
/// civil-from-days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Unix seconds as the server prints them: `2025-12-01T00:05:00Z`.
pub fn rfc3339(secs: i64) -> String {
    let (y, mo, d) = civil_from_days(secs.div_euclid(DAY));
    let s = secs.rem_euclid(DAY);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Unix seconds as a SQL timestamp without zone: `2025-12-01 00:05:00`.
pub fn sql_timestamp(secs: i64) -> String {
    let (y, mo, d) = civil_from_days(secs.div_euclid(DAY));
    let s = secs.rem_euclid(DAY);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// One manhole reading, or one write of it: a write may carry only some fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Device number: 1 is `mh-00001`.
    pub device: u32,
    /// The device's district (a tag, like the device).
    pub district: &'static str,
    /// Unix seconds, UTC.
    pub time: i64,
    /// Lid tilt in degrees, 2 decimals.
    pub tilt_deg: Option<f64>,
    /// Water level below the cover in cm, 1 decimal.
    pub water_level_cm: Option<f64>,
    /// Battery charge in percent (an integer field: `87i`).
    pub battery_pct: Option<i64>,
    /// Whether the lid is open.
    pub cover_open: Option<bool>,
}

impl Reading {
    /// The device's name, `mh-00042`.
    pub fn device_name(&self) -> String {
        device_name(self.device)
    }

    /// This reading as one line of line protocol, precision seconds, no newline.
    pub fn line(&self) -> String {
        let mut line = format!(
            "manhole,device={},district={} ",
            self.device_name(),
            escape_tag(self.district)
        );
        let mut sep = "";
        if let Some(v) = self.tilt_deg {
            let _ = write!(line, "{sep}tilt_deg={v}");
            sep = ",";
        }
        if let Some(v) = self.water_level_cm {
            let _ = write!(line, "{sep}water_level_cm={v}");
            sep = ",";
        }
        if let Some(v) = self.battery_pct {
            let _ = write!(line, "{sep}battery_pct={v}i");
            sep = ",";
        }
        if let Some(v) = self.cover_open {
            let _ = write!(line, "{sep}cover_open={v}");
        }
        let _ = write!(line, " {}", self.time);
        line
    }

    /// Applies a later write of the same series and time: the fields it carries
    /// replace these, the others stay.
    pub fn merge(&mut self, later: &Reading) {
        self.tilt_deg = later.tilt_deg.or(self.tilt_deg);
        self.water_level_cm = later.water_level_cm.or(self.water_level_cm);
        self.battery_pct = later.battery_pct.or(self.battery_pct);
        self.cover_open = later.cover_open.or(self.cover_open);
    }
}

/// The rows a database must hold, by (device, time). In the workload a device
/// never changes district, so (device, time) names the series and time.
pub type Expected = BTreeMap<(u32, i64), Reading>;

/// Applies one write to the expected rows with the merge rule.
pub fn apply(expected: &mut Expected, write: &Reading) {
    expected
        .entry((write.device, write.time))
        .and_modify(|row| row.merge(write))
        .or_insert(*write);
}

/// Line-protocol request bodies of at most `lines_per_chunk` lines each, in order.
pub fn chunks(writes: &[Reading], lines_per_chunk: usize) -> Vec<String> {
    writes
        .chunks(lines_per_chunk.max(1))
        .map(|chunk| {
            let mut body = String::with_capacity(chunk.len() * 128);
            for write in chunk {
                body.push_str(&write.line());
                body.push('\n');
            }
            body
        })
        .collect()
}

/// The shape of a generated city: how many covers, for how long, how often they
/// report, and how often gateways retry or deliver late.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Number of devices, `mh-00001` up to `mh-<devices>`.
    pub devices: u32,
    /// Number of UTC days covered.
    pub days: u32,
    /// Seconds between two readings of a device.
    pub interval_secs: u32,
    /// First reading time, unix seconds (default 2025-12-01T00:00:00Z).
    pub start: i64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Per thousand readings: how many are sent again a little later.
    pub retries_per_mille: u32,
    /// Per thousand readings: how many arrive late, after newer lines.
    pub late_per_mille: u32,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            devices: 1_000,
            days: 1,
            interval_secs: 300,
            start: DEFAULT_START,
            seed: 42,
            retries_per_mille: 4,
            late_per_mille: 6,
        }
    }
}

/// Per-device constants of the value model.
struct DeviceProfile {
    base_level_cm: f64,
    cycle_phase: f64,
    battery_start: f64,
    battery_drain_per_day: f64,
}

impl Workload {
    /// The same workload without retries or late readings: every reading is sent
    /// once, in time order.
    pub fn clean(self) -> Workload {
        Workload {
            retries_per_mille: 0,
            late_per_mille: 0,
            ..self
        }
    }

    /// Readings per device.
    pub fn steps(&self) -> u64 {
        self.days as u64 * DAY as u64 / self.interval_secs as u64
    }

    /// Distinct rows: devices x steps.
    pub fn rows(&self) -> u64 {
        self.steps() * self.devices as u64
    }

    /// End of the covered time range (exclusive), unix seconds.
    pub fn end(&self) -> i64 {
        self.start + i64::from(self.days) * DAY
    }

    /// Time of reading `step` (from 0) of every device.
    pub fn time_of(&self, step: u64) -> i64 {
        self.start + step as i64 * i64::from(self.interval_secs)
    }

    /// The district a device stands in; fixed for the device's life.
    pub fn district_of(&self, device: u32) -> &'static str {
        let mut rng = XorShift::new(seed_of(&[self.seed, SALT_DISTRICT, device as u64]));
        DISTRICTS[rng.below(DISTRICTS.len() as u64) as usize]
    }

    /// The devices standing in `district`.
    pub fn devices_in(&self, district: &str) -> Vec<u32> {
        (1..=self.devices)
            .filter(|&d| self.district_of(d) == district)
            .collect()
    }

    fn profile(&self, device: u32) -> DeviceProfile {
        let mut rng = XorShift::new(seed_of(&[self.seed, SALT_DEVICE, device as u64]));
        DeviceProfile {
            base_level_cm: 20.0 + 60.0 * rng.unit(),
            cycle_phase: (rng.unit() - 0.5) / 12.0,
            battery_start: 60.0 + rng.below(41) as f64,
            battery_drain_per_day: 0.5 + 2.0 * rng.unit(),
        }
    }

    /// Rain in a district on a UTC day (day number since 1970) adds water to every
    /// cover there: a rise over an hour up to a peak, then a slow decay.
    fn rain_cm(&self, district: &str, time: i64) -> f64 {
        let district_index = DISTRICTS.iter().position(|d| *d == district).unwrap_or(0) as u64;
        let mut total = 0.0;
        // Rain that started late on the previous day still drains today.
        for day in [time.div_euclid(DAY) - 1, time.div_euclid(DAY)] {
            let mut rng =
                XorShift::new(seed_of(&[self.seed, SALT_RAIN, district_index, day as u64]));
            let rains = rng.unit() < 0.35;
            let t0 = day * DAY + rng.below(20 * 3600) as i64;
            let peak = 15.0 + 35.0 * rng.unit();
            if !rains || time < t0 - 3600 {
                continue;
            }
            total += if time < t0 {
                peak * (time - (t0 - 3600)) as f64 / 3600.0
            } else {
                peak * (-((time - t0) as f64) / (3.0 * 3600.0)).exp()
            };
        }
        total
    }

    /// Reading `step` (from 0) of `device`, every field present.
    pub fn reading(&self, device: u32, step: u64) -> Reading {
        let time = self.time_of(step);
        let district = self.district_of(device);
        let profile = self.profile(device);
        let mut rng = XorShift::new(seed_of(&[self.seed, SALT_READING, device as u64, step]));
        let (noise, jump, jump_size, tilt_noise, open_draw, open_after_jump) = (
            rng.unit(),
            rng.unit(),
            rng.unit(),
            rng.unit(),
            rng.unit(),
            rng.unit(),
        );

        let day_fraction = time.rem_euclid(DAY) as f64 / DAY as f64;
        let cycle =
            6.0 * (2.0 * std::f64::consts::PI * (day_fraction - 0.25 + profile.cycle_phase)).sin();
        let level =
            profile.base_level_cm + cycle + self.rain_cm(district, time) + (noise - 0.5) * 1.6;
        let water_level_cm = round_to(level.max(0.0), 1);

        let tilt = if jump < 0.0008 {
            15.0 + 25.0 * jump_size
        } else {
            0.5 + (tilt_noise - 0.5) * 0.3
        };
        let tilt_deg = round_to(tilt, 2);

        let elapsed_days = (time - self.start) as f64 / DAY as f64;
        let battery =
            profile.battery_start - (elapsed_days * profile.battery_drain_per_day).floor();
        let battery_pct = battery.max(5.0) as i64;

        let cover_open = open_draw < 0.0005 || (tilt_deg > 15.0 && open_after_jump < 0.5);
        Reading {
            device,
            district,
            time,
            tilt_deg: Some(tilt_deg),
            water_level_cm: Some(water_level_cm),
            battery_pct: Some(battery_pct),
            cover_open: Some(cover_open),
        }
    }

    /// A second write of `original`'s series and time: identical (a plain
    /// retry), every field changed, or only some fields changed.
    fn resend(original: &Reading, rng: &mut XorShift) -> Reading {
        let kind = rng.below(10);
        let (d_tilt, d_level, d_battery) = (1 + rng.below(5), 1 + rng.below(20), 1 + rng.below(3));
        let tilt = original
            .tilt_deg
            .map(|v| round_to(v + 0.01 * d_tilt as f64, 2));
        let level = original
            .water_level_cm
            .map(|v| round_to(v + 0.1 * d_level as f64, 1));
        let battery = original.battery_pct.map(|v| (v - d_battery as i64).max(0));
        let open = original.cover_open.map(|v| !v);
        match kind {
            0..=3 => *original,
            4..=6 => Reading {
                tilt_deg: tilt,
                water_level_cm: level,
                battery_pct: battery,
                ..*original
            },
            _ => Reading {
                tilt_deg: None,
                water_level_cm: level,
                battery_pct: None,
                cover_open: open,
                ..*original
            },
        }
    }

    /// Every write, in the order the gateways send them: time order, device
    /// order within a time, with late readings moved up to 3,000 lines later
    /// (after newer readings of the same device) and retries up to 500 lines
    /// after the reading they repeat.
    pub fn writes(&self) -> Vec<Reading> {
        let mut keyed: Vec<(u64, Reading)> = Vec::with_capacity(self.rows() as usize * 101 / 100);
        let mut index = 0u64;
        for step in 0..self.steps() {
            for device in 1..=self.devices {
                let reading = self.reading(device, step);
                let mut rng = XorShift::new(seed_of(&[self.seed, SALT_QUIRK, device as u64, step]));
                let late = rng.below(1000) < u64::from(self.late_per_mille);
                let delay = 1 + rng.below(3000);
                let retried = rng.below(1000) < u64::from(self.retries_per_mille);
                let gap = 1 + rng.below(500);
                // Keys are line positions times 4; ties keep push order, and a
                // retry's `+ 1` keeps it after the reading it repeats.
                let key = (index + if late { delay } else { 0 }) * 4;
                keyed.push((key, reading));
                if retried {
                    keyed.push((key + gap * 4 + 1, Self::resend(&reading, &mut rng)));
                }
                index += 1;
            }
        }
        keyed.sort_by_key(|(key, _)| *key);
        keyed.into_iter().map(|(_, reading)| reading).collect()
    }

    /// The rows the database holds after [`Workload::writes`], merge rule applied.
    pub fn expected(&self) -> Expected {
        let mut expected = Expected::new();
        for write in self.writes() {
            apply(&mut expected, &write);
        }
        expected
    }

    /// `count` later writes over existing rows (chosen at random with `seed`):
    /// half change every field, half only the water level and battery. They are
    /// applied to `expected` and returned in write order.
    pub fn overwrites(&self, expected: &mut Expected, count: usize, seed: u64) -> Vec<Reading> {
        let mut rng = XorShift::new(seed_of(&[self.seed, SALT_OVERWRITE, seed]));
        let mut writes = Vec::with_capacity(count);
        for _ in 0..count {
            let device = 1 + rng.below(u64::from(self.devices)) as u32;
            let time = self.time_of(rng.below(self.steps()));
            let current = *expected.get(&(device, time)).unwrap_or_else(|| {
                panic!(
                    "overwrite target {} at {time} is not an existing row",
                    device_name(device)
                )
            });
            let level = current
                .water_level_cm
                .map(|v| round_to(v + 5.0 + rng.below(100) as f64 / 10.0, 1));
            let battery = current
                .battery_pct
                .map(|v| (v + 1 + rng.below(5) as i64).min(100));
            let write = if rng.below(2) == 0 {
                Reading {
                    tilt_deg: current.tilt_deg.map(|v| round_to(v + 0.07, 2)),
                    water_level_cm: level,
                    battery_pct: battery,
                    cover_open: current.cover_open.map(|v| !v),
                    ..current
                }
            } else {
                Reading {
                    tilt_deg: None,
                    water_level_cm: level,
                    battery_pct: battery,
                    cover_open: None,
                    ..current
                }
            };
            apply(expected, &write);
            writes.push(write);
        }
        writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_like_the_server() {
        assert_eq!(rfc3339(DEFAULT_START), "2025-12-01T00:00:00Z");
        assert_eq!(rfc3339(DEFAULT_START + 300), "2025-12-01T00:05:00Z");
        assert_eq!(
            rfc3339(DEFAULT_START + 31 * DAY - 1),
            "2025-12-31T23:59:59Z"
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(sql_timestamp(DEFAULT_START + 3_661), "2025-12-01 01:01:01");
    }

    #[test]
    fn lines_escape_tags_and_mark_integers() {
        let r = Reading {
            device: 7,
            district: "high tech",
            time: DEFAULT_START,
            tilt_deg: Some(0.5),
            water_level_cm: Some(23.4),
            battery_pct: Some(87),
            cover_open: Some(false),
        };
        assert_eq!(
            r.line(),
            "manhole,device=mh-00007,district=high\\ tech tilt_deg=0.5,water_level_cm=23.4,battery_pct=87i,cover_open=false 1764547200"
        );
        let partial = Reading {
            tilt_deg: None,
            battery_pct: None,
            cover_open: None,
            ..r
        };
        assert_eq!(
            partial.line(),
            "manhole,device=mh-00007,district=high\\ tech water_level_cm=23.4 1764547200"
        );
    }

    #[test]
    fn workload_is_deterministic_and_merges() {
        let w = Workload {
            devices: 50,
            ..Workload::default()
        };
        let writes = w.writes();
        assert_eq!(writes, w.writes());
        let expected = w.expected();
        assert_eq!(expected.len() as u64, w.rows());
        assert!(writes.len() as u64 > w.rows(), "some retries are generated");
        // Every expected row is complete and carries the values of its last write.
        for row in expected.values() {
            assert!(row.tilt_deg.is_some() && row.water_level_cm.is_some());
            assert!(row.battery_pct.is_some() && row.cover_open.is_some());
        }
        let mut newest = std::collections::HashMap::new();
        let mut late = 0;
        for write in &writes {
            let seen = newest.entry(write.device).or_insert(i64::MIN);
            if write.time < *seen {
                late += 1;
            } else {
                *seen = write.time;
            }
        }
        assert!(
            late > 0,
            "some readings arrive after newer readings of their device"
        );
    }

    #[test]
    fn values_are_realistic_and_rounded() {
        let w = Workload {
            devices: 200,
            ..Workload::default()
        };
        let mut jumps = 0;
        for device in 1..=w.devices {
            for step in 0..w.steps() {
                let r = w.reading(device, step);
                let tilt = r.tilt_deg.unwrap_or_default();
                let level = r.water_level_cm.unwrap_or_default();
                assert_eq!(tilt, round_to(tilt, 2));
                assert_eq!(level, round_to(level, 1));
                assert!((0.0..=140.0).contains(&level), "{level}");
                assert!((5..=100).contains(&r.battery_pct.unwrap_or_default()));
                if tilt > 15.0 {
                    jumps += 1;
                } else {
                    assert!((0.3..=0.7).contains(&tilt), "{tilt}");
                }
            }
        }
        assert!(jumps > 0, "rare tilt jumps happen");
    }
}
