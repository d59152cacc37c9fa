//! The hypervisor-host agent.
//!
//! It owns everything that runs on a QEMU/KVM host: kernel telemetry on guests through eBPF
//! ([`telemetry`]: it loads `agent-ebpf`, attaches its tracepoints and turns their maps into
//! per-disk and per-process counts with drop counters), and, on top of that, the migration hook
//! that rewrites QEMU's pre-copy stream into NAS mappings. Data flows kernel -> BPF maps ->
//! [`telemetry::IoSnapshot`] -> the CLI's report and the Prometheus exporter.
pub mod bandwidth;
pub mod control;
pub mod migration;
pub mod qmp;
pub mod settle;
pub mod switchover;
pub mod telemetry;
