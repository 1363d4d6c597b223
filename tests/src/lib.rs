//! End-to-end tests of citytsdb: the real `citytsdb` binary over real HTTP.
//!
//! The path of every test through this crate:
//!
//! 1. [`server`] finds the binary (`CITYTSDB_BIN`, or `cargo build -p
//!    citytsdb-server --bin citytsdb` once per test process), starts it on a fresh port and data
//!    directory, and talks to it with bounded HTTP calls; it stops it with SIGTERM
//!    or crashes it with SIGKILL, and restarts it on the same data directory.
//! 2. [`workload`] generates the city's manhole readings deterministically, as
//!    line-protocol chunks to write and as the rows the database must then hold
//!    (after InfluxDB's merge rule for repeated series and timestamps).
//! 3. [`oracle`] hands those rows and the analysts' SQL to DuckDB
//!    (`oracle/duckdb_oracle.py`) and compares its answers with the server's.
//! 4. [`plan`] reads the pruning counters out of `EXPLAIN ANALYZE`, and [`wal`]
//!    reads and tears the write-ahead log files the way a crash would.
//!
//! The tests themselves live in `e2e/`, one test binary with a module per promise
//! (oracle answers, durability under `kill -9`, torn WAL tails, pruning, HTTP
//! errors, formats, alerts, MQTT, import). This crate depends on nothing heavier
//! than an HTTP client, JSON and temporary directories, so it builds and links in
//! seconds.
//!
//! Running them: `python3 -m pip install -r tests/requirements.txt` once
//! (the oracle needs the `duckdb` package; without it the oracle test fails), then
//! `cargo test -p citytsdb-tests` (one area: `cargo test -p citytsdb-tests --test e2e
//! durability::`). `CITYTSDB_BIN=/path/to/citytsdb` uses a binary
//! already built instead of building one; `PYTHON` picks the interpreter that runs
//! the oracle (default `python3`).

pub mod alertmanager;
pub mod mosquitto;
pub mod oracle;
pub mod plan;
pub mod prometheus;
pub mod receiver;
pub mod s3;
pub mod server;
pub mod slt;
pub mod sqlgen;
pub mod wal;

pub use citytsdb_workload::manhole as workload;
pub use server::{Client, Server};
pub use workload::{Expected, Reading, Workload};

/// One row of a JSON query answer: column name to value.
pub type Row = serde_json::Map<String, serde_json::Value>;
