//! A map keyed by BLAKE3 digests that answers a batch of lookups with their memory accesses
//! overlapped.
//!
//! A source agent looks up every page of a read (up to 256) in its hot-set replica, a table of
//! hundreds of thousands of entries: each hit is a cache and TLB miss, and one at a time they
//! cost about as much as the rest of the per-page work together. [`DigestMap::get_many`]
//! prefetches the home slot of each lookup a few lookups ahead, so the misses overlap.
//!
//! Open addressing with linear probing, at most 70% full, and backward-shift deletion (no
//! tombstones, so probe runs never grow with churn). The home slot comes from the digest's
//! first eight bytes through a seeded hash: guests choose page and disk contents, and the seed
//! keeps them from aiming blocks at the same run of slots.
use std::hash::BuildHasher;

use blockhash::Hash;

/// Lookups prefetched ahead of the one being answered.
const AHEAD: usize = 8;
/// Slots of an empty map.
const MIN_SLOTS: usize = 16;

/// Past 70% full, linear probing's runs grow quickly: time to double.
fn too_full(len: usize, slots: usize) -> bool {
    10 * len > 7 * slots
}

/// A map from BLAKE3 digests to small `Copy` values.
pub struct DigestMap<V> {
    slots: Vec<Option<(Hash, V)>>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl<V: Copy> Default for DigestMap<V> {
    fn default() -> Self {
        Self {
            slots: vec![None; MIN_SLOTS],
            len: 0,
            hasher: Default::default(),
        }
    }
}

impl<V> std::fmt::Debug for DigestMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestMap").field("len", &self.len).finish()
    }
}

