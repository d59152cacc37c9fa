//! The block-I/O probe: requests and bytes issued per (disk, process), plus drop counters.
//!
//! `block:block_rq_issue` fires when a request is handed to the device driver, in the context of
//! the task that issued it. Counts are kept per CPU in the kernel and summed here.
use std::{collections::BTreeMap, time::Duration};

use agent_common::{globals, maps, programs, IoCount, IoDrop, IoKey};
use aya::{
    maps::{PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use tokio::task::JoinHandle;

use super::{
    loader::{
        attach_tracepoint, load_object, program_runs, require_root, spawn_logger, ObjectSource,
        TelemetryError,
    },
    tracefs::{self, Format},
};

const CATEGORY: &str = "block";
const TRACEPOINT: &str = "block_rq_issue";

/// A loaded and attached block-I/O probe. Dropping it detaches the program.
pub struct BlockIoProbe {
    ebpf: Ebpf,
    logger: Option<JoinHandle<()>>,
}

/// One reading of the probe's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoSnapshot {
    /// Summed over CPUs.
    pub counts: BTreeMap<IoKey, IoCount>,
    /// Events not counted, by reason (index = [`IoDrop`] discriminant).
    pub drops: [u64; IoDrop::COUNT as usize],
}

impl IoSnapshot {
    /// Totals for one disk (kernel-encoded `dev_t`), all processes.
    pub fn device(&self, dev: u32) -> IoCount {
        self.sum(|k| k.dev == dev)
    }

    /// Totals for one process, all disks.
    pub fn process(&self, tgid: u32) -> IoCount {
        self.sum(|k| k.tgid == tgid)
    }

    /// Totals per disk.
    pub fn by_device(&self) -> BTreeMap<u32, IoCount> {
        let mut out: BTreeMap<u32, IoCount> = BTreeMap::new();
        for (key, count) in &self.counts {
            add(out.entry(key.dev).or_default(), count);
        }
        out
    }

    fn sum(&self, keep: impl Fn(&IoKey) -> bool) -> IoCount {
        let mut total = IoCount::default();
        for (_, count) in self.counts.iter().filter(|(k, _)| keep(k)) {
            add(&mut total, count);
        }
        total
    }
}

fn add(total: &mut IoCount, count: &IoCount) {
    total.requests += count.requests;
    total.bytes += count.bytes;
}

/// Kernel-measured cost of the program (needs `kernel.bpf_stats_enabled` or
/// [`aya::sys::enable_stats`] while the events happen).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramCost {
    pub runs: u64,
    pub run_time: Duration,
}

impl ProgramCost {
    /// Mean nanoseconds per event, when any ran.
    pub fn ns_per_event(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time.as_nanos() as f64 / self.runs as f64)
    }
}

impl BlockIoProbe {
    /// Loads the object, patches the record layout read from tracefs, and attaches the program.
    /// Needs a tokio runtime for the log forwarder.
    pub fn attach(source: &ObjectSource) -> Result<Self, TelemetryError> {
        require_root()?;
        tracefs::ensure_mounted()?;
        let format = Format::read(CATEGORY, TRACEPOINT)?;
        let dev = format.field("dev")?;
        let bytes = format.field("bytes")?;
        let mut ebpf = load_object(
            source,
            &[
                (globals::RQ_DEV_OFFSET, dev.offset),
                (globals::RQ_BYTES_OFFSET, bytes.offset),
            ],
        )?;
        let logger = spawn_logger(&mut ebpf);
        let name = programs::BLOCK_RQ_ISSUE;
        attach_tracepoint(&mut ebpf, name, CATEGORY, TRACEPOINT)?;
        tracing::info!("attached {name} to {CATEGORY}:{TRACEPOINT}");
        Ok(Self { ebpf, logger })
    }

    /// Reads the counters now.
    pub fn snapshot(&self) -> Result<IoSnapshot, TelemetryError> {
        let counts_map = self.map(maps::IO_COUNTS)?;
        let counts: PerCpuHashMap<_, IoKey, IoCount> = PerCpuHashMap::try_from(counts_map)
            .map_err(|source| TelemetryError::Map {
                name: maps::IO_COUNTS,
                source,
            })?;
        let mut snapshot = IoSnapshot::default();
        for entry in counts.iter() {
            let (key, per_cpu) = entry.map_err(|source| TelemetryError::Map {
                name: maps::IO_COUNTS,
                source,
            })?;
            let total = snapshot.counts.entry(key).or_default();
            for count in per_cpu.iter() {
                add(total, count);
            }
        }
        let drops_map = self.map(maps::IO_DROPS)?;
        let drops: PerCpuArray<_, u64> =
            PerCpuArray::try_from(drops_map).map_err(|source| TelemetryError::Map {
                name: maps::IO_DROPS,
                source,
            })?;
        for reason in IoDrop::ALL {
            let per_cpu = drops
                .get(&(reason as u32), 0)
                .map_err(|source| TelemetryError::Map {
                    name: maps::IO_DROPS,
                    source,
                })?;
            snapshot.drops[reason as usize] = per_cpu.iter().sum();
        }
        Ok(snapshot)
    }

    /// What the kernel measured of the program's runs so far.
    pub fn cost(&self) -> Result<ProgramCost, TelemetryError> {
        let (runs, run_time) = program_runs(&self.ebpf, programs::BLOCK_RQ_ISSUE)?;
        Ok(ProgramCost { runs, run_time })
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, TelemetryError> {
        self.ebpf
            .map(name)
            .ok_or(TelemetryError::Missing { kind: "map", name })
    }
}

impl Drop for BlockIoProbe {
    fn drop(&mut self) {
        if let Some(logger) = self.logger.take() {
            logger.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> IoSnapshot {
        let mut s = IoSnapshot::default();
        s.counts.insert(
            IoKey { dev: 1, tgid: 10 },
            IoCount {
                requests: 2,
                bytes: 8192,
            },
        );
        s.counts.insert(
            IoKey { dev: 1, tgid: 11 },
            IoCount {
                requests: 1,
                bytes: 512,
            },
        );
        s.counts.insert(
            IoKey { dev: 2, tgid: 10 },
            IoCount {
                requests: 5,
                bytes: 5,
            },
        );
        s
    }

    #[test]
    fn sums_by_device_and_process() {
        let s = snapshot();
        assert_eq!(
            s.device(1),
            IoCount {
                requests: 3,
                bytes: 8704
            }
        );
        assert_eq!(
            s.process(10),
            IoCount {
                requests: 7,
                bytes: 8197
            }
        );
        assert_eq!(s.by_device().len(), 2);
        assert_eq!(s.device(3), IoCount::default());
    }

    #[test]
    fn cost_per_event() {
        let cost = ProgramCost {
            runs: 4,
            run_time: Duration::from_nanos(1000),
        };
        assert_eq!(cost.ns_per_event(), Some(250.0));
        assert_eq!(ProgramCost::default().ns_per_event(), None);
    }
}
