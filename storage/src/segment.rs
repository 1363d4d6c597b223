//! Segments: one table's rows for one UTC day, as a Parquet file plus its tag index.
//!
//! Layout, chosen on the city workload (DESIGN.md, "Storage"): rows sorted by series
//! then time; ZSTD; dictionary-encoded tags; `DELTA_BINARY_PACKED` timestamps and
//! integers; float fields stored as a standard Parquet `DECIMAL` (scaled integers,
//! delta-packed) whenever every value round-trips exactly at some scale, else as
//! dictionary-encoded doubles. Page statistics and the page index are written, with
//! small pages, so a reader fetches only the pages that hold the wanted series.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{ArrayRef, AsArray, Decimal128Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, Encoding, ZstdLevel};
use datafusion::parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader, SortingColumn};
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use datafusion::parquet::schema::types::ColumnPath;

use crate::error::{Result, StorageError};
use crate::index::{RowGroupPages, SegmentIndex};
use crate::schema::{ColumnKind, FieldType, TableSchema};

/// Rows per data page: small enough that one device's day decodes little else.
pub const PAGE_ROWS: usize = 1024;
/// Rows per row group.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;
/// Largest decimal scale tried for float fields.
const MAX_SCALE: i32 = 9;
/// Doubles are exact integers below this magnitude.
const EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// An encoded segment, ready to upload.
#[derive(Debug)]
pub struct EncodedSegment {
    /// The Parquet file.
    pub parquet: Bytes,
    /// Its tag index (with row-group and page boundaries filled in).
    pub index: SegmentIndex,
    /// Rows in the segment.
    pub rows: u64,
    /// Rows per row group.
    pub row_group_rows: Vec<u64>,
}

/// Encodes a batch that is already sorted by series then time and merged.
pub fn encode(batch: &RecordBatch, table: &TableSchema) -> Result<EncodedSegment> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_write_batch_size(PAGE_ROWS)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by("citytsdb".to_string());

    let schema = batch.schema();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    let mut sorting = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let path = ColumnPath::from(f.name().as_str());
        let col = batch.column(i);
        let kind = table.kind(f.name());
        match kind {
            Some(ColumnKind::Time)
            | Some(ColumnKind::Field(FieldType::Integer | FieldType::UInteger)) => {
                props = props
                    .set_column_dictionary_enabled(path.clone(), false)
                    .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
            }
            Some(ColumnKind::Field(FieldType::Float)) => {
                if let Some((scale, decimals)) = as_decimal(col) {
                    props = props
                        .set_column_dictionary_enabled(path.clone(), false)
                        .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
                    fields.push(Arc::new(
                        Field::new(f.name(), DataType::Decimal128(18, scale), true)
                            .with_metadata(f.metadata().clone()),
                    ));
                    columns.push(decimals);
                    continue;
                }
            }
            _ => {}
        }
        if matches!(kind, Some(ColumnKind::Tag)) {
            sorting.push(SortingColumn {
                column_idx: i as i32,
                descending: false,
                nulls_first: true,
            });
        }
        fields.push(f.clone());
        columns.push(col.clone());
    }
    if let Some(t) = schema
        .fields()
        .iter()
        .position(|f| table.kind(f.name()) == Some(ColumnKind::Time))
    {
        sorting.push(SortingColumn {
            column_idx: t as i32,
            descending: false,
            nulls_first: true,
        });
    }
    let props = props.set_sorting_columns(Some(sorting)).build();
    let file_schema: SchemaRef =
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    let file_batch = RecordBatch::try_new(file_schema.clone(), columns)?;

    let mut buf = Vec::with_capacity(batch.num_rows() * 4 + 1024);
    let mut writer = ArrowWriter::try_new(&mut buf, file_schema, Some(props))?;
    writer.write(&file_batch)?;
    writer.close()?;
    let parquet = Bytes::from(buf);

    let mut index = SegmentIndex::build(table.tag_names().filter_map(|name| {
        let col = batch.column_by_name(name)?.as_string_opt::<i32>()?;
        Some((
            name.to_string(),
            Box::new(col.iter()) as Box<dyn Iterator<Item = Option<&str>>>,
        ))
    }));
    let meta = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Required)
        .parse_and_finish(&parquet)?;
    let offsets = meta.offset_index();
    let mut first_row = 0u64;
    let mut row_group_rows = Vec::new();
    for (g, rg) in meta.row_groups().iter().enumerate() {
        let rows = rg.num_rows() as u64;
        let page_starts = offsets
            .and_then(|o| o.get(g))
            .and_then(|cols| cols.first())
            .map(|c| {
                c.page_locations()
                    .iter()
                    .map(|p| first_row + p.first_row_index as u64)
                    .collect()
            })
            .unwrap_or_default();
        index.row_groups.push(RowGroupPages {
            first_row,
            rows,
            page_starts,
        });
        row_group_rows.push(rows);
        first_row += rows;
    }
    Ok(EncodedSegment {
        parquet,
        index,
        rows: first_row,
        row_group_rows,
    })
}

