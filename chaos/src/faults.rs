//! Faults on a seeded schedule, and the injector that carries them out on a [`LocalCluster`].
//!
//! The schedule is a pure function of the seed, the fault kinds and the duration: which kind comes
//! when, how long it holds, and whether it aims at the leader or at a follower. Who the leader is
//! at that moment is the cluster's business, so the injector resolves targets when it acts and
//! records what it did in the history. One fault is active at a time; after healing one, the
//! injector waits for the cluster to agree on a leader again (and, after a wipe, for the wiped
//! replica to be a voter again) before the next, so that every fault hits a healthy cluster.

use std::time::{Duration, Instant};

use crate::history::{EventType, Op, Process, Recorder};
use surge_harness::cluster::{LocalCluster, StartMode};
use surge_harness::netns::Topology;

/// `k` as an index into `len` items: `k % len` (0 when `len` is 0).
pub fn index_of(k: u64, len: usize) -> usize {
    match k.checked_rem(len as u64) {
        // The remainder is below `len`, a usize.
        Some(i) => usize::try_from(i).unwrap_or(0),
        None => 0,
    }
}

/// A small deterministic PRNG (splitmix64, Steele et al. 2014): no global RNG anywhere, so a seed
/// names one schedule and one workload.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `0..len` (0 when `len` is 0): an index into `len` items. Draws exactly what
    /// `below(len)` draws, so a seed's schedule is unchanged.
    pub fn index(&mut self, len: usize) -> usize {
        let k = self.below(len as u64);
        index_of(k, len)
    }

    /// Uniform in `lo..=hi` for small counts (sandboxes of a job).
    pub fn range_u32(&mut self, lo: u32, hi: u32) -> u32 {
        let v = self.range(lo.into(), hi.into());
        // `v <= hi`, a u32.
        u32::try_from(v).unwrap_or(hi)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// An independent stream for `what` (a client, the schedule), derived from this seed.
    pub fn fork(seed: u64, what: u64) -> Self {
        let mut r = Rng(seed ^ what.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// `kill -9` of the leader or a follower; restarted on its data dir after the hold.
    Kill,
    /// SIGSTOP of the leader or a follower; SIGCONT after the hold.
    Pause,
    /// SIGTERM and an immediate restart on the data dir.
    Restart,
    /// `kill -9`, data dir deleted, started again with `--join`.
    Wipe,
    /// `kill -9` of a node daemon process (a group of simulated nodes, or a container node),
    /// restarted after the hold; or SIGSTOP of a container node's daemon, SIGCONT after it.
    Nodes,
    /// Replica-to-replica links cut (leader isolated, majority/minority, bridge); healed after
    /// the hold. Needs the replicas on network namespaces ([`surge_harness::netns`]).
    Partition,
}

pub const FAULT_KINDS: &[FaultKind] = &[
    FaultKind::Kill,
    FaultKind::Pause,
    FaultKind::Restart,
    FaultKind::Wipe,
    FaultKind::Nodes,
    FaultKind::Partition,
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Restart => "restart",
            FaultKind::Wipe => "wipe",
            FaultKind::Nodes => "nodes",
            FaultKind::Partition => "partition",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FaultsError {
    #[error("unknown fault kind {0:?}: expected kill, pause, restart, wipe, nodes or partition")]
    UnknownKind(String),
}

/// Parse `kill,pause,restart,wipe,nodes,partition` (any subset; `all` for every kind; empty for none).
pub fn parse_kinds(spec: &str) -> Result<Vec<FaultKind>, FaultsError> {
    let mut kinds = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "all" {
            kinds.extend_from_slice(FAULT_KINDS);
            continue;
        }
        let kind = FAULT_KINDS
            .iter()
            .copied()
            .find(|k| k.name() == part)
            .ok_or_else(|| FaultsError::UnknownKind(part.to_string()))?;
        kinds.push(kind);
    }
    kinds.sort();
    kinds.dedup();
    Ok(kinds)
}

/// Whom a fault hits, resolved when it is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Leader,
    /// The `k mod n`-th of the n running followers.
    Follower(u64),
    /// The `k mod n`-th node group (see [`NodeFault::of`]).
    NodeGroup(u64),
    /// A partition of `shape` around the leader or the `k mod n`-th follower.
    Cut {
        shape: Shape,
        leader: bool,
        k: u64,
    },
}

/// The shape of a partition, around the replica a fault targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Isolate,
    Minority,
    Bridge,
}

