//! The in-memory write buffer: acknowledged rows not yet in a segment.
//!
//! Batches are kept as written (each with only the columns its write carried) and
//! in write order, which is what the merge rule needs; they are aligned to the table
//! schema and merged only when read or flushed.

use std::collections::BTreeMap;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::TimestampNanosecondType;
use datafusion::arrow::record_batch::RecordBatch;

use crate::schema::TIME_COLUMN;

/// Rows of one table not yet persisted.
#[derive(Debug, Clone, Default)]
pub struct TableBuffer {
    /// Batches in write order.
    pub batches: Vec<RecordBatch>,
    /// Rows in all batches.
    pub rows: usize,
    /// Earliest timestamp, nanoseconds.
    pub min_time: i64,
    /// Latest timestamp, nanoseconds.
    pub max_time: i64,
}

impl TableBuffer {
    fn push(&mut self, batch: RecordBatch) {
        if let Some((lo, hi)) = time_range(&batch) {
            if self.rows == 0 {
                (self.min_time, self.max_time) = (lo, hi);
            } else {
                self.min_time = self.min_time.min(lo);
                self.max_time = self.max_time.max(hi);
            }
        }
        self.rows += batch.num_rows();
        self.batches.push(batch);
    }
}

/// The earliest and latest `time` of a batch.
pub fn time_range(batch: &RecordBatch) -> Option<(i64, i64)> {
    let col = batch.column_by_name(TIME_COLUMN)?;
    let times = col.as_primitive_opt::<TimestampNanosecondType>()?;
    if times.is_empty() {
        return None;
    }
    let values = times.values();
    Some((*values.iter().min()?, *values.iter().max()?))
}

/// The rows of `batch` at or after `time` (nanoseconds); a batch without a `time`
/// column is kept whole.
pub fn since(batch: &RecordBatch, time: i64) -> crate::Result<RecordBatch> {
    let Some(times) = batch
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
    else {
        return Ok(batch.clone());
    };
    if times.values().iter().all(|&t| t >= time) {
        return Ok(batch.clone());
    }
    let keep: datafusion::arrow::array::BooleanArray =
        times.values().iter().map(|&t| Some(t >= time)).collect();
    Ok(datafusion::arrow::compute::filter_record_batch(
        batch, &keep,
    )?)
}

/// Unpersisted rows of every database and table.
#[derive(Debug, Clone, Default)]
pub struct WriteBuffer {
    /// Database -> table -> rows.
    pub databases: BTreeMap<String, BTreeMap<String, TableBuffer>>,
    /// Rows in the whole buffer.
    pub rows: usize,
    /// Approximate bytes of memory held.
    pub bytes: usize,
}

impl WriteBuffer {
    /// Adds a batch of one table.
    pub fn push(&mut self, db: &str, table: &str, batch: RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        self.rows += batch.num_rows();
        self.bytes += batch.get_array_memory_size();
        self.databases
            .entry(db.to_string())
            .or_default()
            .entry(table.to_string())
            .or_default()
            .push(batch);
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The buffered rows of one table, if any.
    pub fn table(&self, db: &str, table: &str) -> Option<&TableBuffer> {
        self.databases.get(db)?.get(table)
    }
}
