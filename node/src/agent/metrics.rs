//! Prometheus metrics of the node daemon (`surge_node_*`), served on `--metrics ADDR` at
//! `/metrics`.
//!
//! One [`NodeMetrics`] serves the whole process. With `--simulate N` the N simulated nodes add into
//! the same series (a process-wide view, which is what a benchmark watches): every node keeps its
//! own last contribution in a [`NodeGauges`] and moves the shared gauges by the difference, so
//! totals stay exact as nodes come and go.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::AgentError;

/// The report states, in the order the sandbox gauge lists them.
pub const SANDBOX_STATES: [&str; 7] = [
    "starting",
    "running",
    "paused",
    "succeeded",
    "failed",
    "oom-killed",
    "lost",
];

/// See the module docs.
pub struct NodeMetrics {
    registry: Registry,
    pub sandboxes: IntGaugeVec,
    pub start_seconds: Histogram,
    pub cpu_allocatable_millis: IntGauge,
    pub cpu_allocated_millis: IntGauge,
    pub cpu_used_millis: IntGauge,
    pub memory_allocatable_mib: IntGauge,
    pub memory_allocated_mib: IntGauge,
    pub memory_used_mib: IntGauge,
    pub oom_prevention_resizes: IntCounter,
    pub runtime_errors: IntCounterVec,
    pub reports_sent: IntCounter,
    pub report_updates_sent: IntCounter,
    pub report_failures: IntCounter,
    pub reconnects: IntCounter,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<T, prometheus::Error>,
) -> Result<T, AgentError> {
    let metric = metric.map_err(AgentError::Metrics)?;
    registry
        .register(Box::new(metric.clone()))
        .map_err(AgentError::Metrics)?;
    Ok(metric)
}

impl NodeMetrics {
    pub fn new() -> Result<Self, AgentError> {
        let r = Registry::new();
        let gauge = |name: &str, help: &str| register(&r, IntGauge::new(name, help));
        Ok(Self {
            sandboxes: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "surge_node_sandboxes",
                        "Sandboxes held by the node, by state",
                    ),
                    &["state"],
                ),
            )?,
            start_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "surge_node_sandbox_start_seconds",
                        "Time from the start decision to a running sandbox (queueing included)",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ]),
                ),
            )?,
            cpu_allocatable_millis: gauge(
                "surge_node_cpu_allocatable_millis",
                "CPU the node offers to sandboxes",
            )?,
            cpu_allocated_millis: gauge(
                "surge_node_cpu_allocated_millis",
                "CPU reserved by live sandboxes",
            )?,
            cpu_used_millis: gauge(
                "surge_node_cpu_used_millis",
                "CPU used by sandboxes, averaged over the last heartbeat interval",
            )?,
            memory_allocatable_mib: gauge(
                "surge_node_memory_allocatable_mib",
                "Memory the node offers to sandboxes",
            )?,
            memory_allocated_mib: gauge(
                "surge_node_memory_allocated_mib",
                "Memory reserved by live sandboxes (OOM-prevention growth included)",
            )?,
            memory_used_mib: gauge(
                "surge_node_memory_used_mib",
                "Working set of live sandboxes",
            )?,
            oom_prevention_resizes: register(
                &r,
                IntCounter::new(
                    "surge_node_oom_prevention_resizes_total",
                    "Memory limits grown by the node to prevent an OOM kill",
                ),
            )?,
            runtime_errors: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "surge_node_runtime_errors_total",
                        "Runtime operations that failed, by operation",
                    ),
                    &["operation"],
                ),
            )?,
            reports_sent: register(
                &r,
                IntCounter::new(
                    "surge_node_reports_sent_total",
                    "ReportStatus calls acknowledged by the scheduler",
                ),
            )?,
            report_updates_sent: register(
                &r,
                IntCounter::new(
                    "surge_node_report_updates_sent_total",
                    "Sandbox status updates acknowledged by the scheduler",
                ),
            )?,
            report_failures: register(
                &r,
                IntCounter::new(
                    "surge_node_report_failures_total",
                    "ReportStatus calls that failed (their updates are resent)",
                ),
            )?,
            reconnects: register(
                &r,
                IntCounter::new(
                    "surge_node_reconnects_total",
                    "Sessions with the scheduler that ended and were started again",
                ),
            )?,
            registry: r,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn runtime_error(&self, operation: &str) {
        self.runtime_errors.with_label_values(&[operation]).inc();
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut body = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut body)?;
        Ok(body)
    }
}

