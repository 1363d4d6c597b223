//! The end-to-end suite: the real `citytsdb` binary over real HTTP, one module per
//! promise, gathered in one test binary so the suite links once.
//!
//! The binary under test is `CITYTSDB_BIN`, or the `citytsdb` that `cargo build`
//! made beside this test binary (built first if missing); see `citytsdb_tests`.

mod alerts;
mod auth;
mod compat_writes;
mod deletes;
mod differential;
mod durability;
mod faults;
mod flush;
mod formats;
mod gen;
mod http_errors;
mod import;
mod lifecycle;
mod load;
mod metrics;
mod mqtt;
mod oracle;
mod pruning;
mod query_api;
mod retention;
mod rollups;
mod s3;
mod slt;
mod sql_features;
mod torn_wal;
