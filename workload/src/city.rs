//! The four-table city workload of `citytsdb gen`, as line protocol,
//! deterministic for a seed.
//!
//! Four tables, as DESIGN.md names them, the devices split among them:
//!
//! - `manhole` (40%): `tilt_deg` near level with rare jumps past 15° (the lid
//!   open, `cover_open`), `water_level_cm` below the road rising with rain,
//!   `battery_pct` (integer) draining slowly.
//! - `parking` (20%, tag `street`): `occupied` (integer) following the working day
//!   up to the device's `capacity`.
//! - `traffic` (20%): `flow` (integer, vehicles per interval) peaking in the rush
//!   hours, `speed_kmh` falling as flow rises.
//! - `sewage` (20%): `flow_lps` with a daily cycle and rain, `cod_mgl`.
//!
//! Rain events (a few hours, some days) raise water and sewage flow city-wide.
//! And the quirks of real feeds: devices that skip readings or go down for hours,
//! batches delivered out of order, retried lines sent twice, UTF-8 district
//! names, and tag values that need escaping (`high tech`, `Huayuan Rd, north`).

use std::collections::VecDeque;
use std::io::{self, Write};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct City {
    /// Devices in all (40% covers, 20% each parking, traffic and sewage).
    pub devices: u32,
    /// Days of readings.
    pub days: u32,
    /// First reading, Unix seconds.
    pub start: i64,
    /// Seconds between a device's readings (at least 1).
    pub interval: i64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Only this table's devices (`None`: all four).
    pub only: Option<Table>,
}

/// The city's four tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Manhole covers: 40% of the devices.
    Manhole,
    /// Parking cameras.
    Parking,
    /// Junction counters.
    Traffic,
    /// Sewage outlets.
    Sewage,
}

impl Table {
    /// The table of device `device`.
    pub fn of(device: u32) -> Table {
        match device % 5 {
            0 | 1 => Table::Manhole,
            2 => Table::Parking,
            3 => Table::Traffic,
            _ => Table::Sewage,
        }
    }

    /// The table named `name`, if it is one of the four.
    pub fn parse(name: &str) -> Option<Table> {
        [
            Table::Manhole,
            Table::Parking,
            Table::Traffic,
            Table::Sewage,
        ]
        .into_iter()
        .find(|t| t.name() == name)
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Manhole => "manhole",
            Table::Parking => "parking",
            Table::Traffic => "traffic",
            Table::Sewage => "sewage",
        }
    }
}

const DISTRICTS: [&str; 6] = [
    "金水区",
    "二七区",
    "中原区",
    "管城区",
    "high tech",
    "zhengdong",
];
const STREETS: [&str; 4] = ["Huayuan Rd, north", "Jinshui Rd", "Zhongzhou Ave", "文化路"];

