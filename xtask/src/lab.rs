//! The pieces the demo and the migration benchmark share: a running nas-server and target
//! agent on loopback, pairs of TCG guests, and a plain QEMU-to-QEMU migration.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use agent::qmp::{guest_pause, last_event_time};
use anyhow::{bail, Context};
use serde_json::Value;
use testkit::qemu::{Guest, GuestSpec};

use crate::sh;

pub const NBD_PORT: u16 = 10_909;
pub const INDEX_PORT: u16 = 10_910;
pub const AGENT_PORT: u16 = 17_800;

/// A child process killed when dropped.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// A release binary of the workspace.
pub fn release_bin(name: &str) -> PathBuf {
    sh::workspace_root().join("target/release").join(name)
}

/// The release nas-server exporting `disk` as `disk` on loopback, logging into `dir`.
pub fn nas_server(dir: &Path, disk: &Path, nbd: u16, index: u16) -> anyhow::Result<Daemon> {
    nas_server_exports(dir, &[("disk", disk)], nbd, index)
}

/// The release nas-server exporting each image under its name.
fn nas_server_exports(
    dir: &Path,
    exports: &[(&str, &Path)],
    nbd: u16,
    index: u16,
) -> anyhow::Result<Daemon> {
    let mut server = Command::new(release_bin("nas-server"));
    server
        .args(["--listen", &format!("127.0.0.1:{nbd}")])
        .args(["--index-listen", &format!("127.0.0.1:{index}")]);
    for (name, image) in exports {
        server
            .arg("--export")
            .arg(format!("{name}={}", image.display()));
    }
    Ok(Daemon(
        server
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(dir.join("nas-server.log"))?)
            .spawn()
            .context("cannot start nas-server")?,
    ))
}

/// The export holding [`files_image`], when the lab has it.
pub const FILES_EXPORT: &str = "files";

/// nas-server serving a 256 MiB disk of pseudo-random data (and with
/// [`Lab::start_with_files`] an ext4 disk of files), and `agent serve`.
pub struct Lab {
    nas: Daemon,
    agent: Daemon,
    pub disk: PathBuf,
}

impl Lab {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with_files(dir, false)
    }

    /// With `files`, nas-server also exports [`files_image`] as [`FILES_EXPORT`].
    pub fn start_with_files(dir: &Path, files: bool) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let disk = dir.join("disk.raw");
        std::fs::write(&disk, testkit::pattern(2026, 256 << 20))?;
        // On disk before any guest boots: otherwise the first migration's pause includes the
        // host writing the fresh image back (QEMU flushes the disk while the guest is stopped,
        // and nas-server turns that into a sync), and whichever method runs first pays for it.
        std::fs::File::open(&disk)?.sync_all()?;
        let files_disk = dir.join("files.raw");
        let mut exports = vec![("disk", disk.as_path())];
        if files {
            files_image(dir, &files_disk)?;
            exports.push((FILES_EXPORT, &files_disk));
        }
        let nas = nas_server_exports(dir, &exports, NBD_PORT, INDEX_PORT)?;
        let agent = Daemon(
            Command::new(release_bin("agent"))
                // Plaintext, as plain QEMU's migration it is compared with (`bench pipeline`
                // measures what TLS costs).
                .args([
                    "serve",
                    "--insecure",
                    "--link-listen",
                    &format!("127.0.0.1:{AGENT_PORT}"),
                ])
                // The lab's target QEMUs, found by name (`agent migrate --vm` defaults to
                // the target QMP socket's name).
                .arg("--qmp-dir")
                .arg(testkit::qemu::agent_qmp_dir(dir))
                .stderr(std::fs::File::create(dir.join("agent-serve.log"))?)
                .spawn()
                .context("cannot start agent serve")?,
        );
        for port in [NBD_PORT, INDEX_PORT, AGENT_PORT] {
            wait_port(port)?;
        }
        Ok(Self { nas, agent, disk })
    }

    /// Process ids of nas-server and of the target-side `agent serve`.
    pub fn pids(&self) -> (u32, u32) {
        (self.nas.0.id(), self.agent.0.id())
    }

    pub fn disk_uri(&self) -> String {
        export_uri("disk")
    }
}

/// The lab's NBD URI of `export`.
pub fn export_uri(export: &str) -> String {
    format!("nbd://127.0.0.1:{NBD_PORT}/{export}")
}

/// Files in the guest's disk: a 256 MiB ext4 image at `image` (`mkfs.ext4`'s defaults, 4 KiB
/// blocks) holding 50 files of 4 MiB, each of its own pseudo-random content, synced before
/// any guest boots. Made by `mkfs.ext4 -d` from a directory under `dir`, which is removed
/// after.
pub fn files_image(dir: &Path, image: &Path) -> anyhow::Result<()> {
    let tree = dir.join("files-tree");
    std::fs::create_dir_all(&tree)?;
    for n in 0..FILES {
        std::fs::write(
            tree.join(format!("file-{n:02}")),
            testkit::pattern(3000 + n, FILE_MIB << 20),
        )?;
    }
    sh::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-d"])
            .arg(&tree)
            .arg(image)
            .arg("256M"),
    )
    .context("mkfs.ext4 (e2fsprogs) could not make the files image: run `cargo xtask setup`")?;
    std::fs::remove_dir_all(&tree)?;
    std::fs::File::open(image)?.sync_all()?;
    Ok(())
}

/// [`files_image`]'s files: 200 MiB, as much as the reference workload reads of its disk.
const FILES: u64 = 50;
const FILE_MIB: usize = 4;

