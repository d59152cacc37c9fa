//! The content cache both agents keep in step, so the source can send DUP for a page whose
//! content the target already holds.
//!
//! It is a bounded LRU keyed by BLAKE3. Both sides apply the same operations in the same
//! order — insert for every PAGE and MAPPED frame, touch for every DUP — so with the same
//! capacity they evict the same entries, and the source knows exactly which contents the
//! target still has without ever asking. The target stores the content (or a handle to content
//! still being fetched); the source stores nothing.
use std::collections::{BTreeMap, HashMap};

use super::link::Hash;

/// Default capacity in pages (64 MiB of content on the target).
pub const DEFAULT_CAPACITY: usize = 16_384;

/// A deterministic LRU from hash to `V`.
pub struct ContentCache<V> {
    capacity: usize,
    stamp: u64,
    entries: HashMap<Hash, (u64, V)>,
    order: BTreeMap<u64, Hash>,
}

impl<V> ContentCache<V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            stamp: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Inserts (or refreshes) `hash` as the most recent entry; evicts the least recent one when
    /// over capacity.
    pub fn insert(&mut self, hash: Hash, value: V) {
        if self.capacity == 0 {
            return;
        }
        self.stamp += 1;
        if let Some((old, _)) = self.entries.insert(hash, (self.stamp, value)) {
            self.order.remove(&old);
        }
        self.order.insert(self.stamp, hash);
        while self.entries.len() > self.capacity {
            let Some((_, evicted)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&evicted);
        }
    }

    /// Marks `hash` most recent and returns its value, if present.
    pub fn touch(&mut self, hash: &Hash) -> Option<&V> {
        self.stamp += 1;
        let stamp = self.stamp;
        let (old, _) = self.entries.get_mut(hash).map(|e| {
            let old = e.0;
            e.0 = stamp;
            (old, ())
        })?;
        self.order.remove(&old);
        self.order.insert(stamp, *hash);
        self.entries.get(hash).map(|(_, v)| v)
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.entries.contains_key(hash)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_evict_the_same_entries() {
        let mut source: ContentCache<()> = ContentCache::new(2);
        let mut target: ContentCache<u8> = ContentCache::new(2);
        let ops: [(u8, bool); 6] = [
            (1, false),
            (2, false),
            (1, true),
            (3, false),
            (2, false),
            (4, false),
        ];
        for (h, touch) in ops {
            let hash = [h; 32];
            if touch {
                assert!(source.touch(&hash).is_some());
                assert_eq!(target.touch(&hash), Some(&h));
            } else {
                source.insert(hash, ());
                target.insert(hash, h);
            }
            for probe in 1..=4u8 {
                assert_eq!(source.contains(&[probe; 32]), target.contains(&[probe; 32]));
            }
        }
        // 1 was touched after 2, so 3 evicted 2; re-inserting 2 evicted 1; 4 evicted 3.
        assert!(!target.contains(&[1; 32]) && !target.contains(&[3; 32]));
        assert!(target.contains(&[2; 32]) && target.contains(&[4; 32]));
        assert_eq!(target.len(), 2);
    }
}
