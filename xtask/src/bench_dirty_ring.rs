//! `cargo xtask bench dirty-ring`: what following KVM's dirty ring costs.
//!
//! 1. Every process's ioctls: the slot-ioctl programs sit on `sys_enter_ioctl` and
//!    `sys_exit_ioctl` for the whole host (KVM_RUN included). A process not followed makes
//!    1,000,000 `ioctl(FIONREAD)` calls on a pipe with nothing attached, with the I/O
//!    follower's syscall programs (the daemon's baseline), and with those and the slot
//!    programs, rotating the order, `--repeat` rounds: ns per call each way.
//! 2. A followed KVM guest with logging on: a KVM QEMU with a dirty ring (its firmware runs;
//!    this machine's nested KVM boots no full guest), `calc-dirty-rate` in `dirty-ring` mode for
//!    3 s, the ring drained every 100 ms: pushes per second against QEMU's own figure, the
//!    kernel's cost per push (BPF run-time statistics) and the drain's per call.
use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use agent::telemetry::{
    dirty_ring::DirtyRing,
    loader::{attach_tracepoint, load_object, program_runs},
    vm::Vm,
    ObjectSource,
};
use agent_common::{dirty::DirtyEvent, programs::SYSCALLS};
use anyhow::{bail, Context};

use crate::{bench_telemetry::median, ebpf, sh};

const CALLS: u32 = 1_000_000;
const WINDOW_S: u64 = 3;

pub fn run(rounds: u32) -> anyhow::Result<()> {
    crate::setup::run()?;
    if !sh::is_root() {
        bail!("bench dirty-ring loads eBPF programs: run it as root");
    }
    sh::run(&mut ebpf::nightly_cargo("build"))?;
    let object = ObjectSource::File(sh::workspace_root().join(ebpf::OBJECT));
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("cannot enable BPF run-time statistics")?;

    // Nothing attached; the I/O follower's syscall programs alone (the daemon's baseline: any
    // syscall tracepoint puts every syscall of the host on the tracing path); both.
    let mut ns: [Vec<f64>; 3] = Default::default();
    let (mut runs, mut run_time) = (0u64, Duration::ZERO);
    for round in 0..rounds {
        for setting in 0..3 {
            let setting = (setting + round as usize) % 3;
            let mut ebpf = load_object(&object, &[])?;
            if setting >= 1 {
                for (name, tracepoint) in SYSCALLS {
                    attach_tracepoint(&mut ebpf, name, "syscalls", tracepoint)?;
                }
            }
            let _ring = if setting == 2 {
                Some(DirtyRing::attach(&mut ebpf)?)
            } else {
                None
            };
            let per_call = ioctl_storm()?;
            eprintln!("bench: round {round}, setting {setting}: {per_call:.0} ns per ioctl");
            ns[setting].push(per_call);
            if setting == 2 {
                for name in ["enter_ioctl", "exit_ioctl"] {
                    let (n, t) = program_runs(&ebpf, name)?;
                    runs += n;
                    run_time += t;
                }
            }
        }
    }
    let [none, follower, both] = ns.map(|mut v| median(&mut v));
    println!("\nA process not followed, {CALLS} ioctl(FIONREAD) calls, median of {rounds}:\n");
    println!("| | nothing attached | the I/O follower | the follower and the slot programs |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| ns per ioctl | {none:.0} | {follower:.0} | {both:.0} |");
    println!(
        "| the slot programs' share (both / follower) | | | {:.3} |",
        both / follower
    );
    println!(
        "| kernel cost per slot program run (BPF stats, entry and exit) | | | {:.0} ns |",
        run_time.as_nanos() as f64 / runs.max(1) as f64
    );

    let rt = tokio::runtime::Runtime::new()?;
    let _entered = rt.enter();
    rt.block_on(followed_guest(&object))
}

/// Nanoseconds per `ioctl(FIONREAD)` on a pipe, over [`CALLS`] calls.
fn ioctl_storm() -> anyhow::Result<f64> {
    let (reader, _writer) = std::io::pipe()?;
    let fd = reader.as_raw_fd();
    let mut n: libc::c_int = 0;
    let started = Instant::now();
    for _ in 0..CALLS {
        // SAFETY: FIONREAD writes one int through the pointer, which lives on this stack.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
            bail!("ioctl(FIONREAD): {}", std::io::Error::last_os_error());
        }
    }
    Ok(started.elapsed().as_nanos() as f64 / f64::from(CALLS))
}

async fn followed_guest(object: &ObjectSource) -> anyhow::Result<()> {
    let dir = sh::workspace_root().join("target/xtask/bench-dirty-ring");
    std::fs::create_dir_all(&dir)?;
    let qmp_path = dir.join("kvm.qmp");
    let _qemu = testkit::qemu::kvm_qemu(&qmp_path, "kvm,dirty-ring-size=4096");
    let mut qmp = testkit::qemu::qmp_when_up(&qmp_path).await?;
    let vm = Vm::inspect(&mut qmp).await?;
    let mut ebpf = load_object(object, &[])?;
    let mut ring = DirtyRing::attach(&mut ebpf)?;
    ring.follow(vm.pid)?;
    let push0 = program_runs(&ebpf, "dirty_ring_push")?;
    qmp.execute(
        "calc-dirty-rate",
        Some(serde_json::json!({"calc-time": WINDOW_S, "mode": "dirty-ring"})),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    qmp.execute("cont", None).await?;
    let (mut drains, mut drain_time, mut pages) = (0u32, Duration::ZERO, 0usize);
    let deadline = Instant::now() + Duration::from_secs(WINDOW_S + 1);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let sets = ring.drain()?;
        drain_time += t.elapsed();
        drains += 1;
        pages += sets.values().map(|s| s.len()).sum::<usize>();
    }
    let rate = qmp.execute("query-dirty-rate", None).await?;
    let push = program_runs(&ebpf, "dirty_ring_push")?;
    let counts = ring.counts(vm.pid)?.context("the VM is followed")?;
    let pushes = counts.get(DirtyEvent::Push);
    println!(
        "\nA KVM QEMU with a 4096-entry dirty ring, logging on for {WINDOW_S} s \
         (calc-dirty-rate dirty-ring):\n"
    );
    println!("| | figure |");
    println!("| --- | ---: |");
    println!("| QEMU's dirty rate | {} MB/s |", rate["dirty-rate"]);
    println!(
        "| pushes followed | {pushes} ({:.1} MB/s over the window) |",
        pushes as f64 * 4096.0 / 1e6 / WINDOW_S as f64
    );
    println!("| distinct pages drained (per 100 ms drain, summed) | {pages} |");
    println!(
        "| ring-full exits, resets | {}, {} |",
        counts.get(DirtyEvent::FullExit),
        counts.get(DirtyEvent::Reset)
    );
    println!(
        "| unmapped, outside a slot, chunks full | {}, {}, {} |",
        counts.get(DirtyEvent::Unmapped),
        counts.get(DirtyEvent::OutsideSlot),
        counts.get(DirtyEvent::ChunksFull)
    );
    println!(
        "| kernel cost per push (BPF stats) | {:.0} ns |",
        (push.1 - push0.1).as_nanos() as f64 / (push.0 - push0.0).max(1) as f64
    );
    println!(
        "| drain per call | {:.0} us |",
        drain_time.as_micros() as f64 / f64::from(drains.max(1))
    );
    Ok(())
}
