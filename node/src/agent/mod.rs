//! The `surge node` daemon: keeps the sandboxes the scheduler assigns to this node running, and
//! tells the scheduler how they are doing.
//!
//! ```text
//!            ┌──────────── session (connection.rs) ─────────────┐
//!  scheduler ─┤ RegisterNode · Heartbeat · WatchAssignments(from 0) ├─ Assignments ─┐
//!  replicas   └──────────────────────────────────────────────────┘                │
//!      ▲                                                                           ▼
//!      │ ReportStatus (batched,           agent loop (this file): DesiredSet + View ─► reconcile()
//!      │ full after each connect)                │ actions, as typed messages            (pure)
//!   reporter (report.rs) ◄── status ── owner task per sandbox (owner.rs) ──► Runtime
//!                                               └─ writes what the runtime said into the View
//! ```
//!
//! How to drive it: build a [`NodeConfig`], a runtime (`Arc<R: Runtime>`), shared [`Replicas`]
//! and [`NodeMetrics`], then `NodeAgent::new(..).run(stop)`. `surge node` does this through
//! [`run_daemon`], once per node (`--simulate N` runs N of them in one process).
//!
//! The loop's decisions live in [`node_core::NodeCore`] (desired set, view, one reconcile pass at
//! an explicit `now`, the hands that carry actions out); this file wires it to the session, the
//! reporter and the clock. The deterministic simulator (`surge-chaos`) drives the same type.
//!
//! The rules that keep it safe:
//! * **Restart-proof.** On start the agent lists the runtime and re-adopts what still runs. It
//!   changes nothing until the first *full* desired set arrives; then the reconciler stops what
//!   is not assigned.
//! * **Scheduler-loss-proof.** Sandboxes keep running without a session. Each new session
//!   re-registers, sends a full report and watches from revision 0, so the agent reconciles against
//!   the complete set whatever it missed.
//! * **One owner per sandbox.** Only its owner task calls the runtime for a sandbox; the agent
//!   loop sends it commands over a bounded inbox and never waits on it. Simulated nodes
//!   ([`NodeAgent::simulated`], what `--simulate N` runs) hand the same commands to the fleet
//!   (`fleet.rs`) instead, which carries them out at once and learns of exits from one timer
//!   queue per node: the simulated runtime never waits on anything but the clock, and a task,
//!   two channels and a timer per sandbox were most of what a simulating process spent.
//! * **Level-triggered.** A pass runs on every assignment, on every change an owner records, and
//!   every `resync_interval` anyway; a command dropped because an inbox was full is simply
//!   decided again on the next pass.

pub mod activity;
pub mod config;
pub mod connection;
pub mod convert;
pub mod daemon;
pub mod fleet;
pub mod heartbeats;
pub mod io_server;
pub mod metrics;
pub mod node_core;
pub mod owner;
pub mod report;
pub mod template_server;
pub mod view;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surge_proto::node as pn;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

pub use config::{DaemonConfig, RuntimeChoice, RuntimeFlag};
pub use connection::Replicas;
pub use daemon::run_daemon;
pub use metrics::NodeMetrics;

use crate::reconcile::{ReconcilePolicy, Resources};
use crate::runtime::sim::SimRuntime;
use crate::runtime::{MemoryGrowthPolicy, MemoryHeadroom, Runtime, RuntimeError};
use crate::template::TemplateError;
use connection::{Session, ASSIGNMENTS_QUEUE_MAX, CALL_TIMEOUT_MS};
use convert::{resources_to_pb, status_from_observed};
use fleet::Fleet;
use metrics::NodeGauges;
use node_core::{Hands, NodeCore};
use owner::OwnerContext;
use report::{ReportEvent, Reporter, REPORT_QUEUE_MAX};
use view::View;

