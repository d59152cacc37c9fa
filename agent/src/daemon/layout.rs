//! Keeps each followed VM's layout current: its RAM blocks (memory hot-plug, virtio-mem
//! resizing), its disks (hot-plug, removal) and the fds that carry them.
//!
//! ```text
//! every LOOK_EVERY: per VM, QMP (held a few ms) -> Vm::inspect -> VmTrack::relayout
//!   changed? -> the map follows (entries of gone pages and disks dropped) -> fds to follow
//!   and to drop -> the event loop
//! ```
//! QEMU serves one client per monitor and the daemon holds none, so it looks again on a timer
//! rather than listening for QMP events. A monitor held by someone else (a migration, the
//! operator) is passed over until the next look; until then, reads into a new RAM block count
//! as outside guest RAM (nothing is mapped from them) and a new disk's I/O is not followed.
use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

use super::{
    maps::{Followed, Registry},
    Follow,
};
use crate::{qmp::Qmp, telemetry::vm::Vm};

/// How often each followed VM's layout is looked at.
pub const LOOK_EVERY: Duration = Duration::from_secs(10);
/// How long a look may hold, or wait for, the monitor.
const LOOK_LIMIT: Duration = Duration::from_secs(1);

/// Looks at every followed VM each `every` until `stop`.
pub(super) async fn watch(
    registry: Arc<Registry>,
    tx: mpsc::Sender<Follow>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        for vm in registry.all() {
            if let Some(change) = look(&vm).await {
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The follow change one VM's new layout needs, if its layout changed.
async fn look(vm: &Followed) -> Option<Follow> {
    let inspected = tokio::time::timeout(LOOK_LIMIT, async {
        let mut session = Qmp::connect(&vm.qmp).await.ok()?;
        Vm::inspect(&mut session).await.ok()
    })
    .await
    .ok()
    .flatten()?;
    let mut track = vm.track();
    let before: BTreeSet<_> = track.keys().into_iter().collect();
    if !track.relayout(inspected) {
        return None;
    }
    let after: BTreeSet<_> = track.keys().into_iter().collect();
    let v = track.vm();
    tracing::info!(
        qmp = %vm.qmp.display(),
        ram_blocks = v.blocks.len(),
        disks = v.disks.len(),
        "the VM's layout changed; its map follows"
    );
    metrics::counter!("agent_vm_layout_changes_total").increment(1);
    Some(Follow::Change {
        add: after.difference(&before).copied().collect(),
        remove: before.difference(&after).copied().collect(),
    })
}
