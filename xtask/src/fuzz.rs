//! `cargo xtask fuzz`: record real sessions as seeds, then run every cargo-fuzz target.
//!
//! nas-server's targets (`nas-server/fuzz`) are seeded with the bytes real clients send:
//! nbdinfo and qemu-io talking to a live nas-server, and the library's index client talking to
//! its index service, each through a recording proxy. The agent's (`agent/fuzz`) are seeded
//! with the start of a real QEMU migration stream, a synthetic stream with every record kind,
//! and one agent-link frame of every kind (a ZSTD frame among them). Seeds are written under
//! `target/fuzz-corpus/` (never committed) and each target then runs for `--seconds`. A crash
//! fails the command and leaves its input in that crate's `fuzz/artifacts/`.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::sh;

/// Each target, and the crate whose `fuzz/` holds it.
const TARGETS: [(&str, &str); 5] = [
    ("nas-server", "nbd_session"),
    ("nas-server", "index_frame"),
    ("agent", "link_frames"),
    ("agent", "stream_parser"),
    ("agent", "nbd_events"),
];
const NBD_PORT: u16 = 10_970;
const INDEX_PORT: u16 = 10_971;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// cargo-fuzz's sanitizer (`address`, `none`, ...). The targets run safe Rust on in-memory
    /// exports and buffers, so `none` (as the suite's short run uses) loses little and builds
    /// and runs faster; a long run keeps AddressSanitizer.
    #[arg(long, default_value = "address")]
    pub sanitizer: String,
    /// Build the targets unoptimised: minutes faster to build, many times slower to run. For
    /// a smoke run of a few seconds a target (the suite's), not for a search.
    #[arg(long)]
    pub dev: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::setup::run()?;
    // The seeds' server: the debug build `cargo test` made (the same selection of packages,
    // so the same features: nothing is rebuilt when the suite ran first).
    sh::run(sh::cargo().args(["build", "--tests"]))?;
    let corpus = sh::workspace_root().join("target/fuzz-corpus");
    record_seeds(&corpus)?;
    agent_seeds(&corpus)?;
    for (krate, target) in TARGETS {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        sh::run(
            sh::cargo()
                .current_dir(sh::workspace_root().join(krate))
                .args([
                    "+nightly",
                    "fuzz",
                    "run",
                    "--sanitizer",
                    &args.sanitizer,
                    target,
                ])
                // One target directory for both crates: the dependencies they share (tokio,
                // blake3, the protocol crates) are built once with the fuzzing flags.
                .args(args.dev.then_some("--dev"))
                .arg("--target-dir")
                .arg(sh::workspace_root().join("target/fuzz"))
                .arg(&dir)
                .arg("--")
                .arg(format!("-max_total_time={}", args.seconds))
                .arg("-rss_limit_mb=2048"),
        )
        .with_context(|| format!("fuzz target {target} failed; see {krate}/fuzz/artifacts"))?;
    }
    Ok(())
}

