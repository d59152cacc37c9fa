//! The decoder on event sequences shaped like QEMU's (one recvmsg per header piece, payloads
//! into guest iovecs): split payloads, multi-chunk structured replies, error chunks,
//! interleaved cookies, extended headers, writes, and a lost place.
use agent_common::syscalls::{IoVec, HEAD_BYTES, MAX_IOV};

use super::*;

const KEY: FdKey = FdKey { tgid: 7, fd: 9 };

fn event(kind: IoKind, ret: u64, head: &[u8], iovs: &[(u64, u64)]) -> IoEvent {
    let mut ev = IoEvent {
        kind: kind as u32,
        tgid: KEY.tgid,
        tid: KEY.tgid,
        fd: KEY.fd,
        ret: ret as i64,
        iov_total: iovs.len() as u32,
        iov_count: iovs.len().min(MAX_IOV) as u32,
        head_len: head.len() as u32,
        ..IoEvent::default()
    };
    ev.head[..head.len()].copy_from_slice(head);
    for (slot, &(base, len)) in ev.iov.iter_mut().zip(iovs) {
        *slot = IoVec { base, len };
    }
    ev
}

/// A header piece received on its own, into a small buffer.
fn rx(bytes: &[u8]) -> IoEvent {
    assert!(bytes.len() <= HEAD_BYTES);
    event(
        IoKind::Recv,
        bytes.len() as u64,
        bytes,
        &[(0x10, bytes.len() as u64)],
    )
}

/// Payload received into `iovs`.
fn rx_data(ret: u64, iovs: &[(u64, u64)]) -> IoEvent {
    event(IoKind::Recv, ret, &[], iovs)
}

fn request(magic: u32, command: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    b.extend(0u16.to_be_bytes());
    b.extend(command.to_be_bytes());
    b.extend(cookie.to_be_bytes());
    b.extend(offset.to_be_bytes());
    if magic == EXTENDED_REQUEST_MAGIC {
        b.extend(length.to_be_bytes());
    } else {
        b.extend((length as u32).to_be_bytes());
    }
    b
}

/// A request sent on its own.
fn tx(command: u16, cookie: u64, offset: u64, length: u64) -> IoEvent {
    let h = request(REQUEST_MAGIC, command, cookie, offset, length);
    event(IoKind::Send, h.len() as u64, &h, &[(0x20, h.len() as u64)])
}

fn simple_rest(error: u32, cookie: u64) -> Vec<u8> {
    [error.to_be_bytes().as_slice(), &cookie.to_be_bytes()].concat()
}

fn chunk_rest(flags: u16, kind: u16, cookie: u64, length: u32) -> Vec<u8> {
    [
        flags.to_be_bytes().as_slice(),
        &kind.to_be_bytes(),
        &cookie.to_be_bytes(),
        &length.to_be_bytes(),
    ]
    .concat()
}

fn run(events: &[IoEvent]) -> (Vec<Observed>, DecodeStats) {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for ev in events {
        d.event(ev, &mut out);
    }
    (out, d.stats())
}

fn landed(offset: u64, addr: u64, len: u64) -> Observed {
    Observed::Landed {
        key: KEY,
        offset,
        addr,
        len,
    }
}

#[test]
fn a_simple_read_lands_in_its_iovecs_even_split_over_calls() {
    let (out, stats) = run(&[
        tx(CMD_READ, 1, 4096, 12288),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(0, 1)),
        rx_data(6144, &[(0xa000, 4096), (0xb000, 4096), (0xc000, 4096)]),
        rx_data(6144, &[(0xb800, 2048), (0xc000, 4096)]),
    ]);
    assert_eq!(
        out,
        vec![
            landed(4096, 0xa000, 4096),
            landed(8192, 0xb000, 2048),
            landed(10240, 0xb800, 2048),
            landed(12288, 0xc000, 4096),
        ]
    );
    assert_eq!((stats.requests, stats.replies, stats.desyncs), (1, 1, 0));
    assert_eq!(stats.located_bytes, 12288);
}

#[test]
fn structured_replies_take_data_chunks_at_their_own_offsets_and_skip_holes_and_errors() {
    let (out, stats) = run(&[
        tx(CMD_READ, 5, 0, 16384),
        // First chunk: the second half, as OFFSET_DATA.
        rx(&STRUCTURED_REPLY_MAGIC.to_be_bytes()),
        rx(&chunk_rest(0, REPLY_TYPE_OFFSET_DATA, 5, 8 + 8192)),
        rx(&8192u64.to_be_bytes()),
        rx_data(8192, &[(0x5000, 8192)]),
        // A hole for the first half: nothing lands.
        rx(&STRUCTURED_REPLY_MAGIC.to_be_bytes()),
        rx(&chunk_rest(0, REPLY_TYPE_OFFSET_HOLE, 5, 12)),
        rx(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0]),
        // An error chunk with a message, then the final NONE.
        rx(&STRUCTURED_REPLY_MAGIC.to_be_bytes()),
        rx(&chunk_rest(0, REPLY_TYPE_ERROR, 5, 4 + 2 + 3)),
        rx(&[0, 0, 0, 5, 0, 3, b'b', b'a', b'd']),
        rx(&STRUCTURED_REPLY_MAGIC.to_be_bytes()),
        rx(&chunk_rest(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 5, 0)),
        // The conversation carries on.
        tx(CMD_READ, 6, 4096, 4096),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(0, 6)),
        rx_data(4096, &[(0x9000, 4096)]),
    ]);
    assert_eq!(
        out,
        vec![landed(8192, 0x5000, 8192), landed(4096, 0x9000, 4096)]
    );
    assert_eq!(
        (stats.replies, stats.desyncs, stats.unknown_cookies),
        (5, 0, 0)
    );
}

