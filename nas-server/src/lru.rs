//! A bounded least-recently-used map with O(1) insert, touch, remove and evict and no
//! allocation once full: entries live in a slab threaded on a doubly linked recency list.
//! Eviction depends only on the sequence of operations, so two parties applying the same
//! operations evict the same keys (the agents' content caches rely on this). Keys are hashed
//! with a fast seeded hasher (BLAKE3 digests and block numbers need no SipHash).
use std::{collections::HashMap, hash::Hash};

const NIL: u32 = u32::MAX;

struct Slot<K, V> {
    entry: Option<(K, V)>,
    prev: u32,
    next: u32,
}

/// A bounded LRU map from `K` to `V`.
pub struct Lru<K, V> {
    capacity: usize,
    index: HashMap<K, u32, foldhash::fast::RandomState>,
    slots: Vec<Slot<K, V>>,
    /// Slots freed by `remove`.
    vacant: Vec<u32>,
    /// Most and least recently used slots.
    head: u32,
    tail: u32,
}

impl<K: Hash + Eq + Copy, V> Lru<K, V> {
    /// An empty map holding at most `capacity` entries (0 holds nothing).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(NIL as usize - 1);
        Self {
            capacity,
            index: HashMap::with_capacity_and_hasher(capacity.min(1 << 20), Default::default()),
            slots: Vec::new(),
            vacant: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = (self.slots[i as usize].prev, self.slots[i as usize].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        self.slots[i as usize].prev = NIL;
        self.slots[i as usize].next = self.head;
        match self.head {
            NIL => self.tail = i,
            h => self.slots[h as usize].prev = i,
        }
        self.head = i;
    }

    fn entry(&self, i: u32) -> &(K, V) {
        self.slots[i as usize]
            .entry
            .as_ref()
            .expect("linked slots hold entries")
    }

    /// Inserts (or refreshes) `key` as the most recent entry. Returns the least recent entry
    /// when inserting a new key evicted it.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        if self.capacity == 0 {
            return None;
        }
        if let Some(&i) = self.index.get(&key) {
            self.slots[i as usize].entry = Some((key, value));
            self.unlink(i);
            self.push_front(i);
            return None;
        }
        let mut evicted = None;
        let i = if self.index.len() >= self.capacity {
            // Reuse the least recent entry's slot.
            let i = self.tail;
            self.unlink(i);
            let old = self.slots[i as usize].entry.replace((key, value));
            let old = old.expect("linked slots hold entries");
            self.index.remove(&old.0);
            evicted = Some(old);
            i
        } else if let Some(i) = self.vacant.pop() {
            self.slots[i as usize].entry = Some((key, value));
            i
        } else {
            self.slots.push(Slot {
                entry: Some((key, value)),
                prev: NIL,
                next: NIL,
            });
            (self.slots.len() - 1) as u32
        };
        self.index.insert(key, i);
        self.push_front(i);
        evicted
    }

    /// Marks `key` most recent and returns its value, if present.
    pub fn touch(&mut self, key: &K) -> Option<&V> {
        let i = *self.index.get(key)?;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        Some(&self.entry(i).1)
    }

    /// The value of `key`, without changing its recency.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.index.get(key).map(|&i| &self.entry(i).1)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.index.remove(key)?;
        self.unlink(i);
        self.vacant.push(i);
        self.slots[i as usize].entry.take().map(|(_, v)| v)
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

    /// Every entry, least recent first.
    pub fn iter_oldest_first(&self) -> impl Iterator<Item = (&K, &V)> {
        let mut at = self.tail;
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let (k, v) = self.entry(at);
            at = self.slots[at as usize].prev;
            Some((k, v))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_parties_evict_the_same_entries() {
        let mut a: Lru<[u8; 32], ()> = Lru::new(2);
        let mut b: Lru<[u8; 32], u8> = Lru::new(2);
        let ops: [(u8, bool); 6] = [
            (1, false),
            (2, false),
            (1, true),
            (3, false),
            (2, false),
            (4, false),
        ];
        for (h, touch) in ops {
            let key = [h; 32];
            if touch {
                assert!(a.touch(&key).is_some());
                assert_eq!(b.touch(&key), Some(&h));
            } else {
                a.insert(key, ());
                b.insert(key, h);
            }
            for probe in 1..=4u8 {
                assert_eq!(a.contains(&[probe; 32]), b.contains(&[probe; 32]));
            }
        }
        // 1 was touched after 2, so 3 evicted 2; re-inserting 2 evicted 1; 4 evicted 3.
        assert!(!b.contains(&[1; 32]) && !b.contains(&[3; 32]));
        assert!(b.contains(&[2; 32]) && b.contains(&[4; 32]));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn matches_a_naive_lru_under_random_operations() {
        // Reference: a Vec ordered from least to most recent.
        let mut model: Vec<(u64, u64)> = Vec::new();
        let mut lru: Lru<u64, u64> = Lru::new(5);
        let mut x = 0x1234_5678_9abc_def1u64;
        for step in 0..30_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 12;
            match x >> 60 {
                0..=6 => {
                    let evicted = lru.insert(key, step);
                    let present = model.iter().position(|(k, _)| *k == key);
                    let mut want = None;
                    match present {
                        Some(i) => {
                            model.remove(i);
                        }
                        None if model.len() == 5 => want = Some(model.remove(0)),
                        None => {}
                    }
                    model.push((key, step));
                    assert_eq!(evicted, want, "step {step}");
                }
                7..=12 => {
                    let want = model.iter().position(|(k, _)| *k == key).map(|i| {
                        let e = model.remove(i);
                        model.push(e);
                        e.1
                    });
                    assert_eq!(lru.touch(&key).copied(), want, "step {step}");
                }
                _ => {
                    let want = model
                        .iter()
                        .position(|(k, _)| *k == key)
                        .map(|i| model.remove(i).1);
                    assert_eq!(lru.remove(&key), want, "step {step}");
                }
            }
            assert_eq!(lru.len(), model.len());
            let order: Vec<(u64, u64)> = lru.iter_oldest_first().map(|(k, v)| (*k, *v)).collect();
            assert_eq!(order, model, "step {step}");
        }
    }
}