/// Reconcile passes run at least this often, changes or not.
pub const RESYNC_INTERVAL_MS: u64 = 1_000;
/// How often the node looks for templates added (`surge template import`) or removed while it
/// runs; a change re-registers the node so placement sees the new list.
pub const TEMPLATE_RESCAN_INTERVAL_MS: u64 = 2_000;
/// ... and at most once per this interval, however many changes arrive (coalescing).
pub const PASS_INTERVAL_MIN_MS: u64 = 10;
/// Control messages queued for the reporter (connect, disconnect).
const REPORTER_CONTROL_MAX: usize = 4;

/// Errors of the node daemon, each saying what to change.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--runtime krun is not available in this build of surge (the libkrun microVM runtime is not implemented yet); use --runtime container, or --runtime auto to pick the best available")]
    KrunUnavailable,
    #[error(
        "no scheduler address given: pass --server HOST:PORT[,HOST:PORT...] or set SURGE_SERVER"
    )]
    NoServers,
    #[error("bad --server address {0:?}: expected HOST:PORT (several separated by commas)")]
    BadServer(String),
    #[error("bad --label {0:?}: expected KEY=VALUE, the key made of letters, digits, `-_./`, at most 63 bytes")]
    BadLabel(String),
    #[error("{flag} {asked} is more than this host has ({host}); give at most what the host has, or leave the flag out")]
    MoreThanHost {
        flag: &'static str,
        asked: String,
        host: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("data dir {path}: {source}; pass a writable --data-dir")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("metrics registry: {0}")]
    Metrics(#[source] prometheus::Error),
    #[error("cannot serve /metrics on {addr}: {source}; pick another --metrics address")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node} stopped unexpectedly: {reason}")]
    NodeFailed { node: String, reason: String },
}

/// One node's settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: String,
    /// Where the node's I/O service (exec and files) is reached: replicas dial it.
    pub address: String,
    pub allocatable: Resources,
    pub labels: BTreeMap<String, String>,
    pub os: String,
    pub arch: String,
    pub pool: String,
    pub templates: Vec<String>,
    /// The node's data dir, whose templates are rescanned while it runs (`None`: the list in
    /// `templates` is fixed, as for simulated nodes).
    pub template_data_dir: Option<std::path::PathBuf>,
    pub max_sandboxes: u32,
    /// Sandboxes starting at once.
    pub start_concurrency: usize,
    pub policy: ReconcilePolicy,
    /// OOM prevention; `None` turns it off (simulated nodes at scale).
    pub memory_guard: Option<MemoryGrowthPolicy>,
    pub call_timeout: Duration,
    pub resync_interval: Duration,
    /// Replica to try first: nodes of one process spread their sessions over the replicas.
    pub first_replica: usize,
    /// Sandboxes used (exec or file calls) since the last report: the I/O service touches it,
    /// the reporter sends it with its next report (input of idle timeouts).
    pub activity: Arc<activity::Activity>,
}

impl NodeConfig {
    /// Defaults for everything but identity and size.
    pub fn new(node_id: impl Into<String>, allocatable: Resources) -> Self {
        Self {
            node_id: node_id.into(),
            address: String::new(),
            allocatable,
            labels: BTreeMap::new(),
            os: std::env::consts::OS.to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
            pool: String::new(),
            templates: vec![crate::template::DEFAULT_TEMPLATE.to_owned()],
            template_data_dir: None,
            max_sandboxes: 0,
            start_concurrency: config::START_CONCURRENCY_DEFAULT,
            policy: ReconcilePolicy::default(),
            memory_guard: Some(MemoryGrowthPolicy::default()),
            call_timeout: Duration::from_millis(CALL_TIMEOUT_MS),
            resync_interval: Duration::from_millis(RESYNC_INTERVAL_MS),
            first_replica: 0,
            activity: Arc::default(),
        }
    }

    fn registration(&self, runtime: &str) -> pn::RegisterNodeRequest {
        pn::RegisterNodeRequest {
            node_id: self.node_id.clone(),
            address: self.address.clone(),
            allocatable: Some(resources_to_pb(self.allocatable)),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            os: self.os.clone(),
            arch: self.arch.clone(),
            pool: self.pool.clone(),
            templates: self.templates.clone(),
            max_sandboxes: self.max_sandboxes,
            runtime: runtime.to_owned(),
        }
    }
}

