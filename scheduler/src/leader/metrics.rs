//! The leader's Prometheus metrics.

use std::collections::BTreeSet;
use std::sync::Mutex;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::capacity::{Wait, Waits, LABELS_MAX, OTHER};

/// Queue-wait buckets in seconds: from a fast placement (10 ms) to a long queue (2 h).
pub fn wait_buckets() -> Vec<f64> {
    vec![
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 7200.0,
    ]
}

/// Priorities within this magnitude are their own label value; beyond, `<-N` or `>N`.
pub const PRIORITY_LABEL_MAX: i32 = 100;

/// The `priority` label of a job priority (bounded: at most 2 * PRIORITY_LABEL_MAX + 3 values).
pub fn priority_label(p: i32) -> String {
    if p > PRIORITY_LABEL_MAX {
        format!(">{PRIORITY_LABEL_MAX}")
    } else if p < -PRIORITY_LABEL_MAX {
        format!("<-{PRIORITY_LABEL_MAX}")
    } else {
        p.to_string()
    }
}

/// Most sandboxes of one observation counted one by one into a histogram; a larger count is
/// observed this many times (the prometheus crate has no weighted observe, and a 100,000-sandbox
/// placement must not cost 100,000 atomic adds on the scheduling loop). The bucket shape stays
/// exact; the count is a lower bound for such bursts.
pub const WAIT_OBSERVATIONS_MAX: u32 = 1000;

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
    /// Submit -> placed and submit -> running (`until`), per tenant and priority.
    pub queue_wait: HistogramVec,
    /// Sandboxes preempted, by the victim's tenant.
    pub tenant_preemptions: IntCounterVec,
    /// Tenants given their own label value so far (at most [`LABELS_MAX`]).
    tenants: Mutex<BTreeSet<String>>,
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
            queue_wait: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "surge_scheduler_queue_wait_seconds",
                        "Time from a job's submission until its sandboxes were placed or first \
                         reported running (until), per tenant and priority (leader only)",
                    )
                    .buckets(wait_buckets()),
                    &["tenant", "priority", "until"],
                )?,
            )?,
            tenant_preemptions: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "surge_scheduler_tenant_preemptions_total",
                        "Sandboxes preempted, by the tenant of the preempted job (leader only)",
                    ),
                    &["tenant"],
                )?,
            )?,
            tenants: Mutex::new(BTreeSet::new()),
        })
    }

    /// A tenant's label value, bounded by [`LABELS_MAX`].
    fn tenant_label(&self, tenant: &str) -> String {
        let mut seen = self
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(tenant) {
            return tenant.to_string();
        }
        if seen.len() < LABELS_MAX {
            seen.insert(tenant.to_string());
            return tenant.to_string();
        }
        OTHER.to_string()
    }

    fn observe(&self, until: &str, waits: &[Wait]) {
        for w in waits {
            let tenant = self.tenant_label(&w.tenant);
            // A tenant's preemption counter exists (at 0) from its first placement on, so
            // rate() and alerts see a series before the first preemption.
            self.tenant_preemptions.with_label_values(&[&tenant]);
            let h =
                self.queue_wait
                    .with_label_values(&[&tenant, &priority_label(w.priority), until]);
            // u64 ms -> f64 seconds: exact below 2^53 ms.
            let seconds = w.wait_ms as f64 / 1000.0;
            for _ in 0..w.count.min(WAIT_OBSERVATIONS_MAX) {
                h.observe(seconds);
            }
        }
    }

    /// Record what a committed command said about queue wait and preemption.
    pub fn record(&self, w: &Waits) {
        self.observe("placed", &w.placed);
        self.observe("running", &w.running);
        for (tenant, n) in &w.preempted {
            self.tenant_preemptions
                .with_label_values(&[&self.tenant_label(tenant)])
                .inc_by(*n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_and_tenant_labels_are_bounded() {
        assert_eq!(priority_label(5), "5");
        assert_eq!(priority_label(-100), "-100");
        assert_eq!(priority_label(101), ">100");
        assert_eq!(priority_label(i32::MIN), "<-100");
        let m = Metrics::new(&Registry::new()).expect("metrics");
        for i in 0..LABELS_MAX + 3 {
            assert_eq!(m.tenant_label(&format!("t{i}")) == OTHER, i >= LABELS_MAX);
        }
        assert_eq!(m.tenant_label("t0"), "t0", "a known tenant keeps its value");
    }

    #[test]
    fn waits_land_in_the_histogram_with_their_labels() {
        let m = Metrics::new(&Registry::new()).expect("metrics");
        let w = Waits {
            placed: vec![Wait {
                tenant: "rl".into(),
                priority: 3,
                wait_ms: 1500,
                count: 4,
            }],
            running: vec![],
            preempted: [("eval".to_string(), 2)].into(),
        };
        use prometheus::core::Collector;
        m.record(&w);
        // rl placed (its counter exists at 0), eval was preempted.
        let series = m.tenant_preemptions.collect()[0].get_metric().len();
        assert_eq!(series, 2);
        let h = m.queue_wait.with_label_values(&["rl", "3", "placed"]);
        assert_eq!(h.get_sample_count(), 4);
        assert!((h.get_sample_sum() - 6.0).abs() < 1e-9);
        assert_eq!(m.tenant_preemptions.with_label_values(&["eval"]).get(), 2);
    }
}
