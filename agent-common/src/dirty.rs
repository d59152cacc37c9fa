//! The dirty-page follower's types: KVM's dirty ring seen from its tracepoints.
//!
//! While a KVM guest's dirty logging is on with a dirty ring, every page the guest writes for
//! the first time since the ring was last harvested fires `kvm:kvm_dirty_ring_push` with the
//! memory slot and the page's offset in it, on the vCPU thread of the guest's QEMU. The slot
//! means nothing by itself: QEMU declares each slot with `KVM_SET_USER_MEMORY_REGION(2)`, whose
//! arguments (slot, guest-physical start, size, host address) the `sys_enter_ioctl` program
//! keeps until `sys_exit_ioctl` says the call succeeded, then stores as a [`Slot`] under
//! [`SlotKey`]. A push is then a host address: `userspace_addr + offset * 4096`, which user
//! space already knows how to place in a RAM block.
//!
//! Each push of a followed process (one with a [`DirtyStats`] entry, which user space makes)
//! sets the page's bit in a [`Chunk`] of 512 pages, and adds one to the page's count in an LRU
//! map of hot pages ([`HotKey`]). User space drains the chunks with
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, so a bit set after an entry was taken lands in a new entry
//! for the next drain, never in the gap between a read and a delete. Whatever cannot be
//! recorded is counted by [`DirtyEvent`] in the process's stats, never dropped silently.

/// `KVM_SET_USER_MEMORY_REGION`: `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
pub const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
/// `KVM_SET_USER_MEMORY_REGION2`: `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)`;
/// its first 32 bytes are laid out as in the first form.
pub const KVM_SET_USER_MEMORY_REGION2: u64 = 0x40a0_ae49;
/// `KVM_MEM_LOG_DIRTY_PAGES` in [`Slot::flags`]: the slot's dirty logging is on.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;

/// Guest page size the ring counts in.
pub const PAGE_SHIFT: u32 = 12;
/// Pages per [`Chunk`] (2 MiB of host address space).
pub const CHUNK_PAGES: u64 = 512;
/// `u64` words per [`Chunk`].
pub const CHUNK_WORDS: usize = (CHUNK_PAGES / 64) as usize;

/// Capacity of `DIRTY_VMS`: processes followed at once.
pub const DIRTY_VMS_CAPACITY: u32 = 256;
/// Capacity of `KVM_SLOTS` (QEMU declares a few dozen per VM: RAM, ROMs, SMRAM).
pub const SLOTS_CAPACITY: u32 = 8192;
/// Capacity of `SLOT_CALLS`: threads inside a `KVM_SET_USER_MEMORY_REGION` call at once.
pub const SLOT_CALLS_CAPACITY: u32 = 1024;
/// Capacity of `DIRTY_CHUNKS`: 2 MiB ranges dirtied between two drains (128 GiB in all).
pub const CHUNKS_CAPACITY: u32 = 65_536;
/// Capacity of `HOT_PAGES`, an LRU map: the least recently dirtied page makes room.
pub const HOT_CAPACITY: u32 = 65_536;

/// Key of `KVM_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub tgid: u32,
    /// `address space << 16 | slot id`, as both the ioctl and the tracepoint give it.
    pub slot: u32,
}

/// Value of `KVM_SLOTS`, and of `SLOT_CALLS` between an ioctl's entry and exit: the first 32
/// bytes of `struct kvm_userspace_memory_region(2)`, as QEMU passed them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub slot: u32,
    /// `KVM_MEM_*` flags; [`KVM_MEM_LOG_DIRTY_PAGES`] while dirty logging is on.
    pub flags: u32,
    pub guest_phys_addr: u64,
    /// Bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// Where the slot's memory sits in QEMU's address space.
    pub userspace_addr: u64,
}

/// Key of `DIRTY_CHUNKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    pub tgid: u32,
    pub _pad: u32,
    /// Host address >> ([`PAGE_SHIFT`] + 9).
    pub chunk: u64,
}

