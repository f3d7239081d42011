//! Replicas on their own network hosts, so the harness can cut the links between them.
//!
//! Each replica runs in a network namespace with one veth into a bridge in the harness's own
//! namespace; the harness (clients, node daemons) reaches every replica through the bridge. A
//! partition cuts replica-to-replica links only — with blackhole routes on both ends, so packets
//! are dropped silently, as on a broken switch, and TCP has to time out — while clients keep
//! reaching both sides, the way a client on the other side of the rack would. Only `ip` (iproute2)
//! is needed; no iptables.
//!
//! [`Topology`] is the pure part: which links a partition cuts. [`Net`] owns the namespaces, the
//! bridge and the routes, and removes them all when dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;

/// Replicas one network holds (the addresses are `10.213.N.1..=HOSTS_MAX`).
pub const HOSTS_MAX: u64 = 32;
/// Networks tried before giving up (one /24 and one bridge name each).
const NETWORKS_MAX: u8 = 200;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespaces need root (this process runs as uid {0})")]
    NotRoot(u32),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (iproute2): {0}")]
    Spawn(std::io::Error),
    #[error("no free network: {NETWORKS_MAX} bridges named surge-br* exist already")]
    Exhausted,
    #[error("host {0} is outside 1..={HOSTS_MAX} or not part of this network")]
    Host(u64),
}

/// The shape of a partition between replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One replica (the leader, usually) cut from every other.
    Isolate(u64),
    /// The replicas split into a majority and a minority that holds `minority_of` (and, with
    /// more than three replicas, its lowest-numbered peers up to a minority).
    MajorityMinority { minority_of: u64 },
    /// Two halves that cannot talk to each other, joined through one replica that sees both
    /// (Jepsen's "bridge"): `bridge` keeps quorum with either side.
    Bridge { bridge: u64 },
}

impl Topology {
    pub fn name(self) -> &'static str {
        match self {
            Topology::Isolate(_) => "isolate",
            Topology::MajorityMinority { .. } => "majority-minority",
            Topology::Bridge { .. } => "bridge",
        }
    }

    /// The replica-to-replica links this partition cuts, as ordered pairs `(a, b)` with `a < b`.
    pub fn cuts(self, ids: &[u64]) -> BTreeSet<(u64, u64)> {
        let ids: BTreeSet<u64> = ids.iter().copied().collect();
        let pair = |a: u64, b: u64| (a.min(b), a.max(b));
        let mut cuts = BTreeSet::new();
        match self {
            Topology::Isolate(x) => {
                if ids.contains(&x) {
                    cuts.extend(ids.iter().filter(|o| **o != x).map(|o| pair(x, *o)));
                }
            }
            Topology::MajorityMinority { minority_of } => {
                if !ids.contains(&minority_of) {
                    return cuts;
                }
                let minority_size = (ids.len() - 1) / 2;
                let mut minority = BTreeSet::from([minority_of]);
                minority.extend(
                    ids.iter()
                        .filter(|o| **o != minority_of)
                        .take(minority_size.saturating_sub(1)),
                );
                for a in &minority {
                    for b in ids.iter().filter(|b| !minority.contains(b)) {
                        cuts.insert(pair(*a, *b));
                    }
                }
            }
            Topology::Bridge { bridge } => {
                if !ids.contains(&bridge) {
                    return cuts;
                }
                let others: Vec<u64> = ids.iter().copied().filter(|o| *o != bridge).collect();
                let (left, right) = others.split_at(others.len() / 2);
                for a in left {
                    for b in right {
                        cuts.insert(pair(*a, *b));
                    }
                }
            }
        }
        cuts
    }
}

/// Network namespaces with one host per replica, a bridge between them, and the cuts in force.
pub struct Net {
    /// Third octet of `10.213.N.0/24`, and the suffix of every name this network owns.
    n: u8,
    hosts: BTreeMap<u64, Ipv4Addr>,
    cuts: BTreeSet<(u64, u64)>,
}

