//! Sorting rows by series then time, and merging rows of the same series and time.
//!
//! The merge is InfluxDB's: for one (series, time), each field takes the value of the
//! last write that carried it; fields a later write did not carry keep theirs.

use std::sync::Arc;

use std::hash::{BuildHasher, Hash, Hasher};

use datafusion::arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, StringArray, UInt32Array,
};
use datafusion::arrow::compute::{cast, concat_batches, take};
use datafusion::arrow::datatypes::{SchemaRef, TimestampNanosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
/// hashbrown's map with its default hasher (one lookup per row of a flush).
use datafusion::common::HashMap as FastMap;

use crate::error::{Result, StorageError};
use crate::schema::{TableSchema, TIME_COLUMN};

/// Reshapes `batch` to `target`: columns by name, missing ones null, types cast.
///
/// Segments store some float fields as scaled decimals; the cast back is exact
/// because the segment writer only chooses a decimal that round-trips.
pub fn align(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema_ref() == target {
        return Ok(batch.clone());
    }
    let columns = target
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => Ok(cast(c, f.data_type())?),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    Ok(RecordBatch::try_new(target.clone(), columns)?)
}

/// Indices of the series key columns (every tag, then `time`) within `schema`.
pub fn key_columns(table: &TableSchema, schema: &SchemaRef) -> Result<Vec<usize>> {
    let mut keys: Vec<usize> = table
        .tag_names()
        .filter_map(|t| schema.index_of(t).ok())
        .collect();
    keys.push(
        schema
            .index_of(TIME_COLUMN)
            .map_err(|_| StorageError::Internal("a batch to merge has no time column".into()))?,
    );
    Ok(keys)
}

/// Concatenates `batches` (oldest write first), sorts by `keys`, and merges rows
/// with equal keys so that each (series, time) appears once.
pub fn sort_dedup(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    keys: &[usize],
) -> Result<RecordBatch> {
    Ok(sort_dedup_runs(schema, batches, keys)?.0)
}

/// One series' rows in a batch merged by [`sort_dedup_runs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesRun {
    /// Where its rows end in the merged batch (exclusive; they start where the
    /// previous series' end).
    pub end: usize,
    /// Rows received for it before merging (a (series, time) written twice
    /// counts twice).
    pub received: u64,
}

/// [`sort_dedup`], with where each series' rows are in the result, when the keys
/// end in a non-null nanosecond time (else `None`).
pub fn sort_dedup_runs(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    keys: &[usize],
) -> Result<(RecordBatch, Option<Vec<SeriesRun>>)> {
    let all = concat_batches(schema, batches)?;
    let n = all.num_rows();
    if n == 0 {
        return Ok((all, Some(Vec::new())));
    }
    let (order, same, series_starts) = sort_order(&all, keys)?;

    let mut group_starts = Vec::with_capacity(n);
    for (i, w) in order.windows(2).enumerate() {
        if i == 0 {
            group_starts.push(0);
        }
        if !same(w[0], w[1]) {
            group_starts.push(i + 1);
        }
    }
    if n == 1 {
        group_starts.push(0);
    }
    // A series' merged rows are the groups that start within its rows of `order`.
    let runs = series_starts.map(|starts| {
        let mut g = 0;
        starts
            .windows(2)
            .map(|w| {
                while g < group_starts.len() && group_starts[g] < w[1] {
                    g += 1;
                }
                SeriesRun {
                    end: g,
                    received: (w[1] - w[0]) as u64,
                }
            })
            .collect()
    });
    let unique = group_starts.len() == n;
    let first_of_group: Vec<u32> = group_starts.iter().map(|&s| order[s]).collect();
    let first_idx = Arc::new(UInt32Array::from(if unique {
        order.clone()
    } else {
        first_of_group
    }));

    let mut columns = Vec::with_capacity(all.num_columns());
    for (ci, col) in all.columns().iter().enumerate() {
        if unique || keys.contains(&ci) {
            columns.push(take(col.as_ref(), first_idx.as_ref(), None)?);
            continue;
        }
        // For each group, the newest row that carries this field.
        let mut idx = Vec::with_capacity(group_starts.len());
        for (g, &start) in group_starts.iter().enumerate() {
            let end = group_starts.get(g + 1).copied().unwrap_or(n);
            let pick = order[start..end]
                .iter()
                .rev()
                .find(|&&r| col.is_valid(r as usize))
                .unwrap_or(&order[end - 1]);
            idx.push(*pick);
        }
        columns.push(take(col.as_ref(), &UInt32Array::from(idx), None)?);
    }
    Ok((RecordBatch::try_new(schema.clone(), columns)?, runs))
}

