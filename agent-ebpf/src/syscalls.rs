//! The I/O follower: syscall tracepoints on the calls through which QEMU moves guest data
//! (recvmsg/sendmsg on NBD sockets, pread/pwrite and their vectored forms on image files, the
//! iocbs of io_submit on image files opened with `aio=native`), on the discard and zero-out
//! ioctls of host block devices, on fallocate (image ranges zeroed or punched) and on madvise,
//! for the (process, fd) pairs user space put in `FOLLOWED`.
//!
//! Every call is first turned away unless its process's slot in `FOLLOWED_TGIDS` (an array)
//! says a followed process may share it. At entry a followed call's arguments go to the calling
//! thread's slot in `IO_CALLS` (an array indexed by thread id, claimed with a compare-and-swap:
//! no hash-map insert and delete on every call); at exit they come out again and, unless the
//! call failed, become one `IoEvent` in the `IO_EVENTS` ring buffer: the bytes moved, the iovec
//! list, and the data itself when the call moved at most `HEAD_BYTES` (an NBD header or
//! offset). io_submit's iocbs become events at its entry, one each (their reads complete
//! later). Whatever cannot be recorded is counted in `SYSCALL_DROPS` by reason.
use agent_common::syscalls::{
    CallShape, FdKey, IoEvent, IoKind, IoVec, PendingCall, PendingSlot, SyscallDrop, BLKDISCARD,
    BLKSECDISCARD, BLKZEROOUT, CALL_SLOTS, EVENTS_BYTES, FALLOC_CHANGES, FD_ANY, FD_MEMORY,
    FOLLOWED_CAPACITY, HEAD_BYTES, MAX_AIO_BATCH, MAX_IOV, TGID_SLOTS,
};
use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext,
};

#[map]
static FOLLOWED: HashMap<FdKey, u32> = HashMap::with_max_entries(FOLLOWED_CAPACITY, 0);

/// How many followed processes fall in each slot (tgid modulo `TGID_SLOTS`): one array lookup
/// turns nearly every other process's calls away.
#[map]
static FOLLOWED_TGIDS: Array<u32> = Array::with_max_entries(TGID_SLOTS, 0);

/// Whether `tgid` may have anything followed (its slot is shared with no other process, or
/// `followed` tells).
#[inline(always)]
fn candidate(tgid: u32) -> bool {
    FOLLOWED_TGIDS
        .get(tgid & (TGID_SLOTS - 1))
        .is_some_and(|n| *n > 0)
}

#[map]
static IO_CALLS: Array<PendingSlot> = Array::with_max_entries(CALL_SLOTS, 0);

#[map]
static IO_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static SYSCALL_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SyscallDrop::COUNT, 0);

/// Offset of the first syscall argument in a `syscalls:sys_enter_*` record (after the common
/// fields and `__syscall_nr`); each argument takes 8 bytes. `ret` sits there in `sys_exit_*`.
const ARG0: usize = 16;

/// `madvise` advice values that drop a range's contents.
const MADV_DONTNEED: u64 = 4;
const MADV_FREE: u64 = 8;
const MADV_REMOVE: u64 = 9;

/// Offset in `struct user_msghdr` (x86_64) of `msg_iov`, which `msg_iovlen` follows.
const MSG_IOV: u64 = 16;

#[inline(always)]
fn drop_event(why: SyscallDrop) {
    drop_events(why, 1);
}

#[inline(always)]
fn drop_events(why: SyscallDrop, n: u64) {
    if let Some(slot) = SYSCALL_DROPS.get_ptr_mut(why as u32) {
        // SAFETY: per-CPU slot: no other CPU writes it and this program is not preempted.
        unsafe { *slot += n };
    }
}

/// Argument `n` of a `sys_enter_*` record (`ret` for n = 0 in a `sys_exit_*` one), read
/// straight from the context: the verifier bounds tracepoint context reads, and this costs no
/// helper call.
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: an aligned 8-byte read inside the tracepoint's record (at most six arguments
    // after ARG0); the verifier refuses the program otherwise.
    unsafe {
        ctx.as_ptr()
            .cast::<u8>()
            .add(ARG0 + 8 * n)
            .cast::<u64>()
            .read()
    }
}

/// The calling thread's slot in `IO_CALLS`.
#[inline(always)]
fn slot(tid: u32) -> Option<*mut PendingSlot> {
    IO_CALLS.get_ptr_mut(tid & (CALL_SLOTS - 1))
}

/// Whether `fd` of `tgid` is followed; asked once [`candidate`] said `tgid` may be.
#[inline(always)]
fn followed(tgid: u32, fd: u32) -> bool {
    // SAFETY: lookups copy nothing out and the keys live on this stack.
    unsafe {
        FOLLOWED.get(FdKey { tgid, fd }).is_some()
            || FOLLOWED.get(FdKey { tgid, fd: FD_ANY }).is_some()
    }
}

