//! Which live nodes hold which sandbox, sampled while a real-process run goes on, for the
//! `one_live_node_per_sandbox` checker.
//!
//! Two sources, because each can show a double run the other cannot:
//!
//! * **Assignments**, from one replica: the full desired set of every live node (the first
//!   message of `WatchAssignments` from revision 0, exactly what the node daemon itself reads).
//!   This is where a scheduler bug shows: one run placed on two nodes, or a sandbox moved to a
//!   new node while the old one is still live. It covers the simulated nodes, whose sandboxes
//!   exist only inside their daemon process.
//! * **Running copies**, from the container daemons' hosts: the containers crun holds (see
//!   [`surge_harness::containers::running_copies`]). This is where a node bug shows: a daemon that comes
//!   back after a freeze or a crash and goes on running a sandbox that the scheduler has given to
//!   another node meanwhile. The scheduler's state cannot show that (it names one node per
//!   sandbox), only the hosts can.
//!
//! The per-node reads are not one atomic snapshot: a sandbox that moves from node A to node B
//! between the read of A and the read of B shows on both. Every move bumps the sandbox's
//! generation, though, so [`live_holders`] counts as a double only two live nodes holding the
//! *newest* generation seen, and lists an older generation still held by a live node as a stale
//! copy, which the checker allows for a grace (the returning node stops it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use surge_proto::node::WatchAssignmentsRequest;

use crate::history::{NodeSample, SandboxHolders, StaleCopy};
use surge_client::open as client;

/// Longest one node's assignment read may take.
pub const ASSIGNMENTS_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Most live nodes one sample reads the assignments of.
pub const SAMPLE_NODES_MAX: usize = 1024;
/// Assignment reads one sample has in flight at once.
pub const READS_AT_ONCE: usize = 32;

/// A node holding one run of a sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    pub node: String,
    pub job: u64,
    pub index: u32,
    pub generation: u64,
    /// `true`: seen running on the node's host; `false`: in the node's desired set.
    pub running: bool,
}

/// What one sample shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holders {
    /// Holdings on live nodes that were looked at.
    pub checked: u64,
    /// Of those, runs seen running on a host (not only in a desired set).
    pub running: u64,
    /// Sandboxes whose newest run is held by more than one live node.
    pub doubles: Vec<SandboxHolders>,
    /// Older runs still running on a live node while another live node holds a newer one.
    pub stale: Vec<StaleCopy>,
}

/// Whether a node in this state counts as live: it may run what it is assigned.
pub fn is_live(state: &str) -> bool {
    matches!(state, "ready" | "draining")
}

/// Judge one sample: `live` nodes (as a replica sees them) and what every node holds. Holdings
/// on nodes that are not live are ignored (a node marked down has lost its work, even if its
/// host still runs it).
pub fn live_holders(live: &BTreeSet<String>, holdings: &[Holding]) -> Holders {
    let mut by_sandbox: BTreeMap<(u64, u32), Vec<&Holding>> = BTreeMap::new();
    let mut checked = 0u64;
    let mut running = 0u64;
    for h in holdings.iter().filter(|h| live.contains(&h.node)) {
        checked += 1;
        running += u64::from(h.running);
        by_sandbox.entry((h.job, h.index)).or_default().push(h);
    }
    let mut out = Holders {
        checked,
        running,
        ..Holders::default()
    };
    for ((job, index), hs) in by_sandbox {
        let newest = hs.iter().map(|h| h.generation).max().unwrap_or(0);
        let holders: BTreeSet<&str> = hs
            .iter()
            .filter(|h| h.generation == newest)
            .map(|h| h.node.as_str())
            .collect();
        if holders.len() > 1 {
            out.doubles.push(SandboxHolders {
                job,
                index,
                nodes: holders.iter().map(|n| n.to_string()).collect(),
            });
        }
        // An older run in a desired set is the read skew described above; only one that really
        // runs on a live node other than the newest run's holders is a stale copy.
        let stale: BTreeSet<StaleCopy> = hs
            .iter()
            .filter(|h| h.running && h.generation < newest && !holders.contains(h.node.as_str()))
            .map(|h| StaleCopy {
                node: h.node.clone(),
                job,
                index,
                generation: h.generation,
            })
            .collect();
        out.stale.extend(stale);
    }
    out
}

/// The live nodes of a `ListNodes` read.
pub fn live_nodes(nodes: &[NodeSample]) -> BTreeSet<String> {
    nodes
        .iter()
        .filter(|n| is_live(&n.state))
        .map(|n| n.id.clone())
        .collect()
}

