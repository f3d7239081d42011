//! The lid operations of the chaos workload: a client checkpoints (`surge pause --checkpoint`),
//! resumes and forks its checkpointable counters on the container nodes (when they run with
//! `--checkpoint`), retrying as a real client does. What it asks and hears goes into the history
//! for `checkpoint_restored_once`, which judges it against what the hosts really run.
//!
//! The client does not track its counters' states: it asks for any of the three at random, and
//! a refusal (a checkpoint of a checkpointed sandbox, a resume of a running one, a fork of one
//! that is not running) is a normal, definite outcome.

use std::time::{Duration, Instant};

use surge_client::open as client;
use surge_proto::jobs as pb;

use crate::faults::Rng;
use crate::history::{EventType, Op, Process, Recorder};
use crate::workload::{
    backoff, completion_of, pick, sandbox_info, WorkloadConfig, ATTEMPT_TIMEOUT, LID_FORKS_MAX,
    RETRY_FOR,
};

/// How long a client waits for a sandbox it asked to checkpoint to be checkpointed.
pub const CHECKPOINTED_WAIT: Duration = Duration::from_secs(5);
/// How long it then keeps the lid closed (at least three of the sampler's default intervals).
pub const CLOSED_MS_MIN: u64 = 1_200;
pub const CLOSED_MS_MAX: u64 = 3_000;

/// One checkpoint, resume or fork of sandbox `job`.0, until acknowledged, refused, or
/// [`RETRY_FOR`] passes. Returns the fork job a fork made (the client cancels it later).
pub async fn lid_op(
    cfg: &WorkloadConfig,
    me: u32,
    rng: &mut Rng,
    recorder: &Recorder,
    job: u64,
    n: u64,
) -> Option<u64> {
    match rng.below(3) {
        0 => {
            lid(cfg, me, rng, recorder, job, pb::SandboxAction::Checkpoint).await;
            None
        }
        1 => {
            lid(cfg, me, rng, recorder, job, pb::SandboxAction::Resume).await;
            None
        }
        _ => {
            let count = rng.range_u32(1, LID_FORKS_MAX);
            fork(
                cfg,
                me,
                rng,
                recorder,
                job,
                count,
                &format!("c{me}-{n}-fork"),
            )
            .await
        }
    }
}

fn action_name(action: pb::SandboxAction) -> &'static str {
    match action {
        pb::SandboxAction::Checkpoint => "checkpoint",
        pb::SandboxAction::Resume => "resume",
        _ => "other",
    }
}

async fn lid(
    cfg: &WorkloadConfig,
    me: u32,
    rng: &mut Rng,
    recorder: &Recorder,
    job: u64,
    action: pb::SandboxAction,
) {
    let process = Process::Client(me);
    let op = |replica| Op::Lid {
        job_id: job,
        sandbox_index: 0,
        action: action_name(action).to_string(),
        replica,
    };
    let started = Instant::now();
    let mut attempt = 0;
    while started.elapsed() < RETRY_FOR {
        attempt += 1;
        let (replica, addr) = pick(cfg, rng);
        recorder.record(process, EventType::Invoke, op(replica));
        let req = pb::UpdateSandboxesRequest {
            job_id: job,
            first_index: 0,
            count: 1,
            action: action as i32,
            ..Default::default()
        };
        let reply = match client::jobs(&addr) {
            Ok(mut c) => tokio::time::timeout(ATTEMPT_TIMEOUT, c.update_sandboxes(req))
                .await
                .map_err(|_| {
                    tonic::Status::deadline_exceeded("no reply within the attempt timeout")
                })
                .and_then(|r| r),
            Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
        };
        match reply {
            Ok(_) => {
                recorder.record(process, EventType::Ok, op(replica));
                if action == pb::SandboxAction::Checkpoint {
                    keep_closed(&addr, job, rng).await;
                }
                return;
            }
            Err(s) => {
                let kind = completion_of(&s);
                recorder.record(
                    process,
                    kind,
                    Op::Error {
                        about: format!("{} of sandbox {job}.0", action_name(action)),
                        error: format!("{:?}: {}", s.code(), s.message()),
                    },
                );
                if kind == EventType::Fail {
                    return;
                }
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// Wait (a bounded time) for sandbox `job`.0 to be checkpointed, then keep it so for a while,
/// as a user who closed the lid does: a resume right after the checkpoint would restore it
/// before the sampler's next read of the hosts could see it gone, and the checker would see
/// no restore to judge.
async fn keep_closed(addr: &str, job: u64, rng: &mut Rng) {
    let until = Instant::now() + CHECKPOINTED_WAIT;
    while Instant::now() < until {
        match sandbox_info(addr, job, 0).await {
            Ok(s) if s.state() == pb::SandboxState::Checkpointed => {
                tokio::time::sleep(Duration::from_millis(
                    rng.range(CLOSED_MS_MIN, CLOSED_MS_MAX),
                ))
                .await;
                return;
            }
            Ok(s) if s.state() != pb::SandboxState::Running => return,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn fork(
    cfg: &WorkloadConfig,
    me: u32,
    rng: &mut Rng,
    recorder: &Recorder,
    job: u64,
    count: u32,
    key: &str,
) -> Option<u64> {
    let process = Process::Client(me);
    let started = Instant::now();
    let mut attempt = 0;
    while started.elapsed() < RETRY_FOR {
        attempt += 1;
        let (replica, addr) = pick(cfg, rng);
        recorder.record(
            process,
            EventType::Invoke,
            Op::Fork {
                key: key.to_string(),
                job_id: job,
                sandbox_index: 0,
                count,
                replica,
            },
        );
        let req = pb::ForkSandboxRequest {
            job_id: job,
            index: 0,
            count,
            idempotency_key: key.to_string(),
            ..Default::default()
        };
        let reply = match client::jobs(&addr) {
            Ok(mut c) => tokio::time::timeout(ATTEMPT_TIMEOUT, c.fork_sandbox(req))
                .await
                .map_err(|_| {
                    tonic::Status::deadline_exceeded("no reply within the attempt timeout")
                })
                .and_then(|r| r),
            Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
        };
        match reply {
            Ok(r) => {
                let fork_job = r.into_inner().job_id;
                // The node the scheduler pinned the forks to, in the entry that made them: the
                // source's node at that moment. Unknown (not judged) when the read fails.
                let node = sandbox_info(&addr, fork_job, 0)
                    .await
                    .map(|s| s.node)
                    .unwrap_or_default();
                recorder.record(
                    process,
                    EventType::Ok,
                    Op::Forked {
                        key: key.to_string(),
                        source_job: job,
                        source_index: 0,
                        job_id: fork_job,
                        node,
                    },
                );
                return Some(fork_job);
            }
            Err(s) => {
                let kind = completion_of(&s);
                recorder.record(
                    process,
                    kind,
                    Op::Error {
                        about: key.to_string(),
                        error: format!("{:?}: {}", s.code(), s.message()),
                    },
                );
                if kind == EventType::Fail {
                    return None;
                }
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
    None
}
