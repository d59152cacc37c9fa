//! The hypervisor-host agent: everything of the product that runs on a QEMU/KVM host.
//!
//! Modules:
//! - [`telemetry`]: loads `agent-ebpf`, attaches its tracepoints and turns their maps into
//!   per-disk and per-process counts with drop counters (kernel -> BPF maps ->
//!   [`telemetry::IoSnapshot`] -> `agent telemetry` and Prometheus).
//! - [`migration`]: the migration hook's data path. The source side parses QEMU's pre-copy
//!   stream ([`migration::stream`]) and rewrites pages whose content is on the storage into
//!   MAPPED frames on the agent link ([`migration::link`]); the target side fetches and
//!   verifies them and hands its QEMU the exact stream the source QEMU produced.
//! - [`orchestrate`]: `agent migrate` on the source host: both QEMUs over [`qmp`], the link,
//!   the bandwidth cap, the switchover, settling where the guest runs, and the report.
//! - [`serve`]: `agent serve` on the target host: accepts agent links, one session each.
//! - [`plan`]: before a migration, what it will cost: a VM's sampled RAM, its dirty rate
//!   (QMP `calc-dirty-rate`) and the pre-copy model, for plain QEMU and for the agents.
//! - [`qmp`]: the QMP client both use; [`priority`]: the agents' CPU priority around the pause.
//! - [`daemon`]: the long-running host daemon: telemetry and maps for the VMs it follows, the
//!   target side, and migrations asked over its control socket with the VM's map.
//!
//! Data flows source QEMU -> [`migration::source`] -> agent link -> [`serve`] ->
//! [`migration::target`] -> target QEMU, with [`orchestrate`] driving both QEMUs around it.
pub mod daemon;
pub mod migration;
pub mod orchestrate;
pub mod plan;
pub mod priority;
pub mod qmp;
pub mod serve;
pub mod telemetry;