impl Shape {
    pub fn around(self, id: u64) -> Topology {
        match self {
            Shape::Isolate => Topology::Isolate(id),
            Shape::Minority => Topology::MajorityMinority { minority_of: id },
            Shape::Bridge => Topology::Bridge { bridge: id },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedFault {
    /// Quiet time before this fault.
    pub gap_ms: u64,
    pub kind: FaultKind,
    pub target: Target,
    /// How long the fault lasts before it is healed.
    pub hold_ms: u64,
}

/// Most faults one schedule holds.
pub const SCHEDULE_MAX: usize = 10_000;

/// The faults of one run: a pure function of its arguments.
pub fn schedule(
    seed: u64,
    kinds: &[FaultKind],
    duration_ms: u64,
    node_ttl_ms: u64,
) -> Vec<PlannedFault> {
    let mut rng = Rng::fork(seed, 0xFA17);
    let mut plan = Vec::new();
    if kinds.is_empty() {
        return plan;
    }
    let mut at_ms = 0u64;
    while at_ms < duration_ms && plan.len() < SCHEDULE_MAX {
        let kind = kinds[rng.index(kinds.len())];
        let gap_ms = rng.range(100, 600);
        // Holds straddle the election timeout (replicas) and the node TTL (node daemons), so
        // some faults heal before anyone notices and some long after.
        let hold_ms = match kind {
            FaultKind::Kill => rng.range(300, 2500),
            FaultKind::Pause => rng.range(200, 2500),
            FaultKind::Restart => 0,
            FaultKind::Wipe => rng.range(0, 1000),
            FaultKind::Nodes => rng.range(node_ttl_ms / 4, node_ttl_ms * 3 / 2),
            FaultKind::Partition => rng.range(300, 4000),
        };
        let target = match kind {
            FaultKind::Nodes => Target::NodeGroup(rng.next_u64()),
            FaultKind::Partition => Target::Cut {
                shape: [Shape::Isolate, Shape::Minority, Shape::Bridge][rng.index(3)],
                leader: rng.chance(50),
                k: rng.next_u64(),
            },
            _ if rng.chance(50) => Target::Leader,
            _ => Target::Follower(rng.next_u64()),
        };
        plan.push(PlannedFault {
            gap_ms,
            kind,
            target,
            hold_ms,
        });
        // Plus a rough allowance for the recovery wait after each fault.
        at_ms += gap_ms + hold_ms + 500;
    }
    plan
}

/// A node daemon process the injector may kill (or freeze) and restart.
#[derive(Clone, Debug)]
pub struct NodeGroup {
    /// The group's name; a container node's is its node id.
    pub name: String,
    /// Nodes the process hosts (1 for a container node).
    pub count: u32,
    pub args: Vec<String>,
    pub kind: GroupKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// `surge node --runtime sim --simulate N`.
    Sim,
    /// One `surge node --runtime container` daemon with real sandboxes.
    Container,
}

/// What a `nodes` fault does to the group it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeFault {
    /// `kill -9` of the daemon, restarted after the hold (its containers keep running and are
    /// re-adopted, or found foreign, by the new daemon).
    Kill,
    /// SIGSTOP of the daemon, SIGCONT after the hold: past the TTL the scheduler runs its
    /// sandboxes elsewhere while the frozen host still runs them, and on return the daemon must
    /// stop its now-foreign copies.
    Freeze,
}

impl NodeFault {
    /// The group the fault's `k` hits and what it does. A pure function of `k`, so one seed
    /// names one fault; simulated groups are always killed (as before container nodes existed,
    /// so the schedules of earlier seeds stay as they were), container daemons are killed or
    /// frozen by a bit of `k` the group choice does not use.
    pub fn of(k: u64, groups: &[NodeGroup]) -> Option<(usize, NodeFault)> {
        if groups.is_empty() {
            return None;
        }
        let i = index_of(k, groups.len());
        let fault = match groups[i].kind {
            GroupKind::Container if (k >> 40) & 1 == 1 => NodeFault::Freeze,
            _ => NodeFault::Kill,
        };
        Some((i, fault))
    }
}

/// How long the cluster may take to agree on a leader again after a fault healed.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a wiped replica may take to be a voter again.
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace of a SIGTERM restart.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Carries out a schedule on a cluster and records it.
pub struct Injector<'a> {
    pub cluster: &'a mut LocalCluster,
    pub groups: Vec<NodeGroup>,
    pub recorder: Recorder,
}

impl Injector<'_> {
    fn note(&self, kind: EventType, text: String) {
        tracing::info!("{text}");
        self.recorder
            .record(Process::Faults, kind, Op::Note { text });
    }

