//! Types shared by the agent (user space) and its eBPF programs (`agent-ebpf`).
//!
//! Everything here is `#[repr(C)]`, free of padding and uses integer flags instead of `bool`,
//! because the same bytes are written by the kernel side and read by user space through BPF
//! maps. The `user` feature implements `aya::Pod` so user space can read the maps directly.
#![no_std]

pub mod dirty;
pub mod syscalls;

/// Map names, shared so neither side can drift from the other.
pub mod maps {
    /// `HashMap<syscalls::FdKey, u32>`: the (process, fd) pairs whose I/O syscalls are followed.
    pub const FOLLOWED: &str = "FOLLOWED";
    /// `Array<u32>`: how many followed processes fall in each slot (tgid modulo
    /// `syscalls::TGID_SLOTS`); a call from a process whose slot is 0 is turned away at once.
    pub const FOLLOWED_TGIDS: &str = "FOLLOWED_TGIDS";
    /// `Array<syscalls::PendingSlot>`: a followed call's arguments, from its entry to its exit,
    /// by thread (its id modulo `syscalls::CALL_SLOTS`).
    pub const IO_CALLS: &str = "IO_CALLS";
    /// `RingBuf` of [`super::syscalls::IoEvent`], in the order the calls returned.
    pub const IO_EVENTS: &str = "IO_EVENTS";
    /// `PerCpuArray<u64>` indexed by [`super::syscalls::SyscallDrop`].
    pub const SYSCALL_DROPS: &str = "SYSCALL_DROPS";
    /// `PerCpuHashMap<IoKey, IoCount>`: block requests issued, per device and process.
    pub const IO_COUNTS: &str = "IO_COUNTS";
    /// `PerCpuArray<u64>` indexed by [`super::IoDrop`]: events that could not be counted.
    pub const IO_DROPS: &str = "IO_DROPS";
    /// `PerCpuHashMap<u32, dirty::DirtyStats>`: processes whose dirty pages are followed, with
    /// their counters.
    pub const DIRTY_VMS: &str = "DIRTY_VMS";
    /// `HashMap<dirty::SlotKey, dirty::Slot>`: KVM memory slots declared by followed processes.
    pub const KVM_SLOTS: &str = "KVM_SLOTS";
    /// `HashMap<u64, dirty::Slot>`: a slot ioctl's arguments from its entry to its exit, by
    /// thread.
    pub const SLOT_CALLS: &str = "SLOT_CALLS";
    /// `PerCpuHashMap<dirty::ChunkKey, dirty::Chunk>`: the dirty set, 512 pages per entry.
    pub const DIRTY_CHUNKS: &str = "DIRTY_CHUNKS";
    /// `LruPerCpuHashMap<dirty::HotKey, u64>`: pushes per page, for the hottest pages.
    pub const HOT_PAGES: &str = "HOT_PAGES";
}

/// Program names in the eBPF object.
pub mod programs {
    /// Tracepoint program attached to `block:block_rq_issue`.
    pub const BLOCK_RQ_ISSUE: &str = "block_rq_issue";
    /// The syscall tracepoints of the I/O follower: (program, tracepoint in `syscalls`).
    pub const SYSCALLS: [(&str, &str); 22] = [
        ("enter_recvmsg", "sys_enter_recvmsg"),
        ("exit_recvmsg", "sys_exit_recvmsg"),
        ("enter_sendmsg", "sys_enter_sendmsg"),
        ("exit_sendmsg", "sys_exit_sendmsg"),
        ("enter_pread64", "sys_enter_pread64"),
        ("exit_pread64", "sys_exit_pread64"),
        ("enter_pwrite64", "sys_enter_pwrite64"),
        ("exit_pwrite64", "sys_exit_pwrite64"),
        ("enter_preadv", "sys_enter_preadv"),
        ("exit_preadv", "sys_exit_preadv"),
        ("enter_pwritev", "sys_enter_pwritev"),
        ("exit_pwritev", "sys_exit_pwritev"),
        ("enter_preadv2", "sys_enter_preadv2"),
        ("exit_preadv2", "sys_exit_preadv2"),
        ("enter_pwritev2", "sys_enter_pwritev2"),
        ("exit_pwritev2", "sys_exit_pwritev2"),
        ("enter_madvise", "sys_enter_madvise"),
        ("exit_madvise", "sys_exit_madvise"),
        ("enter_fallocate", "sys_enter_fallocate"),
        ("exit_fallocate", "sys_exit_fallocate"),
        ("enter_io_submit", "sys_enter_io_submit"),
        ("enter_blk_ioctl", "sys_enter_ioctl"),
    ];
    /// The dirty-ring raw tracepoints: (program, tracepoint).
    pub const DIRTY_RING: [(&str, &str); 3] = [
        ("dirty_ring_push", "kvm_dirty_ring_push"),
        ("dirty_ring_reset", "kvm_dirty_ring_reset"),
        ("dirty_ring_exit", "kvm_dirty_ring_exit"),
    ];
    /// The slot ioctl tracepoints: (program, tracepoint in `syscalls`).
    pub const SLOT_IOCTL: [(&str, &str); 2] = [
        ("enter_ioctl", "sys_enter_ioctl"),
        ("exit_ioctl", "sys_exit_ioctl"),
    ];
}

