//! The index service: agents ask which block holds a content, read block hashes by offset,
//! and keep a replica of each export's hot set. [`server`] holds the listener and the
//! sessions; the frames are in [`nas_proto::index`]; the conversation and its limits are in
//! `docs/protocols/index-service.md`.
pub mod server;