/// Keeps a followed call's arguments until its exit. The arguments are read (`args`) only once
/// the call is known to be followed: most calls that reach here are other processes'.
#[inline(always)]
fn enter(
    ctx: &TracePointContext,
    kind: IoKind,
    shape: CallShape,
    args: fn(&TracePointContext) -> (u64, u64, u64, u64),
) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !candidate(tgid) {
        return 0;
    }
    let (fd, ptr, len, offset) = args(ctx);
    let fd = fd as u32;
    let wanted = match kind {
        IoKind::Discard => followed(tgid, FD_MEMORY) || followed(tgid, FD_ANY),
        _ => followed(tgid, fd),
    };
    if !wanted {
        return 0;
    }
    let tid = pid_tgid as u32;
    let Some(slot) = slot(tid) else {
        return 0;
    };
    // SAFETY: `slot` points at a live array element; `owner` is claimed atomically, and the
    // call is written only by the thread that claimed it.
    unsafe {
        let (_, claimed) = core::intrinsics::atomic_cxchg::<
            u64,
            { AtomicOrdering::Acquire },
            { AtomicOrdering::Relaxed },
        >(&raw mut (*slot).owner, 0, pid_tgid);
        if !claimed {
            drop_event(SyscallDrop::CallsFull);
            return 0;
        }
        (*slot).call = PendingCall {
            kind: kind as u32,
            shape: shape as u32,
            fd,
            reserved: 0,
            ptr,
            len,
            offset,
        };
    }
    0
}

/// Turns the thread's pending call into an event, now that it returned `ret`.
#[inline(always)]
fn exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(slot) = slot(tid) else {
        return 0;
    };
    // SAFETY: `slot` points at a live array element. Only this thread writes a slot it owns,
    // so the call is copied out whole before `owner` frees the slot.
    let call = unsafe {
        if core::ptr::read_volatile(&raw const (*slot).owner) != pid_tgid {
            return 0;
        }
        // Volatile accesses keep their order in the compiled program, and the JIT's x86_64
        // code keeps loads ahead of a later store: the call is read before the slot is freed.
        let call = core::ptr::read_volatile(&raw const (*slot).call);
        core::ptr::write_volatile(&raw mut (*slot).owner, 0);
        call
    };
    let ret = arg(ctx, 0) as i64;
    if ret < 0 {
        // Failed calls (EAGAIN on a non-blocking socket above all) moved nothing.
        return 0;
    }
    record(pid_tgid, &call, ret);
    0
}

/// Writes one event for `call` (which moved `ret` bytes) into the ring.
#[inline(always)]
fn record(pid_tgid: u64, call: &PendingCall, ret: i64) {
    let Some(kind) = IoKind::from_u32(call.kind) else {
        return;
    };
    let Some(mut entry) = IO_EVENTS.reserve::<IoEvent>(0) else {
        drop_event(SyscallDrop::RingFull);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at reserved ring-buffer memory the size of an IoEvent; every field is
    // written before the entry is submitted.
    unsafe {
        (*ev).kind = call.kind;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).fd = call.fd;
        (*ev).ret = ret;
        (*ev).offset = call.offset;
        // Only what the counts cover is read: `head[..head_len]`, `iov[..iov_count]`.
        (*ev).reserved = 0;
        (*ev).head_len = 0;
        (*ev).iov_total = 0;
        (*ev).iov_count = 0;
        (*ev).iov[0] = IoVec { base: 0, len: 0 };
        let (iov_ptr, iov_total) = if call.shape == CallShape::Msghdr as u32 {
            // `msg_iov` and `msg_iovlen` sit side by side: one read takes both.
            match bpf_probe_read_user((call.ptr + MSG_IOV) as *const [u64; 2]) {
                Ok([iov, len]) => (iov, len),
                Err(_) => {
                    drop_event(SyscallDrop::ReadArgs);
                    (0, 0)
                }
            }
        } else if call.shape == CallShape::Vector as u32 {
            (call.ptr, call.len)
        } else {
            // One buffer or one range.
            (*ev).iov[0] = IoVec {
                base: call.ptr,
                len: call.len,
            };
            (*ev).iov_total = 1;
            (*ev).iov_count = 1;
            (0, 0)
        };
        if iov_ptr != 0 {
            (*ev).iov_total = iov_total as u32;
            // The whole recorded part of the iovec array in one read.
            let n = if iov_total < MAX_IOV as u64 {
                iov_total as u32
            } else {
                MAX_IOV as u32
            };
            let bytes = (n * size_of::<IoVec>() as u32) & 0x3ff;
            if bytes > 0 && bytes <= (MAX_IOV * size_of::<IoVec>()) as u32 {
                let rc = generated::bpf_probe_read_user(
                    (*ev).iov.as_mut_ptr().cast(),
                    bytes,
                    iov_ptr as *const core::ffi::c_void,
                );
                if rc == 0 {
                    (*ev).iov_count = n;
                } else {
                    drop_event(SyscallDrop::ReadArgs);
                }
            }
            if iov_total > MAX_IOV as u64 {
                drop_event(SyscallDrop::IovOverflow);
            }
        }
        // Small transfers are copied whole: NBD headers, offsets and requests. A send's first
        // iovec is copied when it is small (a request header ahead of its payload); a
        // receive's data when the whole call moved at most HEAD_BYTES.
        let first = (*ev).iov[0];
        let small = match kind {
            IoKind::Send => first.len <= HEAD_BYTES as u64 && first.len <= ret as u64,
            IoKind::Recv => ret as u64 <= HEAD_BYTES as u64 && first.len >= ret as u64,
            _ => false,
        };
        if small {
            let want = if kind == IoKind::Send {
                first.len
            } else {
                ret as u64
            };
            let n = (want as u32) & 0x3f;
            if n > 0 && n <= HEAD_BYTES as u32 {
                let rc = generated::bpf_probe_read_user(
                    (*ev).head.as_mut_ptr().cast(),
                    n,
                    first.base as *const core::ffi::c_void,
                );
                if rc == 0 {
                    (*ev).head_len = n;
                } else {
                    drop_event(SyscallDrop::ReadArgs);
                }
            }
        }
    }
    // User space drains the ring on a short timer; a wake-up per event would cost a context
    // switch per syscall. It is woken early only when a quarter of the ring is waiting.
    let waiting = IO_EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let flags = if waiting > u64::from(EVENTS_BYTES / 4) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(flags));
}

