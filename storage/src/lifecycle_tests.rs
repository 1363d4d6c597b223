//! Random writes, flushes, compactions, collections and restarts (clean and
//! crashed) against a simple model: after every step the rows the engine holds —
//! its segments in `seq` order, then its buffer, merged as readers merge them —
//! are exactly the model's, and the store holds nothing the catalog does not
//! refer to once it is collected and swept.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    Array, AsArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampNanosecondArray,
};
use datafusion::arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType};
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::catalog::DAY_NANOS;
use crate::compact::CompactionConfig;
use crate::engine::{Engine, EngineConfig, Locked};
use crate::merge::{align, key_columns, sort_dedup};
use crate::schema::{ColumnKind, FieldType, TableSchema};
use crate::segment;

/// (device, time) -> (a, b), merged as writes merge.
type Model = BTreeMap<(String, i64), (Option<f64>, Option<i64>)>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn schema() -> TableSchema {
    let mut t = TableSchema::default();
    t.add_column("device", ColumnKind::Tag).unwrap();
    t.add_column("a", ColumnKind::Field(FieldType::Float))
        .unwrap();
    t.add_column("b", ColumnKind::Field(FieldType::Integer))
        .unwrap();
    t
}

/// A write of `n` random rows over three days, with repeats and nulls.
fn rows(rng: &mut Rng, n: usize) -> Vec<(String, i64, Option<f64>, Option<i64>)> {
    (0..n)
        .map(|_| {
            let device = format!("d{}", rng.below(6));
            let time = rng.below(3) as i64 * DAY_NANOS + rng.below(200) as i64 * 60_000_000_000;
            let a = (rng.below(4) != 0).then(|| rng.below(1000) as f64 / 10.0);
            let b = match a {
                None => Some(rng.below(100) as i64),
                Some(_) => (rng.below(3) == 0).then(|| rng.below(100) as i64),
            };
            (device, time, a, b)
        })
        .collect()
}

fn batch(rows: &[(String, i64, Option<f64>, Option<i64>)]) -> RecordBatch {
    RecordBatch::try_new(
        schema().arrow_schema(),
        vec![
            Arc::new(
                TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.as_str()),
            )),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.3))),
        ],
    )
    .unwrap()
}

fn apply(model: &mut Model, rows: &[(String, i64, Option<f64>, Option<i64>)]) {
    for (d, t, a, b) in rows {
        let e = model.entry((d.clone(), *t)).or_default();
        if a.is_some() {
            e.0 = *a;
        }
        if b.is_some() {
            e.1 = *b;
        }
    }
}

/// Every row the engine holds for `db.t`, as readers see them.
async fn held(engine: &Engine) -> Model {
    let Some(snap) = engine.snapshot("db") else {
        return Model::new();
    };
    let schema = snap.schemas["t"].clone();
    let arrow = schema.arrow_schema();
    let mut parts = Vec::new();
    if let Some(tc) = snap.table_catalog("t") {
        let mut segments: Vec<_> = tc.segments().collect();
        segments.sort_by_key(|s| (s.seq, s.id));
        for s in segments {
            let bytes = engine
                .store()
                .get(&ObjectPath::from(s.path.as_str()))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            // Deleted rows are not there for readers.
            for b in segment::decode_kept(bytes, s.deleted_rows()).unwrap() {
                parts.push(align(&b, &arrow).unwrap());
            }
        }
    }
    for b in snap.buffered("t").0 {
        parts.push(align(&b, &arrow).unwrap());
    }
    let keys = key_columns(&schema, &arrow).unwrap();
    let all = sort_dedup(&arrow, &parts, &keys).unwrap();
    let times = all.column(0).as_primitive::<TimestampNanosecondType>();
    let devices = all.column(1).as_string::<i32>();
    let a = all.column(2).as_primitive::<Float64Type>();
    let b = all.column(3).as_primitive::<Int64Type>();
    let mut out = Model::new();
    for i in 0..all.num_rows() {
        let prior = out.insert(
            (devices.value(i).to_string(), times.value(i)),
            (
                a.is_valid(i).then(|| a.value(i)),
                b.is_valid(i).then(|| b.value(i)),
            ),
        );
        assert!(prior.is_none(), "a (series, time) twice");
    }
    out
}