/// Seeds for the agent's targets. The stream parser's begin with the chunk size byte its
/// target reads first (0: the whole input at once).
fn agent_seeds(corpus: &Path) -> anyhow::Result<()> {
    use agent::migration::{
        link::{self, Hello, LinkFrame},
        stream::{synthetic::Builder, PAGE_SIZE},
    };
    let streams = corpus.join("stream_parser");
    std::fs::create_dir_all(&streams)?;
    // A real stream: a 32 MiB machine that never ran (its ROMs are full pages, the rest zero
    // pages, then its devices). Its first 128 KiB: the header, the configuration, the ram
    // START and the first pages.
    let recorded = sh::workspace_root().join("target/xtask/fuzz/paused-stream.bin");
    std::fs::create_dir_all(recorded.parent().expect("a parent"))?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(testkit::qemu::record_paused_stream(
            recorded.parent().expect("a parent"),
            &recorded,
            None,
        ));
    let real = std::fs::read(&recorded)?;
    let mut seed = vec![0];
    seed.extend_from_slice(&real[..real.len().min(128 << 10)]);
    std::fs::write(streams.join("qemu-start"), seed)?;
    // A whole small stream in QEMU 10's layout: pages, zero pages, a command, devices, EOF.
    let mut b = Builder::new();
    b.ram_start(&[("pc.ram", 1 << 20)]);
    b.ram_part(false);
    b.page(Some("pc.ram"), 0, &[0x11; PAGE_SIZE]);
    b.zero(None, 0x1000);
    b.page(None, 0x2000, &[0x22; PAGE_SIZE]);
    b.eos_footer();
    b.command(11, &[]);
    b.ram_part(true);
    b.page(None, 0x3000, &[0x33; PAGE_SIZE]);
    b.eos_footer();
    b.devices_and_eof();
    for step in [0u8, 1, 7] {
        let mut seed = vec![step];
        seed.extend_from_slice(&b.bytes);
        std::fs::write(streams.join(format!("synthetic-{step}")), seed)?;
    }

    let links = corpus.join("link_frames");
    std::fs::create_dir_all(&links)?;
    let page = Box::new([0x5a; PAGE_SIZE]);
    let hello = LinkFrame::Hello(Hello {
        version: link::VERSION,
        vm: "vm1".into(),
        exports: vec![(1, "disk".into())],
        nas: "127.0.0.1:10809".into(),
        caps: link::CAP_ZSTD | link::CAP_RECEIVED,
    });
    let mut inner = LinkFrame::Raw(b"QEVM\0\0\0\x03".to_vec()).to_bytes();
    inner.extend(LinkFrame::Page(page.clone()).to_bytes());
    let packed = zstd::bulk::compress(&inner, 1)?;
    let mut zstd_frame = Vec::new();
    link::encode_zstd(&mut zstd_frame, inner.len() as u32, &packed);
    let frames = [
        hello,
        LinkFrame::HelloAck {
            version: link::VERSION,
            caps: link::CAP_ZSTD,
        },
        LinkFrame::Raw(vec![1, 2, 3]),
        LinkFrame::Page(page.clone()),
        LinkFrame::Mapped {
            seq: 0,
            export: 1,
            offset: 8192,
            hash: blockhash::hash(&page[..]),
        },
        LinkFrame::Dup { ordinal: 0 },
        LinkFrame::Ack {
            mapped: 1,
            credit: 1 << 20,
            received: Some(4096),
        },
        LinkFrame::Ack {
            mapped: 1,
            credit: 1 << 20,
            received: None,
        },
        LinkFrame::FallbackReq { seq: 0 },
        LinkFrame::FallbackData { seq: 0, page },
        LinkFrame::End {
            stats: link::LinkStats {
                qemu_bytes: 1,
                ..link::LinkStats::default()
            },
        },
        LinkFrame::Done {
            outcome: Ok(link::LinkStats::default()),
        },
        LinkFrame::Done {
            outcome: Err("refused".into()),
        },
        LinkFrame::Error {
            message: "refused".into(),
        },
    ];
    let mut session = Vec::new();
    for (n, frame) in frames.iter().enumerate() {
        let bytes = frame.to_bytes();
        session.extend_from_slice(&bytes);
        std::fs::write(links.join(format!("frame-{n}")), bytes)?;
    }
    session.extend_from_slice(&zstd_frame);
    std::fs::write(links.join("zstd"), &zstd_frame)?;
    std::fs::write(links.join("session"), session)?;
    nbd_event_seeds(&corpus.join("nbd_events"))
}

