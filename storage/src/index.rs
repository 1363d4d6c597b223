//! A segment's tag index: for each tag column, tag value -> roaring bitmap of row ids,
//! plus the segment's row-group and page boundaries, so a set of rows becomes a
//! Parquet row selection and a count of the rows that must be decoded.
//!
//! File layout (little-endian): magic `CTSDBIDX`, u32 version, the row groups
//! (u32 count; each: u64 first row, u64 rows, u32 page count, u64 first row of each
//! page), then the tags (u32 count; each: name, u32 value count; each: value, bitmap).
//! Names, values and bitmaps are u32-length-prefixed; bitmaps use roaring's portable
//! serialization, so any roaring library can read them.

use std::collections::BTreeMap;

use datafusion::parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use roaring::RoaringBitmap;

use crate::error::{Result, StorageError};

const MAGIC: &[u8; 8] = b"CTSDBIDX";
const VERSION: u32 = 1;

/// Rows of one Parquet row group and where its pages start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGroupPages {
    /// Segment row id of the group's first row.
    pub first_row: u64,
    /// Rows in the group.
    pub rows: u64,
    /// Segment row id of the first row of each page (of the time column), ascending.
    pub page_starts: Vec<u64>,
}

/// The index of one segment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SegmentIndex {
    /// Row groups in file order.
    pub row_groups: Vec<RowGroupPages>,
    /// Tag column -> tag value -> rows holding it.
    pub tags: BTreeMap<String, BTreeMap<String, RoaringBitmap>>,
}

/// What to read of one row group.
#[derive(Debug, Clone, PartialEq)]
pub enum RowGroupAccess {
    /// Nothing in this group is wanted.
    Skip,
    /// Every row is wanted.
    Scan,
    /// Only these rows.
    Select(RowSelection),
}

/// A row set turned into per-row-group access, with its cost.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentSelection {
    /// One entry per row group.
    pub row_groups: Vec<RowGroupAccess>,
    /// Rows wanted.
    pub rows_selected: u64,
    /// Rows in the pages that hold a wanted row: what a reader must decode.
    pub rows_decoded: u64,
    /// The most pages (of the time column) that one row group's wanted rows
    /// touch: at most 1 means pruning pages by time can drop nothing the
    /// selection keeps but whole row groups' worth of one page.
    pub max_pages: u64,
}

/// A set of wanted values for one tag column (an `=` or `IN` predicate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagConstraint {
    /// The tag column.
    pub column: String,
    /// Rows must hold one of these values.
    pub values: Vec<String>,
}

