//! The storage-node server: serves VM disks over NBD and keeps a BLAKE3 hash of every 4 KiB
//! block of every export, so agents can ask which block holds a given page.
//!
//! Data flows client -> [`server`] (listeners, connection slots, shutdown) -> [`nbd::handshake`]
//! -> [`nbd::transmission`] -> an [`export::Export`] (a raw image file, with
//! [`export::hashing::HashingExport`] stacked over it to keep the [`index`] exact). [`config`] turns flags and a TOML file into what the
//! server runs.
pub mod client;
pub mod config;
pub mod digest_map;
pub mod export;
pub mod index;
pub mod listener;
pub mod lru;
pub mod nbd;
pub mod server;
pub mod service;
