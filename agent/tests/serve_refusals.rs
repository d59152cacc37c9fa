//! `agent serve` answers a session it will not serve with the link's ERROR frame. It delivers
//! only where its operator allows: a source naming a target QEMU off loopback, or a unix socket
//! outside the directories given with `--incoming-dir`, is refused and nothing is connected; a
//! socket inside one is connected to. A source of another link version is told both versions,
//! and one beyond `--max-sessions` that the agent is busy.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::migration::link::{Hello, LinkFrame, CAP_ZSTD, VERSION};
use testkit::{free_port, Running, Scratch};

/// `agent serve` on a free loopback port, with `args`; the port.
fn serve(args: &[&str]) -> (Running, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["serve", "--link-listen", &format!("127.0.0.1:{port}")])
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

/// Sends a HELLO naming `incoming`; returns the link, to read the answer from.
fn hello(port: u16, incoming: &str) -> TcpStream {
    hello_version(port, incoming, VERSION)
}

fn hello_version(port: u16, incoming: &str, version: u16) -> TcpStream {
    let mut link = TcpStream::connect(("127.0.0.1", port)).unwrap();
    link.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let hello = LinkFrame::Hello(Hello {
        version,
        vm: "vm1".into(),
        exports: vec![(1, "disk".into())],
        nas: "127.0.0.1:1".into(),
        incoming: incoming.into(),
        caps: CAP_ZSTD,
    });
    link.write_all(&hello.to_bytes()).unwrap();
    link
}

/// The first frame the target agent answers with.
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

#[test]
fn incoming_addresses_off_loopback_or_outside_allowed_directories_are_refused() {
    let dir = Scratch::new("serve-incoming");
    let (allowed, elsewhere) = (dir.path("allowed"), dir.path("elsewhere"));
    for d in [&allowed, &elsewhere] {
        std::fs::create_dir_all(d).unwrap();
    }
    let outside = UnixListener::bind(elsewhere.join("daemon.sock")).unwrap();
    outside.set_nonblocking(true).unwrap();
    let inside = UnixListener::bind(allowed.join("vm1.sock")).unwrap();
    let uri = |p: &Path| format!("unix:{}", p.display());

    // Defaults: loopback TCP only, no unix sockets. 192.0.2.1 is a documentation address and is
    // never contacted: the refusal comes first.
    let (_serve, port) = serve(&[]);
    let message = refusal(&mut hello(port, "tcp:192.0.2.1:4444"));
    assert!(message.contains("not on loopback"), "{message}");
    let message = refusal(&mut hello(port, &uri(&allowed.join("vm1.sock"))));
    assert!(message.contains("--incoming-dir"), "{message}");

    // With a directory allowed: a socket there is connected to, one elsewhere (also through a
    // path that climbs out of the directory) is not.
    let (_serve, port) = serve(&["--incoming-dir", allowed.to_str().unwrap()]);
    let climbing = allowed.join("../elsewhere/daemon.sock");
    for bad in [elsewhere.join("daemon.sock"), climbing] {
        let message = refusal(&mut hello(port, &uri(&bad)));
        assert!(message.contains("not a socket in a directory"), "{message}");
    }
    assert!(
        outside.accept().is_err(),
        "agent serve connected to a socket outside the allowed directory"
    );
    let _link = hello(port, &uri(&allowed.join("vm1.sock")));
    let (mut qemu, _) = inside
        .accept()
        .expect("agent serve connects to the allowed socket");
    // The stream it delivers starts with what the source sends after HELLO: nothing yet.
    qemu.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(qemu.read(&mut byte), Err(_) | Ok(0)));
}

#[test]
fn a_source_of_another_link_version_is_told_both_versions() {
    let (_serve, port) = serve(&[]);
    let message = refusal(&mut hello_version(port, "tcp:127.0.0.1:1", VERSION + 1));
    assert!(
        message.contains(&format!("source speaks version {}", VERSION + 1))
            && message.contains(&format!("this agent {VERSION}")),
        "{message}"
    );
}

#[test]
fn a_source_beyond_the_session_limit_is_told_the_agent_is_busy() {
    let (_serve, port) = serve(&["--max-sessions", "1"]);
    // The first session gets as far as its target QEMU (a listener here) and stays open. It
    // may find the slot still held by the probe that saw the port open: then it is told the
    // agent is busy, and tries again.
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    qemu.set_nonblocking(true).unwrap();
    let incoming = format!("tcp:{}", qemu.local_addr().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let (_first, _delivering) = loop {
        assert!(Instant::now() < deadline, "no session got through");
        let first = hello(port, &incoming);
        if let Some(delivering) = accept_within(&qemu, Duration::from_secs(2)) {
            break (first, delivering);
        }
    };
    let message = refusal(&mut hello(port, "tcp:127.0.0.1:1"));
    assert!(
        message.contains("busy: 1 migration(s) under way"),
        "{message}"
    );
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
