//! Link compression: which batches of frames the source sends as one ZSTD frame.
//!
//! Compression spends source CPU to put fewer bytes on the link, which pays only while the
//! link is what the stream waits for. [`Compression::Auto`] (the default) therefore spends on
//! compressing no more time than the emitter has spent held up by the link, waiting for the
//! target's acknowledgements or for the link writer: that time is banked (at most
//! [`MAX_BUDGET`]), a batch is compressed only when the bank covers what compressing it is
//! expected to cost (from the rate measured so far), and the time it took is taken from it. On
//! a link that keeps the window from filling nothing is compressed; on a slow one the emitter
//! compresses until it is as busy as the link. A batch is sent as a ZSTD frame only if that is
//! shorter than the batch itself; content that keeps compressing poorly (already compressed or
//! encrypted guest memory) makes `Auto` skip a growing number of batches before it tries again.
//!
//! The window alone cannot tell a slow link from a slow target (its QEMU loading, the NAS).
//! A target that reports the link bytes it has read ([`link::CAP_RECEIVED`]) tells them apart:
//! a wait counts only when at least as many of the bytes not yet delivered are still on the
//! link as have reached the target (the emitter decides, `Emitter::held_up_since`). With an
//! older target every wait counts.
use std::time::{Duration, Instant};

use super::{link, outgoing::Outgoing};

/// When the source compresses non-mapped data on the link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// Never.
    Never,
    /// While the link holds the stream up.
    #[default]
    Auto,
    /// Every batch.
    Always,
}

impl Compression {
    /// Its command-line name, as [`Compression::parse`] reads it back.
    pub fn name(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }

    /// From its command-line name (`never`, `always`; anything else is `auto`).
    pub fn parse(name: &str) -> Self {
        match name {
            "always" => Self::Always,
            "never" => Self::Never,
            _ => Self::Auto,
        }
    }
}

/// zstd level: the fastest regular one, several times a 1 Gbit/s link per core on guest
/// memory (docs/benchmarks.md).
const LEVEL: i32 = 1;
/// A compressed batch must come to at most this share (in 1/16ths) of its size to count as
/// compressing well; poorer ones start or extend a back-off.
const GOOD_SIXTEENTHS: usize = 14;
/// The most batches `Auto` skips after content that compressed poorly.
const MAX_SKIP: u32 = 64;
/// The most waiting time `Auto` banks for compressing later: a few dozen batches' worth, so
/// that a link that was slow a while ago does not pay for compression now.
pub const MAX_BUDGET: Duration = Duration::from_millis(20);
/// The cost assumed before the first measurement: 500 MB/s.
const FIRST_NS_PER_KIB: u64 = 2048;