/// Whether two rows (by index) have equal keys.
type SameKey = Box<dyn Fn(u32, u32) -> bool>;

/// Where each series' rows start in a key order, and where the last one's end.
type SeriesStarts = Option<Vec<usize>>;

/// Row indices of `batch` in key order (rows with equal keys in batch order), a
/// test of whether two rows have equal keys, and where each series' rows start in
/// that order when the keys end in a non-null nanosecond time.
///
/// The keys are the series' tags and then `time`. Comparing whole encoded rows
/// for every comparison of a sort is slow (a `memcmp` per step), so each distinct
/// series gets its rank among the distinct series ([`rank_series`]), and the sort
/// runs on `(rank, time, row)` integers. The order is the same as sorting the
/// encoded rows of all keys.
fn sort_order(batch: &RecordBatch, keys: &[usize]) -> Result<(Vec<u32>, SameKey, SeriesStarts)> {
    let n = batch.num_rows();
    let time = keys.last().map(|&k| batch.column(k)).and_then(|c| {
        (c.null_count() == 0)
            .then(|| c.as_primitive_opt::<TimestampNanosecondType>())
            .flatten()
            .cloned()
    });
    let Some(time) = time else {
        let (order, same) = sort_order_by_rows(batch, keys)?;
        return Ok((order, same, None));
    };
    let tag_keys = &keys[..keys.len() - 1];
    let mut rank = vec![0u32; n];
    if !tag_keys.is_empty() {
        let tags: Option<Vec<&StringArray>> = tag_keys
            .iter()
            .map(|&k| batch.column(k).as_string_opt::<i32>())
            .collect();
        match tags {
            Some(tags) => rank_series(&tags, &mut rank),
            None => rank_encoded_series(batch, tag_keys, &mut rank)?,
        }
    }
    let times = time.values().clone();
    // Rows by series rank (a counting sort, rows of a series in batch order), then
    // each series' rows by time: they nearly always arrive in time order already.
    let series = rank.iter().max().map_or(0, |&r| r as usize + 1);
    let mut next = vec![0usize; series + 1];
    for &r in &rank {
        next[r as usize + 1] += 1;
    }
    for s in 1..next.len() {
        next[s] += next[s - 1];
    }
    let bounds = next.clone();
    let mut order = vec![0u32; n];
    for (i, &r) in rank.iter().enumerate() {
        order[next[r as usize]] = i as u32;
        next[r as usize] += 1;
    }
    for w in bounds.windows(2) {
        let rows = &mut order[w[0]..w[1]];
        if !rows.is_sorted_by_key(|&i| times[i as usize]) {
            // Stable: rows of one (series, time) stay in batch (write) order.
            rows.sort_by_key(|&i| times[i as usize]);
        }
    }
    let same = move |a: u32, b: u32| {
        let (a, b) = (a as usize, b as usize);
        rank[a] == rank[b] && times[a] == times[b]
    };
    Ok((order, Box::new(same), Some(bounds)))
}

