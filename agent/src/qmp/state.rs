//! QEMU's run states (`query-status`) and migration states (`query-migrate`) as enums, so
//! decisions about where a guest runs match on states, not on strings.
use std::fmt;

/// A VM's run state, from `query-status`'s `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// Waiting for an incoming migration (`-incoming`).
    InMigrate,
    /// The source after a completed migration.
    PostMigrate,
    FinishMigrate,
    Prelaunch,
    /// Any other state, as QEMU spells it.
    Other(String),
}

impl RunState {
    pub fn parse(s: &str) -> Self {
        match s {
            "running" => Self::Running,
            "paused" => Self::Paused,
            "inmigrate" => Self::InMigrate,
            "postmigrate" => Self::PostMigrate,
            "finish-migrate" => Self::FinishMigrate,
            "prelaunch" => Self::Prelaunch,
            other => Self::Other(other.to_string()),
        }
    }

    /// QEMU's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::InMigrate => "inmigrate",
            Self::PostMigrate => "postmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::Prelaunch => "prelaunch",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RunState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A migration's state, from `query-migrate`'s `status` (either side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration has run (`query-migrate` answers without a status).
    None,
    Setup,
    Active,
    Device,
    PreSwitchover,
    WaitUnplug,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
    /// Any other state, as QEMU spells it.
    Other(String),
}

impl MigrationStatus {
    /// From a `query-migrate` reply.
    pub fn of(info: &serde_json::Value) -> Self {
        match info["status"].as_str() {
            None => Self::None,
            Some(s) => Self::parse(s),
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "none" => Self::None,
            "setup" => Self::Setup,
            "active" => Self::Active,
            "device" => Self::Device,
            "pre-switchover" => Self::PreSwitchover,
            "wait-unplug" => Self::WaitUnplug,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            other => Self::Other(other.to_string()),
        }
    }

    /// Whether the migration is still going (and `migrate_cancel` would stop it).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Self::Active | Self::Device | Self::PreSwitchover | Self::Setup | Self::WaitUnplug
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_qemu_spelling() {
        for s in [
            "running",
            "paused",
            "inmigrate",
            "postmigrate",
            "finish-migrate",
            "prelaunch",
            "guest-panicked",
        ] {
            assert_eq!(RunState::parse(s).as_str(), s);
        }
        assert!(MigrationStatus::parse("device").is_active());
        assert!(!MigrationStatus::parse("cancelling").is_active());
        assert_eq!(
            MigrationStatus::of(&serde_json::json!({})),
            MigrationStatus::None
        );
        assert_eq!(
            MigrationStatus::parse("postcopy-active"),
            MigrationStatus::Other("postcopy-active".into())
        );
    }
}
