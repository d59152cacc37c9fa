//! The NBD transmission phase: requests in, replies out, many in flight.
//!
//! ```text
//!  socket --read--> [header 28 B (+ WRITE payload)] --validate--> task --blocking pool--> Export
//!                                                                   |
//!  socket <--write-- writer task <--bounded channel-- encoded reply <+
//! ```
//!
//! One reader decodes requests in order, checks each one ([`validate`]) before anything
//! touches the export, and hands it to its own task; replies leave in completion order,
//! matched by cookie. In-flight work is bounded by a budget in 4 KiB units that a request
//! takes before its payload is read and returns when its reply is queued, so memory per
//! connection is bounded whatever the client sends. Request parsing and reply encoding are pure
//! functions over bytes.
use std::{sync::Arc, time::Instant};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter},
    sync::{mpsc, watch, Semaphore},
};

use super::handshake::Negotiated;
use crate::export::{Export, Extent};
use nas_proto::nbd::*;

/// Budget of a connection, in 4 KiB units: 64 MiB of payload plus room for small requests.
const BUDGET_UNITS: u32 = (64 << 20) / 4096 + 256;
/// Replies queued towards the writer.
const REPLY_QUEUE: usize = 256;
pub const REQUEST_LEN: usize = 28;
const SIMPLE_HEADER: usize = 16;
const CHUNK_HEADER: usize = 20;

/// A decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a connection's transmission phase ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent bad request magic {0:#x}; closing as the spec requires")]
    BadMagic(u32),
}

