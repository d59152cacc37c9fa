//! Shared helpers for the end-to-end tests in `tests/tests/`: privilege checks that fail loudly
//! instead of skipping silently, and real I/O generators.
//!
//! The tests run against real peers: the running kernel (eBPF), real NBD clients and real QEMU
//! guests. A test that cannot run because the machine lacks something fails and says why. The
//! only way to skip the root-only tests is the explicit opt-out `AGENT_TESTS_ALLOW_SKIP_ROOT=1`,
//! which CI never sets.
use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
};

/// The opt-out variable for root-only tests.
pub const SKIP_ROOT_VAR: &str = "AGENT_TESTS_ALLOW_SKIP_ROOT";

/// Returns `true` when the test may proceed as root. Without root it panics with the reason,
/// unless [`SKIP_ROOT_VAR`] is `1`, in which case it prints why it skipped and returns `false`.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    let why = format!(
        "{test} needs root to load eBPF programs (running as uid {euid}); run the suite as root \
         (`sudo cargo xtask test`)"
    );
    if std::env::var(SKIP_ROOT_VAR).as_deref() == Ok("1") {
        eprintln!("SKIPPED by {SKIP_ROOT_VAR}=1: {why}");
        return false;
    }
    panic!("{why}, or set {SKIP_ROOT_VAR}=1 to skip it explicitly");
}

/// A page-aligned buffer, as O_DIRECT requires.
#[repr(C, align(4096))]
pub struct AlignedPage(pub [u8; 4096]);

/// Opens `path` for O_DIRECT writes, creating it.
pub fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Issues `count` synchronous 4 KiB O_DIRECT writes at distinct offsets. Each one waits for its
/// own completion, so the block layer cannot merge them: each becomes at least one request.
pub fn direct_writes(file: &File, count: u64) -> io::Result<()> {
    let mut page = Box::new(AlignedPage([0; 4096]));
    for i in 0..count {
        page.0[..8].copy_from_slice(&i.to_le_bytes());
        file.write_all_at(&page.0, i * 4096)?;
    }
    Ok(())
}
