//! `cargo xtask bench pipeline`: throughput of each side of the migration hook on a synthetic
//! multi-GiB stream, with a real nas-server on loopback and no QEMU (QEMU under TCG produces far
//! less than either side can take, so it would measure itself).
//!
//! The stream is built in memory in the layout QEMU 10 sends: per 8 pages, 4 hold blocks of the
//! NAS disk (MAPPED), 3 are unique (sent in full) and 1 repeats an earlier page (DUP). The disk
//! is read once through NBD first, as a guest would have, so the NAS hot set knows its blocks.
//!
//! 1. Both sides, each on its own single-threaded runtime (one core at most), linked over TCP
//!    loopback: each side's thread CPU time gives its rate per core.
//! 2. The target alone, replaying the link bytes recorded in 1 into `run_target` with the NAS
//!    on loopback: its wall-clock rate.
//! 3. The source alone: its peers run on other hosts in production, but here the target and
//!    the NAS's reads would share this machine's two cores, its caches and its memory with it
//!    (in 1 the source's thread is preempted over a thousand times). So the link's far end is a
//!    light consumer that parses every frame and acknowledges it on receipt; the NAS still
//!    answers the source's lookups and streams its hot set. Its thread CPU time gives the
//!    source's own rate per core, the target; 1 shows what crowding costs.
//!
//! The peer is QEMU's own per-core rate, which is not measurable here without KVM; the ratio
//! printed is against the targets (1.5 GB/s per core source, 1 GB/s target).
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent::migration::{
    report::Counters,
    secure::LinkSecurity,
    source::{run_source, SourceConfig, SourceReport},
    stream::{synthetic::Builder, PAGE_SIZE},
    target::{read_hello, run_target, TargetConfig},
    wire::FrameReader,
};
use anyhow::bail;
use nas_client::nbd::NbdClient;
use nas_proto::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    cpu::{process_cpu, Cpu, ThreadCpu},
    sh,
};

const NBD_PORT: u16 = 10_960;
const INDEX_PORT: u16 = 10_961;
const DISK_MIB: u64 = 1024;
/// Runs of the source alone; the median is reported.
const ALONE_RUNS: usize = 5;

