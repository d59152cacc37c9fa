//! Agent-link frames from untrusted bytes (what `agent serve` reads from the network, and the
//! source reads back): parsing never panics, whatever parses re-encodes to a frame that parses
//! to the same value, and the reader the agents run, which also opens ZSTD frames, never panics
//! on any byte stream.
#![no_main]

use agent::migration::{link::LinkFrame, wire::FrameReader};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((frame, used)) = LinkFrame::parse(rest) {
        let bytes = frame.to_bytes();
        let (again, n) = LinkFrame::parse(&bytes).expect("an encoded frame parses");
        assert_eq!(n, bytes.len());
        assert_eq!(again, frame);
        rest = &rest[used..];
    }
    RUNTIME.with(|rt| {
        rt.block_on(async {
            let mut reader = FrameReader::new();
            let mut input = data;
            // Ends at the end of the input or at the first error, as a session would.
            while let Ok(Some(_)) = reader.next(&mut input).await {}
            assert!(reader.bytes_read() <= data.len() as u64);
        })
    });
});
