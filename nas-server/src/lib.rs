//! The storage-node server: serves VM disks over NBD and keeps a BLAKE3 hash of every 4 KiB
//! block of every export, so agents can ask which block holds a given page.
//!
//! Modules:
//! - [`config`]: flags and a TOML file turned into what the server runs.
//! - [`access`]: what a connection proved (TLS, its certificate's identity) and which exports
//!   that entitles it to.
//! - [`server`]: NBD listeners, connection slots and the one shutdown path.
//! - [`nbd`]: the protocol by phase, [`nbd::handshake`] then [`nbd::transmission`].
//! - [`export`]: [`export::Export`], a raw image file, with [`export::hashing::HashingExport`]
//!   stacked over it to keep the index exact under writes.
//! - [`index`]: the block index, its parallel builder, the persisted store and journal, and the
//!   hot set.
//! - [`service`]: the index service that agents query.
//!
//! Data flows client -> [`server`] -> [`nbd::handshake`] -> [`nbd::transmission`] ->
//! [`export::Export`] (writes update [`index`] through the hashing layer); index queries flow
//! client -> [`service`] -> [`index`]. Wire formats and sockets live in `nas-proto`, block
//! hashing in `blockhash`.
pub mod access;
pub mod config;
pub mod export;
pub mod index;
pub mod nbd;
pub mod server;
pub mod service;
