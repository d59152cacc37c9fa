//! The index-service client and the hot-set replica a source agent keeps.

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};

use blockhash::Hash;
use nas_proto::{
    index::{ErrorCode, ExportInfo, Found, Frame, FrameError, MAX_BATCH, VERSION},
    net::{connect, Stream},
    Endpoint,
};

use crate::{digest_map::DigestMap, tls::StorageTls};

/// Errors of the index client.
#[derive(Debug, thiserror::Error)]
pub enum IndexClientError {
    #[error("index service connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("index service sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("index service refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("index service sent an unexpected frame: {0}")]
    Unexpected(&'static str),
    #[error("index service closed the connection")]
    Closed,
}

/// A session with the index service, scoped to the exports named at connect.
pub struct IndexClient {
    reader: BufReader<ReadHalf<Box<dyn Stream>>>,
    writer: BufWriter<WriteHalf<Box<dyn Stream>>>,
    buf: Vec<u8>,
    next_id: u32,
    scope: Vec<ExportInfo>,
}

impl IndexClient {
    /// Connects and says HELLO with `exports`; the server adds its shared exports.
    pub async fn connect(addr: &Endpoint, exports: &[String]) -> Result<Self, IndexClientError> {
        Self::connect_with(addr, exports, None).await
    }

    /// [`IndexClient::connect`] over TLS when `tls` is given (the service's TLS starts with
    /// the connection).
    pub async fn connect_with(
        addr: &Endpoint,
        exports: &[String],
        tls: Option<&StorageTls>,
    ) -> Result<Self, IndexClientError> {
        let mut stream = connect(addr).await?;
        if let Some(tls) = tls {
            stream = tls.wrap(stream, addr).await?;
        }
        let (reader, writer) = tokio::io::split(stream);
        let mut c = Self {
            reader: BufReader::new(reader),
            writer: BufWriter::new(writer),
            buf: Vec::new(),
            next_id: 1,
            scope: Vec::new(),
        };
        c.send(&Frame::Hello {
            version: VERSION,
            exports: exports.to_vec(),
        })
        .await?;
        match c.recv().await? {
            Frame::Welcome { exports, .. } => c.scope = exports,
            _ => return Err(IndexClientError::Unexpected("expected WELCOME")),
        }
        Ok(c)
    }

    /// The exports this session may search, shared ones included.
    pub fn scope(&self) -> &[ExportInfo] {
        &self.scope
    }

