//! Index-service frames: pure encoding and check-then-parse decoding over bytes.
//!
//! Every frame is `u32 length | u8 type | payload` (big-endian; `length` counts the type byte
//! and the payload and is at most [`MAX_FRAME`]). [`Frame::parse`] looks at a buffer and
//! returns [`FrameError::Incomplete`] until a whole frame is there, so it can be fed any
//! chunking of a byte stream. See `docs/index-protocol.md` for the conversation.
use blockhash::Hash;

use crate::cursor::{Cursor, Malformed};

/// Protocol version spoken by this build.
pub const VERSION: u16 = 2;
/// Largest frame (type byte + payload).
pub const MAX_FRAME: u32 = 4 << 20;
/// Most hashes in one LOOKUP, and most blocks in one BLOCK_HASHES.
pub const MAX_BATCH: u32 = 65_536;
/// Most entries in one HOT frame: even if every entry carries both hashes, the frame stays
/// within [`MAX_FRAME`].
pub const MAX_HOT_ENTRIES: u32 = 32_768;
/// Most exports named in one HELLO.
pub const MAX_EXPORTS: u16 = 256;

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_LOOKUP: u8 = 3;
const T_LOOKUP_REPLY: u8 = 4;
const T_BLOCK_HASHES: u8 = 5;
const T_BLOCK_HASHES_REPLY: u8 = 6;
const T_HOT_SUBSCRIBE: u8 = 7;
const T_HOT: u8 = 8;
const T_ERROR: u8 = 0x7f;

/// Error codes carried by [`Frame::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer speaks another version.
    Version = 1,
    /// A frame was malformed or out of place.
    Protocol = 2,
    /// HELLO named an export this server does not have.
    UnknownExport = 3,
    /// A request named an export outside the session's scope.
    OutOfScope = 4,
    /// A request was larger than the limits above.
    TooLarge = 5,
    /// The server is shutting down.
    Shutdown = 6,
    /// The session may not name that export: it needs TLS, or a client identity the
    /// export allows (or the server requires TLS and the session is plaintext).
    Forbidden = 7,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Version,
            2 => Self::Protocol,
            3 => Self::UnknownExport,
            4 => Self::OutOfScope,
            5 => Self::TooLarge,
            6 => Self::Shutdown,
            7 => Self::Forbidden,
            _ => return None,
        })
    }
}

/// An export as the server describes it in WELCOME.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub id: u32,
    pub size: u64,
    /// Configured as shared (e.g. a golden base image): searched by every session.
    pub shared: bool,
    pub name: String,
}

/// One hot-set change: `block` now holds `hash`, or left the set (`None`). `was` is the hash
/// the block held in the set before this change, so a replica can forget that content without
/// keeping a block -> hash map of its own (`None` in snapshots and for blocks new to the set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotEntry {
    pub block: u64,
    pub hash: Option<Hash>,
    pub was: Option<Hash>,
}

/// HOT entry flags: which hashes follow the block number.
const HOT_HASH: u8 = 1;
const HOT_WAS: u8 = 2;

/// Where a looked-up hash lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub export: u32,
    pub offset: u64,
}

/// A protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// client -> server, first: the version and the exports this session may search.
    Hello {
        version: u16,
        exports: Vec<String>,
    },
    /// server -> client: the session's scope, shared exports included.
    Welcome {
        version: u16,
        exports: Vec<ExportInfo>,
    },
    Lookup {
        id: u32,
        hashes: Vec<Hash>,
    },
    LookupReply {
        id: u32,
        found: Vec<Option<Found>>,
    },
    BlockHashes {
        id: u32,
        export: u32,
        first: u64,
        count: u32,
    },
    BlockHashesReply {
        id: u32,
        hashes: Vec<Option<Hash>>,
    },
    /// client -> server: stream the hot sets of the session's exports from now on.
    HotSubscribe {
        id: u32,
    },
    /// server -> client: hot-set changes of one export. `reset: Some(n)` means forget that
    /// export's replica first: a snapshot of `n` entries starts here, in this frame and the
    /// frames that follow it (sent at subscription and whenever the client fell behind).
    Hot {
        export: u32,
        reset: Option<u32>,
        entries: Vec<HotEntry>,
    },
    Error {
        id: u32,
        code: ErrorCode,
        message: String,
    },
}

