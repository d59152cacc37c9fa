//! The content cache both agents keep in step, so the source can send DUP for a page whose
//! content the target already holds.
//!
//! It is a bounded LRU. Both sides apply the same operations in the same order — insert for
//! every PAGE and MAPPED frame, touch for every DUP — so with the same capacity they evict the
//! same entries, and the source knows exactly which contents the target still has without
//! ever asking. Content frames are numbered in link order (their *ordinal*); a DUP names the
//! ordinal of the frame that first carried the content. The source keys its cache by BLAKE3
//! (value: that ordinal); the target keys its cache by ordinal (value: the content, or a handle
//! to content still being fetched), so it never hashes a page only to find it again.
//!
//! Entries live in a slab threaded on a doubly linked recency list: insert, touch and evict
//! are O(1) with no allocation once the slab is full.
use std::{collections::HashMap, hash::Hash as StdHash};

/// Default capacity in pages (64 MiB of content on the target).
pub const DEFAULT_CAPACITY: usize = 16_384;

const NIL: u32 = u32::MAX;

struct Entry<K, V> {
    key: K,
    value: V,
    prev: u32,
    next: u32,
}

/// A deterministic LRU from `K` to `V`.
pub struct ContentCache<K, V> {
    capacity: usize,
    index: HashMap<K, u32, foldhash::fast::RandomState>,
    slab: Vec<Entry<K, V>>,
    /// Most and least recently used entries.
    head: u32,
    tail: u32,
}

impl<K: StdHash + Eq + Copy, V> ContentCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(NIL as usize - 1);
        Self {
            capacity,
            index: HashMap::with_capacity_and_hasher(capacity, Default::default()),
            slab: Vec::with_capacity(capacity),
            head: NIL,
            tail: NIL,
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = (self.slab[i as usize].prev, self.slab[i as usize].next);
        match prev {
            NIL => self.head = next,
            p => self.slab[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slab[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        self.slab[i as usize].prev = NIL;
        self.slab[i as usize].next = self.head;
        match self.head {
            NIL => self.tail = i,
            h => self.slab[h as usize].prev = i,
        }
        self.head = i;
    }

    /// Inserts (or refreshes) `key` as the most recent entry; evicts the least recent one when
    /// full.
    pub fn insert(&mut self, key: K, value: V) {
        if self.capacity == 0 {
            return;
        }
        if let Some(&i) = self.index.get(&key) {
            self.slab[i as usize].value = value;
            self.unlink(i);
            self.push_front(i);
            return;
        }
        let i = if self.slab.len() < self.capacity {
            self.slab.push(Entry {
                key,
                value,
                prev: NIL,
                next: NIL,
            });
            (self.slab.len() - 1) as u32
        } else {
            // Reuse the least recent entry's slot.
            let i = self.tail;
            self.unlink(i);
            let e = &mut self.slab[i as usize];
            self.index.remove(&e.key);
            e.key = key;
            e.value = value;
            i
        };
        self.index.insert(key, i);
        self.push_front(i);
    }

    /// Marks `key` most recent and returns its value, if present.
    pub fn touch(&mut self, key: &K) -> Option<&V> {
        let i = *self.index.get(key)?;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        Some(&self.slab[i as usize].value)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.index.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_evict_the_same_entries() {
        let mut source: ContentCache<[u8; 32], ()> = ContentCache::new(2);
        let mut target: ContentCache<[u8; 32], u8> = ContentCache::new(2);
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

    #[test]
    fn matches_a_naive_lru_under_random_operations() {
        // Reference: a Vec ordered from least to most recent.
        let mut model: Vec<(u64, u64)> = Vec::new();
        let mut cache: ContentCache<u64, u64> = ContentCache::new(5);
        let mut x = 0x1234_5678_9abc_def1u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 12;
            if x & (1 << 40) == 0 {
                cache.insert(key, step);
                model.retain(|(k, _)| *k != key);
                model.push((key, step));
                if model.len() > 5 {
                    model.remove(0);
                }
            } else {
                let want = model.iter().position(|(k, _)| *k == key).map(|i| {
                    let e = model.remove(i);
                    model.push(e);
                    e.1
                });
                assert_eq!(cache.touch(&key).copied(), want, "step {step}");
            }
            assert_eq!(cache.len(), model.len());
        }
    }
}
