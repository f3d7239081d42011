//! The node daemon's decisions, without its I/O: the desired set, the view of what runs, one
//! reconcile pass at an explicit `now`, and the hands that carry the actions out.
//!
//! ```text
//!   Assignments ─► apply ─► DesiredSet ─┐
//!                                        ├─► pass(now): reconcile() ─► dispatch ─► Hands
//!   View (what the runtime said) ────────┘                     owner tasks (real runtimes)
//!                                                              or the Fleet (simulated)
//!   Fleet: tick(now) at due() ─► exits ─► View, take_events() ─► status reports
//! ```
//!
//! The agent loop (`mod.rs`) owns one and wires it to the session, the reporter and the clock.
//! The deterministic simulator (`surge-chaos`, `sim`) owns one per simulated node daemon
//! ([`NodeCore::simulated`]) and drives it from the paused tokio clock: both run this code, so
//! there is one copy of what a node decides.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surge_proto::node as pn;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::convert::{AppliedAssignments, DesiredSet};
use super::fleet::Fleet;
use super::metrics::{GaugeValues, NodeGauges, NodeMetrics};
use super::owner::{own, OwnerCommand, OwnerContext, OWNER_INBOX_MAX, STOP_SLACK_MS};
use super::report::ReportEvent;
use super::view::View;
use super::NodeConfig;
use crate::reconcile::{reconcile, Action, ObservedSandbox, ObservedState, Resources, SandboxId};
use crate::runtime::sim::SimRuntime;
use crate::runtime::{Runtime, StartRequest};

/// Exit code a stopping sandbox is assumed to end with until its owner reports (SIGTERM).
const STOPPING_EXIT_CODE: i32 = 128 + 15;

pub(super) struct OwnerHandle {
    inbox: mpsc::Sender<OwnerCommand>,
    task: JoinHandle<()>,
}

/// Who carries out the reconciler's actions.
pub(super) enum Hands<R> {
    /// One owner task per sandbox (`owner.rs`): every real runtime.
    Owners {
        ctx: Arc<OwnerContext<R>>,
        owners: HashMap<SandboxId, OwnerHandle>,
        /// Owners told to finish (after a final `Forget`); a successor for the id waits for them.
        retiring: HashMap<SandboxId, JoinHandle<()>>,
    },
    /// The simulated fleet (`fleet.rs`): commands carried out at once, ends from one timer queue.
    Fleet(Fleet),
}

/// A bug planted in the node core on purpose, for the simulator alone: a sweep must catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePlantedBug {
    /// Sandboxes start with twice the resources the scheduler assigned (and report them).
    OversizedStarts,
}

/// One node's decision state: see the module docs.
pub struct NodeCore<R> {
    config: NodeConfig,
    metrics: Arc<NodeMetrics>,
    view: Arc<View>,
    desired: DesiredSet,
    hands: Hands<R>,
    /// Stops handed to owners: `(generation, until)`. Until then the reconciler sees the
    /// sandbox as already ended, so it does not ask again while the grace period runs.
    stopping: HashMap<SandboxId, (u64, Instant)>,
    gauges: Arc<Mutex<NodeGauges>>,
    planted: Option<NodePlantedBug>,
}

impl NodeCore<SimRuntime> {
    /// A simulated node with nothing running yet, whose actions the fleet carries out at once.
    /// The memory guard is off (the fleet does not poll memory).
    pub fn simulated(
        mut config: NodeConfig,
        runtime: Arc<SimRuntime>,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        config.memory_guard = None;
        let view = Arc::new(View::new(Vec::new()));
        let fleet = Fleet::new(
            Arc::from(config.node_id.as_str()),
            runtime,
            view.clone(),
            metrics.clone(),
        );
        Self::new(
            config,
            metrics,
            view,
            Hands::Fleet(fleet),
            Arc::new(Mutex::new(NodeGauges::default())),
        )
    }
}

impl<R: Runtime> NodeCore<R> {
    pub(super) fn new(
        config: NodeConfig,
        metrics: Arc<NodeMetrics>,
        view: Arc<View>,
        hands: Hands<R>,
        gauges: Arc<Mutex<NodeGauges>>,
    ) -> Self {
        Self {
            config,
            metrics,
            view,
            desired: DesiredSet::default(),
            hands,
            stopping: HashMap::new(),
            gauges,
            planted: None,
        }
    }

    /// Plant `bug` (the simulator's `--inject`; never set by the real daemon).
    pub fn plant(&mut self, bug: NodePlantedBug) {
        self.planted = Some(bug);
    }

    /// Fold one assignments message into the desired set (entries this node cannot understand
    /// are logged and skipped).
    pub fn apply(&mut self, a: &pn::Assignments) -> AppliedAssignments {
        let applied = self.desired.apply(a);
        let node_id = &self.config.node_id;
        for e in &applied.rejected {
            tracing::error!(node = %node_id, error = %e, "assignment ignored");
        }
        tracing::debug!(node = %node_id, revision = a.revision, full = a.full,
            upserted = applied.upserted, removed = applied.removed, "assignments");
        applied
    }

