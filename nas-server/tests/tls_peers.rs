//! NBD over TLS (NBD_OPT_STARTTLS) against the peers operators use: QEMU's NBD client
//! (`qemu-img` with a `tls-creds-x509` object), and libnbd's `nbdinfo` and `nbdcopy` with
//! `nbds://` URIs, all reading the credentials in QEMU's layout. Under `--tls require` a
//! plaintext client gets nothing; under `optional` it gets the exports open to anyone. An
//! export with an allow-list serves only the client identities it names, and is not even
//! listed to others.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use tls_creds::generate::{test_creds, TestCreds};

/// nas-server, its NBD address and its index service's.
struct Server(Child, String, String);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nas-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The test needs these peers; a missing one fails the test with its name.
fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is not installed: run `cargo xtask setup`");
}

/// nas-server with the test image as `disk` (anyone) and `secret` (only source.example).
fn start(dir: &Path, creds: &TestCreds, mode: &str) -> Server {
    let image = dir.join("disk.raw");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(&image, &data).unwrap();
    let secret = dir.join("secret.raw");
    std::fs::write(&secret, vec![0x5e; 1 << 20]).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nas-server"))
        .args(["--listen", "127.0.0.1:0", "--index-listen", "127.0.0.1:0"])
        .arg("--export")
        .arg(format!("disk={}", image.display()))
        .arg("--export")
        .arg(format!("secret={},allow=source.example", secret.display()))
        .arg("--tls-creds")
        .arg(&creds.target)
        .args(["--tls", mode])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nas-server");
    // Its log is read to the end in a thread (a closed pipe would fail its writes), and
    // kept for a failing test to show.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("nas-server: {line}");
            for what in ["listening on ", "index service on "] {
                if let Some(rest) = line.split(what).nth(1) {
                    let _ = tx.send(rest.trim().to_string());
                }
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("nas-server did not start listening")
    };
    let (nbd, index) = (next(), next());
    Server(child, nbd, index)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run a peer")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `qemu-img ARGS` on export `name` over TLS with the credentials in `creds`.
fn qemu_img_tls(sub: &[&str], addr: &str, name: &str, creds: &Path) -> Output {
    let (host, port) = addr.rsplit_once(':').unwrap();
    run(Command::new("qemu-img")
        .args(sub)
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            creds.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host={host},port={port},export={name},tls-creds=tls0"
        )))
}

fn nbds(addr: &str, name: &str, creds: &Path) -> String {
    format!("nbds://{addr}/{name}?tls-certificates={}", creds.display())
}

#[test]
fn qemu_and_libnbd_read_over_tls_and_plaintext_is_refused_when_required() {
    for tool in ["qemu-img", "nbdinfo", "nbdcopy"] {
        require(tool);
    }
    let dir = scratch("require");
    let creds = test_creds(&dir);
    let server = start(&dir, &creds, "require");
    let addr = server.1.clone();

    // QEMU's NBD client over TLS: the image reads back byte for byte.
    let info = qemu_img_tls(&["info", "--output=json"], &addr, "disk", &creds.source);
    assert!(info.status.success(), "{}", text(&info));
    assert!(
        text(&info).contains("\"virtual-size\": 4194304"),
        "{}",
        text(&info)
    );
    let (host, port) = addr.rsplit_once(':').unwrap();
    let compare = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw"])
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            creds.source.display()
        ))
        .arg(dir.join("disk.raw"))
        .arg(format!(
            "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"nbd\",\"host\":\"{host}\",\"port\":\"{port}\",\"export\":\"disk\",\"tls-creds\":\"tls0\"}}}}"
        )));
    assert!(compare.status.success(), "{}", text(&compare));

    // libnbd over TLS: nbdinfo, and nbdcopy copying the export out whole.
    let out = run(Command::new("nbdinfo").arg(nbds(&addr, "disk", &creds.source)));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("4194304"), "{}", text(&out));
    let copy = dir.join("copy.raw");
    let out = run(Command::new("nbdcopy")
        .arg(nbds(&addr, "disk", &creds.source))
        .arg(&copy));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(dir.join("disk.raw")).unwrap(),
        "nbdcopy over TLS copied other bytes"
    );
    // An anonymous TLS client (no certificate) reads exports open to anyone.
    let out = run(Command::new("nbdinfo").arg(nbds(&addr, "disk", &creds.anonymous)));
    assert!(out.status.success(), "{}", text(&out));

    // Plaintext clients get the protocol's own refusal.
    let out = run(Command::new("nbdinfo").arg(format!("nbd://{addr}/disk")));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).to_lowercase().contains("tls"), "{}", text(&out));
    let out = run(Command::new("qemu-img").args(["info", &format!("nbd://{addr}/disk")]));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("TLS"), "{}", text(&out));
}

