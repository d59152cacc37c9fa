//! The agent link: the wire protocol between the source and the target agent.
//!
//! ```text
//!  source agent                                                  target agent
//!    |-- HELLO v4 {vm, exports(id,name), nas, caps} ----------------->|
//!    |<----------------------------------- HELLO_ACK {v4, caps} ------|
//!    |-- RAW bytes | PAGE 4 KiB | MAPPED {seq, export, off, hash} --->|  in stream order;
//!    |-- DUP {ordinal} | ZSTD {inner frames}  ...  ------------------->|  the target rebuilds
//!    |<---- ACK {mapped, credit[, received]} | FALLBACK_REQ {seq} ----|  QEMU's bytes from
//!    |-- FALLBACK_DATA {seq, 4 KiB} --------------------------------->|  them, in order
//!    |-- END {LinkStats} -------------------------------------------->|
//!    |<---------------------------------- DONE {LinkStats | why} -----|
//! ```
//!
//! Every frame is `u32 length | u8 type | payload` (big-endian; length counts the type byte and
//! payload, at most [`MAX_FRAME`]). A MAPPED page's content stays with the source until the
//! target acknowledges its sequence number, so the target can always ask for it instead of
//! trusting the NAS. DUP names content the target still holds by the ordinal of the PAGE or
//! MAPPED frame that carried it (content frames are numbered from 0 in link order): both sides
//! keep the same bounded cache of recent page contents, updated by the same frames in the same
//! order (see [`super::dedup`]). A ZSTD frame, sent only to a target that offered [`CAP_ZSTD`],
//! holds a run of RAW, PAGE, MAPPED and DUP frames (a nested ZSTD is refused); the source
//! chooses per batch (see [`super::compress`]), so any mix of plain and ZSTD frames is a valid
//! stream. A target that accepted [`CAP_RECEIVED`] adds to every ACK the link bytes it has read
//! so far, which tells the source whether the bytes it waits on are still crossing the link or
//! already wait at the target (for its QEMU or the NAS). The target answers a HELLO it will not
//! serve (another version, or a VM it has no target QEMU for, see [`super::incoming`]) with
//! ERROR instead of HELLO_ACK. Decoding is pure and
//! check-then-parse, like the index protocol.
use nas_proto::cursor::{Cursor, Malformed};

use crate::migration::{moments::Moments, stream::PAGE_SIZE};

/// 4: HELLO names the VM only, no incoming address (the target finds its QEMU itself).
/// 3: END and DONE carry [`LinkStats`] (before, any JSON string).
pub const VERSION: u16 = 4;
pub const MAX_FRAME: u32 = 8 << 20;
/// Capability bit: ZSTD frames may be sent.
pub const CAP_ZSTD: u32 = 1;
/// Capability bit: ACKs carry the link bytes the target has received.
pub const CAP_RECEIVED: u32 = 2;
/// The target acknowledges at least every `ACK_STEP` bytes of QEMU's stream it delivers (and
/// every [`ACK_MAPPED`] MAPPED pages): a source may count on an ACK once that much is
/// outstanding.
pub const ACK_STEP: u64 = 1 << 20;
/// MAPPED pages delivered between two ACKs at most.
pub const ACK_MAPPED: u64 = 1024;

const T_HELLO: u8 = 1;
const T_RAW: u8 = 2;
const T_PAGE: u8 = 3;
const T_MAPPED: u8 = 4;
const T_DUP: u8 = 5;
const T_ZSTD: u8 = 6;
const T_FALLBACK_DATA: u8 = 7;
const T_END: u8 = 8;
const T_HELLO_ACK: u8 = 0x41;
const T_ACK: u8 = 0x42;
const T_FALLBACK_REQ: u8 = 0x43;
const T_DONE: u8 = 0x44;
const T_ERROR: u8 = 0x7f;

pub type Hash = [u8; 32];

/// One frame of the link, either direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkFrame {
    Hello(Hello),
    Raw(Vec<u8>),
    Page(Box<[u8; PAGE_SIZE]>),
    Mapped {
        seq: u64,
        export: u32,
        offset: u64,
        hash: Hash,
    },
    /// The content of content frame number `ordinal` (PAGE and MAPPED frames count).
    Dup {
        ordinal: u64,
    },
    /// zstd-compressed concatenation of other frames; `raw_len` is the decompressed size.
    Zstd {
        raw_len: u32,
        data: Vec<u8>,
    },
    FallbackData {
        seq: u64,
        page: Box<[u8; PAGE_SIZE]>,
    },
    /// The source has nothing more; what it counted.
    End {
        stats: LinkStats,
    },
    HelloAck {
        version: u16,
        caps: u32,
    },
    /// The target delivered the first `mapped` MAPPED pages and the first `credit` bytes of
    /// QEMU's stream to its QEMU: the source may drop those pages' copies and send further.
    /// Flow control lives here, so fallback data is never stuck behind data. With
    /// [`CAP_RECEIVED`], `received` is the link bytes the target has read so far.
    Ack {
        mapped: u64,
        credit: u64,
        received: Option<u64>,
    },
    FallbackReq {
        seq: u64,
    },
    /// The target delivered everything, with what it counted; or failed, and why.
    Done {
        outcome: Result<LinkStats, String>,
    },
    Error {
        message: String,
    },
}

