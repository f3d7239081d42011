//! The lifetime side of the job API: bulk cancel by label, keepalive (lease renewal and TTL
//! extension) and waiting for sandboxes without polling. Shared by gRPC and HTTP.

use std::time::Duration;

use surge_proto::jobs as pb;

use super::error::JobApiError;
use super::guard::Caller;
use super::jobs::{no_job, unexpected, JobsService};
use super::now_ms;
use crate::command::{Command, Response as Reply};
use crate::convert;
use crate::model::{Job, JobId};
use crate::runs::SandboxState;
use crate::validate;

/// A wait without a timeout waits this long.
pub const WAIT_TIMEOUT_MS_DEFAULT: u64 = 60_000;
/// Longest wait one call may ask for (a client that needs longer calls again).
pub const WAIT_TIMEOUT_MS_MAX: u64 = 600_000;

/// Whether a wait is over, judged on the job now (pure).
pub fn wait_outcome(job: &Job, index: Option<u32>, until: pb::WaitFor) -> Option<pb::WaitOutcome> {
    match index {
        Some(i) => {
            let (_, run) = job.runs.get(i)?;
            match (until, run.state) {
                (pb::WaitFor::Running, SandboxState::Running) => Some(pb::WaitOutcome::Met),
                (pb::WaitFor::Running, s) if s.is_terminal() => Some(pb::WaitOutcome::Ended),
                (pb::WaitFor::Ended, s) if s.is_terminal() => Some(pb::WaitOutcome::Met),
                _ => None,
            }
        }
        None => {
            let c = job.counts;
            match until {
                pb::WaitFor::Running if c.running == job.spec.count => Some(pb::WaitOutcome::Met),
                // Ended, or nothing left that could still start: all-running can no longer hold.
                pb::WaitFor::Running
                    if job.state.is_terminal()
                        || (c.pending == 0 && c.placed == 0 && c.finished() > 0) =>
                {
                    Some(pb::WaitOutcome::Ended)
                }
                pb::WaitFor::Ended if job.state.is_terminal() => Some(pb::WaitOutcome::Met),
                _ => None,
            }
        }
    }
}

impl JobsService {
    /// Cancel the caller's jobs that match a label selector, in one entry.
    pub async fn cancel_by_label(
        &self,
        caller: &Caller,
        req: pb::CancelJobsRequest,
    ) -> Result<pb::CancelJobsReply, JobApiError> {
        if req.labels.is_empty() {
            return Err(JobApiError::Invalid(
                "labels: give at least one KEY=VALUE (an empty selector would cancel every job)"
                    .into(),
            ));
        }
        validate::labels(&req.labels).map_err(JobApiError::from)?;
        let tenant = match caller.tenant() {
            Some(t) if !req.tenant.is_empty() && req.tenant != t => {
                return Err(JobApiError::PermissionDenied(format!(
                    "this token is tenant {t}'s; it cannot cancel tenant {}'s jobs",
                    req.tenant
                )))
            }
            Some(t) => Some(t.to_string()),
            None if req.tenant.is_empty() => None,
            None => {
                validate::name("tenant", &req.tenant).map_err(JobApiError::from)?;
                Some(req.tenant)
            }
        };
        let command = Command::CancelJobs {
            tenant,
            selector: req.labels,
            at_ms: now_ms(),
        };
        match self.batcher.propose(command).await? {
            (index, Reply::JobsCancelled { count, job_ids }) => Ok(pb::CancelJobsReply {
                cancelled: count,
                job_ids,
                index,
            }),
            (_, other) => Err(unexpected(other)),
        }
    }

    /// Renew the lease and, with a TTL, extend the sandboxes' lives.
    pub async fn keepalive(
        &self,
        caller: &Caller,
        req: pb::KeepaliveRequest,
    ) -> Result<pb::Job, JobApiError> {
        let ttl_ms = match req.ttl_ms {
            0 => None,
            t => {
                validate::lifetime_ms("ttl_ms", t).map_err(JobApiError::from)?;
                Some(t)
            }
        };
        // Visibility first: another tenant's job is "no job".
        self.get(caller, req.job_id).await?;
        let total = self
            .replica
            .read(|s, _| s.jobs.get(&req.job_id).map(|j| j.spec.count))
            .ok_or_else(|| no_job(req.job_id))?;
        if req.first_index >= total {
            return Err(JobApiError::NotFound(format!(
                "job {} has sandboxes {}.0 to {}.{}; there is no {}.{}",
                req.job_id,
                req.job_id,
                req.job_id,
                total.saturating_sub(1),
                req.job_id,
                req.first_index
            )));
        }
        let count = match req.count {
            0 => total - req.first_index,
            n => n,
        };
        let command = Command::Keepalive {
            job_id: req.job_id,
            first: req.first_index,
            count,
            ttl_ms,
            at_ms: now_ms(),
        };
        self.batcher.propose(command).await?;
        self.get(caller, req.job_id).await
    }

    /// Wait until the condition holds, the job ends, or the timeout passes (not an error: the
    /// reply says which). Wakes on every applied entry, like `WatchJob`.
    pub async fn wait(
        &self,
        caller: &Caller,
        req: pb::WaitJobRequest,
    ) -> Result<pb::WaitJobReply, JobApiError> {
        let timeout_ms = match req.timeout_ms {
            0 => WAIT_TIMEOUT_MS_DEFAULT,
            t if t > WAIT_TIMEOUT_MS_MAX => {
                return Err(JobApiError::Invalid(format!(
                    "timeout_ms: {t} ms; at most {WAIT_TIMEOUT_MS_MAX} ms (10 min): wait again \
                     for longer"
                )))
            }
            t => t,
        };
        let until = pb::WaitFor::try_from(req.until).map_err(|_| {
            JobApiError::Invalid(format!(
                "until: unknown {}; use running (0) or ended (1)",
                req.until
            ))
        })?;
        let job_id: JobId = req.job_id;
        let first = self.get(caller, job_id).await?;
        if let Some(i) = req.index {
            let count = first.spec.as_ref().map_or(0, |s| s.count);
            if i >= count {
                return Err(JobApiError::NotFound(format!(
                    "job {job_id} has sandboxes {job_id}.0 to {job_id}.{}; there is no \
                     {job_id}.{i}",
                    count.saturating_sub(1)
                )));
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        let mut applied = self.replica.subscribe_applied();
        loop {
            let now = self.replica.read(|s, _| {
                s.jobs.get(&job_id).map(|j| {
                    (
                        wait_outcome(j, req.index, until),
                        convert::job_to_pb(j),
                        req.index.and_then(|i| convert::sandbox_to_pb(j, i)),
                    )
                })
            });
            let Some((outcome, job, sandbox)) = now else {
                return Err(no_job(job_id));
            };
            let reply = |outcome: pb::WaitOutcome| pb::WaitJobReply {
                outcome: outcome as i32,
                job: Some(job.clone()),
                sandbox: sandbox.clone(),
            };
            if let Some(o) = outcome {
                return Ok(reply(o));
            }
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Err(_) => return Ok(reply(pb::WaitOutcome::TimedOut)),
                Ok(Err(_)) => {
                    return Err(JobApiError::Cluster(tonic::Status::unavailable(
                        "this replica stopped applying; retry on another",
                    )))
                }
                Ok(Ok(())) => {}
            }
        }
    }
}
