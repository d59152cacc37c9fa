//! Listening sockets, TCP or unix, shared by the NBD server and the index service.
use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};

/// Where to listen: `HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    /// `HOST:PORT` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Self::Unix(path.into()));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:PATH: {e}"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A byte stream of either socket kind.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A bound listener. A unix socket's file is removed when it is dropped.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    /// Binds `listen`; a stale unix socket file is replaced, any other file is left alone.
    pub async fn bind(listen: &Listen) -> io::Result<Self> {
        match listen {
            Listen::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
            Listen::Unix(path) => {
                if is_socket(path) {
                    std::fs::remove_file(path)?;
                }
                Ok(Self::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }

    /// The address actually bound (a TCP port 0 resolved).
    pub fn local_addr(&self) -> Listen {
        match self {
            Self::Tcp(l) => Listen::Tcp(l.local_addr().expect("a bound socket has an address")),
            Self::Unix(_, p) => Listen::Unix(p.clone()),
        }
    }

    /// Accepts one connection: the stream and a printable peer.
    pub async fn accept(&self) -> io::Result<(Box<dyn Stream>, String)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Box::new(s), peer.to_string()))
            }
            Self::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), format!("unix:{}", path.display())))
            }
        }
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            std::fs::remove_file(path).ok();
        }
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            "127.0.0.1:10809".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/nas.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/nas.sock".into())
        );
        assert!("unix:".parse::<Listen>().is_err());
        assert!("nowhere".parse::<Listen>().is_err());
    }
}