/// What one end tells the other of its side of a session, in END and DONE: the link's own
/// figures, so the report can change without changing the wire. Carried as JSON (keys only
/// added, each with a default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LinkStats {
    /// QEMU stream bytes the source took, or the target delivered.
    pub qemu_bytes: u64,
    /// ZERO records in the stream (the source parses them; the target reports them).
    pub pages_zero: u64,
    /// Bytes the target fetched from the storage.
    pub nas_bytes: u64,
    /// Mapped pages the target asked the source for.
    pub fallbacks: u64,
    /// Microseconds the target's fetches were under way.
    pub fetch_us: u64,
    /// The sender's moments of the guest's pause (absent from older agents).
    #[serde(default)]
    pub moments: Moments,
}

/// Session parameters the source announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub vm: String,
    /// NAS exports MAPPED frames refer to: (index-service id, NBD export name).
    pub exports: Vec<(u32, String)>,
    /// Where the target agent reads MAPPED blocks (`HOST:PORT` or `unix:PATH`).
    pub nas: String,
    pub caps: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("incomplete frame")]
    Incomplete,
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u32),
    #[error("malformed agent-link frame: {0}")]
    Malformed(&'static str),
}

impl From<Malformed> for LinkError {
    fn from(m: Malformed) -> Self {
        LinkError::Malformed(m.0)
    }
}

/// A page payload, boxed.
fn page(r: &mut Cursor<'_>) -> Result<Box<[u8; PAGE_SIZE]>, Malformed> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    p.copy_from_slice(r.bytes(PAGE_SIZE, "page")?);
    Ok(p)
}

fn stats(json: &str) -> Result<LinkStats, LinkError> {
    serde_json::from_str(json).map_err(|_| LinkError::Malformed("statistics are not JSON"))
}

fn stats_json(stats: &LinkStats) -> String {
    serde_json::to_string(stats).expect("plain integers serialise")
}

/// Appends a RAW frame carrying `data`, without building a [`LinkFrame::Raw`].
pub fn encode_raw(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
    out.push(T_RAW);
    out.extend_from_slice(data);
}

/// Appends a PAGE frame carrying `page`, without building a [`LinkFrame::Page`].
pub fn encode_page(out: &mut Vec<u8>, page: &[u8; PAGE_SIZE]) {
    encode_page_header(out);
    out.extend_from_slice(page);
}

/// Appends a PAGE frame's header: its 4 KiB must follow on the wire.
pub fn encode_page_header(out: &mut Vec<u8>) {
    out.extend_from_slice(&(PAGE_SIZE as u32 + 1).to_be_bytes());
    out.push(T_PAGE);
}

/// Appends a ZSTD frame: `data` is `raw_len` bytes of frames, compressed.
pub fn encode_zstd(out: &mut Vec<u8>, raw_len: u32, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32 + 5).to_be_bytes());
    out.push(T_ZSTD);
    out.extend_from_slice(&raw_len.to_be_bytes());
    out.extend_from_slice(data);
}

/// The size on the wire of a ZSTD frame carrying `data_len` compressed bytes.
pub fn zstd_frame_len(data_len: usize) -> usize {
    data_len + 9
}

