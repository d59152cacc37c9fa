//! Per followed VM, what KVM's dirty ring reported since the last tick: the pages the guest
//! wrote drop out of its memory-to-disk map, and its counters become rates, hot pages and
//! whether dirty logging is on at all.
//!
//! ```text
//! every tick of the event loop (1 s):
//!   DirtyRing::drain -> per VM: VmTrack::dirtied (its map's entries for those pages dropped)
//!   DirtyRing::counts -> the change since the last tick -> RingReport (rates, logging on?)
//!   DirtyRing::hottest (while logging, every 10 s) -> the most rewritten pages, by RAM block
//!   and offset
//! ```
//! The ring reports nothing while logging is off (see `telemetry::dirty_ring`); a report then
//! says `logging: false`, and its rates are zero because nothing was measured, not because the
//! guest wrote nothing.
use std::{collections::BTreeMap, time::Instant};

use agent_common::dirty::{DirtyEvent, KVM_MEM_LOG_DIRTY_PAGES};
use serde_json::{json, Value};

use super::maps::{Followed, Registry};
use crate::telemetry::dirty_ring::{DirtyRing, HotPage, RingReport};

/// Hot pages a report lists.
const HOT_SHOWN: usize = 8;
/// How often the hot pages are looked up while logging: it walks the whole LRU map (up to
/// 65,536 entries, two syscalls each), too long to do every tick in the event loop.
const HOT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// One tick for every followed VM.
pub fn tick(ring: &mut DirtyRing, registry: &Registry) {
    let sets = ring.drain().unwrap_or_else(|e| {
        tracing::warn!("dirty ring: {e}");
        BTreeMap::new()
    });
    let now = Instant::now();
    for vm in registry.all() {
        let pid = vm.track().vm().pid;
        let (pages, dropped) = sets
            .get(&pid)
            .map_or((0, 0), |set| (set.len() as u64, vm.track().dirtied(set)));
        let counts = match ring.counts(pid) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("dirty ring of pid {pid}: {e}");
                continue;
            }
        };
        let mut view = vm.ring();
        let pushes = counts.get(DirtyEvent::Push);
        let (rate, logging) = match view.last {
            Some((before, then)) => {
                let dt = now.duration_since(then).as_secs_f64().max(1e-3);
                let new = pushes.saturating_sub(before.get(DirtyEvent::Push));
                (new as f64 / dt, new > 0)
            }
            None => (0.0, false),
        };
        let slots = ring.slots(pid);
        let earlier = view
            .report
            .as_ref()
            .filter(|r| r.hot_at.is_some_and(|t| now.duration_since(t) < HOT_EVERY));
        let (hot, hot_at) = match (logging, earlier) {
            (false, _) => (Vec::new(), None),
            (true, Some(r)) => (r.hot.clone(), r.hot_at),
            (true, None) => (place(&vm, ring.hottest(pid, HOT_SHOWN)), Some(now)),
        };
        let report = RingReport {
            counts: counts.named(),
            logging,
            pushes_per_sec: rate,
            bytes_per_sec: rate * 4096.0,
            pages,
            map_entries_dropped: dropped,
            slots: slots.len(),
            slots_logging: slots
                .iter()
                .filter(|s| s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
                .count(),
            hot,
            hot_age_s: hot_at.map(|t| now.duration_since(t).as_secs_f64()),
            hot_at,
            at: Some(now),
        };
        gauges(&vm, &report);
        view.last = Some((counts, now));
        view.report = Some(report);
    }
}

fn place(vm: &Followed, hot: Vec<(u64, u64)>) -> Vec<HotPage> {
    let track = vm.track();
    let map = track.map();
    hot.into_iter()
        .map(|(host, pushes)| {
            let at = map.locate(host);
            HotPage {
                block: at.map(|(b, _)| map.blocks()[b as usize].name.clone()),
                offset: at.map(|(_, o)| o),
                host,
                pushes,
            }
        })
        .collect()
}

fn gauges(vm: &Followed, r: &RingReport) {
    let name = vm.qmp.display().to_string();
    metrics::gauge!("agent_vm_ring_dirty_bytes_per_second", "qmp" => name.clone())
        .set(r.bytes_per_sec);
    metrics::gauge!("agent_vm_ring_logging", "qmp" => name.clone())
        .set(f64::from(u8::from(r.logging)));
    for (event, n) in &r.counts {
        metrics::gauge!("agent_vm_ring_events", "qmp" => name.clone(), "event" => *event)
            .set(*n as f64);
    }
}

/// The VM's latest report for `agent status`, with its age; `null` before the first tick.
pub fn status(vm: &Followed) -> Value {
    let view = vm.ring();
    match &view.report {
        Some(r) => {
            let mut v = json!(r);
            v["age_s"] = json!(r.at.map(|t| t.elapsed().as_secs_f64()));
            v
        }
        None => Value::Null,
    }
}
