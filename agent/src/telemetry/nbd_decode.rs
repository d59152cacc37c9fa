//! Rebuilds the NBD conversation of each followed socket from the follower's events, and says
//! which disk bytes landed in (or left from) which host memory.
//!
//! ```text
//! Send: request header (28 bytes, 32 extended) [+ WRITE payload from the following iovecs]
//!       -> cookie -> (command, disk offset, length); a WRITE's payload may follow in later sends
//! Recv: magic (4) -> rest of the header (12 simple, 16 structured, 28 extended)
//!       -> [OFFSET_DATA: disk offset (8)] -> payload into iovecs, over one or more calls
//! ```
//! QEMU's client reads each header piece with its own `recvmsg`, so every header byte is in
//! an event's copied data; payloads are only located (iovec addresses), never copied. State is
//! kept per (process, fd): with iothreads a header and its payload can be read by different
//! threads. A receive the state machine cannot account for (a large read where header bytes
//! were due) loses the conversation's place: it is counted, and decoding resumes at the next
//! reply magic read on its own. A conversation starts that way too, unsynchronised (the option
//! haggling of the handshake, or a socket followed mid-conversation), and finds its place at
//! the first reply magic received on its own; only a place lost after that counts.
use std::collections::HashMap;

use agent_common::syscalls::{FdKey, IoEvent, IoKind};
use nas_proto::{cursor::Cursor, nbd::*};

/// Requests remembered per conversation; QEMU keeps at most 16 in flight per connection.
const MAX_IN_FLIGHT: usize = 1024;

/// What the conversation says happened to disk bytes and host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Disk bytes `[offset, offset + len)` were received into host memory at `addr`.
    Landed {
        key: FdKey,
        offset: u64,
        addr: u64,
        len: u64,
    },
    /// Host memory at `addr` was sent to be written at disk `[offset, offset + len)`.
    Stored {
        key: FdKey,
        offset: u64,
        addr: u64,
        len: u64,
    },
    /// Disk bytes `[offset, offset + len)` changed without their content passing through
    /// memory the follower saw (WRITE_ZEROES, TRIM, a write whose source was not recorded).
    Changed { key: FdKey, offset: u64, len: u64 },
}

/// Counts of what the decoder saw and could not account for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeStats {
    pub requests: u64,
    pub replies: u64,
    /// Bytes located in memory (landed or stored).
    pub located_bytes: u64,
    /// A conversation lost its place (see the module doc).
    pub desyncs: u64,
    /// A reply named a cookie no request had.
    pub unknown_cookies: u64,
    /// Payload bytes in iovecs the event did not record (more than it holds).
    pub unlocated_bytes: u64,
    /// Requests not remembered because too many were in flight.
    pub overflows: u64,
}

#[derive(Clone, Copy, Debug)]
struct Request {
    command: u16,
    offset: u64,
    length: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    /// A reply magic (4 bytes) is due.
    Magic,
    /// The rest of a header of this magic is due.
    Header(u32),
    /// OFFSET_DATA's disk offset is due; `len` bytes of data follow it.
    DataOffset { len: u64 },
    /// Payload bytes for disk `[offset, offset + remaining)` are due.
    Payload { offset: u64, remaining: u64 },
    /// Bytes of a chunk nobody needs (a hole, an error message, block status) are due.
    Skip { remaining: u64 },
    /// The place was lost; waiting for a lone reply magic.
    Lost,
}

struct Conversation {
    requests: HashMap<u64, Request>,
    rx: Rx,
    /// Header bytes gathered so far (a header may come in pieces).
    header: Vec<u8>,
    /// A WRITE whose payload is still to be sent: (disk offset, bytes left).
    sending: Option<(u64, u64)>,
    /// Whether the conversation has found its place once (losing it after that is a desync).
    synced: bool,
}

impl Default for Conversation {
    fn default() -> Self {
        Self {
            requests: HashMap::new(),
            rx: Rx::Lost,
            header: Vec::new(),
            sending: None,
            synced: false,
        }
    }
}

/// Decodes every followed socket's conversation.
#[derive(Default)]
pub struct Decoder {
    conversations: HashMap<FdKey, Conversation>,
    stats: DecodeStats,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// Forgets a socket (closed, or no longer followed).
    pub fn forget(&mut self, key: FdKey) {
        self.conversations.remove(&key);
    }

    /// Takes one event; appends what it shows to `out`.
    pub fn event(&mut self, ev: &IoEvent, out: &mut Vec<Observed>) {
        let key = FdKey {
            tgid: ev.tgid,
            fd: ev.fd,
        };
        let conv = self.conversations.entry(key).or_default();
        match IoKind::from_u32(ev.kind) {
            Some(IoKind::Send) => send(conv, &mut self.stats, key, ev, out),
            Some(IoKind::Recv) => recv(conv, &mut self.stats, key, ev, out),
            _ => {}
        }
    }
}

