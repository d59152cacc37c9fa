//! TLS for the links between hosts (the agent link, NBD, the index service), configured the
//! way operators already configure QEMU and libvirt: a directory in QEMU's `tls-creds-x509`
//! layout.
//!
//! ```text
//! DIR/ca-cert.pem                        -> the roots both ends verify their peer against
//! DIR/server-cert.pem, server-key.pem    -> what a listener presents
//! DIR/client-cert.pem, client-key.pem    -> what a connecting side presents
//!
//! Creds::load(DIR) -> server_config(ClientAuth) / client_config() -> tokio-rustls
//! handshake done -> identity(peer's certificate) -> Identity { names } -> access decisions
//! ```
//! A listener verifies client certificates against the CA (required for the agent link,
//! optional for NBD, where a client without one sees only the exports open to anyone); a
//! connecting side verifies that the server's certificate names the host it dialled. ring is
//! the one crypto provider. `generate` (a feature) writes such directories for tests and
//! labs.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};

#[cfg(feature = "generate")]
pub mod generate;

pub use rustls;
pub use tokio_rustls;

/// Why credentials could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS credentials {path}: {why}")]
    File { path: PathBuf, why: String },
    #[error(
        "TLS credentials in {dir}: no {what} (QEMU's tls-creds-x509 layout: ca-cert.pem, \
         server-cert.pem, server-key.pem, client-cert.pem, client-key.pem)"
    )]
    Missing { dir: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("{0:?} is not a host name or address a certificate can name")]
    ServerName(String),
}

/// Whether a listener asks its clients for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client without a certificate from the CA is refused in the handshake.
    Required,
    /// A client may present one (then it is verified) or none.
    Optional,
}

type Chain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// One directory's credentials.
pub struct Creds {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    server: Option<Chain>,
    client: Option<Chain>,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds")
            .field("dir", &self.dir)
            .field("server", &self.server.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// ring: it builds with nothing beyond the Rust toolchain (aws-lc-rs wants cmake). rustls
/// marks it deprecated because ring offers no post-quantum key exchange: the links use
/// X25519/P-256 key exchange, which docs/security.md states.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |why: String| TlsError::File {
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no certificate in it".into()));
    }
    Ok(certs)
}

/// `NAME-cert.pem` and `NAME-key.pem` in `dir`, if the certificate is there.
fn chain(dir: &Path, name: &str) -> Result<Option<Chain>, TlsError> {
    let cert = dir.join(format!("{name}-cert.pem"));
    if !cert.exists() {
        return Ok(None);
    }
    let key_path = dir.join(format!("{name}-key.pem"));
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::File {
        path: key_path,
        why: e.to_string(),
    })?;
    Ok(Some((certs(&cert)?, key)))
}

impl Creds {
    /// Loads `dir`: the CA certificate is required, each end's pair where present.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let ca = dir.join("ca-cert.pem");
        if !ca.exists() {
            return Err(TlsError::Missing {
                dir: dir.to_path_buf(),
                what: "ca-cert.pem",
            });
        }
        let mut roots = RootCertStore::empty();
        for cert in certs(&ca)? {
            roots.add(cert).map_err(|e| TlsError::File {
                path: ca.clone(),
                why: e.to_string(),
            })?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            roots: Arc::new(roots),
            server: chain(dir, "server")?,
            client: chain(dir, "client")?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A listener's configuration: it presents `server-cert.pem` and verifies clients'
    /// certificates against the CA.
    pub fn server_config(&self, auth: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
        let (chain, key) = self.server.as_ref().ok_or_else(|| TlsError::Missing {
            dir: self.dir.clone(),
            what: "server-cert.pem",
        })?;
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let verifier = match auth {
            ClientAuth::Required => verifier.build(),
            ClientAuth::Optional => verifier.allow_unauthenticated().build(),
        }
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// A connecting side's configuration: it verifies the server against the CA and presents
    /// `client-cert.pem` when the directory has one.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone());
        let config = match &self.client {
            Some((chain, key)) => builder.with_client_auth_cert(chain.clone(), key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// The name a connecting side expects in the server's certificate: the host part of what it
/// dials (a DNS name or an IP address).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

/// Who a verified peer is: the names its certificate carries (the subject's common name, then
/// its DNS and IP subject alternative names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub names: Vec<String>,
}

impl Identity {
    /// The identity in a verified peer's leaf certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Identity {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let Ok((_, cert)) = X509Certificate::from_der(cert.as_ref()) else {
            return Identity::default();
        };
        let mut names: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.push(d.to_string()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => names.push(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("4"))
                                .to_string(),
                        ),
                        16 => names.push(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("16"))
                                .to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        names.dedup();
        Identity { names }
    }

    /// The identity of the peer of a finished handshake, if it presented a certificate.
    pub fn of_peer(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
        certs.and_then(<[_]>::first).map(Identity::of)
    }

    /// Whether any of its names is in `allowed`.
    pub fn is_any_of(&self, allowed: &[String]) -> bool {
        self.names.iter().any(|n| allowed.contains(n))
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.names.first() {
            Some(first) => f.write_str(first),
            None => f.write_str("(no name)"),
        }
    }
}

#[cfg(test)]
mod tests;
