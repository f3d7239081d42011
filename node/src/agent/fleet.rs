//! The simulated fleet: a simulated node's hands without a task per sandbox.
//!
//! ```text
//!   agent loop ── OwnerCommand ──► Fleet::execute ──► SimRuntime::{start,stop,..}_now  (at once)
//!        │                              ├──► View (what the runtime said)
//!        │                              └──► events ──► reporter (flushed by the agent loop)
//!        └── at Fleet::due() ──► Fleet::tick ──► SimRuntime::ended ──► View, events
//!                                    ▲
//!                 one timer queue per node: (instant, sandbox, generation)
//! ```
//!
//! A real runtime needs one owner task per sandbox (`owner.rs`): its calls take time, fail and
//! time out independently, and each sandbox's exit is awaited on its own. The simulated runtime
//! does nothing but arithmetic on the clock, so `surge node --simulate N` would spend its CPU on
//! the owners themselves: a task, two channels and a timer per sandbox, ~16 KiB each, for
//! 100,000 sandboxes per process. The fleet carries out the same commands, in the same order,
//! with the same effects on the view and the same status reports, inside the agent loop, and
//! learns of exits from one queue of deadlines per node.
//!
//! What the fleet does not do: OOM prevention (simulated nodes at scale run without the memory
//! guard, as they always have) and start concurrency (starting a simulated sandbox is free; the
//! reconciler still caps starts per pass).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::convert::{
    status_from_exit, status_from_observed, status_live, status_lost, status_start_failed,
};
use super::metrics::NodeMetrics;
use super::owner::OwnerCommand;
use super::report::ReportEvent;
use super::view::View;
use crate::reconcile::{ObservedSandbox, ObservedState, Resources, SandboxId, StopReason};
use crate::runtime::sim::{SimRuntime, SimStop};
use crate::runtime::{ExitReport, RuntimeError};

/// Stale timer entries tolerated beyond one per held sandbox before the queue is rebuilt.
const STALE_TIMERS_MAX: usize = 1_024;

/// The live incarnation the fleet holds for one sandbox (what an owner task would hold).
#[derive(Clone, Copy, Debug)]
struct Held {
    generation: u64,
    revision: u64,
    resources: Resources,
    paused: bool,
    /// Why it is being stopped, while a stop is in progress.
    stopping: Option<StopReason>,
}

impl Held {
    /// The incarnation the runtime shows running (or paused), not being stopped.
    fn of(o: &ObservedSandbox) -> Held {
        Held {
            generation: o.generation,
            revision: o.revision,
            resources: o.resources,
            paused: o.state == ObservedState::Paused,
            stopping: None,
        }
    }
}

/// See the module docs.
pub struct Fleet {
    node_id: Arc<str>,
    runtime: Arc<SimRuntime>,
    view: Arc<View>,
    metrics: Arc<NodeMetrics>,
    held: HashMap<SandboxId, Held>,
    /// When a held sandbox may end by itself. An entry whose incarnation is no longer held, or
    /// that has not ended when it comes due, is dropped then; a change that moves a deadline
    /// pushes a new entry.
    timers: BinaryHeap<Reverse<(Instant, SandboxId, u64)>>,
    /// Status reports and releases for the reporter, in order.
    events: Vec<ReportEvent>,
}

impl Fleet {
    pub fn new(
        node_id: Arc<str>,
        runtime: Arc<SimRuntime>,
        view: Arc<View>,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        Self {
            node_id,
            runtime,
            view,
            metrics,
            held: HashMap::new(),
            timers: BinaryHeap::new(),
            events: Vec::new(),
        }
    }

    /// Whether the fleet holds a live incarnation of `id` (the reconciler's `owned`).
    pub fn owns(&self, id: SandboxId) -> bool {
        self.held.contains_key(&id)
    }

    /// Sandboxes held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The reports produced since the last call, for the reporter.
    pub fn take_events(&mut self) -> Vec<ReportEvent> {
        std::mem::take(&mut self.events)
    }

