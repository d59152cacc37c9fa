//! Registered migrations: the libvirt path. libvirt issues `migrate-incoming` itself, so the
//! target agent cannot hand its QEMU a channel; instead the operator (a libvirt hook, or
//! `agent expect`) registers on the target host which VM is expected and where its QEMU
//! listens. A source naming that VM is then delivered there, and only there. A registration
//! made over the control socket serves one migration and expires; one given to `agent serve
//! --expect` stands for the daemon's life (static set-ups, scripts).
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{policy::Incoming, DeliveryError};

/// Registrations held at most; one more is refused.
pub const MAX_EXPECTED: usize = 1024;

#[derive(Debug)]
struct Expected {
    incoming: Incoming,
    /// `None`: standing (not consumed, never expires).
    until: Option<Instant>,
}

/// The registrations, by VM name.
#[derive(Debug, Default)]
pub struct Expectations {
    by_vm: Mutex<HashMap<String, Expected>>,
}

impl Expectations {
    /// Registers `vm`'s incoming address for one migration within `ttl` (`None`: standing).
    pub fn register(
        &self,
        vm: &str,
        incoming: Incoming,
        ttl: Option<Duration>,
    ) -> Result<(), DeliveryError> {
        super::check_vm_name(vm)?;
        let mut by_vm = self.by_vm.lock().expect("not poisoned");
        let now = Instant::now();
        by_vm.retain(|_, e| e.until.is_none_or(|u| u > now));
        if by_vm.len() >= MAX_EXPECTED && !by_vm.contains_key(vm) {
            return Err(DeliveryError::TooManyExpected);
        }
        let until = ttl.map(|t| now + t);
        by_vm.insert(vm.to_string(), Expected { incoming, until });
        Ok(())
    }

    /// The address registered for `vm`, if any and not expired; a one-migration registration
    /// is used up.
    pub fn take(&self, vm: &str) -> Option<Incoming> {
        let mut by_vm = self.by_vm.lock().expect("not poisoned");
        let e = by_vm.get(vm)?;
        match e.until {
            None => Some(e.incoming.clone()),
            Some(until) => {
                let e = by_vm.remove(vm).expect("just found");
                (until > Instant::now()).then_some(e.incoming)
            }
        }
    }

    /// (VM, address, seconds left or `None` for standing), for status output.
    pub fn list(&self) -> Vec<(String, Incoming, Option<u64>)> {
        let by_vm = self.by_vm.lock().expect("not poisoned");
        let now = Instant::now();
        let mut out: Vec<_> = by_vm
            .iter()
            .filter(|(_, e)| e.until.is_none_or(|u| u > now))
            .map(|(vm, e)| {
                let left = e.until.map(|u| (u - now).as_secs());
                (vm.clone(), e.incoming.clone(), left)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(port: u16) -> Incoming {
        Incoming::Tcp(format!("127.0.0.1:{port}"))
    }

    #[test]
    fn one_migration_registrations_are_used_once_and_expire() {
        let e = Expectations::default();
        e.register("vm1", tcp(1), Some(Duration::from_secs(60)))
            .unwrap();
        e.register("vm2", tcp(2), Some(Duration::ZERO)).unwrap();
        e.register("vm3", tcp(3), None).unwrap();
        assert_eq!(e.take("vm1"), Some(tcp(1)));
        assert_eq!(e.take("vm1"), None, "used up");
        assert_eq!(e.take("vm2"), None, "expired");
        assert_eq!(e.take("vm3"), Some(tcp(3)));
        assert_eq!(e.take("vm3"), Some(tcp(3)), "standing");
        assert_eq!(e.take("other"), None);
        assert_eq!(e.list().len(), 1);
    }

    #[test]
    fn names_are_checked_and_the_table_is_bounded() {
        let e = Expectations::default();
        assert!(e.register("../etc", tcp(1), None).is_err());
        for i in 0..MAX_EXPECTED {
            e.register(&format!("vm{i}"), tcp(1), None).unwrap();
        }
        assert!(matches!(
            e.register("one-more", tcp(1), None),
            Err(DeliveryError::TooManyExpected)
        ));
        // Replacing an existing registration is not one more.
        e.register("vm0", tcp(2), None).unwrap();
    }
}
