//! Sockets of both kinds on tokio: [`connect`] for clients, [`Bound`] for listeners (with
//! connection slots and a stop signal), shared by the NBD server, the index service and the
//! agents. This is the one module of the crate that does I/O.
use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::Endpoint;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
};

/// A byte stream of either socket kind.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Connects to `addr`; TCP connections carry small frames, so Nagle is off.
pub async fn connect(addr: &Endpoint) -> io::Result<Box<dyn Stream>> {
    Ok(match addr {
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
    })
}

/// A bound listener. A unix socket's file is removed when it is dropped.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    /// Binds `listen`; a stale unix socket file is replaced, any other file is left alone.
    pub async fn bind(listen: &Endpoint) -> io::Result<Self> {
        match listen {
            Endpoint::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
            Endpoint::Unix(path) => {
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
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The address actually bound (a TCP port 0 resolved).
    pub fn local_addr(&self) -> Endpoint {
        match self {
            Self::Tcp(l) => Endpoint::Tcp(l.local_addr().expect("a bound socket has an address")),
            Self::Unix(_, p) => Endpoint::Unix(p.clone()),
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
    pub listen: Endpoint,
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
    pub async fn bind_all(listen: &[Endpoint]) -> Result<Vec<Self>, BindError> {
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

/// A stream whose first bytes were read to look at them (is this a TLS ClientHello?) and are
/// now given back: reads return them first, then the stream's own.
pub struct Rewound {
    head: Vec<u8>,
    at: usize,
    inner: Box<dyn Stream>,
}

impl Rewound {
    pub fn new(head: Vec<u8>, inner: Box<dyn Stream>) -> Self {
        Self { head, at: 0, inner }
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
