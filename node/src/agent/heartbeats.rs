//! One heartbeat call per replica for all the nodes a process hosts.
//!
//! `surge node --simulate 1000` hosts a thousand nodes; one `Heartbeat` call per node per second
//! is a thousand calls a second per process, and ten such processes put 10,000 calls a second on
//! the leader (each forwarded once more when it lands on a follower). The batcher collects the
//! heartbeats that arrive for a replica within [`LINGER`] into one `HeartbeatBatch` call and hands
//! every node its own reply, so the scheduler sees tens of calls a second instead.
//!
//! A node's session keeps its semantics: it waits for its own reply, a failed batch fails every
//! heartbeat in it (each session counts its own failures and moves on to another replica), and a
//! node the scheduler does not know is told so individually.

use std::sync::Arc;
use std::time::Duration;

use surge_proto::node as pn;
use tokio::sync::{mpsc, oneshot, Semaphore};

use surge_proto::node::node_api_client::NodeApiClient;
use tonic::transport::Channel;

use super::connection::{call_timeout, CallError};

/// How long the first heartbeat of a batch waits for others.
pub const LINGER: Duration = Duration::from_millis(20);
/// Longest a batch call may take (each node's session also holds its heartbeat to its own
/// deadline, a quarter of the node TTL, and moves to another replica after repeated failures).
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Most heartbeats in one batch (the scheduler's own cap is 10,000).
pub const BATCH_MAX: usize = 2_000;
/// Heartbeats queued per replica before senders wait.
const QUEUE: usize = 10_000;
/// Batches in flight per replica.
const IN_FLIGHT: usize = 4;

type Reply = Result<pn::HeartbeatReply, CallError>;

struct Pending {
    beat: pn::HeartbeatRequest,
    reply: oneshot::Sender<Reply>,
}

/// Per-replica queues of heartbeats, each drained by its own task.
pub struct HeartbeatBatcher {
    queues: Vec<mpsc::Sender<Pending>>,
}

impl HeartbeatBatcher {
    /// One queue and sender task per replica client; each batch call times out after
    /// `timeout`. The tasks end when the batcher is dropped. Must be called inside the runtime.
    pub fn start(clients: Vec<NodeApiClient<Channel>>, timeout: Duration) -> Self {
        let mut queues = Vec::with_capacity(clients.len());
        for client in clients {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(drain(rx, client, timeout));
            queues.push(tx);
        }
        HeartbeatBatcher { queues }
    }

    /// Sends `beat` to replica `replica` (modulo their number) in the next batch and waits for
    /// its reply.
    pub async fn beat(&self, replica: usize, beat: pn::HeartbeatRequest) -> Reply {
        let (tx, rx) = oneshot::channel();
        let queue = &self.queues[replica % self.queues.len().max(1)];
        let stopped = || CallError::Status {
            call: "HeartbeatBatch",
            code: tonic::Code::Cancelled,
            message: "the heartbeat batcher stopped".into(),
        };
        if queue.send(Pending { beat, reply: tx }).await.is_err() {
            return Err(stopped());
        }
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn drain(mut rx: mpsc::Receiver<Pending>, client: NodeApiClient<Channel>, timeout: Duration) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) | Err(_) => break,
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut client = client.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (beats, waiters): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.beat, p.reply)).unzip();
            let n = beats.len();
            let mut req = tonic::Request::new(pn::HeartbeatBatchRequest { beats });
            req.set_timeout(timeout);
            let result = call_timeout("HeartbeatBatch", timeout, client.heartbeat_batch(req)).await;
            deliver(result, n, waiters);
        });
    }
}

/// Hands each waiter its reply: the i-th reply to the i-th heartbeat, or the batch's error.
fn deliver(
    result: Result<pn::HeartbeatBatchReply, CallError>,
    n: usize,
    waiters: Vec<oneshot::Sender<Reply>>,
) {
    let replies = match result {
        Ok(r) if r.replies.len() == n => r.replies.into_iter().map(Ok).collect(),
        Ok(r) => {
            let wrong = CallError::Status {
                call: "HeartbeatBatch",
                code: tonic::Code::Internal,
                message: format!("{} replies to {n} heartbeats", r.replies.len()),
            };
            (0..n).map(|_| Err(same(&wrong))).collect()
        }
        Err(e) => (0..n).map(|_| Err(same(&e))).collect::<Vec<_>>(),
    };
    for (w, r) in waiters.into_iter().zip(replies) {
        // A session that gave up on its heartbeat (timeout) no longer listens; that is fine.
        let _ = w.send(r);
    }
}

fn same(e: &CallError) -> CallError {
    match e {
        CallError::Status {
            call,
            code,
            message,
        } => CallError::Status {
            call,
            code: *code,
            message: message.clone(),
        },
        CallError::Timeout { call, after_ms } => CallError::Timeout {
            call,
            after_ms: *after_ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiters(n: usize) -> (Vec<oneshot::Sender<Reply>>, Vec<oneshot::Receiver<Reply>>) {
        (0..n).map(|_| oneshot::channel()).unzip()
    }

    #[test]
    fn each_node_gets_its_own_reply_in_order() {
        let (tx, rx) = waiters(3);
        let reply = pn::HeartbeatBatchReply {
            replies: vec![
                pn::HeartbeatReply { known: true },
                pn::HeartbeatReply { known: false },
                pn::HeartbeatReply { known: true },
            ],
        };
        deliver(Ok(reply), 3, tx);
        let known: Vec<bool> = rx
            .into_iter()
            .map(|mut r| r.try_recv().expect("delivered").expect("ok").known)
            .collect();
        assert_eq!(known, vec![true, false, true]);
    }

    #[test]
    fn a_failed_or_short_batch_fails_every_heartbeat_in_it() {
        let (tx, rx) = waiters(2);
        let e = CallError::Timeout {
            call: "HeartbeatBatch",
            after_ms: 5,
        };
        deliver(Err(e), 2, tx);
        for mut r in rx {
            assert!(r
                .try_recv()
                .expect("delivered")
                .is_err_and(|e| e.is_retryable()));
        }
        let (tx, rx) = waiters(2);
        let short = pn::HeartbeatBatchReply {
            replies: vec![pn::HeartbeatReply { known: true }],
        };
        deliver(Ok(short), 2, tx);
        for mut r in rx {
            assert!(r.try_recv().expect("delivered").is_err());
        }
    }
}
