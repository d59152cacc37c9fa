//! The pre-copy model: from a VM's sampled RAM, its dirty rate and the link, what a migration
//! will move and how long it will take, plain QEMU and through the agents. Pure arithmetic;
//! docs/design/plan.md gives the formulas and where each input comes from.
//!
//! ```text
//! pass 1: every page; zero pages 9 B, repeats a DUP frame, mirrored pages a MAPPED frame, the
//!   rest 4 KiB (zstd'd)
//!   while it runs the guest dirties unique(t) = min(D t, W) bytes, all re-sent: QEMU's dirty
//!   log gathers every write since its last sync, sent or not (W: the working set, when the
//!   sampler saw the guest rewrite the same memory)
//! QEMU syncs its dirty bitmap each time what is left falls under threshold = rate x limit:
//!   left + dirtied since the last sync <= threshold -> switchover, else another pass
//!   (rate: plain QEMU's own stream; through the agents, the link's, divided by
//!   strictness(syncs) for the first passes)
//! converges iff D < the rate dirty pages are re-sent at; else it never switches over
//! ```
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ram::RamProfile;

pub const PAGE: f64 = 4096.0;
/// QEMU's stream: a page's 8-byte header and its 4 KiB; a zero page's header and one byte.
pub const QEMU_PAGE: f64 = 8.0 + PAGE;
pub const QEMU_ZERO: f64 = 9.0;
/// The agent link: the page header in a RAW frame (5 + 8), then a PAGE frame (5 + 4096) or a
/// MAPPED frame (5 + seq 8 + export 4 + offset 8 + BLAKE3 32).
pub const LINK_PAGE: f64 = 13.0 + 5.0 + PAGE;
pub const LINK_MAPPED: f64 = 13.0 + 57.0;
/// A page whose content the agents sent moments before: the page header and a DUP frame (5 +
/// ordinal 8).
pub const LINK_DUP: f64 = 13.0 + 13.0;
/// QEMU re-checks what is left about every 100 ms (its rate-limit window): a pass ends within
/// that much of reaching the threshold.
const CHECK: f64 = 0.1;
/// Sync cycles the model follows before calling a migration non-converging.
const MAX_PASSES: u32 = 200;
/// Longest migration the model follows (seconds).
const HORIZON: f64 = 3600.0;

/// The divisor of the link's rate the agents tell QEMU for its switchover decision
/// (`avail-switchover-bandwidth`) while QEMU has synced its dirty bitmap `syncs` times
/// (`dirty-sync-count`: 1 at the start, 2 after the first pass, ...): 8 up to the third
/// sync, 4 at the fourth, 2 at the fifth, the full rate from the sixth on. QEMU checks what
/// is left only between send rounds, so at the full rate it stopped a guest that dirties
/// little with the tail of its first pass still to send, inside the pause
/// (docs/design/switchover.md); a guest that dirties too fast to converge under the strict
/// rate gets the full one back within a few passes.
pub fn strictness(syncs: u64) -> u64 {
    match syncs {
        0..=3 => 8,
        4 => 4,
        5 => 2,
        _ => 1,
    }
}

/// Which migration is predicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// QEMU to QEMU, pages sent whole.
    Plain,
    /// Through the agents: mirrored pages as MAPPED frames, the rest zstd'd when `compress`.
    Agents { compress: bool },
}

/// What the model needs besides the RAM profile.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Conditions {
    /// Bytes per second of unique guest memory dirtied.
    pub dirty_bytes_per_sec: f64,
    /// Bytes per second the link carries before the switchover (the operator's cap).
    pub bandwidth: f64,
    /// Bytes per second once the guest is paused (the cap comes off): the link's capacity.
    pub final_bandwidth: f64,
    /// QEMU's `downtime-limit`.
    pub downtime_limit: Duration,
    /// QEMU's device state, sent while paused (bytes).
    pub device_state: f64,
}

/// A predicted migration.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Forecast {
    /// Bytes of QEMU's stream, and bytes on the link (equal for plain QEMU).
    pub qemu_bytes: f64,
    pub link_bytes: f64,
    /// From start to the target running (seconds); `None` when it never converges.
    pub total_s: Option<f64>,
    /// Dirty-bitmap syncs, as QEMU counts them (`dirty-sync-count`).
    pub iterations: u32,
    /// The guest's pause (ms) while the last set and the device state cross.
    pub downtime_ms: Option<f64>,
    pub converges: bool,
    /// Dirty rate against the rate dirty pages are re-sent at (< 1 converges).
    pub dirty_ratio: f64,
    /// The link's rate in QEMU bytes at the start of the migration (bytes/s).
    pub qemu_rate: f64,
}

/// Bytes per page of one kind of traffic: (QEMU's stream, the link).
#[derive(Clone, Copy, Debug)]
struct PerPage {
    qemu: f64,
    link: f64,
}

/// The first pass: every page as it is now.
fn first_pass(ram: &RamProfile, method: Method) -> PerPage {
    let (z, r, m) = (ram.zero, ram.repeated, ram.mirrored);
    let rest = (1.0 - z - r - m).max(0.0);
    let qemu = z * QEMU_ZERO + (1.0 - z) * QEMU_PAGE;
    let link = match method {
        Method::Plain => qemu,
        Method::Agents { compress } => {
            z * QEMU_ZERO + r * LINK_DUP + m * LINK_MAPPED + rest * full_page(ram, compress)
        }
    };
    PerPage { qemu, link }
}

