//! Where `agent serve` delivers a stream, and what it refuses. A source names a VM, never an
//! address: a VM the target host does not know (no `VM.qmp` in its QMP directory, no
//! registration) is refused with the link's ERROR and nothing is connected, whatever listens
//! on the host. A known VM's QEMU is checked to wait for a migration and handed a socket pair
//! by the agent itself. Bytes that are not QEMU's savevm stream are refused at both ends
//! before any reaches a QEMU (the attack the security issue reproduced, re-run here with the
//! project's binaries). A source of another link version is told both versions, and one
//! beyond `--max-sessions` that the agent is busy.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::migration::link::{Hello, LinkFrame, VERSION};
use testkit::{free_port, qemu::agent_qmp_dir, Running, Scratch};

/// `agent serve` on a free loopback port, with `args`; the port.
fn serve(args: &[&str]) -> (Running, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args([
            "serve",
            "--insecure",
            "--link-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("start agent serve");
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "agent serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (running, port)
}

/// Sends a HELLO naming `vm`; returns the link, to read the answer from.
fn hello(port: u16, vm: &str) -> TcpStream {
    hello_version(port, vm, VERSION)
}

fn hello_version(port: u16, vm: &str, version: u16) -> TcpStream {
    let mut link = TcpStream::connect(("127.0.0.1", port)).unwrap();
    link.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let hello = LinkFrame::Hello(Hello {
        version,
        vm: vm.into(),
        exports: vec![(1, "disk".into())],
        nas: "127.0.0.1:1".into(),
        caps: 0,
    });
    link.write_all(&hello.to_bytes()).unwrap();
    link
}

/// The next frame the target agent sends.
fn answer(link: &mut TcpStream) -> LinkFrame {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok((frame, _)) = LinkFrame::parse(&buf) {
            return frame;
        }
        let n = link.read(&mut chunk).expect("an answer from agent serve");
        assert!(n > 0, "agent serve closed the link without an answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn refusal(link: &mut TcpStream) -> String {
    match answer(link) {
        LinkFrame::Error { message } => message,
        other => panic!("expected ERROR, got {other:?}"),
    }
}

/// A connection to the non-blocking `listener` within `limit`, if one comes.
fn accept_within(listener: &TcpListener, limit: Duration) -> Option<TcpStream> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok((c, _)) = listener.accept() {
            return Some(c);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A loopback listener standing for a service on the target host (a Redis, an admin API).
fn bystander() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    (l, uri)
}

#[test]
fn a_source_can_name_only_vms_this_host_knows_and_never_an_address() {
    let dir = Scratch::new("serve-names");
    let qmp_dir = agent_qmp_dir(&dir.0);
    let (service, service_uri) = bystander();
    let (_serve, port) = serve(&["--qmp-dir", qmp_dir.to_str().unwrap()]);
    for vm in ["redis", "vm1", &service_uri, "127.0.0.1:6379"] {
        let message = refusal(&mut hello(port, vm));
        assert!(
            message.contains("no VM named") || message.contains("invalid VM name"),
            "{vm}: {message}"
        );
    }
    for vm in ["../control", "a/b", ".hidden", ""] {
        let message = refusal(&mut hello(port, vm));
        assert!(message.contains("invalid VM name"), "{vm}: {message}");
    }
    // A socket in the directory that is no QEMU's monitor is not one either.
    std::fs::write(qmp_dir.join("plain.qmp"), b"").unwrap();
    assert!(refusal(&mut hello(port, "plain")).contains("not a socket"));
    assert!(
        accept_within(&service, Duration::from_millis(300)).is_none(),
        "agent serve connected to a service the source named"
    );
}

/// The reproduction of the security issue, with the project's binaries: `agent source`
/// whose QEMU listener receives a Redis command instead of a migration. It refuses the
/// stream before it says anything to the target agent; and a hand-written link client that
/// sends the same bytes to a registered VM gets them refused by the target agent before any
/// reaches that VM's incoming socket.
#[test]
fn bytes_that_are_not_a_qemu_stream_are_refused_at_both_ends() {
    let dir = Scratch::new("serve-savevm");
    let (registered, registered_uri) = bystander();
    let expect = format!("vm1={registered_uri}");
    let (_serve, port) = serve(&["--expect", &expect]);

    // The source end.
    let listen = free_port();
    let mut source = Running(
        Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["source", "--listen", &format!("127.0.0.1:{listen}")])
            .args(["--target-agent", &format!("127.0.0.1:{port}")])
            .args(["--vm", "vm1", "--export", "vm", "--no-index", "--insecure"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent source"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut qemu = loop {
        match TcpStream::connect(("127.0.0.1", listen)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("agent source did not listen: {e}"),
        }
    };
    qemu.write_all(b"SET owned-by-anyone 1\r\n").unwrap();
    let status = source.0.wait().unwrap();
    let mut stderr = String::new();
    source
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("not a QEMU migration stream"), "{stderr}");
    assert!(
        accept_within(&registered, Duration::from_millis(300)).is_none(),
        "the target agent was reached"
    );

    // The target end, for a client that skips `agent source`.
    let mut link = hello(port, "vm1");
    assert!(matches!(answer(&mut link), LinkFrame::HelloAck { .. }));
    let mut delivered = accept_within(&registered, Duration::from_secs(10))
        .expect("the registered VM's incoming socket is connected");
    link.write_all(&LinkFrame::Raw(b"SET owned-by-anyone 1\r\n".to_vec()).to_bytes())
        .unwrap();
    link.write_all(
        &LinkFrame::End {
            stats: Default::default(),
        }
        .to_bytes(),
    )
    .unwrap();
    loop {
        match answer(&mut link) {
            LinkFrame::Done { outcome } => {
                let why = outcome.expect_err("delivery refused");
                assert!(why.contains("not a QEMU migration stream"), "{why}");
                break;
            }
            LinkFrame::Ack { .. } => continue,
            other => panic!("expected DONE, got {other:?}"),
        }
    }
    delivered.set_nonblocking(false).unwrap();
    delivered
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = delivered.read_to_end(&mut got);
    assert!(got.is_empty(), "bytes reached the incoming socket: {got:?}");
    drop(dir);
}

/// The agent's own path into a QEMU: found by name in its QMP directory, checked to wait for
/// a migration, handed a socket pair. A QEMU that is not waiting is refused. (`-machine
/// none`: no guest is needed to see QEMU take the descriptor.)
#[test]
fn a_vm_found_by_name_is_handed_a_socket_only_when_it_waits_for_a_migration() {
    testkit::require_tool("qemu-system-x86_64");
    let dir = Scratch::new("serve-handover");
    let qmp_dir = agent_qmp_dir(&dir.0);
    let qemu = |name: &str, incoming: bool| {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "none", "-nodefaults", "-display", "none"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                qmp_dir.join(format!("{name}.qmp")).display()
            ))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.path(&format!("{name}-operator.qmp")).display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let running = Running(cmd.spawn().expect("start qemu-system-x86_64"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.path(&format!("{name}-operator.qmp")).exists() {
            assert!(Instant::now() < deadline, "QEMU did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        running
    };
    let _waiting = qemu("waiting", true);
    let _running = qemu("running", false);
    let (_serve, port) = serve(&["--qmp-dir", qmp_dir.to_str().unwrap()]);

    let message = refusal(&mut hello(port, "running"));
    assert!(message.contains("not waiting for a migration"), "{message}");

    let mut link = hello(port, "waiting");
    assert!(matches!(answer(&mut link), LinkFrame::HelloAck { .. }));
    // QEMU took the descriptor and listens on it: its incoming migration has begun.
    let status = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut q = agent::qmp::Qmp::connect(&dir.path("waiting-operator.qmp"))
            .await
            .unwrap();
        q.execute("query-migrate", None).await.unwrap()
    });
    assert_eq!(status["status"], "setup", "{status}");
    // A second source for the same VM finds its incoming migration taken.
    let message = refusal(&mut hello(port, "waiting"));
    assert!(message.contains("migrate-incoming"), "{message}");
}

#[test]
fn registrations_that_name_places_the_policy_refuses_stop_the_agent_at_start() {
    let dir = Scratch::new("serve-expect");
    for (expect, why) in [
        ("vm1=tcp:192.0.2.1:4444", "not on loopback"),
        (
            &*format!("vm1=unix:{}", dir.path("vm1.sock").display()),
            "--incoming-dir",
        ),
        ("../x=tcp:127.0.0.1:1", "invalid VM name"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["serve", "--insecure", "--link-listen", "127.0.0.1:0"])
            .args(["--expect", expect])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{expect}: {stderr}");
        assert!(stderr.contains(why), "{expect}: {stderr}");
    }
}

#[test]
fn a_source_of_another_link_version_is_told_both_versions() {
    let (_serve, port) = serve(&[]);
    let message = refusal(&mut hello_version(port, "vm1", VERSION + 1));
    assert!(
        message.contains(&format!("source speaks version {}", VERSION + 1))
            && message.contains(&format!("this agent {VERSION}")),
        "{message}"
    );
}

#[test]
fn a_source_beyond_the_session_limit_is_told_the_agent_is_busy() {
    // The first session gets as far as its target QEMU (a registered listener here) and stays
    // open. It may find the slot still held by the probe that saw the port open: then it is
    // told the agent is busy, and tries again.
    let (qemu, uri) = bystander();
    let expect = format!("vm1={uri}");
    let (_serve, port) = serve(&["--max-sessions", "1", "--expect", &expect]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (_first, _delivering) = loop {
        assert!(Instant::now() < deadline, "no session got through");
        let first = hello(port, "vm1");
        if let Some(delivering) = accept_within(&qemu, Duration::from_secs(2)) {
            break (first, delivering);
        }
    };
    let message = refusal(&mut hello(port, "vm1"));
    assert!(
        message.contains("busy: 1 migration(s) under way"),
        "{message}"
    );
}
