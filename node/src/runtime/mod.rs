//! Sandbox runtimes: the I/O side of the node daemon. The agent executes the reconciler's actions
//! through the [`Runtime`] trait; there is one implementation per way of isolating a sandbox:
//!
//! * [`container::ContainerRuntime`]: OCI containers through `crun` (namespaces + cgroups) for hosts
//!   without hardware virtualization;
//! * [`krun::KrunRuntime`]: a libkrun microVM per sandbox, for hosts with hardware virtualization;
//! * [`sim::SimRuntime`]: no process at all, a simulated lifetime, for scale tests and `surge bench`.
//!
//! The two process-backed runtimes share their skeleton: [`cgroup`] (finding the v1/v2
//! hierarchies, one sandbox's limits, usage and OOM evidence), [`supervise`] (the on-disk record,
//! liveness by pid and start time, re-adoption, list, finalize, exit reports, remove) and
//! [`sandbox_dir`] (atomic JSON records, the overlay root, the template). What each does its own
//! way (crun and its shim; the VMM process and libkrun) stays in its module.
//!
//! The trait uses `impl Future + Send` return types (async functions in a trait), so it is not
//! object-safe: the agent is generic over `R: Runtime`, and `main` picks the implementation once
//! (`match kind { Container => run(ContainerRuntime..), Sim => run(SimRuntime..) }`). That keeps
//! every call statically dispatched and allocation-free, which matters for the simulated runtime
//! that hosts thousands of sandboxes per process.
//!
//! Also here, because it only needs the trait: OOM prevention ([`plan_memory_growth`], pure, and
//! [`guard_memory`], the task that applies it).

use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use crate::reconcile::{ObservedSandbox, ObservedState, Resources, SandboxId, SandboxSpec};

pub mod cgroup;
pub mod container;
pub mod io;
pub mod krun;
pub mod sandbox_dir;
pub mod sim;
pub mod supervise;

/// Bytes of stdout and of stderr kept for an exit report.
pub const LOG_TAIL_MAX_BYTES: usize = 64 * 1024;

pub const MIB: u64 = 1024 * 1024;

/// Everything needed to start one incarnation of a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    pub id: SandboxId,
    pub generation: u64,
    /// Desired revision the initial limits come from (see `reconcile`).
    pub revision: u64,
    pub spec: SandboxSpec,
    pub resources: Resources,
}

/// A started sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxHandle {
    pub id: SandboxId,
    pub generation: u64,
    /// Host pid of the sandbox's first process, when there is one.
    pub pid: Option<u32>,
}

/// How a sandbox ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    pub id: SandboxId,
    pub generation: u64,
    /// Always terminal: `Exited`, `Failed` or `OomKilled`.
    pub state: ObservedState,
    /// Exit status as a shell reports it (128 + signal for a signal), when known.
    pub code: Option<i32>,
    /// The last [`LOG_TAIL_MAX_BYTES`] of each stream (lossy UTF-8).
    pub stdout_tail: String,
    pub stderr_tail: String,
}

/// Resource usage of a live sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Working set: charged memory minus inactive page cache (what an OOM kill is about).
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    /// Cumulative CPU time; the caller derives a rate from two samples.
    pub cpu_usage_ns: u64,
}

/// Errors of a runtime operation, each naming the sandbox and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("sandbox {id} is not known to the {runtime} runtime (never started here, or already forgotten)")]
    NotFound {
        id: SandboxId,
        runtime: &'static str,
    },
    #[error("sandbox {id} already exists (generation {generation}); forget it before starting a new incarnation")]
    AlreadyExists { id: SandboxId, generation: u64 },
    #[error("sandbox {id} is {state:?}; cannot {operation} it")]
    WrongState {
        id: SandboxId,
        state: ObservedState,
        operation: &'static str,
    },
    #[error("template `{template}` is not installed at {path}; import it (surge node template import) or use `busybox`")]
    TemplateMissing { template: String, path: String },
    #[error("sandbox {id} failed to start: {reason}; runtime stderr: {stderr_tail}")]
    StartFailed {
        id: SandboxId,
        reason: String,
        stderr_tail: String,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what} did not finish within {after_ms} ms")]
    Timeout { what: String, after_ms: u64 },
    #[error("sandbox {id}: cannot resize to {resources:?}: {reason}")]
    ResizeRejected {
        id: SandboxId,
        resources: Resources,
        reason: String,
    },
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not supported by this runtime")]
    Unsupported(&'static str),
    #[error("sandbox {id}: cannot checkpoint or restore: {reason}")]
    Checkpoint { id: SandboxId, reason: String },
}