/// Decodes a request header; a wrong magic is fatal for the connection.
pub fn parse_request(buf: &[u8; REQUEST_LEN]) -> Result<Request, u32> {
    let magic = u32::from_be_bytes(buf[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(Request {
        flags: u16::from_be_bytes(buf[4..6].try_into().unwrap()),
        kind: u16::from_be_bytes(buf[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(buf[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(buf[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(buf[24..28].try_into().unwrap()),
    })
}

/// What a request may do on this connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub base_allocation: bool,
}

/// Checks a request against the spec and the export before it is executed.
pub fn validate(req: &Request, limits: &Limits) -> Result<(), NbdErrno> {
    let allowed_flags = match req.kind {
        CMD_READ if limits.structured => CMD_FLAG_DF,
        CMD_READ | CMD_FLUSH | CMD_CACHE | CMD_DISC => 0,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return Err(NbdErrno::Inval),
    };
    if req.flags & !allowed_flags != 0 {
        return Err(NbdErrno::Inval);
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && limits.read_only {
        return Err(NbdErrno::Perm);
    }
    if matches!(req.kind, CMD_FLUSH | CMD_DISC) {
        return Ok(());
    }
    if req.kind == CMD_BLOCK_STATUS && !limits.base_allocation {
        return Err(NbdErrno::Inval);
    }
    // A payload over the advertised maximum breaks a client MUST, whatever the range.
    if req.length > MAX_PAYLOAD {
        match req.kind {
            CMD_READ if limits.structured => return Err(NbdErrno::Overflow),
            CMD_READ | CMD_WRITE => return Err(NbdErrno::Inval),
            _ => {}
        }
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= limits.size);
    if !in_range {
        return Err(match req.kind {
            CMD_WRITE | CMD_WRITE_ZEROES => NbdErrno::NoSpc,
            _ => NbdErrno::Inval,
        });
    }
    if req.kind == CMD_BLOCK_STATUS && req.length == 0 {
        return Err(NbdErrno::Inval);
    }
    Ok(())
}

/// A simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_HEADER] {
    let mut b = [0u8; SIMPLE_HEADER];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER] {
    let mut b = [0u8; CHUNK_HEADER];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A final NBD_REPLY_TYPE_ERROR chunk.
pub fn structured_error(cookie: u64, errno: NbdErrno, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(4096)];
    let mut b = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + message.len() as u32,
    )
    .to_vec();
    b.extend_from_slice(&errno.code().to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message);
    b
}

/// A final NBD_REPLY_TYPE_BLOCK_STATUS chunk for base:allocation. Extent lengths are clamped
/// to what a 32-bit descriptor holds (the client asks again for the rest).
pub fn block_status_reply(cookie: u64, extents: &[Extent], req_one: bool) -> Vec<u8> {
    const MAX_DESCRIPTOR: u64 = 0xffff_f000;
    let extents = if req_one {
        &extents[..1.min(extents.len())]
    } else {
        extents
    };
    let mut body = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for e in extents {
        body.extend_from_slice(&(e.length.min(MAX_DESCRIPTOR) as u32).to_be_bytes());
        body.extend_from_slice(&e.flags.to_be_bytes());
        if e.length > MAX_DESCRIPTOR {
            break;
        }
    }
    let mut b = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        body.len() as u32,
    )
    .to_vec();
    b.extend_from_slice(&body);
    b
}

/// The error reply for `req`, in the form its command requires.
fn error_reply(req: &Request, structured: bool, errno: NbdErrno) -> Vec<u8> {
    if structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
        structured_error(req.cookie, errno, errno.name())
    } else {
        simple_reply(req.cookie, errno.code()).to_vec()
    }
}

fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disc",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        _ => "unknown",
    }
}

/// Units of the connection budget a request holds while in flight.
fn cost(req: &Request) -> u32 {
    match req.kind {
        CMD_READ | CMD_WRITE => 1 + req.length.min(MAX_PAYLOAD).div_ceil(4096),
        _ => 1,
    }
}

/// A READ reply built in place: the header is written in front of the data once the read has
/// filled it, so the data is never copied.
struct ReadReply {
    buf: Vec<u8>,
    header: usize,
    req: Request,
    structured: bool,
}

impl ReadReply {
    fn new(req: &Request, structured: bool) -> Self {
        let header = if structured {
            CHUNK_HEADER + 8
        } else {
            SIMPLE_HEADER
        };
        Self {
            buf: vec![0u8; header + req.length as usize],
            header,
            req: *req,
            structured,
        }
    }

    fn data(&mut self) -> &mut [u8] {
        &mut self.buf[self.header..]
    }

    fn finish(mut self) -> Vec<u8> {
        let req = &self.req;
        if self.structured {
            let h = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + req.length,
            );
            self.buf[..CHUNK_HEADER].copy_from_slice(&h);
            self.buf[CHUNK_HEADER..self.header].copy_from_slice(&req.offset.to_be_bytes());
        } else {
            self.buf[..SIMPLE_HEADER].copy_from_slice(&simple_reply(req.cookie, 0));
        }
        self.buf
    }
}

/// Reads small enough to try on the connection's own task when the page cache has them.
const INLINE_READ_MAX: u32 = 256 << 10;

/// Serves a READ without leaving the connection's task when the data is cached (no thread
/// hand-off, which dominates latency at queue depth 1). `None` means it would block.
fn try_cached_read(export: &dyn Export, req: &Request, structured: bool) -> Option<Vec<u8>> {
    if req.kind != CMD_READ || req.length > INLINE_READ_MAX {
        return None;
    }
    let mut reply = ReadReply::new(req, structured);
    match export.try_read_cached(reply.data(), req.offset) {
        Ok(true) => Some(reply.finish()),
        Ok(false) => None,
        Err(e) => Some(error_reply(req, structured, NbdErrno::from_io(&e))),
    }
}

/// Small buffered writes without FUA, run on the connection's own task.
const INLINE_WRITE_MAX: u32 = 64 << 10;

/// Whether `req` is a small buffered write: a copy into the page cache (plus hashing its
/// blocks), cheaper than the hand-off to the blocking pool that dominates its latency. At depth
/// it also beats the pool: parallel buffered writes to one file only contend for its inode
/// lock (docs/benchmarks.md, `cargo xtask bench nbd`, 4k write qd32). It can still wait when the kernel
/// throttles dirty pages; that holds this connection's task (whose requests queue behind it
/// anyway) and one runtime worker, while the others keep serving.
/// FUA writes, which wait for the disk, always go to the blocking pool.
fn is_inline_write(req: &Request) -> bool {
    req.kind == CMD_WRITE && req.length <= INLINE_WRITE_MAX && req.flags & CMD_FLAG_FUA == 0
}

/// Runs a validated request against the export and encodes its reply.
fn execute(export: &dyn Export, req: &Request, payload: Vec<u8>, structured: bool) -> Vec<u8> {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, length) = (req.offset, u64::from(req.length));
    let done = |r: std::io::Result<()>| match r {
        Ok(()) => simple_reply(req.cookie, 0).to_vec(),
        Err(e) => error_reply(req, structured, NbdErrno::from_io(&e)),
    };
    match req.kind {
        CMD_READ => {
            let mut reply = ReadReply::new(req, structured);
            match export.read_at(reply.data(), offset) {
                Ok(()) => reply.finish(),
                Err(e) => error_reply(req, structured, NbdErrno::from_io(&e)),
            }
        }
        CMD_WRITE => done(export.write_at(&payload, offset, fua)),
        CMD_FLUSH => done(export.flush()),
        CMD_TRIM => done(export.trim(offset, length, fua)),
        CMD_WRITE_ZEROES => {
            done(export.write_zeroes(offset, length, req.flags & CMD_FLAG_NO_HOLE == 0, fua))
        }
        CMD_CACHE => done(export.cache(offset, length)),
        CMD_BLOCK_STATUS => match export.block_status(offset, length) {
            Ok(extents) if !extents.is_empty() => {
                block_status_reply(req.cookie, &extents, req.flags & CMD_FLAG_REQ_ONE != 0)
            }
            Ok(_) => error_reply(req, structured, NbdErrno::Io),
            Err(e) => error_reply(req, structured, NbdErrno::from_io(&e)),
        },
        _ => error_reply(req, structured, NbdErrno::Inval),
    }
}

