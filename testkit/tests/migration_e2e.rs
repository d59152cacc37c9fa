//! End to end with real QEMU (TCG): a guest on a nas-server export migrates live through two
//! agents (`agent::orchestrate::migrate` and `agent::serve::serve`, the code behind `agent
//! migrate` and `agent serve`). The target guest must carry on where the source stopped, the
//! target QEMU must receive exactly the source QEMU's bytes, and faults must never corrupt the
//! target or kill the source. An index service that refuses the session stops the migration
//! before either QEMU is told anything.
use std::{future::pending, path::Path, time::Duration};

use agent::{
    migration::{
        incoming::Delivery, link::LinkFrame, secure::LinkSecurity, target::TargetConfig,
        wire::FrameReader,
    },
    orchestrate::{migrate, MigrateOptions, MigrationReport, StreamSpec},
    qmp::Qmp,
    serve::serve,
};
use nas_proto::Endpoint;
use testkit::{
    qemu::{agent_qmp_dir, carried_on, exclusive, Pair},
    require_root,
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};

const MIB: usize = 1 << 20;

fn options(s: &Pair, agent: &str, max_bandwidth: Option<u64>) -> MigrateOptions {
    let server = s.server.as_ref().expect("server running");
    MigrateOptions {
        source_qmp: s.source.qmp_path.clone(),
        target_qmp: s.target.qmp_path.clone(),
        target_agent: agent.to_string(),
        stream: StreamSpec {
            vm: s.target.name.clone(),
            exports: vec!["disk".into()],
            nas_nbd: server.addr.to_string(),
            nas_index: Some(server.index_addr.clone()),
            nas_tls: None,
            zstd: agent::migration::compress::Compression::default(),
            passthrough: false,
            dedup_paused: false,
            record: Some(s.dir.path("source-stream.bin")),
            page_map: None,
        },
        link_security: LinkSecurity::Insecure,
        source_listen: None,
        max_bandwidth,
        progress: None,
        pause_nice: Some(-10),
        timeout: Duration::from_secs(600),
    }
}

/// Starts an in-process target agent, which finds target QEMUs in the agent QMP directory
/// beside `record`; returns its address and a stop switch.
async fn target_agent(record: &Path) -> (String, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stop_rx) = watch::channel(false);
    let dir = record.parent().expect("in the pair's directory");
    let config = TargetConfig {
        record: Some(record.to_path_buf()),
        delivery: Delivery {
            qmp_dirs: vec![agent_qmp_dir(dir)],
            ..Delivery::default()
        },
        ..TargetConfig::default()
    };
    let task = tokio::spawn(async move {
        serve(listener, config, stop_rx).await.unwrap();
    });
    (addr, stop, task)
}

/// A relay on the agent link that passes everything except the target's DONE: when DONE comes,
/// it closes both connections instead, as a network that fails right after the target agent
/// delivered the whole stream. Returns the address to give the source as its target agent.
async fn relay_losing_done(target_agent: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (source, _) = listener.accept().await.unwrap();
        let target = TcpStream::connect(&target_agent).await.unwrap();
        let (mut source_rd, mut source_wr) = source.into_split();
        let (mut target_rd, mut target_wr) = target.into_split();
        let forward = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut source_rd, &mut target_wr).await;
        });
        let mut frames = FrameReader::new();
        while let Ok(Some(frame)) = frames.next(&mut target_rd).await {
            if matches!(frame, LinkFrame::Done { .. }) {
                break;
            }
            if source_wr.write_all(&frame.to_bytes()).await.is_err() {
                break;
            }
        }
        forward.abort();
    });
    addr
}

/// The target guest runs on: heartbeats past the source's last one, and the RAM blob intact.
fn assert_guest_continues(s: &Pair) {
    if let Err(e) = carried_on(&s.source, &s.target, &s.blob) {
        panic!("{e}");
    }
}

fn assert_same_stream(s: &Pair) {
    let a = std::fs::read(s.dir.path("source-stream.bin")).unwrap();
    let b = std::fs::read(s.dir.path("target-stream.bin")).unwrap();
    assert_eq!(a.len(), b.len(), "target QEMU received a different length");
    assert!(
        a == b,
        "target QEMU received different bytes than the source QEMU sent"
    );
}

