//! `surge.jobs.Jobs`: submit, get, list, cancel and watch jobs.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::Stream;
use surge_proto::jobs as pb;
use surge_proto::jobs::jobs_server::{Jobs, JobsServer};
use tonic::{Request, Response, Status};

use super::batch::Batcher;
use super::error::JobApiError;
use super::guard::Caller;
use super::{now_ms, Replica};
use crate::command::{Command, Response as Reply};
use crate::convert;
use crate::model::JobId;
use crate::validate;

/// Most jobs one `ListJobs` returns.
pub const LIST_LIMIT_MAX: u32 = 10_000;
pub const LIST_LIMIT_DEFAULT: u32 = 1_000;
/// Job updates buffered per watcher before the watch waits for the client.
pub const WATCH_BUFFER: usize = 16;

pub struct JobsService {
    pub(super) replica: Replica,
    /// Proposals go through group commit (see `batch`).
    pub(super) batcher: Batcher,
    /// Makes server-chosen idempotency keys unique within this replica's lifetime.
    key_seq: AtomicU64,
}

impl JobsService {
    /// Needs a tokio runtime: it starts the batching task.
    pub fn new(replica: Replica) -> Self {
        JobsService {
            batcher: Batcher::start(replica.clone()),
            replica,
            key_seq: AtomicU64::new(0),
        }
    }

    pub fn into_server(self) -> JobsServer<Self> {
        JobsServer::new(self)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
    }

    /// Submit, choosing a key when the client gave none: retries inside the cluster (leader
    /// changes, forwarding) then still create one job, not several. A tenant's token submits as
    /// that tenant (a job naming no tenant is theirs; one naming another is refused).
    pub async fn submit(
        &self,
        caller: &Caller,
        req: pb::SubmitJobRequest,
    ) -> Result<pb::SubmitJobReply, JobApiError> {
        let mut spec = req
            .spec
            .ok_or_else(|| JobApiError::Invalid("spec: missing".into()))?;
        if let Some(t) = caller.tenant() {
            if spec.tenant.is_empty() {
                spec.tenant = t.to_string();
            } else if spec.tenant != t {
                return Err(JobApiError::PermissionDenied(format!(
                    "this token is tenant {t}'s; it cannot submit as tenant {}",
                    spec.tenant
                )));
            }
        }
        let spec = convert::job_spec_from_pb(spec).map_err(JobApiError::from)?;
        let key = self.idempotency_key("auto", req.idempotency_key)?;
        self.propose_job(Command::SubmitJob {
            spec,
            idempotency_key: key,
            at_ms: now_ms(),
        })
        .await
    }

    /// The caller's idempotency key, validated, or a fresh one unique to this replica.
    fn idempotency_key(&self, prefix: &str, given: String) -> Result<String, JobApiError> {
        if given.is_empty() {
            return Ok(format!(
                "{prefix}:{}:{}:{}",
                self.replica.id(),
                now_ms(),
                self.key_seq.fetch_add(1, Ordering::Relaxed)
            ));
        }
        validate::idempotency_key(&given).map_err(JobApiError::from)?;
        Ok(given)
    }

    /// Propose a command that makes a job (a submission or a fork) and answer with it.
    async fn propose_job(&self, command: Command) -> Result<pb::SubmitJobReply, JobApiError> {
        match self.batcher.propose(command).await? {
            (index, Reply::JobSubmitted { job_id, created }) => Ok(pb::SubmitJobReply {
                job_id,
                created,
                index,
            }),
            (_, other) => Err(unexpected(other)),
        }
    }

