//! What a query's filters say about time and tags, in a form that prunes segments.
//!
//! Only conjuncts that are plain comparisons of a key column (`time` or a tag) with a
//! literal are understood; anything else is left to the filter DataFusion applies
//! above the scan, so pruning can skip data but never change an answer.

use citytsdb_storage::index::TagConstraint;
use citytsdb_storage::schema::TIME_COLUMN;
use citytsdb_storage::{ColumnKind, TableSchema};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator};

/// The key-column bounds a query's filters imply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBounds {
    /// Earliest time that can match, nanoseconds (inclusive).
    pub min_time: i64,
    /// Latest time that can match, nanoseconds (inclusive).
    pub max_time: i64,
    /// Tags that must take one of the listed values.
    pub tags: Vec<TagConstraint>,
}

impl Default for KeyBounds {
    fn default() -> Self {
        Self {
            min_time: i64::MIN,
            max_time: i64::MAX,
            tags: Vec::new(),
        }
    }
}

impl KeyBounds {
    /// Reads bounds from the conjuncts DataFusion pushed to the scan.
    pub fn from_filters(filters: &[Expr], schema: &TableSchema) -> Self {
        let mut out = Self::default();
        for f in filters {
            out.add(f, schema);
        }
        out
    }

    /// True when no row can match (an empty time range or an empty tag set).
    pub fn is_empty(&self) -> bool {
        self.min_time > self.max_time || self.tags.iter().any(|t| t.values.is_empty())
    }

