//! The migration hook: QEMU's pre-copy stream rewritten into NAS mappings on the source host
//! and rebuilt byte for byte on the target host.
//!
//! [`stream`] finds page payloads in QEMU's stream; [`link`] is the agent-to-agent protocol;
//! [`dedup`] is the content cache both ends keep in step for DUP frames; [`outgoing`] batches
//! the source's frames for gathered writes; [`pace`] holds the link to the migration's
//! bandwidth cap; [`incoming`] decides which target QEMU addresses the target agent delivers to;
//! [`pagemap`] is what the source asks the memory-to-disk map.
pub mod compress;
pub mod dedup;
pub mod incoming;
pub mod link;
pub mod outgoing;
pub mod pace;
pub mod pagemap;
pub mod report;
pub mod source;
pub mod stream;
pub mod target;
pub mod wire;
