//! Mutual TLS on the agent link, against `agent serve` as operators run it. A source with the
//! right credentials gets through to the protocol; one without a client certificate, with one
//! from another CA, or with a name the target's allow-list lacks, is refused in the handshake
//! and the target never reads a HELLO from it; a plaintext client gets nothing; and a source
//! refuses a target whose certificate does not name the host it dialled. Without credentials
//! or `--insecure`, the agents do not start.
use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent::migration::{
    link::{Hello, LinkFrame, VERSION},
    secure::LinkSecurity,
};
use testkit::{free_port, qemu::agent_qmp_dir, tls::test_creds, Running, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `agent serve` with `args` on a free port, logging to `log`; the port.
fn serve(args: &[&str], log: &Path) -> (Running, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["serve", "--link-listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start agent serve");
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("listening")
    {
        assert!(Instant::now() < deadline, "agent serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (running, port)
}

/// Connects with the credentials in `creds` (or in plaintext) and sends a HELLO for `vm`;
/// the target's first frame, or why there was none.
async fn try_source(creds: Option<&Path>, port: u16, vm: &str) -> Result<LinkFrame, String> {
    let security = LinkSecurity::configure(creds, creds.is_none(), Vec::new()).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut link = security
        .connect(tcp, &addr)
        .await
        .map_err(|e| e.to_string())?;
    let hello = LinkFrame::Hello(Hello {
        version: VERSION,
        vm: vm.into(),
        exports: Vec::new(),
        nas: "127.0.0.1:1".into(),
        caps: 0,
    });
    link.write_all(&hello.to_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok((frame, _)) = LinkFrame::parse(&buf) {
            return Ok(frame);
        }
        let read = tokio::time::timeout(Duration::from_secs(15), link.read(&mut chunk)).await;
        match read {
            Ok(Ok(0)) => return Err("closed".into()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no answer".into()),
        }
    }
}

#[test]
fn the_link_is_mutually_authenticated_before_any_hello() {
    let dir = Scratch::new("link-tls");
    let creds = test_creds(&dir.0);
    let qmp_dir = agent_qmp_dir(&dir.0);
    let log = dir.path("serve.log");
    let (_serve, port) = serve(
        &[
            "--tls-creds",
            creds.target.to_str().unwrap(),
            "--tls-allow-source",
            "source.example",
            "--qmp-dir",
            qmp_dir.to_str().unwrap(),
        ],
        &log,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The right source reaches the protocol: its HELLO is read and answered.
    match rt.block_on(try_source(Some(&creds.source), port, "nobody")) {
        Ok(LinkFrame::Error { message }) => assert!(message.contains("no VM named"), "{message}"),
        other => panic!("expected the target's ERROR over TLS, got {other:?}"),
    }
    // ("incoming migration" is logged for each HELLO read.)
    let answered = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        answered.matches("incoming migration").count(),
        1,
        "{answered}"
    );

    for (who, creds) in [
        ("no client certificate", Some(creds.anonymous.as_path())),
        ("another CA's certificate", Some(creds.foreign.as_path())),
        ("a name not allowed", Some(creds.stranger.as_path())),
        ("plaintext", None),
    ] {
        let outcome = rt.block_on(try_source(creds, port, "nobody"));
        assert!(
            !matches!(
                outcome,
                Ok(LinkFrame::Error { .. } | LinkFrame::HelloAck { .. })
            ),
            "{who}: {outcome:?}"
        );
    }
    // Each was refused in the handshake (the plaintext HELLO is no TLS handshake either), and
    // no further HELLO was read.
    let deadline = Instant::now() + Duration::from_secs(20);
    let log_text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.matches("link refused").count() >= 4 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(log_text.matches("link refused").count(), 4, "{log_text}");
    assert!(
        log_text.contains("not among the allowed sources"),
        "{log_text}"
    );
    assert_eq!(
        log_text.matches("incoming migration").count(),
        1,
        "{log_text}"
    );
    assert_eq!(
        log_text.matches("before its HELLO").count(),
        0,
        "{log_text}"
    );
}

#[test]
fn a_source_refuses_a_target_whose_certificate_names_another_host() {
    let dir = Scratch::new("link-tls-name");
    let creds = test_creds(&dir.0);
    let log = dir.path("serve.log");
    let (_serve, port) = serve(&["--tls-creds", creds.misnamed.to_str().unwrap()], &log);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(try_source(Some(&creds.source), port, "vm1"))
        .expect_err("refused");
    assert!(
        e.contains("TLS handshake") && e.contains("not valid for name"),
        "{e}"
    );
}

#[test]
fn the_agents_start_only_with_credentials_or_an_explicit_opt_out() {
    for args in [
        &["serve", "--link-listen", "127.0.0.1:0"][..],
        &[
            "daemon",
            "--link-listen",
            "127.0.0.1:0",
            "--control",
            "/nonexistent/c.sock",
        ],
        &[
            "source",
            "--target-agent",
            "127.0.0.1:1",
            "--vm",
            "v",
            "--export",
            "e",
        ],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{args:?} kept running");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!child.wait().unwrap().success(), "{args:?}");
        assert!(
            stderr.contains("--tls-creds DIR") && stderr.contains("--insecure"),
            "{args:?}: {stderr}"
        );
    }
}
