//! The migration hook: QEMU's pre-copy stream rewritten into NAS mappings on the source host
//! and rebuilt byte for byte on the target host.
//!
//! ```text
//! QEMU -> stream (parser) -> source (collect, lookup, emit, writer, back) -> link frames
//!      -> wire (reader) -> target (fetch, deliver) -> QEMU
//! ```
//! - [`stream`]: finds page payloads (and where each page belongs) in QEMU's stream.
//! - [`link`]: the agent-to-agent frames, pure codec; [`wire`]: reading them off a socket,
//!   ZSTD frames inflated; [`compress`]: when and how the source compresses.
//! - [`source`] and [`target`]: the two pipelines, one module per stage.
//! - [`dedup`]: the content cache both ends keep in step for DUP frames; [`outgoing`]: the
//!   source's frames batched for gathered writes; [`pace`]: the link held to the migration's
//!   bandwidth cap.
//! - [`incoming`]: which target QEMU the target agent delivers to, from the VM's name;
//!   [`savevm`]: both ends refuse a stream that is not QEMU's before passing any of it on;
//!   [`secure`]: the link's mutual TLS (or the operator's explicit plaintext opt-out).
//! - [`pagemap`]: what the source asks the memory-to-disk map; [`report`]: the counters and
//!   figures both ends keep; [`moments`]: where the guest's pause goes, stage by stage.
pub mod compress;
pub mod dedup;
pub mod incoming;
pub mod link;
pub mod moments;
pub mod outgoing;
pub mod pace;
pub mod pagemap;
pub mod report;
pub mod savevm;
pub mod secure;
pub mod source;
pub mod stream;
pub mod target;
pub mod wire;
