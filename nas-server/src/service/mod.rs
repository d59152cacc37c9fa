//! The index service: agents ask which block holds a content, read block hashes by offset,
//! and keep a replica of each export's hot set. Frames are in [`frame`]; the conversation and
//! its limits are in `docs/index-protocol.md`.
pub mod frame;
pub mod server;
