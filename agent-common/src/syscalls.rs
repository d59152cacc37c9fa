//! The I/O follower's types: which (process, fd) pairs are followed, a call's arguments kept
//! from its entry to its exit, and the event each followed call becomes.
//!
//! A followed call is recorded at its syscall-entry tracepoint ([`PendingCall`], by thread) and
//! turned into one [`IoEvent`] at its exit, once the kernel has said how many bytes moved. Small
//! transfers (NBD headers and offsets, at most [`HEAD_BYTES`]) are copied whole; for the others
//! the event carries the iovec list (address, length), at most [`MAX_IOV`] entries, and how many
//! the call had. Nothing is dropped silently: every event that could not be made is counted in
//! a [`SyscallDrop`] slot. `io_submit` has no exit worth waiting for (its requests complete
//! later, reaped from a ring in user memory): each followed iocb becomes an event at entry.

/// `fd` value in a [`FdKey`] that follows every fd of the process (and its memory events).
pub const FD_ANY: u32 = u32::MAX;
/// `fd` value in a [`FdKey`] that follows the process's memory events (madvise) only.
pub const FD_MEMORY: u32 = u32::MAX - 1;
/// Bytes of a call's data copied into its event when the call moved at most this many.
pub const HEAD_BYTES: usize = 32;
/// Iovecs recorded per event; the rest are counted in [`IoEvent::iov_total`].
pub const MAX_IOV: usize = 32;
/// iocbs recorded per `io_submit` (QEMU's linux-aio submits at most 32 at once unless a
/// device raises its batch); the rest are counted as [`SyscallDrop::AioOverflow`].
pub const MAX_AIO_BATCH: u32 = 32;

/// Key of `FOLLOWED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdKey {
    /// Thread-group id (the process).
    pub tgid: u32,
    /// The file descriptor, or [`FD_ANY`] / [`FD_MEMORY`].
    pub fd: u32,
}

/// What a followed call did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// `recvmsg`: bytes received into the iovecs.
    Recv = 1,
    /// `sendmsg`: bytes sent from the iovecs.
    Send = 2,
    /// `pread64`, `preadv`, `preadv2`: bytes read at `offset` into the iovecs.
    Read = 3,
    /// `pwrite64`, `pwritev`, `pwritev2`: bytes written at `offset` from the iovecs.
    Write = 4,
    /// `madvise(addr, len, advice)` that drops memory (`MADV_DONTNEED`, `MADV_FREE`,
    /// `MADV_REMOVE`): `iov[0]` is the range, `offset` the advice.
    Discard = 5,
    /// `fallocate(fd, mode, offset, len)` with a mode that changes the file's content
    /// ([`FALLOC_CHANGES`]: QEMU's write-zeroes and discard on image files): `offset` is the
    /// range's start, `iov[0]` is `{ base: mode, len }`.
    Fallocate = 6,
    /// One `io_submit` iocb (`aio=native`) reading from a followed file at `offset` into
    /// the iovecs (`IOCB_CMD_PREAD`, `IOCB_CMD_PREADV`), recorded at submission: the data has
    /// not landed yet. `ret` is the request's length, or -1 when the iovecs give it.
    AioRead = 7,
    /// One `io_submit` iocb writing to a followed file (`IOCB_CMD_PWRITE`,
    /// `IOCB_CMD_PWRITEV`), recorded at submission; `ret` as for [`IoKind::AioRead`].
    AioWrite = 8,
    /// `ioctl(fd, BLKDISCARD | BLKSECDISCARD | BLKZEROOUT, {start, len})` on a followed block
    /// device (QEMU's discard and write-zeroes on a host device), recorded at entry: `offset`
    /// is the range's start, `iov[0]` is `{ base: the ioctl command, len }`.
    BlockDiscard = 9,
}

/// `BLKDISCARD`: the range's blocks are discarded (they read back as anything).
pub const BLKDISCARD: u64 = 0x1277;
/// `BLKSECDISCARD`: the same, securely.
pub const BLKSECDISCARD: u64 = 0x127d;
/// `BLKZEROOUT`: the range reads as zeroes afterwards.
pub const BLKZEROOUT: u64 = 0x127f;

/// `FALLOC_FL_PUNCH_HOLE`: the range reads as zeroes afterwards.
pub const FALLOC_FL_PUNCH_HOLE: u64 = 0x02;
/// `FALLOC_FL_COLLAPSE_RANGE`: the range is removed, what follows moves down.
pub const FALLOC_FL_COLLAPSE_RANGE: u64 = 0x08;
/// `FALLOC_FL_ZERO_RANGE`: the range reads as zeroes afterwards.
pub const FALLOC_FL_ZERO_RANGE: u64 = 0x10;
/// `FALLOC_FL_INSERT_RANGE`: a hole is inserted, what follows moves up.
pub const FALLOC_FL_INSERT_RANGE: u64 = 0x20;
/// The `fallocate` modes that change what a file holds; plain allocation does not.
pub const FALLOC_CHANGES: u64 =
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_INSERT_RANGE;
/// The modes that move the content after the range (every later block changes).
pub const FALLOC_SHIFTS: u64 = FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE;

impl IoKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Recv,
            2 => Self::Send,
            3 => Self::Read,
            4 => Self::Write,
            5 => Self::Discard,
            6 => Self::Fallocate,
            7 => Self::AioRead,
            8 => Self::AioWrite,
            9 => Self::BlockDiscard,
            _ => return None,
        })
    }
}