/// Why a batch could not be compressed.
#[derive(Debug, thiserror::Error)]
#[error("zstd: {0}")]
pub struct CompressError(#[from] std::io::Error);

/// Decides per batch, and compresses; one per link.
pub struct LinkCompressor {
    mode: Compression,
    zstd: zstd::bulk::Compressor<'static>,
    /// The batch gathered into one buffer (its pages are spliced in by reference).
    gathered: Vec<u8>,
    compressed: Vec<u8>,
    /// Batches `Auto` still skips before it tries again.
    skip: u32,
    /// The back-off the next poor batch sets: doubles per poor batch, resets on a good one.
    backoff: u32,
    /// `Auto`: time the emitter was held up by the link, not yet spent compressing.
    budget: Duration,
    /// What compressing has cost per KiB of batch, smoothed.
    ns_per_kib: u64,
}

impl LinkCompressor {
    /// `None` when `mode` never compresses.
    pub fn new(mode: Compression) -> Result<Option<Self>, CompressError> {
        if mode == Compression::Never {
            return Ok(None);
        }
        Ok(Some(Self {
            mode,
            zstd: zstd::bulk::Compressor::new(LEVEL)?,
            gathered: Vec::new(),
            compressed: Vec::new(),
            skip: 0,
            backoff: 1,
            budget: Duration::ZERO,
            ns_per_kib: FIRST_NS_PER_KIB,
        }))
    }

    /// The emitter was held up by the link (its window, or its writer) for `held`.
    pub fn held_up(&mut self, held: Duration) {
        self.budget = (self.budget + held).min(MAX_BUDGET);
    }

    /// Drops the hold-up time not yet spent.
    pub fn forget_held_up(&mut self) {
        self.budget = Duration::ZERO;
    }

    /// What compressing `len` bytes is expected to cost.
    fn expected(&self, len: usize) -> Duration {
        Duration::from_nanos(self.ns_per_kib * len as u64 / 1024)
    }

    /// Whether to try the next batch, of `len` bytes.
    fn wants(&mut self, len: usize) -> bool {
        match self.mode {
            Compression::Never => false,
            Compression::Always => true,
            Compression::Auto if self.budget < self.expected(len) => false,
            Compression::Auto if self.skip > 0 => {
                self.skip -= 1;
                false
            }
            Compression::Auto => true,
        }
    }

    /// Notes how well a batch compressed.
    fn judge(&mut self, raw: usize, compressed: usize) {
        if compressed * 16 <= raw * GOOD_SIXTEENTHS {
            self.backoff = 1;
        } else {
            self.skip = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_SKIP);
        }
    }

    /// Replaces `batch` by one ZSTD frame of it when this batch should be compressed and the
    /// frame is shorter; `release` gets the batch's shares of read buffers then. Whether it
    /// did.
    pub fn apply(
        &mut self,
        batch: &mut Outgoing,
        release: impl FnMut(std::sync::Arc<Vec<u8>>),
    ) -> Result<bool, CompressError> {
        if batch.is_empty() || !self.wants(batch.len()) {
            return Ok(false);
        }
        let started = Instant::now();
        self.gathered.clear();
        batch.gather_into(&mut self.gathered);
        let raw = self.gathered.len();
        self.compressed.clear();
        self.compressed
            .reserve(zstd::zstd_safe::compress_bound(raw));
        self.zstd
            .compress_to_buffer(&self.gathered[..], &mut self.compressed)?;
        let took = started.elapsed();
        self.budget = self.budget.saturating_sub(took);
        let ns_per_kib = (took.as_nanos() * 1024 / raw.max(1) as u128) as u64;
        self.ns_per_kib = (3 * self.ns_per_kib + ns_per_kib) / 4;
        self.judge(raw, self.compressed.len());
        if link::zstd_frame_len(self.compressed.len()) >= raw {
            return Ok(false);
        }
        batch.clear(release);
        link::encode_zstd(batch.bytes_mut(), raw as u32, &self.compressed);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::migration::{link::LinkFrame, stream::PAGE_SIZE};

    fn batch(page: &[u8]) -> (Outgoing, Arc<Vec<u8>>) {
        let read = Arc::new(page.to_vec());
        let mut out = Outgoing::default();
        for _ in 0..16 {
            link::encode_page_header(out.bytes_mut());
            out.push_page(&read, 0);
        }
        (out, read)
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_compressed_batch_is_one_zstd_frame_of_the_same_frames() {
        let text: Vec<u8> = b"guest memory "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        let (mut out, read) = batch(&text);
        let mut want = Vec::new();
        out.gather_into(&mut want);
        let mut c = LinkCompressor::new(Compression::Always).unwrap().unwrap();
        let mut released = 0;
        assert!(c.apply(&mut out, |_| released += 1).unwrap());
        assert_eq!(released, 16, "the read's shares go back");
        assert_eq!(Arc::strong_count(&read), 1);
        let bytes = out
            .contiguous()
            .expect("one frame, nothing spliced")
            .to_vec();
        let (frame, used) = LinkFrame::parse(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        let LinkFrame::Zstd { raw_len, data } = frame else {
            panic!("not a ZSTD frame: {frame:?}")
        };
        assert_eq!(raw_len as usize, want.len());
        assert_eq!(bytes.len(), link::zstd_frame_len(data.len()));
        assert_eq!(zstd::bulk::decompress(&data, want.len()).unwrap(), want);
    }

    #[test]
    fn incompressible_batches_go_out_as_they_are() {
        // 16 different random pages do not compress.
        let read = Arc::new(noise(PAGE_SIZE * 16));
        let mut plain = Outgoing::default();
        for i in 0..16 {
            link::encode_page_header(plain.bytes_mut());
            plain.push_page(&read, i * PAGE_SIZE);
        }
        let len = plain.len();
        let mut c = LinkCompressor::new(Compression::Always).unwrap().unwrap();
        let done = c.apply(&mut plain, |_| panic!("nothing released"));
        assert!(!done.unwrap());
        assert_eq!(plain.len(), len);
        assert!(plain.contiguous().is_none(), "still the spliced pages");
        // One random page 16 times does.
        let (mut repeated, _read) = batch(&read[..PAGE_SIZE]);
        assert!(c.apply(&mut repeated, |_| ()).unwrap());
        assert!(repeated.len() < len / 4);
    }

    #[test]
    fn never_and_an_idle_link_leave_batches_alone() {
        assert!(LinkCompressor::new(Compression::Never).unwrap().is_none());
        let text = vec![7u8; PAGE_SIZE];
        let (mut out, _read) = batch(&text);
        let len = out.len();
        let mut c = LinkCompressor::new(Compression::Auto).unwrap().unwrap();
        let done = c.apply(&mut out, |_| panic!("nothing released"));
        assert!(!done.unwrap(), "never held up: nothing compressed");
        assert_eq!(out.len(), len);
    }

    #[test]
    fn auto_spends_no_more_time_compressing_than_it_waited() {
        let text = vec![7u8; PAGE_SIZE];
        let mut c = LinkCompressor::new(Compression::Auto).unwrap().unwrap();
        let (mut out, _read) = batch(&text);
        let len = out.len();
        // A wait shorter than compressing this batch is expected to take buys nothing.
        let need = c.expected(len);
        c.held_up(need - Duration::from_nanos(1));
        assert!(!c.apply(&mut out, |_| ()).unwrap());
        c.held_up(Duration::from_nanos(1));
        assert!(
            c.apply(&mut out, |_| ()).unwrap(),
            "held up long enough: compressed"
        );
        assert!(out.len() < len / 4);
        assert!(c.budget < need, "what compressing took is spent");
        // Waiting banks at most MAX_BUDGET.
        c.held_up(Duration::from_secs(5));
        assert_eq!(c.budget, MAX_BUDGET);
        let (mut again, _read) = batch(&text);
        assert!(c.apply(&mut again, |_| ()).unwrap());
        assert!(c.budget < MAX_BUDGET);
    }

    #[test]
    fn auto_backs_off_from_poor_content_longer_each_time_and_resets_on_good() {
        let mut c = LinkCompressor::new(Compression::Auto).unwrap().unwrap();
        c.held_up(MAX_BUDGET);
        let tried = |c: &mut LinkCompressor, n: usize| (0..n).filter(|_| c.wants(1)).count();
        c.judge(1000, 990);
        assert_eq!(tried(&mut c, 2), 1, "one batch skipped, the next tried");
        c.judge(1000, 990);
        assert_eq!(tried(&mut c, 3), 1, "then two skipped");
        c.judge(1000, 990);
        assert_eq!(tried(&mut c, 5), 1, "then four");
        for _ in 0..10 {
            c.judge(1000, 990);
        }
        assert_eq!(c.skip, MAX_SKIP, "bounded");
        assert_eq!(tried(&mut c, MAX_SKIP as usize + 1), 1);
        c.judge(1000, 500);
        assert_eq!(tried(&mut c, 3), 3, "good content: every batch again");
        c.judge(1000, 990);
        assert_eq!(tried(&mut c, 2), 1, "and the back-off starts over");
        // Always ignores both the budget and the back-off.
        let mut a = LinkCompressor::new(Compression::Always).unwrap().unwrap();
        a.judge(1000, 990);
        assert!(a.wants(1 << 20) && a.wants(1 << 20));
    }
}
