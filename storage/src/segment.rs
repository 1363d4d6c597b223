//! Segments: one table's rows for one UTC day, as a Parquet file plus its tag index.
//!
//! Layout, chosen on the city workload (DESIGN.md, "Storage"): rows sorted by series
//! then time; ZSTD; dictionary-encoded tags; `DELTA_BINARY_PACKED` timestamps in long
//! pages; float fields stored as a standard Parquet `DECIMAL(9, s)` or
//! `DECIMAL(18, s)` (scaled integers) whenever every value round-trips exactly at
//! some scale `s`, else as doubles. A flush writes one fixed layout per column kind
//! ([`Layout::Fixed`]); compaction, which writes the segments that stay, measures
//! each column chunk's candidate encodings and ZSTD levels on a sample and keeps
//! the smallest, a costlier level only for what it saves ([`Layout::Measured`]).
//! Page statistics and the page index are written, with small pages but for
//! `time`, so a reader fetches only the pages that hold the wanted series. The
//! files are plain Parquet that DuckDB, pandas and Spark read.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{ArrayRef, AsArray, Decimal128Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::arrow_writer::{compute_leaves, ArrowRowGroupWriterFactory};
use datafusion::parquet::arrow::{add_encoded_arrow_schema_to_metadata, ArrowSchemaConverter};
use datafusion::parquet::basic::{Compression, Encoding, ZstdLevel};
use datafusion::parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader, SortingColumn};
use datafusion::parquet::file::properties::{
    EnabledStatistics, WriterProperties, WriterPropertiesBuilder,
};
use datafusion::parquet::file::writer::SerializedFileWriter;
use datafusion::parquet::schema::types::ColumnPath;

use crate::error::{Result, StorageError};
use crate::index::{RowGroupPages, SegmentIndex};
use crate::schema::{ColumnKind, FieldType, TableSchema};

/// Rows per data page of a flushed segment: small enough that one device's day
/// decodes little else.
pub const PAGE_ROWS: usize = 1024;
/// Rows per data page (every column but `time`) of the segments a settled day is
/// compacted into: measured (BENCHMARKS.md, "Page size") to store 14% fewer bytes
/// than 1,024-row pages with no measurable cost to one device's day.
pub const SETTLED_PAGE_ROWS: usize = 16 * 1024;
/// Rows per data page of `time`.
pub const TIME_PAGE_ROWS: usize = 16 * 1024;
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

/// How a segment's column chunks are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// One fixed layout per column kind: cheap, for flushes (compaction rewrites
    /// what lasts).
    #[default]
    Fixed,
    /// Each column chunk tries the encodings and compression levels that suit its
    /// kind on a sample of its rows and keeps the smallest: for compaction, which
    /// writes the segments that stay. Columns other than `time` are cut into pages
    /// of `page_rows` rows.
    Measured {
        /// Rows per data page of every column but `time`.
        page_rows: usize,
    },
}

/// An encoding choice for one column: `None` is dictionary encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Choice {
    encoding: Option<Encoding>,
    zstd: i32,
}

/// Rows of a column tried per candidate layout.
const SAMPLE_ROWS: usize = 128 * 1024;
/// ZSTD levels tried by [`Layout::Measured`], cheapest first.
const LEVELS: [i32; 3] = [3, 9, 19];

/// The candidate encodings of a column of the file's type.
fn candidates(kind: Option<ColumnKind>, data_type: &DataType) -> Vec<Option<Encoding>> {
    match (kind, data_type) {
        (Some(ColumnKind::Time), _) => vec![Some(Encoding::DELTA_BINARY_PACKED)],
        (Some(ColumnKind::Tag), _) => vec![None],
        (_, DataType::Decimal128(..) | DataType::Int64 | DataType::UInt64) => vec![
            Some(Encoding::DELTA_BINARY_PACKED),
            Some(Encoding::BYTE_STREAM_SPLIT),
            None,
            Some(Encoding::PLAIN),
        ],
        (_, DataType::Float64) => vec![
            None,
            Some(Encoding::PLAIN),
            Some(Encoding::BYTE_STREAM_SPLIT),
        ],
        // Booleans, strings: the writer's defaults.
        _ => vec![None],
    }
}

