//! Group commit for the job API: concurrent proposals share one Raft entry.
//!
//! Every entry costs the same fixed work however small it is: a trip through openraft's core,
//! an AppendEntries to each follower, a WAL write, an apply. A burst of submissions from many
//! clients would pay it once per job. The batcher owns a queue of proposals and at most
//! [`BATCHES_IN_FLIGHT`] entries in the log at a time; whatever queues while they commit leaves
//! as the next entry, a [`Command::Batch`] (a lone proposal leaves as itself). An idle cluster
//! therefore adds no delay, and a busy one commits in fewer, larger entries.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

use super::{answered, Replica};
use crate::command::{Command, Response, BATCH_COMMANDS_MAX};

/// Entries the batcher has in the log, uncommitted, at a time.
pub const BATCHES_IN_FLIGHT: usize = 2;
/// Encoded bytes in one batch, at most (a Raft command may hold 8 MiB).
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Proposals waiting for a batch before callers are told to retry.
pub const QUEUE_MAX: usize = 8_192;

type Outcome = Result<(u64, Response), Status>;

struct Queued {
    command: Vec<u8>,
    reply: oneshot::Sender<Outcome>,
}

/// The handle the services propose through; the batching task ends when the last is dropped.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Queued>,
}

impl Batcher {
    /// Start the batching task on the current tokio runtime.
    pub fn start(replica: Replica) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(run(replica, waiting));
        Batcher { queue }
    }

    /// Propose `command` and return the index it committed at and what applying it returned
    /// (a refusal by the state machine is an error, as with an unbatched proposal).
    pub async fn propose(&self, command: Command) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        let queued = Queued {
            command: command.encode(),
            reply,
        };
        self.queue.try_send(queued).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Status::resource_exhausted(format!(
                "{QUEUE_MAX} proposals are waiting for the log; retry shortly"
            )),
            mpsc::error::TrySendError::Closed(_) => Status::unavailable("the replica is stopping"),
        })?;
        outcome
            .await
            .map_err(|_| Status::unavailable("the replica stopped before the proposal committed"))?
    }
}

async fn run(replica: Replica, mut waiting: mpsc::Receiver<Queued>) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(q) => q,
            None => match waiting.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        // Wait for a slot first: what queues meanwhile joins this batch.
        let Ok(slot) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.command.len();
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS_MAX {
            let Ok(next) = waiting.try_recv() else { break };
            if bytes + next.command.len() > BATCH_BYTES_MAX {
                carried = Some(next);
                break;
            }
            bytes += next.command.len();
            batch.push(next);
        }
        let replica = replica.clone();
        tokio::spawn(async move {
            commit(&replica, batch).await;
            drop(slot);
        });
    }
}

/// Propose one batch and hand every caller its own reply.
async fn commit(replica: &Replica, mut batch: Vec<Queued>) {
    if batch.len() == 1 {
        let q = batch.remove(0);
        let outcome = match replica.propose(q.command).await {
            Ok(p) => answered(p.index, Response::decode(&p.reply)),
            Err(e) => Err(e.into()),
        };
        let _ = q.reply.send(outcome);
        return;
    }
    let (commands, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|q| (q.command, q.reply)).unzip();
    let count = commands.len();
    let proposed = replica.propose(Command::Batch { commands }.encode()).await;
    let outcomes: Vec<Outcome> = match proposed {
        Err(e) => {
            let status: Status = e.into();
            vec![Err(status); count]
        }
        Ok(p) => match Response::decode(&p.reply) {
            Ok(Response::Batch(responses)) if responses.len() == count => responses
                .into_iter()
                .map(|r| answered(p.index, Ok(r)))
                .collect(),
            other => {
                let status = Status::internal(format!(
                    "the state machine answered a batch of {count} with {other:?}"
                ));
                vec![Err(status); count]
            }
        },
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}