/// [`execute`] with its metrics; a panic in a handler becomes an EIO reply, never a dead
/// server.
fn run_request(export: &dyn Export, req: &Request, payload: Vec<u8>, structured: bool) -> Vec<u8> {
    let started = Instant::now();
    let name = command_name(req.kind);
    let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(export, req, payload, structured)
    }))
    .unwrap_or_else(|_| {
        tracing::error!(?req, "request handler panicked; answering EIO");
        error_reply(req, structured, NbdErrno::Io)
    });
    metrics::histogram!("nbd_request_seconds", "type" => name)
        .record(started.elapsed().as_secs_f64());
    if matches!(req.kind, CMD_READ | CMD_WRITE) {
        metrics::counter!("nbd_bytes_total", "type" => name).increment(u64::from(req.length));
    }
    reply
}

/// Serves requests until the client disconnects, sends NBD_CMD_DISC, breaks the protocol, or
/// `shutdown` turns true; in every case in-flight requests finish and their replies are sent.
pub async fn serve<S>(
    stream: S,
    negotiated: Negotiated,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TransmissionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let export = negotiated.export.export.clone();
    let export_name: Arc<str> = negotiated.export.name.as_str().into();
    let limits = Limits {
        size: export.size(),
        read_only: export.read_only(),
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation,
    };
    let (reader, writer) = tokio::io::split(stream);
    // Buffered: at depth, many requests (headers and small payloads) arrive per read call.
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let (replies, mut queue) = mpsc::channel::<Vec<u8>>(REPLY_QUEUE);
    let writer = tokio::spawn(async move {
        let mut out = BufWriter::with_capacity(256 << 10, writer);
        while let Some(reply) = queue.recv().await {
            out.write_all(&reply).await?;
            while let Ok(more) = queue.try_recv() {
                out.write_all(&more).await?;
            }
            out.flush().await?;
        }
        out.shutdown().await.ok();
        Ok::<_, std::io::Error>(())
    });
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let mut result = Ok(());
    loop {
        let mut header = [0u8; REQUEST_LEN];
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            read = reader.read_exact(&mut header) => match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => { result = Err(e.into()); break; }
            },
        }
        let req = match parse_request(&header) {
            Ok(r) => r,
            Err(magic) => {
                result = Err(TransmissionError::BadMagic(magic));
                break;
            }
        };
        if req.kind == CMD_DISC {
            break;
        }
        let permit = budget
            .clone()
            .acquire_many_owned(cost(&req))
            .await
            .expect("the budget semaphore is never closed");
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            if req.length <= MAX_PAYLOAD {
                payload = vec![0u8; req.length as usize];
                if let Err(e) = reader.read_exact(&mut payload).await {
                    result = Err(e.into());
                    break;
                }
            } else {
                // Too large to accept, but the stream stays in sync: discard it unbuffered.
                let mut sink = tokio::io::sink();
                let mut take = (&mut reader).take(u64::from(req.length));
                if let Err(e) = tokio::io::copy(&mut take, &mut sink).await {
                    result = Err(e.into());
                    break;
                }
            }
        }
        let name = command_name(req.kind);
        metrics::counter!("nbd_requests_total", "type" => name).increment(1);
        if let Err(errno) = validate(&req, &limits) {
            tracing::debug!(export = %export_name, ?req, "refused with {}", errno.name());
            metrics::counter!("nbd_request_errors_total", "type" => name, "error" => errno.name())
                .increment(1);
            if replies
                .send(error_reply(&req, limits.structured, errno))
                .await
                .is_err()
            {
                break;
            }
            drop(permit);
            continue;
        }
        if is_inline_write(&req) {
            let reply = run_request(export.as_ref(), &req, payload, limits.structured);
            if replies.send(reply).await.is_err() {
                break;
            }
            drop(permit);
            continue;
        }
        if let Some(reply) = try_cached_read(export.as_ref(), &req, limits.structured) {
            metrics::counter!("nbd_bytes_total", "type" => name).increment(u64::from(req.length));
            if replies.send(reply).await.is_err() {
                break;
            }
            drop(permit);
            continue;
        }
        let export = export.clone();
        let replies = replies.clone();
        let structured = limits.structured;
        // Straight to the blocking pool, which also queues the reply: one hand-off, not two.
        tokio::task::spawn_blocking(move || {
            let reply = run_request(export.as_ref(), &req, payload, structured);
            // A closed channel means the writer failed; the connection is ending anyway.
            let _ = replies.blocking_send(reply);
            drop(permit);
        });
    }
    // Drain: every in-flight request holds budget until its reply is queued.
    let _all = budget
        .acquire_many(BUDGET_UNITS)
        .await
        .expect("the budget semaphore is never closed");
    drop(replies);
    match writer.await {
        Ok(Ok(())) => result,
        Ok(Err(e)) => result.and(Err(e.into())),
        Err(join) => result.and(Err(std::io::Error::other(join).into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    const RW: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        structured: true,
        base_allocation: true,
    };

    #[test]
    fn parses_request_header() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beefu64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_request(&b).unwrap(),
            Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0xdead_beef,
                offset: 4096,
                length: 512
            }
        );
        b[0] = 0;
        assert_eq!(parse_request(&b), Err(0x0060_9513));
    }

    #[test]
    fn validation_follows_the_spec() {
        assert_eq!(validate(&req(CMD_READ, 0, 0, 4096), &RW), Ok(()));
        assert_eq!(
            validate(&req(CMD_READ, 0, (1 << 20) - 1, 2), &RW),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 1 << 20, 1), &RW),
            Err(NbdErrno::NoSpc)
        );
        assert_eq!(
            validate(&req(CMD_WRITE_ZEROES, 0, u64::MAX, 1), &RW),
            Err(NbdErrno::NoSpc)
        );
        assert_eq!(
            validate(&req(CMD_TRIM, 0, 1 << 20, 1), &RW),
            Err(NbdErrno::Inval)
        );
        assert_eq!(validate(&req(99, 0, 0, 0), &RW), Err(NbdErrno::Inval));
        assert_eq!(
            validate(&req(CMD_READ, CMD_FLAG_FUA, 0, 1), &RW),
            Err(NbdErrno::Inval)
        );
        assert_eq!(validate(&req(CMD_FLUSH, 0, 0, 0), &RW), Ok(()));
        let big = Limits {
            size: u64::MAX,
            ..RW
        };
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &big),
            Err(NbdErrno::Overflow)
        );
        let simple = Limits {
            structured: false,
            base_allocation: false,
            ..big
        };
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &simple),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, 0, 0, 1), &simple),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            validate(&req(CMD_WRITE_ZEROES, 0, 0, u32::MAX), &big),
            Ok(())
        );
        let ro = Limits {
            read_only: true,
            ..RW
        };
        assert_eq!(validate(&req(CMD_WRITE, 0, 0, 1), &ro), Err(NbdErrno::Perm));
        assert_eq!(validate(&req(CMD_TRIM, 0, 0, 1), &ro), Err(NbdErrno::Perm));
        assert_eq!(validate(&req(CMD_READ, 0, 0, 1), &ro), Ok(()));
    }

    #[test]
    fn encodes_replies() {
        assert_eq!(
            simple_reply(1, 22),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        let e = structured_error(2, NbdErrno::Overflow, "big");
        assert_eq!(&e[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1]);
        assert_eq!(&e[16..20], &9u32.to_be_bytes());
        assert_eq!(&e[20..], &[0, 0, 0, 75, 0, 3, b'b', b'i', b'g']);
        let extents = [
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 8192,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let b = block_status_reply(3, &extents, false);
        assert_eq!(&b[16..20], &20u32.to_be_bytes());
        assert_eq!(
            &b[20..],
            &[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 3]
        );
        assert_eq!(block_status_reply(3, &extents, true).len(), 20 + 12);
    }
}
