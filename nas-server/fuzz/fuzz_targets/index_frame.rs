//! Index-service frames from untrusted bytes: parsing never panics, and whatever parses
//! re-encodes to a frame that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nas_proto::index::Frame;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((frame, used)) = Frame::parse(rest) {
        let bytes = frame.to_bytes();
        let (again, n) = Frame::parse(&bytes).expect("an encoded frame parses");
        assert_eq!(n, bytes.len());
        assert_eq!(again, frame);
        rest = &rest[used..];
    }
});