fn config(dir: &std::path::Path, store: Arc<dyn ObjectStore>) -> EngineConfig {
    let mut c = EngineConfig::new(dir.to_path_buf(), store);
    // Nothing happens by itself: the test decides every step.
    c.flush_interval = Duration::from_secs(3600);
    c.flush_rows = usize::MAX;
    c.compaction = CompactionConfig {
        enabled: false,
        min_runs: 2,
        ..Default::default()
    };
    c
}

/// Opens the engine, waiting for a crashed one's lock to be released.
async fn open(dir: &std::path::Path, store: &Arc<dyn ObjectStore>) -> Engine {
    for _ in 0..200 {
        match Engine::open(config(dir, store.clone())).await {
            Ok(e) => return e,
            Err(crate::StorageError::DataDirInUse(_)) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("opening: {e}"),
        }
    }
    panic!("the data directory stayed locked");
}

async fn objects(store: &Arc<dyn ObjectStore>) -> HashSet<String> {
    store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

async fn run(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let mut rng = Rng(seed | 1);
    let mut engine = open(dir.path(), &store).await;
    let mut model = Model::new();
    let mut written: HashSet<String> = HashSet::new();
    for step in 0..60 {
        let what = rng.below(100);
        match what {
            0..=4 => {
                // A delete of one device's rows of one day (after a flush of what
                // waits, as every delete begins).
                let device = format!("d{}", rng.below(6));
                let day = rng.below(3) as i64;
                let doomed: Vec<(String, i64)> = model
                    .keys()
                    .filter(|(d, t)| *d == device && t.div_euclid(DAY_NANOS) == day)
                    .cloned()
                    .collect();
                let stats = engine
                    .begin_delete()
                    .await
                    .unwrap()
                    .delete_keys("db", "t", &[keys(&doomed)])
                    .await
                    .unwrap();
                assert_eq!(stats.keys, doomed.len(), "step {step}");
                for k in &doomed {
                    model.remove(k);
                }
            }
            5..=49 => {
                let n = 1 + rng.below(40) as usize;
                let rs = rows(&mut rng, n);
                engine.update_schemas("db", |s| s.insert("t".into(), schema()));
                engine
                    .write("db", vec![("t".into(), batch(&rs))], true)
                    .await
                    .unwrap();
                apply(&mut model, &rs);
                written.extend(rs.iter().map(|r| r.0.clone()));
            }
            50..=64 => {
                engine.flush().await.unwrap();
            }
            65..=74 => {
                engine.compact(rng.below(2) == 0).await.unwrap();
            }
            75..=84 => {
                // A reader on the old version keeps its segments through a compaction.
                let snap = engine.snapshot("db");
                engine.compact(true).await.unwrap();
                engine.collect_garbage().await.unwrap();
                if let Some(snap) = &snap {
                    for s in snap
                        .table_catalog("t")
                        .into_iter()
                        .flat_map(|t| t.segments())
                    {
                        assert!(
                            engine
                                .store()
                                .head(&ObjectPath::from(s.path.as_str()))
                                .await
                                .is_ok(),
                            "step {step}: a segment a reader holds was deleted"
                        );
                    }
                }
                drop(snap);
                engine.collect_garbage().await.unwrap();
                assert!(engine.catalog().garbage.is_empty(), "step {step}");
            }
            85..=92 => {
                engine.halt().await;
                engine = open(dir.path(), &store).await;
            }
            _ => {
                engine.shutdown().await.unwrap();
                engine.halt().await;
                engine = open(dir.path(), &store).await;
            }
        }
        assert_eq!(
            held(&engine).await,
            model,
            "seed {seed}, step {step} ({what})"
        );
    }
    // Settled and collected, the store holds what the catalog refers to and the
    // log's newest records, nothing else.
    engine.flush().await.unwrap();
    engine.compact(true).await.unwrap();
    engine.fold_series(1).await.unwrap();
    engine.collect_garbage().await.unwrap();
    engine.sweep(Duration::ZERO).await.unwrap();
    let catalog = engine.catalog();
    for day in catalog.table("db", "t").unwrap().days.values() {
        let runs: HashSet<u64> = day.segments.values().map(|s| s.run).collect();
        assert_eq!(runs.len(), 1, "a settled day is one run");
    }
    let live: HashSet<String> = catalog.live_objects().map(str::to_string).collect();
    let stored: HashSet<String> = objects(&store)
        .await
        .into_iter()
        .filter(|k| !k.starts_with("catalog/"))
        .collect();
    assert_eq!(stored, live);
    assert_eq!(held(&engine).await, model);
    // Reopened, the registry knows every series written (deletes correct it only
    // through `correct_series`, which the query layer calls) and the rows are the
    // same.
    engine.halt().await;
    let engine = open(dir.path(), &store).await;
    assert_eq!(held(&engine).await, model);
    let registry = engine.series_rows("db", "t").unwrap().unwrap();
    assert_eq!(registry.latest.num_rows(), written.len());
    engine.halt().await;
}

#[tokio::test]
async fn random_lives_match_the_model() {
    for seed in [1, 7, 42, 1234, 99_991] {
        run(seed).await;
    }
}

/// Keys of `db.t` (device, time) as a batch a delete takes.
fn keys(keys: &[(String, i64)]) -> RecordBatch {
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
        schema()
            .arrow_schema()
            .field_with_name("device")
            .unwrap()
            .clone(),
        schema()
            .arrow_schema()
            .field_with_name("time")
            .unwrap()
            .clone(),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                keys.iter().map(|k| k.0.as_str()),
            )),
            Arc::new(
                TimestampNanosecondArray::from_iter_values(keys.iter().map(|k| k.1))
                    .with_timezone("UTC"),
            ),
        ],
    )
    .unwrap()
}