impl SegmentIndex {
    /// Builds the index of a sorted batch's tag columns.
    pub fn build<'a>(
        tags: impl IntoIterator<Item = (String, Box<dyn Iterator<Item = Option<&'a str>> + 'a>)>,
    ) -> Self {
        let mut out = BTreeMap::new();
        for (name, values) in tags {
            let mut col: BTreeMap<String, RoaringBitmap> = BTreeMap::new();
            // Sorted segments hold each value in long runs: insert whole ranges.
            let mut run: Option<(&str, u32)> = None;
            let mut row = 0u32;
            for v in values {
                if run.map(|(cur, _)| cur) != v || run.is_none() {
                    if let Some((cur, start)) = run {
                        col.entry(cur.to_string())
                            .or_default()
                            .insert_range(start..row);
                    }
                    run = v.map(|v| (v, row));
                }
                row += 1;
            }
            if let Some((cur, start)) = run {
                col.entry(cur.to_string())
                    .or_default()
                    .insert_range(start..row);
            }
            out.insert(name, col);
        }
        Self {
            row_groups: Vec::new(),
            tags: out,
        }
    }

    /// Total rows of the segment.
    pub fn rows(&self) -> u64 {
        self.row_groups.iter().map(|g| g.rows).sum()
    }

    /// The rows matching every constraint; `None` when there are no constraints.
    pub fn matching_rows(&self, constraints: &[TagConstraint]) -> Option<RoaringBitmap> {
        let mut acc: Option<RoaringBitmap> = None;
        for c in constraints {
            let mut rows = RoaringBitmap::new();
            if let Some(col) = self.tags.get(&c.column) {
                for v in &c.values {
                    if let Some(b) = col.get(v) {
                        rows |= b;
                    }
                }
            }
            acc = Some(match acc {
                Some(a) => a & rows,
                None => rows,
            });
        }
        acc
    }

    /// Turns a row set into row-group access and counts the rows of the pages touched.
    pub fn selection(&self, rows: Option<&RoaringBitmap>) -> SegmentSelection {
        let mut groups = Vec::with_capacity(self.row_groups.len());
        let (mut selected, mut decoded, mut max_pages) = (0u64, 0u64, 0u64);
        for g in &self.row_groups {
            let end = g.first_row + g.rows;
            let Some(rows) = rows else {
                groups.push(RowGroupAccess::Scan);
                selected += g.rows;
                decoded += g.rows;
                max_pages = max_pages.max(g.page_starts.len().max(1) as u64);
                continue;
            };
            let in_group = rows.range_cardinality(g.first_row as u32..end as u32);
            if in_group == 0 {
                groups.push(RowGroupAccess::Skip);
                continue;
            }
            selected += in_group;
            let (rows_in_pages, pages) = pages_rows(g, rows);
            decoded += rows_in_pages;
            max_pages = max_pages.max(pages);
            if in_group == g.rows {
                groups.push(RowGroupAccess::Scan);
                continue;
            }
            let mut selectors = Vec::new();
            let mut pos = g.first_row;
            for (start, stop) in runs(rows, g.first_row as u32, end as u32) {
                if start as u64 > pos {
                    selectors.push(RowSelector::skip((start as u64 - pos) as usize));
                }
                selectors.push(RowSelector::select((stop - start) as usize));
                pos = stop as u64;
            }
            if pos < end {
                selectors.push(RowSelector::skip((end - pos) as usize));
            }
            groups.push(RowGroupAccess::Select(RowSelection::from(selectors)));
        }
        SegmentSelection {
            row_groups: groups,
            rows_selected: selected,
            rows_decoded: decoded,
            max_pages,
        }
    }

    /// Serializes the index.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.row_groups.len() as u32).to_le_bytes());
        for g in &self.row_groups {
            out.extend_from_slice(&g.first_row.to_le_bytes());
            out.extend_from_slice(&g.rows.to_le_bytes());
            out.extend_from_slice(&(g.page_starts.len() as u32).to_le_bytes());
            for p in &g.page_starts {
                out.extend_from_slice(&p.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.tags.len() as u32).to_le_bytes());
        for (name, values) in &self.tags {
            put(&mut out, name.as_bytes());
            out.extend_from_slice(&(values.len() as u32).to_le_bytes());
            for (v, bitmap) in values {
                put(&mut out, v.as_bytes());
                let mut bytes = Vec::with_capacity(bitmap.serialized_size());
                bitmap.serialize_into(&mut bytes)?;
                put(&mut out, &bytes);
            }
        }
        Ok(out)
    }

    /// Reads an index written by [`SegmentIndex::encode`].
    pub fn decode(data: &[u8]) -> Result<Self> {
        let mut r = Cursor { buf: data };
        if r.take(8)? != MAGIC {
            return Err(corrupt("bad magic"));
        }
        if r.u32()? != VERSION {
            return Err(corrupt("unknown version"));
        }
        let mut row_groups = Vec::new();
        for _ in 0..r.u32()? {
            let first_row = r.u64()?;
            let rows = r.u64()?;
            let n = r.u32()? as usize;
            let page_starts = (0..n).map(|_| r.u64()).collect::<Result<_>>()?;
            row_groups.push(RowGroupPages {
                first_row,
                rows,
                page_starts,
            });
        }
        let mut tags = BTreeMap::new();
        for _ in 0..r.u32()? {
            let name = r.string()?;
            let mut values = BTreeMap::new();
            for _ in 0..r.u32()? {
                let v = r.string()?;
                let bytes = r.bytes()?;
                let bitmap =
                    RoaringBitmap::deserialize_from(bytes).map_err(|e| corrupt(&e.to_string()))?;
                values.insert(v, bitmap);
            }
            tags.insert(name, values);
        }
        Ok(Self { row_groups, tags })
    }
}

