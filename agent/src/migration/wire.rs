//! Reading agent-link frames from a byte stream, with ZSTD frames inflated in place.
use std::collections::VecDeque;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::link::{frame_size, LinkError, LinkFrame, MAX_FRAME};

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
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
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
    ) -> Result<Option<LinkFrame>, String> {
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
                Err(e) => return Err(e.to_string()),
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
                .map_err(|e| format!("link read failed: {e}"))?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err("link closed inside a frame".into())
                };
            }
        }
    }

    fn inflate(&mut self, raw_len: u32, data: &[u8]) -> Result<(), String> {
        if raw_len > 2 * MAX_FRAME {
            return Err(format!("ZSTD frame claims {raw_len} bytes"));
        }
        let raw = zstd::bulk::decompress(data, raw_len as usize)
            .map_err(|e| format!("ZSTD frame does not inflate: {e}"))?;
        if raw.len() != raw_len as usize {
            return Err("ZSTD frame inflates to the wrong size".into());
        }
        let mut rest = &raw[..];
        while !rest.is_empty() {
            let (frame, used) = LinkFrame::parse(rest).map_err(|e| format!("inside ZSTD: {e}"))?;
            if matches!(frame, LinkFrame::Zstd { .. }) {
                return Err("nested ZSTD frame".into());
            }
            self.inflated.push_back(frame);
            rest = &rest[used..];
        }
        Ok(())
    }
}
