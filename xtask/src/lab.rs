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
    Ok(Daemon(
        Command::new(release_bin("nas-server"))
            .args(["--listen", &format!("127.0.0.1:{nbd}")])
            .args(["--index-listen", &format!("127.0.0.1:{index}")])
            .arg("--export")
            .arg(format!("disk={}", disk.display()))
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(dir.join("nas-server.log"))?)
            .spawn()
            .context("cannot start nas-server")?,
    ))
}

/// nas-server serving a 256 MiB disk of pseudo-random data, and `agent serve`.
pub struct Lab {
    nas: Daemon,
    agent: Daemon,
    pub disk: PathBuf,
}

impl Lab {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let disk = dir.join("disk.raw");
        std::fs::write(&disk, testkit::pattern(2026, 256 << 20))?;
        // On disk before any guest boots: otherwise the first migration's pause includes the
        // host writing the fresh image back (QEMU flushes the disk while the guest is stopped,
        // and nas-server turns that into a sync), and whichever method runs first pays for it.
        std::fs::File::open(&disk)?.sync_all()?;
        let nas = nas_server(dir, &disk, NBD_PORT, INDEX_PORT)?;
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
        format!("nbd://127.0.0.1:{NBD_PORT}/disk")
    }
}

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
        };
        let (source_name, target_name) = (format!("{tag}-source"), format!("{tag}-target"));
        let source = Guest::start(dir, &spec(&source_name, false));
        source.wait_line("QEVAL-READY", 0, Duration::from_secs(300));
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
/// `127.0.0.1:target_port`, with the lab's NAS and `args` added; its JSON report.
pub fn agent_migrate(pair: &Pair, target_port: u16, args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(release_bin("agent"))
        .arg("migrate")
        .args(args)
        .arg("--source-qmp")
        .arg(&pair.source.qmp_path)
        .arg("--target-qmp")
        .arg(&pair.target.qmp_path)
        .args(["--target-agent", &format!("127.0.0.1:{target_port}")])
        .args(["--export", "disk"])
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