/// Sets each row's `rank` to its series' position among the distinct series of
/// `tags` (string tag columns) in key order: by each tag in turn, nulls first,
/// then bytes, as sorting their encoded rows orders them.
///
/// The rows' values are hashed where they are, without encoding them: a series
/// is found by the hash of its tags and told apart by comparing them with the
/// tags of its first row.
fn rank_series(tags: &[&StringArray], rank: &mut [u32]) {
    fn value(c: &StringArray, row: usize) -> Option<&str> {
        c.is_valid(row).then(|| c.value(row))
    }
    let state = hashbrown::DefaultHashBuilder::default();
    let hash = |row: usize| {
        let mut h = state.build_hasher();
        for c in tags {
            value(c, row).hash(&mut h);
        }
        h.finish()
    };
    let same = |a: usize, b: usize| tags.iter().all(|c| value(c, a) == value(c, b));
    // A provisional id per distinct series, in order of first appearance, and the
    // first row of each.
    let mut ids: hashbrown::HashTable<u32> = hashbrown::HashTable::new();
    let mut first: Vec<usize> = Vec::new();
    for (row, r) in rank.iter_mut().enumerate() {
        let h = hash(row);
        *r = match ids.find(h, |&id| same(first[id as usize], row)) {
            Some(&id) => id,
            None => {
                let id = first.len() as u32;
                first.push(row);
                ids.insert_unique(h, id, |&id| hash(first[id as usize]));
                id
            }
        };
    }
    // The provisional ids, renumbered in key order.
    let mut by_key: Vec<u32> = (0..first.len() as u32).collect();
    by_key.sort_unstable_by(|&a, &b| {
        let (a, b) = (first[a as usize], first[b as usize]);
        tags.iter()
            .map(|c| value(c, a).cmp(&value(c, b)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    renumber(&by_key, rank);
}

/// [`rank_series`] for tag columns of any type: the tags are encoded as rows and
/// the series found by their encoding.
fn rank_encoded_series(batch: &RecordBatch, tag_keys: &[usize], rank: &mut [u32]) -> Result<()> {
    let converter = RowConverter::new(
        tag_keys
            .iter()
            .map(|&k| SortField::new(batch.column(k).data_type().clone()))
            .collect(),
    )?;
    let columns: Vec<ArrayRef> = tag_keys.iter().map(|&k| batch.column(k).clone()).collect();
    let rows = converter.convert_columns(&columns)?;
    // A provisional id per distinct series, in order of first appearance.
    let mut ids: FastMap<&[u8], u32> = FastMap::default();
    let mut distinct: Vec<&[u8]> = Vec::new();
    for (i, r) in rank.iter_mut().enumerate() {
        let key = rows.row(i).data();
        *r = *ids.entry(key).or_insert_with(|| {
            distinct.push(key);
            (distinct.len() - 1) as u32
        });
    }
    // The provisional ids, renumbered in key order.
    let mut by_key: Vec<u32> = (0..distinct.len() as u32).collect();
    by_key.sort_unstable_by(|&a, &b| distinct[a as usize].cmp(distinct[b as usize]));
    renumber(&by_key, rank);
    Ok(())
}

/// Replaces each provisional id in `rank` by its position in `by_key`.
fn renumber(by_key: &[u32], rank: &mut [u32]) {
    let mut position = vec![0u32; by_key.len()];
    for (p, &id) in by_key.iter().enumerate() {
        position[id as usize] = p as u32;
    }
    rank.iter_mut().for_each(|r| *r = position[*r as usize]);
}

/// The general form of [`sort_order`], for keys that do not end in a non-null
/// nanosecond time: a stable sort of whole encoded rows.
fn sort_order_by_rows(batch: &RecordBatch, keys: &[usize]) -> Result<(Vec<u32>, SameKey)> {
    let converter = RowConverter::new(
        keys.iter()
            .map(|&k| SortField::new(batch.column(k).data_type().clone()))
            .collect(),
    )?;
    let columns: Vec<ArrayRef> = keys.iter().map(|&k| batch.column(k).clone()).collect();
    let rows = converter.convert_columns(&columns)?;
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    order.sort_by(|&a, &b| rows.row(a as usize).cmp(&rows.row(b as usize)));
    let same = move |a: u32, b: u32| rows.row(a as usize) == rows.row(b as usize);
    Ok((order, Box::new(same)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{ColumnKind, FieldType};
    use datafusion::arrow::array::{
        Float64Array, Int64Array, StringArray, TimestampNanosecondArray,
    };
    use datafusion::arrow::datatypes::DataType;
    use datafusion::arrow::util::pretty::pretty_format_batches;

    fn table() -> TableSchema {
        let mut t = TableSchema::default();
        t.add_column("device", ColumnKind::Tag).unwrap();
        t.add_column("a", ColumnKind::Field(FieldType::Float))
            .unwrap();
        t.add_column("b", ColumnKind::Field(FieldType::Integer))
            .unwrap();
        t
    }

    fn batch(
        schema: &SchemaRef,
        t: Vec<i64>,
        d: Vec<&str>,
        a: Vec<Option<f64>>,
        b: Vec<Option<i64>>,
    ) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(t).with_timezone("UTC")),
                Arc::new(StringArray::from(d)),
                Arc::new(Float64Array::from(a)),
                Arc::new(Int64Array::from(b)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn later_writes_replace_only_the_fields_they_carry() {
        let t = table();
        let s = t.arrow_schema();
        let b1 = batch(
            &s,
            vec![2, 1, 1],
            vec!["x", "y", "x"],
            vec![Some(1.0), Some(2.0), Some(3.0)],
            vec![Some(10), None, Some(30)],
        );
        let b2 = batch(
            &s,
            vec![1, 1],
            vec!["x", "x"],
            vec![None, Some(5.0)],
            vec![Some(40), None],
        );
        let keys = key_columns(&t, &s).unwrap();
        let out = sort_dedup(&s, &[b1, b2], &keys).unwrap();
        let text = pretty_format_batches(&[out]).unwrap().to_string();
        let expected = [
            "+--------------------------------+--------+-----+----+",
            "| time                           | device | a   | b  |",
            "+--------------------------------+--------+-----+----+",
            "| 1970-01-01T00:00:00.000000001Z | x      | 5.0 | 40 |",
            "| 1970-01-01T00:00:00.000000002Z | x      | 1.0 | 10 |",
            "| 1970-01-01T00:00:00.000000001Z | y      | 2.0 |    |",
            "+--------------------------------+--------+-----+----+",
        ]
        .join("\n");
        assert_eq!(text, expected);
    }

    #[test]
    fn align_fills_missing_columns_with_nulls() {
        let t = table();
        let s = t.arrow_schema();
        let narrow = RecordBatch::try_new(
            Arc::new(datafusion::arrow::datatypes::Schema::new(vec![s
                .field(0)
                .clone()])),
            vec![Arc::new(
                TimestampNanosecondArray::from(vec![7]).with_timezone("UTC"),
            )],
        )
        .unwrap();
        let wide = align(&narrow, &s).unwrap();
        assert_eq!(wide.num_columns(), 4);
        assert_eq!(wide.column(2).null_count(), 1);
    }

    proptest::proptest! {
        /// The integer sort orders rows exactly as sorting their encoded keys does,
        /// ties in batch order, for tags with nulls and repeated (series, time).
        #[test]
        fn rank_sort_matches_the_row_sort(
            rows in proptest::collection::vec(
                (proptest::option::of(0u8..4), proptest::option::of(0u8..3), -3i64..3),
                1..200,
            )
        ) {
            let a: StringArray = rows.iter().map(|r| r.0.map(|v| format!("d{v}"))).collect();
            let b: StringArray = rows.iter().map(|r| r.1.map(|v| format!("z{v}"))).collect();
            let t = TimestampNanosecondArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
            let batch = RecordBatch::try_from_iter(vec![
                ("a", Arc::new(a) as ArrayRef),
                ("b", Arc::new(b) as ArrayRef),
                ("time", Arc::new(t) as ArrayRef),
            ])
            .unwrap();
            let keys = [0, 1, 2];
            let (slow, slow_same) = sort_order_by_rows(&batch, &keys).unwrap();
            // Plain strings are ranked by their values, other tag types by their
            // encoded rows: both as the row sort.
            let views = RecordBatch::try_from_iter(vec![
                ("a", cast(batch.column(0), &DataType::Utf8View).unwrap()),
                ("b", cast(batch.column(1), &DataType::Utf8View).unwrap()),
                ("time", batch.column(2).clone()),
            ])
            .unwrap();
            for batch in [&batch, &views] {
                let (fast, fast_same, _) = sort_order(batch, &keys).unwrap();
                proptest::prop_assert_eq!(&fast, &slow);
                for w in fast.windows(2) {
                    proptest::prop_assert_eq!(fast_same(w[0], w[1]), slow_same(w[0], w[1]));
                }
            }
        }
    }
}
