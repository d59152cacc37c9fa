//! Moves the operator's migration bandwidth cap from the source QEMU's stream to the agent
//! link, for the length of one migration.
//!
//! An operator (or libvirt) caps what a migration may take of the network with the source
//! QEMU's `max-bandwidth`; QEMU's own default is 128 MiB/s. Through the agents that stream only
//! reaches the local agent, and QEMU's cap would hold it to the cap although a fraction of it
//! crosses the network. So `agent migrate` reads the cap, lifts QEMU's for the migration, has
//! the source agent pace the link to it ([`crate::migration::pace`]), and puts the operator's
//! value back afterwards, on every path. A `max-bandwidth` the operator sets while the
//! migration runs (`virsh migrate-setspeed`, QMP) becomes the link's cap at the next progress
//! tick, and is what QEMU keeps. `--max-bandwidth` on the command line caps this migration's
//! link instead of QEMU's value (until the operator sets a new one: the latest word wins), and
//! leaves QEMU's value as it was.
use std::sync::Arc;

use crate::{
    migration::pace::Cap,
    qmp::{Qmp, QmpError},
};

const PARAMETER: &str = "max-bandwidth";
/// What QEMU is given while the agents carry the cap: no limit. libvirt's "unlimited" is the
/// same order (`INT64_MAX` rounded down to MiB); QEMU takes any value up to `SIZE_MAX`.
pub const LIFTED: u64 = i64::MAX as u64;

/// The source QEMU's `max-bandwidth` while `agent migrate` carries it on the link.
#[derive(Debug)]
pub struct Bandwidth {
    /// What to put back, the operator's latest value; `None` when QEMU has no such parameter
    /// and was left alone.
    operator: Option<u64>,
    /// The link's cap, shared with the source agent.
    cap: Arc<Cap>,
}

impl Bandwidth {
    /// Reads the source QEMU's cap and lifts it; the link is capped at `requested` if given
    /// (0: no cap), or else at QEMU's value (0: none, as in QEMU).
    pub async fn take_over(src: &mut Qmp, requested: Option<u64>) -> Result<Self, QmpError> {
        let params = src.execute("query-migrate-parameters", None).await?;
        let operator = params[PARAMETER].as_u64();
        match operator {
            Some(_) => set(src, LIFTED).await?,
            None => tracing::warn!(
                "the source QEMU has no {PARAMETER}: its stream is not capped, nor is the link \
                 unless --max-bandwidth is given"
            ),
        }
        Ok(Self {
            operator,
            cap: Arc::new(Cap::new(requested.or(operator))),
        })
    }

    /// The operator's value, when QEMU's was lifted.
    pub fn operator(&self) -> Option<u64> {
        self.operator
    }

    /// The cap the source agent paces the link to.
    pub fn cap(&self) -> Arc<Cap> {
        self.cap.clone()
    }

    /// Takes a value the operator gave QEMU since, if any: the link's new cap, and what is put
    /// back at the end; QEMU's own is lifted again.
    pub async fn follow(&mut self, src: &mut Qmp) -> Result<(), QmpError> {
        if let Some(new) = self.operators_new_value(src).await? {
            tracing::info!(
                "the source QEMU's {PARAMETER} was set to {new} bytes/s: the agent link is \
                 capped there now"
            );
            self.operator = Some(new);
            self.cap.set(Some(new));
            set(src, LIFTED).await?;
        }
        Ok(())
    }

    /// Puts the operator's value back, unless the operator has set a new one since.
    pub async fn restore(self, src: &mut Qmp) -> Result<(), QmpError> {
        match (self.operator, self.operators_new_value(src).await?) {
            (Some(v), None) => put_back(src, v).await,
            _ => Ok(()),
        }
    }

    /// A value other than [`LIFTED`] in QEMU: the operator's, set since QEMU's was lifted.
    async fn operators_new_value(&self, src: &mut Qmp) -> Result<Option<u64>, QmpError> {
        if self.operator.is_none() {
            return Ok(None);
        }
        let params = src.execute("query-migrate-parameters", None).await?;
        Ok(params[PARAMETER].as_u64().filter(|&v| v != LIFTED))
    }
}

/// Gives the source QEMU the operator's `max-bandwidth` again, from a session other than the
/// one that lifted it (after a cancel).
pub async fn put_back(src: &mut Qmp, operator: u64) -> Result<(), QmpError> {
    set(src, operator).await
}

async fn set(src: &mut Qmp, bytes_per_sec: u64) -> Result<(), QmpError> {
    src.set_migration_parameter(PARAMETER, bytes_per_sec).await
}
