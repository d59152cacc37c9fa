//! Kernel telemetry on guests: loading the eBPF programs and reading what they count.
pub mod block_io;
pub mod device;
pub mod loader;
pub mod tracefs;

pub use block_io::{BlockIoProbe, IoSnapshot, ProgramCost};
pub use loader::{ObjectSource, TelemetryError};