#[test]
fn interleaved_cookies_are_answered_out_of_order() {
    let (out, stats) = run(&[
        tx(CMD_READ, 1, 0, 4096),
        tx(CMD_READ, 2, 65536, 4096),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(0, 2)),
        rx_data(4096, &[(0x2000, 4096)]),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(0, 1)),
        rx_data(4096, &[(0x1000, 4096)]),
    ]);
    assert_eq!(
        out,
        vec![landed(65536, 0x2000, 4096), landed(0, 0x1000, 4096)]
    );
    assert_eq!(stats.desyncs, 0);
}

#[test]
fn a_failed_simple_read_carries_no_data() {
    let (out, stats) = run(&[
        tx(CMD_READ, 3, 0, 4096),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(5, 3)),
        tx(CMD_READ, 4, 0, 4096),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(0, 4)),
        rx_data(4096, &[(0x4000, 4096)]),
    ]);
    assert_eq!(out, vec![landed(0, 0x4000, 4096)]);
    assert_eq!(stats.desyncs, 0);
}

#[test]
fn extended_headers_are_decoded() {
    let req = request(EXTENDED_REQUEST_MAGIC, CMD_READ, 9, 1 << 32, 4096);
    let mut rest = chunk_rest(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 9, 0)[..12].to_vec();
    rest.extend((1u64 << 32).to_be_bytes());
    rest.extend((8u64 + 4096).to_be_bytes());
    let (out, stats) = run(&[
        event(IoKind::Send, 32, &req, &[(0x20, 32)]),
        rx(&EXTENDED_REPLY_MAGIC.to_be_bytes()),
        rx(&rest),
        rx(&(1u64 << 32).to_be_bytes()),
        rx_data(4096, &[(0x7000, 4096)]),
    ]);
    assert_eq!(out, vec![landed(1 << 32, 0x7000, 4096)]);
    assert_eq!((stats.requests, stats.replies, stats.desyncs), (1, 1, 0));
}

#[test]
fn writes_are_stored_from_their_iovecs_and_zeroing_changes_the_disk() {
    let header = request(REQUEST_MAGIC, CMD_WRITE, 11, 8192, 8192);
    let (out, _) = run(&[
        // Header and the first page in one sendmsg, the second page in the next.
        event(
            IoKind::Send,
            28 + 4096,
            &header,
            &[(0x20, 28), (0x6000, 4096)],
        ),
        event(IoKind::Send, 4096, &[], &[(0x8000, 4096)]),
        tx(CMD_WRITE_ZEROES, 12, 0, 65536),
    ]);
    let stored = |offset, addr| Observed::Stored {
        key: KEY,
        offset,
        addr,
        len: 4096,
    };
    assert_eq!(
        out,
        vec![
            stored(8192, 0x6000),
            stored(12288, 0x8000),
            Observed::Changed {
                key: KEY,
                offset: 0,
                len: 65536
            },
        ]
    );
}

#[test]
fn a_lost_place_is_counted_and_found_again_at_the_next_magic() {
    let (out, stats) = run(&[
        // In place: one whole exchange.
        tx(CMD_READ, 0, 1 << 20, 4096),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(0, 0)),
        rx_data(4096, &[(0xf000, 4096)]),
        tx(CMD_READ, 1, 0, 4096),
        // A big receive where a magic was due: its bytes cannot be seen.
        rx_data(4096 + 16, &[(0x1000, 8192)]),
        tx(CMD_READ, 2, 8192, 4096),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(0, 2)),
        rx_data(4096, &[(0x3000, 4096)]),
    ]);
    assert_eq!(
        out,
        vec![landed(1 << 20, 0xf000, 4096), landed(8192, 0x3000, 4096)]
    );
    assert_eq!(stats.desyncs, 1);
}

#[test]
fn the_handshake_before_the_first_reply_is_no_desync() {
    // Option haggling as QEMU reads it: NBDMAGIC, IHAVEOPT, flags, then an option reply.
    let (out, stats) = run(&[
        rx(&NBDMAGIC.to_be_bytes()),
        rx(&IHAVEOPT.to_be_bytes()),
        rx(&[0, 3]),
        rx(&[
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0,
        ]),
        rx_data(64, &[(0x100, 64)]),
        tx(CMD_READ, 1, 0, 4096),
        rx(&STRUCTURED_REPLY_MAGIC.to_be_bytes()),
        rx(&chunk_rest(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            1,
            8 + 4096,
        )),
        rx(&0u64.to_be_bytes()),
        rx_data(4096, &[(0x1000, 4096)]),
    ]);
    assert_eq!(out, vec![landed(0, 0x1000, 4096)]);
    assert_eq!(stats.desyncs, 0);
}

#[test]
fn payload_beyond_the_recorded_iovecs_is_counted_not_placed() {
    let iovs: Vec<(u64, u64)> = (0..MAX_IOV as u64)
        .map(|i| (0x10000 * (i + 1), 4096 / MAX_IOV as u64))
        .collect();
    let mut ev = rx_data(4096 + 1024, &iovs);
    ev.iov_total = MAX_IOV as u32 + 2;
    let (out, stats) = run(&[
        tx(CMD_READ, 1, 0, 4096 + 1024),
        rx(&SIMPLE_REPLY_MAGIC.to_be_bytes()),
        rx(&simple_rest(0, 1)),
        ev,
    ]);
    assert_eq!(out.len(), MAX_IOV);
    assert_eq!(stats.located_bytes, 4096);
    assert_eq!(stats.unlocated_bytes, 1024);
}