/// The fixed choice of a column, as flushes write it.
fn fixed(kind: Option<ColumnKind>, data_type: &DataType) -> Choice {
    let encoding = match (kind, data_type) {
        (Some(ColumnKind::Time), _)
        | (_, DataType::Decimal128(..) | DataType::Int64 | DataType::UInt64) => {
            Some(Encoding::DELTA_BINARY_PACKED)
        }
        _ => None,
    };
    Choice { encoding, zstd: 3 }
}

/// The file-level properties of every segment (compression, statistics, the
/// sorting columns and each column's layout are set per column).
fn file_properties() -> Result<WriterPropertiesBuilder> {
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by("citytsdb".to_string()))
}

/// The properties one column chunk is written with: `choice`, and pages of
/// `TIME_PAGE_ROWS` rows (or `page_rows` if more) for `time` (on a regular grid a
/// page of time costs little more than its header, so short pages would be mostly
/// overhead) or `page_rows` rows for every other column (so one device's rows
/// decode little else). Pages are cut by row count only; the size limit is far
/// above any page's size.
///
/// The properties hold for every column (a column writer is made from a file
/// writer's properties), but only `name`'s writer is used with them, so the
/// encoding is set for `name` alone: other columns' defaults must stay valid for
/// their types.
fn column_properties(
    name: &str,
    kind: Option<ColumnKind>,
    choice: Choice,
    page_rows: usize,
) -> Result<WriterProperties> {
    let rows = if kind == Some(ColumnKind::Time) {
        TIME_PAGE_ROWS.max(page_rows)
    } else {
        page_rows
    };
    let path = ColumnPath::from(name);
    let props = file_properties()?
        .set_column_compression(
            path.clone(),
            Compression::ZSTD(ZstdLevel::try_new(choice.zstd)?),
        )
        .set_data_page_row_count_limit(rows)
        .set_write_batch_size(rows)
        .set_data_page_size_limit(64 << 20);
    Ok(match choice.encoding {
        None => props.set_column_dictionary_enabled(path, true),
        Some(e) => props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, e),
    }
    .build())
}

