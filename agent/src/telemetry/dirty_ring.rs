//! The dirty-page follower's user side: attaches `agent-ebpf`'s dirty-ring raw tracepoints and
//! slot-ioctl tracepoints, says which QEMU processes to follow, and drains what they saw.
//!
//! ```text
//! QEMU: KVM_SET_USER_MEMORY_REGION(2) -> sys_enter/exit_ioctl -> KVM_SLOTS (pid, slot):
//!       the slot's host range
//! KVM:  kvm_dirty_ring_push(slot, offset) -> DIRTY_CHUNKS bit + HOT_PAGES count (+ counters)
//! DirtyRing::drain: BPF_MAP_LOOKUP_AND_DELETE_ELEM per chunk -> DirtySet of host addresses
//! ```
//! The ring reports only while KVM's dirty logging is on with a dirty ring (`-accel
//! kvm,dirty-ring-size=N`): during a migration, a `calc-dirty-rate` in mode `dirty-ring`, or a
//! `set-vcpu-dirty-limit`. Turning logging on makes QEMU declare every slot again with
//! `KVM_MEM_LOG_DIRTY_PAGES`, so a process followed after it started learns its slots then,
//! before the first push. Pushes in a slot not yet seen are counted (`unmapped`), not placed.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::Instant,
};

use agent_common::{
    dirty::{
        Chunk, ChunkKey, DirtyEvent, DirtyStats, HotKey, Slot, SlotKey, CHUNK_PAGES, CHUNK_WORDS,
        PAGE_SHIFT,
    },
    maps,
    programs::{DIRTY_RING, SLOT_IOCTL},
};
use aya::{
    maps::{HashMap, Map, MapData, PerCpuHashMap, PerCpuValues},
    Ebpf,
};
use bitvec::{array::BitArray, order::Lsb0};
use serde::Serialize;

use super::{
    block_io::ProgramCost,
    loader::{
        attach_raw_tracepoint, attach_tracepoint, forget, program_runs, take_map, typed_map,
        TelemetryError,
    },
};

/// A process's counters, summed over CPUs, by [`DirtyEvent`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyCounts(pub [u64; DirtyEvent::COUNT]);

impl DirtyCounts {
    pub fn get(&self, event: DirtyEvent) -> u64 {
        self.0[event as usize]
    }

    /// Every counter by its name.
    pub fn named(&self) -> BTreeMap<&'static str, u64> {
        DirtyEvent::ALL
            .iter()
            .map(|e| (e.name(), self.get(*e)))
            .collect()
    }
}

type Bits = BitArray<[u64; CHUNK_WORDS], Lsb0>;

/// The pages one process dirtied between two drains, by host address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    chunks: BTreeMap<u64, Bits>,
}

impl DirtySet {
    /// Adds the page holding `addr`.
    pub fn insert(&mut self, addr: u64) {
        let (chunk, bit) = agent_common::dirty::chunk_of(addr);
        self.chunks
            .entry(chunk)
            .or_default()
            .set(bit as usize, true);
    }

    pub fn contains(&self, addr: u64) -> bool {
        let (chunk, bit) = agent_common::dirty::chunk_of(addr);
        self.chunks.get(&chunk).is_some_and(|b| b[bit as usize])
    }

    /// Pages in the set.
    pub fn len(&self) -> usize {
        self.chunks.values().map(|b| b.count_ones()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.values().all(|b| b.not_any())
    }

    /// The pages' host addresses, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.iter().flat_map(|(chunk, bits)| {
            bits.iter_ones()
                .map(move |bit| (chunk * CHUNK_PAGES + bit as u64) << PAGE_SHIFT)
        })
    }

    fn merge(&mut self, chunk: u64, words: [u64; CHUNK_WORDS]) {
        let bits = self.chunks.entry(chunk).or_default();
        for (have, new) in bits.as_raw_mut_slice().iter_mut().zip(words) {
            *have |= new;
        }
    }
}

/// The attached dirty-ring programs' maps. The programs themselves stay in the [`Ebpf`] they
/// were loaded from, which must outlive this.
pub struct DirtyRing {
    vms: PerCpuHashMap<MapData, u32, DirtyStats>,
    slots: HashMap<MapData, SlotKey, Slot>,
    chunks: PerCpuHashMap<MapData, ChunkKey, Chunk>,
    /// A second fd of `chunks`, for `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which aya does not offer
    /// for hash maps.
    chunks_fd: OwnedFd,
    hot: PerCpuHashMap<MapData, HotKey, u64>,
}

