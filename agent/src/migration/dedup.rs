//! The content cache both agents keep in step, so the source can send DUP for a page whose
//! content the target already holds.
//!
//! It is a bounded LRU ([`lockstep_lru::Lru`]). Both sides apply the same operations in the
//! same order — insert for every PAGE and MAPPED frame, touch for every DUP — so with the same
//! capacity they evict the same entries, and the source knows exactly which contents the
//! target still has without ever asking. Content frames are numbered in link order (their
//! *ordinal*); a DUP names the ordinal of the frame that first carried the content. The source
//! keys its cache by BLAKE3 (value: that ordinal); the target keys its cache by ordinal (value:
//! the content, or a handle to content still being fetched), so it never hashes a page only to
//! find it again.

/// Default capacity in pages (64 MiB of content on the target).
pub const DEFAULT_CAPACITY: usize = 16_384;

/// The cache: an LRU whose evictions depend only on the operations applied.
pub type ContentCache<K, V> = lockstep_lru::Lru<K, V>;