#[test]
fn an_export_allow_list_serves_only_the_identities_it_names() {
    for tool in ["qemu-img", "nbdinfo"] {
        require(tool);
    }
    let dir = scratch("allow");
    let creds = test_creds(&dir);
    let server = start(&dir, &creds, "optional");
    let addr = server.1.clone();

    let out = run(Command::new("nbdinfo").arg(nbds(&addr, "secret", &creds.source)));
    assert!(out.status.success(), "{}", text(&out));
    let out = qemu_img_tls(&["info"], &addr, "secret", &creds.source);
    assert!(out.status.success(), "{}", text(&out));
    for (who, other) in [
        ("another identity", &creds.stranger),
        ("no certificate", &creds.anonymous),
    ] {
        let out = run(Command::new("nbdinfo").arg(nbds(&addr, "secret", other)));
        assert!(!out.status.success(), "{who}: {}", text(&out));
        assert!(text(&out).contains("opt_go"), "{who}: {}", text(&out));
        // QEMU shows the server's reason.
        let out = qemu_img_tls(&["info"], &addr, "secret", other);
        assert!(!out.status.success(), "{who}: {}", text(&out));
        assert!(
            text(&out).contains("may not use this export"),
            "{who}: {}",
            text(&out)
        );
        // Not even listed.
        let out = run(Command::new("nbdinfo")
            .arg("--list")
            .arg(nbds(&addr, "", other)));
        assert!(out.status.success(), "{who}: {}", text(&out));
        assert!(
            text(&out).contains("disk") && !text(&out).contains("secret"),
            "{who}: {}",
            text(&out)
        );
    }
    // Under `optional`, plaintext reads the open export, not the restricted one.
    let out = run(Command::new("nbdinfo").arg(format!("nbd://{addr}/disk")));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(Command::new("nbdinfo").arg(format!("nbd://{addr}/secret")));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("TLS"), "{}", text(&out));
}

/// The agents' own clients: NBD (STARTTLS) and the index service (TLS from its first byte),
/// with the same credentials, and the refusals a plaintext or unentitled session gets.
#[test]
fn the_agents_clients_speak_tls_and_name_only_their_exports() {
    use nas_client::{index::IndexClient, nbd::NbdClient, tls::StorageTls};
    use nas_proto::Endpoint;
    let dir = scratch("clients");
    let creds = test_creds(&dir);
    let server = start(&dir, &creds, "require");
    let (nbd, index): (Endpoint, Endpoint) = (server.1.parse().unwrap(), server.2.parse().unwrap());
    let tls = |d: &Path| StorageTls::load(Some(d)).unwrap().unwrap();
    let (source, stranger) = (tls(&creds.source), tls(&creds.stranger));
    let image = std::fs::read(dir.join("disk.raw")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect_with(&nbd, "disk", Some(&source))
            .await
            .unwrap();
        let got = c.read_many(&[(8192, 4096)], 4).await.unwrap();
        assert_eq!(got[0].as_deref().unwrap(), &image[8192..12288]);
        let e = NbdClient::connect(&nbd, "disk")
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("requires TLS"), "{e}");
        let e = NbdClient::connect_with(&nbd, "secret", Some(&stranger))
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("may not use this export"), "{e}");

        let ok = IndexClient::connect_with(&index, &["secret".into()], Some(&source)).await;
        assert!(ok.is_ok(), "{:?}", ok.err());
        let e = IndexClient::connect_with(&index, &["secret".into()], Some(&stranger))
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("may not name export"), "{e}");
        let e = IndexClient::connect(&index, &["disk".into()])
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("requires TLS"), "{e}");
    });
}