pub fn run(stream_mib: u64) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        // The pipeline runs in this process: measure optimised code, not a debug build.
        return sh::run(
            sh::cargo()
                .args(["run", "--quiet", "--release", "-p", "xtask", "--"])
                .args(["bench", "pipeline", "--stream-mib", &stream_mib.to_string()]),
        );
    }
    crate::setup::run()?;
    sh::run(sh::cargo().args(["build", "--release", "-p", "nas-server"]))?;
    let dir = sh::workspace_root().join("target/xtask/bench-pipeline");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let disk_path = dir.join("disk.raw");
    let disk = testkit::pattern(4242, (DISK_MIB << 20) as usize);
    std::fs::write(&disk_path, &disk)?;
    let nas = crate::lab::nas_server(&dir, &disk_path, NBD_PORT, INDEX_PORT)?;
    for port in [NBD_PORT, INDEX_PORT] {
        crate::lab::wait_port(port)?;
    }
    let nbd: Endpoint = format!("127.0.0.1:{NBD_PORT}").parse().expect("valid");
    let index: Endpoint = format!("127.0.0.1:{INDEX_PORT}").parse().expect("valid");
    warm_hot_set(&nbd)?;
    // Let the hot set's updates settle before the source subscribes.
    std::thread::sleep(Duration::from_millis(500));

    eprintln!("bench: building a {stream_mib} MiB synthetic stream");
    let stream = Arc::new(synthetic_stream(&disk, stream_mib << 20));
    drop(disk);
    let gb = stream.len() as f64 / 1e9;

    let nas_cpu_before = process_cpu(nas.0.id())?;
    let both = both_sides(stream.clone(), &nbd, &index, &Link::plain())?;
    let nas_cpu = process_cpu(nas.0.id())? - nas_cpu_before;
    // The same run over the agent link with mutual TLS: what encryption costs each side.
    let tls = both_sides(stream.clone(), &nbd, &index, &Link::tls(&dir)?)?;
    let replay = target_alone(both.link_bytes.clone(), &nbd, stream.len() as u64)?;
    // The machine is shared and noisy: the source alone runs several times; the median counts.
    let mut alone = Vec::new();
    for _ in 0..ALONE_RUNS {
        alone.push(source_alone(stream.clone(), &nbd, &index)?);
    }
    alone.sort_by_key(Cpu::total);
    let alone_range = (
        gb / alone[alone.len() - 1].total().as_secs_f64(),
        gb / alone[0].total().as_secs_f64(),
    );
    let alone = alone.swap_remove(alone.len() / 2);

    let src_rate = gb / both.source_cpu.total().as_secs_f64();
    let alone_rate = gb / alone.total().as_secs_f64();
    let tgt_rate_cpu = gb / both.target_cpu.total().as_secs_f64();
    let tgt_rate = gb / replay.as_secs_f64();
    println!();
    println!(
        "Synthetic stream: {:.2} GB ({} pages: {:.0}% mapped, {:.0}% full, {:.0}% dup); link {:.2} GB",
        gb,
        both.pages,
        100.0 * both.mapped as f64 / both.pages as f64,
        100.0 * both.sent as f64 / both.pages as f64,
        100.0 * both.dup as f64 / both.pages as f64,
        both.link_bytes.len() as f64 / 1e9,
    );
    println!("| measurement | time | rate | target | ratio |\n|---|---:|---:|---:|---:|");
    println!(
        "| source alone, CPU time (one core) | {:.2} s ({:.2} s kernel) | {:.2} GB/s per core | 1.5 | {:.2}x |",
        alone.total().as_secs_f64(),
        alone.system.as_secs_f64(),
        alone_rate,
        alone_rate / 1.5
    );
    println!(
        "| source beside target + NAS, CPU time (one core) | {:.2} s ({:.2} s kernel) | {:.2} GB/s per core | 1.5 | {:.2}x |",
        both.source_cpu.total().as_secs_f64(),
        both.source_cpu.system.as_secs_f64(),
        src_rate,
        src_rate / 1.5
    );
    println!(
        "| target, CPU time (one core) | {:.2} s ({:.2} s kernel) | {:.2} GB/s per core | - | - |",
        both.target_cpu.total().as_secs_f64(),
        both.target_cpu.system.as_secs_f64(),
        tgt_rate_cpu
    );
    println!(
        "| target alone, wall (NAS on loopback) | {:.2} s | {:.2} GB/s | 1.0 | {:.2}x |",
        replay.as_secs_f64(),
        tgt_rate,
        tgt_rate
    );
    println!(
        "| both sides + NAS, wall (2 cores) | {:.2} s | {:.2} GB/s | - | - |",
        both.wall.as_secs_f64(),
        gb / both.wall.as_secs_f64()
    );
    let tls_src = gb / tls.source_cpu.total().as_secs_f64();
    let tls_tgt = gb / tls.target_cpu.total().as_secs_f64();
    println!(
        "| with mutual TLS on the link: source, CPU time | {:.2} s | {:.2} GB/s per core | plaintext {:.2} | {:.2}x |",
        tls.source_cpu.total().as_secs_f64(),
        tls_src,
        src_rate,
        tls_src / src_rate
    );
    println!(
        "| with mutual TLS on the link: target, CPU time | {:.2} s | {:.2} GB/s per core | plaintext {:.2} | {:.2}x |",
        tls.target_cpu.total().as_secs_f64(),
        tls_tgt,
        tgt_rate_cpu,
        tls_tgt / tgt_rate_cpu
    );
    println!(
        "| with mutual TLS on the link: both sides + NAS, wall | {:.2} s | {:.2} GB/s | plaintext {:.2} | {:.2}x |",
        tls.wall.as_secs_f64(),
        gb / tls.wall.as_secs_f64(),
        gb / both.wall.as_secs_f64(),
        both.wall.as_secs_f64() / tls.wall.as_secs_f64()
    );
    println!(
        "nas-server CPU during the run: {:.2} s",
        nas_cpu.as_secs_f64()
    );
    println!(
        "source alone over {ALONE_RUNS} runs: {:.2}-{:.2} GB/s per core (the median is in the table)",
        alone_range.0, alone_range.1
    );
    Ok(())
}

