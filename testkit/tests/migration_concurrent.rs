//! A host evacuation, small: four guests of 256 MiB, each on its own export of one
//! nas-server, migrate all at once from one source host to two target agents (two VMs each,
//! over mutual TLS), as `agent migrate` runs them. Every guest must carry on at its target
//! with its memory intact, and every migration must place the pages its guest read by mapping.
//! (A target over its session limit refusing cleanly is `agent/tests/serve_delivery.rs`'s.)
use std::{path::Path, sync::Arc, time::Duration};

use agent::{
    migration::{incoming::Delivery, secure::LinkSecurity, target::TargetConfig},
    orchestrate::{migrate, MigrateOptions, StreamSpec},
    serve::serve,
};
use testkit::{
    nbd_fixture::{ExportConf, NbdFixture},
    qemu::{agent_qmp_dir, carried_on, exclusive, Guest, GuestSpec},
    require_root,
    tls::test_creds,
    Scratch,
};
use tokio::{net::TcpListener, sync::watch};

const VMS: usize = 4;
const MEM_MB: u32 = 256;
const READ_MB: u32 = 48;

/// A target agent on a free port with `max_sessions`; its address and stop switch.
async fn target_agent(
    dir: &Path,
    creds: &Path,
    max_sessions: usize,
) -> (String, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stop_rx) = watch::channel(false);
    let config = TargetConfig {
        delivery: Delivery {
            qmp_dirs: vec![agent_qmp_dir(dir)],
            ..Delivery::default()
        },
        link_security: LinkSecurity::configure(Some(creds), false, Vec::new()).unwrap(),
        max_sessions,
        ..TargetConfig::default()
    };
    tokio::spawn(async move { serve(listener, config, stop_rx).await.unwrap() });
    (addr, stop)
}

#[test]
fn four_guests_evacuate_at_once_to_two_target_agents() {
    if !require_root("four_guests_evacuate_at_once_to_two_target_agents") {
        return;
    }
    let _qemu = exclusive();
    let dir = Scratch::new("evacuate");
    let creds = test_creds(&dir.0);
    let disks: Vec<_> = (0..VMS)
        .map(|i| {
            let p = dir.path(&format!("vm{i}.raw"));
            std::fs::write(&p, testkit::pattern(100 + i as u64, 256 << 20)).unwrap();
            p
        })
        .collect();
    let names: Vec<String> = (0..VMS).map(|i| format!("vm{i}")).collect();
    let confs: Vec<ExportConf> = names
        .iter()
        .zip(&disks)
        .map(|(name, path)| ExportConf {
            name,
            path,
            read_only: false,
            shared: false,
        })
        .collect();
    let server = NbdFixture::start_with(&confs, 262_144);
    fn spec<'a>(name: &'a str, uri: &'a str, incoming: bool) -> GuestSpec<'a> {
        GuestSpec {
            name,
            mem_mb: MEM_MB,
            read_mb: READ_MB,
            disk_uri: uri,
            disk_writes: false,
            incoming,
            paused: false,
            prealloc: false,
            qemu: None,
            iothread: false,
            fill_mb: 0,
        }
    }
    // Sources boot together; each target is started once its source is ready.
    let uris: Vec<String> = names.iter().map(|n| server.uri(n)).collect();
    let sources: Vec<Guest> = (0..VMS)
        .map(|i| Guest::start(&dir.0, &spec(&format!("src{i}"), &uris[i], false)))
        .collect();
    let blobs: Vec<String> = sources
        .iter()
        .map(|s| {
            s.wait_line("QEVAL-READY", 0, Duration::from_secs(600));
            s.blob_sums()[0].clone()
        })
        .collect();
    let targets: Vec<Guest> = (0..VMS)
        .map(|i| Guest::start(&dir.0, &spec(&names[i], &uris[i], true)))
        .collect();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let reports = rt.block_on(async {
        let (a, _stop_a) = target_agent(&dir.0, &creds.target, 2).await;
        let (b, _stop_b) = target_agent(&dir.0, &creds.target, 2).await;
        let security =
            Arc::new(LinkSecurity::configure(Some(&creds.source), false, Vec::new()).unwrap());
        let mut runs = tokio::task::JoinSet::new();
        for i in 0..VMS {
            let options = MigrateOptions {
                source_qmp: sources[i].qmp_path.clone(),
                target_qmp: targets[i].qmp_path.clone(),
                target_agent: if i % 2 == 0 { a.clone() } else { b.clone() },
                stream: StreamSpec {
                    vm: names[i].clone(),
                    exports: vec![names[i].clone()],
                    nas_nbd: server.addr.to_string(),
                    nas_index: Some(server.index_addr.clone()),
                    nas_tls: None,
                    zstd: agent::migration::compress::Compression::default(),
                    passthrough: false,
                    record: None,
                    page_map: None,
                },
                link_security: (*security).clone(),
                source_listen: None,
                max_bandwidth: Some(0),
                progress: None,
                timeout: Duration::from_secs(900),
            };
            runs.spawn(async move { (i, migrate(options, std::future::pending()).await) });
        }
        let mut reports = vec![None; VMS];
        while let Some(done) = runs.join_next().await {
            let (i, report) = done.unwrap();
            reports[i] = Some(report.unwrap_or_else(|e| panic!("vm{i}: {e}")));
        }
        reports
    });
    let mut ms = Vec::new();
    for (i, report) in reports.into_iter().enumerate() {
        let r = report.unwrap();
        eprintln!(
            "vm{i}: ok {} in {} ms, {} pages mapped, {} link bytes of {} QEMU bytes, paused {:?} ms",
            r.ok, r.total_time_ms, r.figures.pages_mapped, r.figures.link_bytes,
            r.figures.qemu_bytes, r.guest_paused_ms
        );
        assert!(r.ok, "vm{i}: {:?}", r.error);
        // The guest read READ_MB of its disk: most of those pages are placed by mapping.
        assert!(
            r.figures.pages_mapped >= u64::from(READ_MB) * 256 * 8 / 10,
            "vm{i}: {} pages mapped",
            r.figures.pages_mapped
        );
        ms.push(r.total_time_ms);
        carried_on(&sources[i], &targets[i], &blobs[i]).unwrap_or_else(|e| panic!("vm{i}: {e}"));
    }
    ms.sort_unstable();
    eprintln!("per-VM time: {} to {} ms", ms[0], ms[VMS - 1]);
}
