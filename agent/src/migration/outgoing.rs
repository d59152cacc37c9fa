//! Link bytes on their way out: a batch of frames that goes out in one gathered write.
//!
//! A PAGE frame's 4 KiB are not copied into the batch. They stay in the read buffer QEMU's
//! stream arrived in, and the write gathers them from there, so a page sent in full is copied
//! once into the agent and once into the kernel, and not a third time in between. The batch
//! holds a share of each such read buffer until it is written; [`Outgoing::clear`] hands the
//! shares back so the last holder can recycle the buffer.
use std::{io::IoSlice, sync::Arc};

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::stream::PAGE_SIZE;

/// A page written at byte `at` of the frame bytes, from `read[offset..offset + PAGE_SIZE]`.
struct Spliced {
    at: usize,
    read: Arc<Vec<u8>>,
    offset: usize,
}

/// Frame bytes, with pages spliced in by reference.
#[derive(Default)]
pub struct Outgoing {
    bytes: Vec<u8>,
    pages: Vec<Spliced>,
}

impl From<Vec<u8>> for Outgoing {
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            pages: Vec::new(),
        }
    }
}

impl Outgoing {
    pub fn with_capacity(bytes: usize) -> Self {
        Vec::with_capacity(bytes).into()
    }

    /// Where frames are encoded; a spliced page goes after what is here now.
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Appends the page at `offset` in `read` without copying it.
    pub fn push_page(&mut self, read: &Arc<Vec<u8>>, offset: usize) {
        assert!(
            offset + PAGE_SIZE <= read.len(),
            "a spliced page lies in its read"
        );
        self.pages.push(Spliced {
            at: self.bytes.len(),
            read: read.clone(),
            offset,
        });
    }

    /// Bytes it puts on the link.
    pub fn len(&self) -> usize {
        self.bytes.len() + self.pages.len() * PAGE_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame bytes, when no page is spliced in (for tests: the link gets
    /// [`Self::write_to`], compression [`Self::gather_into`]).
    #[cfg(test)]
    pub fn contiguous(&self) -> Option<&[u8]> {
        self.pages.is_empty().then_some(&self.bytes[..])
    }

    /// The bytes it puts on the link, in order, as slices of the frame bytes and of the reads.
    fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut slices = Vec::with_capacity(2 * self.pages.len() + 1);
        let mut from = 0;
        for p in &self.pages {
            if p.at > from {
                slices.push(IoSlice::new(&self.bytes[from..p.at]));
            }
            slices.push(IoSlice::new(&p.read[p.offset..p.offset + PAGE_SIZE]));
            from = p.at;
        }
        if from < self.bytes.len() {
            slices.push(IoSlice::new(&self.bytes[from..]));
        }
        slices
    }

    /// Appends the bytes it puts on the link to `out` (to compress them).
    pub fn gather_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.len());
        for s in self.slices() {
            out.extend_from_slice(&s);
        }
    }

    /// Writes everything, in order, with as few system calls as the socket allows.
    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        let mut slices = self.slices();
        let mut left = &mut slices[..];
        while !left.is_empty() {
            let n = w.write_vectored(left).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut left, n);
        }
        Ok(())
    }

    /// Empties the batch for reuse, handing each page's share of its read buffer to `release`.
    pub fn clear(&mut self, mut release: impl FnMut(Arc<Vec<u8>>)) {
        self.bytes.clear();
        for p in self.pages.drain(..) {
            release(p.read);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use super::*;

    /// A writer that takes at most `step` bytes per call, to force partial vectored writes.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut room = self.step;
            for b in bufs {
                let n = b.len().min(room);
                self.out.extend_from_slice(&b[..n]);
                room -= n;
                if room == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(self.step - room))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_frames_and_spliced_pages_in_order_through_partial_writes() {
        let read: Arc<Vec<u8>> = Arc::new((0..3 * PAGE_SIZE).map(|i| (i / 7) as u8).collect());
        let mut out = Outgoing::default();
        let mut want = Vec::new();
        // A page first, two back to back, frame bytes between and after.
        for (head, page) in [(&b""[..], 0), (b"ab", PAGE_SIZE), (b"", 2 * PAGE_SIZE - 5)] {
            out.bytes_mut().extend_from_slice(head);
            want.extend_from_slice(head);
            out.push_page(&read, page);
            want.extend_from_slice(&read[page..page + PAGE_SIZE]);
        }
        out.bytes_mut().extend_from_slice(b"tail");
        want.extend_from_slice(b"tail");
        assert_eq!(out.len(), want.len());
        assert!(out.contiguous().is_none());
        let mut gathered = b"kept".to_vec();
        out.gather_into(&mut gathered);
        assert_eq!((&gathered[..4], &gathered[4..]), (&b"kept"[..], &want[..]));
        for step in [1, 3, 4096, 5000, 1 << 20] {
            let mut w = Trickle {
                out: Vec::new(),
                step,
            };
            out.write_to(&mut w).await.expect("written");
            assert_eq!(w.out, want, "step {step}");
        }
        let mut released = 0;
        out.clear(|r| {
            assert!(Arc::ptr_eq(&r, &read));
            released += 1;
        });
        assert_eq!((released, out.len()), (3, 0));
        assert_eq!(Arc::strong_count(&read), 1);
    }
}