async fn status(path: &Path) -> String {
    Qmp::connect(path)
        .await
        .unwrap()
        .status()
        .await
        .unwrap()
        .to_string()
}

#[test]
fn live_migration_through_the_agents() {
    if !require_root("live_migration_through_the_agents") {
        return;
    }
    let _qemu = exclusive();
    let s = Pair::start("e2e", 512, 200, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report: MigrationReport = rt.block_on(async {
        let (agent, _stop, _task) = target_agent(&s.dir.path("target-stream.bin")).await;
        migrate(options(&s, &agent, None), pending())
            .await
            .expect("migrate")
    });
    eprintln!("{}", report.text());
    assert!(report.ok, "{report:?}");
    assert_eq!(report.source_status, "postmigrate");
    assert_eq!(report.target_status, "running");
    assert_eq!(report.target_ram_preallocated, Some(false));
    // From the source's STOP event to the target's RESUME event: both QEMUs run on this host.
    assert!(
        report.guest_paused_ms.is_some_and(|p| p < 10_000),
        "{report:?}"
    );
    // QEMU judged the switchover by the link's measured rate, and has its own setting back.
    assert!(
        report.switchover_bandwidth.is_some_and(|b| b > 1),
        "{report:?}"
    );
    let params = rt.block_on(async {
        let mut q = Qmp::connect(&s.source.qmp_path).await.unwrap();
        q.execute("query-migrate-parameters", None).await.unwrap()
    });
    assert_eq!(params["avail-switchover-bandwidth"], 0, "{params}");
    // What crossed while the guest was paused: at least the device state, never more than
    // the whole stream.
    let f = &report.figures;
    assert!(
        (1..f.qemu_bytes).contains(&f.paused_qemu_bytes) && f.paused_link_bytes <= f.link_bytes,
        "{report:?}"
    );
    assert_same_stream(&s);
    assert_guest_continues(&s);
    let pct = 100.0 * report.figures.link_bytes as f64 / report.figures.qemu_bytes as f64;
    assert!(
        pct <= 35.0,
        "agent link carried {pct:.1}% of QEMU's bytes (limit 35%)"
    );
}

#[test]
fn guest_writing_its_disk_during_migration_stays_correct() {
    if !require_root("guest_writing_its_disk_during_migration_stays_correct") {
        return;
    }
    let _qemu = exclusive();
    // Also the one run whose target preallocates its RAM: the report must say so.
    let s = Pair::start("e2e-writes", 256, 64, true, true);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let (agent, _stop, _task) = target_agent(&s.dir.path("target-stream.bin")).await;
        // QEMU hands its stream to the source agent over a unix socket here.
        let mut options = options(&s, &agent, Some(8 * MIB as u64));
        options.source_listen = Some(Endpoint::Unix(s.dir.path("source-agent.sock")));
        migrate(options, pending()).await.expect("migrate")
    });
    eprintln!("{}", report.text());
    assert!(report.ok, "{report:?}");
    assert_eq!(report.target_ram_preallocated, Some(true));
    assert_same_stream(&s);
    assert_guest_continues(&s);
}

