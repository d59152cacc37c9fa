//! Async clients for agents: [`nbd`] reads blocks from an export (pipelined, adjacent blocks
//! coalesced), [`index`] talks to the index service and keeps a hot-set replica.
pub mod index;
pub mod nbd;

use std::io;

use crate::listener::Listen;
use tokio::io::{AsyncRead, AsyncWrite};

/// A connected client socket of either kind.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Socket for T {}

pub(crate) async fn connect(addr: &Listen) -> io::Result<Box<dyn Socket>> {
    Ok(match addr {
        Listen::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Listen::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
    })
}
