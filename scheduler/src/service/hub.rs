//! Wakes a node's assignment stream only when that node's assignments changed.
//!
//! Every applied Raft entry bumps the applied index; with one waiter per assignment stream on
//! that index, 10,000 nodes mean 10,000 task wake-ups per applied batch, each taking the state's
//! read lock to find that nothing changed for it — a storm that grows with nodes × entries and
//! starves the replica at scale. Instead one fan-out task per replica wakes on each applied batch,
//! compares every watched node's revision under a single read lock, and notifies only the nodes
//! whose revision moved (or that were removed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::watch;

use super::Replica;

/// The revision a removed node's watchers are woken with: no real revision reaches it.
pub const REMOVED: u64 = u64::MAX;

/// Per-node revision channels of one replica.
pub struct AssignmentHub {
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl AssignmentHub {
    /// A hub fed by `replica`'s applied state. Its fan-out task ends when the hub is dropped or
    /// the replica stops applying.
    pub fn start(replica: Replica) -> Arc<Self> {
        let hub = Arc::new(AssignmentHub {
            watchers: Mutex::new(HashMap::new()),
        });
        tokio::spawn(fan_out(Arc::downgrade(&hub), replica));
        hub
    }

    fn watchers(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver that changes whenever `node`'s revision does (to [`REMOVED`] when the node
    /// leaves the state). Its first value is the revision the hub last saw, possibly stale:
    /// callers read the state before they wait.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        let mut watchers = self.watchers();
        match watchers.get(node) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                watchers.insert(node.to_string(), tx);
                rx
            }
        }
    }

    /// Compares every watched node's revision with what its watchers last saw; returns how many
    /// were notified. Channels nobody listens to any more are dropped.
    fn notify(&self, revision_of: impl Fn(&str) -> Option<u64>) -> usize {
        let mut watchers = self.watchers();
        watchers.retain(|_, tx| tx.receiver_count() > 0);
        let mut woken = 0;
        for (node, tx) in watchers.iter() {
            let now = revision_of(node).unwrap_or(REMOVED);
            let moved = tx.send_if_modified(|seen| {
                let moved = *seen != now;
                *seen = now;
                moved
            });
            woken += usize::from(moved);
        }
        woken
    }
}

async fn fan_out(hub: Weak<AssignmentHub>, replica: Replica) {
    let mut applied = replica.subscribe_applied();
    while applied.changed().await.is_ok() {
        let Some(hub) = hub.upgrade() else { return };
        // One read lock for all watched nodes; the hub's lock is never taken the other way round.
        replica.read(|s, _| hub.notify(|node| s.nodes.get(node).map(|n| n.revision)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> AssignmentHub {
        AssignmentHub {
            watchers: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn only_nodes_whose_revision_moved_are_woken() {
        let hub = hub();
        let mut a = hub.subscribe("a");
        let mut b = hub.subscribe("b");
        let revisions = HashMap::from([("a", 5u64), ("b", 7)]);
        assert_eq!(hub.notify(|n| revisions.get(n).copied()), 2);
        assert!(a.has_changed().expect("open") && b.has_changed().expect("open"));
        assert_eq!(*a.borrow_and_update(), 5);
        assert_eq!(*b.borrow_and_update(), 7);

        let revisions = HashMap::from([("a", 6u64), ("b", 7)]);
        assert_eq!(hub.notify(|n| revisions.get(n).copied()), 1);
        assert!(a.has_changed().expect("open"));
        assert!(!b.has_changed().expect("open"), "b did not change");
    }

    #[test]
    fn a_removed_node_is_woken_with_removed() {
        let hub = hub();
        let mut a = hub.subscribe("a");
        assert_eq!(hub.notify(|_| None), 1);
        assert_eq!(*a.borrow_and_update(), REMOVED);
    }

    #[test]
    fn channels_without_listeners_are_dropped_and_shared_otherwise() {
        let hub = hub();
        let first = hub.subscribe("a");
        let mut second = hub.subscribe("a");
        assert_eq!(hub.watchers().len(), 1, "one channel per node");
        drop(first);
        assert_eq!(hub.notify(|_| Some(3)), 1);
        assert_eq!(*second.borrow_and_update(), 3);
        drop(second);
        hub.notify(|_| Some(4));
        assert!(hub.watchers().is_empty());
    }
}