    fn add(&mut self, e: &Expr, schema: &TableSchema) {
        match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => {
                self.add(left, schema);
                self.add(right, schema);
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                if let Some((col, op, value)) = comparison(left, *op, right) {
                    self.add_comparison(col, op, value, schema);
                } else if *op == Operator::Or {
                    if let Some(c) = tag_disjunction(e, schema) {
                        self.add_tag(c);
                    }
                }
            }
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) => {
                if let (Expr::Column(c), Expr::Literal(lo, _), Expr::Literal(hi, _)) =
                    (expr.as_ref(), low.as_ref(), high.as_ref())
                {
                    self.add_comparison(&c.name, Operator::GtEq, lo, schema);
                    self.add_comparison(&c.name, Operator::LtEq, hi, schema);
                }
            }
            Expr::InList(list) if !list.negated => {
                if let Expr::Column(c) = list.expr.as_ref() {
                    if schema.kind(&c.name) == Some(ColumnKind::Tag) {
                        let values: Option<Vec<String>> =
                            list.list.iter().map(string_literal).collect();
                        if let Some(values) = values {
                            self.add_tag(TagConstraint {
                                column: c.name.clone(),
                                values,
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn add_comparison(
        &mut self,
        col: &str,
        op: Operator,
        value: &ScalarValue,
        schema: &TableSchema,
    ) {
        match schema.kind(col) {
            Some(ColumnKind::Time) if col == TIME_COLUMN => {
                let Some(v) = timestamp_nanos(value) else {
                    return;
                };
                match op {
                    Operator::Eq => {
                        self.min_time = self.min_time.max(v);
                        self.max_time = self.max_time.min(v);
                    }
                    Operator::Gt => self.min_time = self.min_time.max(v.saturating_add(1)),
                    Operator::GtEq => self.min_time = self.min_time.max(v),
                    Operator::Lt => self.max_time = self.max_time.min(v.saturating_sub(1)),
                    Operator::LtEq => self.max_time = self.max_time.min(v),
                    _ => {}
                }
            }
            Some(ColumnKind::Tag) if op == Operator::Eq => {
                if let Some(s) = scalar_string(value) {
                    self.add_tag(TagConstraint {
                        column: col.to_string(),
                        values: vec![s],
                    });
                }
            }
            _ => {}
        }
    }

    fn add_tag(&mut self, c: TagConstraint) {
        match self.tags.iter_mut().find(|t| t.column == c.column) {
            Some(existing) => existing.values.retain(|v| c.values.contains(v)),
            None => self.tags.push(c),
        }
    }
}

/// Whether the segment indexes answer conjunct `e` exactly: an equality, `IN` list
/// or disjunction of those on one tag column, with string values. Every such
/// conjunct becomes a [`TagConstraint`] of [`KeyBounds`], and the rows a scan reads
/// of each segment are then picked by its tag bitmaps, so the Parquet reader need
/// not prune by it again (statistics, bloom filters and page index would find the
/// same rows at a cost per file opened).
pub fn answered_by_index(e: &Expr, schema: &TableSchema) -> bool {
    tag_disjunction(e, schema).is_some()
}

/// `col op literal` or `literal op col`, normalized to the former.
fn comparison<'a>(
    left: &'a Expr,
    op: Operator,
    right: &'a Expr,
) -> Option<(&'a str, Operator, &'a ScalarValue)> {
    match (left, right) {
        (Expr::Column(c), Expr::Literal(v, _)) => Some((&c.name, op, v)),
        (Expr::Literal(v, _), Expr::Column(c)) => Some((&c.name, op.swap()?, v)),
        _ => None,
    }
}

/// `tag = 'a' OR tag = 'b' OR tag IN (...)` on one tag column.
fn tag_disjunction(e: &Expr, schema: &TableSchema) -> Option<TagConstraint> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let mut a = tag_disjunction(left, schema)?;
            let b = tag_disjunction(right, schema)?;
            if a.column != b.column {
                return None;
            }
            a.values.extend(b.values);
            Some(a)
        }
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => {
            let (col, _, v) = comparison(left, Operator::Eq, right)?;
            (schema.kind(col) == Some(ColumnKind::Tag)).then_some(())?;
            Some(TagConstraint {
                column: col.to_string(),
                values: vec![scalar_string(v)?],
            })
        }
        Expr::InList(list) if !list.negated => {
            let Expr::Column(c) = list.expr.as_ref() else {
                return None;
            };
            (schema.kind(&c.name) == Some(ColumnKind::Tag)).then_some(())?;
            let values = list
                .list
                .iter()
                .map(string_literal)
                .collect::<Option<Vec<_>>>()?;
            Some(TagConstraint {
                column: c.name.clone(),
                values,
            })
        }
        _ => None,
    }
}

fn string_literal(e: &Expr) -> Option<String> {
    match e {
        Expr::Literal(v, _) => scalar_string(v),
        _ => None,
    }
}

fn scalar_string(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::Utf8View(Some(s))
        | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
        _ => None,
    }
}

fn timestamp_nanos(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampNanosecond(Some(x), _) => Some(*x),
        ScalarValue::TimestampMicrosecond(Some(x), _) => x.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(x), _) => x.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(x), _) => x.checked_mul(1_000_000_000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citytsdb_storage::FieldType;
    use datafusion::prelude::{col, lit};

    fn schema() -> TableSchema {
        let mut s = TableSchema::default();
        s.add_column("device", ColumnKind::Tag).unwrap();
        s.add_column("district", ColumnKind::Tag).unwrap();
        s.add_column("tilt", ColumnKind::Field(FieldType::Float))
            .unwrap();
        s
    }

    fn ts(v: i64) -> Expr {
        lit(ScalarValue::TimestampNanosecond(
            Some(v),
            Some("UTC".into()),
        ))
    }

    #[test]
    fn time_and_tag_bounds_are_read_and_the_rest_ignored() {
        let filters = vec![
            col("time").gt_eq(ts(10)),
            ts(20).gt(col("time")),
            col("device").eq(lit("a")).or(col("device").eq(lit("b"))),
            col("device").in_list(vec![lit("b"), lit("c")], false),
            col("tilt").gt(lit(1.0)),
            col("district").not_eq(lit("x")),
        ];
        let b = KeyBounds::from_filters(&filters, &schema());
        assert_eq!((b.min_time, b.max_time), (10, 19));
        assert_eq!(
            b.tags,
            vec![TagConstraint {
                column: "device".into(),
                values: vec!["b".into()]
            }]
        );
        assert!(!b.is_empty());
    }

    #[test]
    fn contradictions_are_empty() {
        let filters = vec![col("device").eq(lit("a")), col("device").eq(lit("b"))];
        assert!(KeyBounds::from_filters(&filters, &schema()).is_empty());
        let filters = vec![col("time").gt(ts(5)), col("time").lt(ts(5))];
        assert!(KeyBounds::from_filters(&filters, &schema()).is_empty());
        let mixed = vec![col("device").eq(lit("a")).or(col("district").eq(lit("b")))];
        assert!(KeyBounds::from_filters(&mixed, &schema()).tags.is_empty());
    }
}