impl RuntimeError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// A way to run sandboxes on this node. One sandbox id has at most one incarnation here at a time.
pub trait Runtime: Send + Sync + 'static {
    /// Short name for logs and errors ("container", "sim").
    fn name(&self) -> &'static str;

    /// Start an incarnation; returns once it runs (or fails with the runtime's own message).
    fn start(
        &self,
        req: StartRequest,
    ) -> impl Future<Output = Result<SandboxHandle, RuntimeError>> + Send;

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended. Stopping a terminal sandbox
    /// returns its report.
    fn stop(
        &self,
        id: SandboxId,
        grace: Duration,
    ) -> impl Future<Output = Result<ExitReport, RuntimeError>> + Send;

    /// Freeze every process of the sandbox, keeping its memory ("close the lid").
    fn pause(&self, id: SandboxId) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    fn resume(&self, id: SandboxId) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Change CPU and memory limits in place; `revision` is recorded with them (see `reconcile`).
    fn resize(
        &self,
        id: SandboxId,
        resources: Resources,
        revision: u64,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Current state, cheaply (no subprocess): safe to call every few hundred milliseconds.
    fn status(
        &self,
        id: SandboxId,
    ) -> impl Future<Output = Result<ObservedSandbox, RuntimeError>> + Send;

    /// Wait until the sandbox ends.
    fn wait(&self, id: SandboxId) -> impl Future<Output = Result<ExitReport, RuntimeError>> + Send;

    fn usage(&self, id: SandboxId) -> impl Future<Output = Result<Usage, RuntimeError>> + Send;

    /// Every sandbox this runtime holds, including ones started by a previous daemon process
    /// (re-adoption after a restart) and terminal records not yet forgotten. `owned` is `false`.
    fn list(&self) -> impl Future<Output = Result<Vec<ObservedSandbox>, RuntimeError>> + Send;

    /// Checkpoint the sandbox to the node's disk and stop it (CRIU); returns the image's size
    /// in bytes. On failure the sandbox keeps running.
    fn checkpoint(&self, id: SandboxId) -> impl Future<Output = Result<u64, RuntimeError>> + Send {
        let reason = self.checkpoint_support().err().unwrap_or_default();
        std::future::ready(Err(RuntimeError::Checkpoint { id, reason }))
    }

    /// Restore a checkpointed sandbox on this node; it runs again from where it was.
    fn restore(&self, id: SandboxId) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        let reason = self.checkpoint_support().err().unwrap_or_default();
        std::future::ready(Err(RuntimeError::Checkpoint { id, reason }))
    }

    /// Start `req` as a fork of the running sandbox `source`: restored from a checkpoint of it
    /// (which keeps running), with a copy of its filesystem. The forks of one fork job (`key`)
    /// share one checkpoint.
    fn fork(
        &self,
        source: SandboxId,
        key: u64,
        req: StartRequest,
    ) -> impl Future<Output = Result<SandboxHandle, RuntimeError>> + Send {
        let _ = (key, req);
        let reason = self.checkpoint_support().err().unwrap_or_default();
        std::future::ready(Err(RuntimeError::Checkpoint { id: source, reason }))
    }

    /// `Ok` when this node can checkpoint its sandboxes, else why not, in one line.
    fn checkpoint_support(&self) -> Result<(), String> {
        Err(format!(
            "the {} runtime cannot checkpoint sandboxes",
            self.name()
        ))
    }

    /// Release everything of a terminal sandbox (the reconciler's `Forget`).
    fn remove(&self, id: SandboxId) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

/// The last `max` bytes of `bytes`, as text.
pub fn tail_text(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last `max` bytes of a file, without reading all of it; a missing file is empty.
pub fn read_tail(path: &Path, max: usize) -> Result<String, RuntimeError> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(RuntimeError::io(format!("open {}", path.display()), e)),
    };
    let ctx = |e| RuntimeError::io(format!("read {}", path.display()), e);
    let len = file.metadata().map_err(ctx)?.len();
    let max_u64 = u64::try_from(max).unwrap_or(u64::MAX);
    file.seek(SeekFrom::Start(len.saturating_sub(max_u64)))
        .map_err(ctx)?;
    let mut buf = Vec::with_capacity(max.min(usize::try_from(len).unwrap_or(max)));
    file.take(max_u64).read_to_end(&mut buf).map_err(ctx)?;
    Ok(tail_text(&buf, max))
}

// ---- OOM prevention ----

