//! Every object key and local file name citytsdb uses, built in one place.
//!
//! Names chosen by users (databases, tables) never appear in keys: they are mapped
//! to numeric ids by the catalog, so any UTF-8 name is safe.
//!
//! The object store:
//!
//! ```text
//! catalog/log/<seq>.json                          catalog records, create-only
//! catalog/checkpoint/<seq>.json.zst               the catalog as of record <seq> (zstd JSON)
//! segments/<db>/<table>/<day>/<id>.parquet        a segment
//! segments/<db>/<table>/<day>/<id>.index          its tag index
//! series/<db>/<table>/<seq>.{full,delta}.arrow    series registry files
//! ```
//!
//! The data directory:
//!
//! ```text
//! <data-dir>/LOCK                   held by the process that has the directory open
//! <data-dir>/NODE                   this node's id, named in the catalog records it writes
//! <data-dir>/wal/<seq>.wal          the write-ahead log
//! <data-dir>/store/                 the embedded default object store
//! <data-dir>/alerts/rules.json      registered alert rules
//! <data-dir>/alerts/state.json      alert instance states
//! <data-dir>/alerts/outbox.jsonl    the notification outbox, a journal of changes
//! <data-dir>/alerts/history.jsonl   alert state changes, newest last
//! <data-dir>/auth/tokens.json       API tokens (their SHA-256 only)
//! <data-dir>/mqtt/dead-letter.jsonl MQTT messages no write would take, newest last
//! <data-dir>/mqtt/dead-letter.jsonl.1  the previous dead-letter file, once it was full
//! ```

use std::path::{Path, PathBuf};

use object_store::path::Path as ObjectPath;

/// Key of catalog record `seq`.
pub fn catalog_record(seq: u64) -> ObjectPath {
    ObjectPath::from(format!("catalog/log/{seq:020}.json"))
}

/// Prefix of the catalog records.
pub fn catalog_record_prefix() -> ObjectPath {
    ObjectPath::from("catalog/log")
}

/// Parses the number out of a catalog record's key, if it is one.
pub fn catalog_record_seq(path: &ObjectPath) -> Option<u64> {
    let mut parts = path.parts();
    (parts.next()?.as_ref() == "catalog" && parts.next()?.as_ref() == "log").then_some(())?;
    number_json(path)
}

/// Key of the catalog checkpoint holding the state as of record `seq`.
pub fn catalog_checkpoint(seq: u64) -> ObjectPath {
    ObjectPath::from(format!("catalog/checkpoint/{seq:020}.json.zst"))
}

/// Prefix of the catalog checkpoints.
pub fn catalog_checkpoint_prefix() -> ObjectPath {
    ObjectPath::from("catalog/checkpoint")
}

/// Parses the record number out of a checkpoint's key, if it is one.
pub fn catalog_checkpoint_seq(path: &ObjectPath) -> Option<u64> {
    let mut parts = path.parts();
    (parts.next()?.as_ref() == "catalog" && parts.next()?.as_ref() == "checkpoint").then_some(())?;
    path.filename()?.strip_suffix(".json.zst")?.parse().ok()
}

/// Parses the version out of a whole catalog snapshot's key
/// (`catalog/<version>.json`, as stores before the catalog log wrote them).
pub fn legacy_catalog_version(path: &ObjectPath) -> Option<u64> {
    (path.parts().count() == 2).then_some(())?;
    number_json(path)
}

fn number_json(path: &ObjectPath) -> Option<u64> {
    path.filename()?.strip_suffix(".json")?.parse().ok()
}

/// Key of a segment's Parquet file.
pub fn segment_file(db_id: u32, table_id: u32, day: i64, segment_id: u32) -> ObjectPath {
    ObjectPath::from(format!(
        "segments/{db_id}/{table_id}/{day}/{segment_id:010}.parquet"
    ))
}

/// Key of a segment's tag index, beside its Parquet file.
pub fn segment_index(db_id: u32, table_id: u32, day: i64, segment_id: u32) -> ObjectPath {
    ObjectPath::from(format!(
        "segments/{db_id}/{table_id}/{day}/{segment_id:010}.index"
    ))
}

/// Key of a table's series registry file `id` (ids are shared with segments): the
/// series a flush touched, or (`full`) every series.
pub fn series_file(db_id: u32, table_id: u32, id: u32, full: bool) -> ObjectPath {
    let kind = if full { "full" } else { "delta" };
    ObjectPath::from(format!("series/{db_id}/{table_id}/{id:010}.{kind}.arrow"))
}

/// The local directory of WAL files under a data directory.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

/// The WAL file with sequence number `seq`.
pub fn wal_file(wal_dir: &Path, seq: u64) -> PathBuf {
    wal_dir.join(format!("{seq:020}.wal"))
}

/// Parses a WAL file's sequence number from its file name.
pub fn wal_seq(file_name: &str) -> Option<u64> {
    file_name.strip_suffix(".wal")?.parse().ok()
}

/// The file holding the id of the node a data directory is.
pub fn node_file(data_dir: &Path) -> PathBuf {
    data_dir.join("NODE")
}

/// The file locked by the process that has a data directory open.
pub fn lock_file(data_dir: &Path) -> PathBuf {
    data_dir.join("LOCK")
}

/// The local directory the embedded default object store uses.
pub fn local_store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}

/// The directory of the alert engine's files.
pub fn alerts_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("alerts")
}

/// The registered alert rules.
pub fn alert_rules_file(data_dir: &Path) -> PathBuf {
    alerts_dir(data_dir).join("rules.json")
}

/// Alert instance states (and, written by earlier versions, the outbox).
pub fn alert_state_file(data_dir: &Path) -> PathBuf {
    alerts_dir(data_dir).join("state.json")
}

/// The notification outbox: its changes, one JSON object a line.
pub fn alert_outbox_file(data_dir: &Path) -> PathBuf {
    alerts_dir(data_dir).join("outbox.jsonl")
}

/// Alert state changes, one JSON object a line.
pub fn alert_history_file(data_dir: &Path) -> PathBuf {
    alerts_dir(data_dir).join("history.jsonl")
}

/// The directory of the API tokens.
pub fn auth_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("auth")
}

/// The API tokens (their SHA-256 only).
pub fn tokens_file(data_dir: &Path) -> PathBuf {
    auth_dir(data_dir).join("tokens.json")
}

/// MQTT messages the subscriber could not write and kept aside, one JSON object a line.
pub fn mqtt_dead_letter_file(data_dir: &Path) -> PathBuf {
    data_dir.join("mqtt").join("dead-letter.jsonl")
}

/// Where a full dead-letter file is moved, replacing the one moved before.
pub fn rotated_of(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    path.with_file_name(name)
}

/// The temporary file `path` is written to before it is renamed into place.
pub fn temporary_of(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(catalog_record_seq(&catalog_record(42)), Some(42));
        assert_eq!(catalog_checkpoint_seq(&catalog_checkpoint(7)), Some(7));
        assert_eq!(catalog_record_seq(&catalog_checkpoint(7)), None);
        assert_eq!(
            legacy_catalog_version(&ObjectPath::from("catalog/00000000000000000003.json")),
            Some(3)
        );
        assert_eq!(legacy_catalog_version(&catalog_record(3)), None);
        let f = wal_file(Path::new("/d/wal"), 7);
        assert_eq!(wal_seq(f.file_name().unwrap().to_str().unwrap()), Some(7));
        assert_eq!(
            segment_file(1, 2, 20425, 3).as_ref(),
            "segments/1/2/20425/0000000003.parquet"
        );
    }
}
