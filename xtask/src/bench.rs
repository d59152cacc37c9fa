//! `cargo xtask bench nbd`: nas-server against qemu-nbd and nbdkit's file plugin, in one run,
//! on the same image, with `qemu-img bench` as the client.
//!
//! qemu-img bench has no random mode; "random" rows use a stride of 7919 blocks, which is
//! coprime with the image's block count, so successive requests land far apart and every block
//! is visited once before any repeats. Servers run one at a time so they never share the two
//! cores. The image is filled with data first (no holes), so every row reads real bytes.
use std::{
    fs::File,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{lab, sh};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to benchmark.
    #[arg(value_enum)]
    target: Target,
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    image_mib: u64,
    /// `nbd`: repeat each row this many times and keep the best (default 3). `migration`: run
    /// the whole comparison this many times and report each figure's median and range
    /// (default 3). `downtime`: pairs of runs per cell (default 10).
    #[arg(long)]
    repeat: Option<u32>,
    /// `downtime`: the cells to run, `SETTING:WORKLOAD[,...]` (settings cap, relay,
    /// unlimited; workloads read, files, anon, writes), or `all`.
    #[arg(long, default_value = "all")]
    cells: String,
    /// Synthetic stream size in MiB (`pipeline`).
    #[arg(long, default_value_t = 2048)]
    stream_mib: u64,
    /// Guests that leave the host at once (`evacuate`).
    #[arg(long, default_value_t = 8)]
    vms: usize,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Target {
    /// NBD data path: nas-server vs qemu-nbd vs nbdkit.
    Nbd,
    /// Live migration over a 1 Gbit/s link: plain QEMU vs multifd+zstd vs the agents.
    Migration,
    /// Each side of the migration hook alone, on a synthetic multi-GiB stream.
    Pipeline,
    /// The guest's pause, plain QEMU vs the agents, per setting and workload, many runs each.
    Downtime,
    /// The I/O follower: QEMU's NBD reads with and without the probes, cost per event, drops,
    /// map memory per GiB.
    Telemetry,
    /// KVM's dirty ring: every process's ioctls with the slot programs and without, and a
    /// followed KVM guest's pushes, cost per push and per drain.
    DirtyRing,
    /// A host evacuation: N guests at once through the agents (two target agents) and as N
    /// plain QEMU migrations.
    Evacuate,
}

struct Row {
    name: &'static str,
    args: &'static [&'static str],
    /// Bytes moved per request, for MB/s.
    bytes: u64,
}

const STRIDE_4K: &str = "32436224"; // 7919 * 4096
const ROWS: &[Row] = &[
    Row {
        name: "4k rand read  qd1",
        args: &["-c", "20000", "-d", "1", "-s", "4096", "-S", STRIDE_4K],
        bytes: 4096,
    },
    Row {
        name: "4k rand read  qd32",
        args: &["-c", "100000", "-d", "32", "-s", "4096", "-S", STRIDE_4K],
        bytes: 4096,
    },
    Row {
        name: "4k rand write qd1",
        args: &[
            "-w", "-c", "20000", "-d", "1", "-s", "4096", "-S", STRIDE_4K,
        ],
        bytes: 4096,
    },
    Row {
        name: "4k rand write qd32",
        args: &[
            "-w", "-c", "100000", "-d", "32", "-s", "4096", "-S", STRIDE_4K,
        ],
        bytes: 4096,
    },
    Row {
        name: "1M seq read   qd4",
        args: &["-c", "3000", "-d", "4", "-s", "1M", "-S", "1M"],
        bytes: 1 << 20,
    },
];

const PORT: u16 = 10_950;

