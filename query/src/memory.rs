//! Query memory: each query has a pool of its own (`--query-memory-limit`) that
//! also draws on one pool all queries share (`--query-memory-total`), so many
//! queries at once cannot hold more than the server allows.

use std::fmt;
use std::sync::Arc;

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryLimit, MemoryPool, MemoryReservation,
};

/// Words that mark a refusal by the shared pool: the query is not at fault, the
/// server is busy ([`crate::QueryError::Unavailable`]).
pub const SHARED_POOL_FULL: &str = "the memory all running queries may hold together";

/// One query's pool: a reservation grows only when both the query's own limit
/// and the shared pool have room.
#[derive(Debug)]
pub struct SharedPool {
    own: GreedyMemoryPool,
    shared: Arc<GreedyMemoryPool>,
}

impl SharedPool {
    /// A query's pool of `limit` bytes drawing on `shared`.
    pub fn new(limit: usize, shared: Arc<GreedyMemoryPool>) -> Self {
        Self {
            own: GreedyMemoryPool::new(limit),
            shared,
        }
    }
}

impl fmt::Display for SharedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query pool ({}) within shared pool ({})",
            self.own, self.shared
        )
    }
}

impl MemoryPool for SharedPool {
    fn name(&self) -> &str {
        "query-within-shared"
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.shared.grow(reservation, additional);
        self.own.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.own.shrink(reservation, shrink);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        // The query's own limit first: a query past it is refused as itself too big.
        self.own.try_grow(reservation, additional)?;
        if self.shared.try_grow(reservation, additional).is_err() {
            self.own.shrink(reservation, additional);
            let limit = match self.shared.memory_limit() {
                MemoryLimit::Finite(n) => n,
                _ => 0,
            };
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{SHARED_POOL_FULL} ({limit} bytes, --query-memory-total) is in use; try again shortly"
            )));
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.own.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.own.memory_limit()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::MemoryConsumer;

    use super::*;

    #[test]
    fn a_query_grows_only_within_its_limit_and_the_shared_pool() {
        let shared = Arc::new(GreedyMemoryPool::new(100));
        let a: Arc<dyn MemoryPool> = Arc::new(SharedPool::new(80, shared.clone()));
        let b: Arc<dyn MemoryPool> = Arc::new(SharedPool::new(80, shared.clone()));
        let ra = MemoryConsumer::new("a").register(&a);
        let rb = MemoryConsumer::new("b").register(&b);
        ra.try_grow(60).unwrap();
        // Its own limit: refused as the query's.
        let own = ra.try_grow(30).unwrap_err().to_string();
        assert!(!own.contains(SHARED_POOL_FULL), "{own}");
        // The shared pool: 60 of 100 held by the other query.
        let busy = rb.try_grow(50).unwrap_err().to_string();
        assert!(busy.contains(SHARED_POOL_FULL), "{busy}");
        assert_eq!((a.reserved(), b.reserved(), shared.reserved()), (60, 0, 60));
        rb.try_grow(40).unwrap();
        assert_eq!(shared.reserved(), 100);
        ra.free();
        rb.free();
        assert_eq!(shared.reserved(), 0);
    }
}
