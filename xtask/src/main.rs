//! Project automation: `cargo xtask <command>`.
//!
//! It owns everything that is not the product itself: installing a fresh machine's
//! prerequisites (`setup`), building the eBPF object (`build-ebpf`), the whole check suite
//! (`test`: format, two clippy passes, unit, integration and kernel tests), the end-to-end
//! `demo`, and `bench` against the peers the product competes with. Each command calls `setup` first, so the README's two commands work on a new machine.
use clap::{Parser, Subcommand};

mod bench;
mod bench_dirty_ring;
mod bench_downtime;
mod bench_evacuate;
mod bench_migration;
mod bench_pipeline;
mod bench_telemetry;
mod cpu;
mod demo;
mod ebpf;
mod fuzz;
mod guest;
mod hostmem;
mod lab;
mod modules;
mod relay;
mod setup;
mod sh;
mod test;

#[derive(Debug, Parser)]
#[command(about = "Project automation for the NAS-deduplicating migration agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what a fresh machine lacks (Debian packages, rust-src, bpf-linker). Idempotent.
    Setup,
    /// Build the eBPF object (nightly, bpfel-unknown-none, build-std=core).
    BuildEbpf,
    /// Run the whole suite: fmt, clippy (user space and eBPF), unit, integration, kernel tests.
    Test(test::Args),
    /// Run the main job end to end on embedded defaults and print what happened.
    Demo(demo::Args),
    /// Benchmarks against the peers the product competes with, with ratios.
    Bench(bench::Args),
    /// Record real sessions as seeds and run every fuzz target.
    Fuzz(fuzz::Args),
    /// Check that no two sibling modules of any crate depend on each other.
    CheckModules,
    /// Build the test guest (Debian kernel + busybox initramfs) and unpack QEMU 7.2 for tests.
    GuestImage,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => ebpf::build(),
        Command::Test(args) => test::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::CheckModules => modules::run(),
        Command::GuestImage => guest::build().and_then(|()| guest::qemu72()),
    }
}
