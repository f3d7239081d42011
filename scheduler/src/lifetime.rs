//! Lifetimes of sandboxes: the deadlines that end them (TTL, idle timeout, owner lease), the
//! labels that select jobs for bulk actions, and the typed reason every sandbox ends with.
//!
//! Where the deadlines live (see `docs/ARCHITECTURE.md`, "Lifetimes"): in the replicated state,
//! next to what they bound, so a new leader finds them after a failover.
//!
//! * TTL: per run of sandboxes ([`Run::expires_ms`]), set when a sandbox is first reported
//!   running (`at_ms + ttl_ms`) and moved by a keepalive with a new TTL.
//! * Idle timeout: per run ([`Run::active_ms`]): the leader's clock at the last exec or file
//!   call the node reported, coarsened to one `Touch` entry per [`TOUCH_INTERVAL_MS`], so
//!   sandboxes used in the same second still share a run.
//! * Lease: per job ([`Job::lease_expires_ms`]), pushed forward by every renewal.
//!
//! Jobs that use none of them store nothing more than before (the fields stay 0 and runs merge
//! as they did). The decision "this deadline has passed" is [`due`], a pure function of the
//! state and a time: the leader's core calls it with its clock and proposes `Expire`; apply
//! calls it again with the time the command carries, so a keepalive committed in between wins
//! and every replica agrees.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Job, JobId};
use crate::runs::{Run, SandboxState, EXIT_NOT_RUN};

/// Activity reaches the log at most once per this many milliseconds (one `Touch` entry).
pub const TOUCH_INTERVAL_MS: u64 = 1_000;
/// Sandbox ranges one `Touch` entry carries, at most.
pub const TOUCH_RANGES_MAX: usize = 100_000;
/// Ranges one `Expire` entry stops, at most (the rest go in the next one).
pub const EXPIRIES_PER_COMMAND_MAX: usize = 10_000;
/// Longest TTL, idle timeout or lease: 30 days.
pub const LIFETIME_MS_MAX: u64 = 30 * 24 * 3_600_000;
/// Shortest lease: renewals every lease/3 must be able to keep up.
pub const LEASE_MS_MIN: u64 = 1_000;
/// Labels on one job, at most; each key and value at most [`LABEL_BYTES_MAX`].
pub const JOB_LABELS_MAX: usize = 16;
pub const LABEL_BYTES_MAX: usize = 63;

/// How long a job's sandboxes may live. 0: no such bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifetime {
    /// Longest life of a sandbox, from when it was first reported running.
    pub ttl_ms: u64,
    /// Longest time without an exec or file call.
    pub idle_timeout_ms: u64,
    /// The owner renews within this long, or the job's sandboxes are stopped.
    pub lease_ms: u64,
}

impl Lifetime {
    pub fn is_unbounded(&self) -> bool {
        self.ttl_ms == 0 && self.idle_timeout_ms == 0 && self.lease_ms == 0
    }
}

/// Why a sandbox was asked to stop (kept with the stop, so its end says why).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum StopCause {
    /// A user's `surge stop`.
    #[default]
    User,
    Ttl,
    Idle,
    Lease,
}

/// How a sandbox ended, as the API reports it (`EndReason` on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EndReason {
    /// Its command exited by itself (any code, 0 included).
    Exited,
    /// Its command was killed by a signal (exit status 128+N, N in 1..=64).
    Signal,
    OomKilled,
    TtlExpired,
    IdleTimeout,
    LeaseLost,
    NodeLost,
    Preempted,
    Stopped,
    Cancelled,
    /// The runtime could not run it (the message says why).
    RuntimeError,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Exited => "exited",
            EndReason::Signal => "signal",
            EndReason::OomKilled => "oom-killed",
            EndReason::TtlExpired => "ttl-expired",
            EndReason::IdleTimeout => "idle-timeout",
            EndReason::LeaseLost => "lease-lost",
            EndReason::NodeLost => "node-lost",
            EndReason::Preempted => "preempted",
            EndReason::Stopped => "stopped",
            EndReason::Cancelled => "cancelled",
            EndReason::RuntimeError => "runtime-error",
        }
    }

    /// Not the sandbox's command's doing: a trainer leaves these out of its reward. OOM is the
    /// command's own (it used more memory than it asked for); the lease is the owner's.
    pub fn is_infrastructure(self) -> bool {
        matches!(
            self,
            EndReason::NodeLost | EndReason::RuntimeError | EndReason::Preempted
        )
    }
}

/// The reason an ended run of sandboxes ended with (`None` while it has not ended).
pub fn end_reason(run: &Run) -> Option<EndReason> {
    Some(match run.state {
        SandboxState::Succeeded => EndReason::Exited,
        SandboxState::Failed if run.exit_code == EXIT_NOT_RUN => EndReason::RuntimeError,
        SandboxState::Failed if (129..=192).contains(&run.exit_code) => EndReason::Signal,
        SandboxState::Failed => EndReason::Exited,
        SandboxState::OomKilled => EndReason::OomKilled,
        SandboxState::Lost => EndReason::NodeLost,
        SandboxState::Cancelled => EndReason::Cancelled,
        SandboxState::Stopped => match run.stop_cause {
            StopCause::User => EndReason::Stopped,
            StopCause::Ttl => EndReason::TtlExpired,
            StopCause::Idle => EndReason::IdleTimeout,
            StopCause::Lease => EndReason::LeaseLost,
        },
        SandboxState::Pending
        | SandboxState::Placed
        | SandboxState::Running
        | SandboxState::Paused
        | SandboxState::Checkpointed => return None,
    })
}

