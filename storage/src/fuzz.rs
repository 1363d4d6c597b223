//! What the storage crate's fuzz targets (`wal/fuzz.rs`, `catalog/fuzz.rs`) share.

use proptest::test_runner::Config;

/// Cases per property: `CITYTSDB_FUZZ_CASES` (the long mode), else `quick`.
pub(crate) fn config(quick: u32) -> Config {
    let cases = std::env::var("CITYTSDB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(quick);
    Config {
        cases,
        // Filters reject a share of every run's cases; a long run must not stop on that.
        max_local_rejects: u32::MAX,
        max_global_rejects: u32::MAX,
        ..Config::default()
    }
}
