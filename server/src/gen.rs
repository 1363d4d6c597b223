//! `citytsdb gen`: the four-table city workload (`citytsdb_workload::city`) as
//! line protocol on stdout, deterministic for a seed.

use std::io::Write;

use citytsdb_storage::units::{parse_duration, parse_rfc3339};
use citytsdb_workload::city::{generate as write_city, City, Table};
use clap::Args;

use crate::error::{Error, Result};

/// Flags of `citytsdb gen`.
#[derive(Debug, Clone, Args)]
pub struct GenArgs {
    /// Devices in all (40% covers, 20% each parking, traffic and sewage)
    #[arg(long, default_value_t = 1000)]
    pub devices: u32,
    /// Days of readings
    #[arg(long, default_value_t = 1)]
    pub days: u32,
    /// First reading, RFC 3339
    #[arg(long, default_value = "2025-12-01T00:00:00Z")]
    pub start: String,
    /// Time between a device's readings, e.g. 5m, 30s
    #[arg(long, default_value = "5m")]
    pub interval: String,
    /// Seed of every random choice
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Only this table's devices (manhole, parking, traffic or sewage): --devices
    /// still counts all four, so 25000 devices give 10000 covers
    #[arg(long)]
    pub table: Option<String>,
}

/// Writes the workload the flags describe to `out`; returns the lines written.
pub fn generate(args: &GenArgs, out: &mut impl Write) -> Result<u64> {
    let start = parse_rfc3339(&args.start).map_err(|e| Error::setting("start", e))?;
    let interval = parse_duration(&args.interval).map_err(|e| Error::setting("interval", e))?;
    if args.devices == 0 || args.days == 0 {
        return Err(Error::Invalid("devices and days must be at least 1".into()));
    }
    let only = match &args.table {
        None => None,
        Some(t) => Some(Table::parse(t).ok_or_else(|| {
            Error::Invalid(format!(
                "table: '{t}' is not one of manhole, parking, traffic, sewage"
            ))
        })?),
    };
    let city = City {
        devices: args.devices,
        days: args.days,
        start: start.div_euclid(1_000_000_000),
        interval: interval.as_secs().max(1) as i64,
        seed: args.seed,
        only,
    };
    write_city(&city, out).map_err(|e| Error::io("writing the workload", e))
}