    /// When [`Fleet::tick`] must run next.
    pub fn due(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Carry out one command for sandbox `id` now, as its owner task would.
    pub fn execute(&mut self, id: SandboxId, cmd: OwnerCommand) {
        let op = cmd.operation();
        if let Err(e) = self.handle(id, cmd) {
            self.metrics.runtime_error(op);
            tracing::warn!(node = %self.node_id, sandbox = %id, operation = op, error = %e,
                "runtime operation failed; the next reconcile pass decides again");
            self.resync(id);
        }
    }

    /// Record the ends that came due by `now`.
    pub fn tick(&mut self, now: Instant) {
        while let Some(Reverse((at, id, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(held) = self.held.get(&id).copied() else {
                continue;
            };
            if held.generation != generation {
                continue;
            }
            match self.runtime.ended(id, generation) {
                Ok(Some(report)) => self.finish(id, report, held.stopping),
                // Still running: its deadline moved, and the change pushed a new entry.
                Ok(None) => {}
                Err(RuntimeError::NotFound { .. }) => {
                    self.held.remove(&id);
                    self.view.remove(id, generation);
                    self.view.changed.notify_one();
                    self.metrics.runtime_error("wait");
                    self.events.push(ReportEvent::Status(status_lost(
                        id,
                        generation,
                        held.resources,
                        "the sim runtime lost track of the sandbox".to_owned(),
                    )));
                }
                Err(e) => {
                    self.metrics.runtime_error("wait");
                    tracing::warn!(node = %self.node_id, sandbox = %id, error = %e,
                        "could not learn how the sandbox ended; looking again");
                    self.timers
                        .push(Reverse((now + Duration::from_secs(1), id, generation)));
                }
            }
        }
    }

    /// Watch for the next event of `id`'s held incarnation.
    fn arm(&mut self, id: SandboxId, generation: u64) {
        if let Ok(Some(at)) = self.runtime.deadline_of(id) {
            self.timers.push(Reverse((at, id, generation)));
        }
        if self.timers.len() > self.held.len() + STALE_TIMERS_MAX {
            self.rebuild_timers();
        }
    }

    fn rebuild_timers(&mut self) {
        let mut timers = BinaryHeap::with_capacity(self.held.len());
        for (id, h) in &self.held {
            if let Ok(Some(at)) = self.runtime.deadline_of(*id) {
                timers.push(Reverse((at, *id, h.generation)));
            }
        }
        self.timers = timers;
    }

    fn status(&mut self, s: surge_proto::node::SandboxStatus) {
        self.events.push(ReportEvent::Status(s));
    }

    fn observed(id: SandboxId, held: &Held) -> ObservedSandbox {
        ObservedSandbox {
            id,
            generation: held.generation,
            revision: held.revision,
            state: if held.paused {
                ObservedState::Paused
            } else {
                ObservedState::Running
            },
            resources: held.resources,
            owned: true,
        }
    }

    /// Hold a live incarnation: view, report, and watch its end.
    fn hold(&mut self, id: SandboxId, held: Held) {
        self.held.insert(id, held);
        self.view.upsert(Self::observed(id, &held));
        self.status(status_live(
            id,
            held.generation,
            held.resources,
            held.paused,
        ));
        self.arm(id, held.generation);
    }

    /// Record and report how an incarnation ended.
    fn finish(&mut self, id: SandboxId, report: ExitReport, stopped: Option<StopReason>) {
        let held = self.held.remove(&id);
        let resources = held
            .map(|h| h.resources)
            .or_else(|| self.view.get(id).map(|o| o.resources))
            .unwrap_or_default();
        self.view.upsert(ObservedSandbox {
            id,
            generation: report.generation,
            revision: held.map_or(0, |h| h.revision),
            state: report.state.clone(),
            resources,
            owned: true,
        });
        self.status(status_from_exit(&report, resources, stopped));
    }

    fn handle(&mut self, id: SandboxId, cmd: OwnerCommand) -> Result<(), RuntimeError> {
        let rt = self.runtime.clone();
        match cmd {
            OwnerCommand::Start { req, decided_at } => {
                if let Some(h) = self.held.get(&id) {
                    tracing::debug!(sandbox = %id, generation = h.generation, "already running; start ignored");
                    return Ok(());
                }
                match rt.start_now(&req) {
                    Ok(_) => {
                        self.metrics
                            .start_seconds
                            .observe(decided_at.elapsed().as_secs_f64());
                        self.hold(
                            id,
                            Held {
                                generation: req.generation,
                                revision: req.revision,
                                resources: req.resources,
                                paused: false,
                                stopping: None,
                            },
                        );
                    }
                    Err(e) => {
                        self.metrics.runtime_error("start");
                        tracing::warn!(node = %self.node_id, sandbox = %id, error = %e, "sandbox failed to start");
                        let kept = rt
                            .status_now(id)
                            .ok()
                            .filter(|o| o.generation == req.generation);
                        let state = match kept {
                            Some(o) if !o.state.is_terminal() => {
                                // It runs after all: hold it.
                                self.hold(id, Held::of(&o));
                                return Ok(());
                            }
                            Some(o) => o.state,
                            None => ObservedState::Failed {
                                reason: e.to_string(),
                            },
                        };
                        self.view.upsert(ObservedSandbox {
                            id,
                            generation: req.generation,
                            revision: req.revision,
                            state,
                            resources: req.resources,
                            owned: true,
                        });
                        self.status(status_start_failed(
                            id,
                            req.generation,
                            req.resources,
                            e.to_string(),
                        ));
                    }
                }
            }
            OwnerCommand::Stop { grace_ms, reason } => {
                match rt.stop_now(id, Duration::from_millis(grace_ms)) {
                    Ok(SimStop::Exited(report)) => self.finish(id, report, Some(reason)),
                    Ok(SimStop::EndsAt(_)) => {
                        if let Some(h) = self.held.get_mut(&id) {
                            h.stopping = Some(reason);
                            let generation = h.generation;
                            self.arm(id, generation);
                        }
                    }
                    Err(RuntimeError::NotFound { .. }) => {
                        if let Some(o) = self.view.get(id) {
                            self.view.remove(id, o.generation);
                        }
                        self.held.remove(&id);
                    }
                    Err(e) => return Err(e),
                }
            }
            OwnerCommand::Checkpoint { .. } | OwnerCommand::Restore => {
                // The simulated runtime registers checkpoint=false; the scheduler never asks.
                return Err(RuntimeError::Checkpoint {
                    id,
                    reason: "the sim runtime cannot checkpoint sandboxes".into(),
                });
            }
            OwnerCommand::Pause | OwnerCommand::Resume => {
                let pause = matches!(cmd, OwnerCommand::Pause);
                if pause {
                    rt.pause_now(id)?;
                } else {
                    rt.resume_now(id)?;
                }
                if let Some(h) = self.held.get_mut(&id) {
                    h.paused = pause;
                    let held = *h;
                    self.view.upsert(Self::observed(id, &held));
                    self.status(status_live(id, held.generation, held.resources, pause));
                    if !pause {
                        self.arm(id, held.generation);
                    }
                }
            }
            OwnerCommand::Resize {
                resources,
                revision,
            } => {
                rt.resize_now(id, resources, revision)?;
                if let Some(h) = self.held.get_mut(&id) {
                    h.resources = resources;
                    h.revision = revision;
                    let held = *h;
                    self.view.upsert(Self::observed(id, &held));
                    self.status(status_live(id, held.generation, resources, held.paused));
                    // A shrink below what it uses ended it: that is due now.
                    self.arm(id, held.generation);
                }
            }
            OwnerCommand::Adopt => {
                if self.held.contains_key(&id) {
                    return Ok(());
                }
                let o = match rt.status_now(id) {
                    Ok(o) => o,
                    Err(RuntimeError::NotFound { .. }) => return Ok(()),
                    Err(e) => return Err(e),
                };
                if o.state.is_terminal() {
                    if let Some(report) = rt.ended(id, o.generation)? {
                        self.finish(id, report, None);
                    }
                    return Ok(());
                }
                tracing::info!(node = %self.node_id, sandbox = %id, generation = o.generation,
                    "adopted a sandbox that survived a daemon restart");
                self.held.insert(id, Held::of(&o));
                self.view.upsert(ObservedSandbox {
                    owned: true,
                    ..o.clone()
                });
                self.status(status_from_observed(&o));
                self.arm(id, o.generation);
            }
            OwnerCommand::Forget { generation } => {
                if let Some(h) = self.held.get(&id) {
                    tracing::warn!(sandbox = %id, generation = h.generation, "refusing to forget a live sandbox");
                    return Ok(());
                }
                match rt.remove_now(id) {
                    Ok(()) | Err(RuntimeError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                self.view.remove(id, generation);
                self.events.push(ReportEvent::Forget { id, generation });
            }
        }
        Ok(())
    }

    /// After a failed call: make the view say what the runtime says.
    fn resync(&mut self, id: SandboxId) {
        match self.runtime.status_now(id) {
            Ok(mut o) => {
                o.owned = true;
                if let Some(h) = self.held.get_mut(&id) {
                    h.paused = o.state == ObservedState::Paused;
                    h.resources = o.resources;
                    h.revision = o.revision;
                }
                self.view.upsert(o);
            }
            Err(RuntimeError::NotFound { .. }) => {
                if let Some(o) = self.view.get(id) {
                    if !self.held.contains_key(&id) && !o.state.is_terminal() {
                        self.view.remove(id, o.generation);
                    }
                }
            }
            Err(_) => {}
        }
        self.view.changed.notify_one();
    }
}
