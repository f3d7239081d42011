//! The fault schedule of a simulated run: inject crashes, partitions, network trouble and node
//! failures at random, and heal them when due.

use std::sync::Arc;
use std::time::Duration;

use surge_raft::types::NodeId;

use super::{lock, node_id, Sim};
use crate::history::{EventType, Op, Process};
use crate::sim::net::Conditions;
use crate::sim::SimError;

impl Sim {
    /// The fault schedule: until the fault phase ends, every 0.3–1.5 s heal what is due and
    /// maybe inject one more fault.
    pub(super) async fn faults(self: &Arc<Self>) -> Result<(), SimError> {
        let end = self.cfg.fault_phase_ms;
        // (due time, what to undo)
        let mut due: Vec<(u64, Heal)> = Vec::new();
        loop {
            let wait = self.rng(|r| r.range(300, 1_500));
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let now = self.world.now_ms();
            let (ready, later): (Vec<_>, Vec<_>) = due.into_iter().partition(|(t, _)| *t <= now);
            due = later;
            for (_, h) in ready {
                self.undo(h).await?;
            }
            if now >= end {
                break;
            }
            let crashed = (1..=self.cfg.replicas)
                .filter(|id| self.world.raft(*id).is_none())
                .count();
            let partitioned = !self.world.conditions().sides.is_empty();
            let kind = self.rng(|r| r.range(0, 8));
            let hold = self.rng(|r| r.range(500, 4_000));
            match kind {
                0 | 1 if crashed == 0 => {
                    let target = if kind == 1 {
                        self.leader().unwrap_or(1)
                    } else {
                        self.random_replica()
                    };
                    self.fault(
                        "crash",
                        &target.to_string(),
                        &format!("restart after {hold} ms"),
                    );
                    self.crash_replica(target).await;
                    due.push((now + hold, Heal::Restart(target)));
                }
                2 | 3 if !partitioned => {
                    let mut c = self.world.conditions();
                    let (what, isolated) = if kind == 2 {
                        ("leader isolated", vec![self.leader().unwrap_or(1)])
                    } else {
                        // A random minority (one of 3, one or two of 5) against the rest.
                        let n = self.cfg.replicas;
                        let size = self.rng(|r| r.range(1, (n - 1) / 2 + 1));
                        let mut ids: Vec<NodeId> = (1..=n).collect();
                        let mut minority = Vec::new();
                        for _ in 0..size {
                            let i = self.rng(|r| r.index(ids.len()));
                            minority.push(ids.remove(i));
                        }
                        ("minority/majority", minority)
                    };
                    for id in &isolated {
                        c.sides.insert(*id, 1);
                    }
                    self.fault(
                        "partition",
                        &format!("{isolated:?}"),
                        &format!("{what} for {hold} ms"),
                    );
                    self.world.set_conditions(c);
                    due.push((now + hold, Heal::Partition));
                }
                4 => {
                    let mut c = self.world.conditions();
                    c.loss_per_mille = self.rng(|r| r.range(50, 300));
                    c.delay_ms = (1, self.rng(|r| r.range(10, 120)));
                    self.fault(
                        "loss",
                        "network",
                        &format!(
                            "{} per mille lost, delays up to {} ms, for {hold} ms",
                            c.loss_per_mille, c.delay_ms.1
                        ),
                    );
                    self.world.set_conditions(c);
                    due.push((now + hold, Heal::Network));
                }
                5 | 6 => {
                    let i = self.rng(|r| r.range(0, u64::from(self.cfg.nodes)));
                    let node = node_id(u32::try_from(i).unwrap_or(0));
                    let hold = hold + self.rng(|r| r.range(0, self.cfg.node_ttl_ms));
                    let was_up = {
                        let mut d = lock(&self.daemons);
                        match d.get_mut(&node) {
                            Some(daemon) if daemon.up => {
                                daemon.up = false;
                                daemon.sandboxes = 0;
                                true
                            }
                            _ => false,
                        }
                    };
                    if was_up {
                        self.fault("node", &node, &format!("daemon down for {hold} ms"));
                        due.push((now + hold, Heal::Node(node)));
                    }
                }
                _ => {}
            }
        }
        for (_, h) in due {
            self.undo(h).await?;
        }
        Ok(())
    }

    fn fault(&self, kind: &str, target: &str, detail: &str) {
        self.world.trace(&format!("fault {kind} {target} {detail}"));
        self.record(
            Process::Faults,
            EventType::Invoke,
            Op::Fault {
                kind: kind.into(),
                target: target.into(),
                detail: detail.into(),
            },
        );
    }

    async fn undo(self: &Arc<Self>, h: Heal) -> Result<(), SimError> {
        self.world.trace(&format!("heal {h:?}"));
        match h {
            Heal::Restart(id) => {
                if self.world.raft(id).is_none() {
                    self.open_replica(id).await?;
                }
            }
            Heal::Partition => {
                let mut c = self.world.conditions();
                c.sides.clear();
                self.world.set_conditions(c);
            }
            Heal::Network => {
                let mut c = self.world.conditions();
                c.loss_per_mille = 0;
                c.delay_ms = Conditions::default().delay_ms;
                self.world.set_conditions(c);
            }
            Heal::Node(node) => {
                if let Some(d) = lock(&self.daemons).get_mut(&node) {
                    d.up = true;
                }
            }
        }
        Ok(())
    }

    /// Everything back: every replica running, no partition or loss, every daemon up.
    pub(super) async fn heal(self: &Arc<Self>) -> Result<(), SimError> {
        for id in 1..=self.cfg.replicas {
            self.undo(Heal::Restart(id)).await?;
        }
        self.undo(Heal::Partition).await?;
        self.undo(Heal::Network).await?;
        for i in 0..self.cfg.nodes {
            self.undo(Heal::Node(node_id(i))).await?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Heal {
    Restart(NodeId),
    Partition,
    Network,
    Node(String),
}
