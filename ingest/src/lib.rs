//! citytsdb's ingest: from a request body to validated, per-table Arrow batches.
//!
//! 1. `line_protocol.rs` — parses each line of InfluxDB line protocol on borrowed
//!    bytes; a bad line becomes a [`LineError`] with its line, column and reason.
//! 2. `write.rs` — [`validate`] checks every parsed line against the tables'
//!    schemas (growing them for new columns; a type conflict rejects the line), under
//!    the storage engine's schema lock; [`build_batches`] then turns the accepted
//!    lines into one Arrow batch per table, outside that lock.
//!
//! 3. `escape.rs` — writes names and values as line protocol, for the converters
//!    from other formats.
//!
//! The batches go to `citytsdb_storage::Engine::write`, which makes them durable.

pub mod escape;
pub mod line_protocol;
pub mod write;

pub use line_protocol::{FieldValue, LineError, ParsedLine};
pub use write::{build_batches, parse_body, validate, ParsedBody, Precision, ValidatedWrite};
