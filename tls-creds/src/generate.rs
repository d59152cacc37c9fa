//! Writes credential directories in QEMU's layout: a certificate authority, and server and
//! client certificates it signs. For tests, labs and the demo; production credentials come
//! from the operator's own CA. [`test_creds`] writes the set the tests use: the target host's,
//! the source host's, and ones that must be refused.
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Why a directory could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("writing credentials: {0}")]
    Io(#[from] std::io::Error),
}

/// A certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// Who a directory's certificates name.
pub struct Names<'a> {
    /// The server certificate's names (subject alternative names; the first is also its
    /// common name): host names or IP addresses.
    pub server: &'a [&'a str],
    /// The client certificate's name (common name and subject alternative name), or `None`
    /// for a directory without one.
    pub client: Option<&'a str>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca, GenerateError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    /// A certificate for `names` (the first is also its common name) signed by this CA, for
    /// `purpose`; PEM of the certificate and of its key.
    fn leaf(
        &self,
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), GenerateError> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `dir` in QEMU's `tls-creds-x509` layout (keys readable by the owner only).
    pub fn write_dir(&self, dir: &Path, names: &Names<'_>) -> Result<(), GenerateError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca-cert.pem"), self.cert.pem())?;
        let mut pairs = vec![(
            "server",
            self.leaf(names.server, ExtendedKeyUsagePurpose::ServerAuth)?,
        )];
        if let Some(client) = names.client {
            pairs.push((
                "client",
                self.leaf(&[client], ExtendedKeyUsagePurpose::ClientAuth)?,
            ));
        }
        for (end, (cert, key)) in pairs {
            std::fs::write(dir.join(format!("{end}-cert.pem")), cert)?;
            let key_path = dir.join(format!("{end}-key.pem"));
            std::fs::write(&key_path, key)?;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }
}

/// Where the test credentials were written.
pub struct TestCreds {
    /// The target host's: server certificate for 127.0.0.1 and localhost.
    pub target: PathBuf,
    /// The source host's: client certificate `source.example` (and a server certificate).
    pub source: PathBuf,
    /// A source whose client certificate names `stranger.example`.
    pub stranger: PathBuf,
    /// The same CA, but no client certificate.
    pub anonymous: PathBuf,
    /// Another CA's client certificate `source.example`, with the test CA to trust.
    pub foreign: PathBuf,
    /// A server certificate naming `elsewhere.example` only.
    pub misnamed: PathBuf,
}

/// Writes the test set into `dir`.
pub fn test_creds(dir: &Path) -> TestCreds {
    let ca = Ca::new("nas test CA").expect("a CA");
    let write = |name: &str, server: &[&str], client: Option<&str>| {
        let d = dir.join(name);
        ca.write_dir(&d, &Names { server, client })
            .expect("write credentials");
        d
    };
    let local = ["127.0.0.1", "localhost"];
    let creds = TestCreds {
        target: write("tls-target", &local, Some("target.example")),
        source: write("tls-source", &local, Some("source.example")),
        stranger: write("tls-stranger", &local, Some("stranger.example")),
        anonymous: write("tls-anonymous", &local, None),
        foreign: dir.join("tls-foreign"),
        misnamed: write(
            "tls-misnamed",
            &["elsewhere.example"],
            Some("target.example"),
        ),
    };
    let other = Ca::new("another CA").expect("a CA");
    other
        .write_dir(
            &creds.foreign,
            &Names {
                server: &local,
                client: Some("source.example"),
            },
        )
        .expect("write credentials");
    std::fs::copy(
        creds.target.join("ca-cert.pem"),
        creds.foreign.join("ca-cert.pem"),
    )
    .expect("copy the CA");
    creds
}