/// The first four arguments: (fd, buffer or iovec array, length or count, offset).
#[inline(always)]
fn four_args(ctx: &TracePointContext) -> (u64, u64, u64, u64) {
    (arg(ctx, 0), arg(ctx, 1), arg(ctx, 2), arg(ctx, 3))
}

/// pread64/pwrite64: one buffer.
#[inline(always)]
fn enter_buffer(ctx: &TracePointContext, kind: IoKind) -> u32 {
    enter(ctx, kind, CallShape::Buffer, four_args)
}

/// preadv/pwritev and their `2` forms: an iovec array; on x86_64 `pos_l` holds the offset.
#[inline(always)]
fn enter_vector(ctx: &TracePointContext, kind: IoKind) -> u32 {
    enter(ctx, kind, CallShape::Vector, four_args)
}

/// recvmsg/sendmsg: the msghdr, read at exit.
#[inline(always)]
fn enter_msg(ctx: &TracePointContext, kind: IoKind) -> u32 {
    enter(ctx, kind, CallShape::Msghdr, |ctx| {
        (arg(ctx, 0), arg(ctx, 1), 0, 0)
    })
}

#[tracepoint]
pub fn enter_recvmsg(ctx: TracePointContext) -> u32 {
    enter_msg(&ctx, IoKind::Recv)
}

#[tracepoint]
pub fn exit_recvmsg(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint]
pub fn enter_sendmsg(ctx: TracePointContext) -> u32 {
    enter_msg(&ctx, IoKind::Send)
}

#[tracepoint]
pub fn exit_sendmsg(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint]
pub fn enter_pread64(ctx: TracePointContext) -> u32 {
    enter_buffer(&ctx, IoKind::Read)
}

#[tracepoint]
pub fn exit_pread64(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint]
pub fn enter_pwrite64(ctx: TracePointContext) -> u32 {
    enter_buffer(&ctx, IoKind::Write)
}

#[tracepoint]
pub fn exit_pwrite64(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint]
pub fn enter_preadv(ctx: TracePointContext) -> u32 {
    enter_vector(&ctx, IoKind::Read)
}

#[tracepoint]
pub fn exit_preadv(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint]
pub fn enter_pwritev(ctx: TracePointContext) -> u32 {
    enter_vector(&ctx, IoKind::Write)
}

#[tracepoint]
pub fn exit_pwritev(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint]
pub fn enter_preadv2(ctx: TracePointContext) -> u32 {
    enter_vector(&ctx, IoKind::Read)
}

#[tracepoint]
pub fn exit_preadv2(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint]
pub fn enter_pwritev2(ctx: TracePointContext) -> u32 {
    enter_vector(&ctx, IoKind::Write)
}

