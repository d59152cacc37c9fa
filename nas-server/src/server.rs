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
    net::{Accepted, BindError, Bound},
    Endpoint,
};

use crate::{
    export::Exports,
    nbd::{handshake, transmission},
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
        })
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
    }
}

async fn serve_connection(conn: Accepted, exports: Exports, shutdown: watch::Receiver<bool>) {
    let Accepted {
        mut stream,
        peer,
        slot,
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
    drop(slot);
}
