//! What is known of one VM's memory over time, as the host daemon keeps it between rounds of
//! measurements (see `crate::daemon::figures`).
use std::{
    collections::VecDeque,
    time::{Instant, SystemTime},
};

use super::{
    dirty::Smoothed,
    ram::{changed_share, RamProfile, WorkingSet},
    QemuView,
};

/// What is known of one VM's memory over time: its dirty rate, its latest RAM sample and
/// QEMU's view, and the fingerprints of its last few samples (for the working set).
#[derive(Default)]
pub struct Observed {
    pub dirty: Smoothed,
    pub ram: Option<(RamProfile, SystemTime)>,
    pub view: Option<QemuView>,
    /// Why QEMU's view or the RAM could not be read last time.
    pub error: Option<String>,
    /// The latest RAM samples' fingerprints, oldest first (for the working set).
    history: VecDeque<(Instant, Vec<u64>)>,
}

/// RAM samples kept per VM for the working set (each 8 bytes per sampled page).
const HISTORY: usize = 3;

impl Observed {
    /// Sets `ram`'s working set from the oldest kept sample and keeps `prints` (`ram`'s own
    /// sample, taken `at`).
    pub fn remember(&mut self, ram: &mut RamProfile, prints: Vec<u64>, at: Instant) {
        if let Some((then, old)) = self.history.front() {
            let over_s = at.saturating_duration_since(*then).as_secs_f64();
            if let Some(share) = changed_share(old, &prints).filter(|_| over_s > 0.0) {
                ram.working_set = Some(WorkingSet {
                    bytes: share * ram.ram_bytes as f64,
                    over_s,
                });
            }
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((at, prints));
    }
}