#[test]
fn nas_killed_mid_migration_never_corrupts_the_target() {
    if !require_root("nas_killed_mid_migration_never_corrupts_the_target") {
        return;
    }
    let _qemu = exclusive();
    let mut s = Pair::start("e2e-nas-killed", 256, 64, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let (agent, _stop, _task) = target_agent(&s.dir.path("target-stream.bin")).await;
        let opts = options(&s, &agent, Some(8 * MIB as u64));
        let running = tokio::spawn(migrate(opts, pending()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        // The storage node goes away while pages are still being mapped and fetched.
        let server = s.server.take().unwrap();
        tokio::task::spawn_blocking(move || drop(server))
            .await
            .unwrap();
        running.await.unwrap().expect("migrate returns a report")
    });
    eprintln!("{}", report.text());
    if report.ok {
        assert_same_stream(&s);
        assert_guest_continues(&s);
    } else {
        assert_eq!(rt.block_on(status(&s.source.qmp_path)), "running");
    }
}

#[test]
fn target_agent_dying_leaves_the_source_running() {
    if !require_root("target_agent_dying_leaves_the_source_running") {
        return;
    }
    let _qemu = exclusive();
    let s = Pair::start("e2e-agent-dies", 256, 64, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let (agent, _stop, task) = target_agent(&s.dir.path("target-stream.bin")).await;
        let running = tokio::spawn(migrate(
            options(&s, &agent, Some(4 * MIB as u64)),
            pending(),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        task.abort();
        running.await.unwrap().expect("migrate returns a report")
    });
    eprintln!("{}", report.text());
    assert!(
        !report.ok,
        "migration cannot succeed without its target agent"
    );
    assert_eq!(report.source_status, "running");
    s.source.assert_runs_on();
}

#[test]
fn an_index_service_refusal_stops_the_migration_before_either_qemu_is_told() {
    if !require_root("an_index_service_refusal_stops_the_migration_before_either_qemu_is_told") {
        return;
    }
    let _qemu = exclusive();
    let s = Pair::start("e2e-index-refuses", 256, 16, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        // No target agent listens there: the refusal must come before the link is opened.
        let mut opts = options(&s, "127.0.0.1:9", None);
        opts.stream.exports = vec!["not-on-this-nas".into()];
        migrate(opts, pending())
            .await
            .expect_err("an export the NAS does not serve is refused")
    });
    let msg = err.to_string();
    assert!(
        msg.starts_with("index service at") && msg.contains("no export named \"not-on-this-nas\""),
        "{msg}"
    );
    assert_eq!(rt.block_on(status(&s.source.qmp_path)), "running");
    assert_eq!(rt.block_on(status(&s.target.qmp_path)), "inmigrate");
    // The source QEMU was never asked to migrate: it has no migration to report.
    let info = rt.block_on(async {
        let mut qmp = Qmp::connect(&s.source.qmp_path).await.unwrap();
        qmp.execute("query-migrate", None).await.unwrap()
    });
    assert!(info.get("status").is_none(), "{info}");
}

#[test]
fn a_link_lost_after_the_target_took_over_never_resumes_the_source() {
    if !require_root("a_link_lost_after_the_target_took_over_never_resumes_the_source") {
        return;
    }
    let _qemu = exclusive();
    let s = Pair::start("e2e-done-lost", 256, 64, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let (agent, _stop, _task) = target_agent(&s.dir.path("target-stream.bin")).await;
        let relay = relay_losing_done(agent).await;
        migrate(options(&s, &relay, None), pending())
            .await
            .expect("migrate returns a report")
    });
    eprintln!("{}", report.text());
    // The target QEMU got the whole stream and runs the guest: two running copies of one guest
    // on one disk would corrupt it, so the source must stay paused. The guest moved, and the
    // report says what went wrong on the way.
    assert_eq!(report.target_status, "running", "{report:?}");
    assert_eq!(report.source_status, "postmigrate", "{report:?}");
    assert!(report.ok, "{report:?}");
    assert!(
        report
            .warning
            .as_deref()
            .is_some_and(|w| w.contains("target closed the link")),
        "{report:?}"
    );
    assert_same_stream(&s);
    assert_guest_continues(&s);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rt.block_on(status(&s.source.qmp_path)), "postmigrate");
}