    fn fault(&self, kind: EventType, fault: FaultKind, target: &str, detail: String) {
        tracing::info!(fault = fault.name(), target, "{kind:?} {detail}");
        self.recorder.record(
            Process::Faults,
            kind,
            Op::Fault {
                kind: fault.name().to_string(),
                target: target.to_string(),
                detail,
            },
        );
    }

    /// (Re)start a node group's daemon process.
    fn start_group(&mut self, g: &NodeGroup) -> Result<(), surge_harness::cluster::ClusterError> {
        let args: Vec<&str> = g.args.iter().map(String::as_str).collect();
        match g.kind {
            GroupKind::Sim => self.cluster.start_sim_nodes(&g.name, g.count, &args),
            GroupKind::Container => self.cluster.start_container_node(&g.name, &args),
        }
    }

    fn running(&mut self) -> Vec<u64> {
        self.cluster
            .ids()
            .into_iter()
            .filter(|id| self.cluster.replica_running(*id))
            .collect()
    }

    /// The leader as the running replicas agree on it.
    async fn leader(&mut self) -> Option<u64> {
        self.cluster.wait_leader(Duration::from_secs(10)).await.ok()
    }

    async fn resolve(&mut self, target: Target) -> Option<(u64, &'static str)> {
        let leader = self.leader().await?;
        match target {
            Target::Leader | Target::Cut { leader: true, .. } => Some((leader, "leader")),
            Target::Follower(k)
            | Target::Cut {
                leader: false, k, ..
            } => {
                let followers: Vec<u64> = self
                    .running()
                    .into_iter()
                    .filter(|id| *id != leader)
                    .collect();
                let n = followers.len();
                (n > 0).then(|| (followers[index_of(k, n)], "follower"))
            }
            Target::NodeGroup(_) => None,
        }
    }