    /// `surge fork`: the checks and the new job are the state machine's (`state::fork`); the
    /// caller's tenant travels in the command, which refuses another tenant's source as "no job".
    pub async fn fork(
        &self,
        caller: &Caller,
        req: pb::ForkSandboxRequest,
    ) -> Result<pb::SubmitJobReply, JobApiError> {
        let key = self.idempotency_key("auto-fork", req.idempotency_key)?;
        let labels = req.labels;
        validate::labels(&labels).map_err(JobApiError::from)?;
        validate::lifetime_ms("lease_ms", req.lease_ms).map_err(JobApiError::from)?;
        let (job_id, index, count) = (req.job_id, req.index, req.count);
        let tenant = caller.tenant().map(str::to_owned);
        let at_ms = now_ms();
        let command = if labels.is_empty() && req.lease_ms == 0 {
            Command::Fork {
                job_id,
                index,
                count,
                tenant,
                idempotency_key: key,
                at_ms,
            }
        } else {
            Command::ForkOwned {
                job_id,
                index,
                count,
                tenant,
                idempotency_key: key,
                labels,
                lease_ms: req.lease_ms,
                at_ms,
            }
        };
        self.propose_job(command).await
    }

    /// Another tenant's job is "no job", exactly as a job that does not exist: a tenant learns
    /// nothing about the others.
    pub async fn get(&self, caller: &Caller, job_id: JobId) -> Result<pb::Job, JobApiError> {
        self.replica.linearizable_read().await?;
        self.replica
            .read(|s, _| {
                s.jobs
                    .get(&job_id)
                    .filter(|j| caller.sees(&j.spec.tenant))
                    .map(convert::job_to_pb)
            })
            .ok_or_else(|| no_job(job_id))
    }

    pub async fn list(
        &self,
        caller: &Caller,
        mut req: pb::ListJobsRequest,
    ) -> Result<pb::ListJobsReply, JobApiError> {
        if let Some(t) = caller.tenant() {
            if !req.tenant.is_empty() && req.tenant != t {
                return Err(JobApiError::PermissionDenied(format!(
                    "this token is tenant {t}'s; it cannot list tenant {}'s jobs",
                    req.tenant
                )));
            }
            req.tenant = t.to_string();
        }
        let state = convert::job_state_from_pb(req.state).map_err(JobApiError::from)?;
        validate::labels(&req.labels).map_err(JobApiError::from)?;
        let limit = match req.limit {
            0 => LIST_LIMIT_DEFAULT,
            n if n > LIST_LIMIT_MAX => {
                return Err(JobApiError::Invalid(format!(
                    "limit: at most {LIST_LIMIT_MAX}"
                )))
            }
            n => n,
        };
        self.replica.linearizable_read().await?;
        let jobs = self.replica.read(|s, _| {
            let upper = if req.before_id == 0 {
                u64::MAX
            } else {
                req.before_id
            };
            s.jobs
                .range(..upper)
                .map(|(_, j)| j)
                .rev()
                .filter(|j| req.tenant.is_empty() || j.spec.tenant == req.tenant)
                .filter(|j| state.is_none_or(|st| j.state == st))
                .filter(|j| crate::lifetime::matches(&j.spec.labels, &req.labels))
                .take(limit as usize)
                .map(convert::job_to_pb)
                .collect()
        });
        Ok(pb::ListJobsReply { jobs })
    }

    pub async fn cancel(&self, caller: &Caller, job_id: JobId) -> Result<pb::Job, JobApiError> {
        if caller.tenant().is_some() {
            // A job's tenant never changes: once seen as the caller's, it stays the caller's.
            self.get(caller, job_id).await?;
        }
        match self
            .batcher
            .propose(Command::CancelJob {
                job_id,
                at_ms: now_ms(),
            })
            .await?
        {
            (_, Reply::JobCancelled { job }) => Ok(convert::job_to_pb(&job)),
            (_, other) => Err(unexpected(other)),
        }
    }

