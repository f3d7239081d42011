//! One owner task per sandbox: the only code that calls the runtime for that sandbox.
//!
//! ```text
//!   agent loop ──OwnerCommand (bounded inbox)──► owner(id) ──► Runtime::{start, stop, pause, ..}
//!                                                   │  also waits for the exit and guards memory
//!                                                   ├──► View (what the runtime said)
//!                                                   └──► reporter (status changes)
//! ```
//!
//! The owner handles one command at a time, in order, so the actions the reconciler lists for a
//! sandbox (`Forget` then `Start` of a new generation, say) run in that order without locks. It
//! outlives incarnations: after a `Forget` the same task may start the next generation. It ends
//! when the agent drops its inbox (after a final `Forget`, or when the daemon stops; sandboxes are
//! left running then, to be re-adopted). A successor for the same id first waits for its
//! predecessor to finish, so two owners never act on one sandbox at once.
//!
//! Starts queue on the node's start semaphore (`--start-concurrency`): a burst of thousands of
//! assignments does not fork thousands of containers at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use surge_proto::node as pn;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::convert::{
    status_from_exit, status_from_observed, status_live, status_lost, status_start_failed,
};
use super::metrics::NodeMetrics;
use super::report::ReportEvent;
use super::view::View;
use crate::reconcile::{ObservedSandbox, ObservedState, Resources, SandboxId, StopReason};
use crate::runtime::{
    guard_memory, ExitReport, MemoryGrowth, MemoryGrowthPolicy, MemoryHeadroom, Runtime,
    RuntimeError, StartRequest,
};

/// Commands queued for one owner before the agent retries on its next pass instead.
pub const OWNER_INBOX_MAX: usize = 8;
/// OOM-prevention growths queued from the memory guard to its owner.
const GROWTH_QUEUE_MAX: usize = 4;
/// Longest a start may take (the container runtime's own bound is 30 s).
pub const START_TIMEOUT_MS: u64 = 60_000;
/// Time a stop may take beyond its grace period (SIGKILL, cgroup teardown).
pub const STOP_SLACK_MS: u64 = 15_000;
/// Time any other runtime call may take.
pub const RUNTIME_CALL_TIMEOUT_MS: u64 = 15_000;
/// Longest a checkpoint or restore may take (a 1 GiB sandbox writes or reads 1 GiB).
pub const CHECKPOINT_TIMEOUT_MS: u64 = crate::runtime::container::checkpoint::CHECKPOINT_TIMEOUT_MS;
/// Pause before waiting again for an exit after the runtime could not say.
const WAIT_RETRY_MS: u64 = 1_000;
/// A sandbox's memory may grow to at most this multiple of what it was given.
pub const MEMORY_GROWTH_FACTOR_MAX: u64 = 4;

/// What the agent asks an owner to do (the reconciler's actions, as messages).
#[derive(Debug)]
pub enum OwnerCommand {
    Start {
        req: StartRequest,
        decided_at: Instant,
    },
    Stop {
        grace_ms: u64,
        reason: StopReason,
    },
    Pause,
    Resume,
    /// Dump to disk and stop (the desired revision that asked, so a failure is not retried
    /// until the scheduler asks again).
    Checkpoint {
        revision: u64,
    },
    Restore,
    Resize {
        resources: Resources,
        revision: u64,
    },
    Adopt,
    /// Release the terminal incarnation `generation`.
    Forget {
        generation: u64,
    },
}

impl OwnerCommand {
    pub(super) fn operation(&self) -> &'static str {
        match self {
            Self::Start { .. } => "start",
            Self::Stop { .. } => "stop",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Checkpoint { .. } => "checkpoint",
            Self::Restore => "restore",
            Self::Resize { .. } => "resize",
            Self::Adopt => "adopt",
            Self::Forget { .. } => "forget",
        }
    }
}

