//! Reading agent-link frames from a byte stream, with ZSTD frames inflated in place.
use std::{collections::VecDeque, io};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::link::{frame_size, LinkError, LinkFrame};

/// Why no frame could be read from a link.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("link read failed: {0}")]
    Read(io::Error),
    #[error("link closed inside a frame")]
    ClosedInFrame,
    #[error(transparent)]
    Frame(LinkError),
    #[error("cannot make a ZSTD context: {0}")]
    ZstdContext(io::Error),
    #[error("ZSTD frame does not inflate: {0}")]
    Inflate(io::Error),
    #[error("ZSTD frame inflates to the wrong size")]
    InflatedSize,
    #[error("inside ZSTD: {0}")]
    InsideZstd(LinkError),
    #[error("nested ZSTD frame")]
    NestedZstd,
}

/// Bytes asked of the link per read.
const READ_CHUNK: usize = 256 << 10;

/// Buffers a link's bytes and yields whole frames.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed; compacted only when a read needs room, so parsing a
    /// run of small frames does not move the rest of the buffer each time.
    start: usize,
    inflated: VecDeque<LinkFrame>,
    /// One decompression context for the whole link, made at the first ZSTD frame.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// Where ZSTD frames inflate; it keeps its capacity (at most twice [`super::link::MAX_FRAME`]).
    raw: Vec<u8>,
    /// Bytes read from the link so far.
    read: u64,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes read from the link so far (whether or not their frames were taken yet).
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Whether the next frame is already buffered whole, so [`FrameReader::next`] will not
    /// wait for the link.
    pub fn has_buffered(&self) -> bool {
        let rest = &self.buf[self.start..];
        !self.inflated.is_empty() || frame_size(rest).is_some_and(|n| rest.len() >= n)
    }

    /// The next frame; `Ok(None)` at a clean end of stream. ZSTD frames are opened and their
    /// inner frames returned one by one (nested ZSTD is refused).
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<LinkFrame>, WireError> {
        if let Some(f) = self.inflated.pop_front() {
            return Ok(Some(f));
        }
        loop {
            match LinkFrame::parse(&self.buf[self.start..]) {
                Ok((frame, used)) => {
                    self.start += used;
                    if let LinkFrame::Zstd { raw_len, data } = frame {
                        self.inflate(raw_len, &data)?;
                        match self.inflated.pop_front() {
                            Some(f) => return Ok(Some(f)),
                            None => continue,
                        }
                    }
                    return Ok(Some(frame));
                }
                Err(LinkError::Incomplete) => {}
                Err(e) => return Err(WireError::Frame(e)),
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            // Read straight into the buffer's spare room (at least READ_CHUNK of it).
            self.buf.reserve(READ_CHUNK);
            let n = reader
                .read_buf(&mut self.buf)
                .await
                .map_err(WireError::Read)?;
            self.read += n as u64;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::ClosedInFrame)
                };
            }
        }
    }

    fn inflate(&mut self, raw_len: u32, data: &[u8]) -> Result<(), WireError> {
        // `LinkFrame::parse` already refused a frame claiming more than twice MAX_FRAME.
        let zstd = match &mut self.zstd {
            Some(z) => z,
            None => self
                .zstd
                .insert(zstd::bulk::Decompressor::new().map_err(WireError::ZstdContext)?),
        };
        // Inflating stops at the buffer's capacity: a frame that claims less than it holds
        // cannot grow it.
        self.raw.clear();
        self.raw.reserve(raw_len as usize);
        let n = zstd
            .decompress_to_buffer(data, &mut self.raw)
            .map_err(WireError::Inflate)?;
        if n != raw_len as usize {
            return Err(WireError::InflatedSize);
        }
        let mut rest = &self.raw[..];
        while !rest.is_empty() {
            let (frame, used) = LinkFrame::parse(rest).map_err(WireError::InsideZstd)?;
            if matches!(frame, LinkFrame::Zstd { .. }) {
                return Err(WireError::NestedZstd);
            }
            self.inflated.push_back(frame);
            rest = &rest[used..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::link::{encode_zstd, MAX_FRAME};

    /// A ZSTD frame holding `inner`, claiming `raw_len` bytes inflated.
    fn zstd_frame(inner: &[u8], raw_len: u32) -> Vec<u8> {
        let data = zstd::bulk::compress(inner, 1).unwrap();
        let mut out = Vec::new();
        encode_zstd(&mut out, raw_len, &data);
        out
    }

    async fn all_frames(mut link: &[u8]) -> Result<Vec<LinkFrame>, String> {
        let mut reader = FrameReader::new();
        let mut frames = Vec::new();
        while let Some(f) = reader.next(&mut link).await.map_err(|e| e.to_string())? {
            frames.push(f);
        }
        Ok(frames)
    }

    #[tokio::test]
    async fn zstd_frames_in_a_row_yield_their_inner_frames_in_order() {
        let a = LinkFrame::Raw(b"first".to_vec());
        let b = LinkFrame::Dup { ordinal: 7 };
        let c = LinkFrame::Raw(vec![0x5a; 70_000]);
        let one = [a.to_bytes(), b.to_bytes()].concat();
        let two = c.to_bytes();
        let mut link = zstd_frame(&one, one.len() as u32);
        link.extend(LinkFrame::Dup { ordinal: 1 }.to_bytes());
        link.extend(zstd_frame(&two, two.len() as u32));
        let frames = all_frames(&link).await.unwrap();
        assert_eq!(frames, vec![a, b, LinkFrame::Dup { ordinal: 1 }, c]);
    }

    #[tokio::test]
    async fn a_zstd_frame_that_lies_about_its_size_is_refused() {
        let inner = LinkFrame::Raw(vec![1; 10_000]).to_bytes();
        let n = inner.len() as u32;
        for claimed in [n - 1, n + 1, 0] {
            let err = all_frames(&zstd_frame(&inner, claimed)).await.unwrap_err();
            assert!(
                err.contains("does not inflate") || err.contains("wrong size"),
                "{claimed}: {err}"
            );
        }
        let err = all_frames(&zstd_frame(&inner, 2 * MAX_FRAME + 1))
            .await
            .unwrap_err();
        assert!(err.contains("inflates too far"), "{err}");
    }

    #[tokio::test]
    async fn garbage_and_nested_zstd_frames_are_refused() {
        let mut garbage = Vec::new();
        encode_zstd(&mut garbage, 100, &[0xde, 0xad, 0xbe, 0xef]);
        let err = all_frames(&garbage).await.unwrap_err();
        assert!(err.contains("does not inflate"), "{err}");

        let inner = LinkFrame::Raw(b"x".to_vec()).to_bytes();
        let once = zstd_frame(&inner, inner.len() as u32);
        let err = all_frames(&zstd_frame(&once, once.len() as u32))
            .await
            .unwrap_err();
        assert!(err.contains("nested ZSTD"), "{err}");
    }
}
