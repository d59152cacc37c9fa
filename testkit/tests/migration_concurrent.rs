//! A host evacuation, small: four guests of 256 MiB, each on its own export of one
//! nas-server, migrate all at once from one source host to two target agents (two VMs each,
//! over mutual TLS), as `agent migrate` runs them.
//!
//! 1. Every guest carries on at its target with its memory intact, and every migration places
//!    the pages its guest read by mapping.
//! 2. Faults under that load, all in one run: one source agent dies (its migration task is
//!    dropped, closing its sockets as a kill -9 would), one target agent dies with both its
//!    sessions, and the NAS goes away. No guest is corrupted or runs twice, and every guest
//!    runs somewhere: where a migration reports success, the guest carries on at its target
//!    and the source stays paused; elsewhere it runs on at its source and its target QEMU is
//!    not running it.
//!
//! (A target over its session limit refusing cleanly is `agent/tests/serve_delivery.rs`'s.)
use std::{path::Path, time::Duration};

use agent::{
    migration::{incoming::Delivery, secure::LinkSecurity, target::TargetConfig},
    orchestrate::{migrate, MigrateOptions, MigrationReport, StreamSpec},
    qmp::Qmp,
    serve::serve,
};
use testkit::{
    nbd_fixture::{ExportConf, NbdFixture},
    qemu::{agent_qmp_dir, carried_on, exclusive, Guest, GuestSpec},
    require_root,
    tls::{test_creds, TestCreds},
    Scratch,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

const VMS: usize = 4;
const MEM_MB: u32 = 256;
const READ_MB: u32 = 48;

/// The source host's guests and their waiting targets, on one nas-server.
struct Fleet {
    dir: Scratch,
    creds: TestCreds,
    server: Option<NbdFixture>,
    names: Vec<String>,
    sources: Vec<Guest>,
    targets: Vec<Guest>,
    blobs: Vec<String>,
}

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
        fill_gate: false,
        dirty_mb: 0,
        native_aio: false,
        fs_read: false,
    }
}

impl Fleet {
    fn start(tag: &str) -> Fleet {
        let dir = Scratch::new(tag);
        let creds = test_creds(&dir.0);
        let names: Vec<String> = (0..VMS).map(|i| format!("vm{i}")).collect();
        let disks: Vec<_> = (0..VMS)
            .map(|i| {
                let p = dir.path(&format!("vm{i}.raw"));
                std::fs::write(&p, testkit::pattern(100 + i as u64, 256 << 20)).unwrap();
                p
            })
            .collect();
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
        // Sources boot together; the targets start once every source is ready.
        let uris: Vec<String> = names.iter().map(|n| server.uri(n)).collect();
        let sources: Vec<Guest> = (0..VMS)
            .map(|i| Guest::start(&dir.0, &spec(&format!("src{i}"), &uris[i], false)))
            .collect();
        let blobs = sources
            .iter()
            .map(|s| {
                s.wait_line("QEVAL-READY", 0, Duration::from_secs(600));
                s.blob_sums()[0].clone()
            })
            .collect();
        let targets = (0..VMS)
            .map(|i| Guest::start(&dir.0, &spec(&names[i], &uris[i], true)))
            .collect();
        Fleet {
            dir,
            creds,
            server: Some(server),
            names,
            sources,
            targets,
            blobs,
        }
    }

    /// Starts VM `i`'s migration to the target agent at `agent`, its link capped at `cap`,
    /// given up after `timeout`.
    fn migrate(
        &self,
        i: usize,
        agent: &str,
        (cap, timeout): (u64, Duration),
    ) -> JoinHandle<MigrationReport> {
        let server = self.server.as_ref().expect("the NAS runs");
        let options = MigrateOptions {
            source_qmp: self.sources[i].qmp_path.clone(),
            target_qmp: self.targets[i].qmp_path.clone(),
            target_agent: agent.to_string(),
            stream: StreamSpec {
                vm: self.names[i].clone(),
                exports: vec![self.names[i].clone()],
                nas_nbd: server.addr.to_string(),
                nas_index: Some(server.index_addr.clone()),
                nas_tls: None,
                zstd: agent::migration::compress::Compression::default(),
                passthrough: false,
                dedup_paused: false,
                record: None,
                page_map: None,
            },
            link_security: LinkSecurity::configure(Some(&self.creds.source), false, Vec::new())
                .unwrap(),
            source_listen: None,
            max_bandwidth: Some(cap),
            progress: None,
            pause_nice: Some(-10),
            timeout,
        };
        tokio::spawn(async move {
            migrate(options, std::future::pending())
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        })
    }
}

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

/// `query-status` of the QEMU behind `qmp`; `None` once it is gone.
async fn state(qmp: &Path) -> Option<String> {
    let mut q = Qmp::connect(qmp).await.ok()?;
    q.status().await.ok().map(|s| s.to_string())
}