/// Reads the whole disk once, as the guest would have: the NAS hot set then holds its blocks.
fn warm_hot_set(nbd: &Endpoint) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = NbdClient::connect(nbd, "disk").await?;
        let blocks = (DISK_MIB << 20) / PAGE_SIZE as u64;
        let step = 4096u64;
        for first in (0..blocks).step_by(step as usize) {
            let ranges: Vec<(u64, u32)> = (first..(first + step).min(blocks))
                .map(|b| (b * PAGE_SIZE as u64, PAGE_SIZE as u32))
                .collect();
            for r in client.read_many(&ranges, 16).await? {
                if r.is_err() {
                    bail!("NBD read failed while warming the hot set");
                }
            }
        }
        client.disconnect().await?;
        Ok(())
    })
}

/// `len` bytes of pages: per 8, 4 disk blocks, 3 unique, 1 repeat.
fn synthetic_stream(disk: &[u8], len: u64) -> Vec<u8> {
    let disk_blocks = disk.len() / PAGE_SIZE;
    let pool = testkit::pattern(77, 16 << 20);
    let mut last_unique = 0u64;
    Builder::ram_stream(len / PAGE_SIZE as u64, |i| match i % 8 {
        0 | 2 | 4 | 6 => {
            let k = (i as usize * 7919) % disk_blocks;
            disk[k * PAGE_SIZE..][..PAGE_SIZE]
                .try_into()
                .expect("a disk block")
        }
        7 => unique(&pool, last_unique),
        _ => {
            last_unique = i;
            unique(&pool, i)
        }
    })
}

fn unique(pool: &[u8], i: u64) -> [u8; PAGE_SIZE] {
    let at = (i as usize * 4099) % (pool.len() - PAGE_SIZE);
    let mut page: [u8; PAGE_SIZE] = pool[at..at + PAGE_SIZE].try_into().expect("page");
    page[..8].copy_from_slice(&i.to_le_bytes());
    page[8..16].copy_from_slice(b"uniquepg");
    page
}

struct Both {
    wall: Duration,
    source_cpu: Cpu,
    target_cpu: Cpu,
    link_bytes: Arc<Vec<u8>>,
    pages: u64,
    mapped: u64,
    sent: u64,
    dup: u64,
}

/// The agent link's two ends: plaintext, or mutual TLS with test credentials.
struct Link {
    target: LinkSecurity,
    source: LinkSecurity,
}

impl Link {
    fn plain() -> Link {
        Link {
            target: LinkSecurity::Insecure,
            source: LinkSecurity::Insecure,
        }
    }

    fn tls(dir: &std::path::Path) -> anyhow::Result<Link> {
        let creds = testkit::tls::test_creds(dir);
        Ok(Link {
            target: LinkSecurity::configure(Some(&creds.target), false, Vec::new())?,
            source: LinkSecurity::configure(Some(&creds.source), false, Vec::new())?,
        })
    }
}

