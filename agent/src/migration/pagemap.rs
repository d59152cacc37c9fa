//! What the source may know of a page before it sends it: the memory-to-disk map's claim
//! that the page holds a given disk block. A claim is checked, never trusted: the source
//! hashes the page it is about to send and sends MAPPED only when the hash equals the one the
//! claim recorded; the target then verifies the block it fetches against that hash.
use super::link::Hash;

/// A claim about one guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Which of the source's exports (an index into its `exports`) holds the block.
    pub export: usize,
    /// The block's 4 KiB-aligned byte offset on that export.
    pub offset: u64,
    /// The page's BLAKE3 when the block arrived.
    pub hash: Hash,
}

/// A memory-to-disk map the source can ask, page by page, in stream order.
pub trait PageMap: Send + Sync {
    /// The claim for the page at `offset` in RAM block `block`, if any.
    fn claim(&self, block: &str, offset: u64) -> Option<Claim>;
}

/// A map shared with the source pipeline.
#[derive(Clone)]
pub struct SharedMap(pub std::sync::Arc<dyn PageMap>);

impl std::fmt::Debug for SharedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedMap")
    }
}
