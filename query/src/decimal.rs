//! Float fields stored as decimals, read back as doubles cheaply.
//!
//! A segment stores a float column as `DECIMAL(9, s)` or `DECIMAL(18, s)` when
//! every value round-trips at scale `s` (`storage/src/segment.rs`); the Parquet
//! reader gives those as `Decimal128`, and DataFusion casts them to the table's
//! `Float64`. Arrow's cast converts each 128-bit integer to a double in software
//! (`__floattidf`): with its division, a tenth of a whole-range aggregate's time.
//! Decimals of at most 18 digits fit 64 bits, which the CPU converts in one
//! instruction, to the same double: [`SegmentExprAdapterFactory`] replaces that
//! cast, in the columns a scan reads, with [`DecimalToFloat`], which does so. The
//! value is the cast's exactly (`x as f64 / 10^s`, and `x as i64 as f64` is
//! `x as f64` when `x` fits 64 bits).
//!
//! Only a projected column (a cast at the root of what the reader is asked for)
//! is replaced: filters keep DataFusion's cast, which statistics pruning knows.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, FieldRef, Float64Type, Schema, SchemaRef,
};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::expressions::{CastExpr, Column};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr_adapter::{
    DefaultPhysicalExprAdapterFactory, PhysicalExprAdapter, PhysicalExprAdapterFactory,
};

/// DataFusion's adapter from table to file columns, with decimal columns read as
/// doubles by [`DecimalToFloat`].
#[derive(Debug, Default)]
pub struct SegmentExprAdapterFactory;

impl PhysicalExprAdapterFactory for SegmentExprAdapterFactory {
    fn create(
        &self,
        logical_file_schema: SchemaRef,
        physical_file_schema: SchemaRef,
    ) -> Result<Arc<dyn PhysicalExprAdapter>> {
        Ok(Arc::new(SegmentExprAdapter {
            inner: DefaultPhysicalExprAdapterFactory
                .create(logical_file_schema, Arc::clone(&physical_file_schema))?,
            physical: physical_file_schema,
        }))
    }
}

#[derive(Debug)]
struct SegmentExprAdapter {
    inner: Arc<dyn PhysicalExprAdapter>,
    physical: SchemaRef,
}

impl PhysicalExprAdapter for SegmentExprAdapter {
    fn rewrite(&self, expr: Arc<dyn PhysicalExpr>) -> Result<Arc<dyn PhysicalExpr>> {
        let expr = self.inner.rewrite(expr)?;
        let Some(cast) = expr.downcast_ref::<CastExpr>() else {
            return Ok(expr);
        };
        let Some(column) = cast.expr().downcast_ref::<Column>() else {
            return Ok(expr);
        };
        let Some(field) = self.physical.fields().get(column.index()) else {
            return Ok(expr);
        };
        match (field.data_type(), cast.cast_type()) {
            (DataType::Decimal128(precision, scale), DataType::Float64) if *precision <= 18 => {
                Ok(Arc::new(DecimalToFloat {
                    input: Arc::clone(cast.expr()),
                    scale: *scale,
                    field: Arc::clone(cast.target_field()),
                }))
            }
            _ => Ok(expr),
        }
    }
}

/// A `Decimal128` column of at most 18 digits as `Float64`: the cast's values.
/// The column is its child, so the reader can renumber it.
#[derive(Debug, Clone)]
pub struct DecimalToFloat {
    input: Arc<dyn PhysicalExpr>,
    scale: i8,
    field: FieldRef,
}

impl PartialEq for DecimalToFloat {
    fn eq(&self, other: &Self) -> bool {
        self.input.as_ref() == other.input.as_ref()
            && self.scale == other.scale
            && self.field == other.field
    }
}

impl Eq for DecimalToFloat {}

impl Hash for DecimalToFloat {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.input.hash(state);
        self.scale.hash(state);
        self.field.hash(state);
    }
}

impl fmt::Display for DecimalToFloat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CAST({} AS Float64)", self.input)
    }
}

impl PhysicalExpr for DecimalToFloat {
    fn return_field(&self, _input_schema: &Schema) -> Result<FieldRef> {
        Ok(Arc::clone(&self.field))
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let array = self.input.evaluate(batch)?.into_array(batch.num_rows())?;
        let decimals = array.as_primitive_opt::<Decimal128Type>().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "{} is {}, not a decimal",
                self.input,
                array.data_type()
            ))
        })?;
        let divisor = 10_f64.powi(i32::from(self.scale));
        let floats = decimals.unary::<_, Float64Type>(|x| to_float(x, divisor));
        Ok(ColumnarValue::Array(Arc::new(floats)))
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.input]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        let input = children.pop().ok_or_else(|| {
            DataFusionError::Internal("DecimalToFloat takes one child".to_owned())
        })?;
        Ok(Arc::new(Self {
            input,
            scale: self.scale,
            field: Arc::clone(&self.field),
        }))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CAST(")?;
        self.input.fmt_sql(f)?;
        write!(f, " AS DOUBLE)")
    }
}

/// `x / 10^s` as arrow's cast computes it, for `x` of at most 18 digits.
#[inline]
fn to_float(x: i128, divisor: f64) -> f64 {
    (x as i64) as f64 / divisor
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, Decimal128Array};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::Field;

    /// The same doubles as arrow's cast, nulls included, over values of every
    /// size up to 18 digits and every scale the segments use.
    #[test]
    fn the_values_are_the_casts() {
        let mut values: Vec<Option<i128>> = vec![None, Some(0), Some(1), Some(-1)];
        let mut x: i128 = 7;
        while x < 999_999_999_999_999_999 {
            values.extend([Some(x), Some(-x), Some(x + 1), Some(x * 3 / 2)]);
            x = x * 10 + 3;
        }
        values.push(Some(999_999_999_999_999_999));
        values.push(Some(-999_999_999_999_999_999));
        for scale in 0..=9i8 {
            let decimals = Decimal128Array::from(values.clone())
                .with_precision_and_scale(18, scale)
                .unwrap();
            let schema = Schema::new(vec![Field::new("v", decimals.data_type().clone(), true)]);
            let batch =
                RecordBatch::try_new(Arc::new(schema), vec![Arc::new(decimals.clone())]).unwrap();
            let expr = DecimalToFloat {
                input: Arc::new(Column::new("v", 0)),
                scale,
                field: Arc::new(Field::new("v", DataType::Float64, true)),
            };
            let ColumnarValue::Array(got) = expr.evaluate(&batch).unwrap() else {
                panic!("not an array");
            };
            let want = cast(&decimals, &DataType::Float64).unwrap();
            assert_eq!(got.nulls(), want.nulls());
            let (got, want) = (
                got.as_primitive::<Float64Type>(),
                want.as_primitive::<Float64Type>(),
            );
            for (i, value) in values.iter().enumerate() {
                if want.is_valid(i) {
                    assert_eq!(
                        got.value(i).to_bits(),
                        want.value(i).to_bits(),
                        "{value:?} at scale {scale}"
                    );
                }
            }
        }
    }
}
