//! `GET /metrics`: the server's counters in Prometheus' text format (0.0.4).
//!
//! Each crate counts its own work (`Ingestor::metrics`, `QueryEngine::metrics`,
//! `Engine::metrics`, `AlertEngine::stats`); object-store calls are counted by
//! [`MeteredStore`], a wrapper around the store the server opened. Gauges (WAL and
//! buffer size, segments) are read when scraped.

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

use crate::http::AppState;

/// The object-store operations counted.
const OPERATIONS: [&str; 7] = [
    "put",
    "get",
    "get_ranges",
    "delete",
    "list",
    "copy",
    "rename",
];

/// Calls, failures and time of one kind of object-store operation.
#[derive(Debug, Default)]
struct OpCounts {
    calls: AtomicU64,
    errors: AtomicU64,
    nanos: AtomicU64,
}

/// Object-store operation counts, by [`OPERATIONS`].
#[derive(Debug, Default)]
pub struct StoreMetrics {
    ops: [OpCounts; OPERATIONS.len()],
}

impl StoreMetrics {
    fn record<T>(&self, op: usize, started: Instant, result: &Result<T>) {
        let c = &self.ops[op];
        c.calls.fetch_add(1, Relaxed);
        c.nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        if result.is_err() {
            c.errors.fetch_add(1, Relaxed);
        }
    }
}

/// An object store that counts the calls made through it.
#[derive(Debug)]
pub struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
    metrics: Arc<StoreMetrics>,
}

impl MeteredStore {
    /// `inner`, counted into `metrics`.
    pub fn new(inner: Arc<dyn ObjectStore>, metrics: Arc<StoreMetrics>) -> Self {
        Self { inner, metrics }
    }
}

impl std::fmt::Display for MeteredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Metered({})", self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for MeteredStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let t = Instant::now();
        let r = self.inner.put_opts(location, payload, opts).await;
        self.metrics.record(0, t, &r);
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let t = Instant::now();
        let r = self.inner.put_multipart_opts(location, opts).await;
        self.metrics.record(0, t, &r);
        r
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let t = Instant::now();
        let r = self.inner.get_opts(location, options).await;
        self.metrics.record(1, t, &r);
        r
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let t = Instant::now();
        let r = self.inner.get_ranges(location, ranges).await;
        self.metrics.record(2, t, &r);
        r
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let metrics = self.metrics.clone();
        self.inner
            .delete_stream(locations)
            .map(move |r| {
                metrics.record(3, Instant::now(), &r);
                r
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.metrics.ops[4].calls.fetch_add(1, Relaxed);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.metrics.ops[4].calls.fetch_add(1, Relaxed);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let t = Instant::now();
        let r = self.inner.list_with_delimiter(prefix).await;
        self.metrics.record(4, t, &r);
        r
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.copy_opts(from, to, options).await;
        self.metrics.record(5, t, &r);
        r
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.rename_opts(from, to, options).await;
        self.metrics.record(6, t, &r);
        r
    }
}

