//! The agent binaries as operators and scripts run them.
//!
//! The path docs/operating.md gives libvirt and QMP scripts: `agent serve` on the target host, `agent
//! source` on the source host, and the test driving both QEMUs over QMP as a script (or
//! libvirt) would: `migrate-incoming` on the target (registered with `agent serve --expect`),
//! `migrate` on the source, over a mutually authenticated TLS link. And `agent migrate` as an operator runs it, the target agent
//! finding the target QEMU by name, interrupted with Ctrl-C half-way.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::qmp::Qmp;
use serde_json::{json, Value};
use testkit::{
    free_port,
    nbd_fixture::NbdFixture,
    qemu::{agent_qmp_dir, carried_on, exclusive, Pair},
    require_root,
    tls::test_creds,
    Running, Scratch,
};

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
    cmd.env("RUST_LOG", "info");
    cmd
}

/// `agent source` for VM `vm` on `export` of `server`, listening for QEMU on `listen`.
fn agent_source(
    server: &NbdFixture,
    listen: &Path,
    target_agent: u16,
    vm: &str,
    export: &str,
) -> Command {
    let mut cmd = agent();
    cmd.arg("source")
        .arg("--listen")
        .arg(format!("unix:{}", listen.display()))
        .args(["--target-agent", &format!("127.0.0.1:{target_agent}")])
        .args(["--vm", vm])
        .args(["--export", export])
        .args(["--nas-nbd", &server.addr.to_string()])
        .args(["--nas-index", &server.index_addr.to_string()]);
    cmd
}

/// Waits for `cond`, polling, or panics with `what`.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Prometheus text `agent serve --metrics` serves on `port`.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    // HTTP/1.0: the whole body, not chunked, then the server closes.
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    c.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}

