//! Test credentials in QEMU's `tls-creds-x509` layout (see [`tls_creds::generate`]).
pub use tls_creds::generate::{test_creds, TestCreds};
