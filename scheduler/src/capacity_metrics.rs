//! The capacity series of every replica's `/metrics`, computed at scrape time from the
//! replica's own applied state ([`crate::capacity::summarize`]).
//!
//! Every replica exports them, labelled `role="leader"` or `role="follower"`: the leader's are
//! authoritative (a follower may lag by a few entries, and only the leader hears heartbeats, so a
//! follower's `used` is 0). Dashboards and alerts select `role="leader"`. Units are Prometheus
//! base units: CPU in cores, memory in bytes.

use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, Opts};

use crate::capacity::{summarize, Capacity};
use crate::leader::Leader;
use crate::model::Resources;
use crate::service::Replica;

const MIB: f64 = 1024.0 * 1024.0;

fn cores(r: &Resources) -> f64 {
    // u64 millicores -> f64 is exact below 2^53 (9 * 10^12 cores).
    r.cpu_millis as f64 / 1000.0
}

fn bytes(r: &Resources) -> f64 {
    r.memory_mib as f64 * MIB
}

struct Families {
    pool_cpu: GaugeVec,
    pool_memory: GaugeVec,
    cluster_cpu: GaugeVec,
    cluster_memory: GaugeVec,
    tenant_cpu: GaugeVec,
    tenant_memory: GaugeVec,
    tenant_quota_cpu: GaugeVec,
    tenant_quota_memory: GaugeVec,
    sandboxes: GaugeVec,
    jobs: GaugeVec,
    nodes: GaugeVec,
}

fn vec(name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec, prometheus::Error> {
    GaugeVec::new(Opts::new(name, help), labels)
}

impl Families {
    fn new() -> Result<Self, prometheus::Error> {
        let kind = "kind (allocatable: offered by ready nodes; allocated: reserved by active sandboxes; used: last heartbeats, leader only)";
        Ok(Families {
            pool_cpu: vec(
                "surge_pool_cpu_cores",
                &format!("CPU of a node pool by {kind}"),
                &["role", "pool", "kind"],
            )?,
            pool_memory: vec(
                "surge_pool_memory_bytes",
                &format!("Memory of a node pool by {kind}"),
                &["role", "pool", "kind"],
            )?,
            cluster_cpu: vec(
                "surge_cluster_cpu_cores",
                &format!("CPU of the cluster by {kind}"),
                &["role", "kind"],
            )?,
            cluster_memory: vec(
                "surge_cluster_memory_bytes",
                &format!("Memory of the cluster by {kind}"),
                &["role", "kind"],
            )?,
            tenant_cpu: vec(
                "surge_tenant_allocated_cpu_cores",
                "CPU reserved by a tenant's active sandboxes",
                &["role", "tenant"],
            )?,
            tenant_memory: vec(
                "surge_tenant_allocated_memory_bytes",
                "Memory reserved by a tenant's active sandboxes",
                &["role", "tenant"],
            )?,
            tenant_quota_cpu: vec(
                "surge_tenant_quota_cpu_cores",
                "A tenant's CPU quota (absent: no quota; 0 in a dimension: unlimited)",
                &["role", "tenant"],
            )?,
            tenant_quota_memory: vec(
                "surge_tenant_quota_memory_bytes",
                "A tenant's memory quota (absent: no quota; 0 in a dimension: unlimited)",
                &["role", "tenant"],
            )?,
            sandboxes: vec(
                "surge_cluster_sandboxes",
                "Sandboxes of retained jobs by state",
                &["role", "state"],
            )?,
            jobs: vec(
                "surge_cluster_jobs",
                "Retained jobs by state",
                &["role", "state"],
            )?,
            nodes: vec(
                "surge_cluster_nodes",
                "Registered nodes by state",
                &["role", "state"],
            )?,
        })
    }

    fn all(&self) -> [&GaugeVec; 11] {
        [
            &self.pool_cpu,
            &self.pool_memory,
            &self.cluster_cpu,
            &self.cluster_memory,
            &self.tenant_cpu,
            &self.tenant_memory,
            &self.tenant_quota_cpu,
            &self.tenant_quota_memory,
            &self.sandboxes,
            &self.jobs,
            &self.nodes,
        ]
    }

    /// The families that have series (an empty family is an encoding error).
    fn collected(&self) -> Vec<MetricFamily> {
        self.all()
            .iter()
            .flat_map(|f| f.collect())
            .filter(|mf| !mf.get_metric().is_empty())
            .collect()
    }

    /// Set every series from `c` (after a reset: a pool or tenant that went away disappears).
    fn set(&self, role: &str, c: &Capacity) {
        for f in self.all() {
            f.reset();
        }
        let kinds = |p: &crate::capacity::PoolCapacity| {
            [
                ("allocatable", p.allocatable),
                ("allocated", p.allocated),
                ("used", p.used),
            ]
        };
        for (pool, p) in &c.pools {
            for (kind, r) in kinds(p) {
                self.pool_cpu
                    .with_label_values(&[role, pool, kind])
                    .set(cores(&r));
                self.pool_memory
                    .with_label_values(&[role, pool, kind])
                    .set(bytes(&r));
            }
        }
        for (kind, r) in kinds(&c.cluster) {
            self.cluster_cpu
                .with_label_values(&[role, kind])
                .set(cores(&r));
            self.cluster_memory
                .with_label_values(&[role, kind])
                .set(bytes(&r));
        }
        for (tenant, t) in &c.tenants {
            self.tenant_cpu
                .with_label_values(&[role, tenant])
                .set(cores(&t.allocated));
            self.tenant_memory
                .with_label_values(&[role, tenant])
                .set(bytes(&t.allocated));
            if let Some(q) = &t.quota {
                self.tenant_quota_cpu
                    .with_label_values(&[role, tenant])
                    .set(cores(q));
                self.tenant_quota_memory
                    .with_label_values(&[role, tenant])
                    .set(bytes(q));
            }
        }
        for (family, counts) in [
            (&self.sandboxes, &c.sandboxes),
            (&self.jobs, &c.jobs),
            (&self.nodes, &c.nodes),
        ] {
            for (state, n) in counts {
                family.with_label_values(&[role, state]).set(*n as f64);
            }
        }
    }
}

/// The collector registered in the replica's registry.
pub struct CapacityCollector {
    replica: Replica,
    leader: Arc<Leader>,
    descs: Vec<Desc>,
    /// One scrape at a time sets and reads the families.
    families: Mutex<Families>,
}

impl CapacityCollector {
    pub fn new(replica: Replica, leader: Arc<Leader>) -> Result<Self, prometheus::Error> {
        let families = Families::new()?;
        let descs = families
            .all()
            .iter()
            .flat_map(|f| f.desc().into_iter().cloned())
            .collect();
        Ok(CapacityCollector {
            replica,
            leader,
            descs,
            families: Mutex::new(families),
        })
    }

    /// Register a collector for this replica in `registry`.
    pub fn register(
        registry: &prometheus::Registry,
        replica: Replica,
        leader: Arc<Leader>,
    ) -> Result<(), prometheus::Error> {
        registry.register(Box::new(Self::new(replica, leader)?))
    }
}

/// This replica's role label.
pub fn role(is_leader: bool) -> &'static str {
    if is_leader {
        "leader"
    } else {
        "follower"
    }
}