fn both_sides(
    stream: Arc<Vec<u8>>,
    nbd: &Endpoint,
    index: &Endpoint,
    link: &Link,
) -> anyhow::Result<Both> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr: SocketAddr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let recorded = Arc::new(Mutex::new(Vec::with_capacity(stream.len() / 2)));
    let nas = nbd.clone();
    let rec = recorded.clone();
    let started = Instant::now();
    let security = link.target.clone();
    let target = one_core("bench-target", move || async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        let (sock, _) = security.accept(sock).await?;
        let mut link = Recording {
            inner: sock,
            seen: rec,
        };
        let mut frames = FrameReader::new();
        let hello = read_hello(&mut link, &mut frames).await?;
        let config = TargetConfig {
            nas_override: Some(nas),
            ..TargetConfig::default()
        };
        run_target(
            link,
            frames,
            hello,
            tokio::io::sink(),
            config,
            Arc::new(Counters::default()),
        )
        .await?;
        anyhow::Ok(())
    })?;
    let source = source_on_one_core(
        "bench-source",
        stream,
        nbd,
        index,
        (addr, link.source.clone()),
    )?;
    let (report, source_cpu) = join(source)?;
    let ((), target_cpu) = join(target)?;
    let wall = started.elapsed();
    let link_bytes = std::mem::take(&mut *recorded.lock().expect("not poisoned"));
    let s = report.source;
    eprintln!(
        "bench: source hashing took {:.0} ms; zstd: {} link bytes sent as {}",
        s.hash_ms, s.zstd_in_bytes, s.zstd_out_bytes
    );
    if s.fallbacks > 0 || report.target.fallbacks > 0 {
        bail!("the run needed fallbacks; the NAS path was not measured cleanly");
    }
    Ok(Both {
        wall,
        source_cpu,
        target_cpu,
        link_bytes: Arc::new(link_bytes),
        pages: s.pages_full,
        mapped: s.pages_mapped,
        sent: s.pages_sent,
        dup: s.pages_dup,
    })
}

/// A thread named `name` that runs `work` on its own single-threaded runtime (one core at
/// most). It yields the work's output and the thread's CPU time from the runtime's start.
fn one_core<T, F>(
    name: &str,
    work: impl FnOnce() -> F + Send + 'static,
) -> anyhow::Result<JoinHandle<anyhow::Result<(T, Cpu)>>>
where
    T: Send + 'static,
    F: Future<Output = anyhow::Result<T>>,
{
    let thread = std::thread::Builder::new().name(name.into());
    Ok(thread.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let cpu = ThreadCpu::start();
        let out = rt.block_on(work())?;
        Ok((out, cpu.elapsed()))
    })?)
}

/// Waits for a [`one_core`] thread.
fn join<T>(thread: JoinHandle<anyhow::Result<(T, Cpu)>>) -> anyhow::Result<(T, Cpu)> {
    let name = thread.thread().name().unwrap_or("bench").to_string();
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the {name} thread panicked"))?
}

/// The source side on [`one_core`], reading `stream` and linking to the target at `addr`.
fn source_on_one_core(
    name: &str,
    stream: Arc<Vec<u8>>,
    nbd: &Endpoint,
    index: &Endpoint,
    (addr, security): (SocketAddr, LinkSecurity),
) -> anyhow::Result<JoinHandle<anyhow::Result<(SourceReport, Cpu)>>> {
    let (nbd, index) = (nbd.to_string(), index.clone());
    one_core(name, move || async move {
        let sock = tokio::net::TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let sock = security.connect(sock, &addr.to_string()).await?;
        let config = SourceConfig::new("bench", vec!["disk".into()], &nbd, Some(index));
        Ok(run_source(&stream[..], sock, config, Arc::new(Counters::default())).await?)
    })
}

/// Replays recorded link bytes into the target on [`one_core`]; returns its wall time.
fn target_alone(link: Arc<Vec<u8>>, nbd: &Endpoint, expect: u64) -> anyhow::Result<Duration> {
    let nas = nbd.clone();
    let replay = one_core("bench-replay", move || async move {
        let started = Instant::now();
        let mut link = Replay { data: link, at: 0 };
        let mut frames = FrameReader::new();
        let hello = read_hello(&mut link, &mut frames).await?;
        let counters = Arc::new(Counters::default());
        let config = TargetConfig {
            nas_override: Some(nas),
            ..TargetConfig::default()
        };
        let figures = run_target(
            link,
            frames,
            hello,
            tokio::io::sink(),
            config,
            counters.clone(),
        )
        .await?;
        let took = started.elapsed();
        if figures.qemu_bytes != expect || figures.fallbacks > 0 {
            bail!(
                "replay delivered {} bytes with {} fallbacks, expected {expect} and none",
                figures.qemu_bytes,
                figures.fallbacks
            );
        }
        Ok(took)
    })?;
    let (took, _) = join(replay)?;
    Ok(took)
}