/// The effective uid, when it is not root: network namespaces cannot be made then.
fn not_root() -> Option<u32> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    (uid != 0).then_some(uid)
}

/// Whether this process may create network namespaces (partitions need them).
pub fn available() -> bool {
    not_root().is_none()
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetError::Spawn)?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetError::Ip {
        args: args.join(" "),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

impl Net {
    /// Creates the bridge, and one namespace per id in `ids`, each with the address
    /// `10.213.N.id`. The harness's namespace gets `10.213.N.254` on the bridge.
    pub fn create(ids: &[u64]) -> Result<Net, NetError> {
        if let Some(uid) = not_root() {
            return Err(NetError::NotRoot(uid));
        }
        if let Some(bad) = ids.iter().find(|id| **id == 0 || **id > HOSTS_MAX) {
            return Err(NetError::Host(*bad));
        }
        // Creating the bridge claims the network: the name is the lock, so concurrent harnesses
        // (parallel tests) never share a subnet.
        let n = (0..NETWORKS_MAX)
            .find(|n| ip(&["link", "add", &bridge_name(*n), "type", "bridge"]).is_ok())
            .ok_or(NetError::Exhausted)?;
        let mut net = Net {
            n,
            hosts: BTreeMap::new(),
            cuts: BTreeSet::new(),
        };
        let br = bridge_name(n);
        ip(&["addr", "add", &format!("10.213.{n}.254/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for id in ids {
            net.add_host(*id)?;
        }
        Ok(net)
    }

    fn add_host(&mut self, id: u64) -> Result<(), NetError> {
        let host = u8::try_from(id).map_err(|_| NetError::Host(id))?;
        let ns = self.namespace(id);
        let outer = format!("surge-v{}-{id}", self.n);
        ip(&["netns", "add", &ns])?;
        // Recorded before the rest so that Drop removes a half-built host too.
        let addr = Ipv4Addr::new(10, 213, self.n, host);
        self.hosts.insert(id, addr);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &outer, "master", &bridge_name(self.n), "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// The namespace replica `id` runs in (`ip netns exec NAME ...`).
    pub fn namespace(&self, id: u64) -> String {
        format!("surge-{}-r{id}", self.n)
    }

    /// Replica `id`'s address.
    pub fn addr(&self, id: u64) -> Result<Ipv4Addr, NetError> {
        self.hosts.get(&id).copied().ok_or(NetError::Host(id))
    }

    /// Replica `id`'s address, adding its host first if the network does not hold it yet (a
    /// replica added to a running cluster).
    pub fn host(&mut self, id: u64) -> Result<Ipv4Addr, NetError> {
        if !self.hosts.contains_key(&id) {
            if id == 0 || id > HOSTS_MAX {
                return Err(NetError::Host(id));
            }
            self.add_host(id)?;
        }
        self.addr(id)
    }

    /// Cuts the links of `topology` between the hosts (on top of any already cut).
    pub fn partition(&mut self, topology: Topology) -> Result<BTreeSet<(u64, u64)>, NetError> {
        let ids: Vec<u64> = self.hosts.keys().copied().collect();
        let cuts = topology.cuts(&ids);
        for (a, b) in &cuts {
            if self.cuts.contains(&(*a, *b)) {
                continue;
            }
            self.cut(*a, *b)?;
            self.cuts.insert((*a, *b));
        }
        Ok(cuts)
    }

    fn cut(&self, a: u64, b: u64) -> Result<(), NetError> {
        self.route("add", a, b)?;
        self.route("add", b, a)
    }

    fn route(&self, verb: &str, from: u64, to: u64) -> Result<(), NetError> {
        let to = format!("{}/32", self.addr(to)?);
        ip(&["-n", &self.namespace(from), "route", verb, "blackhole", &to])
    }

    /// Restores every cut link.
    pub fn heal(&mut self) -> Result<(), NetError> {
        let cuts = std::mem::take(&mut self.cuts);
        let mut first_error = None;
        for (a, b) in cuts {
            for (from, to) in [(a, b), (b, a)] {
                if let Err(e) = self.route("del", from, to) {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The links cut right now.
    pub fn cuts(&self) -> &BTreeSet<(u64, u64)> {
        &self.cuts
    }
}

fn bridge_name(n: u8) -> String {
    format!("surge-br{n}")
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, which deletes the other end.
        for id in self.hosts.keys() {
            let _ = ip(&["netns", "del", &self.namespace(*id)]);
        }
        let _ = ip(&["link", "del", &bridge_name(self.n)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolate_cuts_one_replica_from_all_others() {
        let cuts = Topology::Isolate(2).cuts(&[1, 2, 3]);
        assert_eq!(cuts, BTreeSet::from([(1, 2), (2, 3)]));
        assert!(Topology::Isolate(9).cuts(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn majority_minority_leaves_a_quorum_on_one_side() {
        for n in [3u64, 5] {
            let ids: Vec<u64> = (1..=n).collect();
            for x in 1..=n {
                let cuts = Topology::MajorityMinority { minority_of: x }.cuts(&ids);
                let minority: BTreeSet<u64> = cuts
                    .iter()
                    .flat_map(|(a, b)| [*a, *b])
                    .filter(|h| {
                        // A minority member is cut from every majority member.
                        cuts.iter().filter(|(a, b)| a == h || b == h).count() as u64
                            == n - (n - 1) / 2
                    })
                    .collect();
                assert!(minority.contains(&x), "n={n} x={x} {cuts:?}");
                assert_eq!(minority.len() as u64, (n - 1) / 2, "n={n} x={x} {cuts:?}");
                // Every cut crosses the split.
                for (a, b) in &cuts {
                    assert!(minority.contains(a) != minority.contains(b), "{cuts:?}");
                }
            }
        }
    }

    #[test]
    fn bridge_sees_both_halves_that_cannot_see_each_other() {
        let cuts = Topology::Bridge { bridge: 3 }.cuts(&[1, 2, 3, 4, 5]);
        assert_eq!(cuts, BTreeSet::from([(1, 4), (1, 5), (2, 4), (2, 5)]));
        assert!(cuts.iter().all(|(a, b)| *a != 3 && *b != 3));
        let three = Topology::Bridge { bridge: 1 }.cuts(&[1, 2, 3]);
        assert_eq!(three, BTreeSet::from([(2, 3)]));
    }

    /// Runs where the harness may create namespaces (root with iproute2), as in CI; elsewhere it
    /// says why it is skipped.
    #[test]
    fn a_cut_link_drops_traffic_and_heal_restores_it() {
        let mut net = match Net::create(&[1, 2, 3]) {
            Ok(n) => n,
            Err(NetError::NotRoot(uid)) => {
                surge_node::testing::unavailable(&format!(
                    "network namespaces need root, running as uid {uid}"
                ));
                return;
            }
            Err(e) => panic!("creating the test network: {e}"),
        };
        let ping = |net: &Net, from: u64, to: u64| {
            Command::new("ip")
                .args(["netns", "exec", &net.namespace(from)])
                .args(["busybox", "ping", "-c1", "-W1"])
                .arg(net.addr(to).expect("addr").to_string())
                .output()
                .map(|o| o.status.success())
        };
        if ping(&net, 1, 2).is_err() {
            surge_node::testing::unavailable("no busybox (scripts/setup installs busybox-static)");
            return;
        }
        assert!(
            ping(&net, 1, 2).expect("ping"),
            "hosts reach each other before a cut"
        );
        net.partition(Topology::Isolate(1)).expect("partition");
        assert!(!ping(&net, 1, 2).expect("ping"), "a cut link drops traffic");
        assert!(!ping(&net, 3, 1).expect("ping"), "in both directions");
        assert!(ping(&net, 2, 3).expect("ping"), "uncut links still work");
        net.heal().expect("heal");
        assert!(ping(&net, 1, 2).expect("ping"), "healed");
        assert!(net.cuts().is_empty());
    }
}
