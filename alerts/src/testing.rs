//! An alert engine on in-memory twins, for the unit tests: a clock moved by
//! hand, queries answering what the test says, a recording notifier, and a
//! temporary data directory. The test drives it one step at a time.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    Array, BooleanArray, Float64Array, RecordBatch, StringArray, TimestampNanosecondArray,
};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde_json::Value;
use tempfile::TempDir;

use crate::store::Files;
use crate::{
    AlertEngine, AlertTables, Driver, ManualClock, MemoryQueries, RecordingNotifier, RuleError,
    Seams, OUTBOX_LIMIT,
};

/// 2025-12-01T00:00:00Z, when every test starts.
pub const T0: i64 = 1_764_547_200_000_000_000;
/// One second in nanoseconds.
pub const S: i64 = 1_000_000_000;
/// The database every rule reads.
pub const DB: &str = "city";
/// Where every rule's webhook goes.
pub const HOOK: &str = "http://hooks.test/alerts";
/// A rule evaluated on its schedule.
pub const TILTED: &str =
    "SELECT device, max(tilt_deg) AS tilt_deg FROM manhole GROUP BY device HAVING max(tilt_deg) > 15";
/// A second rule evaluated on its schedule.
pub const TILTED_LONG: &str =
    "SELECT device, max(tilt_deg) AS tilt_deg FROM manhole GROUP BY device HAVING max(tilt_deg) > 40";
/// A rule checked on write: a plain filter of `manhole`.
pub const TILTED_NOW: &str = "SELECT device, tilt_deg FROM manhole WHERE tilt_deg > 15";

/// The `manhole` table: time, the device tag, the tilt field.
pub fn manhole() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        ),
        Field::new("device", DataType::Utf8, true),
        Field::new("tilt_deg", DataType::Float64, true),
    ]))
}

/// The rules' answers: a device and its tilt.
pub fn answer_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, true),
        Field::new("tilt_deg", DataType::Float64, true),
    ]))
}

/// An answer with one row per `(device, tilt)`.
pub fn answer(rows: &[(&str, f64)]) -> RecordBatch {
    let devices: StringArray = rows.iter().map(|(d, _)| Some(*d)).collect();
    let tilts: Float64Array = rows.iter().map(|(_, t)| Some(*t)).collect();
    RecordBatch::try_new(answer_schema(), vec![Arc::new(devices), Arc::new(tilts)])
        .expect("columns match the schema")
}

/// A written batch of `manhole` with one reading per `(device, time, tilt)`.
pub fn readings(rows: &[(&str, i64, f64)]) -> RecordBatch {
    let times = TimestampNanosecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())
        .with_timezone("UTC");
    let devices: StringArray = rows.iter().map(|r| Some(r.0)).collect();
    let tilts: Float64Array = rows.iter().map(|r| Some(r.2)).collect();
    RecordBatch::try_new(
        manhole(),
        vec![Arc::new(times), Arc::new(devices), Arc::new(tilts)],
    )
    .expect("columns match the schema")
}

/// What [`TILTED_NOW`] does to a batch: the rows tilted past 15 degrees, as
/// (device, tilt_deg).
pub fn tilted_now(batch: &RecordBatch) -> RecordBatch {
    let tilt = batch
        .column_by_name("tilt_deg")
        .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
        .expect("a float tilt_deg column");
    let keep: BooleanArray = tilt.iter().map(|t| t.map(|t| t > 15.0)).collect();
    let projected = batch
        .project(&[
            batch.schema().index_of("device").expect("device"),
            batch.schema().index_of("tilt_deg").expect("tilt_deg"),
        ])
        .expect("project");
    filter_record_batch(&projected, &keep).expect("filter")
}

/// A rule of the covers department posting to [`HOOK`].
pub fn rule(name: &str, sql: &str, for_: &str, keep_firing_for: &str) -> Value {
    serde_json::json!({
        "name": name, "department": "covers", "db": DB, "sql": sql,
        "every": "15s", "for": for_, "keep_firing_for": keep_firing_for,
        "annotations": {"summary": "{{device}} tilted {{tilt_deg}} degrees"},
        "webhook": HOOK,
    })
}

/// An engine on twins, driven by the test.
pub struct Harness {
    /// The data directory (`alerts/` is under it).
    pub dir: TempDir,
    /// Time, as the engine sees it.
    pub clock: Arc<ManualClock>,
    /// The data, as the engine sees it.
    pub queries: Arc<MemoryQueries>,
    /// What was posted.
    pub notifier: Arc<RecordingNotifier>,
    /// The most notifications the outbox holds.
    pub outbox_limit: usize,
    /// The engine under test.
    pub engine: AlertEngine,
}

impl Harness {
    /// A fresh engine at [`T0`], with the `manhole` table and the plans of
    /// [`TILTED`], [`TILTED_LONG`] and [`TILTED_NOW`].
    pub async fn new() -> Self {
        Self::with_driver(Driver::Caller).await
    }

