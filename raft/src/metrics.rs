//! Prometheus series of the replicated log (`surge_raft_*`).

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct RaftMetrics {
    pub term: IntGauge,
    pub leader_id: IntGauge,
    pub is_leader: IntGauge,
    pub commit_index: IntGauge,
    pub applied_index: IntGauge,
    pub last_log_index: IntGauge,
    pub apply_lag: IntGauge,
    pub proposals: IntCounterVec,
    pub proposal_seconds: Histogram,
    pub snapshots_built: IntCounter,
    pub snapshot_bytes: IntGauge,
    pub snapshot_build_seconds: Histogram,
    pub snapshots_installed: IntCounter,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, prometheus::Error> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Latency buckets from 0.5 ms to 10 s: a synced commit on a local disk is milliseconds.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ]
}

impl RaftMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let proposals = IntCounterVec::new(
            Opts::new(
                "surge_raft_proposals_total",
                "Commands proposed through this replica, by result (ok, error, forwarded)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(proposals.clone()))?;
        Ok(RaftMetrics {
            term: gauge(registry, "surge_raft_term", "Current Raft term")?,
            leader_id: gauge(
                registry,
                "surge_raft_leader_id",
                "Id of the known leader (0: none)",
            )?,
            is_leader: gauge(
                registry,
                "surge_raft_is_leader",
                "1 when this replica leads",
            )?,
            commit_index: gauge(
                registry,
                "surge_raft_commit_index",
                "Highest log index known committed",
            )?,
            applied_index: gauge(
                registry,
                "surge_raft_applied_index",
                "Highest log index applied to the state machine",
            )?,
            last_log_index: gauge(
                registry,
                "surge_raft_last_log_index",
                "Index of the last entry in this replica's log",
            )?,
            apply_lag: gauge(
                registry,
                "surge_raft_apply_lag_entries",
                "Committed entries not yet applied",
            )?,
            proposals,
            proposal_seconds: histogram(
                registry,
                "surge_raft_proposal_duration_seconds",
                "Time from proposing a command to its reply, forwarding included",
                latency_buckets(),
            )?,
            snapshots_built: counter(
                registry,
                "surge_raft_snapshots_built_total",
                "Snapshots this replica built",
            )?,
            snapshot_bytes: gauge(
                registry,
                "surge_raft_snapshot_size_bytes",
                "Size of the newest snapshot built",
            )?,
            snapshot_build_seconds: histogram(
                registry,
                "surge_raft_snapshot_build_duration_seconds",
                "Time to build and persist a snapshot",
                latency_buckets(),
            )?,
            snapshots_installed: counter(
                registry,
                "surge_raft_snapshots_installed_total",
                "Snapshots received from the leader and installed",
            )?,
        })
    }

    pub fn snapshot_built(&self, bytes: usize, took: Duration) {
        self.snapshots_built.inc();
        self.snapshot_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.snapshot_build_seconds.observe(took.as_secs_f64());
    }

    pub fn snapshot_installed(&self) {
        self.snapshots_installed.inc();
    }
}

/// Saturating u64 -> i64 for gauges.
pub fn as_gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
