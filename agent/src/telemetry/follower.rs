//! The I/O follower's user side: loads and attaches the syscall tracepoints of `agent-ebpf`,
//! says which (process, fd) pairs to follow, and drains their events from the ring buffer.
//!
//! ```text
//! QEMU's recvmsg/sendmsg/pread/pwrite/madvise -> syscall tracepoints (FOLLOWED filter)
//!   -> IO_EVENTS ring buffer -> IoFollower::next_events -> the NBD decoder / the map
//! ```
//! The same object's dirty-ring programs are attached beside them when the first KVM VM is
//! followed ([`IoFollower::start_dirty_ring`]). Events come in the order their calls returned.
//! Drops are counted by the kernel side per reason ([`SyscallDrop`]) and read with
//! [`IoFollower::drops`]; a consumer that sees the ring-full count move must treat every
//! followed conversation as broken.
use agent_common::{
    maps,
    programs::SYSCALLS,
    syscalls::{FdKey, IoEvent, SyscallDrop, TGID_SLOTS},
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use tokio::{io::unix::AsyncFd, task::JoinHandle};

use super::{
    block_io::ProgramCost,
    dirty_ring::DirtyRing,
    loader::{
        attach_tracepoint, forget, load_object, program_runs, require_root, spawn_logger,
        typed_map, ObjectSource, TelemetryError,
    },
    tracefs,
};

/// How often the ring is drained when the kernel side does not wake the reader.
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(5);

/// The attached syscall tracepoints and their maps.
pub struct IoFollower {
    ebpf: Ebpf,
    events: AsyncFd<RingBuf<MapData>>,
    followed: HashMap<MapData, FdKey, u32>,
    /// Followed processes per slot (tgid modulo [`TGID_SLOTS`]), for the kernel side's first,
    /// cheapest filter.
    tgids: Array<MapData, u32>,
    /// What is followed, by process.
    keys: std::collections::HashMap<u32, std::collections::HashSet<FdKey>>,
    /// KVM's dirty ring, from the same object, once started: or why it could not be attached.
    dirty: Option<Result<DirtyRing, String>>,
    logger: Option<JoinHandle<()>>,
}

impl IoFollower {
    /// Loads the object and attaches every syscall tracepoint. Needs a tokio runtime.
    pub fn attach(source: &ObjectSource) -> Result<Self, TelemetryError> {
        require_root()?;
        tracefs::ensure_mounted()?;
        let mut ebpf = load_object(source, &[])?;
        let logger = spawn_logger(&mut ebpf);
        for (name, tracepoint) in SYSCALLS {
            attach_tracepoint(&mut ebpf, name, "syscalls", tracepoint)?;
        }
        tracing::info!("attached {} syscall tracepoints", SYSCALLS.len());
        let ring = typed_map(&mut ebpf, maps::IO_EVENTS, RingBuf::try_from)?;
        // SAFETY: the ring buffer owns its map fd for its whole life and always returns that
        // same fd; the AsyncFd takes ownership of it, so the fd outlives the registration.
        let events =
            unsafe { AsyncFd::register(ring) }.map_err(|e| TelemetryError::Stats(e.to_string()))?;
        let followed = typed_map(&mut ebpf, maps::FOLLOWED, HashMap::try_from)?;
        let tgids = typed_map(&mut ebpf, maps::FOLLOWED_TGIDS, Array::try_from)?;
        Ok(Self {
            ebpf,
            events,
            followed,
            tgids,
            keys: std::collections::HashMap::new(),
            dirty: None,
            logger,
        })
    }

    /// Follows `key`'s calls from now on.
    pub fn follow(&mut self, key: FdKey) -> Result<(), TelemetryError> {
        self.followed
            .insert(key, 1, 0)
            .map_err(|source| TelemetryError::Map {
                name: maps::FOLLOWED,
                source,
            })?;
        self.keys.entry(key.tgid).or_default().insert(key);
        self.count_tgid_slot(key.tgid)
    }

    /// Writes how many followed processes share `tgid`'s slot of `FOLLOWED_TGIDS`.
    fn count_tgid_slot(&mut self, tgid: u32) -> Result<(), TelemetryError> {
        let slot = tgid & (TGID_SLOTS - 1);
        let n = self
            .keys
            .keys()
            .filter(|t| *t & (TGID_SLOTS - 1) == slot)
            .count() as u32;
        self.tgids
            .set(slot, n, 0)
            .map_err(|source| TelemetryError::Map {
                name: maps::FOLLOWED_TGIDS,
                source,
            })
    }

    /// Attaches the dirty-ring programs, once: the first KVM VM followed calls this. Until
    /// then no ioctl of the host pays for the slot programs (see `bench dirty-ring`).
    pub fn start_dirty_ring(&mut self) -> Result<&mut DirtyRing, &str> {
        let ebpf = &mut self.ebpf;
        let dirty = self.dirty.get_or_insert_with(|| {
            let r = DirtyRing::attach(ebpf).map_err(|e| e.to_string());
            match &r {
                Ok(_) => tracing::info!("attached the dirty-ring tracepoints"),
                Err(e) => tracing::warn!("no dirty-page telemetry: {e}"),
            }
            r
        });
        dirty.as_mut().map_err(|e| e.as_str())
    }

    /// The dirty-ring follower, when started and attached.
    pub fn dirty_ring(&mut self) -> Option<&mut DirtyRing> {
        self.dirty.as_mut().and_then(|d| d.as_mut().ok())
    }

    /// Whether the dirty-ring follower is attached, not started yet, or why it failed.
    pub fn dirty_ring_state(&self) -> String {
        match &self.dirty {
            None => "idle: no KVM VM followed yet".to_string(),
            Some(Ok(_)) => "on".to_string(),
            Some(Err(e)) => format!("off: {e}"),
        }
    }

    /// What the kernel measured of the dirty-ring programs' runs so far.
    pub fn dirty_cost(&self) -> Result<ProgramCost, TelemetryError> {
        DirtyRing::cost(&self.ebpf)
    }

    /// Stops following `key` (a key not followed is no error).
    pub fn unfollow(&mut self, key: FdKey) -> Result<(), TelemetryError> {
        if let Some(keys) = self.keys.get_mut(&key.tgid) {
            keys.remove(&key);
            if keys.is_empty() {
                self.keys.remove(&key.tgid);
                self.count_tgid_slot(key.tgid)?;
            }
        }
        forget(self.followed.remove(&key), maps::FOLLOWED)
    }

    /// Waits for events, then appends every event in the ring buffer to `out`. The kernel
    /// side wakes this only when a quarter of the ring is waiting, so it also looks every
    /// [`DRAIN_EVERY`].
    pub async fn next_events(&mut self, out: &mut Vec<IoEvent>) -> Result<(), TelemetryError> {
        let start = out.len();
        loop {
            if let Ok(guard) = tokio::time::timeout(DRAIN_EVERY, self.events.readable_mut()).await {
                let mut guard = guard.map_err(|e| TelemetryError::Stats(e.to_string()))?;
                guard.clear_ready();
            }
            self.drain(out);
            if out.len() > start {
                return Ok(());
            }
        }
    }

    /// Appends whatever events are in the ring buffer now, without waiting.
    pub fn drain(&mut self, out: &mut Vec<IoEvent>) {
        let ring = self.events.get_mut();
        while let Some(item) = ring.next() {
            out.push(parse_event(&item));
        }
    }

    /// What the kernel measured of every syscall program's runs so far (needs
    /// `kernel.bpf_stats_enabled` or [`aya::sys::enable_stats`] while they run).
    pub fn cost(&self) -> Result<ProgramCost, TelemetryError> {
        let mut total = ProgramCost::default();
        for (_, cost) in self.cost_by_program()? {
            total.runs += cost.runs;
            total.run_time += cost.run_time;
        }
        Ok(total)
    }

    /// What the kernel measured of each syscall program's runs so far, by program name.
    pub fn cost_by_program(&self) -> Result<Vec<(&'static str, ProgramCost)>, TelemetryError> {
        SYSCALLS
            .iter()
            .map(|(name, _)| {
                let (runs, run_time) = program_runs(&self.ebpf, name)?;
                Ok((*name, ProgramCost { runs, run_time }))
            })
            .collect()
    }

    /// Events lost or incomplete so far, by [`SyscallDrop`] slot.
    pub fn drops(&self) -> Result<[u64; SyscallDrop::COUNT as usize], TelemetryError> {
        let name = maps::SYSCALL_DROPS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(TelemetryError::Missing { kind: "map", name })?;
        let drops: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| TelemetryError::Map { name, source })?;
        let mut out = [0; SyscallDrop::COUNT as usize];
        for reason in SyscallDrop::ALL {
            let per_cpu = drops
                .get(&(reason as u32), 0)
                .map_err(|source| TelemetryError::Map { name, source })?;
            out[reason as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

impl Drop for IoFollower {
    fn drop(&mut self) {
        if let Some(logger) = self.logger.take() {
            logger.abort();
        }
    }
}

/// An event from its ring-buffer record (records are exactly one `IoEvent`; a shorter one,
/// which the kernel side never writes, reads as zeroes past its end).
fn parse_event(bytes: &[u8]) -> IoEvent {
    let mut ev = IoEvent::default();
    let n = bytes.len().min(size_of::<IoEvent>());
    // SAFETY: IoEvent is #[repr(C)] plain integers (aya::Pod): any bytes are a valid value, and
    // at most its size is copied into it.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut ev).cast::<u8>(), n);
    }
    ev
}