    /// A fresh engine moved along by `driver`.
    pub async fn with_driver(driver: Driver) -> Self {
        Self::with(driver, OUTBOX_LIMIT).await
    }

    /// A fresh engine moved along by `driver`, its outbox holding at most
    /// `outbox_limit` notifications.
    pub async fn with(driver: Driver, outbox_limit: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let clock = Arc::new(ManualClock::new(T0));
        let queries = Arc::new(MemoryQueries::default());
        queries.set_table(DB, "manhole", manhole());
        queries.set_plan(TILTED, answer_schema(), None);
        queries.set_plan(TILTED_LONG, answer_schema(), None);
        queries.set_plan(TILTED_NOW, answer_schema(), Some("manhole"));
        queries.set_batch_filter(TILTED_NOW, Arc::new(tilted_now));
        let notifier = Arc::new(RecordingNotifier::default());
        let engine = open(&dir, &clock, &queries, &notifier, driver, outbox_limit).await;
        Self {
            dir,
            clock,
            queries,
            notifier,
            outbox_limit,
            engine,
        }
    }

    /// The engine gone without a word, as after `kill -9` (what it had not stored
    /// is lost), and a new one opened on the same directory and twins.
    pub async fn restart(self) -> Self {
        let Self {
            dir,
            clock,
            queries,
            notifier,
            outbox_limit,
            engine,
        } = self;
        drop(engine);
        let engine = open(
            &dir,
            &clock,
            &queries,
            &notifier,
            Driver::Caller,
            outbox_limit,
        )
        .await;
        Self {
            dir,
            clock,
            queries,
            notifier,
            outbox_limit,
            engine,
        }
    }

    /// Registers `spec`; its id.
    pub async fn create(&self, spec: Value) -> Result<String, RuleError> {
        let spec = serde_json::from_value(spec).expect("a rule spec");
        let rule = self.engine.create(spec).await?;
        Ok(rule["id"].as_str().expect("an id").to_string())
    }

    /// Moves the clock forward.
    pub fn advance(&self, seconds: f64) {
        self.clock.advance(Duration::from_secs_f64(seconds));
    }

    /// Stores, then delivers what is due: what the store and delivery threads do.
    pub fn store_and_deliver(&self) -> usize {
        assert!(self.engine.store_now(), "the states are stored");
        self.engine.deliver_due()
    }

    /// Active instances as (device, state, active_at, fired_at).
    pub fn states(&self) -> Vec<(String, String, String, Option<String>)> {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        self.engine
            .alerts(None, None, None)
            .iter()
            .map(|a| {
                (
                    text(&a["labels"]["device"]),
                    text(&a["state"]),
                    text(&a["active_at"]),
                    a["fired_at"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    /// Every alert of every accepted webhook post, as (status, device).
    pub fn told(&self) -> Vec<(String, String)> {
        self.notifier
            .accepted()
            .iter()
            .flat_map(|body| body["alerts"].as_array().cloned().unwrap_or_default())
            .map(|a| {
                (
                    a["status"].as_str().unwrap_or_default().to_string(),
                    a["labels"]["device"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    /// The history as "device:from->to".
    pub fn moves(&self) -> Vec<String> {
        self.engine
            .history(None, None, None)
            .iter()
            .map(|e| {
                format!(
                    "{}:{}->{}",
                    e["labels"]["device"].as_str().unwrap_or_default(),
                    e["from"].as_str().unwrap_or_default(),
                    e["to"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    /// `alerts/state.json` as it is on disk.
    pub fn stored_state(&self) -> Value {
        let bytes = std::fs::read(self.dir.path().join("alerts/state.json")).expect("state.json");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    /// The outbox a restart would find, by id: what the stored files hold.
    pub fn stored_outbox(&self) -> Value {
        let (_, outbox) = Files::new(self.dir.path())
            .read_state(self.outbox_limit)
            .expect("the alert files read");
        outbox
            .notifications()
            .map(|n| (n.id.to_string(), serde_json::to_value(n).expect("JSON")))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

async fn open(
    dir: &TempDir,
    clock: &Arc<ManualClock>,
    queries: &Arc<MemoryQueries>,
    notifier: &Arc<RecordingNotifier>,
    driver: Driver,
    outbox_limit: usize,
) -> AlertEngine {
    let seams = Seams {
        queries: queries.clone(),
        clock: clock.clone(),
        notifier: notifier.clone(),
    };
    AlertEngine::open_with(
        dir.path(),
        seams,
        driver,
        outbox_limit,
        &AlertTables::default(),
    )
    .await
    .expect("the engine opens")
}

/// RFC 3339 of `T0 + seconds`.
pub fn at(seconds: i64) -> String {
    citytsdb_storage::units::rfc3339(i128::from(T0 + seconds * S))
}