/// Global variables the loader patches into the object before loading it.
pub mod globals {
    /// `u32`: offset of `dev` (a kernel `dev_t`) in the `block_rq_issue` record.
    pub const RQ_DEV_OFFSET: &str = "RQ_DEV_OFFSET";
    /// `u32`: offset of `bytes` (`unsigned int`) in the `block_rq_issue` record.
    pub const RQ_BYTES_OFFSET: &str = "RQ_BYTES_OFFSET";
}

/// Capacity of [`maps::IO_COUNTS`]. A full map counts drops instead of growing.
pub const IO_COUNTS_CAPACITY: u32 = 16_384;

/// Key of [`maps::IO_COUNTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoKey {
    /// Kernel-encoded `dev_t` (major << 20 | minor) of the whole disk.
    pub dev: u32,
    /// Thread-group id (the user-visible process id) that issued the request.
    pub tgid: u32,
}

/// Value of [`maps::IO_COUNTS`], one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCount {
    /// Requests issued to the device driver.
    pub requests: u64,
    /// Bytes those requests carried.
    pub bytes: u64,
}

/// Slots of [`maps::IO_DROPS`]: why an event was not counted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDrop {
    /// `IO_COUNTS` was full and the key was new.
    MapFull = 0,
    /// The tracepoint record could not be read.
    ReadFailed = 1,
}

impl IoDrop {
    /// Number of slots in [`maps::IO_DROPS`].
    pub const COUNT: u32 = 2;
    /// Every slot, in index order.
    pub const ALL: [IoDrop; 2] = [IoDrop::MapFull, IoDrop::ReadFailed];

    /// Name used in logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            IoDrop::MapFull => "map_full",
            IoDrop::ReadFailed => "read_failed",
        }
    }
}

/// Kernel `dev_t` encoding (`MKDEV`): 12-bit major above a 20-bit minor.
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xfffff)
}

/// Splits a kernel-encoded `dev_t` into (major, minor).
pub const fn split_kernel_dev(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xfffff)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type here is #[repr(C)], made only of integers and integer arrays with no
    // padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::IoKey {}
    unsafe impl aya::Pod for super::IoCount {}
    unsafe impl aya::Pod for super::syscalls::FdKey {}
    unsafe impl aya::Pod for super::syscalls::PendingCall {}
    unsafe impl aya::Pod for super::syscalls::IoEvent {}
    unsafe impl aya::Pod for super::dirty::SlotKey {}
    unsafe impl aya::Pod for super::dirty::Slot {}
    unsafe impl aya::Pod for super::dirty::ChunkKey {}
    unsafe impl aya::Pod for super::dirty::Chunk {}
    unsafe impl aya::Pod for super::dirty::HotKey {}
    unsafe impl aya::Pod for super::dirty::DirtyStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<IoKey>(), 8);
        assert_eq!(size_of::<IoCount>(), 16);
    }

    #[test]
    fn kernel_dev_round_trips() {
        assert_eq!(kernel_dev(254, 0), 0x0fe0_0000);
        assert_eq!(split_kernel_dev(kernel_dev(259, 65_537)), (259, 65_537));
    }
}