    /// Whether a pass may run: a full desired set arrived (before that, nothing is stopped).
    pub fn is_complete(&self) -> bool {
        self.desired.is_complete()
    }

    /// What the node believes runs.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// The fleet's status reports and releases since the last call, in order (owner tasks
    /// send theirs to the reporter themselves: none here).
    pub fn take_events(&mut self) -> Vec<ReportEvent> {
        self.hands.take_events()
    }

    /// When [`NodeCore::tick`] must run next (the fleet's next deadline).
    pub fn due(&self) -> Option<Instant> {
        self.hands.due()
    }

    /// Record the ends that came due by `now` (the fleet's timer queue).
    pub fn tick(&mut self, now: Instant) {
        self.hands.tick(now);
    }

    /// Cut every owner off (the daemon stops; sandboxes are left running).
    pub fn abort(&mut self) {
        self.hands.abort();
    }

    /// Zero this node's gauges (the daemon stops).
    pub fn clear_gauges(&self) {
        if let Ok(mut g) = self.gauges.lock() {
            g.clear(&self.metrics);
        }
    }

    /// One reconcile pass at `now` (stop deadlines and start decisions are stamped with it);
    /// returns whether another is needed right away (starts were capped).
    pub fn pass(&mut self, now: Instant) -> bool {
        let mut observed = self.view.snapshot();
        // The snapshot is in id order: each stop in progress is looked up, not searched for.
        self.stopping.retain(|id, (generation, until)| {
            *until > now
                && observed.binary_search_by_key(id, |o| o.id).is_ok_and(|i| {
                    let o = &observed[i];
                    o.generation == *generation && !o.state.is_terminal()
                })
        });
        for o in &mut observed {
            o.owned = self.hands.owns(o.id);
            if self
                .stopping
                .get(&o.id)
                .is_some_and(|(g, _)| *g == o.generation)
            {
                o.state = ObservedState::Exited {
                    code: STOPPING_EXIT_CODE,
                };
            }
        }
        let actions = reconcile(self.desired.iter(), &observed, &self.config.policy);
        let starts = actions
            .iter()
            .filter(|a| matches!(a, Action::Start { .. }))
            .count();
        let mut forgotten = HashSet::new();
        for action in actions {
            let id = action.id();
            if matches!(action, Action::Start { .. }) {
                forgotten.remove(&id);
            }
            if self.dispatch(action, now) == Dispatched::Forget {
                forgotten.insert(id);
            }
        }
        for id in forgotten {
            self.hands.retire(id);
        }
        self.update_gauges();
        starts >= self.config.policy.starts_max_per_pass
    }

    fn dispatch(&mut self, action: Action, now: Instant) -> Dispatched {
        let view = self.view.clone();
        match action {
            Action::Start {
                id,
                generation,
                revision,
                spec,
                resources,
            } => {
                let resources = match self.planted {
                    Some(NodePlantedBug::OversizedStarts) => Resources {
                        cpu_millis: resources.cpu_millis.saturating_mul(2),
                        memory_mib: resources.memory_mib.saturating_mul(2),
                    },
                    None => resources,
                };
                view.upsert(ObservedSandbox {
                    id,
                    generation,
                    revision,
                    state: ObservedState::Starting,
                    resources,
                    owned: true,
                });
                let req = StartRequest {
                    id,
                    generation,
                    revision,
                    spec,
                    resources,
                };
                let cmd = OwnerCommand::Start {
                    req,
                    decided_at: now,
                };
                if !self.send(id, cmd) {
                    // Not handed over: let the next pass decide again.
                    view.remove(id, generation);
                }
                Dispatched::Other
            }
            Action::Adopt { id } => {
                if !self.hands.owns(id) {
                    self.send(id, OwnerCommand::Adopt);
                }
                Dispatched::Other
            }
            Action::Forget { id } => {
                let Some(o) = view.get(id) else {
                    return Dispatched::Other;
                };
                if self.send(
                    id,
                    OwnerCommand::Forget {
                        generation: o.generation,
                    },
                ) {
                    view.remove(id, o.generation);
                    Dispatched::Forget
                } else {
                    Dispatched::Other
                }
            }
            Action::Stop {
                id,
                grace_ms,
                reason,
            } => {
                let generation = view.get(id).map(|o| o.generation);
                if self.send(id, OwnerCommand::Stop { grace_ms, reason }) {
                    if let Some(g) = generation {
                        let until =
                            now + Duration::from_millis(grace_ms.saturating_add(STOP_SLACK_MS));
                        self.stopping.insert(id, (g, until));
                    }
                }
                Dispatched::Other
            }
            Action::Checkpoint { id, revision } => {
                self.send(id, OwnerCommand::Checkpoint { revision });
                Dispatched::Other
            }
            Action::Restore { id } => {
                self.send(id, OwnerCommand::Restore);
                Dispatched::Other
            }
            Action::Pause { id } | Action::Resume { id } => {
                let pause = matches!(action, Action::Pause { .. });
                let cmd = if pause {
                    OwnerCommand::Pause
                } else {
                    OwnerCommand::Resume
                };
                if self.send(id, cmd) {
                    if let Some(o) = view.get(id) {
                        view.update(id, o.generation, |o| {
                            o.state = if pause {
                                ObservedState::Paused
                            } else {
                                ObservedState::Running
                            }
                        });
                    }
                }
                Dispatched::Other
            }
            Action::Resize {
                id,
                resources,
                revision,
            } => {
                if self.send(
                    id,
                    OwnerCommand::Resize {
                        resources,
                        revision,
                    },
                ) {
                    if let Some(o) = view.get(id) {
                        view.update(id, o.generation, |o| {
                            o.resources = resources;
                            o.revision = revision;
                        });
                    }
                }
                Dispatched::Other
            }
        }
    }

