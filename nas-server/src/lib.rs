//! The storage-node server: serves VM disks over NBD and keeps a BLAKE3 hash of every 4 KiB
//! block of every export, so agents can ask which block holds a given page.
//!
//! Data flows client -> NBD handshake -> transmission -> export (a raw image file), with a
//! hashing layer over each export that keeps the block index exact under writes. The index
//! service answers agents' batched lookups from that index. The crate also carries the async
//! NBD and index clients the agent uses.