/// A link that also keeps every byte read from it.
struct Recording<S> {
    inner: S,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let new = &buf.filled()[before..];
            self.seen
                .lock()
                .expect("not poisoned")
                .extend_from_slice(new);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Recorded link bytes as the source's side of the link; what the target sends back is
/// dropped. After the last byte it stays silent (never EOF): the target finishes on END.
struct Replay {
    data: Arc<Vec<u8>>,
    at: usize,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at == self.data.len() {
            return Poll::Pending;
        }
        let n = buf
            .remaining()
            .min(self.data.len() - self.at)
            .min(256 << 10);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The source with its peers elsewhere, as in production (the target agent and the NAS's reads
/// run on other hosts): the link's far end is a consumer that parses every frame and
/// acknowledges it on receipt, as a target whose NAS and QEMU never lag would. The NAS still
/// answers the source's lookups and streams its hot set. Returns the source thread's CPU time.
fn source_alone(stream: Arc<Vec<u8>>, nbd: &Endpoint, index: &Endpoint) -> anyhow::Result<Cpu> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr: SocketAddr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let expect = stream.len() as u64;
    let consumer = one_core("bench-acker", move || async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        acknowledge_all(sock).await
    })?;
    let source = source_on_one_core(
        "bench-source-alone",
        stream,
        nbd,
        index,
        (addr, LinkSecurity::Insecure),
    )?;
    let (report, cpu) = join(source)?;
    let s = report.source;
    eprintln!(
        "bench: source alone: zstd: {} link bytes sent as {}",
        s.zstd_in_bytes, s.zstd_out_bytes
    );
    let (consumed, _) = join(consumer)?;
    if consumed != expect {
        bail!("the consumer counted {consumed} stream bytes, expected {expect}");
    }
    Ok(cpu)
}

/// Reads the link to its END, acknowledging each frame's stream bytes and MAPPED pages as the
/// target would once it delivered them; answers END with DONE. Like a target, it takes ZSTD
/// frames (the reader inflates them), so the source runs with its default compression.
/// Returns the stream bytes seen.
async fn acknowledge_all(sock: tokio::net::TcpStream) -> anyhow::Result<u64> {
    use agent::migration::link::{LinkFrame, ACK_MAPPED, ACK_STEP, CAP_ZSTD, VERSION};
    use tokio::io::AsyncWriteExt;
    let (mut rd, mut wr) = sock.into_split();
    let mut frames = FrameReader::new();
    read_hello(&mut rd, &mut frames).await?;
    wr.write_all(
        &LinkFrame::HelloAck {
            version: VERSION,
            caps: CAP_ZSTD,
        }
        .to_bytes(),
    )
    .await?;
    let (mut mapped, mut credit) = (0u64, 0u64);
    let (mut acked_mapped, mut acked_credit) = (0u64, 0u64);
    loop {
        match frames.next(&mut rd).await.map_err(anyhow::Error::msg)? {
            Some(LinkFrame::Raw(bytes)) => credit += bytes.len() as u64,
            Some(LinkFrame::Page(_) | LinkFrame::Dup { .. }) => credit += PAGE_SIZE as u64,
            Some(LinkFrame::Mapped { .. }) => {
                mapped += 1;
                credit += PAGE_SIZE as u64;
            }
            Some(LinkFrame::End { .. }) => break,
            other => bail!("unexpected frame from the source: {other:?}"),
        }
        if credit - acked_credit >= ACK_STEP || mapped - acked_mapped >= ACK_MAPPED {
            let ack = LinkFrame::Ack {
                mapped,
                credit,
                received: None,
            };
            wr.write_all(&ack.to_bytes()).await?;
            (acked_mapped, acked_credit) = (mapped, credit);
        }
    }
    let done = LinkFrame::Done {
        outcome: Ok(agent::migration::link::LinkStats::default()),
    };
    wr.write_all(&done.to_bytes()).await?;
    Ok(credit)
}
