//! Which sandboxes were used (an exec or a file call) since the scheduler last heard of it: the
//! input of idle timeouts. The I/O service touches a sandbox on every call; the reporter takes
//! the set now and then and tells the leader, which records the time by its own clock in the
//! replicated state (see `docs/ARCHITECTURE.md`, "Lifetimes").

use std::collections::HashSet;
use std::sync::Mutex;

use crate::runtime::SandboxId;

/// Distinct sandboxes remembered between two takes, at most (a node holds far fewer; past
/// this, touches are dropped until the next take, which only delays an idle clock's reset).
pub const ACTIVITY_MAX: usize = 1_000_000;

#[derive(Debug, Default)]
pub struct Activity {
    touched: Mutex<HashSet<SandboxId>>,
}

impl Activity {
    pub fn touch(&self, id: SandboxId) {
        let mut set = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() < ACTIVITY_MAX {
            set.insert(id);
        }
    }

    /// The sandboxes touched since the last take, sorted.
    pub fn take(&self) -> Vec<SandboxId> {
        let set = std::mem::take(&mut *self.touched.lock().unwrap_or_else(|p| p.into_inner()));
        let mut ids: Vec<SandboxId> = set.into_iter().collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_are_taken_once() {
        let a = Activity::default();
        a.touch(SandboxId::new(2, 0));
        a.touch(SandboxId::new(1, 3));
        a.touch(SandboxId::new(2, 0));
        assert_eq!(a.take(), vec![SandboxId::new(1, 3), SandboxId::new(2, 0)]);
        assert!(a.take().is_empty());
    }
}