/// When and how much the node grows a sandbox's memory under pressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryGrowthPolicy {
    /// Grow when the working set exceeds this share of the limit.
    pub threshold_percent: u64,
    /// Grow by this share of the current limit ...
    pub step_percent: u64,
    /// ... but at least this much ...
    pub step_min_mib: u64,
    /// ... and at most this much per step.
    pub step_max_mib: u64,
    /// A grant smaller than this is not worth a resize (the sandbox will be OOM-killed instead).
    pub step_floor_mib: u64,
    pub poll_interval_ms: u64,
}

impl Default for MemoryGrowthPolicy {
    fn default() -> Self {
        Self {
            threshold_percent: 90,
            step_percent: 25,
            step_min_mib: 256,
            step_max_mib: 4096,
            step_floor_mib: 16,
            poll_interval_ms: 100,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrowthDecision {
    /// Below the threshold.
    NoPressure,
    Grow {
        new_memory_mib: u64,
        added_mib: u64,
    },
    /// Under pressure but the sandbox already has its per-sandbox ceiling.
    AtCeiling {
        ceiling_mib: u64,
    },
    /// Under pressure and the node cannot spare `step_floor_mib`.
    NoHeadroom {
        wanted_mib: u64,
        headroom_mib: u64,
    },
}

/// Decide whether a sandbox using `used_bytes` of a `limit_mib` limit should grow, given what the
/// node can spare (`headroom_mib`) and the sandbox's ceiling.
pub fn plan_memory_growth(
    used_bytes: u64,
    limit_mib: u64,
    headroom_mib: u64,
    ceiling_mib: u64,
    policy: &MemoryGrowthPolicy,
) -> GrowthDecision {
    let limit_bytes = limit_mib.saturating_mul(MIB);
    if u128::from(used_bytes) * 100 < u128::from(limit_bytes) * u128::from(policy.threshold_percent)
    {
        return GrowthDecision::NoPressure;
    }
    let to_ceiling = ceiling_mib.saturating_sub(limit_mib);
    if to_ceiling == 0 {
        return GrowthDecision::AtCeiling { ceiling_mib };
    }
    let wanted = (limit_mib.saturating_mul(policy.step_percent) / 100)
        .clamp(
            policy.step_min_mib,
            policy.step_max_mib.max(policy.step_min_mib),
        )
        .min(to_ceiling);
    let step = wanted.min(headroom_mib);
    if step < policy.step_floor_mib.min(wanted).max(1) {
        return GrowthDecision::NoHeadroom {
            wanted_mib: wanted,
            headroom_mib,
        };
    }
    GrowthDecision::Grow {
        new_memory_mib: limit_mib + step,
        added_mib: step,
    }
}

/// Memory the node can still hand out for OOM-prevention growth (allocatable minus reservations),
/// shared by all guards of a node.
#[derive(Debug, Default)]
pub struct MemoryHeadroom {
    available_mib: AtomicU64,
}

impl MemoryHeadroom {
    pub fn new(available_mib: u64) -> Self {
        Self {
            available_mib: AtomicU64::new(available_mib),
        }
    }

    pub fn available_mib(&self) -> u64 {
        self.available_mib.load(Ordering::Acquire)
    }

    /// Take `mib` if that much is left.
    pub fn try_take(&self, mib: u64) -> bool {
        self.available_mib
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| a.checked_sub(mib))
            .is_ok()
    }

    pub fn give_back(&self, mib: u64) {
        self.available_mib.fetch_add(mib, Ordering::AcqRel);
    }
}

/// A growth to report to the scheduler as the sandbox's new reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryGrowth {
    pub id: SandboxId,
    pub generation: u64,
    pub resources: Resources,
    pub added_mib: u64,
}

/// Watch one sandbox's memory until it ends, growing its limit under pressure and reporting each
/// growth on `growths`. Growth keeps the sandbox's revision, so an older scheduler revision does
/// not undo it (see `reconcile`). When growth is impossible the kernel's OOM killer acts and the
/// runtime reports the sandbox as `OomKilled`.
pub async fn guard_memory<R: Runtime>(
    runtime: &R,
    id: SandboxId,
    ceiling_mib: u64,
    headroom: &MemoryHeadroom,
    policy: MemoryGrowthPolicy,
    growths: mpsc::Sender<MemoryGrowth>,
) -> Result<(), RuntimeError> {
    let mut tick = tokio::time::interval(Duration::from_millis(policy.poll_interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refusal = None;
    loop {
        tick.tick().await;
        let observed = runtime.status(id).await?;
        match observed.state {
            s if s.is_terminal() => return Ok(()),
            ObservedState::Running => {}
            _ => continue, // starting or paused: usage cannot move
        }
        let usage = match runtime.usage(id).await {
            Ok(u) => u,
            // It may have ended between the two calls; the next status tells.
            Err(RuntimeError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let decision = plan_memory_growth(
            usage.memory_bytes,
            observed.resources.memory_mib,
            headroom.available_mib(),
            ceiling_mib,
            &policy,
        );
        let GrowthDecision::Grow {
            new_memory_mib,
            added_mib,
        } = decision
        else {
            if decision != GrowthDecision::NoPressure && last_refusal != Some(decision) {
                tracing::warn!(sandbox = %id, ?decision, used_bytes = usage.memory_bytes,
                    "sandbox is near its memory limit and cannot grow; it may be OOM-killed");
            }
            last_refusal = Some(decision);
            continue;
        };
        if !headroom.try_take(added_mib) {
            continue; // another guard took it first; decide again next tick
        }
        let resources = Resources {
            memory_mib: new_memory_mib,
            ..observed.resources
        };
        if let Err(e) = runtime.resize(id, resources, observed.revision).await {
            headroom.give_back(added_mib);
            tracing::warn!(sandbox = %id, error = %e, "OOM-prevention resize failed");
            continue;
        }
        tracing::info!(sandbox = %id, from_mib = observed.resources.memory_mib, to_mib = new_memory_mib,
            "grew sandbox memory to prevent an OOM kill");
        let growth = MemoryGrowth {
            id,
            generation: observed.generation,
            resources,
            added_mib,
        };
        if growths.send(growth).await.is_err() {
            return Ok(()); // the agent is gone
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> MemoryGrowthPolicy {
        MemoryGrowthPolicy {
            step_min_mib: 32,
            ..Default::default()
        }
    }

    #[test]
    fn growth_plans() {
        let policy = p();
        // 80% of 100 MiB: no pressure.
        assert_eq!(
            plan_memory_growth(80 * MIB, 100, 1000, 1000, &policy),
            GrowthDecision::NoPressure
        );
        // 95% of 100 MiB: +32 MiB (25% = 25 < min 32).
        assert_eq!(
            plan_memory_growth(95 * MIB, 100, 1000, 1000, &policy),
            GrowthDecision::Grow {
                new_memory_mib: 132,
                added_mib: 32
            }
        );
        // 95% of 1000 MiB: +250 MiB.
        assert_eq!(
            plan_memory_growth(950 * MIB, 1000, 10_000, 10_000, &policy),
            GrowthDecision::Grow {
                new_memory_mib: 1250,
                added_mib: 250
            }
        );
        // bounded by the ceiling, then refused at it
        assert_eq!(
            plan_memory_growth(950 * MIB, 1000, 10_000, 1100, &policy),
            GrowthDecision::Grow {
                new_memory_mib: 1100,
                added_mib: 100
            }
        );
        assert_eq!(
            plan_memory_growth(1090 * MIB, 1100, 10_000, 1100, &policy),
            GrowthDecision::AtCeiling { ceiling_mib: 1100 }
        );
        // partial grant when the node is short, refusal below the floor
        assert_eq!(
            plan_memory_growth(95 * MIB, 100, 20, 1000, &policy),
            GrowthDecision::Grow {
                new_memory_mib: 120,
                added_mib: 20
            }
        );
        assert_eq!(
            plan_memory_growth(95 * MIB, 100, 5, 1000, &policy),
            GrowthDecision::NoHeadroom {
                wanted_mib: 32,
                headroom_mib: 5
            }
        );
        // the step never exceeds the maximum
        assert_eq!(
            plan_memory_growth(
                u64::MAX,
                100_000,
                u64::MAX,
                u64::MAX,
                &MemoryGrowthPolicy::default()
            ),
            GrowthDecision::Grow {
                new_memory_mib: 104_096,
                added_mib: 4096
            }
        );
    }

    #[test]
    fn headroom_is_never_overdrawn() {
        let h = MemoryHeadroom::new(100);
        assert!(h.try_take(60));
        assert!(!h.try_take(60));
        h.give_back(20);
        assert!(h.try_take(60));
        assert_eq!(h.available_mib(), 0);
    }

    #[test]
    fn tails_are_bounded() {
        assert_eq!(tail_text(b"hello world", 5), "world");
        let dir = std::env::temp_dir().join(format!("surge-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let f = dir.join("log");
        std::fs::write(&f, vec![b'x'; 3 * LOG_TAIL_MAX_BYTES]).expect("write");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"END"))
            .expect("append");
        let t = read_tail(&f, LOG_TAIL_MAX_BYTES).expect("tail");
        assert_eq!(t.len(), LOG_TAIL_MAX_BYTES);
        assert!(t.ends_with("END"));
        assert_eq!(
            read_tail(&dir.join("missing"), 10).expect("missing is empty"),
            ""
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