impl DirtyRing {
    /// Loads and attaches the dirty-ring and slot-ioctl programs of `ebpf` and takes their maps.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self, TelemetryError> {
        for (name, tracepoint) in DIRTY_RING {
            attach_raw_tracepoint(ebpf, name, tracepoint)?;
        }
        for (name, tracepoint) in SLOT_IOCTL {
            attach_tracepoint(ebpf, name, "syscalls", tracepoint)?;
        }
        let vms = typed_map(ebpf, maps::DIRTY_VMS, PerCpuHashMap::try_from)?;
        let slots = typed_map(ebpf, maps::KVM_SLOTS, HashMap::try_from)?;
        let chunks_map = take_map(ebpf, maps::DIRTY_CHUNKS)?;
        let chunks_fd = match &chunks_map {
            Map::PerCpuHashMap(data) => data.fd().as_fd().try_clone_to_owned(),
            _ => Err(std::io::Error::other("not a per-CPU hash map")),
        }
        .map_err(|e| TelemetryError::Stats(format!("{}: {e}", maps::DIRTY_CHUNKS)))?;
        let chunks = PerCpuHashMap::try_from(chunks_map).map_err(|source| TelemetryError::Map {
            name: maps::DIRTY_CHUNKS,
            source,
        })?;
        let hot = typed_map(ebpf, maps::HOT_PAGES, PerCpuHashMap::try_from)?;
        Ok(Self {
            vms,
            slots,
            chunks,
            chunks_fd,
            hot,
        })
    }

    /// Follows `tgid`'s dirty pages and slot declarations from now on (its counters start at
    /// zero; following it again keeps them).
    pub fn follow(&mut self, tgid: u32) -> Result<(), TelemetryError> {
        let err = |source| TelemetryError::Map {
            name: maps::DIRTY_VMS,
            source,
        };
        if self.vms.get(&tgid, 0).is_ok() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| TelemetryError::Stats(e.to_string()))?;
        let zero = PerCpuValues::try_from(vec![DirtyStats::default(); cpus])
            .map_err(|e| TelemetryError::Stats(e.to_string()))?;
        self.vms.insert(tgid, zero, 0).map_err(err)
    }

    /// Stops following `tgid` and forgets its slots, dirty pages and counts.
    pub fn unfollow(&mut self, tgid: u32) -> Result<(), TelemetryError> {
        forget(self.vms.remove(&tgid), maps::DIRTY_VMS)?;
        let slots = of_tgid(self.slots.keys(), |k: &SlotKey| k.tgid == tgid);
        remove_all(slots, |k| self.slots.remove(k), maps::KVM_SLOTS)?;
        let chunks = of_tgid(self.chunks.keys(), |k: &ChunkKey| k.tgid == tgid);
        remove_all(chunks, |k| self.chunks.remove(k), maps::DIRTY_CHUNKS)?;
        let hot = of_tgid(self.hot.keys(), |k: &HotKey| k.tgid == tgid);
        remove_all(hot, |k| self.hot.remove(k), maps::HOT_PAGES)
    }

    /// `tgid`'s counters, or `None` when it is not followed.
    pub fn counts(&self, tgid: u32) -> Result<Option<DirtyCounts>, TelemetryError> {
        let per_cpu = match self.vms.get(&tgid, 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(source) => {
                return Err(TelemetryError::Map {
                    name: maps::DIRTY_VMS,
                    source,
                })
            }
        };
        let mut out = DirtyCounts::default();
        for cpu in per_cpu.iter() {
            for (sum, n) in out.0.iter_mut().zip(cpu.counts) {
                *sum += n;
            }
        }
        Ok(Some(out))
    }

    /// The slots `tgid` declared since it was followed, by slot number.
    pub fn slots(&self, tgid: u32) -> Vec<Slot> {
        let mut out: Vec<Slot> = self
            .slots
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.tgid == tgid)
            .map(|(_, v)| v)
            .collect();
        out.sort_by_key(|s| s.slot);
        out
    }

    /// Takes every page dirtied since the last drain, by process. Each chunk is read and
    /// deleted in one call, so a page dirtied meanwhile goes to the next drain.
    pub fn drain(&mut self) -> Result<BTreeMap<u32, DirtySet>, TelemetryError> {
        let keys: Vec<ChunkKey> = self.chunks.keys().filter_map(Result::ok).collect();
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| TelemetryError::Stats(e.to_string()))?;
        let mut buf = vec![Chunk::default(); cpus];
        let mut out: BTreeMap<u32, DirtySet> = BTreeMap::new();
        for key in keys {
            match lookup_and_delete(&self.chunks_fd, &key, &mut buf) {
                Ok(true) => {
                    let mut words = [0u64; CHUNK_WORDS];
                    for chunk in &buf {
                        for (w, b) in words.iter_mut().zip(chunk.bits) {
                            *w |= b;
                        }
                    }
                    out.entry(key.tgid).or_default().merge(key.chunk, words);
                }
                Ok(false) => {}
                Err(e) => {
                    return Err(TelemetryError::Stats(format!(
                        "draining {}: {e}",
                        maps::DIRTY_CHUNKS
                    )))
                }
            }
        }
        Ok(out)
    }

    /// `tgid`'s `n` most often dirtied pages that the LRU map still holds: (host address,
    /// pushes), most first.
    pub fn hottest(&self, tgid: u32, n: usize) -> Vec<(u64, u64)> {
        let mut all: Vec<(u64, u64)> = self
            .hot
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.tgid == tgid)
            .map(|(k, v)| (k.page << PAGE_SHIFT, v.iter().sum()))
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// What the kernel measured of the dirty-ring and slot-ioctl programs' runs so far (needs
    /// `kernel.bpf_stats_enabled`).
    pub fn cost(ebpf: &Ebpf) -> Result<ProgramCost, TelemetryError> {
        let mut total = ProgramCost::default();
        for (name, _) in DIRTY_RING.iter().chain(SLOT_IOCTL.iter()) {
            let (runs, time) = program_runs(ebpf, name)?;
            total.runs += runs;
            total.run_time += time;
        }
        Ok(total)
    }
}

