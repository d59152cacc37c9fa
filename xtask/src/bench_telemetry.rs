//! `cargo xtask bench telemetry`: what following QEMU's disk I/O costs.
//!
//! QEMU's own NBD client (`qemu-img bench`: 4 GiB of 64 KiB reads over a 1 GiB image, queue
//! depth 4, from nas-server on loopback) reads the same image with the syscall probes attached
//! and following it, and with nothing attached, alternating which goes first, `--repeat`
//! rounds. Printed side by side: the read throughput both ways and their ratio, events per
//! second, drops under that storm, the decoder's cost per event, and what the memory-to-disk
//! map's tables take per fully mapped GiB of guest RAM; then, from one more run with BPF
//! run-time statistics on (which slow every program run, so the compared rounds run without
//! them), the kernel's cost per event and per program.
use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::telemetry::{
    memmap::{MemoryMap, PageReader, RamBlock},
    nbd_decode::Decoder,
    IoFollower, ObjectSource,
};
use agent_common::syscalls::{FdKey, SyscallDrop, FD_ANY};
use anyhow::{bail, Context};

use crate::{ebpf, lab, sh};

const NBD_PORT: u16 = 10_990;
const INDEX_PORT: u16 = 10_991;
const IMAGE_MIB: u64 = 1024;
/// Bytes read per run: the image four times over (`qemu-img bench` wraps around), so that a
/// run lasts seconds and its start-up is noise no longer.
const READ_MIB: u64 = 4 * IMAGE_MIB;
const REQUEST: u64 = 64 << 10;

/// One probed run's figures, or their sum.
#[derive(Default)]
struct Probed {
    events: u64,
    decode: Duration,
    desyncs: u64,
}

impl Probed {
    fn add(&mut self, run: &Probed) {
        self.events += run.events;
        self.decode += run.decode;
        self.desyncs += run.desyncs;
    }
}

pub fn run(rounds: u32) -> anyhow::Result<()> {
    crate::setup::run()?;
    if !sh::is_root() {
        bail!("bench telemetry loads eBPF programs: run it as root");
    }
    sh::run(&mut ebpf::nightly_cargo("build"))?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "nas-server"]))?;
    let dir = sh::workspace_root().join("target/xtask/bench-telemetry");
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("bench.raw");
    lab::fill_image(&image, IMAGE_MIB)?;
    let _nas = lab::nas_server(&dir, &image, NBD_PORT, INDEX_PORT)?;
    lab::wait_port(NBD_PORT)?;
    let rt = tokio::runtime::Runtime::new()?;
    let _entered = rt.enter();
    let object = ObjectSource::File(sh::workspace_root().join(ebpf::OBJECT));
    let (mut plain, mut probed) = (Vec::new(), Vec::new());
    let mut figures = Probed::default();
    let mut drops = [0; SyscallDrop::COUNT as usize];
    // Without probes, nothing is attached: the kernel's syscall tracepoint path is off too.
    for round in 0..rounds {
        for probes in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let mut follower = probes.then(|| IoFollower::attach(&object)).transpose()?;
            let (secs, p) = read_once(&rt, follower.as_mut())?;
            let mbs = (READ_MIB << 20) as f64 / secs / 1e6;
            eprintln!(
                "bench: round {round}, probes {}: {mbs:.0} MB/s",
                if probes { "on" } else { "off" }
            );
            if let Some(follower) = &follower {
                probed.push(mbs);
                figures.add(&p);
                for (total, n) in drops.iter_mut().zip(follower.drops()?) {
                    *total += n;
                }
            } else {
                plain.push(mbs);
            }
        }
    }
    let (plain, probed) = (median(&mut plain), median(&mut probed));
    let events_per_run = figures.events as f64 / f64::from(rounds);
    println!(
        "\nQEMU's NBD client reading {READ_MIB} MiB ({IMAGE_MIB} MiB image) in {} KiB \
         requests from nas-server, median of {rounds}:\n",
        REQUEST >> 10
    );
    println!("| | without probes | with probes | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| read throughput | {plain:.0} MB/s | {probed:.0} MB/s | {:.3} |",
        probed / plain
    );
    println!(
        "| events per run | | {events_per_run:.0} ({:.0}/s) | |",
        events_per_run * probed * 1e6 / (READ_MIB << 20) as f64
    );
    // The kernel's cost comes from one more run with BPF run-time statistics on, which cost
    // time of their own (a clock read before and after every program run): the rounds above
    // ran without them.
    let mut follower = IoFollower::attach(&object)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("cannot enable BPF run-time statistics")?;
    let (_, costed) = read_once(&rt, Some(&mut follower))?;
    figures.add(&costed);
    for (total, n) in drops.iter_mut().zip(follower.drops()?) {
        *total += n;
    }
    let mut by_program: Vec<_> = follower
        .cost_by_program()?
        .into_iter()
        .filter(|(_, cost)| cost.runs > 0)
        .collect();
    let runs: u64 = by_program.iter().map(|(_, c)| c.runs).sum();
    let time: Duration = by_program.iter().map(|(_, c)| c.run_time).sum();
    let per_event = |n: f64| n / costed.events.max(1) as f64;
    println!(
        "| kernel cost per program run (BPF stats, entry and exit) | | {:.0} ns | |",
        time.as_nanos() as f64 / runs.max(1) as f64
    );
    // Every program's time, the runs that turned other calls away included, per event made.
    println!(
        "| kernel time per event (all programs) | | {:.0} ns | |",
        per_event(time.as_nanos() as f64)
    );
    // Where that time goes: the programs that ran during the run, costliest first.
    by_program.sort_by_key(|(_, cost)| std::cmp::Reverse(cost.run_time));
    for (name, cost) in by_program.iter().take(6) {
        println!(
            "| {name}: runs per event, ns per run | | {:.2}, {:.0} ns | |",
            per_event(cost.runs as f64),
            cost.ns_per_event().unwrap_or(0.0)
        );
    }
    println!(
        "| decoder cost per event | | {:.0} ns | |",
        figures.decode.as_nanos() as f64 / figures.events.max(1) as f64
    );
    println!("| decoder desyncs | | {} | |", figures.desyncs);
    for reason in SyscallDrop::ALL {
        println!(
            "| drops: {} | | {} | |",
            reason.name(),
            drops[reason as usize]
        );
    }
    println!(
        "| map tables per fully mapped GiB of guest RAM | | {:.1} MiB | |",
        map_bytes_per_gib() as f64 / f64::from(1 << 20)
    );
    Ok(())
}

