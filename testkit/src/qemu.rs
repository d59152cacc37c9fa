//! Real QEMU guests for the end-to-end tests: the project's own guest image (built by
//! `cargo xtask guest-image`: Debian's kernel and a busybox initramfs) booted under TCG on an
//! NBD disk, with a QMP socket and a serial log to read heartbeats from.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent::qmp::Qmp;

use crate::{
    nbd_fixture::{ExportConf, NbdFixture},
    watchdog::Watchdog,
    Scratch,
};

/// `target/guest`, where `cargo xtask guest-image` puts the kernel and initramfs.
pub fn image_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest")
}

/// A running guest; killed on drop.
pub struct Guest {
    pub name: String,
    pub qmp_path: PathBuf,
    /// A second QMP monitor: the operator's (or libvirt's), beside the one `agent migrate`
    /// holds (QEMU serves one client per monitor).
    pub operator_qmp_path: PathBuf,
    /// A third monitor, the target agent's: `NAME.qmp` in [`agent_qmp_dir`] of the guest's
    /// directory, where `agent serve --qmp-dir` finds the VM by name.
    pub agent_qmp_path: PathBuf,
    pub serial_path: PathBuf,
    /// The second serial port's socket, with [`GuestSpec::fill_gate`].
    gate_path: Option<PathBuf>,
    child: Child,
}

/// How to start a guest. `..GuestSpec::default()` leaves out what a plain guest does not do
/// (disk writes, a paused or incoming start, preallocation, another QEMU, an I/O thread,
/// filling or dirtying memory).
#[derive(Default)]
pub struct GuestSpec<'a> {
    pub name: &'a str,
    pub mem_mb: u32,
    pub read_mb: u32,
    pub disk_uri: &'a str,
    pub disk_writes: bool,
    /// Start with `-incoming defer` (a migration target).
    pub incoming: bool,
    /// Start with `-S`, as libvirt starts every QEMU, migration targets included: a target
    /// then stays paused after loading the stream until told `cont`.
    pub paused: bool,
    /// Allocate all guest RAM at start-up (`-mem-prealloc`; libvirt's
    /// `<allocation mode='immediate'/>`) instead of on first touch.
    pub prealloc: bool,
    /// Another QEMU binary (e.g. [`qemu72_binary`]) instead of the installed one.
    pub qemu: Option<&'a Path>,
    /// Serve the disk from an I/O thread (`-object iothread`, virtio-blk on it): its requests
    /// and replies may then be handled by other threads than the main loop's.
    pub iothread: bool,
    /// After reading, drop the page cache and fill this many MiB of memory with random data.
    pub fill_mb: u32,
    /// Hold that until [`Guest::release_fill`]: the guest prints `QEVAL-FILL-WAIT` and waits.
    pub fill_gate: bool,
    /// Then keep dirtying about this many MiB of memory a second (at most 48).
    pub dirty_mb: u32,
    /// Open a file disk with `aio=native,cache.direct=on` (io_submit on an O_DIRECT fd)
    /// instead of QEMU's thread pool.
    pub native_aio: bool,
    /// Mount the disk as ext4 (read-only) and read its `file-*` files instead of `read_mb` of
    /// the raw device (`xtask::lab::files_image` makes such a disk).
    pub fs_read: bool,
}

/// The directory of the target agent's QMP sockets for guests started in `dir` (`--qmp-dir`):
/// created private, as the agent requires of it.
pub fn agent_qmp_dir(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = dir.join("agent-qmp");
    std::fs::create_dir_all(&d).expect("create the agent's QMP directory");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).expect("chmod 0700");
    d
}

/// Debian bookworm's QEMU 7.2, unpacked by `cargo xtask test` (or `xtask::guest::qemu72`).
pub fn qemu72_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/qemu-7.2/usr/bin/qemu-system-x86_64")
}

/// A `qemu-system-x86_64` command: the installed one, or an unpacked `binary` (QEMU 7.2) set up
/// to find its modules and firmware. Panics with the reason when the binary is missing.
pub fn qemu_command(binary: Option<&Path>) -> Command {
    let Some(binary) = binary else {
        crate::require_tool("qemu-system-x86_64");
        return Command::new("qemu-system-x86_64");
    };
    assert!(
        binary.is_file(),
        "{} is missing: `cargo xtask test` unpacks it",
        binary.display()
    );
    let mut cmd = Command::new(binary);
    // An unpacked QEMU loads its accelerator modules from beside it, not from /usr.
    if let Some(prefix) = binary.parent().and_then(Path::parent) {
        cmd.env("QEMU_MODULE_DIR", prefix.join("lib/x86_64-linux-gnu/qemu"));
    }
    // ... and finds its firmware where the installed QEMU's packages put it.
    cmd.args(["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"]);
    cmd
}

