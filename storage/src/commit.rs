//! Committing to the catalog log: one record at a time, fenced, checkpointed.
//!
//! 1. [`Commits::claim`], when the engine opens, appends a `Claim` record with an
//!    epoch one past the newest: from then on this engine is the store's writer,
//!    and any older writer is fenced.
//! 2. [`Engine::commit`] builds a record's ops against the newest version, checks
//!    they still fit (a compaction's inputs are still there), applies them, and
//!    creates the record. If another writer took the number, it reads what won:
//!    if that writer fenced this one, the commit fails with
//!    [`StorageError::Fenced`]; otherwise it builds the ops again on top and tries
//!    the next number. Commits of one engine (flushes, compactions, collections)
//!    take turns.
//! 3. Once the records since the last checkpoint weigh a quarter as much as it (and at
//!    least [`CHECKPOINT_MIN_BYTES`]), a new checkpoint folds them, so opening
//!    reads a bounded amount whatever the store's age.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::catalog::{Catalog, CatalogLog, Checkpoint, Op, Record, WriterId};
use crate::engine::{write, Engine, Locked};
use crate::error::{Result, StorageError};
use crate::units::now_nanos;

/// Records since the last checkpoint may weigh this much before a new one is due,
/// however small the checkpoint.
pub const CHECKPOINT_MIN_BYTES: u64 = 64 << 10;

/// A checkpoint is due once the records since the last one weigh this share of
/// it (as JSON): opening then reads at most that much besides the checkpoint, and
/// checkpoints cost a bounded multiple of the records' own bytes.
const CHECKPOINT_SHARE: u64 = 4;

/// The log and this engine's place in it.
pub(crate) struct Commits {
    log: CatalogLog,
    node: String,
    writer: Mutex<Option<WriterId>>,
    turn: tokio::sync::Mutex<Since>,
    /// The oldest record the collector has not deleted yet (as far as it knows).
    folded_from: AtomicU64,
}

/// What was committed since the newest checkpoint.
#[derive(Debug, Clone, Copy)]
struct Since {
    checkpoint: Checkpoint,
    bytes: u64,
}

impl Commits {
    /// Commits to `log` as `node`, the newest checkpoint being `checkpoint` with
    /// `bytes` of records after it.
    pub(crate) fn new(log: CatalogLog, node: String, checkpoint: Checkpoint, bytes: u64) -> Self {
        Self {
            log,
            node,
            writer: Mutex::new(None),
            turn: tokio::sync::Mutex::new(Since { checkpoint, bytes }),
            // Records up to the checkpoint read at opening may linger from an
            // earlier process; the sweep takes those.
            folded_from: AtomicU64::new(checkpoint.seq + 1),
        }
    }

    /// The oldest record not known to be deleted.
    pub(crate) fn folded_from(&self) -> u64 {
        self.folded_from.load(Ordering::SeqCst)
    }

    /// Records before `seq` are deleted.
    pub(crate) fn set_folded_from(&self, seq: u64) {
        self.folded_from.fetch_max(seq, Ordering::SeqCst);
    }

    /// The log.
    pub(crate) fn log(&self) -> &CatalogLog {
        &self.log
    }

    /// Who this engine writes as (before its claim: epoch 0).
    pub(crate) fn writer(&self) -> WriterId {
        self.writer.locked().clone().unwrap_or(WriterId {
            node: self.node.clone(),
            epoch: 0,
        })
    }

    /// Claims the store: appends a `Claim` with the next epoch after `state` (and
    /// after whatever another writer committed meanwhile). Returns the state with it.
    pub(crate) async fn claim(&self, mut state: Catalog) -> Result<Catalog> {
        let mut since = self.turn.lock().await;
        loop {
            let epoch = state.writer.as_ref().map_or(0, |w| w.epoch) + 1;
            let writer = WriterId {
                node: self.node.clone(),
                epoch,
            };
            let record = Record {
                seq: state.seq + 1,
                writer: writer.clone(),
                time: now_nanos(),
                ops: vec![Op::Claim {
                    writer: writer.clone(),
                }],
            };
            match self.log.append(&record).await? {
                Some(bytes) => {
                    since.bytes += bytes;
                    *self.writer.locked() = Some(writer);
                    return state.apply(&record);
                }
                None => state = self.log.catch_up(state).await?.0,
            }
        }
    }
}

