//! `cargo xtask bench telemetry`: what following QEMU's disk I/O costs.
//!
//! QEMU's own NBD client (`qemu-img bench`: 1 GiB of 64 KiB reads, queue depth 4, from
//! nas-server on loopback) reads the same image with the syscall probes following it and
//! without, alternating which goes first, `--repeat` rounds. Printed side by side: the read
//! throughput both ways and their ratio, events per second, the kernel's cost per event (BPF
//! run-time statistics) and the user-space decoder's, drops under that storm, and what the
//! memory-to-disk map's tables take per fully mapped GiB of guest RAM.
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
const REQUEST: u64 = 64 << 10;

/// One probed run's figures.
#[derive(Default)]
struct Probed {
    events: u64,
    decode: Duration,
    desyncs: u64,
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
    let object = sh::workspace_root().join(ebpf::OBJECT);
    let mut follower = IoFollower::attach(&ObjectSource::File(object))?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("cannot enable BPF run-time statistics")?;
    let (cost0, drops0) = (follower.cost()?, follower.drops()?);
    let (mut plain, mut probed) = (Vec::new(), Vec::new());
    let mut figures = Probed::default();
    for round in 0..rounds {
        for probes in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let (secs, p) = read_once(&rt, &mut follower, probes)?;
            let mbs = (IMAGE_MIB << 20) as f64 / secs / 1e6;
            eprintln!(
                "bench: round {round}, probes {}: {mbs:.0} MB/s",
                if probes { "on" } else { "off" }
            );
            if probes {
                probed.push(mbs);
                figures.events += p.events;
                figures.decode += p.decode;
                figures.desyncs += p.desyncs;
            } else {
                plain.push(mbs);
            }
        }
    }
    let (cost, drops) = (follower.cost()?, follower.drops()?);
    let runs = cost.runs - cost0.runs;
    let kernel_ns = (cost.run_time - cost0.run_time).as_nanos() as f64 / runs.max(1) as f64;
    let (plain, probed) = (median(&mut plain), median(&mut probed));
    let events_per_run = figures.events as f64 / f64::from(rounds);
    println!(
        "\nQEMU's NBD client reading {IMAGE_MIB} MiB in {} KiB requests from nas-server, \
         median of {rounds}:\n",
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
        events_per_run * probed * 1e6 / (IMAGE_MIB << 20) as f64
    );
    println!("| kernel cost per program run (BPF stats, entry and exit) | | {kernel_ns:.0} ns | |");
    // Every program's time, the runs that turned other calls away included, per event made.
    println!(
        "| kernel time per event (all programs) | | {:.0} ns | |",
        (cost.run_time - cost0.run_time).as_nanos() as f64 / (figures.events.max(1) as f64)
    );
    println!(
        "| decoder cost per event | | {:.0} ns | |",
        figures.decode.as_nanos() as f64 / figures.events.max(1) as f64
    );
    println!("| decoder desyncs | | {} | |", figures.desyncs);
    for reason in SyscallDrop::ALL {
        let n = drops[reason as usize] - drops0[reason as usize];
        println!("| drops: {} | | {n} | |", reason.name());
    }
    println!(
        "| map tables per fully mapped GiB of guest RAM | | {:.1} MiB | |",
        map_bytes_per_gib() as f64 / f64::from(1 << 20)
    );
    Ok(())
}

/// One `qemu-img bench` read of the whole image: seconds, and with `probes` what the
/// follower saw of it.
fn read_once(
    rt: &tokio::runtime::Runtime,
    follower: &mut IoFollower,
    probes: bool,
) -> anyhow::Result<(f64, Probed)> {
    let count = (IMAGE_MIB << 20) / REQUEST;
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
    if probes {
        follower.follow(key)?;
    }
    let mut p = Probed::default();
    let mut decoder = Decoder::new();
    let mut events = Vec::new();
    let mut sink = Vec::new();
    let mut stdin = child.stdin.take().context("no stdin")?;
    let started = Instant::now();
    stdin.write_all(b"go\n")?;
    drop(stdin);
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
    if !status.success() {
        bail!("qemu-img bench failed: {status}");
    }
    events.clear();
    follower.drain(&mut events);
    for ev in &events {
        decoder.event(ev, &mut sink);
    }
    p.events += events.len() as u64;
    p.desyncs = decoder.stats().desyncs;
    if probes {
        follower.unfollow(key)?;
    }
    Ok((secs, p))
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
