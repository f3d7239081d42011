//! What only the leader does, kept in its memory rather than in the log: node liveness (TTL),
//! coalescing sandbox status reports into few Raft entries, and the scheduling loop.
//!
//! ```text
//!   heartbeats, reports, applied index, leadership, now_ms
//!        │ (events, fed in by the shell)
//!        ▼
//!   core.rs (pure: no clock, no I/O)      Heartbeats · Planner (Quiet/Cycle) · ReportBatch
//!        │ (effects)
//!        ▼
//!   shell.rs (async, one task per duty)   propose SetNodeState Down / ApplyPlan /
//!                                         ReportStatusOutcomes through the Host; set metrics
//! ```
//!
//! The decisions live in [`core`]: each is a plain function of the applied [`ClusterState`], the
//! time the shell read from its [`Host`] and the events since the last call, and returns what to
//! propose. The shell ([`Leader`]) owns the timers and carries effects out through a [`Host`]:
//! the Raft replica in production, a simulated replica in `surge chaos sim`, which thus runs
//! these very loops under tokio's paused clock instead of a copy of them.
//!
//! Every replica runs the shell's tasks; they act only while their replica leads. A new leader
//! starts every node's TTL afresh, so a failover never marks healthy nodes down.

pub mod core;
mod metrics;
mod shell;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use crate::command::{Command, Response, StatusRange};
use crate::model::Resources;
use crate::placement;
use crate::runs::SandboxState;
use crate::service::Replica;
use crate::state::ClusterState;

pub use self::core::{CoreConfig, Liveness, PlantedBug};
pub use self::metrics::Metrics;
pub use self::shell::Leader;

/// Heartbeat interval the nodes are told to use.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// A node silent this long is marked down and its sandboxes rescheduled (default).
pub const NODE_TTL_MS: u64 = 10_000;
/// How often the leader looks for nodes silent past their TTL.
pub const LIVENESS_INTERVAL: Duration = Duration::from_millis(500);
/// How often the leader looks for deadlines passed and proposes activity.
pub const LIFETIME_INTERVAL: Duration = Duration::from_millis(250);
/// Status ranges in one Raft entry, at most.
pub const REPORT_BATCH_MAX: usize = 20_000;
/// How long the batcher waits to fill a batch.
pub const REPORT_BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Reports queued for the batcher before nodes are told to retry.
pub const REPORT_QUEUE_MAX: usize = 4_096;
/// The scheduling loop runs at least this often while there is pending work.
pub const SCHEDULE_INTERVAL: Duration = Duration::from_millis(250);
/// ... and at most this often: changes arriving meanwhile are planned together, so a stream of
/// submissions costs a few plans per second, not one plan per submission.
pub const SCHEDULE_INTERVAL_MIN: Duration = Duration::from_millis(20);

/// While a queue cannot be placed and the capacity does not change, every job is planned
/// again this often (a full plan walks every job; between them cycles plan the new ones).
pub const FULL_PLAN_INTERVAL: Duration = Duration::from_secs(1);

/// A proposal the host could not see through.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    #[error("not committed: {0}")]
    NotCommitted(String),
    #[error("undecodable reply from the state machine: {0}")]
    Reply(String),
}

/// What the leader's shell needs from the replica it runs on. Production implements it for the
/// Raft replica ([`Replica`]); the simulator for its simulated replicas, so both run the same
/// loops. `now_ms` is the only clock the leader's decisions read.
pub trait Host: Send + Sync + 'static {
    /// Whether this replica leads now.
    fn is_leader(&self) -> bool;
    /// The applied index, notified after every applied batch.
    fn subscribe_applied(&self) -> watch::Receiver<u64>;
    fn applied_index(&self) -> u64;
    /// Run `f` on the applied state (under its read lock: keep it short).
    fn read<R>(&self, f: impl FnOnce(&ClusterState, u64) -> R) -> R;
    /// Commit `command` through the log; the index it took and what applying it returned.
    fn propose(
        &self,
        command: &Command,
    ) -> impl Future<Output = Result<(u64, Response), ProposeError>> + Send;
    /// The clock in milliseconds: commands carry it (`at_ms`) and TTLs are measured on it.
    fn now_ms(&self) -> u64;
}

impl Host for Replica {
    fn is_leader(&self) -> bool {
        surge_raft::RaftNode::is_leader(self)
    }

    fn subscribe_applied(&self) -> watch::Receiver<u64> {
        surge_raft::RaftNode::subscribe_applied(self)
    }

    fn applied_index(&self) -> u64 {
        surge_raft::RaftNode::applied_index(self)
    }

    fn read<R>(&self, f: impl FnOnce(&ClusterState, u64) -> R) -> R {
        surge_raft::RaftNode::read(self, f)
    }

    async fn propose(&self, command: &Command) -> Result<(u64, Response), ProposeError> {
        let p = surge_raft::RaftNode::propose(self, command.encode())
            .await
            .map_err(|e| ProposeError::NotCommitted(e.to_string()))?;
        let response =
            Response::decode(&p.reply).map_err(|e| ProposeError::Reply(e.to_string()))?;
        Ok((p.index, response))
    }

    fn now_ms(&self) -> u64 {
        crate::service::now_ms()
    }
}

/// The plan as the log takes it. The log needs the decisions, not the explanation: reasons
/// travel beside the plan, and only those that differ from what a job shows now, so an entry
/// stays small however long the queue is.
pub fn for_the_log(
    plan: placement::Plan,
    reasons_now: &BTreeMap<u64, String>,
) -> (placement::Plan, Vec<(u64, String)>) {
    let changed = reasons_of(&plan)
        .into_iter()
        .filter(|(job, r)| reasons_now.get(job) != Some(r))
        .collect();
    let plan = placement::Plan {
        unplaced: Vec::new(),
        ..plan
    };
    (plan, changed)
}

pub fn reasons_of(plan: &placement::Plan) -> Vec<(u64, String)> {
    let mut seen = BTreeMap::new();
    for u in &plan.unplaced {
        seen.entry(u.job).or_insert_with(|| u.reason.to_string());
    }
    seen.into_iter().collect()
}

/// Coalesce per-sandbox reports of one node into ranges: consecutive indices of one job with the
/// same generation, state, exit code and reservation become one [`StatusRange`].
pub fn coalesce(
    node: &str,
    mut updates: Vec<(u64, u32, u64, SandboxState, i32, Option<Resources>)>,
) -> Vec<StatusRange> {
    updates.sort_by_key(|a| (a.0, a.2, a.3, a.4, a.5, a.1));
    updates.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    let mut out: Vec<StatusRange> = Vec::new();
    for (job, index, generation, state, exit_code, resources) in updates {
        if let Some(last) = out.last_mut() {
            let contiguous = u64::from(last.first) + u64::from(last.count) == u64::from(index);
            if last.job == job
                && contiguous
                && last.generation == generation
                && last.state == state
                && last.exit_code == exit_code
                && last.resources == resources
            {
                last.count += 1;
                continue;
            }
        }
        out.push(StatusRange {
            node: node.to_string(),
            job,
            first: index,
            count: 1,
            generation,
            state,
            exit_code,
            resources,
        });
    }
    out
}
