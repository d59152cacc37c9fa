//! Shared helpers for the end-to-end tests in `testkit/tests/`: privilege checks that fail loudly
//! instead of skipping silently, and real I/O generators. Tests that boot guests hold
//! [`qemu::exclusive`], which also arms a [`watchdog`]: a hung test aborts with a report of what
//! it waited on instead of running into CI's limit.
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

pub mod follower;
pub mod nbd_fixture;
pub mod plain;
pub mod qemu;
pub mod roundtrip;
pub mod tls;
pub mod watchdog;

/// Fails with a clear reason when `tool` is not on PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed; run `cargo xtask setup` (it installs qemu-utils, libnbd-bin, \
         nbdkit and QEMU)"
    );
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("a bound address").port()
}

/// A child process killed on drop, so a failed assertion leaves nothing running behind it.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh scratch directory under the test target dir, removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nas-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }

    /// A sparse file of `size` bytes.
    pub fn image(&self, name: &str, size: u64) -> std::path::PathBuf {
        let path = self.path(name);
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create image");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// qemu-nbd serving `image` raw as export `disk` on a free loopback port, persistent (`-t`),
/// with `extra` flags; the running server and its port, once it accepts connections.
pub fn qemu_nbd(image: &Path, extra: &[&str]) -> (Running, u16) {
    let port = free_port();
    let server = spawn_qemu_nbd(
        image,
        &["-b", "127.0.0.1", "-p", &port.to_string()],
        extra,
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    (server, port)
}

/// qemu-nbd serving `image` raw as export `disk` on the unix socket `socket`, persistent,
/// once it accepts connections.
pub fn qemu_nbd_unix(image: &Path, socket: &Path) -> Running {
    let path = socket.display().to_string();
    spawn_qemu_nbd(image, &["-k", &path], &[], || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    })
}

fn spawn_qemu_nbd(
    image: &Path,
    listen: &[&str],
    extra: &[&str],
    ready: impl Fn() -> bool,
) -> Running {
    require_tool("qemu-nbd");
    let server = Running(
        std::process::Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-x", "disk"])
            .args(listen)
            .args(extra)
            .arg(image)
            .spawn()
            .expect("start qemu-nbd"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server
}