/// What the source guest does before and during its migration.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    /// MiB of its disk read into its page cache.
    pub read_mb: u32,
    /// MiB of random data written to its tmpfs (anonymous memory no disk holds).
    pub fill_mb: u32,
    /// Rewrites disk blocks every second, through the migration.
    pub disk_writes: bool,
    /// MiB of memory dirtied each second, through the migration (at most 48).
    pub dirty_mb: u32,
    /// Its disk is [`files_image`]: it mounts it and reads the files instead of `read_mb`.
    pub fs_read: bool,
}

/// A source guest that has read its disk, and a target waiting for it.
pub struct Pair {
    pub source: Guest,
    pub target: Guest,
    blob: String,
}

impl Pair {
    /// `target_prealloc`: the target allocates its guest RAM at start-up (`-mem-prealloc`).
    pub fn boot(
        dir: &Path,
        tag: &str,
        uri: &str,
        mem_mb: u32,
        read_mb: u32,
        target_prealloc: bool,
    ) -> anyhow::Result<Self> {
        let load = Load {
            read_mb,
            ..Load::default()
        };
        Self::boot_with(dir, tag, uri, mem_mb, &load, target_prealloc)
    }

    /// As [`Pair::boot`], with the source guest doing `load`.
    pub fn boot_with(
        dir: &Path,
        tag: &str,
        uri: &str,
        mem_mb: u32,
        load: &Load,
        target_prealloc: bool,
    ) -> anyhow::Result<Self> {
        let spec = |name, incoming| GuestSpec {
            name,
            mem_mb,
            read_mb: load.read_mb,
            disk_uri: uri,
            disk_writes: load.disk_writes,
            incoming,
            paused: false,
            prealloc: incoming && target_prealloc,
            qemu: None,
            iothread: false,
            fill_mb: load.fill_mb,
            fill_gate: false,
            dirty_mb: load.dirty_mb,
            native_aio: false,
            fs_read: load.fs_read,
        };
        let (source_name, target_name) = (format!("{tag}-source"), format!("{tag}-target"));
        let source = Guest::start(dir, &spec(&source_name, false));
        source.wait_line("QEVAL-READY", 0, Duration::from_secs(300));
        if load.fs_read {
            let serial = source.serial();
            anyhow::ensure!(
                serial.contains(&format!("QEVAL-FILES-READ {FILES}")),
                "{source_name}: the guest did not read the files of its ext4 disk:\n{serial}"
            );
        }
        let blob = source
            .blob_sums()
            .first()
            .cloned()
            .context("no RAM checksum")?;
        let target = Guest::start(dir, &spec(&target_name, true));
        // QEMU answers QMP once its machine is built (with `-mem-prealloc`, once its RAM is
        // allocated): a migration, and the CPU readings around it, start from a settled target.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async { target.qmp().await.execute("query-status", None).await })
            .context("target QEMU does not answer QMP")?;
        Ok(Self {
            source,
            target,
            blob,
        })
    }

    /// The target's heartbeat continues past the source's and its RAM checksum is unchanged.
    pub fn verify(&self) -> bool {
        match testkit::qemu::carried_on(&self.source, &self.target, &self.blob) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("guest check failed: {e}");
                false
            }
        }
    }
}

/// A finished plain migration.
pub struct PlainMigration {
    /// The source's `query-migrate`.
    pub info: Value,
    /// From the source's STOP event to the target's RESUME event.
    pub guest_paused_ms: Option<u64>,
    /// The source's STOP event (wall clock, since the epoch).
    pub stopped_at: Option<Duration>,
}

/// QEMU to QEMU without the agents, from `source` to `target` (started with `-incoming
/// defer`); `via` maps the target's port to the one the source uses (a relay), if any. Returns
/// once the target runs.
pub async fn plain_migration(
    source: &Guest,
    target: &Guest,
    via: Option<&dyn Fn(u16) -> anyhow::Result<u16>>,
) -> anyhow::Result<PlainMigration> {
    let mut src = source.qmp().await;
    let mut dst = target.qmp().await;
    let relay = via.map(|f| move |port| f(port).map_err(|e| format!("{e:#}")));
    let info = testkit::plain::plain_migrate(
        &mut src,
        &mut dst,
        relay
            .as_ref()
            .map(|f| f as &dyn Fn(u16) -> Result<u16, String>),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let src_events = src.events();
    let guest_paused_ms = guest_pause(&src_events, &dst.events()).map(|d| d.as_millis() as u64);
    Ok(PlainMigration {
        info,
        guest_paused_ms,
        stopped_at: last_event_time(&src_events, "STOP"),
    })
}

/// `agent migrate` from `pair`'s source to its target, through the target agent at
/// `127.0.0.1:target_port`, with the lab's NAS (the guest's disk on `export`) and `args`
/// added; its JSON report.
pub fn agent_migrate(
    pair: &Pair,
    target_port: u16,
    export: &str,
    args: &[&str],
) -> anyhow::Result<Value> {
    let out = Command::new(release_bin("agent"))
        .arg("migrate")
        .args(args)
        .arg("--source-qmp")
        .arg(&pair.source.qmp_path)
        .arg("--target-qmp")
        .arg(&pair.target.qmp_path)
        .args(["--target-agent", &format!("127.0.0.1:{target_port}")])
        .args(["--export", export])
        .args(["--nas-nbd", &format!("127.0.0.1:{NBD_PORT}")])
        .args(["--nas-index", &format!("127.0.0.1:{INDEX_PORT}")])
        .args(["--json", "--insecure"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run agent migrate")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "agent migrate printed no report: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A patterned image of `mib` MiB at `path` (kept when one of that size is already there).
pub fn fill_image(path: &Path, mib: u64) -> anyhow::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == mib << 20) {
        return Ok(());
    }
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(())
}