/// One VM's dirty-ring figures over the latest tick.
#[derive(Clone, Debug, Serialize)]
pub struct RingReport {
    /// The programs' counters since the VM was followed.
    pub counts: BTreeMap<&'static str, u64>,
    /// Pages were pushed during the tick: dirty logging with a ring is on.
    pub logging: bool,
    /// Pushes (pages dirtied since their last harvest) per second over the tick.
    pub pushes_per_sec: f64,
    /// The same in bytes.
    pub bytes_per_sec: f64,
    /// Distinct pages dirtied during the tick.
    pub pages: u64,
    /// Map entries those pages dropped.
    pub map_entries_dropped: u64,
    /// Slots the VM declared since it was followed, and how many have logging on.
    pub slots: usize,
    pub slots_logging: usize,
    /// The most often dirtied pages, while logging, and how old that list is.
    pub hot: Vec<HotPage>,
    pub hot_age_s: Option<f64>,
    #[serde(skip)]
    pub hot_at: Option<Instant>,
    #[serde(skip)]
    pub at: Option<Instant>,
}

/// A page often dirtied: where it is in the guest's RAM, and how many times.
#[derive(Clone, Debug, Serialize)]
pub struct HotPage {
    /// The RAM block and offset, when the page is in one.
    pub block: Option<String>,
    pub offset: Option<u64>,
    /// QEMU's address of the page.
    pub host: u64,
    pub pushes: u64,
}

/// What a VM's dirty ring looked like at the last tick.
#[derive(Default)]
pub struct RingView {
    pub last: Option<(DirtyCounts, Instant)>,
    pub report: Option<RingReport>,
}

/// The keys `keys` lists that `mine` picks (a map's keys, collected before any is removed).
fn of_tgid<K>(
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    mine: impl Fn(&K) -> bool,
) -> Vec<K> {
    keys.filter_map(Result::ok).filter(|k| mine(k)).collect()
}

/// Removes every key of `keys` with `remove` (a key gone already is no error).
fn remove_all<K>(
    keys: Vec<K>,
    mut remove: impl FnMut(&K) -> Result<(), aya::maps::MapError>,
    name: &'static str,
) -> Result<(), TelemetryError> {
    keys.iter().try_for_each(|k| forget(remove(k), name))
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a per-CPU hash map: fills `out` (one value per possible
/// CPU) and deletes the key. `Ok(false)`: the key is gone already.
fn lookup_and_delete<K, V>(map: &OwnedFd, key: &K, out: &mut [V]) -> std::io::Result<bool> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    // The kernel lays per-CPU values out 8-byte aligned, one after another.
    assert!(
        size_of::<V>().is_multiple_of(8),
        "per-CPU values must be 8-byte multiples"
    );
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    assert!(out.len() >= cpus, "one value per possible CPU");
    let attr = Attr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: (key as *const K) as u64,
        value: out.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` names a live key of the map's key size and a buffer of at least
    // `cpus * size_of::<V>()` bytes, which is what the kernel writes; the size passed is the
    // struct's own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const Attr,
            size_of::<Attr>() as u32,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(false)
    } else {
        Err(e)
    }
}
