//! The agent link's protection: mutual TLS with credentials in QEMU's `tls-creds-x509`
//! layout, or plaintext only where the operator opted out (`--insecure`), which is logged.
//!
//! ```text
//! source agent --TCP--> target agent
//!   TLS handshake: the target presents server-cert.pem, the source verifies it names the
//!   host it dialled; the source presents client-cert.pem, the target verifies it against
//!   the CA and, with an allow-list, that it names an allowed source -> only then HELLO
//! ```
//! A peer without a client certificate, with one another CA signed, with a name the
//! allow-list lacks, or whose server certificate names another host, is refused in the
//! handshake: the target never reads a HELLO from it.
use std::{path::Path, sync::Arc, time::Duration};

use nas_proto::net::Stream;
use tls_creds::{
    tokio_rustls::{TlsAcceptor, TlsConnector},
    ClientAuth, Creds, Identity, TlsError,
};
use tokio::net::TcpStream;

/// Time allowed for a TLS handshake on the link.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the agent link is protected.
#[derive(Clone, Debug, Default)]
pub enum LinkSecurity {
    /// Plaintext: the operator's explicit opt-out.
    #[default]
    Insecure,
    Tls(Arc<LinkTls>),
}

/// Mutual TLS settings of one agent.
pub struct LinkTls {
    creds: Creds,
    /// For serving (when the directory has a server certificate).
    acceptor: Option<TlsAcceptor>,
    connector: TlsConnector,
    /// Source identities a target accepts; empty: any the CA signed.
    allow: Vec<String>,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls")
            .field("creds", &self.creds)
            .field("allow", &self.allow)
            .finish()
    }
}

/// Why the link's security could not be set up, or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(
        "the agent link needs credentials: --tls-creds DIR (QEMU's tls-creds-x509 layout: \
         ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem), or \
         --insecure to run it in plaintext"
    )]
    Unconfigured,
    #[error("--tls-creds and --insecure exclude each other")]
    Both,
    #[error(transparent)]
    Creds(#[from] TlsError),
    #[error("TLS handshake with {peer}: {why}")]
    Handshake { peer: String, why: String },
    #[error("TLS handshake with {0}: no answer within 10 s")]
    Timeout(String),
    #[error("the peer's certificate names {identity:?}, which is not among the allowed sources {allowed:?}")]
    NotAllowed {
        identity: Vec<String>,
        allowed: Vec<String>,
    },
}

impl LinkSecurity {
    /// From the command line: credentials, or the explicit opt-out, and never neither.
    pub fn configure(
        creds: Option<&Path>,
        insecure: bool,
        allow: Vec<String>,
    ) -> Result<Self, SecurityError> {
        match (creds, insecure) {
            (Some(_), true) => Err(SecurityError::Both),
            (None, false) => Err(SecurityError::Unconfigured),
            (None, true) => {
                tracing::warn!(
                    "--insecure: the agent link runs in plaintext, unauthenticated; anyone who \
                     reaches it can read migrations and name VMs to migrate into"
                );
                Ok(LinkSecurity::Insecure)
            }
            (Some(dir), false) => Ok(LinkSecurity::Tls(Arc::new(LinkTls::load(dir, allow)?))),
        }
    }

    /// The target's side of a new link: the handshake, and the source's identity.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<(Box<dyn Stream>, Option<Identity>), SecurityError> {
        let LinkSecurity::Tls(tls) = self else {
            return Ok((Box::new(tcp), None));
        };
        let peer = peer_of(&tcp);
        let acceptor = tls.acceptor.as_ref().ok_or(TlsError::Missing {
            dir: tls.creds.dir().to_path_buf(),
            what: "server-cert.pem",
        })?;
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| SecurityError::Timeout(peer.clone()))?
            .map_err(|e| SecurityError::Handshake {
                peer,
                why: e.to_string(),
            })?;
        let identity = Identity::of_peer(stream.get_ref().1.peer_certificates());
        if !tls.allow.is_empty() && !identity.as_ref().is_some_and(|i| i.is_any_of(&tls.allow)) {
            return Err(SecurityError::NotAllowed {
                identity: identity.map(|i| i.names).unwrap_or_default(),
                allowed: tls.allow.clone(),
            });
        }
        Ok((Box::new(stream), identity))
    }

    /// The source's side: the handshake with the target agent at `addr` (`HOST:PORT`), whose
    /// certificate must name HOST.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: &str,
    ) -> Result<Box<dyn Stream>, SecurityError> {
        let LinkSecurity::Tls(tls) = self else {
            return Ok(Box::new(tcp));
        };
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let name = tls_creds::server_name(host)?;
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connector.connect(name, tcp))
            .await
            .map_err(|_| SecurityError::Timeout(addr.to_string()))?
            .map_err(|e| SecurityError::Handshake {
                peer: addr.to_string(),
                why: e.to_string(),
            })?;
        Ok(Box::new(stream))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, LinkSecurity::Tls(_))
    }
}

impl LinkTls {
    fn load(dir: &Path, allow: Vec<String>) -> Result<Self, SecurityError> {
        let creds = Creds::load(dir)?;
        let acceptor = match creds.server_config(ClientAuth::Required) {
            Ok(c) => Some(TlsAcceptor::from(c)),
            Err(TlsError::Missing { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let connector = TlsConnector::from(creds.client_config()?);
        Ok(Self {
            creds,
            acceptor,
            connector,
            allow,
        })
    }
}

fn peer_of(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "an unknown peer".into(), |a| a.to_string())
}
