//! Latest reading per device from memory: `SELECT DISTINCT ON (device) ... ORDER BY
//! device, time DESC` reads the series registry (`citytsdb_storage::series`) instead
//! of the table.
//!
//! [`LatestFromCache`], an analyzer rule, finds a `DISTINCT ON` whose every
//! expression is a tag column and whose ordering continues with `time DESC`, over
//! one of our tables through filters that only name tags or put a lower bound on
//! `time`. Each series' latest row is then the only candidate its series can
//! contribute, so the table scan under the `DISTINCT ON` is swapped for a
//! [`LatestTable`] scan of one row per series; the `DISTINCT ON`, the filters and
//! everything above stay as they are and give the same answer.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use citytsdb_storage::schema::TIME_COLUMN;
use citytsdb_storage::{ColumnKind, Engine, TableSchema};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::Result;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    BinaryExpr, Distinct, DistinctOn, Expr, LogicalPlan, Operator, TableProviderFilterPushDown,
    TableScan, TableScanBuilder, TableType,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::physical_plan::ExecutionPlan;

use crate::exec::{external, CityScanExec, ScanReport};

/// The analyzer rule that answers latest-per-series queries from memory.
pub struct LatestFromCache {
    storage: Engine,
    db: String,
    /// The database's tables and their schemas, as the query's snapshot has them.
    tables: Vec<(String, Arc<TableSchema>)>,
    /// Catalog and schema names a reference to one of our tables may carry.
    catalog: String,
}

impl fmt::Debug for LatestFromCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatestFromCache")
            .field("db", &self.db)
            .finish()
    }
}

impl LatestFromCache {
    /// The rule for one query over `db`, whose tables live in catalog `catalog`'s
    /// `public` schema.
    pub fn new(
        storage: Engine,
        db: &str,
        tables: Vec<(String, Arc<TableSchema>)>,
        catalog: &str,
    ) -> Self {
        Self {
            storage,
            db: db.to_string(),
            tables,
            catalog: catalog.to_string(),
        }
    }

    fn table_of(&self, scan: &TableScan) -> Option<&(String, Arc<TableSchema>)> {
        let r = &scan.table_name;
        if r.schema().is_some_and(|s| s != "public")
            || r.catalog().is_some_and(|c| c != self.catalog)
        {
            return None;
        }
        self.tables.iter().find(|(name, _)| name == r.table())
    }

    /// The table the `DISTINCT ON` can read from the registry, if it can.
    fn cacheable(&self, on: &DistinctOn) -> Option<String> {
        let sort = on.sort_expr.as_ref()?;
        let k = on.on_expr.len();
        let next = sort.get(k)?;
        if next.asc || !matches!(&next.expr, Expr::Column(c) if c.name == TIME_COLUMN) {
            return None;
        }
        let mut plan = on.input.as_ref();
        let mut conjuncts: Vec<&Expr> = Vec::new();
        let (table, schema) = loop {
            match plan {
                LogicalPlan::Filter(f) => {
                    conjuncts.extend(split_conjunction(&f.predicate));
                    plan = f.input.as_ref();
                }
                LogicalPlan::SubqueryAlias(a) => plan = a.input.as_ref(),
                LogicalPlan::TableScan(scan) => {
                    if !scan.filters.is_empty() || scan.fetch.is_some() {
                        return None;
                    }
                    break self.table_of(scan)?;
                }
                _ => return None,
            }
        };
        let is_tag = |e: &Expr| matches!(e, Expr::Column(c) if schema.kind(&c.name) == Some(ColumnKind::Tag));
        if !on.on_expr.iter().all(is_tag) || !sort[..k].iter().all(|s| is_tag(&s.expr)) {
            return None;
        }
        let tags_only = |e: &Expr| {
            e.column_refs()
                .iter()
                .all(|c| schema.kind(&c.name) == Some(ColumnKind::Tag))
        };
        if conjuncts
            .iter()
            .all(|c| !c.is_volatile() && (tags_only(c) || time_lower_bound(c)))
        {
            Some(table.clone())
        } else {
            None
        }
    }

    fn swap_scan(&self, plan: LogicalPlan, table: &str) -> Result<Transformed<LogicalPlan>> {
        plan.transform_up(|node| match node {
            LogicalPlan::TableScan(scan) if scan.table_name.table() == table => {
                let Some((_, schema)) = self.table_of(&scan) else {
                    return Ok(Transformed::no(LogicalPlan::TableScan(scan)));
                };
                let provider = LatestTable {
                    storage: self.storage.clone(),
                    db: self.db.clone(),
                    table: table.to_string(),
                    arrow: schema.arrow_schema(),
                };
                let scan =
                    TableScanBuilder::new(scan.table_name, provider_as_source(Arc::new(provider)))
                        .with_projection(scan.projection)
                        .with_filters(scan.filters)
                        .with_fetch(scan.fetch)
                        .build()?;
                Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
            }
            other => Ok(Transformed::no(other)),
        })
    }
}

/// `time > x` or `time >= x` (either way round) with `x` free of columns: a series
/// has a matching row exactly when its latest row matches.
fn time_lower_bound(e: &Expr) -> bool {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else {
        return false;
    };
    let is_time = |e: &Expr| matches!(e, Expr::Column(c) if c.name == TIME_COLUMN);
    let constant = |e: &Expr| e.column_refs().is_empty();
    match op {
        Operator::Gt | Operator::GtEq => is_time(left) && constant(right),
        Operator::Lt | Operator::LtEq => constant(left) && is_time(right),
        _ => false,
    }
}

impl AnalyzerRule for LatestFromCache {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_down(|node| {
            let table = match &node {
                LogicalPlan::Distinct(Distinct::On(on)) => self.cacheable(on),
                _ => None,
            };
            let Some(table) = table else {
                return Ok(Transformed::no(node));
            };
            let swapped = node.map_children(|child| self.swap_scan(child, &table))?;
            Ok(Transformed::new(
                swapped.data,
                true,
                TreeNodeRecursion::Jump,
            ))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "citytsdb_latest_from_cache"
    }
}

/// One row per series: its latest reading, from the series registry.
pub struct LatestTable {
    storage: Engine,
    db: String,
    table: String,
    arrow: SchemaRef,
}

impl fmt::Debug for LatestTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatestTable")
            .field("table", &self.table)
            .finish()
    }
}

#[async_trait]
impl TableProvider for LatestTable {
    fn schema(&self) -> SchemaRef {
        self.arrow.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // The filters stay above the scan.
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let rows = match self.storage.series_rows(&self.db, &self.table) {
            Some(r) => r.map_err(external)?,
            None => citytsdb_storage::series::SeriesTable::default()
                .rows(
                    &TableSchema::from_arrow(&self.arrow)
                        .map_err(|e| external(citytsdb_storage::StorageError::Internal(e)))?,
                )
                .map_err(external)?,
        };
        // The registry may know columns added after the query's snapshot: keep the
        // snapshot's.
        let names: BTreeSet<&str> = self
            .arrow
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        let keep: Vec<usize> = rows
            .latest
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| names.contains(f.name().as_str()))
            .map(|(i, _)| i)
            .collect();
        let batch = rows.latest.project(&keep)?;
        let report = ScanReport {
            table: self.table.clone(),
            cached_series: Some(batch.num_rows()),
            ..Default::default()
        };
        let source = MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.arrow.clone(),
            projection.cloned(),
        )?;
        Ok(Arc::new(CityScanExec::new(report, source)))
    }
}