/// One metric family being written.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP citytsdb_{name} {help}");
        let _ = writeln!(self.0, "# TYPE citytsdb_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "citytsdb_{name} {value}");
        } else {
            let _ = writeln!(self.0, "citytsdb_{name}{{{labels}}} {value}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }
}

fn n(a: &AtomicU64) -> f64 {
    a.load(Relaxed) as f64
}

fn secs(a: &AtomicU64) -> f64 {
    a.load(Relaxed) as f64 / 1e9
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The text of `GET /metrics`.
pub fn render(app: &AppState) -> String {
    let mut o = Out(String::with_capacity(8 << 10));
    let w = app.ingestor.metrics();
    o.one(
        "writes_total",
        "counter",
        "Write requests (bodies) taken, over HTTP and MQTT.",
        n(&w.writes),
    );
    o.one(
        "write_bytes_total",
        "counter",
        "Bytes of write bodies, after decompression.",
        n(&w.bytes),
    );
    o.one("rows_written_total", "counter", "Rows written.", n(&w.rows));
    o.one(
        "rejected_lines_total",
        "counter",
        "Lines rejected (each with its error).",
        n(&w.rejected_lines),
    );
    o.one(
        "write_failures_total",
        "counter",
        "Writes the store refused or failed.",
        n(&w.failures),
    );

    let q = app.query.metrics();
    o.one(
        "queries_total",
        "counter",
        "Queries run to their end (HTTP and rules).",
        n(&q.queries),
    );
    o.one(
        "query_failures_total",
        "counter",
        "Queries that failed or were cancelled.",
        n(&q.failures),
    );
    o.family(
        "query_duration_seconds",
        "histogram",
        "Time from a query's start to its last row.",
    );
    for (bound, count) in citytsdb_query::LATENCY_BUCKETS.iter().zip(&q.buckets) {
        o.sample(
            "query_duration_seconds_bucket",
            &format!("le=\"{bound}\""),
            n(count),
        );
    }
    o.sample(
        "query_duration_seconds_bucket",
        "le=\"+Inf\"",
        n(&q.queries),
    );
    o.sample("query_duration_seconds_sum", "", secs(&q.nanos));
    o.sample("query_duration_seconds_count", "", n(&q.queries));
    let plans = app.query.plan_cache();
    o.one(
        "plan_cache_hits_total",
        "counter",
        "Statements run from a kept plan (dashboards and rules repeat theirs).",
        n(&plans.hits),
    );
    o.one(
        "plan_cache_whole_hits_total",
        "counter",
        "Of those, runs of a kept physical plan as it was (latest readings).",
        n(&plans.whole),
    );
    o.one(
        "plan_cache_misses_total",
        "counter",
        "Statements planned afresh (new, not kept, or their tables' schemas changed).",
        n(&plans.misses),
    );
    o.one(
        "plan_cache_entries",
        "gauge",
        "Statements whose plans are kept.",
        plans.len() as f64,
    );

    let s = &app.storage;
    o.one(
        "wal_bytes",
        "gauge",
        "Bytes in WAL files not yet persisted to segments.",
        s.wal_bytes() as f64,
    );
    o.one(
        "buffer_bytes",
        "gauge",
        "Bytes of rows waiting in memory for a flush.",
        s.buffered_bytes() as f64,
    );
    o.one(
        "buffer_rows",
        "gauge",
        "Rows waiting in memory for a flush.",
        s.buffered_rows() as f64,
    );
    let catalog = s.catalog();
    o.family("segments", "gauge", "Segments per table.");
    let mut sizes = Vec::new();
    for (db, table, t) in catalog.tables() {
        let labels = format!("db=\"{}\",table=\"{}\"", label(db), label(table));
        o.sample("segments", &labels, t.segment_count() as f64);
        sizes.push((labels, t.segments().map(|x| x.size).sum::<u64>()));
    }
    o.family("segment_bytes", "gauge", "Bytes of segments per table.");
    for (labels, bytes) in sizes {
        o.sample("segment_bytes", &labels, bytes as f64);
    }
    let e = s.metrics();
    o.one(
        "flushes_total",
        "counter",
        "Flushes that wrote segments.",
        n(&e.flushes),
    );
    o.one(
        "flush_failures_total",
        "counter",
        "Flushes that failed (their rows stay in the WAL).",
        n(&e.flush_failures),
    );
    o.one(
        "flushed_rows_total",
        "counter",
        "Rows flushes wrote to segments.",
        n(&e.flushed_rows),
    );
    o.one(
        "flush_seconds_total",
        "counter",
        "Time spent flushing.",
        secs(&e.flush_nanos),
    );
    o.one(
        "compactions_total",
        "counter",
        "Compactions done.",
        n(&e.compactions),
    );
    o.one(
        "compaction_failures_total",
        "counter",
        "Compactions that failed.",
        n(&e.compaction_failures),
    );
    o.one(
        "compacted_bytes_total",
        "counter",
        "Bytes of segments compactions read.",
        n(&e.compacted_bytes),
    );
    o.one(
        "compaction_seconds_total",
        "counter",
        "Time spent compacting.",
        secs(&e.compaction_nanos),
    );

    if let Some(store) = &app.store_metrics {
        o.family(
            "object_store_operations_total",
            "counter",
            "Object-store calls, by operation.",
        );
        for (op, c) in OPERATIONS.iter().zip(&store.ops) {
            o.sample(
                "object_store_operations_total",
                &format!("operation=\"{op}\""),
                n(&c.calls),
            );
        }
        o.family(
            "object_store_errors_total",
            "counter",
            "Object-store calls that failed, by operation.",
        );
        for (op, c) in OPERATIONS.iter().zip(&store.ops) {
            o.sample(
                "object_store_errors_total",
                &format!("operation=\"{op}\""),
                n(&c.errors),
            );
        }
        o.family(
            "object_store_seconds_total",
            "counter",
            "Time spent in object-store calls, by operation.",
        );
        for (op, c) in OPERATIONS.iter().zip(&store.ops) {
            o.sample(
                "object_store_seconds_total",
                &format!("operation=\"{op}\""),
                secs(&c.nanos),
            );
        }
    }

    let a = app.alerts.stats();
    o.one(
        "rule_evaluations_total",
        "counter",
        "Rule evaluations run.",
        n(&a.evaluations),
    );
    o.one(
        "rule_evaluation_failures_total",
        "counter",
        "Rule evaluations that failed.",
        n(&a.evaluation_failures),
    );
    o.one(
        "notifications_sent_total",
        "counter",
        "Notifications delivered.",
        n(&a.notifications_sent),
    );
    o.one(
        "notifications_failed_total",
        "counter",
        "Notification attempts that failed (each is retried).",
        n(&a.notifications_failed),
    );
    o.one(
        "notifications_dropped_total",
        "counter",
        "Notifications dropped, never delivered, to make room in a full alert outbox (--max-alert-outbox).",
        n(&a.notifications_dropped),
    );
    o.one(
        "alert_outbox_notifications",
        "gauge",
        "Notifications waiting in the alert outbox for their receivers.",
        app.alerts.outbox_len() as f64,
    );
    o.one(
        "fast_path_batches_total",
        "counter",
        "Written batches the alert fast path checked.",
        n(&a.fast_path_batches),
    );
    o.one(
        "fast_path_dropped_total",
        "counter",
        "Written batches the alert fast path could not take in time (their rules still run on schedule).",
        n(&a.fast_path_dropped),
    );
    if let Some(mqtt) = &app.mqtt {
        o.one(
            "mqtt_connected",
            "gauge",
            "1 while the MQTT subscriber is connected to its broker.",
            if mqtt.connected() { 1.0 } else { 0.0 },
        );
        for (name, help, value) in mqtt.counters() {
            o.one(name, "counter", help, value as f64);
        }
    }
    o.0
}
