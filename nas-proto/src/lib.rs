//! The storage side's wire formats, shared by the server (`nas-server`) and its clients
//! (`nas-client`, the agents, the tests).
//!
//! - [`cursor`]: the byte cursor every check-then-parse reader shares (this crate's, nas-server's
//!   NBD option parser, the agent link's).
//! - [`nbd`]: NBD constants, limits and the protocol's error values (pure).
//! - [`index`]: index-service frames, encoded and parsed as pure functions over bytes
//!   (check-then-parse: [`index::FrameError::Incomplete`] until a whole frame is there).
//! - [`endpoint`]: [`Endpoint`], the one address type (`HOST:PORT` or `unix:PATH`).
//! - [`net`]: the one module that does I/O: connecting to and listening on an [`Endpoint`]
//!   with tokio, for both ends.
//!
//! Bytes from a socket flow through [`net`] into the parsers here and out as typed frames;
//! nothing here keeps state across frames.
pub mod cursor;
pub mod endpoint;
pub mod index;
pub mod nbd;
pub mod net;

pub use endpoint::Endpoint;
