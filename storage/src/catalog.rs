//! The catalog: databases, tables, schemas, segments and the global tag bitmaps.
//!
//! It is stored as immutable, numbered JSON snapshots (`catalog/<version>.json`). A new
//! version is written with create-only semantics and becomes the truth the moment it
//! exists; a half-written or failed update is never visible, and readers keep the
//! `Arc<Catalog>` they started with.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use roaring::RoaringBitmap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Result, StorageError};
use crate::paths;
use crate::schema::TableSchema;

/// Nanoseconds in a UTC day, the time partition of a segment.
pub const DAY_NANOS: i64 = 86_400_000_000_000;

/// The UTC day (days since 1970-01-01) holding a timestamp.
pub fn day_of(time_ns: i64) -> i64 {
    time_ns.div_euclid(DAY_NANOS)
}

/// One catalog version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Catalog {
    /// The snapshot's version; 0 before anything was persisted.
    pub version: u64,
    /// Next database id to hand out.
    pub next_db_id: u32,
    /// Next table id to hand out.
    pub next_table_id: u32,
    /// Next segment id to hand out.
    pub next_segment_id: u32,
    /// Databases by name.
    pub databases: BTreeMap<String, DatabaseCatalog>,
}

/// A database in the catalog.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DatabaseCatalog {
    /// Id used in object keys.
    pub id: u32,
    /// Tables by name.
    pub tables: BTreeMap<String, TableCatalog>,
}

/// A table in the catalog.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableCatalog {
    /// Id used in object keys.
    pub id: u32,
    /// The schema as of this version.
    pub schema: TableSchema,
    /// Persisted segments by id.
    pub segments: BTreeMap<u32, SegmentMeta>,
    /// Tag column -> tag value -> ids of the segments holding it.
    pub tag_segments: BTreeMap<String, BTreeMap<String, Bitmap>>,
    /// Key of the series registry (`series.rs`) of the rows this version holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<String>,
}

/// What the catalog knows of one segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// Segment id.
    pub id: u32,
    /// The UTC day it covers.
    pub day: i64,
    /// Key of the Parquet file.
    pub path: String,
    /// Key of the tag index.
    pub index_path: String,
    /// Size of the Parquet file in bytes.
    pub size: u64,
    /// Rows in the segment.
    pub rows: u64,
    /// Earliest timestamp, nanoseconds.
    pub min_time: i64,
    /// Latest timestamp, nanoseconds.
    pub max_time: i64,
    /// Rows per row group.
    pub row_group_rows: Vec<u64>,
}

impl SegmentMeta {
    /// True when the segment may hold rows in `[lo, hi]`.
    pub fn overlaps(&self, lo: i64, hi: i64) -> bool {
        self.min_time <= hi && lo <= self.max_time
    }
}

impl TableCatalog {
    /// Adds a segment and its tag values to the global bitmaps.
    pub fn add_segment(&mut self, meta: SegmentMeta, tags: &BTreeMap<String, Vec<String>>) {
        for (column, values) in tags {
            let col = self.tag_segments.entry(column.clone()).or_default();
            for v in values {
                col.entry(v.clone()).or_default().0.insert(meta.id);
            }
        }
        self.segments.insert(meta.id, meta);
    }

    /// Removes a segment and its ids from the global bitmaps.
    pub fn remove_segment(&mut self, id: u32) -> Option<SegmentMeta> {
        for col in self.tag_segments.values_mut() {
            col.retain(|_, b| {
                b.0.remove(id);
                !b.0.is_empty()
            });
        }
        self.segments.remove(&id)
    }
}

impl Catalog {
    /// The table entry, creating the database and table (with fresh ids) if needed.
    pub fn table_mut(&mut self, db: &str, table: &str) -> (u32, &mut TableCatalog) {
        if !self.databases.contains_key(db) {
            let id = self.next_db_id;
            self.next_db_id += 1;
            self.databases.insert(
                db.to_string(),
                DatabaseCatalog {
                    id,
                    tables: BTreeMap::new(),
                },
            );
        }
        let d = self.databases.get_mut(db).expect("inserted above");
        if !d.tables.contains_key(table) {
            let id = self.next_table_id;
            self.next_table_id += 1;
            d.tables.insert(
                table.to_string(),
                TableCatalog {
                    id,
                    ..Default::default()
                },
            );
        }
        (d.id, d.tables.get_mut(table).expect("inserted above"))
    }