/// A page written since the first pass: neither zero nor on the storage.
fn dirty_page(ram: &RamProfile, method: Method) -> PerPage {
    let link = match method {
        Method::Plain => QEMU_PAGE,
        Method::Agents { compress } => full_page(ram, compress),
    };
    PerPage {
        qemu: QEMU_PAGE,
        link,
    }
}

fn full_page(ram: &RamProfile, compress: bool) -> f64 {
    if compress {
        LINK_PAGE * ram.compress_ratio.clamp(0.0, 1.0)
    } else {
        LINK_PAGE
    }
}

/// Pages per second a kind of traffic moves at: the link's bytes, and for the agents also the
/// source agent's own work per page (hashing, and zstd when on), on one core.
fn pages_per_sec(per: PerPage, bandwidth: f64, ram: &RamProfile, method: Method) -> f64 {
    let link = bandwidth / per.link.max(1.0);
    match method {
        Method::Plain => link,
        Method::Agents { compress } => {
            let ns = ram.hash_ns + if compress { ram.zstd_ns } else { 0.0 };
            if ns > 0.0 {
                link.min(1e9 / ns)
            } else {
                link
            }
        }
    }
}

/// The guest's working set in bytes, when the sampler saw it rewrite the same memory: less
/// changed over its stretch than the dirty rate would have written (by a margin for noise).
fn working_set(ram: &RamProfile, dirty_bytes_per_sec: f64) -> Option<f64> {
    let w = ram.working_set?;
    (w.bytes < 0.8 * dirty_bytes_per_sec * w.over_s).then_some(w.bytes)
}

/// Predicts one migration.
pub fn forecast(ram: &RamProfile, c: &Conditions, method: Method) -> Forecast {
    let pages = ram.ram_bytes as f64 / PAGE;
    let limit = c.downtime_limit.as_secs_f64();
    let dirty_pages = c.dirty_bytes_per_sec.max(0.0) / PAGE;
    let first = first_pass(ram, method);
    let again = dirty_page(ram, method);
    let r1 = pages_per_sec(first, c.bandwidth, ram, method);
    let r2 = pages_per_sec(again, c.bandwidth, ram, method);
    // QEMU's threshold at its `syncs`-th sync, in pages: the rate it judges by times the
    // downtime limit, counted in whole pages as its dirty bitmap counts them. Plain QEMU
    // measures its own stream; the agents tell it the link's bytes per second, strictly at
    // first.
    let threshold = |r: f64, per: PerPage, syncs: u32| {
        let rate = match method {
            Method::Plain => r * per.qemu,
            Method::Agents { .. } => r * per.link / strictness(u64::from(syncs)) as f64,
        };
        rate * limit / PAGE
    };
    let mut out = Forecast {
        dirty_ratio: dirty_pages / r2,
        qemu_rate: r1 * first.qemu,
        iterations: 1,
        ..Forecast::default()
    };
    let add = |out: &mut Forecast, n: f64, per: PerPage| {
        out.qemu_bytes += n * per.qemu;
        out.link_bytes += n * per.link;
    };
    // Pass 1 drains until what is left of it reaches the threshold.
    let sent1 = (pages - threshold(r1, first, out.iterations)).max(0.0);
    let mut t = sent1 / r1;
    add(&mut out, sent1, first);
    let mut left_first = pages - sent1;
    // Pages dirtied over a stretch of `dt`, and at most the working set (or all of RAM).
    let cap = working_set(ram, c.dirty_bytes_per_sec).map_or(pages, |w| (w / PAGE).min(pages));
    let unique = |dt: f64| (dirty_pages * dt).min(cap);
    let mut dirtied = unique(t);
    loop {
        out.iterations += 1;
        let pending = left_first + dirtied;
        let (rate, per) = if left_first > 0.0 {
            (r1, first)
        } else {
            (r2, again)
        };
        let th = threshold(rate, per, out.iterations);
        // Within one check of the threshold: QEMU stops the guest and sends the rest.
        if pending <= th + rate * CHECK * (1.0 - out.dirty_ratio).max(0.0) {
            add(&mut out, left_first, first);
            add(&mut out, dirtied, again);
            out.qemu_bytes += c.device_state;
            out.link_bytes += c.device_state;
            let final_link = left_first * first.link + dirtied * again.link + c.device_state;
            let pause = final_link / c.final_bandwidth.max(1.0);
            out.downtime_ms = Some(pause * 1e3);
            out.total_s = Some(t + pause);
            out.converges = true;
            return out;
        }
        if out.iterations > MAX_PASSES || t > HORIZON || out.dirty_ratio >= 1.0 {
            out.converges = false;
            return out;
        }
        // Another cycle: send down to the threshold again while the guest dirties more.
        let send = pending - threshold(r2, again, out.iterations).min(pending);
        let from_first = send.min(left_first);
        let from_dirty = send - from_first;
        let dt = from_first / r1 + from_dirty / r2;
        add(&mut out, from_first, first);
        add(&mut out, from_dirty, again);
        left_first -= from_first;
        dirtied = (dirtied - from_dirty + unique(dt)).min(cap);
        t += dt;
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
