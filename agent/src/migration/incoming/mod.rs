//! Where the target agent delivers a stream. The source names a VM, never an address:
//! nothing received from the network chooses where this root daemon writes.
//!
//! ```text
//! HELLO {vm} -> name valid? -> registered by the operator on this host (expect)?
//!                 | yes: that QEMU's incoming address, within the policy -> connect
//!                 | no:  DIR/VM.qmp in a configured QMP directory? -> inmigrate?
//!                 |        -> socket pair, getfd + migrate-incoming fd: -> our end
//!                 +-> otherwise refused: "no VM named ... is expected on this host"
//! ```
//! The stream itself is then checked before its first byte reaches QEMU (see
//! [`crate::migration::savevm`]). `handover` is the agent's own path (the operator gives
//! QEMU a QMP monitor in the agent's directory); `expect` is libvirt's, which issues
//! `migrate-incoming` itself; `policy` bounds the addresses a registration may name.
use std::{path::PathBuf, sync::Arc};

pub mod expect;
pub mod handover;
pub mod policy;

pub use self::{
    expect::Expectations,
    policy::{Conn, Incoming, IncomingError, IncomingPolicy},
};

/// The target agent's delivery settings.
#[derive(Clone, Debug, Default)]
pub struct Delivery {
    /// Directories holding target QEMUs' QMP sockets, `VM.qmp`: the agent starts their
    /// incoming migrations itself.
    pub qmp_dirs: Vec<PathBuf>,
    /// The operator's registrations (the libvirt path).
    pub expected: Arc<Expectations>,
    /// What a registration may name.
    pub policy: IncomingPolicy,
}

/// Why a stream cannot be delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("invalid VM name {0:?}: 1 to 128 of A-Z a-z 0-9 . _ + - (not starting with . or -)")]
    BadName(String),
    #[error(
        "no VM named {0:?} is expected on this host: no QMP socket VM.qmp in the agent's QMP \
         directories (--qmp-dir) and no registration (agent expect)"
    )]
    UnknownVm(String),
    #[error("{0} is not a socket")]
    NotASocket(PathBuf),
    #[error("QMP directory {dir}: {why}")]
    QmpDir { dir: PathBuf, why: String },
    #[error("QMP {path}: {why}")]
    Qmp { path: PathBuf, why: String },
    #[error(
        "the target QEMU is {0:?}, not waiting for a migration (start it with -incoming defer)"
    )]
    NotWaiting(String),
    #[error("more than {} registered migrations", expect::MAX_EXPECTED)]
    TooManyExpected,
    #[error(transparent)]
    Incoming(#[from] IncomingError),
    #[error("socket pair: {0}")]
    Io(#[from] std::io::Error),
}

/// A VM name as the agents use it: a file name in a QMP directory, so it must not climb
/// out of one or hide.
pub fn check_vm_name(vm: &str) -> Result<(), DeliveryError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._+-".contains(c);
    let ok = (1..=128).contains(&vm.len())
        && vm.chars().all(ok_char)
        && !vm.starts_with('.')
        && !vm.starts_with('-');
    match ok {
        true => Ok(()),
        false => Err(DeliveryError::BadName(vm.to_string())),
    }
}

impl Delivery {
    /// Registers `vm`'s incoming address `uri`, checked against the policy now, for one
    /// migration within `ttl` (`None`: standing).
    pub fn register(
        &self,
        vm: &str,
        uri: &str,
        ttl: Option<std::time::Duration>,
    ) -> Result<(), DeliveryError> {
        let incoming = self.policy.check(uri)?;
        self.expected.register(vm, incoming, ttl)
    }

    /// The channel into the QEMU that `vm` names on this host.
    pub async fn open(&self, vm: &str) -> Result<Box<dyn Conn>, DeliveryError> {
        check_vm_name(vm)?;
        if let Some(incoming) = self.expected.take(vm) {
            let incoming = self.policy.check(&incoming.uri())?;
            return Ok(policy::connect(&incoming).await?);
        }
        let qmp = handover::find_qmp(&self.qmp_dirs, vm)?;
        handover::hand_over(&qmp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_stay_file_names() {
        for ok in ["vm1", "web-01.prod", "a+b_c", "X"] {
            assert!(check_vm_name(ok).is_ok(), "{ok}");
        }
        let long = "v".repeat(129);
        for bad in [
            "", ".", "..", "../x", "a/b", ".hidden", "-rf", "a b", "é", &long,
        ] {
            assert!(check_vm_name(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_unknown_vm_is_refused_without_touching_anything() {
        let base = ::testkit::Scratch::new("delivery-unknown");
        let delivery = Delivery {
            qmp_dirs: vec![base.0.clone()],
            ..Delivery::default()
        };
        let e = delivery.open("nobody").await.err().expect("refused");
        assert!(e.to_string().contains("no VM named \"nobody\""), "{e}");
        let e = delivery.open("../nobody").await.err().expect("refused");
        assert!(e.to_string().contains("invalid VM name"), "{e}");
    }

    #[test]
    fn a_qmp_directory_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = ::testkit::Scratch::new("delivery-perms");
        let dir = base.path("qmp");
        std::fs::create_dir_all(&dir).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(dir.join("vm1.qmp")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            handover::find_qmp(std::slice::from_ref(&dir), "vm1").unwrap(),
            dir.join("vm1.qmp")
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = handover::find_qmp(std::slice::from_ref(&dir), "vm1").unwrap_err();
        assert!(e.to_string().contains("writable by others"), "{e}");
        std::fs::write(dir.join("vm2.qmp"), b"").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = handover::find_qmp(&[dir], "vm2").unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}
