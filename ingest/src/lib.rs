//! citytsdb's ingest: every way rows come in, from a request body to durable,
//! per-table Arrow batches.
//!
//! 1. `ingestor.rs` — the [`Ingestor`] that HTTP, InfluxDB's write paths, MQTT and
//!    `citytsdb import` all write through: parse, validate, build batches, write,
//!    tell the [`WriteListener`]s; its [`IngestError`] says whose fault a failure is.
//! 2. `line_protocol.rs` — parses each line of InfluxDB line protocol on borrowed
//!    bytes; a bad line becomes a [`LineError`] with its line, column and reason.
//! 3. `write.rs` — [`validate`] checks every parsed line against the tables'
//!    schemas (growing them for new columns; a type conflict rejects the line), under
//!    the storage engine's schema lock; [`build_batches`] then turns the accepted
//!    lines into one Arrow batch per table, outside that lock.
//! 4. `convert/` — CSV and JSON lines to line protocol, and files cut into
//!    batches that remember each line's origin (`citytsdb import`).
//! 5. `mqtt.rs` — the MQTT subscriber (cargo feature `mqtt`): QoS 1 on a
//!    persistent session, messages acknowledged once their rows are durable, or
//!    once a message refused for good is kept in `mqtt/dead_letter.rs`'s file.
//! 6. `escape.rs` — writes names and values as line protocol, for the converters.
//!
//! The batches go to `citytsdb_storage::Engine::write`, which makes them durable.

pub mod convert;
pub mod escape;
pub mod ingestor;
pub mod line_protocol;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod write;

pub use ingestor::{
    check_db_name, Fault, IngestError, IngestMetrics, Ingestor, Outcome, Prepared, WriteListener,
    WriteOptions,
};
pub use line_protocol::{FieldValue, LineError, ParsedLine};
pub use write::{
    build_batches, parse_body, parse_body_into, return_lines, spare_lines, validate,
    validate_against, validate_with, KnownSeries, Limits, Line, NoSeries, ParsedBody, Precision,
    ValidatedWrite,
};