/// The size of the frame at the front of `buf`, length prefix included, once the prefix is
/// there (the frame itself may not be yet).
pub fn frame_size(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = buf.get(..4)?.try_into().expect("4 bytes");
    Some(4 + u32::from_be_bytes(prefix) as usize)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl LinkFrame {
    /// Parses one frame from the front of `buf`: the frame and the bytes it used.
    pub fn parse(buf: &[u8]) -> Result<(LinkFrame, usize), LinkError> {
        let Some(total) = frame_size(buf) else {
            return Err(LinkError::Incomplete);
        };
        let len = (total - 4) as u32;
        if len > MAX_FRAME {
            return Err(LinkError::TooLarge(len));
        }
        if len == 0 {
            return Err(LinkError::Malformed("empty frame"));
        }
        if buf.len() < total {
            return Err(LinkError::Incomplete);
        }
        let mut r = Cursor::new(&buf[5..total]);
        let frame = match buf[4] {
            T_HELLO => {
                let version = r.u16("version")?;
                let vm = r.string_u32("vm")?;
                let n = r.u16("export count")?;
                let mut exports = Vec::new();
                for _ in 0..n {
                    exports.push((r.u32("export id")?, r.string_u32("export name")?));
                }
                let nas = r.string_u32("nas")?;
                let caps = r.u32("caps")?;
                LinkFrame::Hello(Hello {
                    version,
                    vm,
                    exports,
                    nas,
                    caps,
                })
            }
            T_RAW => LinkFrame::Raw(r.rest().to_vec()),
            T_PAGE => LinkFrame::Page(page(&mut r)?),
            T_MAPPED => LinkFrame::Mapped {
                seq: r.u64("seq")?,
                export: r.u32("export")?,
                offset: r.u64("offset")?,
                hash: r.array::<32>("hash")?,
            },
            T_DUP => LinkFrame::Dup {
                ordinal: r.u64("ordinal")?,
            },
            T_ZSTD => {
                let raw_len = r.u32("raw length")?;
                if raw_len > MAX_FRAME * 2 {
                    return Err(LinkError::Malformed("zstd frame inflates too far"));
                }
                LinkFrame::Zstd {
                    raw_len,
                    data: r.rest().to_vec(),
                }
            }
            T_FALLBACK_DATA => LinkFrame::FallbackData {
                seq: r.u64("seq")?,
                page: page(&mut r)?,
            },
            T_END => LinkFrame::End {
                stats: stats(&r.string_u32("END statistics")?)?,
            },
            T_HELLO_ACK => LinkFrame::HelloAck {
                version: r.u16("version")?,
                caps: r.u32("caps")?,
            },
            T_ACK => LinkFrame::Ack {
                mapped: r.u64("mapped")?,
                credit: r.u64("credit")?,
                received: match r.remaining() == 0 {
                    true => None,
                    false => Some(r.u64("received")?),
                },
            },
            T_FALLBACK_REQ => LinkFrame::FallbackReq { seq: r.u64("seq")? },
            T_DONE => {
                let ok = r.bytes(1, "ok")?[0] != 0;
                let text = r.string_u32("DONE statistics")?;
                LinkFrame::Done {
                    outcome: if ok { Ok(stats(&text)?) } else { Err(text) },
                }
            }
            T_ERROR => LinkFrame::Error {
                message: r.string_u32("message")?,
            },
            _ => return Err(LinkError::Malformed("unknown frame type")),
        };
        r.end()?;
        Ok((frame, total))
    }

    /// Appends the frame's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            LinkFrame::Raw(data) => return encode_raw(out, data),
            LinkFrame::Page(page) => return encode_page(out, page),
            LinkFrame::Zstd { raw_len, data } => return encode_zstd(out, *raw_len, data),
            _ => {}
        }
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            LinkFrame::Hello(h) => {
                out.push(T_HELLO);
                out.extend_from_slice(&h.version.to_be_bytes());
                put_string(out, &h.vm);
                out.extend_from_slice(&(h.exports.len() as u16).to_be_bytes());
                for (id, name) in &h.exports {
                    out.extend_from_slice(&id.to_be_bytes());
                    put_string(out, name);
                }
                put_string(out, &h.nas);
                out.extend_from_slice(&h.caps.to_be_bytes());
            }
            LinkFrame::Raw(_) | LinkFrame::Page(_) | LinkFrame::Zstd { .. } => {
                unreachable!("encoded above")
            }
            LinkFrame::Mapped {
                seq,
                export,
                offset,
                hash,
            } => {
                out.push(T_MAPPED);
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&export.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(hash);
            }
            LinkFrame::Dup { ordinal } => {
                out.push(T_DUP);
                out.extend_from_slice(&ordinal.to_be_bytes());
            }
            LinkFrame::FallbackData { seq, page } => {
                out.push(T_FALLBACK_DATA);
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&page[..]);
            }
            LinkFrame::End { stats } => {
                out.push(T_END);
                put_string(out, &stats_json(stats));
            }
            LinkFrame::HelloAck { version, caps } => {
                out.push(T_HELLO_ACK);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&caps.to_be_bytes());
            }
            LinkFrame::Ack {
                mapped,
                credit,
                received,
            } => {
                out.push(T_ACK);
                out.extend_from_slice(&mapped.to_be_bytes());
                out.extend_from_slice(&credit.to_be_bytes());
                if let Some(received) = received {
                    out.extend_from_slice(&received.to_be_bytes());
                }
            }
            LinkFrame::FallbackReq { seq } => {
                out.push(T_FALLBACK_REQ);
                out.extend_from_slice(&seq.to_be_bytes());
            }
            LinkFrame::Done { outcome } => {
                out.push(T_DONE);
                out.push(u8::from(outcome.is_ok()));
                match outcome {
                    Ok(stats) => put_string(out, &stats_json(stats)),
                    Err(why) => put_string(out, why),
                }
            }
            LinkFrame::Error { message } => {
                out.push(T_ERROR);
                put_string(out, message);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<LinkFrame> {
        vec![
            LinkFrame::Hello(Hello {
                version: 1,
                vm: "vm1".into(),
                exports: vec![(1, "vm1-disk".into())],
                nas: "127.0.0.1:10809".into(),
                caps: CAP_ZSTD,
            }),
            LinkFrame::Raw(b"QEVM\0\0\0\x03".to_vec()),
            LinkFrame::Page(Box::new([9; PAGE_SIZE])),
            LinkFrame::Mapped {
                seq: 5,
                export: 1,
                offset: 8192,
                hash: [3; 32],
            },
            LinkFrame::Dup { ordinal: 4 },
            LinkFrame::Zstd {
                raw_len: 10,
                data: vec![1, 2, 3],
            },
            LinkFrame::FallbackData {
                seq: 5,
                page: Box::new([1; PAGE_SIZE]),
            },
            LinkFrame::End {
                stats: LinkStats {
                    qemu_bytes: 1,
                    pages_zero: 2,
                    moments: Moments {
                        switchover_us: 3,
                        qemu_eof_us: 4,
                        end_us: 5,
                        delivered_us: 0,
                    },
                    ..LinkStats::default()
                },
            },
            LinkFrame::HelloAck {
                version: 1,
                caps: 0,
            },
            LinkFrame::Ack {
                mapped: 9,
                credit: 1 << 20,
                received: None,
            },
            LinkFrame::Ack {
                mapped: 9,
                credit: 1 << 20,
                received: Some(3 << 20),
            },
            LinkFrame::FallbackReq { seq: 5 },
            LinkFrame::Done {
                outcome: Ok(LinkStats {
                    nas_bytes: 4096,
                    fetch_us: 7,
                    ..LinkStats::default()
                }),
            },
            LinkFrame::Done {
                outcome: Err("the target QEMU went away".into()),
            },
            LinkFrame::Error {
                message: "no".into(),
            },
        ]
    }

    #[test]
    fn direct_encoders_match_the_frames() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_raw(&mut a, b"abc");
        LinkFrame::Raw(b"abc".to_vec()).encode(&mut b);
        let page = [7u8; PAGE_SIZE];
        encode_page(&mut a, &page);
        LinkFrame::Page(Box::new(page)).encode(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn round_trips_at_every_split() {
        let mut stream = Vec::new();
        for f in samples() {
            f.encode(&mut stream);
        }
        for split in (0..stream.len()).step_by(7) {
            let mut buf = stream[..split].to_vec();
            let mut got = Vec::new();
            loop {
                match LinkFrame::parse(&buf) {
                    Ok((f, used)) => {
                        got.push(f);
                        buf.drain(..used);
                    }
                    Err(LinkError::Incomplete) => break,
                    Err(e) => panic!("split {split}: {e}"),
                }
            }
            buf.extend_from_slice(&stream[split..]);
            while let Ok((f, used)) = LinkFrame::parse(&buf) {
                got.push(f);
                buf.drain(..used);
            }
            assert_eq!(got, samples(), "split {split}");
        }
    }

    #[test]
    fn rejects_malformed_frames() {
        assert_eq!(
            LinkFrame::parse(&[0, 0, 0, 0]),
            Err(LinkError::Malformed("empty frame"))
        );
        assert_eq!(
            LinkFrame::parse(&[0xff, 0, 0, 0]),
            Err(LinkError::TooLarge(0xff00_0000))
        );
        assert_eq!(
            LinkFrame::parse(&[0, 0, 0, 2, T_PAGE, 1]),
            Err(LinkError::Malformed("page"))
        );
        assert_eq!(
            LinkFrame::parse(&[0, 0, 0, 10, T_FALLBACK_REQ, 0, 0, 0, 0, 0, 0, 0, 1, 9]),
            Err(LinkError::Malformed("trailing bytes"))
        );
        assert_eq!(
            LinkFrame::parse(&[0, 0, 0, 1, 0x55]),
            Err(LinkError::Malformed("unknown frame type"))
        );
        // An ACK is 16 bytes, or 24 with the received count: nothing in between or beyond.
        let mut ack = vec![0, 0, 0, 21, T_ACK];
        ack.extend_from_slice(&[0; 20]);
        assert_eq!(
            LinkFrame::parse(&ack),
            Err(LinkError::Malformed("received"))
        );
        let mut ack = vec![0, 0, 0, 26, T_ACK];
        ack.extend_from_slice(&[0; 25]);
        assert_eq!(
            LinkFrame::parse(&ack),
            Err(LinkError::Malformed("trailing bytes"))
        );
    }
}