#[test]
fn cancelling_mid_migration_leaves_the_guest_running_on_the_source() {
    if !require_root("cancelling_mid_migration_leaves_the_guest_running_on_the_source") {
        return;
    }
    let _qemu = exclusive();
    let s = Pair::start("e2e-cancel", 256, 64, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let operators = rt.block_on(max_bandwidth(&s.source.qmp_path));
    let report = rt.block_on(async {
        let (agent, _stop, _task) = target_agent(&s.dir.path("target-stream.bin")).await;
        // At 4 MiB/s on the link the stream takes several seconds: the operator cancels
        // half-way.
        let cancel = tokio::time::sleep(Duration::from_secs(3));
        migrate(options(&s, &agent, Some(4 * MIB as u64)), cancel)
            .await
            .expect("migrate returns a report")
    });
    eprintln!("{}", report.text());
    assert!(!report.ok, "{report:?}");
    assert_eq!(
        report.error.as_deref(),
        Some("cancelled by the operator"),
        "{report:?}"
    );
    assert_eq!(report.source_status, "running");
    assert_ne!(report.target_status, "running");
    let (info, params) = rt.block_on(async {
        let mut q = Qmp::connect(&s.source.qmp_path).await.unwrap();
        (
            q.execute("query-migrate", None).await.unwrap(),
            q.execute("query-migrate-parameters", None).await.unwrap(),
        )
    });
    assert!(
        matches!(info["status"].as_str(), Some("cancelled" | "failed")),
        "{info}"
    );
    // The parameters `agent migrate` managed are the operator's again.
    assert_eq!(params["avail-switchover-bandwidth"], 0, "{params}");
    assert_eq!(params["max-bandwidth"], operators, "{params}");
    s.source.assert_runs_on();
}

#[test]
fn the_operators_bandwidth_cap_moves_from_qemus_stream_onto_the_link() {
    if !require_root("the_operators_bandwidth_cap_moves_from_qemus_stream_onto_the_link") {
        return;
    }
    let _qemu = exclusive();
    let s = Pair::start("e2e-bandwidth", 256, 64, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        // The operator caps the migration the usual way, at 4 MiB/s: slow enough that it is
        // still running when the operator raises the cap below.
        let mut operator = Qmp::connect(&s.source.operator_qmp_path).await.unwrap();
        set_max_bandwidth(&mut operator, 4 * MIB as u64).await;
        let (agent, _stop, _task) = target_agent(&s.dir.path("target-stream.bin")).await;
        let running = tokio::spawn(migrate(options(&s, &agent, None), pending()));
        // `agent migrate` lifts QEMU's own cap: the stream to the local agent is not held to it.
        let start = std::time::Instant::now();
        loop {
            let params = operator
                .execute("query-migrate-parameters", None)
                .await
                .unwrap();
            if params["max-bandwidth"] == agent::orchestrate::bandwidth::LIFTED {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{params}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let info = operator.execute("query-migrate", None).await.unwrap();
        assert_eq!(
            info["status"], "active",
            "finished before the operator acted"
        );
        // The operator raises the cap mid-migration, as `virsh migrate-setspeed` does.
        set_max_bandwidth(&mut operator, 64 * MIB as u64).await;
        running.await.unwrap().expect("migrate returns a report")
    });
    eprintln!("{}", report.text());
    assert!(report.ok, "{report:?}");
    assert_eq!(report.link_bandwidth, Some(64 * MIB as u64), "the new cap");
    assert_same_stream(&s);
    assert_guest_continues(&s);
    // QEMU has the operator's latest value back.
    assert_eq!(
        rt.block_on(max_bandwidth(&s.source.qmp_path)),
        64 * MIB as u64
    );
}

async fn max_bandwidth(qmp: &Path) -> u64 {
    let mut q = Qmp::connect(qmp).await.unwrap();
    let params = q.execute("query-migrate-parameters", None).await.unwrap();
    params["max-bandwidth"]
        .as_u64()
        .expect("QEMU has max-bandwidth")
}

async fn set_max_bandwidth(q: &mut Qmp, bytes_per_sec: u64) {
    q.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": bytes_per_sec })),
    )
    .await
    .unwrap();
}

#[test]
fn a_target_started_paused_as_libvirt_starts_it_runs_the_guest_after_loading() {
    if !require_root("a_target_started_paused_as_libvirt_starts_it_runs_the_guest_after_loading") {
        return;
    }
    let _qemu = exclusive();
    // -S: after loading the stream the target QEMU waits, paused, to be told `cont`.
    let s = Pair::start_with_paused_target("e2e-paused-target", 256, 64);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let (agent, _stop, _task) = target_agent(&s.dir.path("target-stream.bin")).await;
        migrate(options(&s, &agent, None), pending())
            .await
            .expect("migrate")
    });
    eprintln!("{}", report.text());
    assert!(report.ok, "{report:?}");
    assert_eq!(report.source_status, "postmigrate");
    assert_eq!(report.target_status, "running");
    assert_same_stream(&s);
    assert_guest_continues(&s);
}

/// Resolves once the source QEMU stops the guest for its final iteration (the STOP event, on
/// the operator's monitor, which `migrate` does not hold).
async fn stopped(operator_qmp: &Path) {
    let mut qmp = Qmp::connect(operator_qmp).await.unwrap();
    loop {
        let event = qmp.next_event().await.expect("the source QEMU's monitor");
        if event["event"] == "STOP" {
            return;
        }
    }
}

