//! `cargo xtask bench evacuate`: a host evacuation. `--vms N` guests (default 8, 256 MiB each,
//! each having read 48 MiB of its own disk) on one nas-server, one export each, all leave the
//! source host at once:
//!
//! - through the agents: one `agent migrate` per VM, all started together, half of them to each
//!   of two `agent serve` daemons (two target hosts), each session scoped to its VM's export;
//! - as N plain QEMU migrations started together, QEMU to QEMU.
//!
//! Both run the same way, with QEMU's default `max-bandwidth` (which `agent migrate` moves onto
//! its link) and no TLS (`bench pipeline` measures what TLS costs), in two settings: loopback,
//! and each migration's link held by a relay to an equal share of a 1 Gbit/s uplink. Each run
//! reports its total time (first start to last finish), the spread of the migrations' own
//! times, the bytes that crossed (the relays' count; on loopback the agent links' bytes and
//! QEMU's `ram.transferred`), the guests' pauses, and that every guest carried on at its target
//! with its memory intact; then the peak memory of each `agent serve` daemon, which ran several
//! sessions at once. On two cores the N guests' and QEMUs' CPU time is much of what is
//! measured, for both.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde_json::Value;
use testkit::qemu::{agent_qmp_dir, carried_on, Guest, GuestSpec};

use crate::{
    bench_migration::LINK,
    guest,
    lab::{plain_migration, release_bin, wait_port, Daemon},
    relay::{self, Relay},
    sh,
};

const MEM_MB: u32 = 256;
const READ_MB: u32 = 48;
const NBD_PORT: u16 = 10_930;
const INDEX_PORT: u16 = 10_931;
/// The two target hosts' agents.
const AGENT_PORTS: [u16; 2] = [17_830, 17_831];

/// The guests of one run: sources that have read their disks, and targets waiting.
struct Fleet {
    sources: Vec<Guest>,
    targets: Vec<Guest>,
    blobs: Vec<String>,
}

impl Fleet {
    fn boot(dir: &Path, tag: &str, vms: usize) -> anyhow::Result<Self> {
        let uri = |i: usize| format!("nbd://127.0.0.1:{NBD_PORT}/vm{i}");
        let spec = |name: &str, uri: &str, incoming: bool| {
            Guest::start(
                dir,
                &GuestSpec {
                    name,
                    mem_mb: MEM_MB,
                    read_mb: READ_MB,
                    disk_uri: uri,
                    incoming,
                    ..GuestSpec::default()
                },
            )
        };
        let sources: Vec<Guest> = (0..vms)
            .map(|i| spec(&format!("{tag}-src{i}"), &uri(i), false))
            .collect();
        let mut blobs = Vec::new();
        for s in &sources {
            s.wait_line("QEVAL-READY", 0, Duration::from_secs(900));
            blobs.push(s.blob_sums().first().cloned().context("no RAM checksum")?);
        }
        let targets = (0..vms)
            .map(|i| spec(&format!("{tag}-vm{i}"), &uri(i), true))
            .collect();
        Ok(Self {
            sources,
            targets,
            blobs,
        })
    }

    /// How many targets carry on from their sources with their memory intact.
    fn verified(&self) -> usize {
        (0..self.sources.len())
            .filter(
                |&i| match carried_on(&self.sources[i], &self.targets[i], &self.blobs[i]) {
                    Ok(()) => true,
                    Err(e) => {
                        eprintln!("bench: {} did not carry on: {e}", self.targets[i].name);
                        false
                    }
                },
            )
            .count()
    }
}

/// One migration's figures.
struct Migration {
    ok: bool,
    total_ms: u64,
    bytes: u64,
    paused_ms: Option<u64>,
}

/// One run's figures.
struct Run {
    name: &'static str,
    /// Each migration's link rate, when held to a share of an uplink.
    share: Option<u64>,
    wall: Duration,
    migrations: Vec<Migration>,
    verified: usize,
}

