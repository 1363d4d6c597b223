//! Table schemas: `time`, tags and typed fields, grown on write.
//!
//! Column order is stable: `time` first, then tags and fields in the order they were
//! first written. A column never changes kind or type once it exists.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

/// Name of the timestamp column every table has.
pub const TIME_COLUMN: &str = "time";

/// The time zone of the `time` column: always UTC.
pub const TIME_ZONE: &str = "UTC";

/// Most columns a table may have; a write that would add more is rejected.
pub const MAX_COLUMNS: usize = 1024;

/// The Arrow type of the `time` column.
pub fn time_data_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some(TIME_ZONE.into()))
}

/// The type of a field column, as line protocol writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// 64-bit float (`1.5`).
    Float,
    /// Signed 64-bit integer (`1i`).
    Integer,
    /// Unsigned 64-bit integer (`1u`).
    UInteger,
    /// Boolean (`t`, `false`).
    Boolean,
    /// UTF-8 string (`"text"`).
    String,
}

impl FieldType {
    /// The Arrow type a column of this field type has in memory and in query answers.
    pub fn data_type(self) -> DataType {
        match self {
            Self::Float => DataType::Float64,
            Self::Integer => DataType::Int64,
            Self::UInteger => DataType::UInt64,
            Self::Boolean => DataType::Boolean,
            Self::String => DataType::Utf8,
        }
    }

    /// The word users see in error messages (`float`, `integer`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::Integer => "integer",
            Self::UInteger => "unsigned",
            Self::Boolean => "boolean",
            Self::String => "string",
        }
    }
}

/// What a column is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "type")]
pub enum ColumnKind {
    /// The row's timestamp.
    Time,
    /// A string tag: part of the series key.
    Tag,
    /// A measured value.
    Field(FieldType),
}

impl ColumnKind {
    /// A short description for error messages: `tag`, `float field`, ...
    pub fn describe(self) -> String {
        match self {
            Self::Time => "the time column".to_string(),
            Self::Tag => "a tag".to_string(),
            Self::Field(t) => format!("{} field", t.name()),
        }
    }
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    /// Column name.
    pub name: String,
    /// Kind and type.
    #[serde(flatten)]
    pub kind: ColumnKind,
}

/// The schema of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<ColumnDef>", into = "Vec<ColumnDef>")]
pub struct TableSchema {
    columns: Vec<ColumnDef>,
    /// Column index by name: hashbrown's default hasher (every written tag and
    /// field is looked up here).
    by_name: datafusion::common::HashMap<String, usize>,
}

impl Default for TableSchema {
    fn default() -> Self {
        Self::from(vec![ColumnDef {
            name: TIME_COLUMN.to_string(),
            kind: ColumnKind::Time,
        }])
    }
}

impl From<Vec<ColumnDef>> for TableSchema {
    fn from(columns: Vec<ColumnDef>) -> Self {
        let by_name = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        Self { columns, by_name }
    }
}

impl From<TableSchema> for Vec<ColumnDef> {
    fn from(schema: TableSchema) -> Self {
        schema.columns
    }
}

impl TableSchema {
    /// All columns, `time` first.
    pub fn columns(&self) -> &[ColumnDef] {
        &self.columns
    }

    /// The kind of the named column, if it exists.
    pub fn kind(&self, name: &str) -> Option<ColumnKind> {
        self.by_name.get(name).map(|&i| self.columns[i].kind)
    }

    /// Where the named column is in [`columns`](Self::columns), and its kind.
    pub fn position(&self, name: &str) -> Option<(usize, ColumnKind)> {
        self.by_name.get(name).map(|&i| (i, self.columns[i].kind))
    }

    /// Names of the tag columns, in column order.
    pub fn tag_names(&self) -> impl Iterator<Item = &str> {
        self.columns
            .iter()
            .filter(|c| c.kind == ColumnKind::Tag)
            .map(|c| c.name.as_str())
    }

