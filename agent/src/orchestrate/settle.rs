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
//! completed                  loaded the stream    moved to the target: the source stays paused
//!                                                 (postmigrate), whatever the agents saw
//! completed                  gone                 back on the source: resumed here
//! completed                  anything else        undecided: the source stays paused
//! ```
//!
//! A source QEMU that did not complete never wrote its whole stream, so no target can have
//! loaded it. One that completed wrote it all to the source agent, and the target may have all
//! of it even when the agents failed afterwards (a link lost before the target's DONE). A target
//! that loaded the stream runs, or, started with `-S` as libvirt starts QEMU, waits paused with
//! its incoming migration completed; such a target is resumed here (`cont`), as libvirt does,
//! when the guest was running on the source. "Gone" means the target's monitor is closed and
//! cannot be reopened: a target QEMU whose incoming migration fails exits. In any other state it
//! may still start the guest, so the source stays paused and the report tells the operator to
//! resume it only once the target QEMU is stopped, which is also how libvirt leaves a guest
//! whose migration outcome it cannot know. A guest paused before the migration is resumed on
//! neither side.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::error::{dst_err, src_err, ControlError};
use crate::qmp::{MigrationStatus, Qmp, QmpError, RunState};

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

/// The target QEMU as [`settle()`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetState {
    /// Its monitor answered with this run state.
    Is(RunState),
    /// Certainly not running: its monitor is closed and cannot be reopened.
    Gone(String),
    /// Its monitor was reopened but did not answer.
    Unknown(String),
}

impl std::fmt::Display for TargetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Is(s) => write!(f, "{s}"),
            Self::Gone(why) => write!(f, "gone: {why}"),
            Self::Unknown(why) => write!(f, "unknown: {why}"),
        }
    }
}

/// What [`settle()`] found.
#[derive(Debug)]
pub struct Settled {
    pub outcome: Outcome,
    /// The source's `query-migrate` once it left the active states.
    pub info: Value,
    /// The target QEMU's state (after `cont`, if [`settle()`] resumed it).
    pub target_status: TargetState,
}

/// Which QEMU may run the guest, from the source QEMU's final migration status, the target
/// QEMU's status and whether the target loaded the whole stream (the table in the module
/// doc).
pub fn decide(
    source_migration: &MigrationStatus,
    target: &TargetState,
    target_loaded: bool,
) -> Outcome {
    if *source_migration != MigrationStatus::Completed {
        Outcome::Source
    } else if target_loaded {
        Outcome::Target
    } else if matches!(target, TargetState::Gone(_)) {
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
) -> Result<Settled, ControlError> {
    cancel_if_active(src).await.map_err(src_err)?;
    let (status, info) = wait_source_done(src).await.map_err(src_err)?;
    let completed = status == MigrationStatus::Completed;
    let (mut target_status, loaded) = if completed {
        target_status(dst, target_qmp).await
    } else {
        match dst.status().await {
            Ok(s) => (TargetState::Is(s), false),
            Err(e) => (TargetState::Gone(e.to_string()), false),
        }
    };
    let outcome = decide(&status, &target_status, loaded);
    if outcome == Outcome::Target
        && target_status != TargetState::Is(RunState::Running)
        && source_was_running
    {
        // Started with -S: the target holds the guest now, and the guest was running.
        tracing::info!("the target QEMU loaded the stream and is {target_status}: resuming it");
        dst.execute("cont", None).await.map_err(dst_err)?;
        target_status = TargetState::Is(dst.status().await.map_err(dst_err)?);
    }
    if outcome == Outcome::Source && source_was_running {
        // QEMU resumes a guest itself once its migration failed or was cancelled; a moment
        // may pass between that status and the guest running.
        let deadline = Instant::now() + SELF_RESUME;
        let mut status = src.status().await.map_err(src_err)?;
        while status != RunState::Running && !completed && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = src.status().await.map_err(src_err)?;
        }
        if status != RunState::Running {
            tracing::warn!("source QEMU is {status} after a failed migration: resuming it");
            src.execute("cont", None).await.map_err(src_err)?;
        }
    }
    Ok(Settled {
        outcome,
        info,
        target_status,
    })
}

