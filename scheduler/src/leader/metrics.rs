//! The leader's Prometheus metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

pub struct Metrics {
    pub plans: IntCounter,
    pub placements: IntCounter,
    pub preemptions: IntCounter,
    pub plan_rejections: IntCounter,
    pub plan_seconds: Histogram,
    pub place_seconds: Histogram,
    pub pending_sandboxes: IntGauge,
    pub nodes_ready: IntGauge,
    pub nodes_down: IntGauge,
    pub status_entries: IntCounter,
    pub status_updates: IntCounter,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: T,
) -> Result<T, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new(r: &Registry) -> Result<Self, prometheus::Error> {
        let buckets = surge_raft::metrics::latency_buckets();
        Ok(Metrics {
            plans: reg(
                r,
                IntCounter::new("surge_scheduler_plans_total", "Plans committed")?,
            )?,
            placements: reg(
                r,
                IntCounter::new("surge_scheduler_placements_total", "Sandboxes placed")?,
            )?,
            preemptions: reg(
                r,
                IntCounter::new("surge_scheduler_preemptions_total", "Sandboxes preempted")?,
            )?,
            plan_rejections: reg(
                r,
                IntCounter::new(
                    "surge_scheduler_plan_rejections_total",
                    "Placements the plan applier refused (stale snapshot)",
                )?,
            )?,
            plan_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "surge_scheduler_plan_duration_seconds",
                        "Snapshot, placement and commit of one plan",
                    )
                    .buckets(buckets.clone()),
                )?,
            )?,
            place_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "surge_scheduler_placement_duration_seconds",
                        "The pure placement function alone",
                    )
                    .buckets(buckets),
                )?,
            )?,
            pending_sandboxes: reg(
                r,
                IntGauge::new(
                    "surge_scheduler_pending_sandboxes",
                    "Sandboxes waiting for a node",
                )?,
            )?,
            nodes_ready: reg(
                r,
                IntGauge::new("surge_scheduler_nodes_ready", "Nodes ready")?,
            )?,
            nodes_down: reg(
                r,
                IntGauge::new("surge_scheduler_nodes_down", "Nodes down")?,
            )?,
            status_entries: reg(
                r,
                IntCounter::new(
                    "surge_scheduler_status_entries_total",
                    "Raft entries of coalesced status reports",
                )?,
            )?,
            status_updates: reg(
                r,
                IntCounter::new(
                    "surge_scheduler_status_ranges_total",
                    "Status ranges committed",
                )?,
            )?,
        })
    }
}