/// One node: see the module docs.
pub struct NodeAgent<R> {
    config: NodeConfig,
    runtime: Arc<R>,
    replicas: Arc<Replicas>,
    metrics: Arc<NodeMetrics>,
    /// `Some`: a simulated node whose actions the fleet carries out (no task per sandbox).
    fleet: Option<Arc<SimRuntime>>,
}

impl NodeAgent<SimRuntime> {
    /// A simulated node whose actions are carried out by the fleet (`fleet.rs`) instead of one
    /// owner task per sandbox: what `surge node --simulate N` runs, at 100 sandboxes or more per
    /// node. The memory guard is off (the fleet does not poll memory).
    pub fn simulated(
        mut config: NodeConfig,
        runtime: Arc<SimRuntime>,
        replicas: Arc<Replicas>,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        config.memory_guard = None;
        Self {
            config,
            fleet: Some(runtime.clone()),
            runtime,
            replicas,
            metrics,
        }
    }
}

impl<R: Runtime> NodeAgent<R> {
    pub fn new(
        config: NodeConfig,
        runtime: Arc<R>,
        replicas: Arc<Replicas>,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        Self {
            config,
            runtime,
            replicas,
            metrics,
            fleet: None,
        }
    }

    /// Run until `stop` turns true. Sandboxes are left running (a new agent re-adopts them).
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), AgentError> {
        let Self {
            config,
            runtime,
            replicas,
            metrics,
            fleet,
        } = self;
        let node_id = config.node_id.clone();

        // What survived a previous daemon: adopted once the desired set says it is wanted.
        let found = tokio::time::timeout(config.call_timeout, runtime.list())
            .await
            .map_err(|_| {
                AgentError::Runtime(RuntimeError::Timeout {
                    what: format!("listing the {} runtime's sandboxes", runtime.name()),
                    after_ms: u64::try_from(config.call_timeout.as_millis()).unwrap_or(u64::MAX),
                })
            })??;
        if !found.is_empty() {
            tracing::info!(node = %node_id, sandboxes = found.len(),
                "found sandboxes from a previous run; they are kept until the scheduler's desired set arrives");
        }
        let view = Arc::new(View::new(found.clone()));
        let gauges = Arc::new(Mutex::new(NodeGauges::default()));

        let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE_MAX);
        let (control_tx, control_rx) = mpsc::channel(REPORTER_CONTROL_MAX);
        let (assign_tx, mut assign_rx) = mpsc::channel(ASSIGNMENTS_QUEUE_MAX);

        let reporter = tokio::spawn(
            Reporter {
                node_id: node_id.clone(),
                events: report_rx,
                control: control_rx,
                metrics: metrics.clone(),
                call_timeout: config.call_timeout,
                activity: config.activity.clone(),
            }
            .run(stop.clone()),
        );
        for o in &found {
            let _ = report_tx
                .send(ReportEvent::Status(status_from_observed(o)))
                .await;
        }
        let (templates_tx, templates_rx) = watch::channel(config.templates.clone());
        let rescan = config
            .template_data_dir
            .clone()
            .map(|dir| tokio::spawn(rescan_templates(node_id.clone(), dir, templates_tx)));
        let session = tokio::spawn(
            Session {
                registration: config.registration(runtime.name()),
                templates: templates_rx,
                replicas,
                first_replica: config.first_replica,
                runtime: runtime.clone(),
                view: view.clone(),
                assignments: assign_tx,
                reporter: control_tx,
                metrics: metrics.clone(),
                gauges: gauges.clone(),
                call_timeout: config.call_timeout,
            }
            .run(stop.clone()),
        );

        let hands = match fleet {
            Some(sim) => Hands::Fleet(Fleet::new(
                Arc::from(node_id.as_str()),
                sim,
                view.clone(),
                metrics.clone(),
            )),
            None => Hands::Owners {
                ctx: Arc::new(OwnerContext {
                    node_id: Arc::from(node_id.as_str()),
                    runtime,
                    view: view.clone(),
                    reports: report_tx.clone(),
                    start_permits: Arc::new(Semaphore::new(config.start_concurrency.max(1))),
                    metrics: metrics.clone(),
                    headroom: Arc::new(MemoryHeadroom::new(config.allocatable.memory_mib)),
                    memory_guard: config.memory_guard,
                    memory_allocatable_mib: config.allocatable.memory_mib,
                }),
                owners: HashMap::new(),
                retiring: HashMap::new(),
            },
        };
        let resync_interval = config.resync_interval;
        let mut agent = NodeCore::new(config, metrics.clone(), view.clone(), hands, gauges);

        let mut resync = tokio::time::interval(resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopping = stop.clone();
        let mut dirty = false;
        let mut next_pass_at = Instant::now();
        let result = loop {
            // The fleet's reports go to the reporter in order; it drains its queue while it
            // sends, so this wait is short.
            for event in agent.take_events() {
                if report_tx.send(event).await.is_err() {
                    break;
                }
            }
            let ready = dirty && agent.is_complete();
            let due = agent.due();
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break Ok(()),
                a = assign_rx.recv() => {
                    let Some(a) = a else {
                        if *stopping.borrow() {
                            break Ok(()); // the session saw the stop first
                        }
                        break Err(AgentError::NodeFailed {
                            node: node_id.clone(),
                            reason: "the scheduler session task ended".into(),
                        });
                    };
                    agent.apply(&a);
                    dirty = true;
                }
                () = view.changed.notified() => dirty = true,
                _ = resync.tick() => dirty = true,
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    agent.tick(Instant::now());
                }
                () = tokio::time::sleep_until(next_pass_at), if ready => {
                    // The loop reads the clock once per pass; the pass decides on that reading.
                    let now = Instant::now();
                    dirty = agent.pass(now);
                    next_pass_at = now + Duration::from_millis(PASS_INTERVAL_MIN_MS);
                }
            }
        };

        // Leave the sandboxes running; a new agent re-adopts them. Owners are cut off mid-call,
        // as a crash would, which the runtimes tolerate (their state is on disk or in memory).
        agent.abort();
        session.abort();
        reporter.abort();
        if let Some(r) = rescan {
            r.abort();
        }
        agent.clear_gauges();
        result
    }
}