/// Where `bytes` bytes of an event's iovecs, from `skip` bytes in, sit on the disk and in
/// memory: (disk offset, address, length), the first piece at disk `offset`. Bytes beyond the
/// recorded iovecs come back as one piece at address 0. Counts located and unlocated bytes.
fn place(
    ev: &IoEvent,
    mut skip: u64,
    mut bytes: u64,
    offset: u64,
    stats: &mut DecodeStats,
) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut at = offset;
    for v in ev.iovecs() {
        if bytes == 0 {
            break;
        }
        if skip >= v.len {
            skip -= v.len;
            continue;
        }
        let n = (v.len - skip).min(bytes);
        out.push((at, v.base.saturating_add(skip), n));
        stats.located_bytes += n;
        at = at.saturating_add(n);
        skip = 0;
        bytes -= n;
    }
    if bytes > 0 {
        out.push((at, 0, bytes));
        stats.unlocated_bytes += bytes;
    }
    out
}

fn send(
    conv: &mut Conversation,
    stats: &mut DecodeStats,
    key: FdKey,
    ev: &IoEvent,
    out: &mut Vec<Observed>,
) {
    let total = ev.ret.max(0) as u64;
    let head = ev.head();
    let mut used = 0u64;
    if let Some(request) = parse_request(head) {
        used = head.len() as u64;
        stats.requests += 1;
        let (cookie, req) = request;
        match req.command {
            CMD_WRITE => conv.sending = Some((req.offset, req.length)),
            CMD_WRITE_ZEROES | CMD_TRIM => out.push(Observed::Changed {
                key,
                offset: req.offset,
                len: req.length,
            }),
            _ => {}
        }
        if conv.requests.len() >= MAX_IN_FLIGHT {
            stats.overflows += 1;
        } else {
            conv.requests.insert(cookie, req);
        }
    }
    let Some((offset, left)) = conv.sending else {
        return;
    };
    let n = total.saturating_sub(used).min(left);
    out.extend(place(ev, used, n, offset, stats).into_iter().map(
        |(offset, addr, len)| match addr {
            0 => Observed::Changed { key, offset, len },
            _ => Observed::Stored {
                key,
                offset,
                addr,
                len,
            },
        },
    ));
    conv.sending = (left > n).then_some((offset.saturating_add(n), left - n));
}

/// `(cookie, request)` from a whole request header, simple or extended.
fn parse_request(head: &[u8]) -> Option<(u64, Request)> {
    let mut c = Cursor::new(head);
    let magic = c.u32("magic").ok()?;
    let extended = match (magic, head.len()) {
        (REQUEST_MAGIC, 28) => false,
        (EXTENDED_REQUEST_MAGIC, 32) => true,
        _ => return None,
    };
    let _flags = c.u16("flags").ok()?;
    let command = c.u16("type").ok()?;
    let cookie = c.u64("cookie").ok()?;
    let offset = c.u64("offset").ok()?;
    let length = if extended {
        c.u64("length").ok()?
    } else {
        u64::from(c.u32("length").ok()?)
    };
    Some((
        cookie,
        Request {
            command,
            offset,
            length,
        },
    ))
}

fn recv(
    conv: &mut Conversation,
    stats: &mut DecodeStats,
    key: FdKey,
    ev: &IoEvent,
    out: &mut Vec<Observed>,
) {
    let mut left = ev.ret.max(0) as u64;
    let mut consumed = 0u64;
    while left > 0 {
        match conv.rx {
            Rx::Payload { offset, remaining } => {
                let n = left.min(remaining);
                let at = offset.saturating_add(n);
                out.extend(
                    place(ev, consumed, n, offset, stats)
                        .into_iter()
                        .filter(|&(_, addr, _)| addr != 0)
                        .map(|(offset, addr, len)| Observed::Landed {
                            key,
                            offset,
                            addr,
                            len,
                        }),
                );
                consumed += n;
                left -= n;
                conv.rx = if remaining > n {
                    Rx::Payload {
                        offset: at,
                        remaining: remaining - n,
                    }
                } else {
                    Rx::Magic
                };
            }
            Rx::Skip { remaining } => {
                let n = left.min(remaining);
                consumed += n;
                left -= n;
                conv.rx = if remaining > n {
                    Rx::Skip {
                        remaining: remaining - n,
                    }
                } else {
                    Rx::Magic
                };
            }
            Rx::Lost => {
                // Only a receive of exactly a magic, on its own, puts the conversation back.
                if let (0, 4, Some(magic)) = (consumed, left, reply_magic(ev.head())) {
                    conv.header.clear();
                    conv.rx = Rx::Header(magic);
                    conv.synced = true;
                }
                return;
            }
            Rx::Magic | Rx::Header(_) | Rx::DataOffset { .. } => {
                // Header bytes: they must be in the event's copied data.
                let head = ev.head();
                let Some(bytes) = usize::try_from(consumed)
                    .ok()
                    .and_then(|c| head.get(c..c + usize::try_from(left).ok()?))
                else {
                    lose(conv, stats);
                    return;
                };
                let taken = header_bytes(conv, stats, bytes);
                consumed += taken;
                left -= taken;
                if conv.rx == Rx::Lost {
                    conv.rx = Rx::Magic;
                    lose(conv, stats);
                    return;
                }
            }
        }
    }
}