/// Whether `run` of `job` must be stopped at `now_ms`, and why. The lease covers every sandbox
/// not yet ended (pending ones too: they must never start); TTL and idle only running ones. A
/// run already asked to stop is not due again.
pub fn due(job: &Job, run: &Run, now_ms: u64) -> Option<StopCause> {
    due_with(job.spec.lifetime, job.lease_expires_ms, run, now_ms)
}

/// [`due`] given the job's lifetime and lease deadline.
pub fn due_with(
    life: Lifetime,
    lease_expires_ms: u64,
    run: &Run,
    now_ms: u64,
) -> Option<StopCause> {
    if run.state.is_terminal() || run.stop {
        return None;
    }
    if life.lease_ms > 0 && lease_expires_ms <= now_ms {
        return Some(StopCause::Lease);
    }
    if !run.state.is_active() {
        return None;
    }
    if run.expires_ms != 0 && run.expires_ms <= now_ms {
        return Some(StopCause::Ttl);
    }
    let idle = life.idle_timeout_ms;
    if idle > 0
        && run.state == SandboxState::Running
        && run.active_ms != 0
        && run.active_ms.saturating_add(idle) <= now_ms
    {
        return Some(StopCause::Idle);
    }
    None
}

/// A range of one job's sandboxes whose deadline passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    pub job: JobId,
    pub first: u32,
    pub count: u32,
    pub cause: StopCause,
}

/// The ranges of `job` due at `now_ms`, neighbours with one cause coalesced.
pub fn expiries_of(job: &Job, now_ms: u64, out: &mut Vec<Expiry>) {
    let mut last: Option<Expiry> = None;
    for (first, run) in job.runs.iter() {
        match (due(job, run, now_ms), last.as_mut()) {
            (Some(cause), Some(l))
                if l.cause == cause
                    && u64::from(l.first) + u64::from(l.count) == u64::from(first) =>
            {
                l.count = l.count.saturating_add(run.count);
            }
            (Some(cause), _) => {
                out.extend(last.take());
                last = Some(Expiry {
                    job: job.id,
                    first,
                    count: run.count,
                    cause,
                });
            }
            (None, _) => out.extend(last.take()),
        }
    }
    out.extend(last);
}

/// Whether `labels` carries every `key=value` of `selector` (an empty selector matches all).
pub fn matches(labels: &BTreeMap<String, String>, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A label (or selector term) that is not `KEY=VALUE` with a valid key and value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label {0:?}: write KEY=VALUE (e.g. run=exp7)")]
    Syntax(String),
    #[error(transparent)]
    Invalid(#[from] crate::validate::Invalid),
}

/// Parse `KEY=VALUE` (a label, or a selector term).
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| LabelError::Syntax(s.to_string()))?;
    crate::validate::label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resources;

    #[test]
    fn end_reasons_of_every_terminal_state() {
        let mut run = Run::pending(1, Resources::new(1000, 64));
        assert_eq!(end_reason(&run), None);
        run.state = SandboxState::Failed;
        run.exit_code = 137;
        assert_eq!(end_reason(&run), Some(EndReason::Signal));
        run.exit_code = 2;
        assert_eq!(end_reason(&run), Some(EndReason::Exited));
        run.exit_code = EXIT_NOT_RUN;
        assert_eq!(end_reason(&run), Some(EndReason::RuntimeError));
        run.state = SandboxState::Stopped;
        for (cause, reason) in [
            (StopCause::User, EndReason::Stopped),
            (StopCause::Ttl, EndReason::TtlExpired),
            (StopCause::Idle, EndReason::IdleTimeout),
            (StopCause::Lease, EndReason::LeaseLost),
        ] {
            run.stop_cause = cause;
            assert_eq!(end_reason(&run), Some(reason));
        }
        run.state = SandboxState::Lost;
        assert!(end_reason(&run).is_some_and(EndReason::is_infrastructure));
    }

    #[test]
    fn labels_parse_and_select() {
        assert_eq!(
            parse_label("run=exp7"),
            Ok(("run".to_string(), "exp7".to_string()))
        );
        assert_eq!(
            parse_label("run").expect_err("no =").to_string(),
            "label \"run\": write KEY=VALUE (e.g. run=exp7)"
        );
        assert!(parse_label("=x").is_err());
        assert!(parse_label("run=a b").is_err());
        let labels = BTreeMap::from([("run".to_string(), "exp7".to_string())]);
        assert!(matches(&labels, &BTreeMap::new()));
        assert!(matches(&labels, &labels));
        let other = BTreeMap::from([("run".to_string(), "exp8".to_string())]);
        assert!(!matches(&labels, &other));
    }
}
