//! The gRPC contracts of surge, generated from `proto/*.proto`. No logic lives here.
//!
//! - [`raft`]: the Raft transport between scheduler replicas;
//! - [`cluster`]: status, membership, and the replicas' internal forwarding calls;
//! - [`jobs`]: the batch job API (submit, get, list, cancel, watch);
//! - [`node`]: the node daemon's API (register, heartbeat, assignments, status reports);
//! - [`sandbox`]: exec and files of running sandboxes (clients -> replica -> node);
//! - [`etcd`]: a few calls of etcd's v3 API, for the benchmark that compares surge with etcd.

#![allow(clippy::all)]

pub mod raft {
    tonic::include_proto!("surge.raft");
}

pub mod cluster {
    tonic::include_proto!("surge.cluster");
}

pub mod jobs {
    tonic::include_proto!("surge.jobs");
}

pub mod node {
    tonic::include_proto!("surge.node");
}

pub mod sandbox {
    tonic::include_proto!("surge.sandbox");

    /// The first message of a client-streaming sandbox call (exec, write, upload), which must be
    /// its start: `pick` finds it. The one rule both the replicas and the node daemon apply.
    pub async fn first_message<T, S>(
        inbound: &mut tonic::Streaming<T>,
        what: &str,
        pick: impl FnOnce(T) -> Option<S>,
    ) -> Result<S, tonic::Status> {
        match inbound.message().await? {
            Some(m) => pick(m).ok_or_else(|| {
                tonic::Status::invalid_argument(format!(
                    "the first message of {what} must be its start"
                ))
            }),
            None => Err(tonic::Status::invalid_argument(format!(
                "{what}: no start message"
            ))),
        }
    }
}

/// The subset of etcd's v3 API that `surge bench raft` drives for its side-by-side comparison.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Largest gRPC message any surge service decodes or encodes (a 100k-sandbox plan is kilobytes;
/// a snapshot is sent in chunks well below this).
pub const MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;

impl jobs::Counts {
    /// Sandboxes in a terminal state: succeeded, failed, oom-killed, lost, cancelled or
    /// stopped. `preempted` is not one: it counts how often sandboxes went back to pending.
    /// Every program that asks "is this job done?" (the CLI's `--watch`, the demo, the benches)
    /// counts with this, so they agree.
    pub fn finished(&self) -> u32 {
        self.succeeded + self.failed() + self.cancelled + self.stopped
    }

    /// Sandboxes that ended badly: failed, oom-killed or lost.
    pub fn failed(&self) -> u32 {
        self.failed + self.oom_killed + self.lost
    }
}

/// The wire enums' names as people read and type them (`surge job`, `--state`, the HTTP API's
/// JSON, the console): one table per enum, used both ways by every program.
macro_rules! names {
    ($ty:ty { $unspecified:ident, $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// The name people read ("oom-killed"); "" for the unspecified value.
            pub fn name(self) -> &'static str {
                match self {
                    <$ty>::$unspecified => "",
                    $(<$ty>::$variant => $name,)*
                }
            }

            /// The value whose [`name`](Self::name) is `name`; `None` for anything else
            /// (the empty string included).
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(<$ty>::$variant),)*
                    _ => None,
                }
            }

            /// Every name but the unspecified one's, for error messages.
            pub fn names() -> &'static [&'static str] {
                &[$($name),*]
            }
        }
    };
}

names!(jobs::SandboxState {
    Unspecified,
    Pending => "pending",
    Placed => "placed",
    Running => "running",
    Paused => "paused",
    Succeeded => "succeeded",
    Failed => "failed",
    OomKilled => "oom-killed",
    Lost => "lost",
    Cancelled => "cancelled",
    Stopped => "stopped",
    Checkpointed => "checkpointed",
});

names!(jobs::JobState {
    Unspecified,
    Pending => "pending",
    Running => "running",
    Complete => "complete",
    Failed => "failed",
    Cancelled => "cancelled",
});

names!(jobs::SandboxAction {
    None,
    Pause => "pause",
    Resume => "resume",
    Stop => "stop",
    Checkpoint => "checkpoint",
});

names!(node::NodeState {
    Unspecified,
    Ready => "ready",
    Down => "down",
    Draining => "draining",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_and_unspecified_has_none() {
        for n in jobs::SandboxState::names() {
            let v = jobs::SandboxState::from_name(n).expect("known name");
            assert_eq!(v.name(), *n);
            assert_ne!(v, jobs::SandboxState::Unspecified);
        }
        assert_eq!(jobs::SandboxState::names().len(), 11);
        assert_eq!(jobs::SandboxState::from_name(""), None);
        assert_eq!(jobs::SandboxState::from_name("Running"), None);
        assert_eq!(
            jobs::JobState::from_name("complete"),
            Some(jobs::JobState::Complete)
        );
        assert_eq!(jobs::SandboxAction::None.name(), "");
        assert_eq!(
            jobs::SandboxAction::from_name("checkpoint"),
            Some(jobs::SandboxAction::Checkpoint)
        );
        assert_eq!(
            node::NodeState::from_name("draining"),
            Some(node::NodeState::Draining)
        );
        assert_eq!(node::NodeState::names(), &["ready", "down", "draining"]);
    }
}