    /// Adds a column, or checks that an existing one has the same kind.
    ///
    /// Returns an error message naming the conflict when the column exists with
    /// another kind, or when the table is full.
    pub fn add_column(&mut self, name: &str, kind: ColumnKind) -> Result<bool, String> {
        match self.kind(name) {
            Some(existing) if existing == kind => Ok(false),
            Some(existing) => Err(format!(
                "column {name} is {} in this table, got {}",
                existing.describe(),
                kind.describe()
            )),
            None if self.columns.len() >= MAX_COLUMNS => Err(format!(
                "table has the maximum of {MAX_COLUMNS} columns; cannot add {name}"
            )),
            None => {
                self.by_name.insert(name.to_string(), self.columns.len());
                self.columns.push(ColumnDef {
                    name: name.to_string(),
                    kind,
                });
                Ok(true)
            }
        }
    }

    /// Merges another schema's columns into this one (used when replaying the WAL).
    pub fn merge(&mut self, other: &TableSchema) -> Result<(), String> {
        for c in other.columns() {
            self.add_column(&c.name, c.kind)?;
        }
        Ok(())
    }

    /// The Arrow schema of the whole table.
    pub fn arrow_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns.iter().map(arrow_field).collect::<Vec<_>>(),
        ))
    }

    /// Reads a table schema back from the Arrow schema of a batch this crate built.
    pub fn from_arrow(schema: &Schema) -> Result<Self, String> {
        let mut out = Self::default();
        for f in schema.fields() {
            let kind = kind_of_field(f)?;
            out.add_column(f.name(), kind)?;
        }
        Ok(out)
    }
}

const KIND_KEY: &str = "citytsdb.kind";

/// The Arrow field of a column; its kind is kept in the field's metadata.
pub fn arrow_field(c: &ColumnDef) -> Field {
    let (data_type, nullable, kind) = match c.kind {
        ColumnKind::Time => (time_data_type(), false, "time"),
        ColumnKind::Tag => (DataType::Utf8, true, "tag"),
        ColumnKind::Field(t) => (t.data_type(), true, "field"),
    };
    Field::new(&c.name, data_type, nullable)
        .with_metadata([(KIND_KEY.to_string(), kind.to_string())].into())
}

fn kind_of_field(f: &Field) -> Result<ColumnKind, String> {
    let kind = f.metadata().get(KIND_KEY).map(String::as_str);
    let field_type = match f.data_type() {
        DataType::Float64 => Some(FieldType::Float),
        DataType::Int64 => Some(FieldType::Integer),
        DataType::UInt64 => Some(FieldType::UInteger),
        DataType::Boolean => Some(FieldType::Boolean),
        DataType::Utf8 => Some(FieldType::String),
        _ => None,
    };
    match (kind, field_type) {
        (Some("time"), _) => Ok(ColumnKind::Time),
        (Some("tag"), _) => Ok(ColumnKind::Tag),
        (Some("field"), Some(t)) => Ok(ColumnKind::Field(t)),
        _ => Err(format!(
            "column {} has no citytsdb kind or an unsupported type {}",
            f.name(),
            f.data_type()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_grow_and_conflicts_are_named() {
        let mut s = TableSchema::default();
        assert_eq!(s.add_column("device", ColumnKind::Tag), Ok(true));
        assert_eq!(
            s.add_column("tilt_deg", ColumnKind::Field(FieldType::Float)),
            Ok(true)
        );
        assert_eq!(s.add_column("device", ColumnKind::Tag), Ok(false));
        let err = s
            .add_column("tilt_deg", ColumnKind::Field(FieldType::String))
            .unwrap_err();
        assert_eq!(
            err,
            "column tilt_deg is float field in this table, got string field"
        );
        let back = TableSchema::from_arrow(&s.arrow_schema()).unwrap();
        assert_eq!(back, s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<TableSchema>(&json).unwrap(), s);
    }
}
