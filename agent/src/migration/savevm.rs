//! The first check both agents make of a stream: it begins with QEMU's savevm magic and a
//! version they know (`be32 'QEVM' | be32 3`). Whatever else is written into a socket that
//! reaches an agent (a stray client, or bytes meant for another service) is refused before
//! any of it is sent on or delivered. Inside a real stream, sections the parser does not know
//! still pass through verbatim.
use crate::migration::stream::QEVM;

/// The only savevm version QEMU writes (and the agents parse).
pub const SAVEVM_VERSION: u32 = 3;
/// The header's size.
pub const HEADER: usize = 8;
/// The header itself.
const EXPECTED: [u8; HEADER] = {
    let (magic, version) = (QEVM.to_be_bytes(), SAVEVM_VERSION.to_be_bytes());
    [
        magic[0], magic[1], magic[2], magic[3], version[0], version[1], version[2], version[3],
    ]
};

/// A stream that is not QEMU's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a QEMU migration stream: it begins {0:02x?}, not the savevm magic 'QEVM' and version \
     {SAVEVM_VERSION}"
)]
pub struct NotSavevm(pub Vec<u8>);

/// Checks a stream's first bytes; `Ok(false)` while fewer than [`HEADER`] are known.
pub fn check(start: &[u8]) -> Result<bool, NotSavevm> {
    let n = start.len().min(HEADER);
    if start[..n] != EXPECTED[..n] {
        return Err(NotSavevm(start[..n].to_vec()));
    }
    Ok(n == HEADER)
}

/// Holds a stream's first bytes back until they are known to be a savevm header.
#[derive(Debug, Default)]
pub struct Gate {
    held: Vec<u8>,
    open: bool,
}

impl Gate {
    /// Takes the next bytes of the stream; returns what may go on now (the held header with
    /// them once it checks out, nothing while it is still short).
    pub fn pass<'a>(&mut self, bytes: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, NotSavevm> {
        if self.open {
            return Ok(bytes.into());
        }
        self.held.extend_from_slice(bytes);
        if !check(&self.held)? {
            return Ok(Vec::new().into());
        }
        self.open = true;
        Ok(std::mem::take(&mut self.held).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_savevm_header_passes_at_any_split_and_anything_else_is_refused() {
        let stream = b"QEVM\0\0\0\x03\x07rest";
        for split in 0..=stream.len() {
            let mut gate = Gate::default();
            let mut out = gate.pass(&stream[..split]).unwrap().into_owned();
            out.extend_from_slice(&gate.pass(&stream[split..]).unwrap());
            assert_eq!(out, stream, "split at {split}");
        }
        for bad in [
            &b"SET owned-by-anyone 1\r\n"[..],
            b"QEVM\0\0\0\x02",
            b"QEV\0",
            b"GET / HTTP/1.1\r\n",
        ] {
            let mut gate = Gate::default();
            let e = gate.pass(bad).unwrap_err();
            assert!(e.to_string().contains("not a QEMU migration stream"), "{e}");
        }
        // Short, but already wrong.
        assert!(Gate::default().pass(b"S").is_err());
        assert_eq!(check(b"QE"), Ok(false));
    }
}
