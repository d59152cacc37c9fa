//! `agent`: the hypervisor-host daemon's command line.
//!
//! Subcommands are thin edges over the library: they parse flags, set up logging, call into
//! it (`agent::daemon`, `orchestrate`, `serve`, `telemetry`), and print or serve the results.
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod cmd;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Host agent: eBPF guest telemetry and NAS-deduplicating migration"
)]
struct Cli {
    /// eBPF object to load instead of the one embedded at build time.
    #[arg(long, global = true, env = "AGENT_EBPF_OBJECT")]
    ebpf_object: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach the block-I/O probe and report requests per disk and process.
    Telemetry(cmd::telemetry::Args),
    /// Migrate a VM live through the agents (run on the source host).
    Migrate(cmd::migrate::Args),
    /// Accept migrations from source agents (run on every target host).
    Serve(cmd::serve::Args),
    /// Proxy one migration from the local QEMU when libvirt or a script drives QEMU.
    Source(cmd::source::Args),
    /// The host daemon: memory-to-disk maps of followed VMs, the target side, migrations.
    Daemon(cmd::daemon::DaemonArgs),
    /// Ask the host daemon to follow a VM (by its QMP socket) and keep its map.
    Follow(cmd::control::FollowArgs),
    /// Ask the host daemon to stop following a VM.
    Unfollow(cmd::control::FollowArgs),
    /// What the host daemon follows: per VM, RAM mirrored on storage, map entries, drops.
    Status(cmd::control::StatusArgs),
    /// What a migration will cost, before it starts: bytes, time, passes, downtime and
    /// whether it converges, for plain QEMU and through the agents (`--rank`: every followed VM).
    Plan(cmd::plan::Args),
    /// Register an incoming migration with the host daemon (when libvirt starts the target
    /// QEMU's incoming migration itself).
    Expect(cmd::control::ExpectArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // rustls warns of every client that sends an IP address as SNI (libnbd does).
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,rustls=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `--config FILE` (daemon, serve) becomes flags ahead of the command line's, and a flag
    // given twice takes its last value, so the command line wins over the file.
    let args = cmd::config::expand(std::env::args_os().collect())?;
    let cli = Cli::from_arg_matches(
        &Cli::command()
            .args_override_self(true)
            .get_matches_from(args),
    )?;
    let source = agent::telemetry::ObjectSource::from_option(cli.ebpf_object);
    match cli.command {
        Command::Telemetry(args) => cmd::telemetry::run(&source, args).await,
        Command::Migrate(args) => cmd::migrate::run(args).await,
        Command::Serve(args) => cmd::serve::run(args).await,
        Command::Source(args) => cmd::source::run(args).await,
        Command::Daemon(args) => cmd::daemon::run_daemon(&source, args).await,
        Command::Follow(args) => cmd::control::follow(args, true).await,
        Command::Unfollow(args) => cmd::control::follow(args, false).await,
        Command::Status(args) => cmd::control::status(args).await,
        Command::Expect(args) => cmd::control::expect(args).await,
        Command::Plan(args) => cmd::plan::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }

    /// With every flag overriding itself (so the command line wins over `--config`), a
    /// repeatable flag still keeps every value.
    #[test]
    fn repeated_flags_add_up_and_single_ones_take_the_last() {
        use clap::{CommandFactory, FromArgMatches};
        let args = [
            "agent",
            "serve",
            "--insecure",
            "--max-sessions",
            "4",
            "--qmp-dir",
            "/a",
            "--qmp-dir",
            "/b",
            "--max-sessions",
            "8",
        ];
        let matches = super::Cli::command()
            .args_override_self(true)
            .get_matches_from(args);
        let cli = super::Cli::from_arg_matches(&matches).unwrap();
        let super::Command::Serve(serve) = cli.command else {
            panic!("serve");
        };
        let text = format!("{serve:?}");
        assert!(text.contains("max_sessions: 8"), "{text}");
        assert!(text.contains("\"/a\", \"/b\""), "{text}");
    }
}
