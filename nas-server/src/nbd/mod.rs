//! The NBD protocol, split by phase: [`handshake`] negotiates an export and yields a
//! [`handshake::Negotiated`] connection, and only that can enter [`transmission`].
pub mod handshake;
pub mod proto;
pub mod transmission;
