//! The two agents' pipelines back to back in one process: QEMU's stream fed in at
//! pseudo-random split points, an in-memory link (optionally throttled), and the stream the
//! target side delivers collected, for the round-trip tests.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use agent::migration::{
    report::{Counters, Figures},
    source::{run_source, SourceConfig},
    target::{read_hello, run_target, TargetConfig},
    wire::FrameReader,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::pattern;

/// Feeds `data` into a pipe in chunks of pseudo-random size, like a socket would.
pub async fn feed(mut w: tokio::io::DuplexStream, data: Arc<Vec<u8>>, seed: u64) {
    let sizes = pattern(seed, 4096);
    let (mut at, mut i) = (0usize, 0usize);
    while at < data.len() {
        let n = 1 + (sizes[i % sizes.len()] as usize * 97) % 70_000;
        let end = (at + n).min(data.len());
        w.write_all(&data[at..end]).await.unwrap();
        at = end;
        i += 1;
    }
    w.shutdown().await.unwrap();
}

pub struct Run {
    pub out: Vec<u8>,
    pub source: Figures,
    pub target: Figures,
}

/// One end of a link that delivers at most `rate` bytes per second to its reader.
pub struct Throttled<T> {
    inner: T,
    rate: u64,
    /// When the bytes read so far would have finished crossing at `rate`.
    free_at: Option<tokio::time::Instant>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Throttled<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(pause) = self.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            // Small reads add up: the reader waits once it is a millisecond ahead of the rate.
            let now = tokio::time::Instant::now();
            let start = self.free_at.map_or(now, |t| t.max(now));
            let at = start + Duration::from_nanos(n * 1_000_000_000 / self.rate);
            self.free_at = Some(at);
            if at > now + Duration::from_millis(1) {
                self.pause = Some(Box::pin(tokio::time::sleep_until(at)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Throttled<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The link between the agents: an in-memory pipe of `buf` bytes, and at most `rate` bytes per
/// second towards the target when given; `qemu_rate` is how fast the target QEMU takes the
/// stream, when it is slow.
pub struct Link {
    pub buf: usize,
    pub rate: Option<u64>,
    pub qemu_rate: Option<u64>,
    /// Chooses where QEMU's stream is split into reads.
    pub seed: u64,
}

impl From<usize> for Link {
    fn from(buf: usize) -> Self {
        Link {
            buf,
            rate: None,
            qemu_rate: None,
            seed: 7,
        }
    }
}

pub fn throttled<T>(inner: T, rate: Option<u64>) -> Throttled<T> {
    Throttled {
        inner,
        rate: rate.unwrap_or(u64::MAX),
        free_at: None,
        pause: None,
    }
}

pub async fn round_trip(
    stream: Arc<Vec<u8>>,
    source_cfg: SourceConfig,
    target_cfg: TargetConfig,
    link: impl Into<Link>,
) -> Run {
    let link = link.into();
    let (qemu_src_w, qemu_src_r) = tokio::io::duplex(1 << 16);
    let (link_a, link_b) = tokio::io::duplex(link.buf);
    let link_b = throttled(link_b, link.rate);
    let (qemu_dst_w, qemu_dst_r) = tokio::io::duplex(1 << 16);
    let mut qemu_dst_r = throttled(qemu_dst_r, link.qemu_rate);
    let feeder = tokio::spawn(feed(qemu_src_w, stream.clone(), link.seed));
    let collector = tokio::spawn(async move {
        let mut out = Vec::new();
        qemu_dst_r.read_to_end(&mut out).await.unwrap();
        out
    });
    let target = tokio::spawn(async move {
        let mut link = link_b;
        let mut frames = FrameReader::new();
        let hello = read_hello(&mut link, &mut frames).await.expect("HELLO");
        run_target(
            link,
            frames,
            hello,
            qemu_dst_w,
            target_cfg,
            Arc::new(Counters::default()),
        )
        .await
    });
    let report = run_source(
        qemu_src_r,
        link_a,
        source_cfg,
        Arc::new(Counters::default()),
    )
    .await
    .expect("source side");
    let target_figures = target.await.unwrap().expect("target side");
    feeder.await.unwrap();
    Run {
        out: collector.await.unwrap(),
        source: report.source,
        target: target_figures,
    }
}
