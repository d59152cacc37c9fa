//! Async clients of the storage side, for agents and tools.
//!
//! - [`nbd`]: [`nbd::NbdClient`] negotiates one export with any NBD server (nas-server,
//!   qemu-nbd, nbdkit) and reads blocks, pipelined, adjacent blocks coalesced into one request.
//! - [`index`]: [`index::IndexClient`] asks nas-server's index service which block holds a
//!   content and reads block hashes by offset; [`index::HotReplica`] keeps a local copy of an
//!   export's hot set from the HOT frames the service streams.
//! - [`digest_map`]: the open-addressing table behind the replica, which answers a batch of
//!   digest lookups with their cache misses overlapped.
//! - [`tls`]: TLS towards nas-server (NBD after NBD_OPT_STARTTLS, the index service from its
//!   first byte), from a credentials directory in QEMU's layout.
//!
//! Bytes flow socket ([`nas_proto::net::connect`]) -> the codecs of [`nas_proto`] -> typed
//! replies; every request and reply is bounded by the protocol's limits.
pub mod digest_map;
pub mod index;
pub mod nbd;
pub mod tls;
