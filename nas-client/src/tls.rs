//! TLS towards the storage: the connector built from a credentials directory (QEMU's
//! `tls-creds-x509` layout), and the name the server's certificate must carry (by default the
//! host part of the address dialled; a unix socket needs one given).
use std::sync::Arc;

use nas_proto::{net::Stream, Endpoint};
use tls_creds::{tokio_rustls::TlsConnector, Creds, TlsError};

/// How a client secures its connections to nas-server.
#[derive(Clone)]
pub struct StorageTls {
    connector: TlsConnector,
    /// The server's name, if not the address's host.
    server_name: Option<String>,
}

impl std::fmt::Debug for StorageTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl StorageTls {
    /// From credentials; presents the client certificate when the directory has one.
    pub fn from_creds(creds: &Creds, server_name: Option<String>) -> Result<Self, TlsError> {
        Ok(Self {
            connector: TlsConnector::from(creds.client_config()?),
            server_name,
        })
    }

    /// From a credentials directory, or none: what `--nas-tls-creds` gives.
    pub fn load(dir: Option<&std::path::Path>) -> Result<SharedTls, TlsError> {
        dir.map(|d| Ok(Arc::new(Self::from_creds(&Creds::load(d)?, None)?)))
            .transpose()
    }

    /// Runs the TLS handshake on `stream`, a connection to `addr`.
    pub async fn wrap(
        &self,
        stream: Box<dyn Stream>,
        addr: &Endpoint,
    ) -> std::io::Result<Box<dyn Stream>> {
        let host = match (&self.server_name, addr) {
            (Some(name), _) => name.clone(),
            (None, Endpoint::Tcp(a)) => a.ip().to_string(),
            (None, Endpoint::Unix(_)) => "localhost".to_string(),
        };
        let name = tls_creds::server_name(&host)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = self.connector.connect(name, stream).await?;
        Ok(Box::new(tls))
    }
}

/// Shared, for the pipelines that clone their settings.
pub type SharedTls = Option<Arc<StorageTls>>;
