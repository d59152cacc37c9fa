//! QEMU's migration stream from arbitrary bytes, fed in chunks of a size the input picks: the
//! parser never panics, and what it hands on (verbatim bytes and page payloads, in order, and
//! at the end what `finish` gives back of a record cut short) is exactly its input, which is
//! what lets the agents rebuild the stream byte for byte.
#![no_main]

use agent::migration::stream::{Sink, StreamParser, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Rebuilt(Vec<u8>);

impl Sink for Rebuilt {
    fn verbatim(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn page(&mut self, payload: &[u8; PAGE_SIZE]) {
        self.0.extend_from_slice(payload);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    // Chunks of 1 to 256 bytes, or the whole input at once.
    let chunk = match step {
        0 => input.len().max(1),
        n => n as usize,
    };
    let mut parser = StreamParser::new();
    let mut out = Rebuilt::default();
    for piece in input.chunks(chunk) {
        parser.feed(piece, &mut out);
    }
    parser.finish(&mut out);
    assert!(out.0 == input, "the parser's output differs from its input");
    assert_eq!(parser.stats().bytes, input.len() as u64);
});