pub fn run(args: Args) -> anyhow::Result<()> {
    let repeat = args.repeat.unwrap_or(3);
    if let Target::Migration = args.target {
        return crate::bench_migration::run(512, 200, repeat);
    }
    if let Target::Downtime = args.target {
        return crate::bench_downtime::run(&args.cells, args.repeat.unwrap_or(10));
    }
    if let Target::DirtyRing = args.target {
        return crate::bench_dirty_ring::run(args.repeat.unwrap_or(5));
    }
    if let Target::Telemetry = args.target {
        return crate::bench_telemetry::run(args.repeat.unwrap_or(3));
    }
    if let Target::Evacuate = args.target {
        return crate::bench_evacuate::run(args.vms);
    }
    if let Target::Pipeline = args.target {
        return crate::bench_pipeline::run(args.stream_mib);
    }
    crate::setup::run()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "nas-server"]))?;
    let dir = sh::workspace_root().join("target/xtask/bench");
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("bench.raw");
    lab::fill_image(&image, args.image_mib)?;
    // Every server starts on a warm page cache, and nas-server's start-up index build then
    // measures hashing, not this machine's disk.
    std::io::copy(&mut File::open(&image)?, &mut std::io::sink())?;
    let servers = ["nas-server", "qemu-nbd", "nbdkit"];
    // results[row][server] = requests per second
    let mut results = vec![[0f64; 3]; ROWS.len()];
    // Write rows on nas-server without the index: (row, req/s).
    let mut unindexed: Vec<(usize, f64)> = Vec::new();
    for (s, server) in servers.iter().enumerate() {
        let mut child = start(server, &image)?;
        let outcome = (|| -> anyhow::Result<()> {
            wait_for_port(PORT)?;
            for (r, row) in ROWS.iter().enumerate() {
                let mut best = 0f64;
                for _ in 0..repeat {
                    best = best.max(qemu_img_bench(row, "bench")?);
                }
                eprintln!("bench: {server:<10} {:<20} {best:>10.0} req/s", row.name);
                results[r][s] = best;
            }
            if *server == "nas-server" {
                for (r, row) in ROWS.iter().enumerate() {
                    if !row.args.contains(&"-w") {
                        continue;
                    }
                    let mut best = 0f64;
                    for _ in 0..repeat {
                        best = best.max(qemu_img_bench(row, "bench-noindex")?);
                    }
                    unindexed.push((r, best));
                }
            }
            Ok(())
        })();
        child.kill().ok();
        child.wait().ok();
        outcome.with_context(|| format!("benchmarking {server}"))?;
    }
    println!();
    println!("| row | nas-server | qemu-nbd | nbdkit file | vs qemu-nbd | vs nbdkit |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (row, r) in ROWS.iter().zip(&results) {
        let unit = |v: f64| {
            if row.bytes >= 1 << 20 {
                format!("{:.0} MB/s", v * row.bytes as f64 / 1e6)
            } else {
                format!("{:.0} IOPS", v)
            }
        };
        println!(
            "| {} | {} | {} | {} | {:.2}x | {:.2}x |",
            row.name.trim_end(),
            unit(r[0]),
            unit(r[1]),
            unit(r[2]),
            r[0] / r[1],
            r[0] / r[2]
        );
    }
    for &(r, plain) in &unindexed {
        println!(
            "| {} without index | {:.0} IOPS | | | index-update cost {:.1}% | |",
            ROWS[r].name.trim_end(),
            plain,
            (1.0 - results[r][0] / plain) * 100.0
        );
    }
    let log = std::fs::read_to_string(server_log(&image))?;
    let rate = index_rate(&log).context("nas-server did not log its index build rate")?;
    println!(
        "| index build ({} MiB, nas-server start-up, page cache warm) | {rate:.0} MB/s | | | | |",
        args.image_mib
    );
    Ok(())
}

fn server_log(image: &Path) -> std::path::PathBuf {
    image.with_extension("nas-server.log")
}

/// The `rate_mb_s=N` field of nas-server's "index built" log line.
fn index_rate(log: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("index built"))
        .find_map(|l| l.split("rate_mb_s=").nth(1))
        .and_then(|r| {
            r.trim_matches('"')
                .split(|c: char| !c.is_ascii_digit() && c != '.')
                .next()
        })
        .and_then(|n| n.parse().ok())
}

fn start(server: &str, image: &Path) -> anyhow::Result<Child> {
    let mut cmd = match server {
        "nas-server" => {
            let mut c = Command::new(sh::workspace_root().join("target/release/nas-server"));
            c.arg("--listen")
                .arg(format!("127.0.0.1:{PORT}"))
                .args(["--index-listen", "127.0.0.1:0"])
                .arg("--export")
                .arg(format!("bench={}", image.display()))
                // The same image without the block index, to measure the index's cost.
                .arg("--export")
                .arg(format!("bench-noindex={},noindex", image.display()))
                .env("RUST_LOG", "info")
                .stderr(File::create(server_log(image))?);
            c
        }
        "qemu-nbd" => {
            let mut c = Command::new("qemu-nbd");
            c.args([
                "-f",
                "raw",
                "-t",
                "-e",
                "8",
                "-x",
                "bench",
                "-b",
                "127.0.0.1",
            ])
            .arg(format!("--port={PORT}"))
            .arg(image);
            c
        }
        "nbdkit" => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "-i", "127.0.0.1", "-e", "bench", "-p"])
                .arg(PORT.to_string())
                .arg("file")
                .arg(image);
            c
        }
        _ => bail!("unknown server {server}"),
    };
    cmd.stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {server}"))
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // Let the probe connection's teardown finish before measuring.
            std::thread::sleep(Duration::from_millis(200));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("server did not listen on port {port} within 10 s")
}

/// Runs one qemu-img bench against `export` and returns requests per second.
fn qemu_img_bench(row: &Row, export: &str) -> anyhow::Result<f64> {
    let count: f64 = row.args[row.args.iter().position(|a| *a == "-c").unwrap() + 1].parse()?;
    let out = sh::stdout(
        Command::new("qemu-img")
            .args(["bench", "-f", "raw"])
            .args(row.args)
            .arg(format!("nbd://127.0.0.1:{PORT}/{export}")),
    )?;
    let secs: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("unexpected qemu-img bench output: {out}"))?;
    Ok(count / secs)
}