/// What one node contributes to the shared gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GaugeValues {
    pub sandboxes: BTreeMap<&'static str, i64>,
    pub cpu_allocatable_millis: i64,
    pub cpu_allocated_millis: i64,
    pub cpu_used_millis: i64,
    pub memory_allocatable_mib: i64,
    pub memory_allocated_mib: i64,
    pub memory_used_mib: i64,
}

/// One node's last contribution; see the module docs.
#[derive(Default)]
pub struct NodeGauges {
    last: GaugeValues,
}

impl NodeGauges {
    /// Move the shared gauges from this node's last contribution to `new`.
    pub fn set(&mut self, m: &NodeMetrics, new: GaugeValues) {
        for state in SANDBOX_STATES {
            let old = self.last.sandboxes.get(state).copied().unwrap_or(0);
            let now = new.sandboxes.get(state).copied().unwrap_or(0);
            if old != now {
                m.sandboxes.with_label_values(&[state]).add(now - old);
            }
        }
        let pairs = [
            (
                &m.cpu_allocatable_millis,
                self.last.cpu_allocatable_millis,
                new.cpu_allocatable_millis,
            ),
            (
                &m.cpu_allocated_millis,
                self.last.cpu_allocated_millis,
                new.cpu_allocated_millis,
            ),
            (
                &m.cpu_used_millis,
                self.last.cpu_used_millis,
                new.cpu_used_millis,
            ),
            (
                &m.memory_allocatable_mib,
                self.last.memory_allocatable_mib,
                new.memory_allocatable_mib,
            ),
            (
                &m.memory_allocated_mib,
                self.last.memory_allocated_mib,
                new.memory_allocated_mib,
            ),
            (
                &m.memory_used_mib,
                self.last.memory_used_mib,
                new.memory_used_mib,
            ),
        ];
        for (gauge, old, now) in pairs {
            if old != now {
                gauge.add(now - old);
            }
        }
        self.last = new;
    }

    /// Take only the usage figures from `used` (set by the heartbeat, not by reconcile passes).
    pub fn set_used(&mut self, m: &NodeMetrics, cpu_used_millis: i64, memory_used_mib: i64) {
        let new = GaugeValues {
            cpu_used_millis,
            memory_used_mib,
            ..self.last.clone()
        };
        self.set(m, new);
    }

    /// Update everything but the usage figures.
    pub fn set_allocation(&mut self, m: &NodeMetrics, mut new: GaugeValues) {
        new.cpu_used_millis = self.last.cpu_used_millis;
        new.memory_used_mib = self.last.memory_used_mib;
        self.set(m, new);
    }

    /// Withdraw this node's contribution (the node stops).
    pub fn clear(&mut self, m: &NodeMetrics) {
        self.set(m, GaugeValues::default());
    }
}

/// Serve `/metrics` on a bound listener until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<NodeMetrics>,
) -> Result<(), AgentError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tracing::info!(%addr, "serving /metrics");
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    axum::serve(listener, app)
        .await
        .map_err(|source| AgentError::MetricsListen { addr, source })
}

async fn scrape(State(metrics): State<Arc<NodeMetrics>>) -> impl IntoResponse {
    match metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string().into_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_add_their_differences_into_shared_gauges() {
        let m = NodeMetrics::new().expect("metrics");
        let mut a = NodeGauges::default();
        let mut b = NodeGauges::default();
        let values = |running: i64, mem: i64| GaugeValues {
            sandboxes: [("running", running)].into_iter().collect(),
            memory_allocated_mib: mem,
            ..Default::default()
        };
        a.set_allocation(&m, values(3, 300));
        b.set_allocation(&m, values(2, 200));
        a.set_allocation(&m, values(1, 100));
        a.set_used(&m, 50, 10);
        assert_eq!(m.sandboxes.with_label_values(&["running"]).get(), 3);
        assert_eq!(m.memory_allocated_mib.get(), 300);
        assert_eq!(m.memory_used_mib.get(), 10);
        a.set_allocation(&m, values(1, 100));
        assert_eq!(m.memory_used_mib.get(), 10, "allocation updates keep usage");
        a.clear(&m);
        assert_eq!(m.sandboxes.with_label_values(&["running"]).get(), 2);
        assert_eq!(m.memory_used_mib.get(), 0);
        let text = String::from_utf8(m.encode().expect("encode")).expect("utf8");
        assert!(text.contains("surge_node_sandboxes{state=\"running\"} 2"));
    }
}
