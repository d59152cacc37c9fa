//! The savevm parser against real QEMU streams (10.0 and Debian's 7.2), fed in chunks of every
//! size from 1 byte to two pages and then of doubling sizes up to the whole stream. Each split
//! must reproduce the stream byte for byte and find exactly the pages, counts and pass-through
//! point of the unsplit parse. The streams come from a machine that never ran (firmware pages,
//! zero pages, every device's state), small enough to split this many ways; the round-trip
//! tests cover large streams of booted guests with random splits.
use agent::migration::stream::{Sink, StreamParser, StreamStats, PAGE_SIZE};
use testkit::{
    qemu::{qemu72_binary, record_paused_stream},
    Scratch,
};

/// Everything a parse produced.
#[derive(Default, PartialEq, Eq)]
struct Parsed {
    out: Vec<u8>,
    pages: Vec<u64>,
}

impl Sink for Parsed {
    fn verbatim(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }
    fn page(&mut self, payload: &[u8; PAGE_SIZE]) {
        // Where each payload sits in the stream identifies it exactly.
        self.pages.push(self.out.len() as u64);
        self.out.extend_from_slice(payload);
    }
}

fn parse(stream: &[u8], chunk: usize) -> (Parsed, StreamStats, Option<String>) {
    let mut parser = StreamParser::new();
    let mut parsed = Parsed::default();
    for part in stream.chunks(chunk) {
        parser.feed(part, &mut parsed);
    }
    let reason = parser.passthrough_reason().map(str::to_string);
    (parsed, parser.stats(), reason)
}

fn split_every_way(stream: &[u8], what: &str) {
    let (whole, stats, reason) = parse(stream, stream.len());
    assert!(whole.out == stream, "{what}: not reproduced unsplit");
    assert!(
        stats.pages > 0 && stats.zero_pages > 0,
        "{what}: expected full and zero pages, got {stats:?}"
    );
    // The tail after ram END (device state) goes verbatim; the parser must get that far.
    let reason = reason.unwrap_or_default();
    assert!(
        reason.contains("section"),
        "{what}: stopped early or never: {reason:?}"
    );
    let mut sizes: Vec<usize> = (1..=2 * PAGE_SIZE).collect();
    let mut size = 4 * PAGE_SIZE;
    while size < stream.len() {
        sizes.push(size);
        sizes.push(size + 1);
        size *= 2;
    }
    let ways = sizes.len();
    for chunk in sizes {
        let (parsed, s, r) = parse(stream, chunk);
        assert!(parsed.out == stream, "{what}: chunk {chunk} changed bytes");
        assert!(
            parsed.pages == whole.pages,
            "{what}: chunk {chunk} found other pages"
        );
        assert_eq!(s, stats, "{what}: chunk {chunk}");
        assert_eq!(r.unwrap_or_default(), reason, "{what}: chunk {chunk}");
    }
    eprintln!(
        "{what}: {} bytes, {} pages, {} zero pages, split {ways} ways",
        stream.len(),
        stats.pages,
        stats.zero_pages,
    );
}

fn recorded(qemu: Option<&std::path::Path>) -> Vec<u8> {
    let dir = Scratch::new("parser-real");
    let path = dir.path("paused.bin");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(record_paused_stream(&dir.0, &path, qemu));
    std::fs::read(&path).unwrap()
}

#[test]
fn qemu_10_stream_parses_the_same_at_every_chunk_size() {
    split_every_way(&recorded(None), "QEMU 10");
}

#[test]
fn qemu_7_2_stream_parses_the_same_at_every_chunk_size() {
    split_every_way(&recorded(Some(&qemu72_binary())), "QEMU 7.2");
}