#[tracepoint]
pub fn exit_pwritev2(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint]
pub fn enter_madvise(ctx: TracePointContext) -> u32 {
    let advice = arg(&ctx, 2);
    if !matches!(advice, MADV_DONTNEED | MADV_FREE | MADV_REMOVE) {
        return 0;
    }
    enter(&ctx, IoKind::Discard, CallShape::Range, |ctx| {
        (0, arg(ctx, 0), arg(ctx, 1), arg(ctx, 2))
    })
}

#[tracepoint]
pub fn exit_madvise(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

/// fallocate(fd, mode, offset, len) on a followed file, when the mode changes its content
/// (QEMU's write-zeroes and discard on an image file; a plain allocation changes nothing).
#[tracepoint]
pub fn enter_fallocate(ctx: TracePointContext) -> u32 {
    let mode = arg(&ctx, 1);
    if mode & FALLOC_CHANGES == 0 {
        return 0;
    }
    enter(&ctx, IoKind::Fallocate, CallShape::Range, |ctx| {
        (arg(ctx, 0), arg(ctx, 1), arg(ctx, 3), arg(ctx, 2))
    })
}

#[tracepoint]
pub fn exit_fallocate(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

/// The start of `struct iocb` (x86_64, little-endian), up to `aio_offset`.
#[repr(C)]
#[derive(Clone, Copy)]
struct IocbHead {
    data: u64,
    /// `aio_key` and `aio_rw_flags`.
    key: u64,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
}

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;

/// io_submit(ctx, nr, iocbpp): each iocb that reads or writes a followed fd becomes an event
/// now, with the request's length (one buffer) or -1 (an iovec array, which gives it).
#[tracepoint]
pub fn enter_io_submit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !candidate(tgid) {
        return 0;
    }
    let nr = arg(&ctx, 1) as i64;
    let list = arg(&ctx, 2);
    if nr > i64::from(MAX_AIO_BATCH) {
        drop_events(
            SyscallDrop::AioOverflow,
            (nr - i64::from(MAX_AIO_BATCH)) as u64,
        );
    }
    for i in 0..MAX_AIO_BATCH {
        if i64::from(i) >= nr {
            break;
        }
        // SAFETY: bpf_probe_read_user checks the access; a bad pointer is an error.
        let Ok(at) = (unsafe { bpf_probe_read_user((list + 8 * u64::from(i)) as *const u64) })
        else {
            drop_event(SyscallDrop::ReadArgs);
            continue;
        };
        // SAFETY: as above.
        let Ok(cb) = (unsafe { bpf_probe_read_user(at as *const IocbHead) }) else {
            drop_event(SyscallDrop::ReadArgs);
            continue;
        };
        let (kind, shape, ret) = match cb.opcode {
            IOCB_CMD_PREAD => (IoKind::AioRead, CallShape::Buffer, cb.nbytes as i64),
            IOCB_CMD_PWRITE => (IoKind::AioWrite, CallShape::Buffer, cb.nbytes as i64),
            IOCB_CMD_PREADV => (IoKind::AioRead, CallShape::Vector, -1),
            IOCB_CMD_PWRITEV => (IoKind::AioWrite, CallShape::Vector, -1),
            _ => continue,
        };
        if !followed(tgid, cb.fildes) {
            continue;
        }
        let call = PendingCall {
            kind: kind as u32,
            shape: shape as u32,
            fd: cb.fildes,
            reserved: 0,
            ptr: cb.buf,
            len: cb.nbytes,
            offset: cb.offset as u64,
        };
        record(pid_tgid, &call, ret);
    }
    0
}

/// ioctl(fd, BLKDISCARD | BLKSECDISCARD | BLKZEROOUT, &[start, len]) on a followed block
/// device: the range changes. Recorded at entry (the range is taken as changed whether or not
/// the call succeeds: an entry dropped for nothing costs less than one kept wrongly).
#[tracepoint]
pub fn enter_blk_ioctl(ctx: TracePointContext) -> u32 {
    let cmd = arg(&ctx, 1);
    if !matches!(cmd, BLKDISCARD | BLKSECDISCARD | BLKZEROOUT) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let fd = arg(&ctx, 0) as u32;
    if !candidate(tgid) || !followed(tgid, fd) {
        return 0;
    }
    // SAFETY: bpf_probe_read_user checks the access; a bad pointer is an error.
    let Ok(range) = (unsafe { bpf_probe_read_user(arg(&ctx, 2) as *const [u64; 2]) }) else {
        drop_event(SyscallDrop::ReadArgs);
        return 0;
    };
    let call = PendingCall {
        kind: IoKind::BlockDiscard as u32,
        shape: CallShape::Range as u32,
        fd,
        reserved: 0,
        ptr: cmd,
        len: range[1],
        offset: range[0],
    };
    record(pid_tgid, &call, 0);
    0
}