async fn execute(qmp: &Path, command: &str, args: Option<Value>) -> Value {
    let mut q = Qmp::connect(qmp).await.expect("QMP");
    q.execute(command, args)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

#[test]
fn agent_source_and_agent_serve_migrate_a_guest_driven_over_qmp() {
    if !require_root("agent_source_and_agent_serve_migrate_a_guest_driven_over_qmp") {
        return;
    }
    let _qemu = exclusive();
    let pair = Pair::start("qmp-script", 256, 64, false, false);
    let (link, incoming, metrics) = (free_port(), free_port(), free_port());
    // As with libvirt, the script issues `migrate-incoming`: the operator registers with the
    // target agent where that VM's QEMU listens.
    let expect = format!("{}=tcp:127.0.0.1:{incoming}", pair.target.name);
    // Mutual TLS on the agent link, as in production.
    let creds = test_creds(&pair.dir.0);
    let _serve = Running(
        agent()
            .args(["serve", "--link-listen", &format!("127.0.0.1:{link}")])
            .arg("--tls-creds")
            .arg(&creds.target)
            .args(["--tls-allow-source", "source.example"])
            .args(["--expect", &expect])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("start agent serve"),
    );
    let sock = pair.dir.path("migrate.sock");
    let server = pair.server.as_ref().expect("server running");
    // The link is capped as an operator would cap it for libvirt (QEMU's own limit lifted
    // below), generously enough not to slow the test down much.
    let cap = 64u64 << 20;
    let source = agent_source(server, &sock, link, &pair.target.name, "disk")
        .arg("--tls-creds")
        .arg(&creds.source)
        .args(["--max-bandwidth", &cap.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start agent source");
    let mut source = Running(source);
    // It binds its listener only after the index service accepted the session.
    wait_for("agent source listening", Duration::from_secs(30), || {
        sock.exists()
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let info = rt.block_on(async {
        let uncapped = json!({ "max-bandwidth": 100_000_000_000u64 });
        execute(
            &pair.source.qmp_path,
            "migrate-set-parameters",
            Some(uncapped),
        )
        .await;
        let uri = json!({ "uri": format!("tcp:127.0.0.1:{incoming}") });
        execute(&pair.target.qmp_path, "migrate-incoming", Some(uri)).await;
        let uri = json!({ "uri": format!("unix:{}", sock.display()) });
        execute(&pair.source.qmp_path, "migrate", Some(uri)).await;
        let start = Instant::now();
        loop {
            let info = execute(&pair.source.qmp_path, "query-migrate", None).await;
            if let Some("completed" | "failed" | "cancelled") = info["status"].as_str() {
                break info;
            }
            assert!(start.elapsed() < Duration::from_secs(600), "{info}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert_eq!(info["status"], "completed", "{info}");

    // `agent source` ends by itself once the migration is done and prints its report.
    let stdout = source.0.stdout.take().unwrap();
    wait_for("agent source exiting", Duration::from_secs(60), || {
        source.0.try_wait().unwrap().is_some()
    });
    let status = source.0.wait().unwrap();
    assert!(status.success(), "agent source: {status}");
    let report: Value = serde_json::from_reader(stdout).expect("agent source prints JSON");
    eprintln!("{report}");
    let figure = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
    // The guest read 64 MiB of the disk: nearly all of those pages are in its RAM and mapped,
    // each costing a MAPPED frame instead of its 4 KiB.
    assert!(figure("pages_mapped") >= 16384 * 95 / 100, "{report}");
    assert_eq!(figure("pages_fallback"), 0, "{report}");
    // The target's figures reach this report too: it fetched every mapped page from the NAS.
    assert_eq!(
        figure("nas_bytes"),
        figure("pages_mapped") * 4096,
        "{report}"
    );
    assert!(
        report["savings_pct"].as_f64().is_some_and(|p| p > 0.0),
        "{report}"
    );
    assert_eq!(figure("link_bandwidth"), cap, "{report}");
    assert!(
        (1..figure("qemu_bytes")).contains(&figure("paused_qemu_bytes")),
        "{report}"
    );
    // `agent serve` counts the session for Prometheus: one delivered migration, every byte of
    // QEMU's stream, and the NAS bytes the report names.
    // It counts once the session has ended, which may be just after `agent source` exits.
    wait_for(
        "agent serve counting the session",
        Duration::from_secs(10),
        || scrape(metrics).contains("agent_serve_migrations_total"),
    );
    let scraped = scrape(metrics);
    for (line, value) in [
        ("agent_serve_migrations_total{result=\"ok\"}", 1),
        ("agent_serve_qemu_bytes_total", figure("qemu_bytes")),
        ("agent_serve_nas_bytes_total", figure("nas_bytes")),
        ("agent_serve_fallback_pages_total", 0),
    ] {
        assert!(
            scraped.lines().any(|l| l == format!("{line} {value}")),
            "no `{line} {value}` in:\n{scraped}"
        );
    }
    assert!(
        figure("link_bytes") <= figure("qemu_bytes") - figure("pages_mapped") * 4032,
        "{report}"
    );

    let status = |qmp: &Path| {
        rt.block_on(async { Qmp::connect(qmp).await.unwrap().status().await.unwrap() })
    };
    assert_eq!(status(&pair.source.qmp_path), "postmigrate");
    assert_eq!(status(&pair.target.qmp_path), "running");
    if let Err(e) = carried_on(&pair.source, &pair.target, &pair.blob) {
        panic!("{e}");
    }
}

#[test]
fn agent_source_refuses_an_export_the_nas_does_not_serve_before_it_listens() {
    // No QEMU is needed: the refusal comes before `agent source` listens for one.
    let dir = Scratch::new("qmp-script-refused");
    let server = NbdFixture::start(&[("disk", &dir.image("disk.raw", 1 << 20), false)]);
    let sock = dir.path("migrate.sock");
    let mut child = Running(
        agent_source(&server, &sock, free_port(), "vm1", "not-on-this-nas")
            .arg("--insecure")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent source"),
    );
    wait_for("agent source refusing", Duration::from_secs(30), || {
        sock.exists() || child.0.try_wait().unwrap().is_some()
    });
    assert!(!sock.exists(), "agent source listened before the check");
    let status = child.0.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("index service at")
            && stderr.contains("no export named \"not-on-this-nas\""),
        "{stderr}"
    );
}

#[test]
fn ctrl_c_cancels_agent_migrate_and_the_source_runs_on() {
    if !require_root("ctrl_c_cancels_agent_migrate_and_the_source_runs_on") {
        return;
    }
    let _qemu = exclusive();
    let pair = Pair::start("cli-cancel", 256, 64, false, false);
    let operators = tokio::runtime::Runtime::new().unwrap().block_on(execute(
        &pair.source.qmp_path,
        "query-migrate-parameters",
        None,
    ))["max-bandwidth"]
        .clone();
    let link = free_port();
    let mut serve = Running(
        agent()
            .args([
                "serve",
                "--insecure",
                "--link-listen",
                &format!("127.0.0.1:{link}"),
            ])
            .arg("--qmp-dir")
            .arg(agent_qmp_dir(&pair.dir.0))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent serve"),
    );
    // Its log says when a migration's stream begins (QEMU's monitor takes one client at a
    // time, and `agent migrate` holds it, so the test cannot ask QEMU).
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let serve_log = std::io::BufReader::new(serve.0.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(serve_log).map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let server = pair.server.as_ref().expect("server running");
    let mut migrate = Running(
        agent()
            .arg("migrate")
            .arg("--source-qmp")
            .arg(&pair.source.qmp_path)
            .arg("--target-qmp")
            .arg(&pair.target.qmp_path)
            .args(["--target-agent", &format!("127.0.0.1:{link}")])
            .args(["--export", "disk"])
            .args(["--nas-nbd", &server.addr.to_string()])
            .args(["--nas-index", &server.index_addr.to_string()])
            // 4 MiB/s on the link: the stream takes several seconds, so Ctrl-C lands half-way.
            .args([
                "--max-bandwidth",
                &(4u64 << 20).to_string(),
                "--json",
                "--insecure",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent migrate"),
    );
    wait_for("the stream beginning", Duration::from_secs(60), || {
        lines
            .try_recv()
            .is_ok_and(|l| l.contains("incoming migration"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        migrate.0.try_wait().unwrap().is_none(),
        "agent migrate ended before Ctrl-C"
    );
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(migrate.0.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    wait_for("agent migrate exiting", Duration::from_secs(60), || {
        migrate.0.try_wait().unwrap().is_some()
    });
    let status = migrate.0.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut migrate.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("migration failed; the source VM is running"),
        "{stderr}"
    );
    let report: Value =
        serde_json::from_reader(migrate.0.stdout.take().unwrap()).expect("a JSON report");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"], "cancelled by the operator", "{report}");
    assert_eq!(report["source_status"], "running", "{report}");
    // Cancelled half-way: QEMU had sent part of its stream.
    let sent = report["qemu_bytes"].as_u64().unwrap_or(0);
    assert!(
        sent > 0 && report["total_time_ms"].as_u64() > Some(0),
        "{report}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let query = |command: &str| rt.block_on(execute(&pair.source.qmp_path, command, None));

    let info = query("query-migrate");
    assert!(
        matches!(info["status"].as_str(), Some("cancelled" | "failed")),
        "{info}"
    );
    let params = query("query-migrate-parameters");
    assert_eq!(params["avail-switchover-bandwidth"], 0, "{params}");
    assert_eq!(params["max-bandwidth"], operators, "{params}");
    pair.source.assert_runs_on();
}