/// Rows in the pages of group `g` that hold at least one row of `rows`, and how
/// many such pages there are.
fn pages_rows(g: &RowGroupPages, rows: &RoaringBitmap) -> (u64, u64) {
    if g.page_starts.is_empty() {
        return (g.rows, 1);
    }
    let end = g.first_row + g.rows;
    let (mut total, mut pages) = (0, 0);
    for (i, &start) in g.page_starts.iter().enumerate() {
        let stop = g.page_starts.get(i + 1).copied().unwrap_or(end);
        if rows.range_cardinality(start as u32..stop as u32) > 0 {
            total += stop - start;
            pages += 1;
        }
    }
    (total, pages)
}

/// Maximal runs of consecutive rows of `rows` within `[lo, hi)`, as `[start, stop)`.
pub(crate) fn runs(rows: &RoaringBitmap, lo: u32, hi: u32) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for r in rows.range(lo..hi) {
        match out.last_mut() {
            Some((_, stop)) if *stop == r => *stop = r + 1,
            _ => out.push((r, r + 1)),
        }
    }
    out
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt(format!("segment index: {what}"))
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(corrupt("truncated"));
        }
        let (h, t) = self.buf.split_at(n);
        self.buf = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| corrupt("non-UTF-8 tag"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> SegmentIndex {
        let devices = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "c"];
        let districts = ["x", "x", "x", "x", "x", "y", "y", "y", "y", "y"];
        let mut idx = SegmentIndex::build([
            (
                "device".to_string(),
                Box::new(devices.iter().map(|s| Some(*s)))
                    as Box<dyn Iterator<Item = Option<&str>>>,
            ),
            (
                "district".to_string(),
                Box::new(districts.iter().map(|s| Some(*s))),
            ),
        ]);
        idx.row_groups = vec![
            RowGroupPages {
                first_row: 0,
                rows: 6,
                page_starts: vec![0, 2, 4],
            },
            RowGroupPages {
                first_row: 6,
                rows: 4,
                page_starts: vec![6, 8],
            },
        ];
        idx
    }

    #[test]
    fn bitmaps_become_row_selections_and_page_costs() {
        let idx = index();
        let rows = idx
            .matching_rows(&[TagConstraint {
                column: "device".into(),
                values: vec!["b".into()],
            }])
            .unwrap();
        assert_eq!(rows.iter().collect::<Vec<_>>(), vec![3, 4]);
        let sel = idx.selection(Some(&rows));
        assert_eq!(sel.rows_selected, 2);
        assert_eq!(sel.rows_decoded, 4, "pages [2,4) and [4,6)");
        assert_eq!(sel.max_pages, 2);
        let first = RoaringBitmap::from_iter([0u32, 1, 6]);
        assert_eq!(
            idx.selection(Some(&first)).max_pages,
            1,
            "one page in each group"
        );
        assert_eq!(idx.selection(None).max_pages, 3);
        assert_eq!(
            sel.row_groups[0],
            RowGroupAccess::Select(RowSelection::from(vec![
                RowSelector::skip(3),
                RowSelector::select(2),
                RowSelector::skip(1)
            ]))
        );
        assert_eq!(sel.row_groups[1], RowGroupAccess::Skip);
    }

    #[test]
    fn constraints_intersect_and_unknown_values_match_nothing() {
        let idx = index();
        let both = idx.matching_rows(&[
            TagConstraint {
                column: "district".into(),
                values: vec!["y".into()],
            },
            TagConstraint {
                column: "device".into(),
                values: vec!["a".into(), "c".into()],
            },
        ]);
        assert_eq!(both.unwrap().len(), 5);
        let none = idx.matching_rows(&[TagConstraint {
            column: "device".into(),
            values: vec!["zz".into()],
        }]);
        assert!(none.unwrap().is_empty());
        assert_eq!(idx.matching_rows(&[]), None);
    }

    #[test]
    fn encoding_round_trips() {
        let idx = index();
        assert_eq!(SegmentIndex::decode(&idx.encode().unwrap()).unwrap(), idx);
        assert!(SegmentIndex::decode(b"CTSDBIDX").is_err());
    }
}
