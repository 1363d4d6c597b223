//! The WAL (`storage/src/wal.rs`): one write of 1,000 lines of the city workload
//! (four tables), encoded as a record and appended to a WAL file in a temporary
//! directory on the local disk.
//!
//! - `encode`: `WalEntry::encode`, the Arrow IPC streams and framing;
//! - `append_write`: `WalWriter::append` and `sync(false)`, handing the record to
//!   the OS (what a `no_sync` write waits for);
//! - `append_fsync`: `append` and `sync(true)`, the record durable, as a write
//!   alone in its group commit waits for.
//!
//! Throughput is rows per second. Files are rotated and deleted every 64 MiB
//! outside the timed part, so the disk never fills.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use citytsdb_benches::fixtures::{city_batches, city_body};
use citytsdb_storage::wal::{list_files, WalEntry, WalWriter};
use criterion::{criterion_group, Criterion, Throughput};

/// Lines in the write.
const LINES: usize = 1_000;
/// A WAL file is closed and deleted past this size.
const ROTATE_BYTES: u64 = 64 << 20;

/// Appends `payload` `iters` times, each followed by a sync, and returns the time
/// spent in the appends and syncs.
fn append(dir: &Path, payload: &[u8], fsync: bool, iters: u64) -> Duration {
    let mut writer = WalWriter::create(dir, next_seq(dir)).expect("creating a WAL file");
    let mut spent = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        writer.append(black_box(payload)).expect("append");
        writer.sync(fsync).expect("sync");
        spent += start.elapsed();
        if writer.bytes() > ROTATE_BYTES {
            let closed = writer.rotate().expect("rotating the WAL");
            remove_upto(dir, closed);
        }
    }
    drop(writer);
    remove_upto(dir, u64::MAX);
    spent
}

fn next_seq(dir: &Path) -> u64 {
    let files = list_files(dir).expect("listing the WAL");
    files.last().map_or(1, |(seq, _)| seq + 1)
}

fn remove_upto(dir: &Path, seq: u64) {
    for (s, path) in list_files(dir).expect("listing the WAL") {
        if s <= seq {
            std::fs::remove_file(path).expect("removing a WAL file");
        }
    }
}

fn wal(c: &mut Criterion) {
    let write = city_batches(&city_body(1_000, 300, LINES));
    let entry = WalEntry {
        db: "city".to_string(),
        tables: write.batches.clone(),
    };
    let payload = entry.encode().expect("encoding the entry");
    let dir = tempfile::tempdir().expect("a temporary directory");

    let mut g = c.benchmark_group("wal");
    g.throughput(Throughput::Elements(write.rows() as u64));
    g.bench_function("encode", |b| b.iter(|| black_box(&entry).encode()));
    g.bench_function("append_write", |b| {
        b.iter_custom(|iters| append(dir.path(), &payload, false, iters))
    });
    // An fsync takes milliseconds: fewer, longer samples.
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("append_fsync", |b| {
        b.iter_custom(|iters| append(dir.path(), &payload, true, iters))
    });
    g.finish();
}

criterion_group!(benches, wal);
