//! The leader's async shell: three tasks that feed events into the core (`core.rs`) and carry
//! its effects out through the [`Host`]. They own the timers (liveness every
//! [`LIVENESS_INTERVAL`], planning between [`SCHEDULE_INTERVAL_MIN`] and [`SCHEDULE_INTERVAL`],
//! reports within [`REPORT_BATCH_WINDOW`]) and decide nothing themselves.
//!
//! The tasks are apart so that a slow plan commit never delays a liveness check or a report.
//! Heartbeats arrive on gRPC handlers and are written straight into the core's table under a
//! short lock; the planner's state belongs to the scheduling task alone.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus::Registry;
use tokio::runtime::RuntimeFlavor;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use super::core::{self, CoreConfig, Heartbeats, Lifetimes, Planner, ReportBatch};
use super::{
    Host, Metrics, LIFETIME_INTERVAL, LIVENESS_INTERVAL, REPORT_BATCH_WINDOW, REPORT_QUEUE_MAX,
    SCHEDULE_INTERVAL, SCHEDULE_INTERVAL_MIN,
};
use crate::command::{Command, Response, StatusRange};
use crate::model::Resources;
use crate::outcomes::OutcomeReport;
use crate::placement;
use crate::service::Replica;

type ReportWaiter = oneshot::Sender<Result<(), String>>;
type QueuedReport = (Vec<StatusRange>, Vec<OutcomeReport>, ReportWaiter);

