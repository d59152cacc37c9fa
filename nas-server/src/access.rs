//! Who a connection is, and which exports it may name. A connection that completed TLS with a
//! client certificate has that certificate's identity; an export with an allow-list is open
//! only to those identities (compare QEMU's `tls-authz`), and only over TLS.
use tls_creds::Identity;

use crate::export::ExportEntry;

/// What a connection has proved.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// It negotiated TLS.
    pub tls: bool,
    /// The name(s) in its verified client certificate.
    pub identity: Option<Identity>,
}

/// Why an export is refused to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Only TLS clients with an allowed identity may use it; this one has not negotiated TLS.
    TlsRequired,
    /// Its identity is not on the export's allow-list.
    NotAllowed,
}

impl Access {
    /// Whether this connection may use `entry`.
    pub fn check(&self, entry: &ExportEntry) -> Result<(), Refusal> {
        self.permits(&entry.allow)
    }

    /// Whether this connection may use an export with the allow-list `allow`.
    pub fn permits(&self, allow: &[String]) -> Result<(), Refusal> {
        if allow.is_empty() {
            return Ok(());
        }
        if !self.tls {
            return Err(Refusal::TlsRequired);
        }
        match &self.identity {
            Some(id) if id.is_any_of(allow) => Ok(()),
            _ => Err(Refusal::NotAllowed),
        }
    }

    /// For logs: who this is.
    pub fn who(&self) -> String {
        match (&self.identity, self.tls) {
            (Some(id), _) => id.to_string(),
            (None, true) => "(TLS, no client certificate)".into(),
            (None, false) => "(plaintext)".into(),
        }
    }
}