/// Cancels the source's migration (`migrate_cancel`) if it is still going.
pub async fn cancel_if_active(src: &mut Qmp) -> Result<(), QmpError> {
    if src.migration().await?.0.is_active() {
        src.execute("migrate_cancel", None).await?;
    }
    Ok(())
}

/// Waits until the source's migration has ended (cancelling included); returns its status
/// and `query-migrate`.
async fn wait_source_done(src: &mut Qmp) -> Result<(MigrationStatus, Value), QmpError> {
    let deadline = Instant::now() + SOURCE_DONE;
    loop {
        let (status, info) = src.migration().await?;
        let ending = status == MigrationStatus::Cancelling;
        if !(status.is_active() || ending) || Instant::now() > deadline {
            return Ok((status, info));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The target's state once the source completed, and whether it loaded the whole stream:
/// [`TargetState::Gone`] when its QEMU is certainly not running (its monitor is closed and
/// cannot be reopened). A session that broke is replaced in `dst` by the one reopened, so a
/// `cont` after this goes to the target QEMU still there.
async fn target_status(dst: &mut Qmp, path: &Path) -> (TargetState, bool) {
    let seen = |(s, loaded)| (TargetState::Is(s), loaded);
    match wait_loaded(dst).await {
        Ok(s) => seen(s),
        Err(first) => match Qmp::connect(path).await {
            Ok(again) => {
                *dst = again;
                match wait_loaded(dst).await {
                    Ok(s) => seen(s),
                    Err(e) => (TargetState::Unknown(e.to_string()), false),
                }
            }
            Err(e) => (TargetState::Gone(format!("{first}; {e}")), false),
        },
    }
}

/// Waits for the target to have loaded the stream: running (it starts by itself after an
/// incoming migration), or out of `inmigrate` with its incoming migration completed (started
/// with `-S`). Returns its status and whether it loaded the stream.
async fn wait_loaded(dst: &mut Qmp) -> Result<(RunState, bool), QmpError> {
    let deadline = Instant::now() + TARGET_START;
    loop {
        let status = dst.status().await?;
        if status == RunState::Running {
            return Ok((status, true));
        }
        if status != RunState::InMigrate && dst.migration().await?.0 == MigrationStatus::Completed {
            return Ok((status, true));
        }
        if Instant::now() > deadline {
            return Ok((status, false));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is(state: &str) -> TargetState {
        TargetState::Is(RunState::parse(state))
    }

    fn migration_status(s: &str) -> MigrationStatus {
        MigrationStatus::parse(s)
    }

    #[test]
    fn a_source_that_did_not_complete_keeps_the_guest() {
        for migration in ["failed", "cancelled", "active", ""] {
            for target in [
                is("running"),
                is("inmigrate"),
                TargetState::Gone("closed".into()),
                is("paused"),
            ] {
                for loaded in [false, true] {
                    assert_eq!(
                        decide(&migration_status(migration), &target, loaded),
                        Outcome::Source,
                        "{migration} {target} {loaded}"
                    );
                }
            }
        }
    }

    #[test]
    fn after_a_completed_source_only_a_gone_target_gives_the_guest_back() {
        let completed = MigrationStatus::Completed;
        assert_eq!(decide(&completed, &is("running"), true), Outcome::Target);
        // Started with -S: loaded, and paused until told to run.
        assert_eq!(decide(&completed, &is("paused"), true), Outcome::Target);
        assert_eq!(
            decide(
                &completed,
                &TargetState::Gone("QMP connection closed; refused".into()),
                false
            ),
            Outcome::Source
        );
        for target in [
            is("inmigrate"),
            is("paused"),
            is("postmigrate"),
            TargetState::Unknown("timed out".into()),
        ] {
            assert_eq!(
                decide(&completed, &target, false),
                Outcome::Undecided,
                "{target}"
            );
        }
    }
}