pub fn run(vms: usize) -> anyhow::Result<()> {
    if vms == 0 {
        bail!("--vms must be at least 1");
    }
    guest::build()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "agent", "-p", "nas-server"]))?;
    let dir = sh::workspace_root().join("target/xtask/bench-evacuate");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut nas = Command::new(release_bin("nas-server"));
    nas.args(["--listen", &format!("127.0.0.1:{NBD_PORT}")])
        .args(["--index-listen", &format!("127.0.0.1:{INDEX_PORT}")]);
    for i in 0..vms {
        let disk = dir.join(format!("vm{i}.raw"));
        std::fs::write(&disk, testkit::pattern(300 + i as u64, 256 << 20))?;
        nas.arg("--export").arg(format!("vm{i}={}", disk.display()));
    }
    let _nas = Daemon(
        nas.env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(dir.join("nas-server.log"))?)
            .spawn()
            .context("cannot start nas-server")?,
    );
    let agents = AGENT_PORTS
        .iter()
        .map(|port| {
            Ok(Daemon(
                Command::new(release_bin("agent"))
                    .args(["serve", "--insecure"])
                    .args(["--link-listen", &format!("127.0.0.1:{port}")])
                    .arg("--qmp-dir")
                    .arg(agent_qmp_dir(&dir))
                    .stderr(std::fs::File::create(
                        dir.join(format!("agent-{port}.log")),
                    )?)
                    .spawn()
                    .context("cannot start agent serve")?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for port in [NBD_PORT, INDEX_PORT].iter().chain(&AGENT_PORTS) {
        wait_port(*port)?;
    }
    let mut runs = Vec::new();
    // Loopback, as fast as the host goes; then each migration held to an equal share of a
    // 1 Gbit/s uplink (a relay per migration), as when a host's one link carries them all.
    for share in [None, Some(LINK / vms as u64)] {
        for agents_run in [true, false] {
            let tag = if agents_run { "agents" } else { "plain" };
            eprintln!("bench: booting {vms} guests ({tag}, share {share:?})");
            let fleet = Fleet::boot(&dir, tag, vms)?;
            runs.push(if agents_run {
                through_agents(&fleet, share)?
            } else {
                plain(&fleet, share)?
            });
        }
    }
    let peaks: Vec<u64> = agents.iter().map(|a| peak_rss_kib(a.0.id())).collect();
    report(vms, &runs, &peaks);
    Ok(())
}

/// Every VM through `agent migrate` at once, alternating between the two target agents; each
/// agent link through a relay at `share` bytes/s, if given.
fn through_agents(fleet: &Fleet, share: Option<u64>) -> anyhow::Result<Run> {
    let relays = (0..fleet.sources.len())
        .map(|i| {
            share
                .map(|rate| Relay::start(AGENT_PORTS[i % 2], rate))
                .transpose()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let started = Instant::now();
    let children: Vec<Child> = (0..fleet.sources.len())
        .map(|i| {
            let port = relays[i].as_ref().map_or(AGENT_PORTS[i % 2], |r| r.port);
            Command::new(release_bin("agent"))
                .arg("migrate")
                .arg("--source-qmp")
                .arg(&fleet.sources[i].qmp_path)
                .arg("--target-qmp")
                .arg(&fleet.targets[i].qmp_path)
                .args(["--vm", &fleet.targets[i].name])
                .args(["--target-agent", &format!("127.0.0.1:{port}")])
                .args(["--export", &format!("vm{i}")])
                .args(["--nas-nbd", &format!("127.0.0.1:{NBD_PORT}")])
                .args(["--nas-index", &format!("127.0.0.1:{INDEX_PORT}")])
                .args(["--json", "--insecure"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot run agent migrate")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut migrations = Vec::new();
    for (child, relay) in children.into_iter().zip(&relays) {
        let out = child.wait_with_output()?;
        let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "agent migrate printed no report: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        migrations.push(Migration {
            ok: report["ok"] == true,
            total_ms: report["total_time_ms"].as_u64().unwrap_or(0),
            bytes: relay.as_ref().map_or_else(
                || report["link_bytes"].as_u64().unwrap_or(0),
                |r| r.bytes.load(Ordering::Relaxed),
            ),
            paused_ms: report["guest_paused_ms"].as_u64(),
        });
    }
    Ok(Run {
        name: "agents",
        share,
        wall: started.elapsed(),
        migrations,
        verified: fleet.verified(),
    })
}

/// Every VM QEMU to QEMU at once, each migration driven from its own thread, through a relay at
/// `share` bytes/s if given.
fn plain(fleet: &Fleet, share: Option<u64>) -> anyhow::Result<Run> {
    let started = Instant::now();
    let migrations = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..fleet.sources.len())
            .map(|i| {
                let (source, target) = (&fleet.sources[i], &fleet.targets[i]);
                scope.spawn(move || plain_one(source, target, share))
            })
            .collect();
        runs.into_iter()
            .map(|run| {
                run.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the migration's thread panicked")))
                    .unwrap_or_else(|e| {
                        eprintln!("bench: plain migration failed: {e:#}");
                        Migration {
                            ok: false,
                            total_ms: 0,
                            bytes: 0,
                            paused_ms: None,
                        }
                    })
            })
            .collect()
    });
    Ok(Run {
        name: "plain QEMU",
        share,
        wall: started.elapsed(),
        migrations,
        verified: fleet.verified(),
    })
}

fn plain_one(source: &Guest, target: &Guest, share: Option<u64>) -> anyhow::Result<Migration> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let relay = std::cell::RefCell::new(None);
    let via = relay::via_into(&relay, share.unwrap_or(u64::MAX));
    let via: &dyn Fn(u16) -> anyhow::Result<u16> = &via;
    let done = rt.block_on(plain_migration(source, target, share.map(|_| via)))?;
    let bytes = relay.borrow().as_ref().map_or_else(
        || done.info["ram"]["transferred"].as_u64().unwrap_or(0),
        |r| r.bytes.load(Ordering::Relaxed),
    );
    Ok(Migration {
        ok: true,
        total_ms: done.info["total-time"].as_u64().unwrap_or(0),
        bytes,
        paused_ms: done.guest_paused_ms,
    })
}

/// A process's peak resident memory (`VmHWM`), in KiB; 0 if unknown.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn report(vms: usize, runs: &[Run], peaks: &[u64]) {
    println!();
    println!(
        "{vms} guests of {MEM_MB} MiB ({READ_MB} MiB of each one's disk read) leave one host at \
         once."
    );
    println!();
    println!(
        "| run | link per migration | migrations ok | guests verified | total time | per-VM \
         time min / median / max | bytes crossed | guest paused median / max |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in runs {
        let times: Vec<u64> = r.migrations.iter().map(|m| m.total_ms).collect();
        let paused: Vec<u64> = r.migrations.iter().filter_map(|m| m.paused_ms).collect();
        println!(
            "| {} | {} | {}/{vms} | {}/{vms} | {:.1} s | {:.1} / {:.1} / {:.1} s | {:.1} MiB | \
             {} / {} ms |",
            r.name,
            r.share.map_or("loopback".to_string(), |b| format!(
                "{:.1} MB/s",
                b as f64 / 1e6
            )),
            r.migrations.iter().filter(|m| m.ok).count(),
            r.verified,
            r.wall.as_secs_f64(),
            times.iter().min().copied().unwrap_or(0) as f64 / 1e3,
            median(times.clone()) as f64 / 1e3,
            times.iter().max().copied().unwrap_or(0) as f64 / 1e3,
            bytes(r) / f64::from(1 << 20),
            median(paused.clone()),
            paused.iter().max().copied().unwrap_or(0),
        );
    }
    println!();
    for pair in runs.chunks(2) {
        if let [agents, plain] = pair {
            println!(
                "agents vs plain QEMU, {}: total time {:.2}x, bytes {:.2}x ({:.1}% fewer)",
                agents.share.map_or("loopback".to_string(), |b| format!(
                    "{:.1} MB/s each",
                    b as f64 / 1e6
                )),
                agents.wall.as_secs_f64() / plain.wall.as_secs_f64(),
                bytes(agents) / bytes(plain),
                100.0 * (1.0 - bytes(agents) / bytes(plain)),
            );
        }
    }
    for (port, kib) in AGENT_PORTS.iter().zip(peaks) {
        println!(
            "agent serve on port {port}: peak resident memory {:.1} MiB",
            *kib as f64 / 1024.0
        );
    }
}

fn bytes(r: &Run) -> f64 {
    r.migrations.iter().map(|m| m.bytes).sum::<u64>() as f64
}