/// Value of `DIRTY_CHUNKS` (one per CPU): bit `i` is page `i` of the chunk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub bits: [u64; CHUNK_WORDS],
}

/// Key of `HOT_PAGES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HotKey {
    pub tgid: u32,
    pub _pad: u32,
    /// Host address >> [`PAGE_SHIFT`].
    pub page: u64,
}

/// What the dirty-ring programs counted, per process: indexes of [`DirtyStats::counts`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyEvent {
    /// `kvm_dirty_ring_push`: a page was dirtied.
    Push = 0,
    /// `kvm_dirty_ring_reset`: QEMU harvested a vCPU's ring and re-armed its pages.
    Reset = 1,
    /// `kvm_dirty_ring_exit`: a vCPU left the guest because its ring was full (the ring's cost).
    FullExit = 2,
    /// A push in a slot not declared since the process was followed: counted, not placed.
    Unmapped = 3,
    /// A push past its slot's end (never from a sane kernel): counted, not placed.
    OutsideSlot = 4,
    /// `DIRTY_CHUNKS` was full: the page's bit is lost (user space must not trust the set).
    ChunksFull = 5,
    /// A `KVM_SET_USER_MEMORY_REGION(2)` that succeeded and was stored.
    SlotSet = 6,
    /// A slot could not be stored (map full, arguments unreadable): pushes in it will be
    /// `Unmapped`.
    SlotLost = 7,
}

impl DirtyEvent {
    /// Number of counters in [`DirtyStats`].
    pub const COUNT: usize = 8;
    /// Every counter, in index order.
    pub const ALL: [DirtyEvent; 8] = [
        DirtyEvent::Push,
        DirtyEvent::Reset,
        DirtyEvent::FullExit,
        DirtyEvent::Unmapped,
        DirtyEvent::OutsideSlot,
        DirtyEvent::ChunksFull,
        DirtyEvent::SlotSet,
        DirtyEvent::SlotLost,
    ];

    /// Name used in JSON and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            DirtyEvent::Push => "pushes",
            DirtyEvent::Reset => "resets",
            DirtyEvent::FullExit => "full_exits",
            DirtyEvent::Unmapped => "unmapped",
            DirtyEvent::OutsideSlot => "outside_slot",
            DirtyEvent::ChunksFull => "chunks_full",
            DirtyEvent::SlotSet => "slots_set",
            DirtyEvent::SlotLost => "slots_lost",
        }
    }
}

/// Value of `DIRTY_VMS` (one per CPU): the process's counters. Its presence is what makes the
/// programs look at a process at all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyStats {
    pub counts: [u64; DirtyEvent::COUNT],
}

/// The chunk and bit of a host address.
pub const fn chunk_of(addr: u64) -> (u64, u32) {
    let page = addr >> PAGE_SHIFT;
    (page / CHUNK_PAGES, (page % CHUNK_PAGES) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Slot>(), 32);
        assert_eq!(size_of::<ChunkKey>(), 16);
        assert_eq!(size_of::<Chunk>(), 64);
        assert_eq!(size_of::<HotKey>(), 16);
        assert_eq!(size_of::<DirtyStats>(), 8 * DirtyEvent::COUNT);
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // _IOW(type, nr, size) = 1 << 30 | size << 16 | type << 8 | nr
        let iow = |nr: u64, size: u64| (1 << 30) | (size << 16) | (0xae << 8) | nr;
        assert_eq!(KVM_SET_USER_MEMORY_REGION, iow(0x46, 32));
        assert_eq!(KVM_SET_USER_MEMORY_REGION2, iow(0x49, 160));
    }

    #[test]
    fn chunks_split_addresses() {
        assert_eq!(chunk_of(0), (0, 0));
        assert_eq!(chunk_of(0x1000), (0, 1));
        assert_eq!(chunk_of(0x20_0000), (1, 0));
        assert_eq!(chunk_of(0x20_0000 + 511 * 4096 + 7), (1, 511));
    }
}