    /// Run the schedule until it ends or `deadline` passes; then heal everything.
    pub async fn run(&mut self, plan: &[PlannedFault], deadline: Instant) {
        for f in plan {
            if Instant::now() + Duration::from_millis(f.gap_ms) >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(f.gap_ms)).await;
            self.inject(f, deadline).await;
            self.recover().await;
        }
        let rest = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(rest).await;
        self.heal_all().await;
    }

    async fn inject(&mut self, f: &PlannedFault, deadline: Instant) {
        // A fault never outlives the run by much: the hold is cut at the deadline.
        let hold = Duration::from_millis(f.hold_ms)
            .min(deadline.saturating_duration_since(Instant::now()));
        if f.kind == FaultKind::Nodes {
            let Target::NodeGroup(k) = f.target else {
                return;
            };
            let Some((i, what)) = NodeFault::of(k, &self.groups) else {
                return;
            };
            let g = self.groups[i].clone();
            match what {
                NodeFault::Kill => {
                    self.fault(
                        EventType::Invoke,
                        f.kind,
                        &g.name,
                        format!(
                            "kill -9 node daemon {} ({} nodes) for {} ms",
                            g.name,
                            g.count,
                            hold.as_millis()
                        ),
                    );
                    self.cluster.kill_nodes(&g.name);
                    tokio::time::sleep(hold).await;
                    let r = self.start_group(&g);
                    self.fault(
                        EventType::Info,
                        f.kind,
                        &g.name,
                        format!("restarted: {r:?}"),
                    );
                }
                NodeFault::Freeze => {
                    self.fault(
                        EventType::Invoke,
                        f.kind,
                        &g.name,
                        format!(
                            "SIGSTOP node daemon {} ({} nodes) for {} ms",
                            g.name,
                            g.count,
                            hold.as_millis()
                        ),
                    );
                    self.cluster.pause_nodes(&g.name, false);
                    tokio::time::sleep(hold).await;
                    self.cluster.pause_nodes(&g.name, true);
                    self.fault(EventType::Info, f.kind, &g.name, "SIGCONT".into());
                }
            }
            return;
        }
        let Some((id, role)) = self.resolve(f.target).await else {
            self.note(
                EventType::Info,
                format!(
                    "{} skipped: no agreed leader or no follower to target",
                    f.kind.name()
                ),
            );
            return;
        };
        let target = format!("replica {id} ({role})");
        match f.kind {
            FaultKind::Partition => {
                let Target::Cut { shape, .. } = f.target else {
                    return;
                };
                let topology = shape.around(id);
                let Some(net) = self.cluster.net_mut() else {
                    self.note(
                        EventType::Info,
                        "partition skipped: the replicas are not on network namespaces".into(),
                    );
                    return;
                };
                let cut = net.partition(topology);
                self.fault(
                    EventType::Invoke,
                    f.kind,
                    &target,
                    format!(
                        "{} around it for {} ms: cut {cut:?}",
                        topology.name(),
                        hold.as_millis()
                    ),
                );
                tokio::time::sleep(hold).await;
                self.heal_net();
            }
            FaultKind::Kill => {
                self.fault(
                    EventType::Invoke,
                    f.kind,
                    &target,
                    format!("kill -9 for {} ms", hold.as_millis()),
                );
                let _ = self.cluster.kill(id);
                tokio::time::sleep(hold).await;
                let r = self.cluster.start(id, StartMode::Resume);
                self.fault(
                    EventType::Info,
                    f.kind,
                    &target,
                    format!("restarted on its data dir: {r:?}"),
                );
            }
            FaultKind::Pause => {
                self.fault(
                    EventType::Invoke,
                    f.kind,
                    &target,
                    format!("SIGSTOP for {} ms", hold.as_millis()),
                );
                let _ = self.cluster.pause(id, false);
                tokio::time::sleep(hold).await;
                let _ = self.cluster.pause(id, true);
                self.fault(EventType::Info, f.kind, &target, "SIGCONT".into());
            }
            FaultKind::Restart => {
                self.fault(
                    EventType::Invoke,
                    f.kind,
                    &target,
                    "SIGTERM and restart on its data dir".into(),
                );
                let _ = self.cluster.stop(id, STOP_GRACE);
                let r = self.cluster.start(id, StartMode::Resume);
                self.fault(
                    EventType::Info,
                    f.kind,
                    &target,
                    format!("restarted: {r:?}"),
                );
            }
            FaultKind::Wipe => {
                // An operator replaces the disk of a healthy replica: only one that has caught
                // up with the leader's commit index. Wiping a lagging replica while another holds
                // the only other copy of recent entries is a double fault Raft does not survive.
                if !self.caught_up(id).await {
                    self.note(
                        EventType::Info,
                        format!("wipe of {target} skipped: it lags the leader"),
                    );
                    return;
                }
                let Some(seed) = self
                    .running()
                    .into_iter()
                    .find(|r| *r != id)
                    .and_then(|r| self.cluster.addr(r).ok())
                else {
                    return;
                };
                self.fault(
                    EventType::Invoke,
                    f.kind,
                    &target,
                    format!(
                        "kill -9, delete data dir, rejoin via {seed} after {} ms",
                        hold.as_millis()
                    ),
                );
                let _ = self.cluster.kill(id);
                let wiped = self.cluster.wipe(id);
                tokio::time::sleep(hold).await;
                let r = self.cluster.start(id, StartMode::Join(seed));
                self.fault(
                    EventType::Info,
                    f.kind,
                    &target,
                    format!("wiped: {wiped:?}; rejoined: {r:?}"),
                );
                self.wait_voter(id).await;
            }
            FaultKind::Nodes => {}
        }
    }

    fn heal_net(&mut self) {
        let Some(net) = self.cluster.net_mut() else {
            return;
        };
        if net.cuts().is_empty() {
            return;
        }
        let r = net.heal();
        self.fault(
            EventType::Info,
            FaultKind::Partition,
            "network",
            format!("healed: {r:?}"),
        );
    }

    /// Whether replica `id` has applied everything the leader had committed a moment ago.
    async fn caught_up(&mut self, id: u64) -> bool {
        let Some(leader) = self.leader().await else {
            return false;
        };
        let Ok(l) = self.cluster.status(leader).await else {
            return false;
        };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(s) = self.cluster.status(id).await {
                if s.applied_index >= l.commit_index {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Wait until the leader lists `id` as a reachable voter.
    async fn wait_voter(&mut self, id: u64) {
        let until = Instant::now() + REJOIN_TIMEOUT;
        while Instant::now() < until {
            if let Some(leader) = self.leader().await {
                if let Ok(s) = self.cluster.status(leader).await {
                    if s.members
                        .iter()
                        .any(|m| m.id == id && m.voter && m.reachable)
                    {
                        self.note(EventType::Ok, format!("replica {id} is a voter again"));
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.note(
            EventType::Info,
            format!("replica {id} not a voter within {REJOIN_TIMEOUT:?}"),
        );
    }

    /// After a fault: every running replica agrees on a leader.
    async fn recover(&mut self) {
        if let Err(e) = self.cluster.wait_leader(RECOVERY_TIMEOUT).await {
            self.note(
                EventType::Info,
                format!("no agreed leader after the fault: {e}"),
            );
        }
    }

    /// Every replica running and resumed, every node group running, a leader agreed.
    pub async fn heal_all(&mut self) {
        self.heal_net();
        for id in self.cluster.ids() {
            let _ = self.cluster.pause(id, true);
            if !self.cluster.replica_running(id) {
                let r = self.cluster.start(id, StartMode::Resume);
                self.note(
                    EventType::Info,
                    format!("heal: replica {id} was down; started: {r:?}"),
                );
            }
        }
        for g in self.groups.clone() {
            self.cluster.pause_nodes(&g.name, true);
            if !self.cluster.node_group_running(&g.name) {
                let r = self.start_group(&g);
                self.note(
                    EventType::Info,
                    format!("heal: node group {} was down; started: {r:?}", g.name),
                );
            }
        }
        self.recover().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_one_schedule() {
        let a = schedule(42, FAULT_KINDS, 60_000, 2000);
        assert_eq!(a, schedule(42, FAULT_KINDS, 60_000, 2000));
        assert_ne!(a, schedule(43, FAULT_KINDS, 60_000, 2000));
        assert!(a.len() >= 10, "{} faults in a minute", a.len());
        for kind in FAULT_KINDS {
            assert!(a.iter().any(|f| f.kind == *kind), "no {kind:?} in {a:?}");
        }
    }

    #[test]
    fn schedule_uses_only_the_chosen_kinds() {
        let kinds = parse_kinds("pause,nodes").expect("kinds");
        let plan = schedule(7, &kinds, 60_000, 2000);
        assert!(!plan.is_empty());
        assert!(plan.iter().all(|f| kinds.contains(&f.kind)));
        assert!(plan
            .iter()
            .all(|f| (f.kind == FaultKind::Nodes) == matches!(f.target, Target::NodeGroup(_))));
        let cuts = schedule(7, &[FaultKind::Partition], 60_000, 2000);
        assert!(cuts.iter().all(|f| matches!(f.target, Target::Cut { .. })));
        for shape in [Shape::Isolate, Shape::Minority, Shape::Bridge] {
            assert!(
                cuts.iter()
                    .any(|f| matches!(f.target, Target::Cut { shape: s, .. } if s == shape)),
                "no {shape:?} in {cuts:?}"
            );
        }
        assert!(schedule(7, &[], 60_000, 2000).is_empty());
    }

    #[test]
    fn node_faults_kill_sim_groups_and_kill_or_freeze_container_nodes() {
        let group = |name: &str, kind| NodeGroup {
            name: name.into(),
            count: 1,
            args: Vec::new(),
            kind,
        };
        let groups = vec![
            group("g0", GroupKind::Sim),
            group("g1", GroupKind::Sim),
            group("ctr-0", GroupKind::Container),
        ];
        assert_eq!(NodeFault::of(7, &[]), None);
        let mut rng = Rng::new(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let k = rng.next_u64();
            let (i, what) = NodeFault::of(k, &groups).expect("a group");
            assert_eq!(i as u64, k % 3, "the group choice is unchanged");
            if groups[i].kind == GroupKind::Sim {
                assert_eq!(what, NodeFault::Kill);
            }
            seen.insert((i, format!("{what:?}")));
        }
        assert!(seen.contains(&(2, "Kill".into())) && seen.contains(&(2, "Freeze".into())));
    }

    #[test]
    fn kinds_parse() {
        assert_eq!(parse_kinds("all").expect("all"), FAULT_KINDS.to_vec());
        assert_eq!(
            parse_kinds("wipe, kill,kill").expect("two"),
            vec![FaultKind::Kill, FaultKind::Wipe]
        );
        assert!(parse_kinds("").expect("none").is_empty());
        assert_eq!(
            parse_kinds("partition").expect("partition"),
            vec![FaultKind::Partition]
        );
        assert!(parse_kinds("flood").is_err());
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        for _ in 0..1000 {
            let x = a.range(3, 9);
            assert_eq!(x, b.range(3, 9));
            assert!((3..=9).contains(&x));
        }
        assert_eq!(Rng::new(5).below(0), 0);
    }
}
