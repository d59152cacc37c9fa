//! eBPF programs of the agent: kernel-side telemetry on guests' disk I/O.
//!
//! [`syscalls`] follows QEMU's own I/O syscalls for the (process, fd) pairs user space names,
//! into a ring buffer of events; [`dirty`] follows the pages KVM's dirty ring reports for the
//! processes user space names, into a bounded dirty set and hot-page counts; below, the
//! block-layer counter.
//!
//! `block_rq_issue` runs on the `block:block_rq_issue` tracepoint and counts requests and bytes
//! per (device, process) into `IO_COUNTS`. Events that cannot be counted are never lost
//! silently: they are tallied in `IO_DROPS`, which the agent exports. Field offsets of the
//! tracepoint record are not hard-coded; the agent reads them from tracefs and patches the
//! globals below before loading.
#![no_std]
#![no_main]
// The slot claim in `syscalls` is a compare-and-swap, which the BPF target has (BPF_CMPXCHG)
// but core's atomics do not offer there.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod dirty;
mod syscalls;

use agent_common::{IoCount, IoDrop, IoKey, IO_COUNTS_CAPACITY};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};
use aya_log_ebpf::debug;

/// Offset of `dev` in the record; patched by the loader from the tracepoint's format file.
#[no_mangle]
static RQ_DEV_OFFSET: u32 = 8;
/// Offset of `bytes` in the record; patched likewise.
#[no_mangle]
static RQ_BYTES_OFFSET: u32 = 28;

#[map]
static IO_COUNTS: PerCpuHashMap<IoKey, IoCount> =
    PerCpuHashMap::with_max_entries(IO_COUNTS_CAPACITY, 0);

#[map]
static IO_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(IoDrop::COUNT, 0);

#[tracepoint]
pub fn block_rq_issue(ctx: TracePointContext) -> u32 {
    match try_block_rq_issue(&ctx) {
        Ok(()) => 0,
        Err(drop) => {
            count_drop(drop);
            0
        }
    }
}

fn try_block_rq_issue(ctx: &TracePointContext) -> Result<(), IoDrop> {
    // SAFETY: the globals are plain u32s; read_volatile keeps the compiler from folding the
    // defaults in, so the loader's patched values are the ones used.
    let (dev_off, bytes_off) = unsafe {
        (
            core::ptr::read_volatile(&RQ_DEV_OFFSET),
            core::ptr::read_volatile(&RQ_BYTES_OFFSET),
        )
    };
    // SAFETY: read_at goes through bpf_probe_read, which checks the access.
    let dev: u32 = unsafe { ctx.read_at(dev_off as usize) }.map_err(|_| IoDrop::ReadFailed)?;
    let bytes: u32 = unsafe { ctx.read_at(bytes_off as usize) }.map_err(|_| IoDrop::ReadFailed)?;
    let key = IoKey {
        dev,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
    };
    if add_to_existing(&key, bytes) {
        return Ok(());
    }
    let first = IoCount {
        requests: 1,
        bytes: u64::from(bytes),
    };
    if IO_COUNTS
        .insert(key, first, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU may have created the key between the lookup and the insert.
        return if add_to_existing(&key, bytes) {
            Ok(())
        } else {
            Err(IoDrop::MapFull)
        };
    }
    debug!(
        ctx,
        "block: first request from pid {} on dev {}:{}",
        key.tgid,
        dev >> 20,
        dev & 0xfffff
    );
    Ok(())
}

fn add_to_existing(key: &IoKey, bytes: u32) -> bool {
    match IO_COUNTS.get_ptr_mut(key) {
        Some(count) => {
            // SAFETY: per-CPU value: no other CPU writes it and this program is not preempted.
            unsafe {
                (*count).requests += 1;
                (*count).bytes += u64::from(bytes);
            }
            true
        }
        None => false,
    }
}

fn count_drop(drop: IoDrop) {
    if let Some(slot) = IO_DROPS.get_ptr_mut(drop as u32) {
        // SAFETY: per-CPU slot, see above.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
