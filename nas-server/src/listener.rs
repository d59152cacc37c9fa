//! Listening sockets, TCP or unix, shared by the NBD server and the index service.
use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
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

    /// Caps the kernel receive buffer of the TCP connections this listener accepts at `bytes`
    /// (SO_RCVBUF, which accepted sockets inherit; it also turns off the buffer's autotuning).
    /// Unix sockets are left as they are.
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        let Self::Tcp(l) = self else { return Ok(()) };
        let value = libc::c_int::try_from(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer size too large"))?;
        // SAFETY: setsockopt reads one c_int through a valid pointer, on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(l),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
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

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {listen}: {source}")]
pub struct BindError {
    pub listen: Listen,
    pub source: io::Error,
}

/// One accepted connection: the stream, a printable peer, and the connection slot it holds.
pub struct Accepted {
    pub stream: Box<dyn Stream>,
    pub peer: String,
    pub slot: OwnedSemaphorePermit,
}

impl Bound {
    /// Binds every address in `listen`, or says which one failed.
    pub async fn bind_all(listen: &[Listen]) -> Result<Vec<Self>, BindError> {
        let mut bound = Vec::with_capacity(listen.len());
        for l in listen {
            bound.push(Self::bind(l).await.map_err(|source| BindError {
                listen: l.clone(),
                source,
            })?);
        }
        Ok(bound)
    }

    /// Waits for a free connection slot, then for a connection, which keeps the slot. `None`
    /// once `stop` turns true. A failed accept (EMFILE and friends) is logged as `what`'s and
    /// retried after a pause instead of spinning.
    pub async fn accept_in_slot(
        &self,
        slots: &Arc<Semaphore>,
        stop: &mut watch::Receiver<bool>,
        what: &str,
    ) -> Option<Accepted> {
        loop {
            let slot = tokio::select! {
                _ = stop.wait_for(|s| *s) => return None,
                p = slots.clone().acquire_owned() => p.expect("slots never close"),
            };
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => return None,
                a = self.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => return Some(Accepted { stream, peer, slot }),
                Err(e) => {
                    tracing::warn!("{what}: accept failed: {e}");
                    drop(slot);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
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
