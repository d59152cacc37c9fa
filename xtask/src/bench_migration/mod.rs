//! `cargo xtask bench migration`: plain QEMU, QEMU multifd+zstd and the agents, each migrating
//! the same kind of guest (512 MiB, 200 MiB of its disk read) over a link limited to 1 Gbit/s
//! (a rate-limiting loopback relay), in one run, with the CPU time every party spent during
//! each migration. Each run reports QEMU's downtime (from stopping the guest until the source
//! QEMU has written the rest of its stream) and how long the guest was paused (from the
//! source's STOP event to the target's RESUME event). Then the agents' link bytes against two
//! ideals computed offline from the recorded stream and the disk image: NAS pages as MAPPED
//! frames, and also repeats as DUPs. The agents run as deployed, compressing with zstd while
//! the link is backed up (`--zstd auto`); the ideals are about mapping, so they are compared
//! with the link bytes before compression (the report counts both), and one more run shows the
//! agents with compression off.
//!
//! Plain QEMU and the agents also run with the target's guest RAM preallocated
//! (`-mem-prealloc`, libvirt's `<allocation mode='immediate'/>`): otherwise the target QEMU
//! pays for a fresh zeroed page at the first write to each guest page while it loads the
//! stream, which on this machine (itself a VM) is most of its CPU time and bounds how fast any
//! migration into it can finish.
//!
//! That cost is this machine's, not QEMU's: it returns freed memory to its own hypervisor
//! (see [`hostmem`]), and zeroing such memory again is about thirty times slower than zeroing
//! memory it holds. So plain QEMU and the agents also run with on-demand RAM right after the
//! harness touched and freed twice the guest's size of memory ("target host memory warm"):
//! the target QEMU then faults in memory this machine holds, as a bare-metal host's always is.
//! Each round prints both touch times.
//!
//! `--repeat N` (default 3) runs the whole comparison N times and ends with each figure's
//! median and range, and how many rounds met each of the targets.
//!
//! For the plain runs the relay sits between the two QEMUs; for the agents it sits between the
//! source agent and the target agent (QEMU to the local agent is host-local). QEMU's own
//! bandwidth cap is lifted in those runs so the link is the only limit. One more pair of runs
//! has no relay and caps the migration the way operators do, with the source QEMU's
//! `max-bandwidth` at 1 Gbit/s: plain QEMU holds its stream to it; `agent migrate` holds the
//! agent link to it instead (`agent::orchestrate::bandwidth`).
mod ideal;
mod predict;
mod summary;

use std::{path::Path, sync::atomic::Ordering, time::Duration};

use agent::migration::stream::PAGE_SIZE;
use anyhow::Context;
use serde_json::{json, Value};

use crate::{
    cpu::{process_cpu, ChildrenCpu},
    guest, hostmem,
    lab::{self, plain_migration, Lab, Pair, AGENT_PORT},
    relay::Relay,
    sh,
};

use self::{ideal::stream_content, predict::link_bytes, summary::summary};

/// 1 Gbit/s in bytes per second.
pub const LINK: u64 = 125_000_000;
/// A MAPPED frame on the link: length, type, seq, export, offset, hash.
const MAPPED_FRAME: u64 = 4 + 1 + 8 + 4 + 8 + 32;
/// A DUP frame: length, type, ordinal.
const DUP_FRAME: u64 = 4 + 1 + 8;
/// QEMU's `max-bandwidth` set this high is "unlimited": the relay is then the only limit.
pub const UNCAPPED: u64 = 100_000_000_000;

