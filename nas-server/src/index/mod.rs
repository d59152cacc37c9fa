//! The BLAKE3 block index: which 4 KiB block of which export holds a given content.
//!
//! Two views kept in step under one lock: per export, the hash of each block (`None` for
//! all-zero blocks, which are never indexed, and for a short tail block); and, per hash, the
//! blocks that hold it. Lookups are scoped: the caller names the exports it may search, so one
//! VM can never learn about another tenant's blocks. [`build`] hashes an image in parallel;
//! [`crate::export::hashing`] keeps the index exact under writes; [`store`] persists it (redb)
//! with [`journal`] naming the regions a crash may have left unhashed; [`hot`] is the hot set
//! agents replicate.
use std::{
    collections::HashMap,
    sync::{PoisonError, RwLock},
};

pub mod build;
pub mod hot;
pub mod journal;
pub mod store;

/// Block size, digest type and hashing: the index is defined over them.
pub use blockhash::{hash_block, is_zero, Hash, BLOCK};

/// Identifies an export inside the index.
pub type ExportId = u32;

/// Where a content lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub export: ExportId,
    /// Block number (byte offset / 4096).
    pub block: u64,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<ExportId, Vec<Option<Hash>>>,
    by_hash: HashMap<Hash, Vec<Location>>,
}

impl Inner {
    fn unlink(&mut self, hash: &Hash, loc: Location) {
        if let Some(locs) = self.by_hash.get_mut(hash) {
            locs.retain(|l| *l != loc);
            if locs.is_empty() {
                self.by_hash.remove(hash);
            }
        }
    }
}

/// The index of every export on this server.
#[derive(Default)]
pub struct BlockIndex {
    // A std RwLock, not a tokio one: it is only taken from the blocking pool and never held
    // across an await or any I/O.
    inner: RwLock<Inner>,
}

impl BlockIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a freshly built table for `export`, replacing any previous one.
    pub fn install(&self, export: ExportId, hashes: Vec<Option<Hash>>) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = inner.blocks.remove(&export) {
            for (block, hash) in old.iter().enumerate() {
                if let Some(h) = hash {
                    inner.unlink(
                        h,
                        Location {
                            export,
                            block: block as u64,
                        },
                    );
                }
            }
        }
        for (block, hash) in hashes.iter().enumerate() {
            if let Some(h) = hash {
                inner.by_hash.entry(*h).or_default().push(Location {
                    export,
                    block: block as u64,
                });
            }
        }
        inner.blocks.insert(export, hashes);
    }

    /// Records new contents for blocks of `export`: `(block, hash)` pairs.
    pub fn update(&self, export: ExportId, changes: &[(u64, Option<Hash>)]) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        for &(block, hash) in changes {
            let loc = Location { export, block };
            let old = inner
                .blocks
                .get_mut(&export)
                .and_then(|t| t.get_mut(block as usize))
                .map(|slot| std::mem::replace(slot, hash));
            let Some(old) = old else { continue };
            if old == hash {
                continue;
            }
            if let Some(h) = old {
                inner.unlink(&h, loc);
            }
            if let Some(h) = hash {
                inner.by_hash.entry(h).or_default().push(loc);
            }
        }
        metrics::gauge!("nas_index_distinct_blocks").set(inner.by_hash.len() as f64);
    }

    /// The first block holding `hash` within `scope`, lowest export id and block first.
    pub fn lookup(&self, hash: &Hash, scope: &[ExportId]) -> Option<Location> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner
            .by_hash
            .get(hash)?
            .iter()
            .filter(|l| scope.contains(&l.export))
            .min()
            .copied()
    }

    /// The hash recorded for one block.
    pub fn block_hash(&self, export: ExportId, block: u64) -> Option<Hash> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner
            .blocks
            .get(&export)?
            .get(block as usize)
            .copied()
            .flatten()
    }

    /// Hashes of blocks `[first, first + count)`, clamped to the export.
    pub fn block_hashes(&self, export: ExportId, first: u64, count: u64) -> Vec<Option<Hash>> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let Some(table) = inner.blocks.get(&export) else {
            return Vec::new();
        };
        let start = (first as usize).min(table.len());
        let end = (first.saturating_add(count) as usize).min(table.len());
        table[start..end].to_vec()
    }

    /// A copy of an export's table, for checks and persistence.
    pub fn table(&self, export: ExportId) -> Option<Vec<Option<Hash>>> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner.blocks.get(&export).cloned()
    }

    /// Number of distinct indexed contents.
    pub fn distinct(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_hash
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> Hash {
        hash_block(&[b; BLOCK as usize]).unwrap()
    }

    #[test]
    fn zero_blocks_are_not_indexed() {
        assert_eq!(hash_block(&[0; 4096]), None);
        assert!(hash_block(&[1; 4096]).is_some());
    }

    #[test]
    fn lookups_are_scoped_and_follow_updates() {
        let idx = BlockIndex::new();
        idx.install(1, vec![Some(h(1)), None, Some(h(2))]);
        idx.install(2, vec![Some(h(2)), Some(h(3))]);
        assert_eq!(
            idx.lookup(&h(2), &[1, 2]),
            Some(Location {
                export: 1,
                block: 2
            })
        );
        assert_eq!(
            idx.lookup(&h(2), &[2]),
            Some(Location {
                export: 2,
                block: 0
            })
        );
        assert_eq!(idx.lookup(&h(3), &[1]), None, "export 2 is out of scope");
        idx.update(1, &[(2, Some(h(4))), (1, Some(h(1)))]);
        assert_eq!(idx.lookup(&h(2), &[1]), None, "old content must be gone");
        assert_eq!(
            idx.lookup(&h(4), &[1]),
            Some(Location {
                export: 1,
                block: 2
            })
        );
        assert_eq!(
            idx.lookup(&h(1), &[1]),
            Some(Location {
                export: 1,
                block: 0
            })
        );
        idx.update(1, &[(0, None)]);
        assert_eq!(
            idx.lookup(&h(1), &[1]),
            Some(Location {
                export: 1,
                block: 1
            })
        );
        assert_eq!(idx.block_hash(1, 0), None);
        // Out-of-range blocks are ignored rather than growing the table.
        idx.update(1, &[(99, Some(h(9)))]);
        assert_eq!(idx.lookup(&h(9), &[1]), None);
        assert_eq!(idx.distinct(), 4);
    }
}