fn fenced(state: &Catalog, me: &WriterId) -> StorageError {
    match &state.writer {
        Some(w) => StorageError::Fenced(format!(
            "node {} claimed the store with epoch {} after this node (epoch {}); this process can no longer commit, restart it to take the store back",
            w.node, w.epoch, me.epoch
        )),
        None => StorageError::Fenced("the store has no writer claim".into()),
    }
}

impl Engine {
    /// Commits one record, its ops built by `make` from the newest version and the
    /// record's number (it may be called again, on a newer version, if another
    /// writer took the number). Returns the new version, which readers see from
    /// now on.
    pub(crate) async fn commit(
        &self,
        mut make: impl FnMut(&Catalog, u64) -> Result<Vec<Op>>,
    ) -> Result<Arc<Catalog>> {
        let commits = &self.inner.commits;
        let mut since = commits.turn.lock().await;
        let me = commits.writer();
        loop {
            let base = self.catalog();
            if base.writer.as_ref() != Some(&me) {
                return Err(fenced(&base, &me));
            }
            let seq = base.seq + 1;
            let ops = make(&base, seq)?;
            if !base.admits(&ops) {
                return Err(StorageError::Conflict(
                    "the segments it replaces are no longer in the catalog".into(),
                ));
            }
            let record = Record {
                seq,
                writer: me.clone(),
                time: now_nanos(),
                ops,
            };
            let next = Arc::new(base.apply(&record)?);
            let written = match commits.log.append(&record).await {
                Ok(w) => w,
                // The record may have landed before the failure: look.
                Err(e) => match commits.log.read(seq).await {
                    Ok(Some((found, bytes))) if found == record => Some(bytes),
                    Ok(Some(_)) => None,
                    Ok(None) | Err(_) => return Err(e),
                },
            };
            match written {
                Some(bytes) => {
                    self.install(next.clone());
                    since.bytes += bytes;
                    self.maybe_checkpoint(&mut since, &next).await;
                    return Ok(next);
                }
                None => {
                    let (caught, _) = commits.log.catch_up((*base).clone()).await?;
                    self.install(Arc::new(caught));
                }
            }
        }
    }

    /// Makes `catalog` the version readers see, unless a newer one already is.
    fn install(&self, catalog: Arc<Catalog>) {
        let mut s = write(&self.inner.state);
        if catalog.seq > s.catalog.seq {
            s.catalog = catalog;
        }
    }

    /// Writes a checkpoint of the newest version if records came after the last
    /// one (as a clean shutdown does, so the next start reads no records).
    pub(crate) async fn checkpoint_now(&self) {
        let mut since = self.inner.commits.turn.lock().await;
        let catalog = self.catalog();
        if since.bytes > 0 && catalog.seq > since.checkpoint.seq {
            self.write_checkpoint(&mut since, &catalog).await;
        }
    }

    async fn maybe_checkpoint(&self, since: &mut Since, catalog: &Arc<Catalog>) {
        if since.bytes < CHECKPOINT_MIN_BYTES.max(since.checkpoint.bytes / CHECKPOINT_SHARE) {
            return;
        }
        self.write_checkpoint(since, catalog).await;
    }

    async fn write_checkpoint(&self, since: &mut Since, catalog: &Arc<Catalog>) {
        match self
            .inner
            .commits
            .log
            .write_checkpoint(catalog.clone())
            .await
        {
            Ok(bytes) => {
                tracing::debug!(seq = catalog.seq, bytes, "catalog checkpoint written");
                since.checkpoint = Checkpoint {
                    seq: catalog.seq,
                    bytes,
                };
                since.bytes = 0;
            }
            // The records stay readable; the next commit tries again.
            Err(e) => tracing::warn!(error = %e, "cannot write a catalog checkpoint"),
        }
    }
}
