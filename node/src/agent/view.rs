//! The node's view of its sandboxes: the reconciler's `observed` input.
//!
//! Seeded from `Runtime::list()` when the daemon starts, then kept current by the owner tasks (each
//! writes what its runtime call returned) and, ahead of them, by the agent loop, which records the
//! expected effect of an action when it hands the action to an owner (`Starting` after a start, the
//! new limits after a resize). That keeps the next reconcile pass from asking for the same thing
//! again while the owner is still busy. The owner's write after the call is the truth and wins.
//!
//! A plain mutex: every critical section is a map operation, never an await.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::reconcile::{ObservedSandbox, ObservedState, Resources, SandboxId};

#[derive(Default)]
pub struct View {
    sandboxes: Mutex<BTreeMap<SandboxId, ObservedSandbox>>,
    /// Woken on every change an owner makes: the agent loop runs a reconcile pass.
    pub changed: Notify,
}

impl View {
    pub fn new(observed: Vec<ObservedSandbox>) -> Self {
        Self {
            sandboxes: Mutex::new(observed.into_iter().map(|o| (o.id, o)).collect()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<SandboxId, ObservedSandbox>> {
        // Plain data behind the lock: a panic elsewhere cannot leave it half-updated.
        self.sandboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn snapshot(&self) -> Vec<ObservedSandbox> {
        self.lock().values().cloned().collect()
    }

    /// Visit every sandbox in id order, without copying them (under the lock: `f` must be quick).
    pub fn for_each(&self, mut f: impl FnMut(&ObservedSandbox)) {
        for o in self.lock().values() {
            f(o);
        }
    }

    pub fn get(&self, id: SandboxId) -> Option<ObservedSandbox> {
        self.lock().get(&id).cloned()
    }

    /// Insert or replace, unless the view already holds a newer incarnation of the id.
    pub fn upsert(&self, o: ObservedSandbox) {
        {
            let mut map = self.lock();
            if map
                .get(&o.id)
                .is_some_and(|old| old.generation > o.generation)
            {
                return;
            }
            map.insert(o.id, o);
        }
        self.changed.notify_one();
    }

    /// Change the entry of incarnation `(id, generation)`, if it is the one held.
    pub fn update(&self, id: SandboxId, generation: u64, f: impl FnOnce(&mut ObservedSandbox)) {
        let changed = match self.lock().get_mut(&id) {
            Some(o) if o.generation == generation => {
                f(o);
                true
            }
            _ => false,
        };
        if changed {
            self.changed.notify_one();
        }
    }

    /// Remove the entry of incarnation `(id, generation)`, if it is the one held.
    pub fn remove(&self, id: SandboxId, generation: u64) -> Option<ObservedSandbox> {
        let mut map = self.lock();
        if map.get(&id).is_some_and(|o| o.generation == generation) {
            return map.remove(&id);
        }
        None
    }

    /// Live sandboxes (not terminal) and their limits.
    pub fn live(&self) -> Vec<(SandboxId, ObservedState, Resources)> {
        self.lock()
            .values()
            .filter(|o| !o.state.is_terminal())
            .map(|o| (o.id, o.state.clone(), o.resources))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(index: u32, generation: u64, state: ObservedState) -> ObservedSandbox {
        ObservedSandbox {
            id: SandboxId::new(1, index),
            generation,
            revision: 1,
            state,
            resources: Resources::default(),
            owned: false,
        }
    }

    #[test]
    fn older_incarnations_never_overwrite_newer_ones() {
        let v = View::new(vec![o(0, 2, ObservedState::Running)]);
        v.upsert(o(0, 1, ObservedState::Exited { code: 0 }));
        assert_eq!(v.get(SandboxId::new(1, 0)).map(|x| x.generation), Some(2));
        v.update(SandboxId::new(1, 0), 1, |x| x.state = ObservedState::Paused);
        assert_eq!(
            v.get(SandboxId::new(1, 0)).map(|x| x.state),
            Some(ObservedState::Running)
        );
        assert!(v.remove(SandboxId::new(1, 0), 1).is_none());
        v.upsert(o(1, 1, ObservedState::OomKilled));
        assert_eq!(v.live().len(), 1);
        assert!(v.remove(SandboxId::new(1, 0), 2).is_some());
        assert_eq!(v.snapshot().len(), 1);
    }
}