/// The leader's in-memory side on one replica.
pub struct Leader<H: Host = Replica> {
    host: H,
    config: CoreConfig,
    pub node_ttl_ms: u64,
    heartbeats: Mutex<Heartbeats>,
    lifetimes: Mutex<Lifetimes>,
    reports_tx: mpsc::Sender<QueuedReport>,
    pub metrics: Metrics,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl<H: Host> Leader<H> {
    /// Create the leader side and spawn its tasks (they idle while this replica follows).
    pub fn start(
        host: H,
        node_ttl_ms: u64,
        registry: &Registry,
    ) -> Result<Arc<Self>, prometheus::Error> {
        Self::start_with(host, CoreConfig::new(node_ttl_ms), registry)
    }

    /// [`Leader::start`] with the whole core configuration (the simulator plants bugs here).
    pub fn start_with(
        host: H,
        config: CoreConfig,
        registry: &Registry,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let (reports_tx, reports_rx) = mpsc::channel(REPORT_QUEUE_MAX);
        let leader = Arc::new(Leader {
            host,
            config,
            node_ttl_ms: config.node_ttl_ms,
            heartbeats: Mutex::new(Heartbeats::new(config.node_ttl_ms)),
            lifetimes: Mutex::new(Lifetimes::default()),
            reports_tx,
            metrics: Metrics::new(registry)?,
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = vec![
            tokio::spawn(batch_reports(leader.clone(), reports_rx)).abort_handle(),
            tokio::spawn(watch_liveness(leader.clone())).abort_handle(),
            tokio::spawn(schedule(leader.clone())).abort_handle(),
            tokio::spawn(watch_lifetimes(leader.clone())).abort_handle(),
        ];
        *lock(&leader.tasks) = tasks;
        Ok(leader)
    }

    /// End the tasks (a replica that stops, or a simulated one that crashes).
    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    fn heartbeats(&self) -> MutexGuard<'_, Heartbeats> {
        lock(&self.heartbeats)
    }

    /// Event: `node` was heard from.
    pub fn heartbeat(&self, node: &str, used: Resources, running: u32) {
        let now_ms = self.host.now_ms();
        self.heartbeats().heartbeat(node, used, running, now_ms);
    }

    /// Event: a node reported these sandboxes used (an exec or a file call).
    pub fn touch(&self, ids: impl IntoIterator<Item = (u64, u32)>) {
        lock(&self.lifetimes).touch(ids);
    }

    pub fn used(&self, node: &str) -> Resources {
        self.heartbeats().used(node)
    }

    /// Queue reports for the next batch; resolves once they are committed.
    pub async fn report(
        &self,
        ranges: Vec<StatusRange>,
        outcomes: Vec<OutcomeReport>,
    ) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.reports_tx
            .try_send((ranges, outcomes, tx))
            .map_err(|_| "status queue full; retry shortly".to_string())?;
        rx.await.map_err(|_| "status batcher stopped".to_string())?
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Collect queued reports for a short window and commit them as one entry.
async fn batch_reports<H: Host>(leader: Arc<Leader<H>>, mut rx: mpsc::Receiver<QueuedReport>) {
    while let Some((r, o, w)) = rx.recv().await {
        let mut batch = ReportBatch::default();
        batch.add(r, o);
        let mut waiters = vec![w];
        let deadline = tokio::time::Instant::now() + REPORT_BATCH_WINDOW;
        while !batch.is_full() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((r, o, w))) => {
                    batch.add(r, o);
                    waiters.push(w);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let (command, n) = batch.flush(leader.host.now_ms());
        let waits = leader
            .host
            .read(|s, _| crate::capacity::waits_of(s, &command));
        let result = leader
            .host
            .propose(&command)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        if result.is_ok() {
            leader.metrics.status_entries.inc();
            leader.metrics.status_updates.inc_by(n);
            leader.metrics.record(&waits);
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Mark nodes silent past their TTL down (through Raft); only transitions are logged.
async fn watch_liveness<H: Host>(leader: Arc<Leader<H>>) {
    loop {
        tokio::time::sleep(LIVENESS_INTERVAL).await;
        let leading = leader.host.is_leader();
        let now_ms = leader.host.now_ms();
        let Some(down) = leader
            .host
            .read(|s, _| leader.heartbeats().check(s, leading, now_ms))
        else {
            continue;
        };
        for command in down {
            if let Command::SetNodeState { node, .. } = &command {
                tracing::warn!(node = %node, ttl_ms = leader.node_ttl_ms, "node silent past its TTL; marking it down");
            }
            if let Err(e) = leader.host.propose(&command).await {
                tracing::warn!(error = %e, "could not mark node down");
            }
        }
        let (ready, down) = leader.host.read(|s, _| core::node_counts(s));
        leader.metrics.nodes_ready.set(ready as i64);
        leader.metrics.nodes_down.set(down as i64);
    }
}

/// Deadlines: every [`LIFETIME_INTERVAL`] let the core turn activity into `Touch` and passed
/// deadlines into `Expire`, and propose them. The core looks only at the state's deadline index.
async fn watch_lifetimes<H: Host>(leader: Arc<Leader<H>>) {
    loop {
        tokio::time::sleep(LIFETIME_INTERVAL).await;
        let now_ms = leader.host.now_ms();
        let commands = if leader.host.is_leader() {
            leader
                .host
                .read(|s, _| lock(&leader.lifetimes).check(s, true, now_ms))
        } else {
            // A follower gathers nothing (nodes report to the leader) and reads no state.
            lock(&leader.lifetimes).step_down();
            Vec::new()
        };
        for command in commands {
            match leader.host.propose(&command).await {
                Ok((_, Response::Expired { stopped })) if stopped > 0 => {
                    tracing::info!(
                        stopped,
                        "sandboxes past a deadline (ttl, idle or lease) asked to stop"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lifetime entry not committed"),
            }
        }
    }
}

/// Placement may take a while on a long queue: off the async workers where there are several.
/// (The simulator's single-threaded runtime cannot block in place, and need not.)
fn place(input: &placement::PlacementInput) -> placement::Plan {
    let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
    if matches!(flavor, Ok(RuntimeFlavor::MultiThread)) {
        tokio::task::block_in_place(|| placement::place(input))
    } else {
        placement::place(input)
    }
}

/// The scheduling loop: on a change of the applied state (at most every
/// [`SCHEDULE_INTERVAL_MIN`], at least every [`SCHEDULE_INTERVAL`]) let the planner decide and
/// propose its plan.
async fn schedule<H: Host>(leader: Arc<Leader<H>>) {
    let mut applied = leader.host.subscribe_applied();
    let mut planner = Planner::new(&leader.config);
    loop {
        // Wake on a change of the state, or periodically.
        let _ = tokio::time::timeout(SCHEDULE_INTERVAL, applied.changed()).await;
        tokio::time::sleep(SCHEDULE_INTERVAL_MIN).await;
        if !leader.host.is_leader() {
            planner.step_down();
            continue;
        }
        if planner.is_current(leader.host.applied_index()) {
            continue;
        }
        let started = Instant::now();
        let now_ms = leader.host.now_ms();
        let cycle = leader
            .host
            .read(|s, applied| planner.prepare(s, applied, now_ms));
        leader.metrics.pending_sandboxes.set(cycle.pending() as i64);
        let plan = cycle.input().map(|input| {
            let place_started = Instant::now();
            let plan = place(input);
            leader
                .metrics
                .place_seconds
                .observe(place_started.elapsed().as_secs_f64());
            plan
        });
        let Some(command) = planner.finish(cycle, plan, leader.host.now_ms()) else {
            continue;
        };
        let waits = leader
            .host
            .read(|s, _| crate::capacity::waits_of(s, &command));
        match leader.host.propose(&command).await {
            Ok((
                index,
                Response::PlanApplied {
                    placed,
                    preempted,
                    rejected,
                },
            )) => {
                leader.metrics.plans.inc();
                leader.metrics.placements.inc_by(placed);
                leader.metrics.preemptions.inc_by(preempted);
                leader.metrics.plan_rejections.inc_by(rejected);
                // A plan partly refused at apply placed less than it says: its waits are not
                // recorded rather than recorded wrong (refusals follow a stale snapshot, rarely).
                if rejected == 0 {
                    leader.metrics.record(&waits);
                }
                leader
                    .metrics
                    .plan_seconds
                    .observe(started.elapsed().as_secs_f64());
                if placed > 0 || preempted > 0 {
                    tracing::info!(placed, preempted, rejected, index, "plan committed");
                }
            }
            Ok((_, other)) => tracing::warn!(?other, "unexpected reply to a plan"),
            Err(e) => tracing::warn!(error = %e, "plan not committed"),
        }
    }
}
