//! Kernel telemetry on guests: loading the eBPF programs and reading what they count.
//!
//! [`block_io`] counts host block requests per disk and process; [`follower`] follows QEMU's
//! own I/O syscalls on the fds it is told, as a stream of events, which [`nbd_decode`] turns
//! back into the NBD conversation they carried, and [`memmap`] into a map of which guest page
//! holds which disk block (its tables in [`map_table`]); [`aio`] holds reads submitted with
//! `io_submit` until they land. [`vm`] says which fds and RAM blocks of a QEMU process to
//! follow, [`ram_files`] which fds hold its RAM when that RAM is a file ([`procfs`] reads
//! `/proc`). [`dirty_ring`] follows the pages KVM's dirty ring reports written, which drop out
//! of the map. [`track`] ties them together for one VM. [`loader`] finds and loads the object,
//! [`tracefs`] reads tracepoint layouts, [`device`] names disks.
pub mod aio;
pub mod block_io;
pub mod device;
pub mod dirty_ring;
pub mod follower;
pub mod loader;
pub mod map_table;
pub mod memmap;
pub mod nbd_decode;
pub mod procfs;
pub mod ram_files;
pub mod tracefs;
pub mod track;
pub mod unix_peer;
pub mod vm;

pub use block_io::{BlockIoProbe, IoSnapshot, ProgramCost};
pub use dirty_ring::{DirtyRing, DirtySet};
pub use follower::IoFollower;
pub use loader::{ObjectSource, TelemetryError};