impl Collector for CapacityCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let c = self
            .replica
            .read(|s, _| summarize(s, |n| self.leader.used(n)));
        let families = self
            .families
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        families.set(role(self.replica.is_leader()), &c);
        families.collected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn text(f: &Families) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&f.collected(), &mut out)
            .expect("encode");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn series_carry_units_role_and_bounded_labels_and_vanish_with_their_pool() {
        let f = Families::new().expect("families");
        let mut c = Capacity::default();
        c.pools.insert(
            "gpu".into(),
            crate::capacity::PoolCapacity {
                allocatable: Resources::new(2500, 1024),
                ..Default::default()
            },
        );
        c.sandboxes.insert("running", 7);
        f.set("leader", &c);
        let t = text(&f);
        assert!(
            t.contains(r#"surge_pool_cpu_cores{kind="allocatable",pool="gpu",role="leader"} 2.5"#),
            "{t}"
        );
        assert!(
            t.contains(
                r#"surge_pool_memory_bytes{kind="allocatable",pool="gpu",role="leader"} 1073741824"#
            ),
            "{t}"
        );
        assert!(
            t.contains(r#"surge_cluster_sandboxes{role="leader",state="running"} 7"#),
            "{t}"
        );
        // The pool leaves and the role changes: no stale series remain.
        c.pools.clear();
        f.set("follower", &c);
        let t = text(&f);
        assert!(!t.contains("pool=\"gpu\""), "{t}");
        assert!(!t.contains("role=\"leader\""), "{t}");
        assert!(t.contains(r#"role="follower",state="running"} 7"#), "{t}");
    }
}
