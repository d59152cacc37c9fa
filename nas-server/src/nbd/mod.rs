//! The NBD protocol, split by phase: [`handshake`] negotiates an export and yields a
//! [`handshake::Negotiated`] connection, and only that can enter [`transmission`]. The wire
//! constants and error values are in [`nas_proto::nbd`].
pub mod handshake;
pub mod transmission;