    pub async fn update_sandboxes(
        &self,
        caller: &Caller,
        req: pb::UpdateSandboxesRequest,
    ) -> Result<pb::Job, JobApiError> {
        if caller.tenant().is_some() {
            self.get(caller, req.job_id).await?;
        }
        let total = self
            .replica
            .read(|s, _| s.jobs.get(&req.job_id).map(|j| j.spec.count))
            .ok_or_else(|| no_job(req.job_id))?;
        let count = if req.count == 0 {
            total.saturating_sub(req.first_index)
        } else {
            req.count
        };
        let paused = match pb::SandboxAction::try_from(req.action) {
            Ok(pb::SandboxAction::None) => None,
            Ok(pb::SandboxAction::Pause) => Some(true),
            Ok(pb::SandboxAction::Resume) => Some(false),
            Ok(action @ (pb::SandboxAction::Checkpoint | pb::SandboxAction::Stop)) => {
                let action = action.name();
                if req.cpu_millis != 0 || req.memory_mib != 0 {
                    return Err(JobApiError::Invalid(format!(
                        "{action} takes no new resources; {action} and resize are separate requests"
                    )));
                }
                let (job_id, first, at_ms) = (req.job_id, req.first_index, now_ms());
                let command = if action == "stop" {
                    Command::StopSandboxes {
                        job_id,
                        first,
                        count,
                        at_ms,
                    }
                } else {
                    Command::Checkpoint {
                        job_id,
                        first,
                        count,
                        at_ms,
                    }
                };
                self.batcher.propose(command).await?;
                return self.get(caller, req.job_id).await;
            }
            Err(_) => {
                return Err(JobApiError::Invalid(format!(
                    "action: unknown action {}; use {}",
                    req.action,
                    pb::SandboxAction::names().join(", ")
                )))
            }
        };
        let resources = match (req.cpu_millis, req.memory_mib) {
            (0, 0) => None,
            (c, m) => {
                let (cur_c, cur_m) = self
                    .replica
                    .read(|s, _| {
                        s.jobs
                            .get(&req.job_id)
                            .map(|j| (j.spec.per_sandbox.cpu_millis, j.spec.per_sandbox.memory_mib))
                    })
                    .unwrap_or((c, m));
                let r = crate::model::Resources::new(
                    if c == 0 { cur_c } else { c },
                    if m == 0 { cur_m } else { m },
                );
                if r.cpu_millis > validate::CPU_MILLIS_MAX
                    || r.memory_mib > validate::MEMORY_MIB_MAX
                {
                    return Err(JobApiError::Invalid(
                        "resize: more than one sandbox may have".into(),
                    ));
                }
                Some(r)
            }
        };
        if paused.is_none() && resources.is_none() {
            return Err(JobApiError::Invalid(
                "nothing to change: give an action or new resources".into(),
            ));
        }
        let command = Command::SetSandboxes {
            job_id: req.job_id,
            first: req.first_index,
            count,
            paused,
            resources,
        };
        self.batcher.propose(command).await?;
        if let Some(paused) = paused.filter(|_| resources.is_none()) {
            // Checkpointed sandboxes among them are restored on their nodes (`state::checkpoint`).
            let end = u64::from(req.first_index) + u64::from(count);
            let checkpointed = self.replica.read(|s, _| {
                s.jobs.get(&req.job_id).is_some_and(|j| {
                    j.runs.iter().any(|(f, r)| {
                        r.state == crate::runs::SandboxState::Checkpointed
                            && u64::from(f) < end
                            && u64::from(f) + u64::from(r.count) > u64::from(req.first_index)
                    })
                })
            });
            if checkpointed {
                self.batcher
                    .propose(Command::Restore {
                        job_id: req.job_id,
                        first: req.first_index,
                        count,
                        paused,
                        at_ms: now_ms(),
                    })
                    .await?;
            }
        }
        self.get(caller, req.job_id).await
    }

    /// One sandbox of a job the caller may see (another tenant's is "no job", as in [`Self::get`]).
    pub async fn get_sandbox(
        &self,
        caller: &Caller,
        req: pb::GetSandboxRequest,
    ) -> Result<pb::SandboxInfo, JobApiError> {
        self.replica.linearizable_read().await?;
        let found = self.replica.read(|s, _| {
            s.jobs
                .get(&req.job_id)
                .filter(|j| caller.sees(&j.spec.tenant))
                .map(|j| (j.spec.count, convert::sandbox_to_pb(j, req.index)))
        });
        match found {
            None => Err(no_job(req.job_id)),
            Some((count, None)) => Err(JobApiError::NotFound(format!(
                "job {} has sandboxes {}.0 to {}.{}; there is no {}.{}",
                req.job_id,
                req.job_id,
                req.job_id,
                count.saturating_sub(1),
                req.job_id,
                req.index
            ))),
            Some((_, Some(info))) => Ok(info),
        }
    }