    /// Hand `cmd` to the sandbox's owner, starting one if there is none. `false`: not handed over
    /// (the owner's inbox is full; the next pass decides again).
    fn send(&mut self, id: SandboxId, cmd: OwnerCommand) -> bool {
        self.hands.send(&self.config.node_id, id, cmd)
    }

    fn update_gauges(&self) {
        let mut v = GaugeValues {
            cpu_allocatable_millis: i64::try_from(self.config.allocatable.cpu_millis)
                .unwrap_or(i64::MAX),
            memory_allocatable_mib: i64::try_from(self.config.allocatable.memory_mib)
                .unwrap_or(i64::MAX),
            ..Default::default()
        };
        self.view.for_each(|o| {
            // The states a report would name (`status_from_observed`), and "starting".
            let state = match &o.state {
                ObservedState::Starting => "starting",
                ObservedState::Running => "running",
                ObservedState::Paused => "paused",
                ObservedState::Exited { code: 0 } => "succeeded",
                ObservedState::OomKilled => "oom-killed",
                ObservedState::Checkpointed { .. } => "checkpointed",
                ObservedState::Exited { .. } | ObservedState::Failed { .. } => "failed",
            };
            *v.sandboxes.entry(state).or_default() += 1;
            if !o.state.is_terminal() && !matches!(o.state, ObservedState::Checkpointed { .. }) {
                v.cpu_allocated_millis += i64::try_from(o.resources.cpu_millis).unwrap_or(0);
                v.memory_allocated_mib += i64::try_from(o.resources.memory_mib).unwrap_or(0);
            }
        });
        if let Ok(mut g) = self.gauges.lock() {
            g.set_allocation(&self.metrics, v);
        }
    }
}

impl<R: Runtime> Hands<R> {
    fn owns(&self, id: SandboxId) -> bool {
        match self {
            Hands::Owners { owners, .. } => owners.contains_key(&id),
            Hands::Fleet(f) => f.owns(id),
        }
    }

    /// Hand `cmd` over (see [`NodeCore::send`]).
    fn send(&mut self, node_id: &str, id: SandboxId, cmd: OwnerCommand) -> bool {
        let (ctx, owners, retiring) = match self {
            Hands::Fleet(f) => {
                f.execute(id, cmd);
                return true;
            }
            Hands::Owners {
                ctx,
                owners,
                retiring,
            } => (ctx, owners, retiring),
        };
        let cmd = match owners.get(&id) {
            Some(h) => match h.inbox.try_send(cmd) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(cmd)) => {
                    tracing::debug!(node = %node_id, sandbox = %id, command = ?cmd,
                        "owner busy; deciding again on the next pass");
                    return false;
                }
                // The owner ended (it panicked): replace it.
                Err(mpsc::error::TrySendError::Closed(cmd)) => {
                    owners.remove(&id);
                    cmd
                }
            },
            None => cmd,
        };
        let (tx, rx) = mpsc::channel(OWNER_INBOX_MAX);
        let predecessor = retiring.remove(&id);
        let task = tokio::spawn(own(ctx.clone(), id, predecessor, cmd, rx));
        owners.insert(id, OwnerHandle { inbox: tx, task });
        true
    }

    /// The sandbox was forgotten: its owner finishes its queue, then ends.
    fn retire(&mut self, id: SandboxId) {
        if let Hands::Owners {
            owners, retiring, ..
        } = self
        {
            if let Some(h) = owners.remove(&id) {
                drop(h.inbox);
                retiring.insert(id, h.task);
            }
            retiring.retain(|_, t| !t.is_finished());
        }
    }

    fn take_events(&mut self) -> Vec<ReportEvent> {
        match self {
            Hands::Fleet(f) => f.take_events(),
            Hands::Owners { .. } => Vec::new(),
        }
    }

    fn due(&self) -> Option<Instant> {
        match self {
            Hands::Fleet(f) => f.due(),
            Hands::Owners { .. } => None,
        }
    }

    fn tick(&mut self, now: Instant) {
        if let Hands::Fleet(f) = self {
            f.tick(now);
        }
    }

    /// Cut every owner off (the daemon stops; sandboxes are left running).
    fn abort(&mut self) {
        if let Hands::Owners {
            owners, retiring, ..
        } = self
        {
            for (_, h) in owners.drain() {
                h.task.abort();
            }
            for (_, t) in retiring.drain() {
                t.abort();
            }
        }
    }
}

#[derive(PartialEq, Eq)]
enum Dispatched {
    Forget,
    Other,
}
