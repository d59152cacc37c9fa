//! The nas-server binary: configuration errors, graceful shutdown on SIGTERM, and durability of
//! acknowledged flushes across kill -9.
use std::{
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

struct Server {
    child: Child,
    addr: String,
    /// Log lines up to and including "listening on".
    startup: Vec<String>,
    log: mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nas-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(image: &std::path::Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nas-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--index-listen",
            "127.0.0.1:0",
            "--export",
        ])
        .arg(format!("d={}", image.display()))
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nas-server");
    let (tx, log) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut startup = Vec::new();
    loop {
        let Ok(line) = log.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            child.kill().ok();
            child.wait().ok();
            panic!("nas-server did not report its address");
        };
        startup.push(line.clone());
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.trim().to_string();
            return Server {
                child,
                addr,
                startup,
                log,
            };
        }
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "nas-server did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn client(addr: &str) -> nbd::client::NbdClient<TcpStream> {
    let mut tcp = TcpStream::connect(addr).unwrap();
    let export = nbd::client::handshake(&mut tcp, b"d").unwrap();
    nbd::client::NbdClient::new(tcp, &export)
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = scratch("sigterm");
    let image = dir.join("d.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut server = start(&image, &[]);
    let mut c = client(&server.addr);
    c.write_all(&[0x42; 4096]).unwrap();
    signal(&server.child, libc::SIGTERM);
    let status = wait(&mut server.child, Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    let log: Vec<String> = server.log.try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("stopped cleanly")),
        "{log:#?}"
    );
    // The write completed before shutdown, so it is in the image.
    assert_eq!(&std::fs::read(&image).unwrap()[..4096], &[0x42; 4096][..]);
    // The connection was closed by the server.
    let mut buf = [0u8; 512];
    c.seek(SeekFrom::Start(0)).unwrap();
    assert!(c.read_exact(&mut buf).is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn flushed_data_survives_kill_9() {
    let dir = scratch("kill9");
    let image = dir.join("d.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut server = start(&image, &[]);
    let mut c = client(&server.addr);
    c.seek(SeekFrom::Start(65536)).unwrap();
    c.write_all(&[0x17; 8192]).unwrap();
    c.flush().unwrap();
    signal(&server.child, libc::SIGKILL);
    wait(&mut server.child, Duration::from_secs(20));
    assert_eq!(
        &std::fs::read(&image).unwrap()[65536..65536 + 8192],
        &[0x17; 8192][..]
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn configuration_errors_are_clear() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nas-server"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--export", "nopath"]).contains("expected NAME=PATH"));
    assert!(run(&[]).contains("no exports configured"));
    assert!(run(&["--export", "a=/nonexistent/disk.raw"]).contains("/nonexistent/disk.raw"));
    assert!(run(&["--export", "a=/x", "--listen", "nowhere"]).contains("neither HOST:PORT"));
}

#[test]
fn persisted_index_survives_restarts_and_crashes() {
    let dir = scratch("persist");
    let image = dir.join("d.raw");
    std::fs::write(&image, vec![0x61u8; 4 << 20]).unwrap();
    let index_dir = dir.join("index");
    let args = ["--index-dir", index_dir.to_str().unwrap()];
    let recovery = |server: &Server| {
        server
            .startup
            .iter()
            .find(|l| l.contains("index restored"))
            .cloned()
            .unwrap_or_else(|| panic!("no recovery line in {:#?}", server.startup))
    };
    let mut s = start(&image, &args);
    assert!(recovery(&s).contains("Fresh"), "{}", recovery(&s));
    client(&s.addr).write_all(&[0x62; 8192]).unwrap();
    signal(&s.child, libc::SIGTERM);
    assert!(wait(&mut s.child, Duration::from_secs(20)).success());
    // Clean stop: the next start loads the index without hashing.
    let mut s = start(&image, &args);
    assert!(recovery(&s).contains("Clean"), "{}", recovery(&s));
    let mut c = client(&s.addr);
    c.seek(SeekFrom::Start(3 << 20)).unwrap();
    c.write_all(&[0x63; 4096]).unwrap();
    c.flush().unwrap();
    signal(&s.child, libc::SIGKILL);
    wait(&mut s.child, Duration::from_secs(20));
    // Crash: only the journalled region is rehashed.
    let mut s = start(&image, &args);
    assert!(
        recovery(&s).contains("Journal { regions: 1 }"),
        "{}",
        recovery(&s)
    );
    signal(&s.child, libc::SIGTERM);
    assert!(wait(&mut s.child, Duration::from_secs(20)).success());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn prometheus_metrics_are_served() {
    let dir = scratch("metrics");
    let image = dir.join("d.raw");
    std::fs::write(&image, vec![0x33u8; 1 << 20]).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let mut s = start(&image, &["--metrics", &metrics]);
    let mut c = client(&s.addr);
    let mut buf = vec![0u8; 8192];
    c.read_exact(&mut buf).unwrap();
    let mut http = TcpStream::connect(&metrics).unwrap();
    http.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    http.read_to_string(&mut page).unwrap();
    for name in [
        "nbd_requests_total{type=\"read\"}",
        "nbd_bytes_total{type=\"read\"}",
        "nbd_connections_total",
        "nas_index_distinct_blocks 1",
    ] {
        assert!(page.contains(name), "{name} missing from:\n{page}");
    }
    signal(&s.child, libc::SIGTERM);
    assert!(wait(&mut s.child, Duration::from_secs(20)).success());
    std::fs::remove_dir_all(dir).ok();
}
