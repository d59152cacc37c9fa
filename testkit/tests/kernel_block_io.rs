//! Kernel test: the block-I/O probe loads, attaches to `block:block_rq_issue` and counts real
//! O_DIRECT writes on the disk under the test's scratch directory.
use std::os::unix::fs::MetadataExt;

use agent::telemetry::{device, BlockIoProbe, ObjectSource};
use agent_common::IoDrop;

const WRITES: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_probe_counts_direct_writes() {
    if !testkit::require_root("block_probe_counts_direct_writes") {
        return;
    }
    let probe = BlockIoProbe::attach(&ObjectSource::Embedded)
        .unwrap_or_else(|e| panic!("cannot attach the block-I/O probe: {e}"));

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("block-probe-{}.bin", std::process::id()));
    let file = testkit::open_direct(&path)
        .unwrap_or_else(|e| panic!("{} does not support O_DIRECT: {e}", path.display()));
    let dev = device::whole_disk(device::kernel_dev_from_st_dev(
        file.metadata().expect("stat scratch file").dev(),
    ))
    .expect("resolve the scratch file's disk");

    let before = probe.snapshot().expect("read the probe's maps");
    testkit::direct_writes(&file, WRITES).expect("O_DIRECT writes");
    file.sync_all().expect("fsync");
    let after = probe.snapshot().expect("read the probe's maps");
    std::fs::remove_file(&path).ok();

    let (b, a) = (before.device(dev), after.device(dev));
    let me = std::process::id();
    eprintln!(
        "disk {}: requests {} -> {}, bytes {} -> {}; this process: {} requests",
        device::display(dev),
        b.requests,
        a.requests,
        b.bytes,
        a.bytes,
        after.process(me).requests - before.process(me).requests
    );
    assert!(
        a.requests - b.requests >= WRITES,
        "issued {WRITES} O_DIRECT writes but the probe counted {} requests on disk {}",
        a.requests - b.requests,
        device::display(dev)
    );
    assert!(
        a.bytes - b.bytes >= WRITES * 4096,
        "issued {} bytes but the probe counted {}",
        WRITES * 4096,
        a.bytes - b.bytes
    );
    assert_eq!(
        after.drops[IoDrop::ReadFailed as usize],
        0,
        "the probe failed to read tracepoint records"
    );
}