#[tokio::test]
async fn deletes_mask_every_copy_survive_restarts_and_compaction_drops_them() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open(dir.path(), &store).await;
    engine.update_schemas("db", |s| s.insert("t".into(), schema()));
    let mut rng = Rng(5);
    let mut model = Model::new();
    // Three flushes over the same days: most keys have copies in several segments.
    for _ in 0..3 {
        let rows = rows(&mut rng, 400);
        apply(&mut model, &rows);
        engine
            .write("db", vec![("t".into(), batch(&rows))], true)
            .await
            .unwrap();
        engine.flush().await.unwrap();
    }
    // A later write waits in the buffer: the delete flushes it first.
    let late = rows(&mut rng, 50);
    apply(&mut model, &late);
    engine
        .write("db", vec![("t".into(), batch(&late))], true)
        .await
        .unwrap();
    assert_eq!(held(&engine).await, model);

    // Every row of d1, and the d2 rows of the second day.
    let doomed: Vec<(String, i64)> = model
        .keys()
        .filter(|(d, t)| d == "d1" || (d == "d2" && *t / DAY_NANOS == 1))
        .cloned()
        .collect();
    assert!(doomed.len() > 50, "{}", doomed.len());
    let turn = engine.begin_delete().await.unwrap();
    let stats = turn.delete_keys("db", "t", &[keys(&doomed)]).await.unwrap();
    assert_eq!(stats.keys, doomed.len());
    assert!(stats.rows_masked >= doomed.len() as u64, "{stats:?}");
    for k in &doomed {
        model.remove(k);
    }
    assert_eq!(held(&engine).await, model, "masked at once");
    // Deleting them again masks nothing more.
    let again = engine
        .begin_delete()
        .await
        .unwrap()
        .delete_keys("db", "t", &[keys(&doomed)])
        .await
        .unwrap();
    assert_eq!(again.rows_masked, 0);

    // The masks are in the catalog: a crash keeps them.
    engine.halt().await;
    engine = open(dir.path(), &store).await;
    assert_eq!(held(&engine).await, model, "after a restart");
    let masked: u64 = engine
        .catalog()
        .table("db", "t")
        .unwrap()
        .segments()
        .filter_map(|s| s.deleted_rows().map(|d| d.len()))
        .sum();
    assert_eq!(masked, stats.rows_masked);

    // Compaction leaves the deleted rows out, and the masks go with the inputs.
    engine.compact(true).await.unwrap();
    let tc = engine.catalog().table("db", "t").unwrap().clone();
    assert!(tc.segments().all(|s| s.deleted.is_none()));
    let stored: u64 = tc.segments().map(|s| s.rows).sum();
    assert_eq!(stored, model.len() as u64, "one row per key, none deleted");
    assert_eq!(held(&engine).await, model, "after compaction");
    engine.halt().await;
}

