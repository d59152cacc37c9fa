//! The end of `agent migrate`: which QEMU runs the guest, above all after a migration that did
//! not end cleanly (a link or agent failure, a timeout, the operator's cancel).
//!
//! Two running copies of one guest on one shared disk corrupt that disk, so the source guest is
//! resumed only when no target can run it:
//!
//! ```text
//! source QEMU's migration    target QEMU          the guest
//! not completed              (any)                stays on the source: QEMU resumes it by
//!                                                 itself; one left paused is resumed here
//! completed                  running              ran over to the target: the source stays
//!                                                 paused (postmigrate), whatever the agents saw
//! completed                  gone                 back on the source: resumed here
//! completed                  anything else        undecided: the source stays paused
//! ```
//!
//! A source QEMU that did not complete never wrote its whole stream, so no target can have
//! loaded it. One that completed wrote it all to the source agent, and the target may have all
//! of it even when the agents failed afterwards (a link lost before the target's DONE). "Gone"
//! means the target's monitor is closed and cannot be reopened: a target QEMU whose incoming
//! migration fails exits. In any other state it may still start the guest, so the source stays
//! paused and the report tells the operator to resume it only once the target QEMU is stopped,
//! which is also how libvirt leaves a guest whose migration outcome it cannot know.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::qmp::{Qmp, QmpError};

/// How long the target may take to start running once the source completed.
const TARGET_START: Duration = Duration::from_secs(60);
/// How long the source QEMU may take to leave its migration's active states.
const SOURCE_DONE: Duration = Duration::from_secs(120);
/// How long a source QEMU whose migration failed may take to resume its guest by itself.
const SELF_RESUME: Duration = Duration::from_secs(2);

/// Where the guest is once the migration is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target QEMU runs the guest; the source is paused after its completed migration.
    Target,
    /// The guest stays with the source QEMU (running, or paused as it was before).
    Source,
    /// The source completed but the target is neither running nor gone: the source was left
    /// paused, since the target may still start the guest.
    Undecided,
}

/// What [`settle`] found.
#[derive(Debug)]
pub struct Settled {
    pub outcome: Outcome,
    /// The source's `query-migrate` once it left the active states.
    pub info: Value,
    /// The target QEMU's status, or "gone: ..." (see [`target_status`]).
    pub target_status: String,
}

/// Which QEMU may run the guest, from the source QEMU's final migration status and the target
/// QEMU's status (the table in the module doc).
pub fn decide(source_migration: &str, target_status: &str) -> Outcome {
    if source_migration != "completed" {
        Outcome::Source
    } else if target_status == "running" {
        Outcome::Target
    } else if target_status.starts_with("gone") {
        Outcome::Source
    } else {
        Outcome::Undecided
    }
}

/// Ends the source's migration if it is still going (`migrate_cancel`), decides where the guest
/// runs, and resumes the source guest when it is to stay there and was running before the
/// migration (`source_was_running`).
pub async fn settle(
    src: &mut Qmp,
    dst: &mut Qmp,
    target_qmp: &Path,
    source_was_running: bool,
) -> Result<Settled, QmpError> {
    let info = src.execute("query-migrate", None).await?;
    if is_active(&info) {
        src.execute("migrate_cancel", None).await?;
    }
    let info = wait_source_done(src).await?;
    let completed = info["status"] == "completed";
    let target_status = if completed {
        target_status(dst, target_qmp).await
    } else {
        match dst.status().await {
            Ok(s) => s,
            Err(e) => format!("gone: {e}"),
        }
    };
    let outcome = decide(info["status"].as_str().unwrap_or(""), &target_status);
    if outcome == Outcome::Source && source_was_running {
        // QEMU resumes a guest itself once its migration failed or was cancelled; a moment
        // may pass between that status and the guest running.
        let deadline = Instant::now() + SELF_RESUME;
        let mut status = src.status().await?;
        while status != "running" && !completed && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = src.status().await?;
        }
        if status != "running" {
            tracing::warn!("source QEMU is {status} after a failed migration: resuming it");
            src.execute("cont", None).await?;
        }
    }
    Ok(Settled {
        outcome,
        info,
        target_status,
    })
}

/// Whether the migration is still going (and `migrate_cancel` would stop it).
fn is_active(info: &Value) -> bool {
    matches!(
        info["status"].as_str(),
        Some("active" | "device" | "pre-switchover" | "setup" | "wait-unplug")
    )
}

/// Waits until the source's migration has ended (cancelling included); returns
/// `query-migrate`.
async fn wait_source_done(src: &mut Qmp) -> Result<Value, QmpError> {
    let deadline = Instant::now() + SOURCE_DONE;
    loop {
        let info = src.execute("query-migrate", None).await?;
        let ending = info["status"] == "cancelling";
        if !(is_active(&info) || ending) || Instant::now() > deadline {
            return Ok(info);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The target's state once the source completed: "running" when it took over, "gone: ..."
/// when its QEMU is certainly not running (its monitor is closed and cannot be reopened), or
/// another QEMU status.
async fn target_status(dst: &mut Qmp, path: &Path) -> String {
    match wait_running(dst).await {
        Ok(status) => status,
        Err(first) => match Qmp::connect(path).await {
            Ok(mut again) => match wait_running(&mut again).await {
                Ok(status) => status,
                Err(e) => format!("unknown: {e}"),
            },
            Err(e) => format!("gone: {first}; {e}"),
        },
    }
}

/// Waits for the target to run (it starts by itself after an incoming migration).
async fn wait_running(dst: &mut Qmp) -> Result<String, QmpError> {
    let deadline = Instant::now() + TARGET_START;
    loop {
        let status = dst.status().await?;
        if status == "running" || Instant::now() > deadline {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_that_did_not_complete_keeps_the_guest() {
        for migration in ["failed", "cancelled", "active", ""] {
            for target in ["running", "inmigrate", "gone: closed", "paused"] {
                assert_eq!(
                    decide(migration, target),
                    Outcome::Source,
                    "{migration} {target}"
                );
            }
        }
    }

    #[test]
    fn after_a_completed_source_only_a_gone_target_gives_the_guest_back() {
        assert_eq!(decide("completed", "running"), Outcome::Target);
        assert_eq!(
            decide("completed", "gone: QMP connection closed; refused"),
            Outcome::Source
        );
        for target in ["inmigrate", "paused", "postmigrate", "unknown: timed out"] {
            assert_eq!(decide("completed", target), Outcome::Undecided, "{target}");
        }
    }
}
