//! Listeners, connection lifecycle and graceful shutdown.
//!
//! Each listener (TCP or unix socket) accepts while a connection slot is free (a semaphore caps
//! connections; a full server stops accepting instead of growing). A connection gets a bounded
//! time for its handshake, then serves requests until it ends. Shutdown is one path: the watch
//! channel turns true, listeners stop accepting, every connection stops reading, finishes its
//! in-flight requests and sends their replies, and then each export is flushed to disk.
use std::{io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{watch, Semaphore},
    task::JoinSet,
};

use crate::{
    export::Exports,
    nbd::{handshake, transmission},
};

/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to listen.
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

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {listen}: {source}")]
    Bind { listen: Listen, source: io::Error },
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// An NBD server whose sockets are bound; [`NbdServer::run`] serves until shutdown.
pub struct NbdServer {
    exports: Exports,
    bound: Vec<Bound>,
    max_connections: usize,
}

impl NbdServer {
    /// Binds every listener. A stale unix socket file is replaced.
    pub async fn bind(
        exports: Exports,
        listen: &[Listen],
        max_connections: usize,
    ) -> Result<Self, ServerError> {
        let mut bound = Vec::new();
        for l in listen {
            let err = |source| ServerError::Bind {
                listen: l.clone(),
                source,
            };
            bound.push(match l {
                Listen::Tcp(addr) => Bound::Tcp(TcpListener::bind(addr).await.map_err(err)?),
                Listen::Unix(path) => {
                    if std::fs::symlink_metadata(path)
                        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    {
                        std::fs::remove_file(path).map_err(err)?;
                    }
                    Bound::Unix(UnixListener::bind(path).map_err(err)?, path.clone())
                }
            });
        }
        Ok(Self {
            exports,
            bound,
            max_connections,
        })
    }

    /// The addresses actually bound (TCP port 0 resolved).
    pub fn local_addrs(&self) -> Vec<Listen> {
        self.bound
            .iter()
            .map(|b| match b {
                Bound::Tcp(l) => Listen::Tcp(l.local_addr().expect("bound socket has an address")),
                Bound::Unix(_, p) => Listen::Unix(p.clone()),
            })
            .collect()
    }

    /// Serves until `shutdown` turns true, then drains connections and flushes exports.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut connections = JoinSet::new();
        let mut acceptors = JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Conn>(16);
        let mut unix_paths = Vec::new();
        for bound in self.bound {
            let slots = slots.clone();
            let tx = conn_tx.clone();
            let mut stop = shutdown.clone();
            if let Bound::Unix(_, p) = &bound {
                unix_paths.push(p.clone());
            }
            acceptors.spawn(async move {
                loop {
                    let permit = tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        p = slots.clone().acquire_owned() => p.expect("slots never close"),
                    };
                    let accepted = tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        a = accept(&bound) => a,
                    };
                    match accepted {
                        Ok(conn) => {
                            if tx
                                .send(Conn {
                                    stream: conn,
                                    permit,
                                })
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        drop(conn_tx);
        let mut stop = shutdown.clone();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                conn = conn_rx.recv() => match conn {
                    Some(conn) => {
                        let exports = self.exports.clone();
                        let shutdown = shutdown.clone();
                        connections.spawn(serve_connection(conn, exports, shutdown));
                    }
                    None => break,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        acceptors.shutdown().await;
        tracing::info!(
            connections = connections.len(),
            "shutting down: draining connections"
        );
        while connections.join_next().await.is_some() {}
        for entry in self.exports.iter() {
            if entry.export.read_only() {
                continue;
            }
            let export = entry.export.clone();
            match tokio::task::spawn_blocking(move || export.flush()).await {
                Ok(Ok(())) => tracing::info!(export = %entry.name, "flushed"),
                Ok(Err(e)) => tracing::error!(export = %entry.name, "flush failed: {e}"),
                Err(e) => tracing::error!(export = %entry.name, "flush task failed: {e}"),
            }
        }
        for path in unix_paths {
            std::fs::remove_file(path).ok();
        }
    }
}

/// A stream of either socket kind.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

struct Conn {
    stream: (Box<dyn Stream>, String),
    permit: tokio::sync::OwnedSemaphorePermit,
}

async fn accept(bound: &Bound) -> io::Result<(Box<dyn Stream>, String)> {
    match bound {
        Bound::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok((Box::new(s), peer.to_string()))
        }
        Bound::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            Ok((Box::new(s), format!("unix:{}", path.display())))
        }
    }
}

async fn serve_connection(conn: Conn, exports: Exports, shutdown: watch::Receiver<bool>) {
    let Conn {
        stream: (mut stream, peer),
        permit,
    } = conn;
    metrics::gauge!("nbd_connections").increment(1.0);
    metrics::counter!("nbd_connections_total").increment(1);
    let mut stop = shutdown.clone();
    let negotiated = tokio::select! {
        _ = stop.wait_for(|s| *s) => None,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::handshake(&mut stream, &exports)) => {
            match r {
                Ok(Ok(n)) => Some(n),
                Ok(Err(e)) => {
                    tracing::info!(%peer, "handshake ended: {e}");
                    None
                }
                Err(_) => {
                    tracing::info!(%peer, "handshake timed out after {HANDSHAKE_TIMEOUT:?}");
                    None
                }
            }
        }
    };
    if let Some(n) = negotiated {
        tracing::debug!(%peer, export = %n.export.name, structured = n.structured, "serving");
        if let Err(e) = transmission::serve(stream, n, shutdown).await {
            tracing::info!(%peer, "connection ended: {e}");
        }
    }
    metrics::gauge!("nbd_connections").decrement(1.0);
    drop(permit);
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