/// Why bytes are not (yet) a frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("incomplete frame")]
    Incomplete,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl From<Malformed> for FrameError {
    fn from(m: Malformed) -> Self {
        FrameError::Malformed(m.0)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

impl Frame {
    /// Parses one frame from the front of `buf`: the frame and the bytes it used.
    pub fn parse(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
        if buf.len() < 4 {
            return Err(FrameError::Incomplete);
        }
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap());
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            return Err(FrameError::Malformed("empty frame"));
        }
        let total = 4 + len as usize;
        if buf.len() < total {
            return Err(FrameError::Incomplete);
        }
        let kind = buf[4];
        let mut r = Cursor::new(&buf[5..total]);
        let frame = match kind {
            T_HELLO => {
                let version = r.u16("version")?;
                let n = r.u16("export count")?;
                if n > MAX_EXPORTS {
                    return Err(FrameError::Malformed("too many exports"));
                }
                let exports = (0..n)
                    .map(|_| r.string_u16("export name"))
                    .collect::<Result<_, _>>()?;
                Frame::Hello { version, exports }
            }
            T_WELCOME => {
                let version = r.u16("version")?;
                let n = r.u16("export count")?;
                let mut exports = Vec::new();
                for _ in 0..n {
                    let id = r.u32("export id")?;
                    let size = r.u64("export size")?;
                    let shared = r.u8("export flags")? & 1 != 0;
                    let name = r.string_u16("export name")?;
                    exports.push(ExportInfo {
                        id,
                        size,
                        shared,
                        name,
                    });
                }
                Frame::Welcome { version, exports }
            }
            T_LOOKUP => {
                let id = r.u32("request id")?;
                let n = r.count(MAX_BATCH, 32, "hash count")?;
                let hashes = (0..n)
                    .map(|_| r.array::<32>("hash"))
                    .collect::<Result<_, _>>()?;
                Frame::Lookup { id, hashes }
            }
            T_LOOKUP_REPLY => {
                let id = r.u32("request id")?;
                let n = r.count(MAX_BATCH, 13, "result count")?;
                let mut found = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let present = r.u8("present")?;
                    let export = r.u32("export")?;
                    let offset = r.u64("offset")?;
                    found.push((present == 1).then_some(Found { export, offset }));
                }
                Frame::LookupReply { id, found }
            }
            T_BLOCK_HASHES => Frame::BlockHashes {
                id: r.u32("request id")?,
                export: r.u32("export")?,
                first: r.u64("first block")?,
                count: r.u32("block count")?,
            },
            T_BLOCK_HASHES_REPLY => {
                let id = r.u32("request id")?;
                let n = r.count(MAX_BATCH, 33, "block count")?;
                let mut hashes = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let present = r.u8("present")?;
                    let hash = r.array::<32>("hash")?;
                    hashes.push((present == 1).then_some(hash));
                }
                Frame::BlockHashesReply { id, hashes }
            }
            T_HOT_SUBSCRIBE => Frame::HotSubscribe {
                id: r.u32("request id")?,
            },
            T_HOT => {
                let export = r.u32("export")?;
                let reset = match (r.u8("reset")?, r.u32("snapshot entries")?) {
                    (0, 0) => None,
                    (0, _) => return Err(FrameError::Malformed("snapshot size without reset")),
                    (1, n) => Some(n),
                    _ => return Err(FrameError::Malformed("reset flag")),
                };
                let n = r.count(MAX_HOT_ENTRIES, 9, "entry count")?;
                let mut entries = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let block = r.u64("block")?;
                    let flags = r.u8("entry flags")?;
                    if flags & !(HOT_HASH | HOT_WAS) != 0 {
                        return Err(FrameError::Malformed("unknown entry flags"));
                    }
                    let hash = (flags & HOT_HASH != 0)
                        .then(|| r.array::<32>("hash"))
                        .transpose()?;
                    let was = (flags & HOT_WAS != 0)
                        .then(|| r.array::<32>("previous hash"))
                        .transpose()?;
                    entries.push(HotEntry { block, hash, was });
                }
                Frame::Hot {
                    export,
                    reset,
                    entries,
                }
            }
            T_ERROR => {
                let id = r.u32("request id")?;
                let code = ErrorCode::from_u16(r.u16("error code")?)
                    .ok_or(FrameError::Malformed("unknown error code"))?;
                let message = r.string_u16("message")?;
                Frame::Error { id, code, message }
            }
            _ => return Err(FrameError::Malformed("unknown frame type")),
        };
        r.end()?;
        Ok((frame, total))
    }

    /// Appends the frame's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Hello { version, exports } => {
                out.push(T_HELLO);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&(exports.len() as u16).to_be_bytes());
                for e in exports {
                    put_string(out, e);
                }
            }
            Frame::Welcome { version, exports } => {
                out.push(T_WELCOME);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&(exports.len() as u16).to_be_bytes());
                for e in exports {
                    out.extend_from_slice(&e.id.to_be_bytes());
                    out.extend_from_slice(&e.size.to_be_bytes());
                    out.push(u8::from(e.shared));
                    put_string(out, &e.name);
                }
            }
            Frame::Lookup { id, hashes } => {
                out.push(T_LOOKUP);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
            Frame::LookupReply { id, found } => {
                out.push(T_LOOKUP_REPLY);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(found.len() as u32).to_be_bytes());
                for f in found {
                    let (p, e, o) = f.map_or((0, 0, 0), |f| (1, f.export, f.offset));
                    out.push(p);
                    out.extend_from_slice(&e.to_be_bytes());
                    out.extend_from_slice(&o.to_be_bytes());
                }
            }
            Frame::BlockHashes {
                id,
                export,
                first,
                count,
            } => {
                out.push(T_BLOCK_HASHES);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&export.to_be_bytes());
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
            Frame::BlockHashesReply { id, hashes } => {
                out.push(T_BLOCK_HASHES_REPLY);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
                for h in hashes {
                    out.push(u8::from(h.is_some()));
                    out.extend_from_slice(&h.unwrap_or([0; 32]));
                }
            }
            Frame::HotSubscribe { id } => {
                out.push(T_HOT_SUBSCRIBE);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Frame::Hot {
                export,
                reset,
                entries,
            } => {
                out.push(T_HOT);
                out.extend_from_slice(&export.to_be_bytes());
                out.push(u8::from(reset.is_some()));
                out.extend_from_slice(&reset.unwrap_or(0).to_be_bytes());
                out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
                for e in entries {
                    out.extend_from_slice(&e.block.to_be_bytes());
                    let flags = e.hash.map_or(0, |_| HOT_HASH) | e.was.map_or(0, |_| HOT_WAS);
                    out.push(flags);
                    for h in e.hash.iter().chain(&e.was) {
                        out.extend_from_slice(h);
                    }
                }
            }
            Frame::Error { id, code, message } => {
                out.push(T_ERROR);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(*code as u16).to_be_bytes());
                put_string(out, message);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The frame's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: 1,
                exports: vec!["vm1".into(), "base".into()],
            },
            Frame::Welcome {
                version: 1,
                exports: vec![ExportInfo {
                    id: 2,
                    size: 1 << 30,
                    shared: true,
                    name: "base".into(),
                }],
            },
            Frame::Lookup {
                id: 7,
                hashes: vec![[1; 32], [2; 32]],
            },
            Frame::LookupReply {
                id: 7,
                found: vec![
                    Some(Found {
                        export: 2,
                        offset: 8192,
                    }),
                    None,
                ],
            },
            Frame::BlockHashes {
                id: 8,
                export: 2,
                first: 10,
                count: 3,
            },
            Frame::BlockHashesReply {
                id: 8,
                hashes: vec![Some([3; 32]), None],
            },
            Frame::HotSubscribe { id: 9 },
            Frame::Hot {
                export: 1,
                reset: Some(70_000),
                entries: vec![
                    HotEntry {
                        block: 5,
                        hash: Some([4; 32]),
                        was: None,
                    },
                    HotEntry {
                        block: 6,
                        hash: Some([5; 32]),
                        was: Some([6; 32]),
                    },
                    HotEntry {
                        block: 7,
                        hash: None,
                        was: Some([7; 32]),
                    },
                ],
            },
            Frame::Error {
                id: 7,
                code: ErrorCode::OutOfScope,
                message: "no".into(),
            },
        ]
    }

    #[test]
    fn round_trips_at_every_split() {
        let mut stream = Vec::new();
        for f in samples() {
            f.encode(&mut stream);
        }
        for split in 0..stream.len() {
            // Feed the first `split` bytes, then everything: each prefix is either complete
            // frames or Incomplete, never an error.
            let mut buf = stream[..split].to_vec();
            let mut got = Vec::new();
            loop {
                match Frame::parse(&buf) {
                    Ok((f, used)) => {
                        got.push(f);
                        buf.drain(..used);
                    }
                    Err(FrameError::Incomplete) => break,
                    Err(e) => panic!("split {split}: {e}"),
                }
            }
            buf.extend_from_slice(&stream[split..]);
            while let Ok((f, used)) = Frame::parse(&buf) {
                got.push(f);
                buf.drain(..used);
            }
            assert_eq!(got, samples(), "split {split}");
        }
    }

    #[test]
    fn the_largest_hot_frame_fits() {
        let entry = HotEntry {
            block: u64::MAX,
            hash: Some([1; 32]),
            was: Some([2; 32]),
        };
        let frame = Frame::Hot {
            export: 1,
            reset: None,
            entries: vec![entry; MAX_HOT_ENTRIES as usize],
        };
        let bytes = frame.to_bytes();
        assert!(bytes.len() - 4 <= MAX_FRAME as usize);
        assert_eq!(Frame::parse(&bytes), Ok((frame, bytes.len())));
    }

    #[test]
    fn rejects_malformed_frames() {
        assert_eq!(Frame::parse(&[0, 0, 0]), Err(FrameError::Incomplete));
        assert_eq!(
            Frame::parse(&[0xff, 0, 0, 0, 1]),
            Err(FrameError::TooLarge(0xff00_0000))
        );
        assert_eq!(
            Frame::parse(&[0, 0, 0, 0]),
            Err(FrameError::Malformed("empty frame"))
        );
        assert_eq!(
            Frame::parse(&[0, 0, 0, 1, 99]),
            Err(FrameError::Malformed("unknown frame type"))
        );
        // LOOKUP claiming more hashes than it carries.
        let mut b = vec![0, 0, 0, 9, T_LOOKUP, 0, 0, 0, 1, 0, 0, 0, 2];
        b.extend_from_slice(&[0; 32]);
        b[3] = (b.len() - 4) as u8;
        assert_eq!(Frame::parse(&b), Err(FrameError::Malformed("hash count")));
        // A HOT entry with an unknown flag, and one announcing a hash it does not carry.
        let mut b = vec![0, 0, 0, 0, T_HOT, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        b.extend_from_slice(&5u64.to_be_bytes());
        b.push(4);
        b[3] = (b.len() - 4) as u8;
        assert_eq!(
            Frame::parse(&b),
            Err(FrameError::Malformed("unknown entry flags"))
        );
        let n = b.len();
        b[n - 1] = HOT_HASH;
        b.extend_from_slice(&[0; 31]);
        b[3] = (b.len() - 4) as u8;
        assert_eq!(Frame::parse(&b), Err(FrameError::Malformed("hash")));
        // A snapshot size on a frame that does not reset.
        let mut b = vec![0, 0, 0, 0, T_HOT, 0, 0, 0, 1, 0, 0, 0, 0, 9, 0, 0, 0, 0];
        b[3] = (b.len() - 4) as u8;
        assert_eq!(
            Frame::parse(&b),
            Err(FrameError::Malformed("snapshot size without reset"))
        );
        // Trailing bytes after a complete HotSubscribe.
        assert_eq!(
            Frame::parse(&[0, 0, 0, 6, T_HOT_SUBSCRIBE, 0, 0, 0, 1, 9]),
            Err(FrameError::Malformed("trailing bytes"))
        );
    }
}
