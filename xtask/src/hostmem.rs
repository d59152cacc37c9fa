//! What a migration target's first touch of its guest RAM costs on this machine, for the
//! migration benchmark.
//!
//! This machine is itself a VM whose balloon driver reports freed memory back to its
//! hypervisor (virtio-balloon free page reporting, from about two seconds after it is freed).
//! A page handed out again afterwards faults in the hypervisor too on its first touch, which
//! makes zeroing it many times slower than zeroing memory the VM holds. A target QEMU with on-demand
//! guest RAM zeroes every page it loads at first touch, so which kind of memory it gets decides
//! much of its CPU time. A bare-metal hypervisor host has no such second level.
use std::time::{Duration, Instant};

use anyhow::Context;

/// The virtio feature bit of free page reporting (VIRTIO_BALLOON_F_REPORTING).
const F_REPORTING: usize = 5;
/// The guest-page granule touched: one write per page, as a loading QEMU's first write is.
const PAGE: usize = 4096;

/// Whether a virtio balloon with free page reporting is bound on this machine.
pub fn reports_free_pages() -> bool {
    let Ok(devices) = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon") else {
        return false;
    };
    devices.flatten().any(|d| {
        std::fs::read_to_string(d.path().join("features"))
            .is_ok_and(|f| f.as_bytes().get(F_REPORTING) == Some(&b'1'))
    })
}

/// First-touch times of `bytes` of fresh memory, twice in a row.
pub struct Touch {
    /// As the machine hands it out now.
    pub first: Duration,
    /// Right after the first was freed, so before the balloon can report it.
    pub again: Duration,
}

/// Touches `bytes` of fresh memory, frees it and touches it again. Afterwards, for about two
/// seconds, the next allocations on this machine get memory its hypervisor backs, like a
/// bare-metal host's (the benchmark's "target host memory warm" runs).
pub fn warm(bytes: usize) -> anyhow::Result<Touch> {
    Ok(Touch {
        first: touch(bytes)?,
        again: touch(bytes)?,
    })
}

/// Maps `bytes` anonymous memory advised for transparent huge pages (as QEMU advises guest
/// RAM), writes one byte per page, unmaps it and returns how long the writes took.
fn touch(bytes: usize) -> anyhow::Result<Duration> {
    // SAFETY: a fresh private anonymous mapping, written only within its length and unmapped
    // before returning; nothing else refers to it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping memory to touch");
        }
        libc::madvise(p, bytes, libc::MADV_HUGEPAGE);
        let base = p.cast::<u8>();
        let start = Instant::now();
        for off in (0..bytes).step_by(PAGE) {
            base.add(off).write_volatile(1);
        }
        let took = start.elapsed();
        libc::munmap(p, bytes);
        Ok(took)
    }
}