impl<V: Copy> DigestMap<V> {
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, key: &Hash) -> usize {
        let prefix = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
        self.hasher.hash_one(prefix) as usize & self.mask()
    }

    /// The slot holding `key`, or the empty slot that ends its probe run.
    fn probe(&self, key: &Hash) -> (usize, bool) {
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            match &self.slots[i] {
                None => return (i, false),
                Some((k, _)) if k == key => return (i, true),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    pub fn get(&self, key: &Hash) -> Option<V> {
        match self.probe(key) {
            (i, true) => self.slots[i].map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value of each key, in order (`None` where absent).
    pub fn get_many<'a>(&'a self, keys: &'a [Hash]) -> impl Iterator<Item = Option<V>> + 'a {
        for key in keys.iter().take(AHEAD) {
            self.prefetch(key);
        }
        keys.iter().enumerate().map(move |(n, key)| {
            if let Some(ahead) = keys.get(n + AHEAD) {
                self.prefetch(ahead);
            }
            self.get(key)
        })
    }

    fn prefetch(&self, key: &Hash) {
        let slot = &self.slots[self.home(key)];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is only a hint; it never faults, even on an invalid address, and
        // this one is a live slot. SSE is part of the x86_64 baseline.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>((slot as *const Option<(Hash, V)>).cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub fn insert(&mut self, key: Hash, value: V) -> Option<V> {
        if too_full(self.len + 1, self.slots.len()) {
            self.grow();
        }
        let (i, found) = self.probe(&key);
        let old = self.slots[i].replace((key, value)).map(|(_, v)| v);
        if !found {
            self.len += 1;
        }
        old
    }

    /// [`DigestMap::insert`] for each entry, in order, with each home slot prefetched a few
    /// entries ahead (a bulk load is a cache miss per entry otherwise).
    pub fn insert_many(&mut self, entries: &[(Hash, V)]) {
        self.reserve(entries.len());
        for (key, _) in entries.iter().take(AHEAD) {
            self.prefetch(key);
        }
        for (n, &(key, value)) in entries.iter().enumerate() {
            if let Some((ahead, _)) = entries.get(n + AHEAD) {
                self.prefetch(ahead);
            }
            self.insert(key, value);
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &Hash) -> Option<V> {
        let (mut hole, true) = self.probe(key) else {
            return None;
        };
        let old = self.slots[hole].take().map(|(_, v)| v);
        self.len -= 1;
        // Backward shift: pull later members of the run into the hole while their home slot
        // does not lie (cyclically) after the hole, so every key stays reachable from its home.
        let mask = self.mask();
        let mut i = (hole + 1) & mask;
        while let Some((k, _)) = &self.slots[i] {
            let home = self.home(k);
            if (i.wrapping_sub(home) & mask) >= (i.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[i].take();
                hole = i;
            }
            i = (i + 1) & mask;
        }
        old
    }

    /// Moves every entry into a table of `slots` slots (a power of two).
    fn grow_to(&mut self, slots: usize) {
        self.rebuild(slots, |_, _| true);
    }

    /// Moves the entries `keep` accepts into a fresh table of `slots` slots (a power of two
    /// that holds them).
    fn rebuild(&mut self, slots: usize, mut keep: impl FnMut(&Hash, &V) -> bool) {
        let old = std::mem::replace(&mut self.slots, vec![None; slots]);
        self.len = 0;
        for (k, v) in old.into_iter().flatten().filter(|(k, v)| keep(k, v)) {
            let (i, _) = self.probe(&k);
            self.slots[i] = Some((k, v));
            self.len += 1;
        }
    }

    /// Keeps only the entries for which `keep` is true (one pass over every slot).
    pub fn retain(&mut self, keep: impl FnMut(&Hash, &V) -> bool) {
        self.rebuild(self.slots.len(), keep);
    }

    fn grow(&mut self) {
        self.grow_to(2 * self.slots.len());
    }

    /// Makes room for `more` entries beyond the current ones without growing on the way, in
    /// one move of the entries at most.
    pub fn reserve(&mut self, more: usize) {
        let mut slots = self.slots.len();
        while too_full(self.len + more, slots) {
            slots *= 2;
        }
        if slots > self.slots.len() {
            self.grow_to(slots);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Keys that share their first bytes, so probe runs are long and cross the table's end.
    fn key(n: u64) -> Hash {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(n % 5).to_le_bytes());
        k[8..16].copy_from_slice(&n.to_le_bytes());
        k
    }

    #[test]
    fn matches_a_hashmap_under_random_operations() {
        let mut model: HashMap<Hash, u64> = HashMap::new();
        let mut map: DigestMap<u64> = DigestMap::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // A key space that the map's size keeps crossing, so it grows and shrinks.
            let k = key(x % 3_000);
            match x >> 61 {
                0..=3 => assert_eq!(map.insert(k, step), model.insert(k, step), "step {step}"),
                4..=5 => assert_eq!(map.remove(&k), model.remove(&k), "step {step}"),
                _ => assert_eq!(map.get(&k), model.get(&k).copied(), "step {step}"),
            }
            assert_eq!(map.len(), model.len());
        }
        map.retain(|_, v| v % 3 != 0);
        model.retain(|_, v| *v % 3 != 0);
        assert_eq!(map.len(), model.len());
        // A bulk load over existing keys, with repeats inside it: the last value wins.
        let bulk: Vec<(Hash, u64)> = (0..2_000u64).map(|n| (key(n % 1_500), n)).collect();
        map.insert_many(&bulk);
        model.extend(bulk.iter().copied());
        assert_eq!(map.len(), model.len());
        let keys: Vec<Hash> = (0..3_500).map(key).collect();
        let got: Vec<Option<u64>> = map.get_many(&keys).collect();
        let want: Vec<Option<u64>> = keys.iter().map(|k| model.get(k).copied()).collect();
        assert_eq!(got, want);
        // Every entry removed, each still found until then.
        for k in keys {
            assert_eq!(map.remove(&k), model.remove(&k));
        }
        assert!(map.is_empty());
        assert!(map.slots.iter().all(Option::is_none));
    }

    #[test]
    fn keys_with_one_home_slot_all_stay_reachable() {
        let mut map: DigestMap<u32> = DigestMap::default();
        // Same first eight bytes: one home slot, one long run.
        let same = |n: u32| {
            let mut k = [7u8; 32];
            k[8..12].copy_from_slice(&n.to_le_bytes());
            k
        };
        for n in 0..64 {
            map.insert(same(n), n);
        }
        // Room for a thousand more in one move: the smallest power of two that fits them.
        map.reserve(1000);
        assert_eq!(map.slots.len(), 2048);
        for n in (0..64).step_by(3) {
            assert_eq!(map.remove(&same(n)), Some(n));
        }
        for n in 0..64 {
            assert_eq!(map.get(&same(n)), (n % 3 != 0).then_some(n), "key {n}");
        }
    }
}