    /// Hands out a new segment id.
    pub fn allocate_segment_id(&mut self) -> u32 {
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        id
    }
}

/// A roaring bitmap stored in JSON as base64 of roaring's portable serialization.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bitmap(pub RoaringBitmap);

impl Serialize for Bitmap {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(self.0.serialized_size());
        self.0
            .serialize_into(&mut bytes)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for Bitmap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        RoaringBitmap::deserialize_from(&bytes[..])
            .map(Bitmap)
            .map_err(serde::de::Error::custom)
    }
}

/// Loads the newest catalog snapshot, or an empty catalog when there is none.
pub async fn load_latest(store: &Arc<dyn ObjectStore>) -> Result<Catalog> {
    let prefix = paths::catalog_prefix();
    let mut versions: Vec<(u64, object_store::path::Path)> = store
        .list(Some(&prefix))
        .try_filter_map(|m| async move {
            Ok(paths::catalog_version(&m.location).map(|v| (v, m.location)))
        })
        .try_collect()
        .await?;
    versions.sort();
    let Some((version, path)) = versions.pop() else {
        return Ok(Catalog::default());
    };
    let bytes = store.get(&path).await?.bytes().await?;
    let catalog: Catalog = serde_json::from_slice(&bytes)
        .map_err(|e| StorageError::Corrupt(format!("catalog version {version}: {e}")))?;
    if catalog.version != version {
        return Err(StorageError::Corrupt(format!(
            "catalog file {path} says version {}",
            catalog.version
        )));
    }
    Ok(catalog)
}

/// Number of older snapshots kept behind the newest, for readers still on them.
const KEEP_OLD_VERSIONS: u64 = 4;

/// Writes `catalog` as its version; fails if that version already exists with other
/// contents. Committing the very same snapshot again succeeds, so a commit whose
/// answer was lost can be retried.
pub async fn commit(store: &Arc<dyn ObjectStore>, catalog: &Catalog) -> Result<()> {
    let json = serde_json::to_vec(catalog)
        .map_err(|e| StorageError::Internal(format!("catalog does not serialize: {e}")))?;
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let path = paths::catalog_snapshot(catalog.version);
    match store
        .put_opts(&path, PutPayload::from(json.clone()), opts)
        .await
    {
        Ok(_) => {}
        Err(e @ object_store::Error::AlreadyExists { .. }) => {
            let existing = store.get(&path).await?.bytes().await?;
            if existing.as_ref() != json.as_slice() {
                return Err(e.into());
            }
        }
        Err(e) => return Err(e.into()),
    }
    if catalog.version > KEEP_OLD_VERSIONS {
        let old = paths::catalog_snapshot(catalog.version - KEEP_OLD_VERSIONS - 1);
        match store.delete(&old).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "could not delete an old catalog snapshot"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn snapshots_are_versioned_and_never_overwritten() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        assert_eq!(load_latest(&store).await.unwrap().version, 0);
        let mut c = Catalog {
            version: 1,
            ..Default::default()
        };
        let (_, t) = c.table_mut("city", "manhole");
        let meta = SegmentMeta {
            id: 7,
            day: 1,
            path: "p".into(),
            index_path: "i".into(),
            size: 1,
            rows: 1,
            min_time: 0,
            max_time: 0,
            row_group_rows: vec![1],
        };
        t.add_segment(
            meta,
            &[("device".to_string(), vec!["mh-1".to_string()])].into(),
        );
        commit(&store, &c).await.unwrap();
        commit(&store, &c)
            .await
            .expect("the same snapshot again is a no-op");
        let mut other = c.clone();
        other.next_segment_id = 99;
        assert!(
            commit(&store, &other).await.is_err(),
            "create-only: another snapshot of the same version fails"
        );
        let back = load_latest(&store).await.unwrap();
        let t = &back.databases["city"].tables["manhole"];
        assert!(t.tag_segments["device"]["mh-1"].0.contains(7));
        let mut t = t.clone();
        t.remove_segment(7);
        assert!(t.tag_segments["device"].is_empty());
    }
}