/// One `qemu-img bench` run reading [`READ_MIB`]: seconds, and with a follower what it saw of
/// the run.
fn read_once(
    rt: &tokio::runtime::Runtime,
    mut follower: Option<&mut IoFollower>,
) -> anyhow::Result<(f64, Probed)> {
    let count = (READ_MIB << 20) / REQUEST;
    let script = format!(
        "read _ && exec qemu-img bench -f raw -c {count} -d 4 -s {REQUEST} -S {REQUEST} \
         nbd://127.0.0.1:{NBD_PORT}/disk >/dev/null"
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot start qemu-img bench")?;
    let key = FdKey {
        tgid: child.id(),
        fd: FD_ANY,
    };
    if let Some(follower) = follower.as_mut() {
        follower.follow(key)?;
    }
    let mut stdin = child.stdin.take().context("no stdin")?;
    let started = Instant::now();
    stdin.write_all(b"go\n")?;
    drop(stdin);
    let (status, secs, p) = match follower {
        None => {
            let status = child.wait()?;
            (status, started.elapsed().as_secs_f64(), Probed::default())
        }
        Some(follower) => {
            let run = follow_run(rt, &mut child, follower, started)?;
            follower.unfollow(key)?;
            run
        }
    };
    if !status.success() {
        bail!("qemu-img bench failed: {status}");
    }
    Ok((secs, p))
}

/// Decodes `child`'s events as they come until it exits, then what is left in the ring: its
/// exit status, seconds from `started` to its exit, and what the follower saw.
fn follow_run(
    rt: &tokio::runtime::Runtime,
    child: &mut std::process::Child,
    follower: &mut IoFollower,
    started: Instant,
) -> anyhow::Result<(std::process::ExitStatus, f64, Probed)> {
    let mut p = Probed::default();
    let mut decoder = Decoder::new();
    let mut events = Vec::new();
    let mut sink = Vec::new();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        events.clear();
        let _ = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(20), follower.next_events(&mut events)).await
        });
        let t = Instant::now();
        for ev in &events {
            sink.clear();
            decoder.event(ev, &mut sink);
        }
        p.decode += t.elapsed();
        p.events += events.len() as u64;
    };
    let secs = started.elapsed().as_secs_f64();
    events.clear();
    follower.drain(&mut events);
    for ev in &events {
        decoder.event(ev, &mut sink);
    }
    p.events += events.len() as u64;
    p.desyncs = decoder.stats().desyncs;
    Ok((status, secs, p))
}

/// The map's tables with every page of 1 GiB of guest RAM mapped.
fn map_bytes_per_gib() -> usize {
    struct Distinct;
    impl PageReader for Distinct {
        fn read(&mut self, addr: u64, out: &mut [u8]) -> std::io::Result<()> {
            out[..8].copy_from_slice(&addr.to_le_bytes());
            out[8] = 1;
            Ok(())
        }
    }
    let base = 1u64 << 40;
    let mut map = MemoryMap::new(vec![RamBlock {
        name: "pc.ram".into(),
        host: base,
        len: 1 << 30,
    }]);
    map.landed(0, 0, base, 1 << 30, &mut Distinct);
    map.memory_bytes()
}

/// The median of `v` (sorted in place); 0 when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
