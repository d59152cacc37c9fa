//! `cargo xtask demo`: the main job end to end on embedded defaults.
//!
//! It builds everything (guest image, eBPF object, release binaries), starts nas-server on a
//! 256 MiB disk and a target agent (`agent serve`), then migrates a 512 MiB TCG guest that read
//! 200 MiB of its disk twice: once plainly (QEMU to QEMU) and once through the agents
//! (`agent migrate`). After each it checks that the target guest carries on (its heartbeat
//! continues and its RAM checksum is unchanged) and prints the comparison.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tests::qemu::{Guest, GuestSpec};

use crate::{ebpf, guest, sh};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also write the comparison as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    mem_mb: u32,
    /// MiB of its disk the guest reads before migrating.
    #[arg(long, default_value_t = 200)]
    read_mb: u32,
}

const NBD_PORT: u16 = 10_909;
const INDEX_PORT: u16 = 10_910;
const AGENT_PORT: u16 = 17_800;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ebpf::build()?;
    guest::build()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "agent", "-p", "nas-server"]))?;
    if !sh::is_root() {
        bail!("the demo runs QEMU guests and the agent, and must run as root");
    }
    let root = sh::workspace_root();
    let dir = root.join("target/xtask/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, tests::pattern(2026, 256 << 20))?;
    let bin = |name: &str| root.join("target/release").join(name);
    let _nas = Daemon(
        Command::new(bin("nas-server"))
            .args(["--listen", &format!("127.0.0.1:{NBD_PORT}")])
            .args(["--index-listen", &format!("127.0.0.1:{INDEX_PORT}")])
            .arg("--export")
            .arg(format!("disk={}", disk.display()))
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(dir.join("nas-server.log"))?)
            .spawn()
            .context("cannot start nas-server")?,
    );
    let _agent = Daemon(
        Command::new(bin("agent"))
            .args(["serve", "--link-listen", &format!("127.0.0.1:{AGENT_PORT}")])
            .stderr(std::fs::File::create(dir.join("agent-serve.log"))?)
            .spawn()
            .context("cannot start agent serve")?,
    );
    wait_port(NBD_PORT)?;
    wait_port(INDEX_PORT)?;
    wait_port(AGENT_PORT)?;
    let uri = format!("nbd://127.0.0.1:{NBD_PORT}/disk");
    let rt = tokio::runtime::Runtime::new()?;

    eprintln!("demo: run 1/2: plain QEMU migration");
    let plain = {
        let pair = Pair::boot(&dir, "plain", &uri, &args)?;
        let info = rt.block_on(plain_migration(&pair))?;
        let verified = pair.verify();
        json!({
            "qemu_bytes": info["ram"]["transferred"],
            "total_time_ms": info["total-time"],
            "downtime_ms": info["downtime"],
            "guest_verified": verified,
        })
    };
    eprintln!("demo: run 2/2: through the agents");
    let agents = {
        let pair = Pair::boot(&dir, "agents", &uri, &args)?;
        let out = Command::new(bin("agent"))
            .arg("migrate")
            .arg("--source-qmp")
            .arg(&pair.source.qmp_path)
            .arg("--target-qmp")
            .arg(&pair.target.qmp_path)
            .args(["--target-agent", &format!("127.0.0.1:{AGENT_PORT}")])
            .args(["--export", "disk", "--vm", "demo"])
            .args(["--nas-nbd", &format!("127.0.0.1:{NBD_PORT}")])
            .args(["--nas-index", &format!("127.0.0.1:{INDEX_PORT}")])
            .arg("--json")
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run agent migrate")?;
        let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "agent migrate printed no report: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let verified = report["ok"] == true && pair.verify();
        let mut r = report.clone();
        r["guest_verified"] = json!(verified);
        r
    };
    let summary = json!({
        "qemu_bytes": agents["qemu_bytes"],
        "link_bytes": agents["link_bytes"],
        "savings_pct": agents["savings_pct"],
        "guest_verified": plain["guest_verified"] == true && agents["guest_verified"] == true,
        "plain": plain,
        "agents": agents,
    });
    print_table(&summary);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
        eprintln!("demo: wrote {}", path.display());
    }
    if summary["guest_verified"] != true {
        bail!(
            "a migrated guest did not carry on correctly; see {}",
            dir.display()
        );
    }
    Ok(())
}

/// A source guest that has read its disk, and a target waiting for it.
struct Pair {
    source: Guest,
    target: Guest,
    blob: String,
}

impl Pair {
    fn boot(dir: &Path, tag: &str, uri: &str, args: &Args) -> anyhow::Result<Self> {
        let spec = |name, incoming| GuestSpec {
            name,
            mem_mb: args.mem_mb,
            read_mb: args.read_mb,
            disk_uri: uri,
            disk_writes: false,
            incoming,
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
        Ok(Self {
            source,
            target,
            blob,
        })
    }

    /// The target's heartbeat continues past the source's and its RAM checksum is unchanged.
    fn verify(&self) -> bool {
        let last = self.source.heartbeat().unwrap_or(0);
        let line = self
            .target
            .wait_line("QEVAL-HEARTBEAT", 1, Duration::from_secs(120));
        let n: u64 = line
            .trim_start_matches("QEVAL-HEARTBEAT ")
            .trim()
            .parse()
            .unwrap_or(0);
        self.target
            .wait_line("QEVAL-BLOB", 0, Duration::from_secs(60));
        n > last && self.target.blob_sums().iter().all(|b| *b == self.blob)
    }
}

async fn plain_migration(pair: &Pair) -> anyhow::Result<Value> {
    let mut src = pair.source.qmp().await;
    let mut dst = pair.target.qmp().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    dst.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )
    .await?;
    src.execute(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = src.execute("query-migrate", None).await?;
        match info["status"].as_str() {
            Some("completed") => return Ok(info),
            Some("failed") | Some("cancelled") => bail!("plain migration failed: {info}"),
            _ if Instant::now() > deadline => bail!("plain migration did not finish"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn print_table(s: &Value) {
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64;
    let (p, a) = (&s["plain"], &s["agents"]);
    println!();
    println!("| | plain QEMU | through the agents |");
    println!("| --- | ---: | ---: |");
    println!(
        "| bytes on the wire | {:.1} MiB | {:.1} MiB ({:.1}% saved) |",
        mib(&p["qemu_bytes"]),
        mib(&a["link_bytes"]),
        a["savings_pct"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| NAS bytes fetched by the target | - | {:.1} MiB |",
        mib(&a["nas_bytes"])
    );
    println!(
        "| pages mapped / dup / sent / fallback | - | {} / {} / {} / {} |",
        a["pages_mapped"], a["pages_dup"], a["pages_sent"], a["pages_fallback"]
    );
    println!(
        "| total time | {} ms | {} ms |",
        p["total_time_ms"], a["total_time_ms"]
    );
    println!(
        "| downtime | {} ms | {} ms |",
        p["downtime_ms"], a["downtime_ms"]
    );
    println!(
        "| guest carried on (heartbeat, RAM checksum) | {} | {} |",
        p["guest_verified"], a["guest_verified"]
    );
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