/// One READ exchange as QEMU's client makes it (request; magic, header, data offset and
/// payload each received on their own), in the `nbd_events` target's input format.
fn nbd_event_seeds(dir: &Path) -> anyhow::Result<()> {
    use nas_proto::nbd::{
        CMD_READ, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, REQUEST_MAGIC, STRUCTURED_REPLY_MAGIC,
    };
    fn event(out: &mut Vec<u8>, kind: u8, ret: u16, head: &[u8], iovs: &[(u32, u16)]) {
        out.push(kind);
        out.extend(ret.to_be_bytes());
        out.push(head.len() as u8);
        out.extend(head);
        out.push(iovs.len() as u8);
        for (base, len) in iovs {
            out.extend(base.to_be_bytes());
            out.extend(len.to_be_bytes());
        }
    }
    std::fs::create_dir_all(dir)?;
    let mut request = REQUEST_MAGIC.to_be_bytes().to_vec();
    request.extend(0u16.to_be_bytes());
    request.extend(CMD_READ.to_be_bytes());
    request.extend(7u64.to_be_bytes());
    request.extend(8192u64.to_be_bytes());
    request.extend(4096u32.to_be_bytes());
    let mut chunk = REPLY_FLAG_DONE.to_be_bytes().to_vec();
    chunk.extend(REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    chunk.extend(7u64.to_be_bytes());
    chunk.extend((8u32 + 4096).to_be_bytes());
    let (send, recv) = (2, 1);
    let mut seed = Vec::new();
    event(&mut seed, send, 28, &request, &[(0x10, 28)]);
    let magic = STRUCTURED_REPLY_MAGIC.to_be_bytes();
    event(&mut seed, recv, 4, &magic, &[(0x20, 4)]);
    event(&mut seed, recv, 16, &chunk, &[(0x20, 16)]);
    event(&mut seed, recv, 8, &8192u64.to_be_bytes(), &[(0x20, 8)]);
    event(
        &mut seed,
        recv,
        4096,
        &[],
        &[(0x2000, 2048), (0x3000, 2048)],
    );
    std::fs::write(dir.join("read"), seed)?;
    Ok(())
}

fn record_seeds(corpus: &Path) -> anyhow::Result<()> {
    let work = sh::workspace_root().join("target/xtask/fuzz");
    std::fs::create_dir_all(&work)?;
    let image = work.join("seed.raw");
    std::fs::write(&image, vec![0x5a; 1 << 20])?;
    let mut server = Server::start(&image)?;
    let nbd_dir = corpus.join("nbd_session");
    let index_dir = corpus.join("index_frame");
    std::fs::create_dir_all(&nbd_dir)?;
    std::fs::create_dir_all(&index_dir)?;

    let sessions: Vec<Vec<&str>> = vec![
        vec!["nbdinfo", "--list", "nbd://127.0.0.1:PORT"],
        vec!["nbdinfo", "--map", "nbd://127.0.0.1:PORT/seed"],
        vec![
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read 0 4k",
            "-c",
            "write -P 7 4096 8k",
            "-c",
            "discard 65536 64k",
            "-c",
            "write -z 131072 4k",
            "-c",
            "flush",
            "nbd://127.0.0.1:PORT/seed",
        ],
    ];
    for (i, argv) in sessions.iter().enumerate() {
        let proxy = Recorder::start(NBD_PORT, nbd_dir.join(format!("recorded-{i}")))?;
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.replace("PORT", &proxy.port.to_string()))
            .collect();
        sh::stdout(Command::new(&argv[0]).args(&argv[1..]))?;
        proxy.finish()?;
    }
    let proxy = Recorder::start(INDEX_PORT, index_dir.join("recorded-0"))?;
    index_session(proxy.port)?;
    proxy.finish()?;
    server.stop();
    eprintln!("fuzz: seeds recorded under {}", corpus.display());
    Ok(())
}

/// A real index-service session through the library's client.
fn index_session(port: u16) -> anyhow::Result<()> {
    use nas_client::index::IndexClient;
    use nas_proto::Endpoint;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = Endpoint::Tcp(([127, 0, 0, 1], port).into());
        let mut c = IndexClient::connect(&addr, &["seed".into()]).await?;
        c.lookup(&[[0x11; 32], blockhash::hash(&[0x5a; 4096])])
            .await?;
        c.block_hashes(1, 0, 4).await?;
        c.subscribe_hot().await?;
        c.recv().await?;
        anyhow::Ok(())
    })
}

struct Server(Child);

impl Server {
    fn start(image: &Path) -> anyhow::Result<Self> {
        let child = Command::new(sh::workspace_root().join("target/debug/nas-server"))
            .args(["--listen", &format!("127.0.0.1:{NBD_PORT}")])
            .args(["--index-listen", &format!("127.0.0.1:{INDEX_PORT}")])
            .arg("--export")
            .arg(format!("seed={}", image.display()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start nas-server")?;
        let server = Self(child);
        for port in [NBD_PORT, INDEX_PORT] {
            let deadline = Instant::now() + Duration::from_secs(20);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > deadline {
                    bail!("nas-server did not listen on {port}");
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(server)
    }

    fn stop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A one-connection TCP proxy that saves what the client sent.
struct Recorder {
    port: u16,
    thread: thread::JoinHandle<anyhow::Result<()>>,
}

impl Recorder {
    fn start(upstream: u16, out: PathBuf) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let thread = thread::spawn(move || -> anyhow::Result<()> {
            let (mut client, _) = listener.accept()?;
            let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
            let (mut client_rd, mut server_wr) = (client.try_clone()?, server.try_clone()?);
            let up = thread::spawn(move || -> std::io::Result<Vec<u8>> {
                let mut recorded = Vec::new();
                let mut buf = [0u8; 64 << 10];
                loop {
                    let n = client_rd.read(&mut buf)?;
                    if n == 0 {
                        server_wr.shutdown(std::net::Shutdown::Write).ok();
                        return Ok(recorded);
                    }
                    recorded.extend_from_slice(&buf[..n]);
                    server_wr.write_all(&buf[..n])?;
                }
            });
            std::io::copy(&mut server, &mut client).ok();
            client.shutdown(std::net::Shutdown::Both).ok();
            let recorded = up
                .join()
                .map_err(|_| anyhow::anyhow!("recorder thread panicked"))??;
            std::fs::write(out, recorded)?;
            Ok(())
        });
        Ok(Self { port, thread })
    }

    fn finish(self) -> anyhow::Result<()> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("recorder panicked"))?
    }
}