#[test]
fn four_guests_evacuate_at_once_to_two_target_agents() {
    if !require_root("four_guests_evacuate_at_once_to_two_target_agents") {
        return;
    }
    let _qemu = exclusive();
    let fleet = Fleet::start("evacuate");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reports: Vec<MigrationReport> = rt.block_on(async {
        let (a, _stop_a) = target_agent(&fleet.dir.0, &fleet.creds.target, 2).await;
        let (b, _stop_b) = target_agent(&fleet.dir.0, &fleet.creds.target, 2).await;
        let runs: Vec<_> = (0..VMS)
            .map(|i| {
                let agent = if i % 2 == 0 { &a } else { &b };
                fleet.migrate(i, agent, (0, Duration::from_secs(900)))
            })
            .collect();
        let mut reports = Vec::new();
        for run in runs {
            reports.push(run.await.unwrap());
        }
        reports
    });
    let mut ms = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        eprintln!(
            "vm{i}: ok {} in {} ms, {} pages mapped, {} link bytes of {} QEMU bytes, paused {:?} ms",
            r.ok,
            r.total_time_ms,
            r.figures.pages_mapped,
            r.figures.link_bytes,
            r.figures.qemu_bytes,
            r.guest_paused_ms
        );
        assert!(r.ok, "vm{i}: {:?}", r.error);
        // The guest read READ_MB of its disk: most of those pages are placed by mapping.
        assert!(
            r.figures.pages_mapped >= u64::from(READ_MB) * 256 * 8 / 10,
            "vm{i}: {} pages mapped",
            r.figures.pages_mapped
        );
        ms.push(r.total_time_ms);
        carried_on(&fleet.sources[i], &fleet.targets[i], &fleet.blobs[i])
            .unwrap_or_else(|e| panic!("vm{i}: {e}"));
    }
    ms.sort_unstable();
    eprintln!("per-VM time: {} to {} ms", ms[0], ms[VMS - 1]);
}

#[test]
fn faults_under_concurrent_load_never_corrupt_or_duplicate_a_guest() {
    if !require_root("faults_under_concurrent_load_never_corrupt_or_duplicate_a_guest") {
        return;
    }
    let _qemu = exclusive();
    let mut fleet = Fleet::start("evacuate-faults");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reports: Vec<Option<MigrationReport>> = rt.block_on(async {
        let (a, _stop_a) = target_agent(&fleet.dir.0, &fleet.creds.target, 2).await;
        let (b, stop_b) = target_agent(&fleet.dir.0, &fleet.creds.target, 2).await;
        // 8 MiB/s per link: each migration takes several seconds, so the faults land mid-way.
        // A source QEMU whose disk went with the NAS can hang in its switchover (flushing that
        // disk); its migration then ends at the timeout, like `agent migrate --timeout`.
        let runs: Vec<_> = (0..VMS)
            .map(|i| {
                let agent = if i % 2 == 0 { &a } else { &b };
                fleet.migrate(i, agent, (8 << 20, Duration::from_secs(120)))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        // vm0's source agent dies (its sockets close with it).
        runs[0].abort();
        // Target agent b dies with its sessions (vm1, vm3).
        let _ = stop_b.send(true);
        // The NAS goes away while vm2 still fetches through agent a.
        let server = fleet.server.take().unwrap();
        tokio::task::spawn_blocking(move || drop(server))
            .await
            .unwrap();
        let mut reports = Vec::new();
        for run in runs {
            reports.push(run.await.ok());
        }
        reports
    });
    for (i, report) in reports.iter().enumerate() {
        let (source, target) = (&fleet.sources[i], &fleet.targets[i]);
        let moved = report.as_ref().is_some_and(|r| r.ok);
        eprintln!(
            "vm{i}: {}",
            match report {
                Some(r) => format!(
                    "ok {}, error {:?}, fallbacks {}",
                    r.ok, r.error, r.figures.fallbacks
                ),
                None => "source agent killed".into(),
            }
        );
        if moved {
            carried_on(source, target, &fleet.blobs[i]).unwrap_or_else(|e| panic!("vm{i}: {e}"));
            assert_eq!(
                rt.block_on(state(&source.qmp_path)).as_deref(),
                Some("postmigrate"),
                "vm{i}: the source must stay paused"
            );
            continue;
        }
        // Not moved: the guest runs on at its source, and only there. A source agent that
        // died leaves QEMU to notice its closed socket, which may take a moment.
        let mut at_source = None;
        for _ in 0..60 {
            at_source = rt.block_on(state(&source.qmp_path));
            if at_source.as_deref() == Some("running") {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(at_source.as_deref(), Some("running"), "vm{i}: {report:?}");
        source.assert_runs_on();
        let at_target = rt.block_on(state(&target.qmp_path));
        assert_ne!(at_target.as_deref(), Some("running"), "vm{i} runs twice");
    }
    assert!(
        reports[1..].iter().all(Option::is_some),
        "only vm0's source agent was killed"
    );
    let moved = reports.iter().flatten().filter(|r| r.ok).count();
    eprintln!("moved despite the faults: {moved} of {VMS}");
}
