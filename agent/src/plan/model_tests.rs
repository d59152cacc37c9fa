use std::time::Duration;

use super::*;
use crate::plan::ram::WorkingSet;

const MIB: f64 = (1 << 20) as f64;

fn ram(zero: f64, mirrored: f64) -> RamProfile {
    RamProfile {
        ram_bytes: 512 << 20,
        sampled: 4096,
        zero,
        mirrored,
        compress_ratio: 1.0,
        hash_ns: 1000.0,
        zstd_ns: 4000.0,
        ..RamProfile::default()
    }
}

fn conditions(dirty_mib: f64, bandwidth_mib: f64) -> Conditions {
    Conditions {
        dirty_bytes_per_sec: dirty_mib * MIB,
        bandwidth: bandwidth_mib * MIB,
        final_bandwidth: bandwidth_mib * MIB,
        downtime_limit: Duration::from_millis(300),
        device_state: 0.0,
    }
}

#[test]
fn an_idle_vm_sends_each_page_once_and_converges_in_one_pass() {
    let r = ram(0.5, 0.0);
    let f = forecast(&r, &conditions(0.0, 128.0), Method::Plain);
    let pages = (512 << 8) as f64;
    let expect = pages * (0.5 * QEMU_ZERO + 0.5 * QEMU_PAGE);
    assert!((f.qemu_bytes - expect).abs() < 1.0, "{f:?}");
    assert_eq!(f.qemu_bytes, f.link_bytes);
    assert!(f.converges);
    assert_eq!(
        f.iterations, 2,
        "the setup sync and the one that finds nothing dirty"
    );
    // 256 MiB of pages at 128 MiB/s.
    let t = f.total_s.unwrap();
    assert!((t - 2.0).abs() < 0.05, "{t}");
    // The last threshold's worth of pages (300 ms at QEMU's measured rate, in whole pages)
    // crosses during the pause.
    let d = f.downtime_ms.unwrap();
    assert!(d > 100.0 && d < 310.0, "{d}");
}

#[test]
fn mirrored_pages_cost_a_mapped_frame_on_the_link_and_qemu_sends_the_same() {
    let r = ram(0.25, 0.5);
    let c = conditions(0.0, 128.0);
    let plain = forecast(&r, &c, Method::Plain);
    let agents = forecast(&r, &c, Method::Agents { compress: false });
    assert!((plain.qemu_bytes - agents.qemu_bytes).abs() < 1.0);
    let pages = (512 << 8) as f64;
    let link = pages * (0.25 * QEMU_ZERO + 0.5 * LINK_MAPPED + 0.25 * LINK_PAGE);
    assert!((agents.link_bytes - link).abs() / link < 1e-6, "{agents:?}");
    assert!(agents.total_s.unwrap() < plain.total_s.unwrap() / 2.5);
}

#[test]
fn repeated_pages_cost_a_dup_frame_on_the_link_and_qemu_sends_them_whole() {
    let mut r = ram(0.25, 0.5);
    r.repeated = 0.125;
    let c = conditions(0.0, 128.0);
    let plain = forecast(&r, &c, Method::Plain);
    let agents = forecast(&r, &c, Method::Agents { compress: false });
    let pages = (512 << 8) as f64;
    let qemu = pages * (0.25 * QEMU_ZERO + 0.75 * QEMU_PAGE);
    assert!((plain.qemu_bytes - qemu).abs() < 1.0, "{plain:?}");
    assert!((agents.qemu_bytes - qemu).abs() < 1.0, "{agents:?}");
    let link =
        pages * (0.25 * QEMU_ZERO + 0.125 * LINK_DUP + 0.5 * LINK_MAPPED + 0.125 * LINK_PAGE);
    assert!((agents.link_bytes - link).abs() / link < 1e-6, "{agents:?}");
}

#[test]
fn dirtying_adds_passes_and_bytes_and_faster_than_the_link_never_converges() {
    let r = ram(0.5, 0.0);
    let idle = forecast(&r, &conditions(0.0, 64.0), Method::Plain);
    let busy = forecast(&r, &conditions(30.0, 64.0), Method::Plain);
    assert!(busy.converges, "{busy:?}");
    assert!(busy.iterations > idle.iterations);
    // Pass 1 takes 4 s, in which 120 MiB are dirtied, all re-sent (QEMU's dirty log keeps
    // every write since its last sync); the re-sends then shrink by 30/64 each pass.
    let extra = (busy.qemu_bytes - idle.qemu_bytes) / MIB;
    assert!(extra > 150.0 && extra < 260.0, "{extra} MiB");
    // A guest that only ever rewrites the same 40 MiB re-sends at most that each pass.
    let mut hot = r.clone();
    hot.working_set = Some(WorkingSet {
        bytes: 40.0 * MIB,
        over_s: 10.0,
    });
    let looping = forecast(&hot, &conditions(30.0, 64.0), Method::Plain);
    let extra = (looping.qemu_bytes - idle.qemu_bytes) / MIB;
    assert!(extra > 40.0 && extra < 100.0, "{extra} MiB");
    let hopeless = forecast(&r, &conditions(80.0, 64.0), Method::Plain);
    assert!(!hopeless.converges);
    assert_eq!(hopeless.total_s, None);
    assert!(hopeless.dirty_ratio > 1.2);
}

#[test]
fn compression_makes_the_link_carry_dirty_pages_faster() {
    let mut r = ram(0.0, 0.0);
    r.compress_ratio = 0.25;
    let c = conditions(80.0, 64.0);
    assert!(!forecast(&r, &c, Method::Agents { compress: false }).converges);
    let z = forecast(&r, &c, Method::Agents { compress: true });
    assert!(z.converges, "{z:?}");
    assert!(z.link_bytes < z.qemu_bytes / 3.0);
}

#[test]
fn the_first_passes_are_judged_strictly_and_later_ones_at_the_full_rate() {
    assert_eq!(strictness(0), 8);
    assert_eq!(strictness(2), 8, "the first pass's tail");
    assert_eq!(strictness(3), 8);
    assert_eq!(strictness(4), 4);
    assert_eq!(strictness(5), 2);
    assert_eq!(strictness(6), 1);
    assert_eq!(strictness(1000), 1);
}

#[test]
fn through_the_agents_qemu_leaves_an_eighth_for_the_pause_and_still_converges_when_dirtying() {
    let r = ram(0.5, 0.0);
    let c = conditions(0.0, 128.0);
    let plain = forecast(&r, &c, Method::Plain);
    let agents = forecast(&r, &c, Method::Agents { compress: false });
    // Told an eighth of the link's rate, QEMU ends pass 1 with an eighth of plain QEMU's tail.
    let ratio = agents.downtime_ms.unwrap() / plain.downtime_ms.unwrap();
    assert!((ratio - 0.125).abs() < 0.01, "{agents:?} against {plain:?}");
    assert_eq!(agents.iterations, plain.iterations);
    // A guest that converges plainly converges through the agents too (the full rate comes
    // back after a few passes), and pauses no longer.
    let c = conditions(30.0, 64.0);
    let plain = forecast(&r, &c, Method::Plain);
    let agents = forecast(&r, &c, Method::Agents { compress: false });
    assert!(plain.converges && agents.converges, "{agents:?}");
    assert!(
        agents.downtime_ms.unwrap() <= plain.downtime_ms.unwrap(),
        "{agents:?} against {plain:?}"
    );
}