#[tokio::test]
async fn a_second_writer_fences_the_first() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = open(d1.path(), &store).await;
    let write = |e: Engine, t: i64| async move {
        e.update_schemas("db", |s| s.insert("t".into(), schema()));
        e.write(
            "db",
            vec![("t".into(), batch(&[("d1".into(), t, Some(1.0), None)]))],
            true,
        )
        .await
        .unwrap();
        e.flush().await
    };
    write(first.clone(), 1).await.unwrap();
    let second = open(d2.path(), &store).await;
    let err = write(first.clone(), 2).await.unwrap_err();
    assert!(matches!(err, crate::StorageError::Fenced(_)), "{err}");
    write(second.clone(), 3).await.unwrap();
    // The second sees the first's flushed row and its own, not the fenced one's.
    let rows: Vec<i64> = held(&second).await.keys().map(|(_, t)| *t).collect();
    assert_eq!(rows, vec![1, 3]);
    assert_eq!(second.catalog().writer, Some(second.writer()));
    assert_eq!(
        first.inner.readers.locked().len(),
        0,
        "no reader was left pinned"
    );
    first.halt().await;
    second.halt().await;
}

#[tokio::test]
async fn rollups_know_what_is_stale_through_writes_deletes_compaction_restarts_and_drops() {
    use crate::rollup::{Dirty, RollupDef};
    const HOUR: i64 = 3_600_000_000_000;
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open(dir.path(), &store).await;
    engine.update_schemas("db", |s| s.insert("t".into(), schema()));
    let row = |device: &str, time: i64, a: f64| (device.to_string(), time, Some(a), None);
    // Two days of rows, hourly at half past.
    let first: Vec<_> = (0..48)
        .map(|h| row("d0", h * HOUR + HOUR / 2, h as f64))
        .collect();
    engine
        .write("db", vec![("t".into(), batch(&first))], true)
        .await
        .unwrap();
    engine.flush().await.unwrap();
    let aggs = vec![("a".to_string(), vec!["max".to_string()])];
    let def = RollupDef::new("r", "t", &schema(), Duration::from_secs(3600), &aggs).unwrap();
    engine.create_rollup("db", def.clone(), None).await.unwrap();
    let dirty = |engine: &Engine, buffered: bool| {
        engine.snapshot("db").unwrap().rollup_dirty("r", buffered)
    };
    let whole = |lo, hi| Dirty {
        lo,
        hi,
        clear: false,
    };
    // Nothing materialised: everything is stale, in whole buckets.
    assert_eq!(dirty(&engine, false), vec![whole(0, 48 * HOUR)]);
    let created = engine.create_rollup("db", def.clone(), None).await;
    assert!(
        matches!(created, Err(crate::StorageError::Conflict(_))),
        "{created:?}"
    );

    let done = |engine: Engine| async move {
        let seq = engine.catalog().seq;
        engine
            .rollup_progress("db", "r", seq, Vec::new())
            .await
            .unwrap();
        engine
    };
    engine = done(engine).await;
    assert_eq!(dirty(&engine, true), vec![]);

    // A late row: stale while buffered (for readers), and once flushed.
    let late = vec![row("d1", 30 * HOUR + 5, 99.0)];
    engine
        .write("db", vec![("t".into(), batch(&late))], true)
        .await
        .unwrap();
    assert_eq!(dirty(&engine, true), vec![whole(30 * HOUR, 31 * HOUR)]);
    assert_eq!(dirty(&engine, false), vec![]);
    engine.flush().await.unwrap();
    assert_eq!(dirty(&engine, false), vec![whole(30 * HOUR, 31 * HOUR)]);
    // Progress with ranges still pending keeps them, across a crash.
    let seq = engine.catalog().seq;
    let pending = vec![whole(30 * HOUR, 31 * HOUR)];
    engine
        .rollup_progress("db", "r", seq, pending.clone())
        .await
        .unwrap();
    let stale = engine.rollup_progress("db", "r", seq - 1, Vec::new()).await;
    assert!(
        matches!(stale, Err(crate::StorageError::Conflict(_))),
        "{stale:?}"
    );
    engine.halt().await;
    engine = open(dir.path(), &store).await;
    assert_eq!(dirty(&engine, false), pending);
    engine = done(engine).await;

    // A delete: stale over the segment's range, to be cleared before rewriting.
    let turn = engine.begin_delete().await.unwrap();
    turn.delete_keys(
        "db",
        "t",
        &[keys(&[("d0".to_string(), 40 * HOUR + HOUR / 2)])],
    )
    .await
    .unwrap();
    let got = dirty(&engine, false);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].clear && got[0].lo <= 40 * HOUR && got[0].hi >= 41 * HOUR,
        "{got:?}"
    );
    assert_eq!(engine.catalog().table("db", "t").unwrap().deletes.len(), 1);
    engine = done(engine).await;
    assert!(
        engine
            .catalog()
            .table("db", "t")
            .unwrap()
            .deletes
            .is_empty(),
        "deletes every rollup caught up with are forgotten"
    );
    // Compaction rewrites rows without changing them: nothing is stale.
    engine.compact(true).await.unwrap();
    assert_eq!(dirty(&engine, false), vec![]);

    // The rollup's own rows, then a drop: its table and files go, for good.
    let schema = def.schema();
    engine.update_schemas("db", |_| ());
    let rollup_rows = RecordBatch::try_new(
        schema.arrow_schema(),
        vec![
            Arc::new(TimestampNanosecondArray::from_iter_values([0]).with_timezone("UTC")),
            Arc::new(StringArray::from_iter_values(["d0"])),
            Arc::new(Float64Array::from_iter_values([1.0])),
        ],
    )
    .unwrap();
    engine
        .write("db", vec![("r".into(), rollup_rows)], true)
        .await
        .unwrap();
    engine.drop_rollup("db", "r").await.unwrap();
    let c = engine.catalog();
    assert!(c.table("db", "r").is_none());
    assert!(c.rollups("db").unwrap().is_empty());
    assert!(c.garbage.iter().any(|g| g.path.contains(".parquet")));
    assert!(!engine.snapshot("db").unwrap().schemas.contains_key("r"));
    engine.halt().await;
    engine = open(dir.path(), &store).await;
    assert!(
        !engine.snapshot("db").unwrap().schemas.contains_key("r"),
        "no WAL replay brings it back"
    );
    assert!(engine.catalog().table("db", "r").is_none());
    engine.halt().await;
}