/// The conversation lost its place: counted once it had found it.
fn lose(conv: &mut Conversation, stats: &mut DecodeStats) {
    if conv.synced && conv.rx != Rx::Lost {
        stats.desyncs += 1;
    }
    conv.header.clear();
    conv.rx = Rx::Lost;
}

/// Feeds header bytes to the state machine; returns how many it took.
fn header_bytes(conv: &mut Conversation, stats: &mut DecodeStats, bytes: &[u8]) -> u64 {
    let want = match conv.rx {
        Rx::Magic => 4,
        Rx::Header(SIMPLE_REPLY_MAGIC) => 12,
        Rx::Header(STRUCTURED_REPLY_MAGIC) => 16,
        Rx::Header(_) => 28,
        Rx::DataOffset { .. } => 8,
        _ => return 0,
    };
    let n = (want - conv.header.len()).min(bytes.len());
    conv.header.extend_from_slice(&bytes[..n]);
    if conv.header.len() < want {
        return n as u64;
    }
    let field = std::mem::take(&mut conv.header);
    conv.rx = match conv.rx {
        Rx::Magic => match reply_magic(&field) {
            Some(m) => Rx::Header(m),
            None => Rx::Lost,
        },
        Rx::Header(magic) => reply(conv, stats, magic, &field),
        Rx::DataOffset { len } => {
            let offset = u64::from_be_bytes(field.try_into().expect("8 bytes"));
            Rx::Payload {
                offset,
                remaining: len,
            }
        }
        other => other,
    };
    // A chunk or reply with nothing after its header ends there.
    if matches!(
        conv.rx,
        Rx::Payload { remaining: 0, .. } | Rx::Skip { remaining: 0 }
    ) {
        conv.rx = Rx::Magic;
    }
    n as u64
}

fn reply_magic(bytes: &[u8]) -> Option<u32> {
    let magic = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    matches!(
        magic,
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC
    )
    .then_some(magic)
}

/// What follows a reply header (its bytes after the magic).
fn reply(conv: &mut Conversation, stats: &mut DecodeStats, magic: u32, rest: &[u8]) -> Rx {
    stats.replies += 1;
    let mut c = Cursor::new(rest);
    if magic == SIMPLE_REPLY_MAGIC {
        let (Ok(error), Ok(cookie)) = (c.u32("error"), c.u64("cookie")) else {
            return Rx::Lost;
        };
        let Some(req) = conv.requests.remove(&cookie) else {
            stats.unknown_cookies += 1;
            return Rx::Magic;
        };
        // A simple reply carries data only for a successful READ.
        return if req.command == CMD_READ && error == 0 {
            Rx::Payload {
                offset: req.offset,
                remaining: req.length,
            }
        } else {
            Rx::Magic
        };
    }
    let flags = c.u16("flags").unwrap_or(0);
    let kind = c.u16("type").unwrap_or(0);
    let cookie = c.u64("cookie").unwrap_or(0);
    let length = if magic == EXTENDED_REPLY_MAGIC {
        let _offset = c.u64("offset");
        c.u64("length").unwrap_or(0)
    } else {
        u64::from(c.u32("length").unwrap_or(0))
    };
    if !conv.requests.contains_key(&cookie) {
        stats.unknown_cookies += 1;
    }
    if flags & REPLY_FLAG_DONE != 0 {
        conv.requests.remove(&cookie);
    }
    match kind {
        REPLY_TYPE_OFFSET_DATA if length >= 8 => Rx::DataOffset { len: length - 8 },
        _ => Rx::Skip { remaining: length },
    }
}

#[cfg(test)]
#[path = "nbd_decode_tests.rs"]
mod tests;