/// What every owner of one node shares.
pub struct OwnerContext<R> {
    pub node_id: Arc<str>,
    pub runtime: Arc<R>,
    pub view: Arc<View>,
    pub reports: mpsc::Sender<ReportEvent>,
    pub start_permits: Arc<Semaphore>,
    pub metrics: Arc<NodeMetrics>,
    pub headroom: Arc<MemoryHeadroom>,
    /// `None`: no OOM prevention (the simulated runtime at scale).
    pub memory_guard: Option<MemoryGrowthPolicy>,
    /// The node's allocatable memory: no sandbox grows past it.
    pub memory_allocatable_mib: u64,
}

/// The live incarnation an owner holds.
#[derive(Clone, Copy, Debug)]
struct Held {
    generation: u64,
    revision: u64,
    resources: Resources,
    paused: bool,
    /// Memory taken from the node's growth headroom for this sandbox.
    headroom_mib: u64,
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

async fn poll_opt<T>(f: &mut Option<Boxed<'_, T>>) -> T {
    match f {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

async fn timed<T>(
    after_ms: u64,
    what: &str,
    f: impl Future<Output = Result<T, RuntimeError>>,
) -> Result<T, RuntimeError> {
    tokio::time::timeout(ms(after_ms), f)
        .await
        .unwrap_or_else(|_| {
            Err(RuntimeError::Timeout {
                what: what.to_owned(),
                after_ms,
            })
        })
}

struct Owner<'a, R> {
    ctx: &'a OwnerContext<R>,
    id: SandboxId,
    held: Option<Held>,
    /// The exit of the held incarnation, and its memory guard.
    exit: Option<Boxed<'a, Result<ExitReport, RuntimeError>>>,
    guard: Option<Boxed<'a, Result<(), RuntimeError>>>,
    growth_tx: mpsc::Sender<MemoryGrowth>,
    /// The desired revision whose checkpoint failed (not tried again for it).
    checkpoint_failed: Option<u64>,
}

/// The owner task of sandbox `id`; see the module docs.
pub async fn own<R: Runtime>(
    ctx: Arc<OwnerContext<R>>,
    id: SandboxId,
    predecessor: Option<JoinHandle<()>>,
    first: OwnerCommand,
    mut inbox: mpsc::Receiver<OwnerCommand>,
) {
    if let Some(p) = predecessor {
        let _ = p.await;
    }
    let (growth_tx, mut growth_rx) = mpsc::channel(GROWTH_QUEUE_MAX);
    let mut owner = Owner {
        ctx: &ctx,
        id,
        held: None,
        exit: None,
        guard: None,
        growth_tx,
        checkpoint_failed: None,
    };
    let mut next = Some(first);
    loop {
        let cmd = match next.take() {
            Some(c) => c,
            None => tokio::select! {
                c = inbox.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
                r = poll_opt(&mut owner.exit) => {
                    owner.exit = None;
                    owner.exited(r).await;
                    continue;
                }
                r = poll_opt(&mut owner.guard) => {
                    owner.guard = None;
                    if let Err(e) = r {
                        ctx.metrics.runtime_error("guard");
                        tracing::warn!(node = %ctx.node_id, sandbox = %id, error = %e,
                            "memory guard stopped; the sandbox runs without OOM prevention");
                    }
                    continue;
                }
                Some(g) = growth_rx.recv() => {
                    owner.grown(g).await;
                    continue;
                }
            },
        };
        let op = cmd.operation();
        if let Err(e) = owner.handle(cmd).await {
            ctx.metrics.runtime_error(op);
            tracing::warn!(node = %ctx.node_id, sandbox = %id, operation = op, error = %e,
                "runtime operation failed; the next reconcile pass decides again");
            owner.resync().await;
        }
    }
}

async fn send_status<R>(ctx: &OwnerContext<R>, status: pn::SandboxStatus) {
    // The reporter only goes away when the node stops.
    let _ = ctx.reports.send(ReportEvent::Status(status)).await;
}

impl<'a, R: Runtime> Owner<'a, R> {
    fn observed(&self, held: &Held, state: ObservedState) -> ObservedSandbox {
        ObservedSandbox {
            id: self.id,
            generation: held.generation,
            revision: held.revision,
            state,
            resources: held.resources,
            owned: true,
        }
    }

    fn live_status(&self, held: &Held) -> pn::SandboxStatus {
        status_live(self.id, held.generation, held.resources, held.paused)
    }

    /// Take (or give back) growth headroom so this sandbox accounts for `memory_mib`.
    fn account_memory(&self, held: &mut Held, memory_mib: u64) {
        let h = &self.ctx.headroom;
        if memory_mib > held.headroom_mib {
            let more = memory_mib - held.headroom_mib;
            if h.try_take(more) {
                held.headroom_mib = memory_mib;
            }
        } else {
            h.give_back(held.headroom_mib - memory_mib);
            held.headroom_mib = memory_mib;
        }
    }

    /// Start watching the held incarnation: its exit, and its memory.
    fn watch(&mut self, held: Held) {
        let rt: &'a R = &self.ctx.runtime;
        let id = self.id;
        self.exit = Some(Box::pin(rt.wait(id)));
        self.guard = self.ctx.memory_guard.map(|policy| {
            let ceiling = held
                .resources
                .memory_mib
                .saturating_mul(MEMORY_GROWTH_FACTOR_MAX)
                .min(self.ctx.memory_allocatable_mib)
                .max(held.resources.memory_mib);
            let headroom: &'a MemoryHeadroom = &self.ctx.headroom;
            let tx = self.growth_tx.clone();
            Box::pin(guard_memory(rt, id, ceiling, headroom, policy, tx)) as Boxed<'a, _>
        });
    }

    fn release(&mut self) {
        if let Some(held) = self.held.take() {
            self.ctx.headroom.give_back(held.headroom_mib);
        }
        self.exit = None;
        self.guard = None;
    }

    /// The held incarnation ended (or the runtime lost it).
    async fn exited(&mut self, r: Result<ExitReport, RuntimeError>) {
        match r {
            Ok(report) => self.finish(report, None).await,
            Err(RuntimeError::NotFound { .. }) => {
                let Some(held) = self.held else { return };
                self.release();
                self.ctx.view.remove(self.id, held.generation);
                self.ctx.view.changed.notify_one();
                self.ctx.metrics.runtime_error("wait");
                send_status(
                    self.ctx,
                    status_lost(
                        self.id,
                        held.generation,
                        held.resources,
                        format!(
                            "the {} runtime lost track of the sandbox",
                            self.ctx.runtime.name()
                        ),
                    ),
                )
                .await;
            }
            Err(e) => {
                self.ctx.metrics.runtime_error("wait");
                tracing::warn!(node = %self.ctx.node_id, sandbox = %self.id, error = %e,
                    "could not wait for the sandbox's exit; trying again");
                let rt: &'a R = &self.ctx.runtime;
                let id = self.id;
                self.exit = Some(Box::pin(async move {
                    tokio::time::sleep(ms(WAIT_RETRY_MS)).await;
                    rt.wait(id).await
                }));
            }
        }
    }

    /// Record and report how an incarnation ended.
    async fn finish(&mut self, report: ExitReport, stopped: Option<StopReason>) {
        let resources = self
            .held
            .map(|h| h.resources)
            .or_else(|| self.ctx.view.get(self.id).map(|o| o.resources))
            .unwrap_or_default();
        let revision = self.held.map_or(0, |h| h.revision);
        self.release();
        self.ctx.view.upsert(ObservedSandbox {
            id: self.id,
            generation: report.generation,
            revision,
            state: report.state.clone(),
            resources,
            owned: true,
        });
        send_status(self.ctx, status_from_exit(&report, resources, stopped)).await;
    }

    async fn grown(&mut self, g: MemoryGrowth) {
        let Some(mut held) = self.held else { return };
        if g.generation != held.generation {
            return;
        }
        // The guard took `added_mib` from the headroom itself.
        held.headroom_mib += g.added_mib;
        held.resources = g.resources;
        self.held = Some(held);
        self.ctx.metrics.oom_prevention_resizes.inc();
        self.ctx
            .view
            .update(self.id, held.generation, |o| o.resources = g.resources);
        send_status(self.ctx, self.live_status(&held)).await;
    }

    /// After a failed call: make the view say what the runtime says.
    async fn resync(&mut self) {
        let rt = &self.ctx.runtime;
        match timed(RUNTIME_CALL_TIMEOUT_MS, "status", rt.status(self.id)).await {
            Ok(mut o) => {
                o.owned = true;
                if let Some(held) = self.held.as_mut() {
                    held.paused = o.state == ObservedState::Paused;
                    held.resources = o.resources;
                    held.revision = o.revision;
                }
                self.ctx.view.upsert(o);
            }
            Err(RuntimeError::NotFound { .. }) => {
                if let Some(o) = self.ctx.view.get(self.id) {
                    if self.held.is_none() && !o.state.is_terminal() {
                        self.ctx.view.remove(self.id, o.generation);
                    }
                }
            }
            Err(_) => {}
        }
        self.ctx.view.changed.notify_one();
    }

    async fn handle(&mut self, cmd: OwnerCommand) -> Result<(), RuntimeError> {
        let rt: &'a R = &self.ctx.runtime;
        let id = self.id;
        match cmd {
            OwnerCommand::Start { req, decided_at } => {
                if let Some(h) = self.held {
                    tracing::debug!(sandbox = %id, generation = h.generation, "already running; start ignored");
                    return Ok(());
                }
                let generation = req.generation;
                let resources = req.resources;
                let permit = self.ctx.start_permits.clone().acquire_owned().await;
                // A fork restores a checkpoint of its source (the forks of one job share it).
                let started = match req.spec.fork_of {
                    Some(source) => {
                        let fork = rt.fork(source, id.job, req.clone());
                        timed(START_TIMEOUT_MS, "fork", fork).await
                    }
                    None => timed(START_TIMEOUT_MS, "start", rt.start(req.clone())).await,
                };
                drop(permit);
                match started {
                    Ok(_) => {
                        self.ctx
                            .metrics
                            .start_seconds
                            .observe(decided_at.elapsed().as_secs_f64());
                        let mut held = Held {
                            generation,
                            revision: req.revision,
                            resources,
                            paused: false,
                            headroom_mib: 0,
                        };
                        self.account_memory(&mut held, resources.memory_mib);
                        self.held = Some(held);
                        self.ctx
                            .view
                            .upsert(self.observed(&held, ObservedState::Running));
                        send_status(self.ctx, self.live_status(&held)).await;
                        self.watch(held);
                    }
                    Err(e) => {
                        self.ctx.metrics.runtime_error("start");
                        tracing::warn!(node = %self.ctx.node_id, sandbox = %id, error = %e, "sandbox failed to start");
                        // The runtime may keep a record (the container runtime does, as `Failed`).
                        let kept = timed(RUNTIME_CALL_TIMEOUT_MS, "status", rt.status(id))
                            .await
                            .ok()
                            .filter(|o| o.generation == generation);
                        let state = match kept {
                            Some(o) if !o.state.is_terminal() => {
                                // It came up after all (e.g. slowly): own it.
                                let held = Held {
                                    generation,
                                    revision: o.revision,
                                    resources: o.resources,
                                    paused: o.state == ObservedState::Paused,
                                    headroom_mib: 0,
                                };
                                self.held = Some(held);
                                self.ctx.view.upsert(ObservedSandbox { owned: true, ..o });
                                send_status(self.ctx, self.live_status(&held)).await;
                                self.watch(held);
                                return Ok(());
                            }
                            Some(o) => o.state,
                            None => ObservedState::Failed {
                                reason: e.to_string(),
                            },
                        };
                        self.ctx.view.upsert(ObservedSandbox {
                            id,
                            generation,
                            revision: req.revision,
                            state,
                            resources,
                            owned: true,
                        });
                        send_status(
                            self.ctx,
                            status_start_failed(id, generation, resources, e.to_string()),
                        )
                        .await;
                    }
                }
            }
            OwnerCommand::Stop { grace_ms, reason } => {
                let stopped = timed(
                    grace_ms.saturating_add(STOP_SLACK_MS),
                    "stop",
                    rt.stop(id, ms(grace_ms)),
                )
                .await;
                match stopped {
                    Ok(report) => self.finish(report, Some(reason)).await,
                    Err(RuntimeError::NotFound { .. }) => {
                        if let Some(o) = self.ctx.view.get(id) {
                            self.ctx.view.remove(id, o.generation);
                        }
                        self.release();
                    }
                    Err(e) => return Err(e),
                }
            }
            OwnerCommand::Pause | OwnerCommand::Resume => {
                let pause = matches!(cmd, OwnerCommand::Pause);
                if pause {
                    timed(RUNTIME_CALL_TIMEOUT_MS, "pause", rt.pause(id)).await?;
                } else {
                    timed(RUNTIME_CALL_TIMEOUT_MS, "resume", rt.resume(id)).await?;
                }
                if let Some(held) = self.held.as_mut() {
                    held.paused = pause;
                    let held = *held;
                    let state = if pause {
                        ObservedState::Paused
                    } else {
                        ObservedState::Running
                    };
                    self.ctx.view.upsert(self.observed(&held, state));
                    send_status(self.ctx, self.live_status(&held)).await;
                }
            }
            OwnerCommand::Checkpoint { revision } => self.checkpoint(revision).await?,
            OwnerCommand::Restore => self.restore().await?,
            OwnerCommand::Resize {
                resources,
                revision,
            } => {
                timed(
                    RUNTIME_CALL_TIMEOUT_MS,
                    "resize",
                    rt.resize(id, resources, revision),
                )
                .await?;
                if let Some(mut held) = self.held {
                    held.resources = resources;
                    held.revision = revision;
                    self.account_memory(&mut held, resources.memory_mib);
                    self.held = Some(held);
                    let state = if held.paused {
                        ObservedState::Paused
                    } else {
                        ObservedState::Running
                    };
                    self.ctx.view.upsert(self.observed(&held, state));
                    send_status(self.ctx, self.live_status(&held)).await;
                }
            }
            OwnerCommand::Adopt => {
                if self.held.is_some() {
                    return Ok(());
                }
                let o = match timed(RUNTIME_CALL_TIMEOUT_MS, "status", rt.status(id)).await {
                    Ok(o) => o,
                    Err(RuntimeError::NotFound { .. }) => return Ok(()),
                    Err(e) => return Err(e),
                };
                if o.state.is_terminal() {
                    let report = timed(RUNTIME_CALL_TIMEOUT_MS, "wait", rt.wait(id)).await?;
                    self.finish(report, None).await;
                    return Ok(());
                }
                if matches!(o.state, ObservedState::Checkpointed { .. }) {
                    // Nothing runs: nothing to hold or watch until a restore.
                    let o = ObservedSandbox { owned: true, ..o };
                    self.ctx.view.upsert(o.clone());
                    send_status(self.ctx, status_from_observed(&o)).await;
                    return Ok(());
                }
                let mut held = Held {
                    generation: o.generation,
                    revision: o.revision,
                    resources: o.resources,
                    paused: o.state == ObservedState::Paused,
                    headroom_mib: 0,
                };
                self.account_memory(&mut held, o.resources.memory_mib);
                self.held = Some(held);
                tracing::info!(node = %self.ctx.node_id, sandbox = %id, generation = o.generation,
                    "adopted a sandbox that survived a daemon restart");
                self.ctx.view.upsert(ObservedSandbox {
                    owned: true,
                    ..o.clone()
                });
                send_status(self.ctx, status_from_observed(&o)).await;
                self.watch(held);
            }
            OwnerCommand::Forget { generation } => {
                if let Some(h) = self.held {
                    tracing::warn!(sandbox = %id, generation = h.generation, "refusing to forget a live sandbox");
                    return Ok(());
                }
                match timed(RUNTIME_CALL_TIMEOUT_MS, "forget", rt.remove(id)).await {
                    Ok(()) | Err(RuntimeError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                self.ctx.view.remove(id, generation);
                let _ = self
                    .ctx
                    .reports
                    .send(ReportEvent::Forget { id, generation })
                    .await;
            }
        }
        Ok(())
    }

    async fn checkpoint(&mut self, revision: u64) -> Result<(), RuntimeError> {
        let Some(held) = self.held else {
            return Ok(()); // already checkpointed (a repeated command), or not running
        };
        if self.checkpoint_failed == Some(revision) {
            return Ok(());
        }
        let rt: &'a R = &self.ctx.runtime;
        let id = self.id;
        // The exit the watcher would see is the dump stopping the container, not an end.
        self.exit = None;
        self.guard = None;
        let dumped = timed(
            CHECKPOINT_TIMEOUT_MS.saturating_add(STOP_SLACK_MS),
            "checkpoint",
            rt.checkpoint(id),
        )
        .await;
        match dumped {
            Ok(image_bytes) => {
                self.release();
                let o = ObservedSandbox {
                    state: ObservedState::Checkpointed { image_bytes },
                    ..self.observed(&held, ObservedState::Running)
                };
                self.ctx.view.upsert(o.clone());
                self.ctx.view.changed.notify_one();
                send_status(self.ctx, status_from_observed(&o)).await;
            }
            Err(e) => {
                self.ctx.metrics.runtime_error("checkpoint");
                tracing::warn!(node = %self.ctx.node_id, sandbox = %id, error = %e,
                    "checkpoint failed; the sandbox keeps running");
                self.checkpoint_failed = Some(revision);
                // Still ours: watch it again (a sandbox that died in the attempt is reported
                // by the watcher as it ended).
                self.watch(held);
                let mut status = self.live_status(&held);
                status.message = format!("checkpoint failed: {e}");
                send_status(self.ctx, status).await;
            }
        }
        Ok(())
    }

    async fn restore(&mut self) -> Result<(), RuntimeError> {
        if self.held.is_some() {
            return Ok(()); // already restored (a repeated command)
        }
        let Some(o) = self.ctx.view.get(self.id) else {
            return Ok(());
        };
        if !matches!(o.state, ObservedState::Checkpointed { .. }) {
            return Ok(());
        }
        let rt: &'a R = &self.ctx.runtime;
        let id = self.id;
        let permit = self.ctx.start_permits.clone().acquire_owned().await;
        let restored = timed(
            CHECKPOINT_TIMEOUT_MS.saturating_add(STOP_SLACK_MS),
            "restore",
            rt.restore(id),
        )
        .await;
        drop(permit);
        match restored {
            Ok(()) => {
                let mut held = Held {
                    generation: o.generation,
                    revision: o.revision,
                    resources: o.resources,
                    paused: false,
                    headroom_mib: 0,
                };
                self.account_memory(&mut held, o.resources.memory_mib);
                self.held = Some(held);
                self.checkpoint_failed = None;
                self.ctx
                    .view
                    .upsert(self.observed(&held, ObservedState::Running));
                self.ctx.view.changed.notify_one();
                send_status(self.ctx, self.live_status(&held)).await;
                self.watch(held);
            }
            Err(e) => {
                // The image could not be brought back: the sandbox ends, a runtime error.
                self.ctx.metrics.runtime_error("restore");
                tracing::warn!(node = %self.ctx.node_id, sandbox = %id, error = %e, "restore failed");
                self.ctx.view.upsert(ObservedSandbox {
                    state: ObservedState::Failed {
                        reason: e.to_string(),
                    },
                    owned: true,
                    ..o.clone()
                });
                self.ctx.view.changed.notify_one();
                send_status(
                    self.ctx,
                    status_start_failed(id, o.generation, o.resources, e.to_string()),
                )
                .await;
            }
        }
        Ok(())
    }
}
