//! Listeners, connection lifecycle and graceful shutdown.
//!
//! Each listener (TCP or unix socket) accepts while a connection slot is free (a semaphore caps
//! connections; a full server stops accepting instead of growing). A connection gets a bounded
//! time for its handshake, then serves requests until it ends. Shutdown is one path: the watch
//! channel turns true, listeners stop accepting, every connection stops reading, finishes its
//! in-flight requests and sends their replies, and then each export is flushed to disk.
use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{watch, Semaphore},
    task::JoinSet,
};

use nas_proto::{
    net::{Accepted, BindError, Bound, Stream},
    Endpoint,
};
use tls_creds::{tokio_rustls::TlsAcceptor, ClientAuth, Creds, Identity};

use crate::{
    access::Access,
    config::TlsMode,
    export::Exports,
    nbd::{
        handshake::{self, HandshakeError, Negotiated, Session, Step},
        transmission,
    },
};

/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// An NBD server whose sockets are bound; [`NbdServer::run`] serves until shutdown.
pub struct NbdServer {
    exports: Exports,
    bound: Vec<Bound>,
    max_connections: usize,
    tls: ServerTls,
}

/// TLS as the NBD server offers it (NBD_OPT_STARTTLS).
#[derive(Clone)]
pub struct ServerTls {
    pub mode: TlsMode,
    /// Present unless `mode` is off.
    pub acceptor: Option<TlsAcceptor>,
}

impl ServerTls {
    pub fn off() -> Self {
        Self {
            mode: TlsMode::Off,
            acceptor: None,
        }
    }

    /// From credentials in QEMU's layout; client certificates optional (an export's
    /// allow-list is what asks for one).
    pub fn new(mode: TlsMode, creds: &Creds) -> Result<Self, tls_creds::TlsError> {
        let acceptor = match mode {
            TlsMode::Off => None,
            _ => Some(TlsAcceptor::from(
                creds.server_config(ClientAuth::Optional)?,
            )),
        };
        Ok(Self { mode, acceptor })
    }
}

impl NbdServer {
    /// Binds every listener. A stale unix socket file is replaced.
    pub async fn bind(
        exports: Exports,
        listen: &[Endpoint],
        max_connections: usize,
    ) -> Result<Self, ServerError> {
        let bound = Bound::bind_all(listen).await?;
        Ok(Self {
            exports,
            bound,
            max_connections,
            tls: ServerTls::off(),
        })
    }

    /// Offers TLS as `tls` says.
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = tls;
        self
    }

    /// The addresses actually bound (TCP port 0 resolved).
    pub fn local_addrs(&self) -> Vec<Endpoint> {
        self.bound.iter().map(Bound::local_addr).collect()
    }

    /// Serves until `shutdown` turns true, then drains connections and flushes exports.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut connections = JoinSet::new();
        let mut acceptors = JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Accepted>(16);
        for bound in self.bound {
            let slots = slots.clone();
            let tx = conn_tx.clone();
            let mut stop = shutdown.clone();
            acceptors.spawn(async move {
                while let Some(conn) = bound.accept_in_slot(&slots, &mut stop, "NBD").await {
                    if tx.send(conn).await.is_err() {
                        return;
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
                        let tls = self.tls.clone();
                        connections.spawn(serve_connection(conn, exports, tls, shutdown));
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
    }
}

async fn serve_connection(
    conn: Accepted,
    exports: Exports,
    tls: ServerTls,
    shutdown: watch::Receiver<bool>,
) {
    let Accepted { stream, peer, slot } = conn;
    metrics::gauge!("nbd_connections").increment(1.0);
    metrics::counter!("nbd_connections_total").increment(1);
    let mut stop = shutdown.clone();
    let negotiated = tokio::select! {
        _ = stop.wait_for(|s| *s) => None,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(stream, &exports, &tls)) => {
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
    if let Some((stream, n, access)) = negotiated {
        tracing::debug!(%peer, export = %n.export.name, structured = n.structured, who = %access.who(), "serving");
        if let Err(e) = transmission::serve(stream, n, shutdown).await {
            tracing::info!(%peer, "connection ended: {e}");
        }
    }
    metrics::gauge!("nbd_connections").decrement(1.0);
    drop(slot);
}

/// The handshake, through STARTTLS when the client asks for it and the server offers it.
async fn negotiate(
    mut stream: Box<dyn Stream>,
    exports: &Exports,
    tls: &ServerTls,
) -> Result<(Box<dyn Stream>, Negotiated, Access), HandshakeError> {
    let mut session = Session {
        no_zeroes: handshake::greet(&mut stream).await?,
        tls: tls.mode,
        access: Access::default(),
    };
    loop {
        match handshake::options(&mut stream, exports, &session).await? {
            Step::Go(n) => return Ok((stream, n, session.access)),
            Step::StartTls => {
                let acceptor = tls
                    .acceptor
                    .as_ref()
                    .expect("STARTTLS is offered with TLS on");
                let upgraded = acceptor.accept(stream).await.map_err(HandshakeError::Tls)?;
                let identity = Identity::of_peer(upgraded.get_ref().1.peer_certificates());
                metrics::counter!("nbd_tls_sessions_total").increment(1);
                session.access = Access {
                    tls: true,
                    identity,
                };
                stream = Box::new(upgraded);
            }
        }
    }
}
