//! The dirty-page follower: KVM's dirty-ring tracepoints, and the slot ioctls that give a
//! ring entry's (slot, offset) its host address. See `agent_common::dirty` for the data flow.
//!
//! Only processes with an entry in `DIRTY_VMS` are looked at; every other process costs one
//! map lookup (raw tracepoints) or one compare of the ioctl number (`sys_enter_ioctl`).
use agent_common::dirty::{
    chunk_of, Chunk, ChunkKey, DirtyEvent, DirtyStats, HotKey, Slot, SlotKey, CHUNKS_CAPACITY,
    DIRTY_VMS_CAPACITY, HOT_CAPACITY, KVM_SET_USER_MEMORY_REGION, KVM_SET_USER_MEMORY_REGION2,
    PAGE_SHIFT, SLOTS_CAPACITY, SLOT_CALLS_CAPACITY,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruPerCpuHashMap, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
};

#[map]
static DIRTY_VMS: PerCpuHashMap<u32, DirtyStats> =
    PerCpuHashMap::with_max_entries(DIRTY_VMS_CAPACITY, 0);

#[map]
static KVM_SLOTS: HashMap<SlotKey, Slot> = HashMap::with_max_entries(SLOTS_CAPACITY, 0);

#[map]
static SLOT_CALLS: HashMap<u64, Slot> = HashMap::with_max_entries(SLOT_CALLS_CAPACITY, 0);

#[map]
static DIRTY_CHUNKS: PerCpuHashMap<ChunkKey, Chunk> =
    PerCpuHashMap::with_max_entries(CHUNKS_CAPACITY, 0);

#[map]
static HOT_PAGES: LruPerCpuHashMap<HotKey, u64> =
    LruPerCpuHashMap::with_max_entries(HOT_CAPACITY, 0);

/// Offset of a `syscalls:sys_enter_*` record's first argument (`ret` in `sys_exit_*`).
const ARG0: usize = 16;

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn bump(stats: *mut DirtyStats, event: DirtyEvent) {
    // SAFETY: a per-CPU value of a live map entry: no other CPU writes it and this program is
    // not preempted.
    unsafe { (*stats).counts[event as usize] += 1 };
}

#[raw_tracepoint(tracepoint = "kvm_dirty_ring_push")]
pub fn dirty_ring_push(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct kvm_dirty_ring *ring, u32 slot, u64 offset)
    let tgid = current_tgid();
    let Some(stats) = DIRTY_VMS.get_ptr_mut(tgid) else {
        return 0;
    };
    bump(stats, DirtyEvent::Push);
    let slot: u64 = ctx.arg(1);
    let offset: u64 = ctx.arg(2);
    let key = SlotKey {
        tgid,
        slot: slot as u32,
    };
    // SAFETY: the value is copied out at once.
    let Some(s) = (unsafe { KVM_SLOTS.get(key) }).copied() else {
        bump(stats, DirtyEvent::Unmapped);
        return 0;
    };
    if offset >= s.memory_size >> PAGE_SHIFT {
        bump(stats, DirtyEvent::OutsideSlot);
        return 0;
    }
    let addr = s.userspace_addr + (offset << PAGE_SHIFT);
    if !mark(tgid, addr) {
        bump(stats, DirtyEvent::ChunksFull);
    }
    count_hot(tgid, addr);
    0
}

/// Sets the page's bit in its chunk; false when the chunk map is full.
#[inline(always)]
fn mark(tgid: u32, addr: u64) -> bool {
    let (chunk, bit) = chunk_of(addr);
    let key = ChunkKey {
        tgid,
        _pad: 0,
        chunk,
    };
    let word = ((bit >> 6) & 7) as usize;
    let mask = 1u64 << (bit & 63);
    if set_bit(&key, word, mask) {
        return true;
    }
    let mut fresh = Chunk::default();
    fresh.bits[word] = mask;
    if DIRTY_CHUNKS
        .insert(key, fresh, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return true;
    }
    // Another CPU may have made the entry between the lookup and the insert.
    set_bit(&key, word, mask)
}

#[inline(always)]
fn set_bit(key: &ChunkKey, word: usize, mask: u64) -> bool {
    match DIRTY_CHUNKS.get_ptr_mut(key) {
        Some(chunk) => {
            // SAFETY: per-CPU value, see `bump`; `word` < 8 by construction.
            unsafe { (*chunk).bits[word & 7] |= mask };
            true
        }
        None => false,
    }
}

#[inline(always)]
fn count_hot(tgid: u32, addr: u64) {
    let key = HotKey {
        tgid,
        _pad: 0,
        page: addr >> PAGE_SHIFT,
    };
    match HOT_PAGES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, see `bump`.
        Some(n) => unsafe { *n += 1 },
        // An LRU map makes room by evicting the coldest page; a failure only loses a count.
        None => {
            let _ = HOT_PAGES.insert(key, 1, 0);
        }
    }
}

#[raw_tracepoint(tracepoint = "kvm_dirty_ring_reset")]
pub fn dirty_ring_reset(_ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct kvm_dirty_ring *ring), on the thread of QEMU that harvested the ring.
    if let Some(stats) = DIRTY_VMS.get_ptr_mut(current_tgid()) {
        bump(stats, DirtyEvent::Reset);
    }
    0
}

#[raw_tracepoint(tracepoint = "kvm_dirty_ring_exit")]
pub fn dirty_ring_exit(_ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct kvm_vcpu *vcpu), on the vCPU thread leaving the guest.
    if let Some(stats) = DIRTY_VMS.get_ptr_mut(current_tgid()) {
        bump(stats, DirtyEvent::FullExit);
    }
    0
}

#[tracepoint]
pub fn enter_ioctl(ctx: TracePointContext) -> u32 {
    // SAFETY: read_at goes through bpf_probe_read, which checks the access.
    let cmd = unsafe { ctx.read_at::<u64>(ARG0 + 8) }.unwrap_or(0);
    if cmd != KVM_SET_USER_MEMORY_REGION && cmd != KVM_SET_USER_MEMORY_REGION2 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(stats) = DIRTY_VMS.get_ptr_mut((pid_tgid >> 32) as u32) else {
        return 0;
    };
    // SAFETY: as above.
    let arg = unsafe { ctx.read_at::<u64>(ARG0 + 16) }.unwrap_or(0);
    // SAFETY: bpf_probe_read_user checks the user address and fails cleanly.
    let Ok(slot) = (unsafe { bpf_probe_read_user(arg as *const Slot) }) else {
        bump(stats, DirtyEvent::SlotLost);
        return 0;
    };
    if SLOT_CALLS.insert(pid_tgid, slot, 0).is_err() {
        bump(stats, DirtyEvent::SlotLost);
    }
    0
}

#[tracepoint]
pub fn exit_ioctl(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(slot) = (unsafe { SLOT_CALLS.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = SLOT_CALLS.remove(pid_tgid);
    // SAFETY: as in `enter_ioctl`.
    let ret = unsafe { ctx.read_at::<i64>(ARG0) }.unwrap_or(-1);
    if ret != 0 {
        // The kernel refused the slot: nothing changed.
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let Some(stats) = DIRTY_VMS.get_ptr_mut(tgid) else {
        return 0;
    };
    let key = SlotKey {
        tgid,
        slot: slot.slot,
    };
    if slot.memory_size == 0 {
        let _ = KVM_SLOTS.remove(key);
        bump(stats, DirtyEvent::SlotSet);
    } else if KVM_SLOTS.insert(key, slot, 0).is_ok() {
        bump(stats, DirtyEvent::SlotSet);
    } else {
        bump(stats, DirtyEvent::SlotLost);
    }
    0
}