// The runs the ratios compare.
const PLAIN: &str = "plain QEMU";
const MULTIFD: &str = "QEMU multifd+zstd";
const AGENTS: &str = "agents";
const AGENTS_NEVER: &str = "agents, --zstd never";
const PLAIN_PREALLOC: &str = "plain QEMU, target RAM preallocated";
const AGENTS_PREALLOC: &str = "agents, target RAM preallocated";
const PLAIN_WARM: &str = "plain QEMU, target host memory warm";
const AGENTS_WARM: &str = "agents, target host memory warm";
const PLAIN_CAPPED: &str = "plain QEMU, max-bandwidth 1 Gbit/s, no relay";
const AGENTS_CAPPED: &str = "agents, QEMU's max-bandwidth 1 Gbit/s, no relay";
/// The ratios printed: label, our run, the run it is against, and whether the targets
/// (which are against plain QEMU) apply.
const COMPARISONS: [(&str, &str, &str, bool); 6] = [
    ("agents vs plain", AGENTS, PLAIN, true),
    ("agents, --zstd never vs plain", AGENTS_NEVER, PLAIN, true),
    ("agents vs multifd+zstd", AGENTS, MULTIFD, false),
    (
        "agents vs plain, target RAM preallocated",
        AGENTS_PREALLOC,
        PLAIN_PREALLOC,
        true,
    ),
    (
        "agents vs plain, target host memory warm",
        AGENTS_WARM,
        PLAIN_WARM,
        true,
    ),
    // Not the setting: no link limits these two, so plain QEMU's final iteration,
    // which its cap does not hold back, crosses at loopback speed, as no 1 Gbit/s link allows.
    (
        "agents vs plain, capped by QEMU's max-bandwidth",
        AGENTS_CAPPED,
        PLAIN_CAPPED,
        false,
    ),
];

/// How the target QEMU comes by its guest RAM.
#[derive(Clone, Copy, PartialEq)]
enum TargetRam {
    /// On demand (QEMU's default), from memory as this machine hands it out.
    OnDemand,
    /// On demand, right after [`hostmem::warm`].
    Warm,
    /// `-mem-prealloc`.
    Prealloc,
}

/// The run called `name`.
fn row<'a>(rows: &'a [Row], name: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.name == name)
        .expect("every run has a row")
}

struct Row {
    name: &'static str,
    wire: u64,
    total_ms: u64,
    downtime_ms: u64,
    /// From the source's STOP event to the target's RESUME event.
    paused_ms: u64,
    cpu: CpuUse,
}

/// CPU seconds spent during one migration, per party.
#[derive(Default)]
struct CpuUse {
    source_qemu: f64,
    target_qemu: f64,
    /// `agent migrate`: the source agent and the QMP driver.
    source_agent: f64,
    /// `agent serve`: the target agent.
    target_agent: f64,
    nas: f64,
    /// This process: the link relay and the QMP polling of the plain runs.
    harness: f64,
}

/// CPU readings of every party, taken before a migration and subtracted after it.
struct CpuMeter {
    pids: [u32; 4],
    before: [Duration; 4],
    children: ChildrenCpu,
    /// This process (relay, QMP polling).
    own: Duration,
}

impl CpuMeter {
    /// Source QEMU, target QEMU, nas-server, target agent.
    fn start(pair: &Pair, lab: &Lab) -> anyhow::Result<Self> {
        let (nas, agent) = lab.pids();
        let pids = [pair.source.pid(), pair.target.pid(), nas, agent];
        let mut before = [Duration::ZERO; 4];
        for (b, pid) in before.iter_mut().zip(pids) {
            *b = process_cpu(pid)?;
        }
        Ok(Self {
            pids,
            before,
            children: ChildrenCpu::start(),
            own: process_cpu(std::process::id())?,
        })
    }

    fn stop(&self) -> anyhow::Result<CpuUse> {
        let harness = process_cpu(std::process::id())?.saturating_sub(self.own);
        let mut used = [0.0; 4];
        for ((u, pid), b) in used.iter_mut().zip(self.pids).zip(self.before) {
            *u = process_cpu(pid)?.saturating_sub(b).as_secs_f64();
        }
        Ok(CpuUse {
            source_qemu: used[0],
            target_qemu: used[1],
            nas: used[2],
            source_agent: self.children.elapsed().as_secs_f64(),
            target_agent: used[3],
            harness: harness.as_secs_f64(),
        })
    }
}

/// Every run once, and the agents' link against the ideals.
struct Round {
    rows: Vec<Row>,
    touch: hostmem::Touch,
    /// Link bytes before compression, as sent, and the two ideals, in percent of QEMU's bytes
    /// (the unlimited run).
    link_pct: f64,
    sent_pct: f64,
    ideal_pct: f64,
    ideal_dup_pct: f64,
}