    async fn send(&mut self, frame: &Frame) -> Result<(), IndexClientError> {
        self.writer.write_all(&frame.to_bytes()).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// The next frame from the server; an ERROR frame becomes [`IndexClientError::Refused`].
    pub async fn recv(&mut self) -> Result<Frame, IndexClientError> {
        loop {
            match Frame::parse(&self.buf) {
                Ok((frame, used)) => {
                    self.buf.drain(..used);
                    if let Frame::Error { code, message, .. } = frame {
                        return Err(IndexClientError::Refused { code, message });
                    }
                    return Ok(frame);
                }
                Err(FrameError::Incomplete) => {}
                Err(e) => return Err(e.into()),
            }
            let mut chunk = [0u8; 64 << 10];
            let n = self.reader.read(&mut chunk).await?;
            if n == 0 {
                return Err(IndexClientError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends a LOOKUP without waiting for its reply (for pipelining); returns its id. Replies
    /// come back in request order through [`IndexClient::recv`].
    pub async fn send_lookup(&mut self, hashes: Vec<Hash>) -> Result<u32, IndexClientError> {
        debug_assert!(hashes.len() <= MAX_BATCH as usize);
        let id = self.id();
        self.send(&Frame::Lookup { id, hashes }).await?;
        Ok(id)
    }

    /// Looks up every hash, in batches, within the session's scope.
    pub async fn lookup(
        &mut self,
        hashes: &[Hash],
    ) -> Result<Vec<Option<Found>>, IndexClientError> {
        let mut out = Vec::with_capacity(hashes.len());
        for batch in hashes.chunks(MAX_BATCH as usize) {
            let id = self.send_lookup(batch.to_vec()).await?;
            match self.recv().await? {
                Frame::LookupReply { id: got, found }
                    if got == id && found.len() == batch.len() =>
                {
                    out.extend(found)
                }
                _ => return Err(IndexClientError::Unexpected("expected LOOKUP_REPLY")),
            }
        }
        Ok(out)
    }

    /// The hashes of blocks `[first, first + count)` of `export`.
    pub async fn block_hashes(
        &mut self,
        export: u32,
        first: u64,
        count: u32,
    ) -> Result<Vec<Option<Hash>>, IndexClientError> {
        let id = self.id();
        self.send(&Frame::BlockHashes {
            id,
            export,
            first,
            count,
        })
        .await?;
        match self.recv().await? {
            Frame::BlockHashesReply { id: got, hashes } if got == id => Ok(hashes),
            _ => Err(IndexClientError::Unexpected("expected BLOCK_HASHES_REPLY")),
        }
    }

    /// Asks for the hot sets; afterwards [`IndexClient::recv`] yields HOT frames to feed into a
    /// [`HotReplica`].
    pub async fn subscribe_hot(&mut self) -> Result<(), IndexClientError> {
        let id = self.id();
        self.send(&Frame::HotSubscribe { id }).await
    }
}

/// A source agent's copy of the hot sets: content -> where it lives.
///
/// It keeps one place per content, the latest one announced. When that block changes, the
/// content is forgotten even if another hot block holds it too: the agent then asks the index
/// service, which knows every place, so only a round trip is lost. Each change names the hash
/// the block held before (`was`), so the replica needs no block -> content map of its own:
/// one table, keyed by content, which answers a read's pages together
/// ([`HotReplica::get_many`]), its cache misses overlapped.
#[derive(Debug, Default)]
pub struct HotReplica {
    by_hash: DigestMap<(u32, u64)>,
    /// A bulk load's entries, kept for reuse.
    scratch: Vec<(Hash, (u32, u64))>,
}

/// Most snapshot entries the replica makes room for in advance (4 million slots at most);
/// a larger snapshot grows it as it arrives.
const MAX_SNAPSHOT_HINT: u32 = 1 << 21;

impl HotReplica {
    /// Applies a HOT frame; other frames are ignored and reported as `false`.
    pub fn apply(&mut self, frame: &Frame) -> bool {
        let Frame::Hot {
            export,
            reset,
            entries,
        } = frame
        else {
            return false;
        };
        if let Some(snapshot) = reset {
            self.by_hash.retain(|_, (e, _)| e != export);
            // Sized once for the whole snapshot; the size is the server's word, so bounded.
            self.by_hash
                .reserve((*snapshot).min(MAX_SNAPSHOT_HINT) as usize);
        }
        if entries.iter().all(|e| e.was.is_none()) {
            // A snapshot's frames, or blocks new to the set: one bulk load.
            self.scratch.clear();
            self.scratch.extend(
                entries
                    .iter()
                    .filter_map(|e| Some((e.hash?, (*export, e.block)))),
            );
            self.by_hash.insert_many(&self.scratch);
            return true;
        }
        for e in entries {
            let key = (*export, e.block);
            // `key` no longer holds `was`: forget it unless another block was announced since.
            if let Some(was) = &e.was {
                if self.by_hash.get(was) == Some(key) {
                    self.by_hash.remove(was);
                }
            }
            if let Some(h) = e.hash {
                self.by_hash.insert(h, key);
            }
        }
        true
    }

    /// Where `hash` lives, as (export, byte offset), if the replica knows it.
    pub fn get(&self, hash: &Hash) -> Option<Found> {
        self.by_hash.get(hash).map(found)
    }

    /// [`HotReplica::get`] for each of `hashes`, appended to `out` in order.
    pub fn get_many(&self, hashes: &[Hash], out: &mut Vec<Option<Found>>) {
        out.extend(self.by_hash.get_many(hashes).map(|p| p.map(found)));
    }

    /// Contents the replica can place.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn found((export, block): (u32, u64)) -> Found {
    Found {
        export,
        offset: block * blockhash::BLOCK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nas_proto::index::HotEntry;

    #[test]
    fn replica_follows_changes_and_resets() {
        let mut r = HotReplica::default();
        let hot = |export, reset: bool, entries: &[(u64, Option<u8>, Option<u8>)]| Frame::Hot {
            export,
            reset: reset.then_some(entries.len() as u32),
            entries: entries
                .iter()
                .map(|&(block, h, was)| HotEntry {
                    block,
                    hash: h.map(|b| [b; 32]),
                    was: was.map(|b| [b; 32]),
                })
                .collect(),
        };
        assert!(r.apply(&hot(1, true, &[(1, Some(7), None), (2, Some(8), None)])));
        // Content 7 again, in another export: the latest place wins.
        assert!(r.apply(&hot(2, true, &[(5, Some(7), None)])));
        assert_eq!(r.len(), 2);
        // Block 1 left (7 stays: it was announced at 2:5 since); block 2 changed 8 -> 9.
        r.apply(&hot(1, false, &[(1, None, Some(7)), (2, Some(9), Some(8))]));
        assert_eq!(
            r.get(&[7; 32]),
            Some(Found {
                export: 2,
                offset: 5 * 4096
            })
        );
        assert_eq!(r.get(&[8; 32]), None);
        assert_eq!(
            r.get(&[9; 32]),
            Some(Found {
                export: 1,
                offset: 2 * 4096
            })
        );
        r.apply(&hot(2, true, &[]));
        assert_eq!(r.get(&[7; 32]), None);
        assert_eq!(r.len(), 1);
        assert!(!r.apply(&Frame::HotSubscribe { id: 1 }));
    }
}
