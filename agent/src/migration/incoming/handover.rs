//! The target agent's own way in: the VM's QMP socket, in a directory the operator
//! configured, is the proof of which QEMU is meant. The agent checks through it that this
//! QEMU waits for an incoming migration, then hands it one end of a socket pair (`getfd`)
//! and starts its incoming migration on that descriptor (`migrate-incoming fd:NAME`). The
//! stream then reaches that QEMU and nothing else: there is no address anyone else could
//! connect to, or that a source could name.
use std::{
    os::{
        fd::AsFd,
        unix::fs::{FileTypeExt, MetadataExt},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::json;

use super::{policy::Conn, DeliveryError};
use crate::qmp::{Qmp, RunState};

/// What QEMU calls the descriptor it is handed.
const FD_NAME: &str = "nas-agent-incoming";
/// Time allowed for each QMP step.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket `vm`'s QMP monitor listens on, `DIR/VM.qmp`, in the first of `dirs` that has
/// one. A directory that others than root (or this process's user) may write to is refused:
/// whoever can place a socket there could pose as any VM.
pub fn find_qmp(dirs: &[PathBuf], vm: &str) -> Result<PathBuf, DeliveryError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    for dir in dirs {
        let path = dir.join(format!("{vm}.qmp"));
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_socket() {
            return Err(DeliveryError::NotASocket(path));
        }
        let dir_meta = std::fs::metadata(dir).map_err(|e| DeliveryError::QmpDir {
            dir: dir.clone(),
            why: e.to_string(),
        })?;
        if (dir_meta.uid() != 0 && dir_meta.uid() != euid) || dir_meta.mode() & 0o022 != 0 {
            return Err(DeliveryError::QmpDir {
                dir: dir.clone(),
                why: "writable by others than its owner, or not owned by root".into(),
            });
        }
        return Ok(path);
    }
    Err(DeliveryError::UnknownVm(vm.to_string()))
}

/// Checks that the QEMU behind `qmp_path` waits for an incoming migration, and starts that
/// migration on a fresh socket pair; returns this agent's end.
pub async fn hand_over(qmp_path: &Path) -> Result<Box<dyn Conn>, DeliveryError> {
    let qmp_err = |e: crate::qmp::QmpError| DeliveryError::Qmp {
        path: qmp_path.to_path_buf(),
        why: e.to_string(),
    };
    let mut qmp = tokio::time::timeout(QMP_TIMEOUT, Qmp::connect(qmp_path))
        .await
        .map_err(|_| DeliveryError::Qmp {
            path: qmp_path.to_path_buf(),
            why: "no QMP greeting within 10 s (is another client holding this monitor?)".into(),
        })?
        .map_err(qmp_err)?;
    let state = tokio::time::timeout(QMP_TIMEOUT, qmp.status())
        .await
        .map_err(|_| qmp_err(crate::qmp::QmpError::Timeout("query-status".into())))?
        .map_err(qmp_err)?;
    if state != RunState::InMigrate {
        return Err(DeliveryError::NotWaiting(state.to_string()));
    }
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    tokio::time::timeout(QMP_TIMEOUT, qmp.pass_fd(FD_NAME, theirs.as_fd()))
        .await
        .map_err(|_| qmp_err(crate::qmp::QmpError::Timeout("getfd".into())))?
        .map_err(qmp_err)?;
    drop(theirs);
    let uri = json!({ "uri": format!("fd:{FD_NAME}") });
    if let Err(e) = qmp
        .execute_timeout("migrate-incoming", Some(uri), QMP_TIMEOUT)
        .await
    {
        // QEMU keeps a named descriptor until it is used or closed.
        let _ = qmp
            .execute_timeout("closefd", Some(json!({ "fdname": FD_NAME })), QMP_TIMEOUT)
            .await;
        return Err(qmp_err(e));
    }
    ours.set_nonblocking(true)?;
    Ok(Box::new(tokio::net::UnixStream::from_std(ours)?))
}
