//! Block hashing shared by every side of the product: the storage node's index, the source
//! agent that hashes the pages it is about to send, and the target agent that verifies the
//! blocks it fetched.
//!
//! A block is [`BLOCK`] bytes; its identity is the BLAKE3 [`Hash`] of its content (a
//! cryptographic hash, because guests choose what their pages hold). All-zero blocks are never
//! hashed for lookup ([`hash_block`] returns `None`): every sparse region would match them, and
//! QEMU sends zero pages as ZERO records anyway. Data flows in as byte slices and out as
//! digests: [`hash_block`] for one block, [`multi`] for many at once (the same digests, several
//! blocks per SIMD pass).
//!
//! This crate alone names the `blake3` version, so both link ends and the server always hash
//! alike.
pub mod multi;

/// Block size, in bytes: one guest page, one indexed disk block.
pub const BLOCK: u64 = 4096;

/// A BLAKE3 digest of one block.
pub type Hash = [u8; 32];

/// Whether a block is all zeroes: such blocks are never indexed.
pub fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// BLAKE3 of a 4 KiB block, or `None` for an all-zero block (never indexed: every sparse
/// region would match it, and a zero page is sent as a ZERO record anyway).
pub fn hash_block(data: &[u8]) -> Option<Hash> {
    debug_assert_eq!(data.len() as u64, BLOCK);
    if is_zero(data) {
        None
    } else {
        Some(hash(data))
    }
}

/// BLAKE3 of any byte string (a block that may be all zeroes, a whole image in tests).
pub fn hash(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// A digest in lower-case hex, for names and logs.
pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_have_no_hash() {
        assert_eq!(hash_block(&[0; BLOCK as usize]), None);
        let mut one = [0u8; BLOCK as usize];
        one[4095] = 1;
        assert_eq!(hash_block(&one), Some(hash(&one)));
    }
}