    pub async fn set_quota(&self, req: pb::SetQuotaRequest) -> Result<(), JobApiError> {
        validate::name("tenant", &req.tenant).map_err(JobApiError::from)?;
        let max = match (req.cpu_millis, req.memory_mib) {
            (0, 0) => None,
            // One dimension left at 0 is unlimited.
            (c, m) => Some(crate::model::Resources::new(
                if c == 0 { u64::MAX } else { c },
                if m == 0 { u64::MAX } else { m },
            )),
        };
        self.batcher
            .propose(Command::SetQuota {
                tenant: req.tenant,
                max,
            })
            .await?;
        Ok(())
    }

    /// The job now, then every change of it, until it ends or the client goes away.
    pub async fn watch(
        &self,
        caller: &Caller,
        job_id: JobId,
    ) -> Result<tokio::sync::mpsc::Receiver<pb::Job>, JobApiError> {
        let first = self.get(caller, job_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let replica = self.replica.clone();
        let mut applied = replica.subscribe_applied();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(last.clone()).await.is_err() {
                return;
            }
            while convert::job_state_from_pb(last.state)
                .ok()
                .flatten()
                .is_some_and(|s| !s.is_terminal())
            {
                if applied.changed().await.is_err() {
                    return;
                }
                let Some(now) = replica.read(|s, _| s.jobs.get(&job_id).map(convert::job_to_pb))
                else {
                    return;
                };
                if now != last {
                    if tx.send(now.clone()).await.is_err() {
                        return;
                    }
                    last = now;
                }
            }
        });
        Ok(rx)
    }
}

pub(super) fn no_job(job_id: JobId) -> JobApiError {
    JobApiError::NotFound(format!("no job {job_id}"))
}

pub(super) fn unexpected(r: Reply) -> JobApiError {
    JobApiError::Internal(format!("unexpected reply from the state machine: {r:?}"))
}

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobReply>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(self.submit(&caller, req.into_inner()).await?))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.get(&caller, req.into_inner().job_id).await?,
        ))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsReply>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(self.list(&caller, req.into_inner()).await?))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.cancel(&caller, req.into_inner().job_id).await?,
        ))
    }

    async fn update_sandboxes(
        &self,
        req: Request<pb::UpdateSandboxesRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.update_sandboxes(&caller, req.into_inner()).await?,
        ))
    }

    async fn set_quota(
        &self,
        req: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::SetQuotaReply>, Status> {
        self.set_quota(req.into_inner()).await?;
        Ok(Response::new(pb::SetQuotaReply {}))
    }

    async fn get_sandbox(
        &self,
        req: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::SandboxInfo>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.get_sandbox(&caller, req.into_inner()).await?,
        ))
    }

    async fn cancel_jobs(
        &self,
        req: Request<pb::CancelJobsRequest>,
    ) -> Result<Response<pb::CancelJobsReply>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.cancel_by_label(&caller, req.into_inner()).await?,
        ))
    }

    async fn keepalive(
        &self,
        req: Request<pb::KeepaliveRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.keepalive(&caller, req.into_inner()).await?,
        ))
    }

    async fn fork_sandbox(
        &self,
        req: Request<pb::ForkSandboxRequest>,
    ) -> Result<Response<pb::SubmitJobReply>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(self.fork(&caller, req.into_inner()).await?))
    }

    async fn wait_job(
        &self,
        req: Request<pb::WaitJobRequest>,
    ) -> Result<Response<pb::WaitJobReply>, Status> {
        let caller = Caller::of(&req)?;
        Ok(Response::new(self.wait(&caller, req.into_inner()).await?))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = Caller::of(&req)?;
        let rx = self.watch(&caller, req.into_inner().job_id).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(futures::StreamExt::map(stream, Ok))))
    }
}
