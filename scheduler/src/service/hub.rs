//! Wakes a node's assignment stream only when that node's assignments changed.
//!
//! Every applied Raft entry bumps the applied index; with one waiter per assignment stream on
//! that index, 10,000 nodes mean 10,000 task wake-ups per applied batch, each taking the state's
//! read lock to find that nothing changed for it — a storm that grows with nodes × entries and
//! starves the replica at scale. Instead one fan-out task per replica wakes on each applied batch,
//! compares every watched node's revision under a single read lock, and notifies only the nodes
//! whose revision moved (or that were removed).
//!
//! When many nodes moved at once (a burst placed on every node, or cancelled), the fan-out also
//! builds their messages itself, from one walk over the state, and leaves each for its stream to
//! take: a stream computing its own node's set walks every job's runs, so 10,000 streams woken
//! by one plan of 1,000,000 sandboxes walked the runs 10,000 times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use surge_proto::node as pn;
use tokio::sync::watch;

use super::Replica;
use crate::convert;
use crate::model::{JobId, JobSpec};
use crate::state::{Assignment, ClusterState};

/// The revision a removed node's watchers are woken with: no real revision reaches it.
pub const REMOVED: u64 = u64::MAX;
/// Nodes moved by one applied batch from which on the fan-out builds their messages.
pub const PREBUILD_NODES_MIN: usize = 64;

/// Per-node revision channels of one replica.
pub struct AssignmentHub {
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Messages the fan-out built, by node, until the node's stream takes them (at most one per
    /// watched node; dropped with the node's channel).
    prebuilt: Mutex<HashMap<String, pn::Assignments>>,
}