/// A KVM QEMU with no guest, paused at start (`-S`), its monitor at `qmp`; `accel` is the
/// `-accel` value (`kvm,dirty-ring-size=4096`). No full guest boots under this machine kind's
/// nested KVM, but the firmware runs, and with dirty logging on it dirties memory.
pub fn kvm_qemu(qmp: &Path, accel: &str) -> crate::Running {
    std::fs::remove_file(qmp).ok();
    let child = qemu_command(None)
        .args(["-accel", accel, "-m", "256"])
        .args(["-nodefaults", "-display", "none", "-S", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    crate::Running(child)
}

/// The monitor at `path`, once QEMU opened it (within 5 s), else the last failure.
pub async fn qmp_when_up(path: &Path) -> Result<Qmp, agent::qmp::QmpError> {
    let mut tries = 100;
    loop {
        match Qmp::connect(path).await {
            Err(_) if tries > 0 => tries -= 1,
            done => return done,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Guest {
    pub fn start(dir: &Path, spec: &GuestSpec) -> Guest {
        let images = image_dir();
        let (kernel, initrd) = (images.join("vmlinuz"), images.join("initramfs.cpio.gz"));
        assert!(
            kernel.is_file() && initrd.is_file(),
            "the guest image is missing in {}: run `cargo xtask guest-image` (cargo xtask test \
             builds it)",
            images.display()
        );
        let qmp_path = dir.join(format!("{}.qmp", spec.name));
        let operator_qmp_path = dir.join(format!("{}-operator.qmp", spec.name));
        let serial_path = dir.join(format!("{}.serial", spec.name));
        std::fs::remove_file(&qmp_path).ok();
        std::fs::remove_file(&operator_qmp_path).ok();
        let agent_qmp_path = agent_qmp_dir(dir).join(format!("{}.qmp", spec.name));
        std::fs::remove_file(&agent_qmp_path).ok();
        std::fs::write(&serial_path, b"").unwrap();
        let mut cmd = qemu_command(spec.qemu);
        cmd.args([
            "-name", spec.name, "-accel", "tcg", "-machine", "pc", "-smp", "1",
        ])
        .args(["-m", &spec.mem_mb.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 readmb={} diskwrite={} fillmb={} fillgate={} \
             dirtymb={} fsread={}",
            spec.read_mb,
            u8::from(spec.disk_writes),
            spec.fill_mb,
            u8::from(spec.fill_gate),
            spec.dirty_mb,
            u8::from(spec.fs_read)
        ))
        .args(if spec.iothread {
            vec![
                "-object".to_string(),
                "iothread,id=io0".to_string(),
                "-drive".to_string(),
                format!("file={},format=raw,if=none,id=d0", spec.disk_uri),
                "-device".to_string(),
                "virtio-blk-pci,drive=d0,iothread=io0".to_string(),
            ]
        } else {
            vec![
                "-drive".to_string(),
                format!(
                    "file={},format=raw,if=virtio{}",
                    spec.disk_uri,
                    if spec.native_aio {
                        ",aio=native,cache.direct=on"
                    } else {
                        ""
                    }
                ),
            ]
        })
        .arg("-serial")
        .arg(format!("file:{}", serial_path.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            operator_qmp_path.display()
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            agent_qmp_path.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if spec.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        if spec.paused {
            cmd.arg("-S");
        }
        if spec.prealloc {
            cmd.arg("-mem-prealloc");
        }
        let gate_path = spec
            .fill_gate
            .then(|| dir.join(format!("{}-gate.sock", spec.name)));
        if let Some(gate) = &gate_path {
            std::fs::remove_file(gate).ok();
            // A second ISA serial port (the guest's ttyS1), fed from a socket.
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=gate,path={},server=on,wait=off",
                    gate.display()
                ))
                .args(["-device", "isa-serial,chardev=gate"]);
        }
        let child = cmd.spawn().expect("start qemu-system-x86_64");
        let guest = Guest {
            name: spec.name.to_string(),
            qmp_path,
            operator_qmp_path,
            agent_qmp_path,
            serial_path,
            gate_path,
            child,
        };
        guest.wait_for_file(&guest.qmp_path, Duration::from_secs(30));
        guest.wait_for_file(&guest.operator_qmp_path, Duration::from_secs(30));
        guest
    }

    fn wait_for_file(&self, path: &Path, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{}: {} never appeared",
                self.name,
                path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The serial log so far, complete lines only (the guest may be mid-line).
    pub fn serial(&self) -> String {
        let mut log = std::fs::read_to_string(&self.serial_path).unwrap_or_default();
        log.truncate(log.rfind('\n').map_or(0, |i| i + 1));
        log
    }

    /// Waits until a serial line starts with `prefix` and has appeared more than `after`
    /// times; returns that line, or `None` after `limit`.
    pub fn try_wait_line(&self, prefix: &str, after: usize, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.serial();
            if let Some(line) = log.lines().filter(|l| l.starts_with(prefix)).nth(after) {
                return Some(line.to_string());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Guest::try_wait_line`], failing the test with the serial log on time-out.
    pub fn wait_line(&self, prefix: &str, after: usize, limit: Duration) -> String {
        self.try_wait_line(prefix, after, limit).unwrap_or_else(|| {
            panic!(
                "{}: no {prefix:?} line #{after} within {limit:?}; serial log:\n{}",
                self.name,
                self.serial()
            )
        })
    }

    /// Lets a guest started with [`GuestSpec::fill_gate`] drop its page cache and fill its
    /// memory, and waits until it did.
    pub fn release_fill(&self) {
        use std::io::Write;
        let gate = self
            .gate_path
            .as_ref()
            .expect("the guest was started with fill_gate");
        self.wait_line("QEVAL-FILL-WAIT", 0, Duration::from_secs(240));
        let mut s = std::os::unix::net::UnixStream::connect(gate).expect("connect the gate");
        s.write_all(b"go\n").expect("write to the gate");
        // Held open until the guest took the line.
        self.wait_line("QEVAL-FILLED", 0, Duration::from_secs(240));
    }

    /// The last heartbeat number printed.
    pub fn heartbeat(&self) -> Option<u64> {
        self.serial()
            .lines()
            .rev()
            .filter_map(|l| l.strip_prefix("QEVAL-HEARTBEAT "))
            .find_map(|n| n.trim().parse().ok())
    }

    /// Waits for two more heartbeats than printed so far: the guest runs (panics otherwise).
    pub fn assert_runs_on(&self) {
        let before = self.heartbeat().expect("the guest printed a heartbeat");
        self.wait_line(
            "QEVAL-HEARTBEAT",
            before as usize + 2,
            Duration::from_secs(60),
        );
    }

    /// Every blob checksum the guest printed, in order.
    pub fn blob_sums(&self) -> Vec<String> {
        self.serial()
            .lines()
            .filter_map(|l| l.strip_prefix("QEVAL-BLOB "))
            .map(|s| s.trim().to_string())
            .collect()
    }

    pub async fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path).await.expect("QMP connect")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Records the migration stream of a machine that never ran (`-S`): small (firmware pages,
/// zero pages, every device's state), so a test can afford to split it at every size.
pub async fn record_paused_stream(dir: &Path, path: &Path, qemu: Option<&Path>) {
    let qmp_path = dir.join("paused.qmp");
    std::fs::remove_file(&qmp_path).ok();
    let mut child = qemu_command(qemu)
        .args(["-S", "-accel", "tcg", "-machine", "pc", "-m", "32"])
        .args(["-nodefaults", "-display", "none", "-vga", "std"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qmp_path.exists() {
        assert!(
            Instant::now() < deadline,
            "QEMU's QMP socket never appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "QEMU exited before serving QMP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut qmp = Qmp::connect(&qmp_path).await.expect("QMP");
    migrate_to_file(&mut qmp, path).await;
    child.kill().ok();
    child.wait().ok();
}

/// Migrates the machine behind `qmp` into the file `path` and waits for completion.
async fn migrate_to_file(qmp: &mut Qmp, path: &Path) {
    qmp.execute(
        "migrate",
        Some(serde_json::json!({ "uri": format!("exec:cat > {}", path.display()) })),
    )
    .await
    .expect("migrate to a file");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = qmp
            .execute("query-migrate", None)
            .await
            .expect("query-migrate");
        match info["status"].as_str() {
            Some("completed") => break,
            Some("failed") => panic!("recording migration failed: {info}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "recording did not finish: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Boots a guest on `disk_uri` (with `qemu`, or the installed QEMU), lets it read `read_mb`,
/// and records its migration stream into `path` with `migrate exec:cat`.
pub async fn record_stream(
    dir: &Path,
    disk_uri: &str,
    mem_mb: u32,
    read_mb: u32,
    path: &Path,
    qemu: Option<&Path>,
) {
    let guest = Guest::start(
        dir,
        &GuestSpec {
            name: "recorder",
            mem_mb,
            read_mb,
            disk_uri,
            disk_writes: false,
            incoming: false,
            paused: false,
            prealloc: false,
            qemu,
            iothread: false,
            fill_mb: 0,
            fill_gate: false,
            dirty_mb: 0,
            native_aio: false,
            fs_read: false,
        },
    );
    guest.wait_line("QEVAL-READY", 0, Duration::from_secs(120));
    let mut qmp = guest.qmp().await;
    migrate_to_file(&mut qmp, path).await;
}

/// Whether `target` carried on from `source` after a migration: it prints heartbeats past the
/// source's last one, and every RAM checksum it prints equals `blob`, the source's.
pub fn carried_on(source: &Guest, target: &Guest, blob: &str) -> Result<(), String> {
    let last = source.heartbeat().unwrap_or(0);
    let line = target
        .try_wait_line("QEVAL-HEARTBEAT", 1, Duration::from_secs(120))
        .ok_or("the target guest prints no heartbeat")?;
    let n: u64 = line
        .trim_start_matches("QEVAL-HEARTBEAT ")
        .trim()
        .parse()
        .map_err(|_| format!("unreadable heartbeat line {line:?}"))?;
    if n <= last {
        return Err(format!(
            "target heartbeat {n} does not continue the source's {last}"
        ));
    }
    target
        .try_wait_line("QEVAL-BLOB", 0, Duration::from_secs(60))
        .ok_or("the target guest prints no RAM checksum")?;
    let sums = target.blob_sums();
    if sums.iter().any(|b| b != blob) {
        return Err(format!("RAM checksum changed: {sums:?}, expected {blob}"));
    }
    Ok(())
}

/// Held by a test that boots guests; see [`exclusive`].
pub struct Exclusive {
    _watchdog: Watchdog,
    _lock: std::sync::MutexGuard<'static, ()>,
}

/// Serialises tests that boot guests: TCG guests are CPU-bound and the machine has two cores.
/// Once the lock is taken, a [`Watchdog`] aborts the test binary, with a report, if the test
/// still holds it past the watchdog's limit.
pub fn exclusive() -> Exclusive {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let lock = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Exclusive {
        _watchdog: Watchdog::arm(),
        _lock: lock,
    }
}

/// A live-migration setup: a nas-server (in process) exporting a 256 MiB patterned disk as
/// `disk`, a source guest that has read `read_mb` MiB of it, and a target QEMU on the same disk
/// waiting for the migration (`-incoming defer`), all under one scratch directory.
pub struct Pair {
    pub dir: Scratch,
    /// `None` once a test has stopped it.
    pub server: Option<NbdFixture>,
    pub source: Guest,
    pub target: Guest,
    /// The source guest's RAM checksum, which the target must go on printing.
    pub blob: String,
}

impl Pair {
    /// `disk_writes`: the guests keep writing their disk; `target_prealloc`: the target QEMU
    /// allocates its guest RAM at start-up (`-mem-prealloc`).
    pub fn start(
        tag: &str,
        mem_mb: u32,
        read_mb: u32,
        disk_writes: bool,
        target_prealloc: bool,
    ) -> Pair {
        Self::start_with(tag, mem_mb, read_mb, disk_writes, target_prealloc, false)
    }

    /// [`Pair::start`] with a target QEMU started with `-S`, as libvirt starts one.
    pub fn start_with_paused_target(tag: &str, mem_mb: u32, read_mb: u32) -> Pair {
        Self::start_with(tag, mem_mb, read_mb, false, false, true)
    }

    fn start_with(
        tag: &str,
        mem_mb: u32,
        read_mb: u32,
        disk_writes: bool,
        target_prealloc: bool,
        target_paused: bool,
    ) -> Pair {
        let dir = Scratch::new(tag);
        let disk = dir.path("disk.raw");
        std::fs::write(&disk, crate::pattern(21, 256 << 20)).unwrap();
        // On the host disk before any guest boots: QEMU flushes its disk while the guest is
        // stopped, and writing a fresh image back would otherwise count in the pause.
        std::fs::File::open(&disk).unwrap().sync_all().unwrap();
        let server = NbdFixture::start_with(
            &[ExportConf {
                name: "disk",
                path: &disk,
                read_only: false,
                shared: false,
            }],
            262_144,
        );
        let uri = server.uri("disk");
        let spec = |name, incoming, prealloc| GuestSpec {
            name,
            mem_mb,
            read_mb,
            disk_uri: &uri,
            disk_writes,
            incoming,
            paused: incoming && target_paused,
            prealloc,
            qemu: None,
            iothread: false,
            fill_mb: 0,
            fill_gate: false,
            dirty_mb: 0,
            native_aio: false,
            fs_read: false,
        };
        let source = Guest::start(&dir.0, &spec("source", false, false));
        source.wait_line("QEVAL-READY", 0, Duration::from_secs(180));
        let blob = source.blob_sums()[0].clone();
        let target = Guest::start(&dir.0, &spec("target", true, target_prealloc));
        Pair {
            dir,
            server: Some(server),
            source,
            target,
            blob,
        }
    }
}