/// The float column as exact scaled decimals, with the smallest scale that round-trips.
///
/// The check divides exactly as the Arrow cast back to `Float64` does, so reading a
/// decimal column as a float returns the very bits that were written.
fn as_decimal(col: &ArrayRef) -> Option<(i8, ArrayRef)> {
    let floats = col.as_primitive_opt::<Float64Type>()?;
    'scale: for scale in 0..=MAX_SCALE {
        let p = 10f64.powi(scale);
        for v in floats.iter().flatten() {
            let m = (v * p).round();
            if m.abs() >= EXACT_INT || (m / p).to_bits() != v.to_bits() {
                continue 'scale;
            }
        }
        let ints: Decimal128Array = floats
            .iter()
            .map(|v| v.map(|v| (v * p).round() as i128))
            .collect::<Decimal128Array>()
            .with_precision_and_scale(18, scale as i8)
            .ok()?;
        return Some((scale as i8, Arc::new(ints)));
    }
    None
}

/// Decodes a whole segment file (used when a flush merges late rows into it).
pub fn decode(parquet: Bytes) -> Result<Vec<RecordBatch>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(parquet)?
        .with_batch_size(64 * 1024)
        .build()?;
    reader.map(|b| b.map_err(StorageError::from)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::align;
    use datafusion::arrow::array::{Float64Array, StringArray, TimestampNanosecondArray};

    fn table() -> TableSchema {
        let mut t = TableSchema::default();
        t.add_column("device", ColumnKind::Tag).unwrap();
        t.add_column("level", ColumnKind::Field(FieldType::Float))
            .unwrap();
        t.add_column("raw", ColumnKind::Field(FieldType::Float))
            .unwrap();
        t
    }

    #[test]
    fn floats_round_trip_bit_for_bit_through_decimals() {
        let t = table();
        let n: usize = 5000;
        let levels: Vec<Option<f64>> = (0..n)
            .map(|i| {
                if i % 7 == 0 {
                    None
                } else {
                    Some(((i as f64 * 0.37).round() - 1000.0) / 10.0)
                }
            })
            .collect();
        let raw: Vec<Option<f64>> = (0..n).map(|i| Some((i as f64).sqrt())).collect();
        let devices: Vec<String> = (0..n).map(|i| format!("mh-{:05}", i / 1000)).collect();
        let batch = RecordBatch::try_new(
            t.arrow_schema(),
            vec![
                Arc::new(
                    TimestampNanosecondArray::from((0..n as i64).collect::<Vec<_>>())
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(devices)),
                Arc::new(Float64Array::from(levels.clone())),
                Arc::new(Float64Array::from(raw.clone())),
            ],
        )
        .unwrap();
        let seg = encode(&batch, &t).unwrap();
        assert_eq!(seg.rows, n as u64);
        let file_schema = ParquetRecordBatchReaderBuilder::try_new(seg.parquet.clone())
            .unwrap()
            .schema()
            .clone();
        assert_eq!(
            file_schema.field(2).data_type(),
            &DataType::Decimal128(18, 1),
            "level stored as DECIMAL"
        );
        assert_eq!(
            file_schema.field(3).data_type(),
            &DataType::Float64,
            "raw stays a double"
        );
        assert_eq!(
            seg.index.row_groups[0].page_starts.len(),
            n.div_ceil(PAGE_ROWS)
        );
        assert_eq!(seg.index.tags["device"]["mh-00001"].len(), 1000);

        let back = decode(seg.parquet).unwrap();
        let back = align(
            &datafusion::arrow::compute::concat_batches(&back[0].schema(), &back).unwrap(),
            &t.arrow_schema(),
        )
        .unwrap();
        let got: Vec<Option<u64>> = back
            .column(2)
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.map(f64::to_bits))
            .collect();
        let want: Vec<Option<u64>> = levels.iter().map(|v| v.map(f64::to_bits)).collect();
        assert_eq!(got, want);
        let got_raw: Vec<Option<f64>> = back
            .column(3)
            .as_primitive::<Float64Type>()
            .iter()
            .collect();
        assert_eq!(got_raw, raw);
    }
}