/// A relay on the agent link that cuts both connections once `cut` resolves.
async fn relay_cut_when(
    target_agent: String,
    cut: impl std::future::Future<Output = ()> + Send + 'static,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (source, _) = listener.accept().await.unwrap();
        let target = TcpStream::connect(&target_agent).await.unwrap();
        let (mut source_rd, mut source_wr) = source.into_split();
        let (mut target_rd, mut target_wr) = target.into_split();
        tokio::select! {
            _ = tokio::io::copy(&mut source_rd, &mut target_wr) => {}
            _ = tokio::io::copy(&mut target_rd, &mut source_wr) => {}
            () = cut => {}
        }
        // Dropping the halves closes both connections.
    });
    addr
}

/// After a fault, the guest runs on exactly one side: the target with exactly the source's
/// stream, or the source, never both.
fn assert_runs_on_exactly_one_side(
    rt: &tokio::runtime::Runtime,
    s: &Pair,
    report: &MigrationReport,
) {
    // A target QEMU that failed to load an incomplete stream may have exited.
    let status_or_gone = |path: &Path| {
        rt.block_on(async {
            match Qmp::connect(path).await {
                Ok(mut q) => q
                    .status()
                    .await
                    .map_or("gone".to_string(), |s| s.to_string()),
                Err(_) => "gone".to_string(),
            }
        })
    };
    let source = status_or_gone(&s.source.qmp_path);
    let target = status_or_gone(&s.target.qmp_path);
    assert!(
        !(source == "running" && target == "running"),
        "the guest runs on both sides: {report:?}"
    );
    if report.ok {
        assert_eq!(target, "running", "{report:?}");
        assert_same_stream(s);
        assert_guest_continues(s);
    } else {
        assert_eq!(source, "running", "{report:?}");
        assert_ne!(target, "running", "{report:?}");
        s.source.assert_runs_on();
    }
}

#[test]
fn the_link_cut_while_the_guest_is_paused_leaves_it_on_exactly_one_side() {
    if !require_root("the_link_cut_while_the_guest_is_paused_leaves_it_on_exactly_one_side") {
        return;
    }
    let _qemu = exclusive();
    let s = Pair::start("e2e-pause-link-cut", 256, 64, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let (agent, _stop, _task) = target_agent(&s.dir.path("target-stream.bin")).await;
        let relay = relay_cut_when(agent, {
            let operator = s.source.operator_qmp_path.clone();
            async move { stopped(&operator).await }
        })
        .await;
        migrate(options(&s, &relay, None), pending())
            .await
            .expect("migrate returns a report")
    });
    eprintln!("{}", report.text());
    assert!(
        !report.ok,
        "the link was cut before the stream ended: {report:?}"
    );
    assert_runs_on_exactly_one_side(&rt, &s, &report);
}

#[test]
fn the_nas_gone_while_the_guest_is_paused_leaves_it_on_exactly_one_side() {
    if !require_root("the_nas_gone_while_the_guest_is_paused_leaves_it_on_exactly_one_side") {
        return;
    }
    let _qemu = exclusive();
    let mut s = Pair::start("e2e-pause-nas-gone", 256, 64, false, false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (agent, _stop, _task) = rt.block_on(target_agent(&s.dir.path("target-stream.bin")));
    // The options name the server's addresses: taken before it goes.
    let mut opts = options(&s, &agent, None);
    opts.timeout = Duration::from_secs(120);
    let server = s.server.take().unwrap();
    let operator = s.source.operator_qmp_path.clone();
    let report = rt.block_on(async {
        let killer = tokio::spawn(async move {
            stopped(&operator).await;
            tokio::task::spawn_blocking(move || drop(server))
                .await
                .unwrap();
        });
        let report = migrate(opts, pending())
            .await
            .expect("migrate returns a report");
        tokio::time::timeout(Duration::from_secs(30), killer)
            .await
            .expect("the source QEMU stopped the guest")
            .unwrap();
        report
    });
    eprintln!("{}", report.text());
    assert_runs_on_exactly_one_side(&rt, &s, &report);
}
