//! The byte cursor every check-then-parse reader of the product shares (index-service frames,
//! NBD option payloads, agent-link frames): big-endian fields taken from the front of a slice,
//! each length checked before it is read. A short or invalid field is [`Malformed`], naming
//! the field; each protocol turns that into its own error value.

/// A field that is missing, short or invalid: which one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// Reads fields from the front of a byte slice.
#[derive(Clone, Copy, Debug)]
pub struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self(buf)
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    /// The next `N` bytes as an array (a digest, a page).
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Malformed> {
        Ok(self
            .bytes(N, what)?
            .try_into()
            .expect("bytes(N) is N bytes"))
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.bytes(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        self.array(what).map(u16::from_be_bytes)
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        self.array(what).map(u32::from_be_bytes)
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, Malformed> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// A UTF-8 string after a `u16` length.
    pub fn string_u16(&mut self, what: &'static str) -> Result<String, Malformed> {
        let n = self.u16(what)? as usize;
        utf8(self.bytes(n, what)?, what)
    }

    /// A UTF-8 string after a `u32` length.
    pub fn string_u32(&mut self, what: &'static str) -> Result<String, Malformed> {
        let n = self.u32(what)? as usize;
        utf8(self.bytes(n, what)?, what)
    }

    /// A `u32` count of items of `item` bytes each, at most `max`, checked against what is
    /// left before anything is allocated for them.
    pub fn count(&mut self, max: u32, item: usize, what: &'static str) -> Result<u32, Malformed> {
        let n = self.u32(what)?;
        if n > max || (n as usize).saturating_mul(item) > self.0.len() {
            return Err(Malformed(what));
        }
        Ok(n)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }

    /// Nothing may be left.
    pub fn end(&self) -> Result<(), Malformed> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Malformed("trailing bytes"))
        }
    }
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, Malformed> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Malformed(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_checked_before_they_are_read() {
        let mut c = Cursor::new(&[0, 2, b'h', b'i', 0, 0, 0, 7, 9]);
        assert_eq!(c.string_u16("name"), Ok("hi".into()));
        assert_eq!(c.u32("n"), Ok(7));
        assert_eq!(c.end(), Err(Malformed("trailing bytes")));
        assert_eq!(c.u16("short"), Err(Malformed("short")));
        assert_eq!(c.u8("last"), Ok(9));
        assert_eq!(c.end(), Ok(()));
        assert_eq!(
            Cursor::new(&[0, 1, 0xff]).string_u16("s"),
            Err(Malformed("s"))
        );
    }

    #[test]
    fn counts_cannot_claim_more_than_is_left() {
        let buf = [0, 0, 0, 3, 1, 2, 3, 4, 5, 6];
        assert_eq!(Cursor::new(&buf).count(10, 2, "n"), Ok(3));
        assert_eq!(Cursor::new(&buf).count(10, 3, "n"), Err(Malformed("n")));
        assert_eq!(Cursor::new(&buf).count(2, 1, "n"), Err(Malformed("n")));
    }
}