/// How a call names its memory.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallShape {
    /// A `struct user_msghdr *` (recvmsg, sendmsg): its iovecs are read at exit.
    Msghdr = 0,
    /// One buffer and its length (pread64, pwrite64).
    Buffer = 1,
    /// An iovec array and its count (preadv, pwritev and their `2` forms).
    Vector = 2,
    /// An address range (madvise), or a file range (fallocate: `ptr` holds the mode).
    Range = 3,
}

/// A followed call's arguments, from entry to exit. Value of `IO_CALLS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingCall {
    /// [`IoKind`].
    pub kind: u32,
    /// [`CallShape`].
    pub shape: u32,
    pub fd: u32,
    pub reserved: u32,
    /// `struct user_msghdr *` (recvmsg, sendmsg), the buffer (pread64, pwrite64), the iovec
    /// array (the vectored calls) or the address (madvise).
    pub ptr: u64,
    /// The buffer's length, the iovec count, or madvise's length.
    pub len: u64,
    /// The file offset, or madvise's advice.
    pub offset: u64,
}

/// A thread's slot in `IO_CALLS` (index: the thread id modulo [`CALL_SLOTS`]). `owner` is the
/// `pid_tgid` of the thread whose call it holds, 0 when free; it is claimed with a
/// compare-and-swap at entry and cleared at exit, so two threads whose ids share a slot never
/// read each other's arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSlot {
    pub owner: u64,
    pub call: PendingCall,
}

/// One range of user memory a call read or wrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoVec {
    pub base: u64,
    pub len: u64,
}

/// One followed call, as it returned. Records of `IO_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoEvent {
    /// [`IoKind`].
    pub kind: u32,
    pub tgid: u32,
    /// The thread that made the call.
    pub tid: u32,
    pub fd: u32,
    /// The call's return value: bytes moved, or a negative errno.
    pub ret: i64,
    /// The file offset (Read, Write) or the advice (Discard).
    pub offset: u64,
    /// Iovecs the call named.
    pub iov_total: u32,
    /// Iovecs recorded in `iov` (at most [`MAX_IOV`]).
    pub iov_count: u32,
    /// Bytes of data copied into `head` (0 when the call moved more than [`HEAD_BYTES`]).
    pub head_len: u32,
    pub reserved: u32,
    /// The call's first bytes of data, when it moved at most [`HEAD_BYTES`].
    pub head: [u8; HEAD_BYTES],
    pub iov: [IoVec; MAX_IOV],
}

impl IoEvent {
    /// The recorded iovecs.
    pub fn iovecs(&self) -> &[IoVec] {
        &self.iov[..(self.iov_count as usize).min(MAX_IOV)]
    }

    /// The copied data.
    pub fn head(&self) -> &[u8] {
        &self.head[..(self.head_len as usize).min(HEAD_BYTES)]
    }
}

/// Slots of `SYSCALL_DROPS`: why a followed call produced no event, or an incomplete one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallDrop {
    /// The ring buffer was full: the event is lost (user space must treat the fd's
    /// conversation as broken).
    RingFull = 0,
    /// The thread's slot in `IO_CALLS` held another thread's call (their ids share a slot).
    CallsFull = 1,
    /// The call's arguments (msghdr, iovec array) could not be read.
    ReadArgs = 2,
    /// The call named more iovecs than an event records (the event says how many).
    IovOverflow = 3,
    /// An `io_submit` carried more iocbs than one call records ([`MAX_AIO_BATCH`]): the
    /// rest are lost.
    AioOverflow = 4,
}

impl SyscallDrop {
    /// Number of slots in `SYSCALL_DROPS`.
    pub const COUNT: u32 = 5;
    /// Every slot, in index order.
    pub const ALL: [SyscallDrop; 5] = [
        SyscallDrop::RingFull,
        SyscallDrop::CallsFull,
        SyscallDrop::ReadArgs,
        SyscallDrop::IovOverflow,
        SyscallDrop::AioOverflow,
    ];

    /// Name used in logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            SyscallDrop::RingFull => "ring_full",
            SyscallDrop::CallsFull => "calls_full",
            SyscallDrop::ReadArgs => "read_args",
            SyscallDrop::IovOverflow => "iov_overflow",
            SyscallDrop::AioOverflow => "aio_overflow",
        }
    }
}

/// Capacity of `FOLLOWED`.
pub const FOLLOWED_CAPACITY: u32 = 4096;
/// Slots of `FOLLOWED_TGIDS` (a power of two): how many followed processes have a thread-group
/// id equal to the index modulo this. An array lookup costs the kernel side far less than a
/// hash lookup, and nearly every call it sees is another process's.
pub const TGID_SLOTS: u32 = 1 << 16;
/// Slots of `IO_CALLS` (a power of two): one per thread id modulo this, 3 MiB in all.
pub const CALL_SLOTS: u32 = 1 << 16;
/// Bytes of `IO_EVENTS` (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<FdKey>(), 8);
        assert_eq!(size_of::<PendingCall>(), 40);
        assert_eq!(size_of::<PendingSlot>(), 48);
        assert!(CALL_SLOTS.is_power_of_two());
        assert_eq!(size_of::<IoVec>(), 16);
        assert_eq!(
            size_of::<IoEvent>(),
            4 * 4 + 8 + 8 + 4 * 4 + HEAD_BYTES + 16 * MAX_IOV
        );
    }
}
