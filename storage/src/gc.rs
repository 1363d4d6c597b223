//! Garbage collection: what no catalog version refers to leaves the store.
//!
//! 1. Collecting: a record that removes an object (a compaction's inputs, folded
//!    series files) lists it as garbage in the catalog, so the list survives a
//!    restart. Once no reader holds a version older than that record, the object
//!    is deleted and a `Collected` record takes it off the list.
//! 2. Folding the log: records folded into a checkpoint are deleted once a newer
//!    checkpoint exists too (the newest two are kept), and so are older
//!    checkpoints.
//! 3. Sweeping: an object that no version refers to and that is not on the list —
//!    left by a flush or compaction that died between writing it and committing —
//!    is deleted once it is older than the grace period. The sweep lists the whole
//!    store, so it runs rarely: shortly after opening and then hourly. It holds
//!    off flushes and compactions while it decides, so it never takes what they
//!    are about to commit for a leftover.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;

use crate::catalog::Op;
use crate::engine::{Engine, Locked};
use crate::error::{Result, StorageError};
use crate::paths;

/// How often garbage is collected.
const COLLECT_EVERY: Duration = Duration::from_secs(10);
/// How soon after opening the store is first swept.
const FIRST_SWEEP: Duration = Duration::from_secs(5);
/// How often the store is swept after that.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// What a pass of the collector did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Garbage objects deleted.
    pub collected: usize,
    /// Folded catalog records and old checkpoints deleted.
    pub folded: usize,
    /// Leftover objects swept.
    pub swept: usize,
}

impl Engine {
    /// Deletes the garbage no reader can reach any more, and the catalog records
    /// and checkpoints that newer checkpoints made unneeded.
    pub async fn collect_garbage(&self) -> Result<GcStats> {
        let catalog = self.catalog();
        let oldest_reader = self
            .inner
            .readers
            .locked()
            .keys()
            .next()
            .copied()
            .unwrap_or(catalog.seq)
            .min(catalog.seq);
        // A reader on version `r` sees every object removed by a later record.
        let due: Vec<String> = catalog
            .garbage
            .iter()
            .filter(|g| g.since <= oldest_reader)
            .map(|g| g.path.clone())
            .collect();
        let mut stats = GcStats::default();
        let mut deleted = Vec::with_capacity(due.len());
        for path in due {
            match self.store().delete(&ObjectPath::from(path.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted.push(path),
                Err(e) => {
                    tracing::warn!(%path, error = %e, "cannot delete garbage; will try again")
                }
            }
        }
        if !deleted.is_empty() {
            stats.collected = deleted.len();
            self.commit(|_, _| {
                Ok(vec![Op::Collected {
                    paths: deleted.clone(),
                }])
            })
            .await?;
        }
        stats.folded = self.delete_folded().await?;
        Ok(stats)
    }

    /// Deletes checkpoints older than the second newest, and the records it holds.
    async fn delete_folded(&self) -> Result<usize> {
        let log = self.inner.commits.log();
        let checkpoints = log.checkpoints().await?;
        let [.., keep, _] = checkpoints.as_slice() else {
            return Ok(0);
        };
        let mut paths: Vec<ObjectPath> = checkpoints
            .iter()
            .filter(|&&c| c < *keep)
            .map(|&c| paths::catalog_checkpoint(c))
            .collect();
        let from = self.inner.commits.folded_from();
        paths.extend((from..=*keep).map(paths::catalog_record));
        let mut n = 0;
        for p in &paths {
            match self.store().delete(p).await {
                Ok(()) => n += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.inner.commits.set_folded_from(keep + 1);
        Ok(n)
    }

    /// Deletes every object older than `grace` that no catalog version refers to
    /// and that is not already on the garbage list. Returns how many.
    pub async fn sweep(&self, grace: Duration) -> Result<usize> {
        let _alone = self.inner.upkeep.write().await;
        let catalog = self.catalog();
        let mut live: HashSet<&str> = catalog.live_objects().collect();
        live.extend(catalog.garbage.iter().map(|g| g.path.as_str()));
        let checkpoints = self.inner.commits.log().checkpoints().await?;
        // The newest two checkpoints and every record after the older one stay.
        let keep_from = checkpoints.iter().rev().nth(1).copied().unwrap_or(0);
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut swept = 0;
        for prefix in ["segments", "series", "catalog"] {
            let objects: Vec<object_store::ObjectMeta> = self
                .store()
                .list(Some(&ObjectPath::from(prefix)))
                .try_collect()
                .await?;
            for meta in objects {
                let key = meta.location.as_ref();
                let kept = live.contains(key)
                    || paths::catalog_record_seq(&meta.location).is_some_and(|s| s > keep_from)
                    || paths::catalog_checkpoint_seq(&meta.location)
                        .is_some_and(|s| s >= keep_from)
                    || SystemTime::from(meta.last_modified) > cutoff;
                if kept {
                    continue;
                }
                match self.store().delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => swept += 1,
                    Err(e) => {
                        tracing::warn!(path = %key, error = %e, "cannot sweep a leftover object")
                    }
                }
            }
        }
        if let Some(root) = &self.inner.config.local_store {
            swept += sweep_staged(root, cutoff)?;
        }
        if swept > 0 {
            tracing::info!(swept, "swept objects no catalog version refers to");
        }
        Ok(swept)
    }

    pub(crate) fn spawn_collector(&self) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut next_sweep = tokio::time::Instant::now() + FIRST_SWEEP;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(COLLECT_EVERY) => {}
                    _ = engine.stopped() => return,
                }
                if engine.is_stopping() {
                    return;
                }
                match engine.collect_garbage().await {
                    Ok(_) | Err(StorageError::ShuttingDown) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "garbage collection failed; will try again")
                    }
                }
                if tokio::time::Instant::now() >= next_sweep {
                    next_sweep = tokio::time::Instant::now() + SWEEP_EVERY;
                    if let Err(e) = engine.sweep(engine.inner.config.sweep_grace).await {
                        tracing::warn!(error = %e, "sweeping the store failed; will try again");
                    }
                }
            }
        });
    }
}

/// Deletes the staging files (`name#<digits>`) a local store's interrupted
/// uploads left under `root`, older than `cutoff`; the store itself never lists them.
fn sweep_staged(root: &Path, cutoff: SystemTime) -> Result<usize> {
    let mut swept = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let name = entry.file_name();
            let staged = name
                .to_str()
                .and_then(|n| n.rsplit_once('#'))
                .is_some_and(|(_, s)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
            let old = entry.metadata()?.modified().is_ok_and(|t| t <= cutoff);
            if staged && old {
                std::fs::remove_file(entry.path())?;
                swept += 1;
            }
        }
    }
    Ok(swept)
}