/// SplitMix64: small, fast, and the same on every machine.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) from the parts that identify the choice.
fn unit(parts: &[u64]) -> f64 {
    let h = parts.iter().fold(0u64, |h, p| mix(h ^ p));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn escape(tag: &str) -> String {
    let mut out = String::with_capacity(tag.len());
    for c in tag.chars() {
        if matches!(c, ',' | ' ' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// The rain intensity (0 to 1) over the city at `t` seconds after the start.
fn rain(seed: u64, t: i64) -> f64 {
    let day = t.div_euclid(86_400) as u64;
    if unit(&[seed, 1, day]) > 0.3 {
        return 0.0;
    }
    let start = 3_600.0 * (2.0 + 18.0 * unit(&[seed, 2, day]));
    let hours = 2.0 + 3.0 * unit(&[seed, 3, day]);
    let into = (t.rem_euclid(86_400) as f64 - start) / 3_600.0;
    if into < 0.0 || into > hours {
        return 0.0;
    }
    (std::f64::consts::PI * into / hours).sin()
}

/// Hour of day as a fraction, 0 to 24.
fn hour(t: i64) -> f64 {
    t.rem_euclid(86_400) as f64 / 3_600.0
}

struct Gen {
    seed: u64,
    start: i64,
}

impl Gen {
    fn line(&self, device: u32, step: u64, t: i64) -> Option<String> {
        let seed = self.seed;
        let d = u64::from(device);
        let r = |k: u64| unit(&[seed, 10 + k, d, step]);
        let district = DISTRICTS[(unit(&[seed, 4, d]) * DISTRICTS.len() as f64) as usize];
        // A device down for a few hours one day in ten; else a skipped reading now and then.
        let day = (t - self.start).div_euclid(86_400) as u64;
        if unit(&[seed, 5, d, day]) < 0.1 {
            let down = 24.0 * unit(&[seed, 6, d, day]);
            if (hour(t) - down).abs() < 1.5 {
                return None;
            }
        }
        if r(0) < 0.005 {
            return None;
        }
        let wet = rain(seed, t - self.start);
        let daily = (2.0 * std::f64::consts::PI * (hour(t) - 9.0) / 24.0).sin();
        let kind = device % 5;
        let name = |prefix: &str| format!("{prefix}-{device:05}");
        Some(
            match kind {
                0 | 1 => {
                    let lifted = r(1) < 0.0005;
                    let tilt = if lifted {
                        15.0 + 25.0 * r(2)
                    } else {
                        2.0 * r(2)
                    };
                    let base = -150.0 + 60.0 * unit(&[seed, 7, d]);
                    let level = base + 10.0 * daily + 120.0 * wet + 4.0 * (r(3) - 0.5);
                    let battery = 100 - (t - self.start) / 86_400 / 3 - (d % 20) as i64;
                    format!(
                    "manhole,device={},district={} tilt_deg={},water_level_cm={},battery_pct={}i,cover_open={}",
                    name("mh"),
                    escape(district),
                    round(tilt, 2),
                    round(level.min(0.0), 1),
                    battery.max(0),
                    lifted
                )
                }
                2 => {
                    let capacity = 40 + (unit(&[seed, 8, d]) * 160.0) as i64;
                    let busy = if (8.0..19.0).contains(&hour(t)) {
                        0.85
                    } else {
                        0.25
                    };
                    let occupied =
                        ((busy + 0.1 * (r(4) - 0.5)).clamp(0.0, 1.0) * capacity as f64) as i64;
                    let street = STREETS[(unit(&[seed, 9, d]) * STREETS.len() as f64) as usize];
                    format!(
                        "parking,device={},district={},street={} occupied={}i,capacity={}i",
                        name("pk"),
                        escape(district),
                        escape(street),
                        occupied,
                        capacity
                    )
                }
                3 => {
                    let h = hour(t);
                    let rush =
                        (-((h - 8.0).powi(2)) / 2.0).exp() + (-((h - 18.0).powi(2)) / 2.0).exp();
                    let night = if !(6.0..23.0).contains(&h) { 0.1 } else { 0.5 };
                    let flow = (300.0 * (night + rush) * (0.9 + 0.2 * r(5))) as i64;
                    let speed = (70.0 - 0.1 * flow as f64 - 15.0 * wet).max(5.0);
                    format!(
                        "traffic,device={},district={} flow={}i,speed_kmh={}",
                        name("tr"),
                        escape(district),
                        flow,
                        round(speed, 1)
                    )
                }
                _ => {
                    let flow = 40.0 + 15.0 * daily + 120.0 * wet + 5.0 * r(6);
                    let cod = 250.0 + 60.0 * daily - 80.0 * wet + 20.0 * r(7);
                    format!(
                        "sewage,device={},district={} flow_lps={},cod_mgl={}",
                        name("sw"),
                        escape(district),
                        round(flow, 2),
                        round(cod, 1)
                    )
                }
            } + &format!(" {t}"),
        )
    }
}

/// Writes the workload to `out`. Lines are in time order, except that now and then
/// a line arrives a few hundred lines late and a line is sent again (a retry).
/// Returns the number of lines written.
pub fn generate(args: &City, out: &mut impl Write) -> io::Result<u64> {
    let (start, interval) = (args.start, args.interval.max(1));
    let gen = Gen {
        seed: args.seed,
        start,
    };
    let steps = i64::from(args.days) * 86_400 / interval;
    let mut late: VecDeque<(u64, String)> = VecDeque::new();
    let mut written = 0u64;
    let mut index = 0u64;
    let emit = |line: &str, out: &mut dyn Write| -> io::Result<()> {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")
    };
    for step in 0..steps as u64 {
        let t = start + step as i64 * interval;
        for device in 1..=args.devices {
            if args.only.is_some_and(|t| t != Table::of(device)) {
                continue;
            }
            index += 1;
            while late.front().is_some_and(|(due, _)| *due <= index) {
                let (_, line) = late.pop_front().expect("checked");
                emit(&line, out)?;
                written += 1;
            }
            let Some(line) = gen.line(device, step, t) else {
                continue;
            };
            let q = unit(&[args.seed, 20, u64::from(device), step]);
            if q < 0.005 {
                late.push_back((index + 1 + (q * 60_000.0) as u64, line));
                continue;
            }
            emit(&line, out)?;
            written += 1;
            if q > 0.997 {
                late.push_back((index + 1 + ((q - 0.997) * 100_000.0) as u64, line));
            }
        }
    }
    for (_, line) in late {
        emit(&line, out)?;
        written += 1;
    }
    out.flush()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64) -> String {
        let args = City {
            devices: 50,
            days: 2,
            start: 1_764_547_200,
            interval: 900,
            seed,
            only: None,
        };
        let mut out = Vec::new();
        generate(&args, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn deterministic_with_every_table_and_the_quirks() {
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        for table in ["manhole,", "parking,", "traffic,", "sewage,"] {
            assert!(a.lines().any(|l| l.starts_with(table)), "{table}");
        }
        assert!(a.contains("high\\ tech") || a.contains("Huayuan\\ Rd\\,\\ north"));
        assert!(a.contains("区"));
        let lines: Vec<&str> = a.lines().collect();
        let times: Vec<i64> = lines
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            times.windows(2).any(|w| w[1] < w[0]),
            "some lines arrive late"
        );
        let mut sorted = lines.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert!(sorted.len() < lines.len(), "some lines are retried");
        // Every reading of a day, less dropouts: 50 devices x 192 steps.
        assert!(
            lines.len() > 8_000 && lines.len() < 9_700,
            "{}",
            lines.len()
        );
    }
}