/// Keep `list` equal to the templates installed under `data_dir`, looking every
/// [`TEMPLATE_RESCAN_INTERVAL_MS`]. Ends when nobody listens any more.
async fn rescan_templates(
    node_id: String,
    data_dir: std::path::PathBuf,
    list: watch::Sender<Vec<String>>,
) {
    let templates = crate::template::Templates::new(&data_dir);
    let mut tick = tokio::time::interval(Duration::from_millis(TEMPLATE_RESCAN_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if list.is_closed() {
            return;
        }
        let t = templates.clone();
        match tokio::task::spawn_blocking(move || t.list()).await {
            Ok(Ok(mut now)) => {
                if now.len() > crate::template::TEMPLATES_MAX {
                    tracing::warn!(node = %node_id, held = now.len(), max = crate::template::TEMPLATES_MAX,
                        "more templates than a node may declare; reporting the first ones by name");
                    now.truncate(crate::template::TEMPLATES_MAX);
                }
                list.send_if_modified(|held| {
                    if *held == now {
                        return false;
                    }
                    tracing::info!(node = %node_id, templates = ?now, "templates changed; re-registering");
                    *held = now;
                    true
                });
            }
            Ok(Err(e)) => tracing::warn!(node = %node_id, error = %e, "cannot list templates"),
            Err(e) => tracing::warn!(node = %node_id, error = %e, "listing templates panicked"),
        }
    }
}