/// The desired set of every node in `nodes`, as replica `addr` serves it to the node daemon:
/// up to [`READS_AT_ONCE`] reads at a time over one connection, so a sample of a few dozen
/// nodes takes about one round trip, not one per node.
pub async fn assigned(addr: &str, nodes: &BTreeSet<String>) -> Result<Vec<Holding>, String> {
    if nodes.len() > SAMPLE_NODES_MAX {
        return Err(format!(
            "{} live nodes; a sample reads at most {SAMPLE_NODES_MAX}",
            nodes.len()
        ));
    }
    let c = client::nodes(addr).map_err(|e| e.to_string())?;
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE));
    let mut reads = tokio::task::JoinSet::new();
    for node in nodes {
        let (mut c, node, permits) = (c.clone(), node.clone(), permits.clone());
        reads.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            let read = async {
                let mut stream = c
                    .watch_assignments(WatchAssignmentsRequest {
                        node_id: node.clone(),
                        from_revision: 0,
                    })
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                stream
                    .message()
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .ok_or_else(|| "the stream ended before the full set".to_string())
            };
            let set = tokio::time::timeout(ASSIGNMENTS_READ_TIMEOUT, read)
                .await
                .map_err(|_| {
                    format!("no assignments of node {node} within {ASSIGNMENTS_READ_TIMEOUT:?}")
                })?
                .map_err(|e| format!("assignments of node {node}: {e}"))?;
            Ok::<_, String>(
                set.sandboxes
                    .iter()
                    .map(|s| Holding {
                        node: node.clone(),
                        job: s.job_id,
                        index: s.index,
                        generation: s.generation,
                        running: false,
                    })
                    .collect::<Vec<_>>(),
            )
        });
    }
    let mut out = Vec::new();
    while let Some(r) = reads.join_next().await {
        // The first failure ends the sample; dropping the set aborts the other reads.
        out.extend(r.map_err(|e| format!("an assignment read ended abnormally: {e}"))??);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker;
    use crate::history::{EventType, History, Op, Process};

    fn h(node: &str, job: u64, index: u32, generation: u64, running: bool) -> Holding {
        Holding {
            node: node.into(),
            job,
            index,
            generation,
            running,
        }
    }

    fn live(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn one_holder_per_sandbox_is_clean() {
        let hs = [
            h("a", 1, 0, 0, false),
            h("a", 1, 0, 0, true),
            h("b", 1, 1, 0, false),
            h("b", 2, 0, 3, true),
        ];
        let got = live_holders(&live(&["a", "b"]), &hs);
        assert_eq!(
            got,
            Holders {
                checked: 4,
                running: 2,
                ..Holders::default()
            }
        );
    }

    #[test]
    fn a_run_on_two_live_nodes_is_a_double() {
        // Planted: the scheduler assigns 7.2 to b while a, live, still holds it (same run).
        let hs = [h("a", 7, 2, 1, false), h("b", 7, 2, 1, false)];
        let got = live_holders(&live(&["a", "b"]), &hs);
        assert_eq!(
            got.doubles,
            vec![SandboxHolders {
                job: 7,
                index: 2,
                nodes: vec!["a".into(), "b".into()],
            }]
        );
        // Planted: a host runs the run another live node is assigned.
        let hs = [h("a", 7, 2, 1, true), h("b", 7, 2, 1, false)];
        assert_eq!(live_holders(&live(&["a", "b"]), &hs).doubles.len(), 1);
        // The same on a node marked down is no double: its work is gone from the scheduler.
        assert!(live_holders(&live(&["b"]), &hs).doubles.is_empty());
    }

    #[test]
    fn an_older_run_on_a_live_node_is_a_stale_copy_not_a_double() {
        // a came back from a freeze still running generation 0; b holds generation 1.
        let hs = [
            h("a", 7, 2, 0, true),
            h("b", 7, 2, 1, false),
            h("b", 7, 2, 1, true),
        ];
        let got = live_holders(&live(&["a", "b"]), &hs);
        assert!(got.doubles.is_empty());
        assert_eq!(
            got.stale,
            vec![StaleCopy {
                node: "a".into(),
                job: 7,
                index: 2,
                generation: 0,
            }]
        );
        // An older run in a desired set is read skew (a moved between two reads), not a copy.
        let skew = [h("a", 7, 2, 0, false), h("b", 7, 2, 1, false)];
        assert_eq!(
            live_holders(&live(&["a", "b"]), &skew),
            Holders {
                checked: 2,
                ..Holders::default()
            }
        );
        assert_eq!(got.running, 2);
        // A node replacing its own run (superseded) is one node.
        let own = [h("a", 7, 2, 0, true), h("a", 7, 2, 1, false)];
        assert!(live_holders(&live(&["a"]), &own).stale.is_empty());
    }

    /// The sampling path end to end: samples judged by `live_holders`, recorded as the harness
    /// records them, judged by the checker. A stale copy is allowed for the grace, not beyond.
    #[test]
    fn samples_reach_the_checker() {
        let sample = |holders: Holders| Op::ReadAssignments {
            replica: 1,
            checked: holders.checked,
            running: holders.running,
            doubles: holders.doubles,
            stale: holders.stale,
        };
        let nodes = live(&["a", "b"]);
        let clean = live_holders(&nodes, &[h("a", 7, 2, 1, true)]);
        let returning = live_holders(&nodes, &[h("a", 7, 2, 0, true), h("b", 7, 2, 1, false)]);
        let double = live_holders(&nodes, &[h("a", 7, 2, 1, true), h("b", 7, 2, 1, false)]);
        let judge = |events: Vec<(u64, Op)>| {
            let h = History::from_events(
                events
                    .into_iter()
                    .map(|(t, op)| (t, Process::Sampler, EventType::Ok, op))
                    .collect(),
            );
            checker::one_live_node_per_sandbox(&h)
        };
        let grace = checker::STALE_COPY_GRACE_MS;
        // Stopped within the grace.
        assert_eq!(
            judge(vec![
                (1_000, sample(returning.clone())),
                (1_000 + grace, sample(returning.clone())),
                (2_000 + grace, sample(clean.clone())),
            ]),
            None
        );
        // Never stopped.
        let v = judge(vec![
            (1_000, sample(returning.clone())),
            (2_000, sample(returning.clone())),
            (2_000 + grace, sample(returning)),
        ])
        .expect("a copy kept past the grace");
        assert_eq!(v.count, 1);
        assert!(v.message.contains("live node a"), "{}", v.message);
        // A double at once.
        let v = judge(vec![(1_000, sample(clean)), (1_500, sample(double))]).expect("double");
        assert!(v.message.contains("7.2"), "{}", v.message);
        assert_eq!(v.counterexample["time_ms"], 1_500);
    }
}
