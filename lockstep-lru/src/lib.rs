//! A bounded least-recently-used map with O(1) insert, touch, remove and evict and no
//! allocation once full: entries live in a slab threaded on a doubly linked recency list.
//! Eviction depends only on the sequence of operations, so two parties applying the same
//! operations evict the same keys (the agents' content caches rely on this). Keys are hashed
//! with a fast seeded hasher (BLAKE3 digests and block numbers need no SipHash).
//!
//! Laid out for the cache: a migration touches this map once or twice per page, at random, so
//! every byte it spans is a likely cache miss. The hash table holds only 4-byte slot numbers
//! (a fifth of a `HashMap<[u8; 32], u32>`); the recency links sit in their own array, apart
//! from the keys and values, so walking and relinking the list reads 8 bytes per slot. An
//! eviction reads the evicted key once, to find its table entry, and finds it by slot number.
use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

const NIL: u32 = u32::MAX;

/// A slot's neighbours on the recency list.
#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

/// A bounded LRU map from `K` to `V`.
pub struct Lru<K, V> {
    capacity: usize,
    hasher: foldhash::fast::RandomState,
    /// Slot numbers, found by their key's hash.
    index: HashTable<u32>,
    entries: Vec<Option<(K, V)>>,
    links: Vec<Link>,
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
            hasher: Default::default(),
            index: HashTable::with_capacity(capacity.min(1 << 20)),
            entries: Vec::new(),
            links: Vec::new(),
            vacant: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    fn hash(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The slot holding `key`, whose hash is `hash`.
    fn find_hashed(&self, hash: u64, key: &K) -> Option<u32> {
        self.index.find(hash, holds(&self.entries, key)).copied()
    }

    fn find(&self, key: &K) -> Option<u32> {
        self.find_hashed(self.hash(key), key)
    }

    /// Adds slot `i`, which holds `key`, to the table.
    fn index_slot(&mut self, hash: u64, i: u32) {
        let (entries, hasher) = (&self.entries, &self.hasher);
        let rehash = |&j: &u32| hasher.hash_one(entries[j as usize].as_ref().expect("indexed").0);
        self.index.insert_unique(hash, i, rehash);
    }

    /// Drops slot `i`, which held `key`, from the table.
    fn unindex_slot(&mut self, key: &K, i: u32) {
        if let Ok(found) = self.index.find_entry(self.hash(key), |&j| j == i) {
            found.remove();
        }
    }

    fn unlink(&mut self, i: u32) {
        let Link { prev, next } = self.links[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.links[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.links[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        self.links[i as usize] = Link {
            prev: NIL,
            next: self.head,
        };
        match self.head {
            NIL => self.tail = i,
            h => self.links[h as usize].prev = i,
        }
        self.head = i;
    }

    fn make_recent(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn entry(&self, i: u32) -> &(K, V) {
        self.entries[i as usize]
            .as_ref()
            .expect("linked slots hold entries")
    }

    /// Inserts (or refreshes) `key` as the most recent entry. Returns the least recent entry
    /// when inserting a new key evicted it.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        if self.capacity == 0 {
            return None;
        }
        let hash = self.hash(&key);
        if let Some(i) = self.find_hashed(hash, &key) {
            self.entries[i as usize] = Some((key, value));
            self.make_recent(i);
            return None;
        }
        let mut evicted = None;
        let i = if self.index.len() >= self.capacity {
            // Reuse the least recent entry's slot.
            let i = self.tail;
            self.unlink(i);
            let old = self.entries[i as usize].replace((key, value));
            let old = old.expect("linked slots hold entries");
            self.unindex_slot(&old.0, i);
            evicted = Some(old);
            i
        } else if let Some(i) = self.vacant.pop() {
            self.entries[i as usize] = Some((key, value));
            i
        } else {
            self.entries.push(Some((key, value)));
            self.links.push(Link {
                prev: NIL,
                next: NIL,
            });
            (self.entries.len() - 1) as u32
        };
        self.index_slot(hash, i);
        self.push_front(i);
        evicted
    }

    /// Marks `key` most recent and returns its value, if present.
    pub fn touch(&mut self, key: &K) -> Option<&V> {
        let i = self.find(key)?;
        self.make_recent(i);
        Some(&self.entry(i).1)
    }

    /// The value of `key`, without changing its recency.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.find(key).map(|i| &self.entry(i).1)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let holds = holds(&self.entries, key);
        let (i, _) = self.index.find_entry(self.hash(key), holds).ok()?.remove();
        self.unlink(i);
        self.vacant.push(i);
        self.entries[i as usize].take().map(|(_, v)| v)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.find(key).is_some()
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
            at = self.links[at as usize].prev;
            Some((k, v))
        })
    }
}

/// Whether a table entry (a slot number) is the slot holding `key`.
fn holds<'a, K: Eq, V>(entries: &'a [Option<(K, V)>], key: &'a K) -> impl Fn(&u32) -> bool + 'a {
    move |&i| matches!(&entries[i as usize], Some((k, _)) if k == key)
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