/// Writes `batch` as one Parquet file, each column chunk with its own properties
/// (`columns[i]` for field `i`; the schema is flat, one leaf per field).
fn write_file(
    batch: &RecordBatch,
    columns: &[WriterProperties],
    file: WriterProperties,
) -> Result<Vec<u8>> {
    let schema = batch.schema();
    let parquet = ArrowSchemaConverter::new().convert(&schema)?;
    let mut file = file;
    add_encoded_arrow_schema_to_metadata(&schema, &mut file);
    let mut buf = Vec::with_capacity(batch.num_rows() * 4 + 1024);
    let mut writer =
        SerializedFileWriter::new(&mut buf, parquet.root_schema_ptr(), Arc::new(file))?;
    // A column writer takes its properties from a file writer: one that writes
    // nowhere per column.
    let factories = columns
        .iter()
        .map(|props| {
            let sink = SerializedFileWriter::new(
                std::io::sink(),
                parquet.root_schema_ptr(),
                Arc::new(props.clone()),
            )?;
            Ok(ArrowRowGroupWriterFactory::new(&sink, schema.clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut start = 0;
    let mut group = 0;
    while start < batch.num_rows() {
        let len = ROW_GROUP_ROWS.min(batch.num_rows() - start);
        let mut row_group = writer.next_row_group()?;
        for (i, field) in schema.fields().iter().enumerate() {
            let mut writers = factories[i].create_column_writers(group)?;
            if writers.len() != schema.fields().len() {
                return Err(StorageError::Internal(format!(
                    "a segment's schema is not flat: {} leaves for {} columns",
                    writers.len(),
                    schema.fields().len()
                )));
            }
            let mut column = writers.swap_remove(i);
            for leaf in compute_leaves(field, &batch.column(i).slice(start, len))? {
                column.write(&leaf)?;
            }
            column.close()?.append_to_row_group(&mut row_group)?;
        }
        row_group.close()?;
        start += len;
        group += 1;
    }
    writer.close()?;
    Ok(buf)
}

/// The layout of a column, chosen on a sample of its rows: the encoding that
/// compresses smallest at the cheapest level, then the cheapest level of that
/// encoding that is within [`LEVEL_GAIN`] of its smallest.
///
/// Higher ZSTD levels cost much more to write and nothing more to read, so one
/// is taken only for what it saves; and the ranking of encodings hardly depends on the level, so the higher
/// levels are tried for the best encoding only (on the city workload this stores
/// 0.07% more than trying every pair; BENCHMARKS.md, "Compaction's layout").
fn measure(
    field: &Arc<Field>,
    column: &ArrayRef,
    kind: Option<ColumnKind>,
    page_rows: usize,
) -> Result<Choice> {
    let sample = column.slice(0, column.len().min(SAMPLE_ROWS));
    let schema = Arc::new(Schema::new(vec![field.clone()]));
    let batch = RecordBatch::try_new(schema.clone(), vec![sample])?;
    let size = |choice: Choice| -> Result<u64> {
        let file = write_file(
            &batch,
            &[column_properties(field.name(), kind, choice, page_rows)?],
            file_properties()?.build(),
        )?;
        let meta = ParquetMetaDataReader::new().parse_and_finish(&Bytes::from(file))?;
        Ok(meta
            .row_groups()
            .iter()
            .map(|g| g.column(0).compressed_size() as u64)
            .sum())
    };
    let mut best: Option<(u64, Choice)> = None;
    for encoding in candidates(kind, field.data_type()) {
        let choice = Choice {
            encoding,
            zstd: LEVELS[0],
        };
        let bytes = size(choice)?;
        if best.is_none_or(|(b, _)| bytes < b) {
            best = Some((bytes, choice));
        }
    }
    let Some((bytes, choice)) = best else {
        return Ok(fixed(kind, field.data_type()));
    };
    let mut tried = vec![(bytes, choice)];
    for &zstd in &LEVELS[1..] {
        let choice = Choice { zstd, ..choice };
        tried.push((size(choice)?, choice));
    }
    Ok(cheapest_within(&tried, choice))
}

/// A costlier ZSTD level is taken only when every cheaper one stores more than
/// this fraction over the smallest.
const LEVEL_GAIN: f64 = 0.01;

/// Of `tried` (sizes of one encoding at increasing levels), the lowest level
/// whose size is within [`LEVEL_GAIN`] of the smallest.
fn cheapest_within(tried: &[(u64, Choice)], fallback: Choice) -> Choice {
    let smallest = tried.iter().map(|(b, _)| *b).min().unwrap_or(0) as f64;
    tried
        .iter()
        .find(|(b, _)| *b as f64 <= smallest * (1.0 + LEVEL_GAIN))
        .map_or(fallback, |(_, c)| *c)
}

/// Encodes a batch that is already sorted by series then time and merged.
pub fn encode(batch: &RecordBatch, table: &TableSchema) -> Result<EncodedSegment> {
    encode_with(batch, table, Layout::Fixed)
}

/// Encodes a batch that is already sorted by series then time and merged, with
/// its column chunks laid out as `layout` says.
pub fn encode_with(
    batch: &RecordBatch,
    table: &TableSchema,
    layout: Layout,
) -> Result<EncodedSegment> {
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    let mut kinds = Vec::with_capacity(schema.fields().len());
    let mut sorting = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let col = batch.column(i);
        let kind = table.kind(f.name());
        kinds.push(kind);
        if kind == Some(ColumnKind::Field(FieldType::Float)) {
            if let Some((precision, scale, decimals)) = as_decimal(col) {
                fields.push(Arc::new(
                    Field::new(f.name(), DataType::Decimal128(precision, scale), true)
                        .with_metadata(f.metadata().clone()),
                ));
                columns.push(decimals);
                continue;
            }
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
    if let Some(t) = kinds.iter().position(|k| *k == Some(ColumnKind::Time)) {
        sorting.push(SortingColumn {
            column_idx: t as i32,
            descending: false,
            nulls_first: true,
        });
    }
    let column_props = fields
        .iter()
        .zip(&columns)
        .zip(&kinds)
        .map(|((field, column), kind)| {
            let (choice, page_rows) = match layout {
                Layout::Fixed => (fixed(*kind, field.data_type()), PAGE_ROWS),
                Layout::Measured { page_rows } => {
                    let rows = page_rows.clamp(1, ROW_GROUP_ROWS);
                    (measure(field, column, *kind, rows)?, rows)
                }
            };
            column_properties(field.name(), *kind, choice, page_rows)
        })
        .collect::<Result<Vec<_>>>()?;
    let file_props = file_properties()?
        .set_sorting_columns(Some(sorting))
        .build();
    let file_schema: SchemaRef =
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    let file_batch = RecordBatch::try_new(file_schema, columns)?;
    // The page boundaries the index records: a column of PAGE_ROWS-row pages.
    let paged_column = kinds
        .iter()
        .position(|k| *k != Some(ColumnKind::Time))
        .unwrap_or(0);
    let parquet = Bytes::from(write_file(&file_batch, &column_props, file_props)?);

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
            .and_then(|cols| cols.get(paged_column))
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

/// The float column as exact scaled decimals, with the smallest scale that
/// round-trips: `DECIMAL(9, scale)` (stored as 32-bit integers) when every value
/// has at most 9 digits, else `DECIMAL(18, scale)`.
///
/// The precision is one of two, not the narrowest the values allow: the segments
/// of a table are read together as one dataset by other engines (DuckDB's
/// `read_parquet` over a list takes the first file's column types for all), and a
/// value converts between the two as long as it fits, which a reading of a day with
/// 9 digits or fewer always does.
///
/// The check divides exactly as the Arrow cast back to `Float64` does, so reading a
/// decimal column as a float returns the very bits that were written.
fn as_decimal(col: &ArrayRef) -> Option<(u8, i8, ArrayRef)> {
    let floats = col.as_primitive_opt::<Float64Type>()?;
    'scale: for scale in 0..=MAX_SCALE {
        let p = 10f64.powi(scale);
        let mut largest = 0f64;
        for v in floats.iter().flatten() {
            let m = (v * p).round();
            if m.abs() >= EXACT_INT || (m / p).to_bits() != v.to_bits() {
                continue 'scale;
            }
            largest = largest.max(m.abs());
        }
        let precision = if largest < 1e9 { 9 } else { 18 };
        let ints: Decimal128Array = floats
            .iter()
            .map(|v| v.map(|v| (v * p).round() as i128))
            .collect::<Decimal128Array>()
            .with_precision_and_scale(precision, scale as i8)
            .ok()?;
        return Some((precision, scale as i8, Arc::new(ints)));
    }
    None
}

/// Decodes a whole segment file (compaction reads its inputs this way).
pub fn decode(parquet: Bytes) -> Result<Vec<RecordBatch>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(parquet)?
        .with_batch_size(64 * 1024)
        .build()?;
    reader.map(|b| b.map_err(StorageError::from)).collect()
}

/// A segment's rows in file order without those at the positions in `deleted`.
pub fn decode_kept(
    parquet: Bytes,
    deleted: Option<&roaring::RoaringBitmap>,
) -> Result<Vec<RecordBatch>> {
    let batches = decode(parquet)?;
    let Some(deleted) = deleted.filter(|d| !d.is_empty()) else {
        return Ok(batches);
    };
    let mut first = 0u32;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let n = b.num_rows() as u32;
        let keep: datafusion::arrow::array::BooleanArray = (first..first + n)
            .map(|i| Some(!deleted.contains(i)))
            .collect();
        first += n;
        out.push(datafusion::arrow::compute::filter_record_batch(&b, &keep)?);
    }
    Ok(out)
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

    fn sample(t: &TableSchema, n: usize) -> (RecordBatch, Vec<Option<f64>>, Vec<Option<f64>>) {
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
        (batch, levels, raw)
    }

    fn floats(seg: &EncodedSegment, t: &TableSchema, col: usize) -> Vec<Option<u64>> {
        let back = decode(seg.parquet.clone()).unwrap();
        let back = align(
            &datafusion::arrow::compute::concat_batches(&back[0].schema(), &back).unwrap(),
            &t.arrow_schema(),
        )
        .unwrap();
        back.column(col)
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.map(f64::to_bits))
            .collect()
    }

    #[test]
    fn measured_layout_cuts_pages_as_configured_and_keeps_values() {
        let t = table();
        let n: usize = 20_000;
        let (batch, levels, raw) = sample(&t, n);
        let bits = |v: &[Option<f64>]| v.iter().map(|v| v.map(f64::to_bits)).collect::<Vec<_>>();
        for page_rows in [512, 4096] {
            let seg = encode_with(&batch, &t, Layout::Measured { page_rows }).unwrap();
            assert_eq!(
                seg.index.row_groups[0].page_starts.len(),
                n.div_ceil(page_rows),
                "{page_rows} rows per page"
            );
            assert_eq!(floats(&seg, &t, 2), bits(&levels));
            assert_eq!(floats(&seg, &t, 3), bits(&raw));
        }
    }

    #[test]
    fn floats_round_trip_bit_for_bit_through_decimals() {
        let t = table();
        let n: usize = 5000;
        let (batch, levels, raw) = sample(&t, n);
        let seg = encode(&batch, &t).unwrap();
        assert_eq!(seg.rows, n as u64);
        let file_schema = ParquetRecordBatchReaderBuilder::try_new(seg.parquet.clone())
            .unwrap()
            .schema()
            .clone();
        assert_eq!(
            file_schema.field(2).data_type(),
            &DataType::Decimal128(9, 1),
            "level stored as DECIMAL at the smallest exact scale"
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

        let want = |v: &[Option<f64>]| v.iter().map(|v| v.map(f64::to_bits)).collect::<Vec<_>>();
        assert_eq!(floats(&seg, &t, 2), want(&levels));
        assert_eq!(floats(&seg, &t, 3), want(&raw));
    }

    #[test]
    fn a_costlier_level_is_chosen_only_for_what_it_saves() {
        let c = |zstd| Choice {
            encoding: None,
            zstd,
        };
        let pick = |tried: &[(u64, Choice)]| cheapest_within(tried, c(3)).zstd;
        assert_eq!(pick(&[(1000, c(3)), (995, c(9)), (991, c(19))]), 3);
        assert_eq!(pick(&[(1000, c(3)), (950, c(9)), (948, c(19))]), 9);
        assert_eq!(pick(&[(1000, c(3)), (980, c(9)), (900, c(19))]), 19);
        assert_eq!(pick(&[(900, c(3)), (1000, c(9)), (950, c(19))]), 3);
        assert_eq!(pick(&[]), 3);
    }

    #[test]
    fn the_measured_layout_stores_less_than_the_fixed_one() {
        let t = table();
        let (batch, _, _) = sample(&t, 20_000);
        let fixed = encode(&batch, &t).unwrap().parquet.len();
        let measured = encode_with(
            &batch,
            &t,
            Layout::Measured {
                page_rows: PAGE_ROWS,
            },
        )
        .unwrap()
        .parquet
        .len();
        assert!(measured < fixed, "measured {measured} B, fixed {fixed} B");
    }
}