impl AssignmentHub {
    /// A hub fed by `replica`'s applied state. Its fan-out task ends when the hub is dropped or
    /// the replica stops applying.
    pub fn start(replica: Replica) -> Arc<Self> {
        let hub = Arc::new(AssignmentHub {
            watchers: Mutex::new(HashMap::new()),
            prebuilt: Mutex::new(HashMap::new()),
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

    fn prebuilt(&self) -> MutexGuard<'_, HashMap<String, pn::Assignments>> {
        self.prebuilt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The message the fan-out built for `node` at `revision` (the revision its watch was woken
    /// with), if it built one; the first stream of the node to ask takes it.
    pub fn take_prebuilt(&self, node: &str, revision: u64) -> Option<pn::Assignments> {
        let mut prebuilt = self.prebuilt();
        match prebuilt.get(node) {
            Some(m) if m.revision == revision => prebuilt.remove(node),
            _ => None,
        }
    }

    /// The watched nodes whose revision differs from what their watchers last saw, with the
    /// revision now ([`REMOVED`] for a node that left). Channels nobody listens to any more are
    /// dropped, with any message left for them.
    fn moved(&self, revision_of: impl Fn(&str) -> Option<u64>) -> Vec<(String, u64)> {
        let mut watchers = self.watchers();
        watchers.retain(|_, tx| tx.receiver_count() > 0);
        self.prebuilt()
            .retain(|node, _| watchers.contains_key(node));
        watchers
            .iter()
            .filter_map(|(node, tx)| {
                let now = revision_of(node).unwrap_or(REMOVED);
                (*tx.borrow() != now).then(|| (node.clone(), now))
            })
            .collect()
    }

    /// Wake the watchers of `moved` with their new revisions; returns how many were woken.
    fn wake(&self, moved: &[(String, u64)]) -> usize {
        let watchers = self.watchers();
        let mut woken = 0;
        for (node, now) in moved {
            let Some(tx) = watchers.get(node) else {
                continue;
            };
            woken += usize::from(tx.send_if_modified(|seen| {
                let moved = *seen != *now;
                *seen = *now;
                moved
            }));
        }
        woken
    }

    /// Compares every watched node's revision with what its watchers last saw and wakes those
    /// that moved; returns how many were woken.
    #[cfg(test)]
    fn notify(&self, revision_of: impl Fn(&str) -> Option<u64>) -> usize {
        let moved = self.moved(revision_of);
        self.wake(&moved)
    }

    /// Leave `messages` for their nodes' streams (replacing older ones).
    fn leave(&self, messages: Vec<(String, pn::Assignments)>) {
        self.prebuilt().extend(messages);
    }
}

/// What the fan-out reads under the state's lock to build many nodes' messages: their
/// assignments in one walk, and the specs of the jobs they name.
struct Gathered {
    assignments: BTreeMap<String, Vec<Assignment>>,
    specs: HashMap<JobId, JobSpec>,
}

fn gather(s: &ClusterState, moved: &[(String, u64)]) -> Gathered {
    let nodes: HashSet<&str> = moved
        .iter()
        .filter(|(_, r)| *r != REMOVED)
        .map(|(n, _)| n.as_str())
        .collect();
    let mut assignments = s.assignments();
    assignments.retain(|node, _| nodes.contains(node.as_str()));
    let mut specs = HashMap::new();
    for a in assignments.values().flatten() {
        if let (std::collections::hash_map::Entry::Vacant(e), Some(job)) =
            (specs.entry(a.job), s.jobs.get(&a.job))
        {
            e.insert(job.spec.clone());
        }
    }
    Gathered { assignments, specs }
}

/// The full set of every moved node, as [`convert::assignments_to_pb`] would build it from the
/// same state (a node without assignments gets the empty set).
fn build(moved: &[(String, u64)], mut g: Gathered) -> Vec<(String, pn::Assignments)> {
    moved
        .iter()
        .filter(|(_, r)| *r != REMOVED)
        .map(|(node, revision)| {
            let sandboxes = g
                .assignments
                .remove(node)
                .unwrap_or_default()
                .iter()
                .filter_map(|a| Some(convert::assignment_to_pb(a, g.specs.get(&a.job)?)))
                .collect();
            let message = pn::Assignments {
                revision: *revision,
                full: true,
                sandboxes,
                removed: Vec::new(),
            };
            (node.clone(), message)
        })
        .collect()
}

/// Run `f`, which may take a while (a million sandboxes), without holding up the other tasks of
/// this worker thread (a multi-threaded runtime hands them to another).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

async fn fan_out(hub: Weak<AssignmentHub>, replica: Replica) {
    let mut applied = replica.subscribe_applied();
    while applied.changed().await.is_ok() {
        let Some(hub) = hub.upgrade() else { return };
        // One read lock for all watched nodes; the hub's locks are never taken the other way
        // round. What many moved nodes need is gathered under it; their messages are built
        // after it is released, and left for the streams before they are woken.
        let (moved, gathered) = replica.read(|s, _| {
            let moved = hub.moved(|node| s.nodes.get(node).map(|n| n.revision));
            let gathered =
                (moved.len() >= PREBUILD_NODES_MIN).then(|| blocking(|| gather(s, &moved)));
            (moved, gathered)
        });
        if let Some(g) = gathered {
            hub.leave(blocking(|| build(&moved, g)));
        }
        hub.wake(&moved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> AssignmentHub {
        AssignmentHub {
            watchers: Mutex::new(HashMap::new()),
            prebuilt: Mutex::new(HashMap::new()),
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
    fn prebuilt_messages_are_what_each_stream_would_build() {
        use crate::command::Command;
        use crate::placement::{self, PlacementParams};
        use crate::state::tests::{node, spec};
        let mut s = ClusterState::default();
        for i in 0..5u64 {
            let node = node(&format!("n{i}"), 8);
            s.apply_command(i + 1, Command::RegisterNode { node, at_ms: 1 });
        }
        let submit = Command::SubmitJob {
            spec: spec(30, "t"),
            idempotency_key: "k".into(),
            at_ms: 1,
        };
        s.apply_command(6, submit);
        let plan = placement::place(&s.placement_input(7, PlacementParams::default()));
        let reasons = Vec::new();
        s.apply_command(
            7,
            Command::ApplyPlan {
                plan,
                reasons,
                at_ms: 1,
            },
        );

        let moved: Vec<(String, u64)> = s
            .nodes
            .values()
            .map(|n| (n.spec.id.clone(), n.revision))
            .chain([("gone".to_owned(), REMOVED)])
            .collect();
        let built = build(&moved, gather(&s, &moved));
        assert_eq!(built.len(), 5, "one message per node still there");
        let mut sizes = Vec::new();
        for (node, m) in &built {
            assert_eq!(
                *m,
                convert::assignments_to_pb(&s, node, m.revision),
                "{node}"
            );
            sizes.push(m.sandboxes.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 30);
        assert!(
            sizes.contains(&0),
            "an empty node gets the empty set: {sizes:?}"
        );
    }

    #[test]
    fn a_prebuilt_message_is_taken_once_at_its_revision() {
        let hub = hub();
        let rx = hub.subscribe("a");
        let message = |revision| pn::Assignments {
            revision,
            full: true,
            ..Default::default()
        };
        hub.leave(vec![("a".to_owned(), message(5))]);
        assert!(
            hub.take_prebuilt("a", 4).is_none(),
            "not the revision woken for"
        );
        assert_eq!(hub.take_prebuilt("a", 5), Some(message(5)));
        assert!(hub.take_prebuilt("a", 5).is_none(), "taken once");
        hub.leave(vec![("a".to_owned(), message(6))]);
        drop(rx);
        hub.moved(|_| Some(7));
        assert!(hub.prebuilt().is_empty(), "dropped with the node's channel");
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