/// Runs the whole comparison `rounds` times, printing each round's tables, then (for more
/// than one) the median and range of every figure: one run of this machine is noisy.
pub fn run(mem_mb: u32, read_mb: u32, rounds: u32) -> anyhow::Result<()> {
    guest::build()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "agent", "-p", "nas-server"]))?;
    let dir = sh::workspace_root().join("target/xtask/bench-migration");
    let lab = Lab::start(&dir)?;
    let uri = lab.disk_uri();
    let rt = tokio::runtime::Runtime::new()?;
    let rounds = rounds.max(1);
    let mut done = Vec::new();
    for n in 1..=rounds {
        eprintln!("bench: round {n} of {rounds}");
        println!();
        println!("Round {n} of {rounds}.");
        done.push(round(&dir, &lab, &uri, &rt, mem_mb, read_mb)?);
    }
    if rounds > 1 {
        summary(&done);
    }
    Ok(())
}

fn round(
    dir: &Path,
    lab: &Lab,
    uri: &str,
    rt: &tokio::runtime::Runtime,
    mem_mb: u32,
    read_mb: u32,
) -> anyhow::Result<Round> {
    let mut rows = Vec::new();
    let mut predictions = Vec::new();

    let mut touch = None;
    // Twice the guest's RAM: what the target QEMU will fault in, and then some.
    let mut warm = || -> anyhow::Result<()> {
        let t = hostmem::warm((2 * mem_mb as usize) << 20)?;
        touch.get_or_insert(t);
        Ok(())
    };
    use TargetRam::*;
    // Name, multifd, through the relay, target RAM, QEMU's max-bandwidth.
    for (name, multifd, limited, ram, cap) in [
        (PLAIN, false, true, OnDemand, UNCAPPED),
        (MULTIFD, true, true, OnDemand, UNCAPPED),
        (
            "plain QEMU, no link limit (QEMU's own rate)",
            false,
            false,
            OnDemand,
            UNCAPPED,
        ),
        (PLAIN_PREALLOC, false, true, Prealloc, UNCAPPED),
        (
            "plain QEMU, no link limit, target RAM preallocated",
            false,
            false,
            Prealloc,
            UNCAPPED,
        ),
        (PLAIN_WARM, false, true, Warm, UNCAPPED),
        (PLAIN_CAPPED, false, false, OnDemand, LINK),
    ] {
        let pair = Pair::boot(
            dir,
            if multifd { "multifd" } else { "plain" },
            uri,
            mem_mb,
            read_mb,
            ram == Prealloc,
        )?;
        let relay = std::cell::RefCell::new(None);
        // Predicted where a 1 Gbit/s limit applies (the relay, or QEMU's cap at it).
        let predicted = if (limited || cap == LINK) && !multifd {
            Some(link_bytes(&pair, None)?)
        } else {
            None
        };
        if ram == Warm {
            warm()?;
        }
        let meter = CpuMeter::start(&pair, lab)?;
        let done = rt.block_on(async {
            let mut src = pair.source.qmp().await;
            let mut dst = pair.target.qmp().await;
            src.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": cap })),
            )
            .await?;
            if multifd {
                for q in [&mut src, &mut dst] {
                    q.execute(
                        "migrate-set-capabilities",
                        Some(
                            json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
                        ),
                    )
                    .await?;
                    q.execute(
                        "migrate-set-parameters",
                        Some(json!({ "multifd-compression": "zstd", "multifd-channels": 2 })),
                    )
                    .await?;
                }
            }
            drop((src, dst));
            let via = crate::relay::via_into(&relay, LINK);
            let via: &dyn Fn(u16) -> anyhow::Result<u16> = &via;
            plain_migration(&pair.source, &pair.target, limited.then_some(via)).await
        })?;
        let (info, paused) = (done.info, done.guest_paused_ms);
        let cpu = meter.stop()?;
        anyhow::ensure!(pair.verify(), "{name}: the target guest did not carry on");
        let wire = relay.borrow().as_ref().map_or_else(
            || info["ram"]["transferred"].as_u64().unwrap_or(0),
            |r| r.bytes.load(Ordering::Relaxed),
        );
        predict::record(&mut predictions, name, predicted, wire);
        rows.push(Row {
            name,
            wire,
            total_ms: info["total-time"].as_u64().unwrap_or(0),
            downtime_ms: info["downtime"].as_u64().unwrap_or(0),
            paused_ms: paused.with_context(|| format!("{name}: no STOP and RESUME events"))?,
            cpu,
        });
    }

    let mut report = Value::Null;
    for (name, tag, limited, ram, zstd) in [
        (
            "agents, no link limit (pipeline rate)",
            "agents-unlimited",
            false,
            OnDemand,
            "auto",
        ),
        (AGENTS, "agents", true, OnDemand, "auto"),
        (AGENTS_NEVER, "agents-never", true, OnDemand, "never"),
        (AGENTS_PREALLOC, "agents-prealloc", true, Prealloc, "auto"),
        (AGENTS_WARM, "agents-warm", true, Warm, "auto"),
        (AGENTS_CAPPED, "agents-capped", false, OnDemand, "auto"),
    ] {
        let pair = Pair::boot(dir, tag, uri, mem_mb, read_mb, ram == Prealloc)?;
        // The capped run: the operator's cap is the source QEMU's max-bandwidth, which
        // `agent migrate` carries on the link. Every other run has no cap but the relay's.
        let capped = name == AGENTS_CAPPED;
        if capped {
            rt.block_on(async {
                let mut src = pair.source.qmp().await;
                src.execute(
                    "migrate-set-parameters",
                    Some(json!({ "max-bandwidth": LINK })),
                )
                .await
            })?;
        }
        let relay = if limited {
            Some(Relay::start(AGENT_PORT, LINK)?)
        } else {
            None
        };
        let target_port = relay.as_ref().map_or(AGENT_PORT, |r| r.port);
        let stream = dir.join(format!("{tag}-stream.bin"));
        if ram == Warm {
            warm()?;
        }
        // Predicted here, at the link's rate (`agent migrate` would predict at QEMU's cap).
        let predicted = if limited || capped {
            Some(link_bytes(&pair, Some(zstd))?)
        } else {
            None
        };
        let mut args = vec!["--zstd", zstd, "--no-plan"];
        let record = stream.to_string_lossy();
        if tag == "agents-unlimited" {
            // QEMU's exact stream, for the offline ideal. Not in the timed run: writing it
            // costs the source agent CPU that plain QEMU does not spend.
            args.extend(["--record", &record]);
        }
        if !capped {
            args.extend(["--max-bandwidth", "0"]);
        }
        let meter = CpuMeter::start(&pair, lab)?;
        let this = lab::agent_migrate(&pair, target_port, "disk", &args)?;
        let cpu = meter.stop()?;
        anyhow::ensure!(
            this["ok"] == true && pair.verify(),
            "{tag}: migration or guest check failed"
        );
        if tag == "agents-unlimited" {
            report = this.clone();
        }
        if capped {
            // The cap went onto the link, and QEMU has the operator's value back.
            let params = rt.block_on(async {
                let mut src = pair.source.qmp().await;
                src.execute("query-migrate-parameters", None).await
            })?;
            anyhow::ensure!(
                this["link_bandwidth"] == LINK && params["max-bandwidth"] == LINK,
                "{tag}: the cap was not carried on the link and put back: {params}"
            );
        }
        eprintln!("bench: {tag}: {this}");
        let wire = relay
            .as_ref()
            .map_or(this["link_bytes"].as_u64().unwrap_or(0), |r| {
                r.bytes.load(Ordering::Relaxed)
            });
        predict::record(&mut predictions, name, predicted, wire);
        rows.push(Row {
            name,
            wire,
            total_ms: this["total_time_ms"].as_u64().unwrap_or(0),
            downtime_ms: this["downtime_ms"].as_u64().unwrap_or(0),
            paused_ms: this["guest_paused_ms"]
                .as_u64()
                .with_context(|| format!("{tag}: the report has no guest pause"))?,
            cpu,
        });
    }
    // Bytes are judged on the unlimited run, the one that recorded QEMU's stream.
    let stream = dir.join("agents-unlimited-stream.bin");

    println!();
    println!("Migration of a {mem_mb} MiB TCG guest that read {read_mb} MiB of its NAS disk, link limited to 1 Gbit/s:");
    println!();
    println!("| run | bytes on the link | total time | downtime | guest paused |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.1} MiB | {} ms | {} ms | {} ms |",
            r.name,
            r.wire as f64 / (1 << 20) as f64,
            r.total_ms,
            r.downtime_ms,
            r.paused_ms
        );
    }
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    for (label, ours, theirs, _) in COMPARISONS {
        let (ours, theirs) = (row(&rows, ours), row(&rows, theirs));
        println!(
            "| {label} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            ratio(ours.wire, theirs.wire),
            ratio(ours.total_ms, theirs.total_ms),
            ratio(ours.downtime_ms, theirs.downtime_ms),
            ratio(ours.paused_ms, theirs.paused_ms)
        );
    }

    println!();
    println!(
        "CPU seconds during each migration (from QMP `migrate` to completion; the agents' \
         rows also hold their own start-up and QMP set-up). The machine has 2 cores."
    );
    println!();
    println!(
        "| run | source QEMU | target QEMU | source agent | target agent | nas-server | relay + harness | sum |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let c = &r.cpu;
        let parts = [
            c.source_qemu,
            c.target_qemu,
            c.source_agent,
            c.target_agent,
            c.nas,
            c.harness,
        ];
        let cells: Vec<String> = parts.iter().map(|p| format!("{p:.2}")).collect();
        println!(
            "| {} | {} | {:.2} |",
            r.name,
            cells.join(" | "),
            parts.iter().sum::<f64>()
        );
    }

    predict::table(&predictions);

    let touch = touch.context("the warm runs touched memory")?;
    println!();
    println!(
        "Target host memory: free page reporting to this machine's hypervisor: {}. Touching \
         {} MiB of fresh memory (one write per page, huge pages advised, as QEMU's guest RAM): \
         {} ms; again right after freeing it: {} ms.",
        if hostmem::reports_free_pages() {
            "on"
        } else {
            "off"
        },
        2 * mem_mb,
        touch.first.as_millis(),
        touch.again.as_millis(),
    );

    let c = stream_content(&std::fs::read(&stream)?, &lab.disk)?;
    let qemu_bytes = c.bytes;
    // The ideal: the stream minus every page whose content is on the NAS, plus a
    // MAPPED frame for each.
    let ideal = qemu_bytes - c.on_nas * (PAGE_SIZE as u64 - MAPPED_FRAME);
    // Tighter still: a page repeating earlier content costs only a DUP frame, whether or not
    // the NAS holds it (the first copy of NAS content is still MAPPED).
    let first_on_nas = c.on_nas - (c.repeats - c.repeats_off_nas);
    let ideal_dup = qemu_bytes
        - first_on_nas * (PAGE_SIZE as u64 - MAPPED_FRAME)
        - c.repeats * (PAGE_SIZE as u64 - DUP_FRAME);
    let figure = |name: &str| report[name].as_u64().unwrap_or(0);
    let sent = figure("link_bytes");
    let link = sent - figure("zstd_out_bytes") + figure("zstd_in_bytes");
    let pct = |b: u64| 100.0 * b as f64 / qemu_bytes as f64;
    let versus = |ideal: u64| {
        let points = pct(link) - pct(ideal);
        format!(
            "{:.2} points {}",
            points.abs(),
            if points > 0.0 { "above" } else { "below" }
        )
    };
    println!();
    println!(
        "Bytes (unlimited run): QEMU {qemu_bytes}, agents' link {link} ({:.1}%) before \
         compression, {sent} ({:.1}%) as sent. \
         Ideal from NAS pages ({} pages on the NAS): {ideal} ({:.1}%), {} it. \
         Ideal from NAS pages and repeats ({} repeated pages): {ideal_dup} ({:.1}%), {} it.",
        pct(link),
        pct(sent),
        c.on_nas,
        pct(ideal),
        versus(ideal),
        c.repeats,
        pct(ideal_dup),
        versus(ideal_dup),
    );
    Ok(Round {
        rows,
        touch,
        link_pct: pct(link),
        sent_pct: pct(sent),
        ideal_pct: pct(ideal),
        ideal_dup_pct: pct(ideal_dup),
    })
}
