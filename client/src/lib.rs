//! The typed client of a surge cluster: what the CLI, the harness, the benches and the tests
//! use to talk to replicas.
//!
//! ```text
//!   Client::new("a:7070,b:7070", credentials)
//!     .submit(spec) ──► replica a ──(forwards)──► leader
//!          │  a unreachable, or between leaders (Unavailable)
//!          └──────────► replica b, then a again, with backoff, while the call is safe to repeat
//! ```
//!
//! - Credentials ([`Credentials`]: a TLS dir and a token) are passed in; nothing is global.
//! - A call is repeated only when repeating it cannot do something twice: reads, and writes
//!   that are idempotent by construction (a submission always carries an idempotency key —
//!   [`Client::submit`] makes one when the caller gave none — cancel, pause, resume, stop,
//!   resize to a value, drain, set a quota). Membership changes are not repeated.
//! - Errors ([`ClientError`]) name the replica that failed and tell the caller's own connection
//!   problems (down, TLS on one side only) apart from a replica's answer.
//! - [`convert`] turns what a person types (`0.5` CPUs, `os=linux`, `JOB.INDEX`) into requests.

pub mod connect;
pub mod convert;
mod error;
pub mod io;
pub mod probe;
pub mod process;

use std::future::Future;
use std::time::Duration;

use surge_proto::cluster::{
    AddMemberRequest, MembershipReply, RemoveMemberRequest, StatusReply, StatusRequest,
};
use surge_proto::jobs as pb;
use surge_proto::node as npb;
use surge_proto::sandbox::sandbox_io_client::SandboxIoClient;

pub use connect::{open, Conn, ConnectError, Credentials, CONNECT_TIMEOUT, REQUEST_TIMEOUT};
pub use convert::{Sandboxes, SubmitSpec};
pub use error::ClientError;

/// Longest server-side wait of one `WaitJob` request (below `REQUEST_TIMEOUT`).
pub const WAIT_CHUNK_MS: u64 = 15_000;

/// Replica addresses one client accepts (`--server a,b,c`).
pub const SERVERS_MAX: usize = 16;
/// Attempts of one retryable call, across the replicas given.
pub const ATTEMPTS_MAX: u32 = 8;
/// Wait before the second attempt; doubles per attempt up to [`RETRY_BACKOFF_MAX`].
pub const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// No retry starts later than this after the first attempt: longer than an election on a busy
/// machine, short enough that a person waiting at a prompt is told what is wrong.
pub const RETRY_WINDOW: Duration = Duration::from_secs(8);

/// Whether a call may be sent again after a retryable failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repeat {
    Safe,
    /// Again only when no replica was reached, so nothing can have happened (an exec whose
    /// input is all in memory).
    Unsent,
    Never,
}

/// A client of one cluster: its replicas' addresses and the caller's credentials.
#[derive(Clone, Debug)]
pub struct Client {
    servers: Vec<String>,
    creds: Credentials,
    /// One exec-and-files connection per replica, kept: an agent's loop of execs pays no
    /// connection set-up per call.
    io: Vec<SandboxIoClient<Conn>>,
}

impl Client {
    /// `servers`: one replica's `HOST:PORT`, or several separated by commas.
    pub fn new(servers: &str, creds: Credentials) -> Result<Client, ClientError> {
        let list: Vec<String> = servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if list.is_empty() {
            return Err(ClientError::Input(
                "no server address: give --server HOST:PORT or set SURGE_SERVER".into(),
            ));
        }
        if list.len() > SERVERS_MAX {
            return Err(ClientError::Input(format!(
                "{} server addresses: at most {SERVERS_MAX}",
                list.len()
            )));
        }
        // Check every address now, so a typo fails before the first call.
        let mut io = Vec::with_capacity(list.len());
        for s in &list {
            connect::channel(s, &creds)?;
            io.push(connect::sandbox_io(s, &creds)?);
        }
        Ok(Client {
            servers: list,
            creds,
            io,
        })
    }

    /// A client of an open cluster (no TLS, no token).
    pub fn open(servers: &str) -> Result<Client, ClientError> {
        Client::new(servers, Credentials::default())
    }

    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// The job API of the first replica, for calls this type does not wrap.
    pub fn jobs_api(&self) -> Result<pb::jobs_client::JobsClient<Conn>, ClientError> {
        Ok(connect::jobs(&self.servers[0], &self.creds)?)
    }

    /// The node API of the first replica.
    pub fn nodes_api(&self) -> Result<npb::node_api_client::NodeApiClient<Conn>, ClientError> {
        Ok(connect::nodes(&self.servers[0], &self.creds)?)
    }

    /// Classify a failed call; a failure on this side of a connection that did open is checked
    /// for a TLS mismatch by asking the port what it speaks ([`probe`]).
    async fn fail(&self, addr: &str, status: tonic::Status) -> ClientError {
        let tls = self.creds.tls.is_some();
        let err = ClientError::from_status(addr, tls, status);
        let ambiguous = matches!(err, ClientError::Unreachable { .. })
            || matches!(
                err.code(),
                Some(tonic::Code::Cancelled | tonic::Code::Unknown)
            );
        if ambiguous {
            match (probe::speaks(addr).await, tls) {
                (Some(probe::Speaks::Tls), false) => {
                    return ClientError::TlsRequired {
                        addr: addr.to_string(),
                    }
                }
                (Some(probe::Speaks::PlainHttp2), true) => {
                    return ClientError::TlsUnexpected {
                        addr: addr.to_string(),
                    }
                }
                _ => {}
            }
        }
        err
    }

    /// Run `f` against the replicas in turn until it succeeds, fails for good, or (for a call
    /// that is safe to repeat) [`ATTEMPTS_MAX`] attempts or [`RETRY_WINDOW`] have passed; the
    /// error names the replica of the last attempt.
    async fn call<T, F, Fut>(&self, repeat: Repeat, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(String) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let started = tokio::time::Instant::now();
        let mut backoff = RETRY_BACKOFF_FIRST;
        let mut attempt = 0u32;
        loop {
            let addr = &self.servers[attempt as usize % self.servers.len()];
            let err = match f(addr.clone()).await {
                Ok(v) => return Ok(v),
                Err(status) => self.fail(addr, status).await,
            };
            attempt += 1;
            // A replica that cannot be reached at all is worth another try only when there is
            // another replica to try; one that answered "unavailable" (between leaders) is
            // worth waiting for.
            let worth = match &err {
                ClientError::Unreachable { .. } => self.servers.len() > 1,
                _ if repeat == Repeat::Unsent => false,
                e => e.is_retryable(),
            };
            if repeat == Repeat::Never
                || !worth
                || attempt >= ATTEMPTS_MAX
                || started.elapsed() + backoff > RETRY_WINDOW
            {
                return Err(err);
            }
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(RETRY_BACKOFF_MAX);
        }
    }

    /// The exec and files client of the replica at `addr` (one of [`Client::servers`]).
    fn io_at(&self, addr: &str) -> Result<SandboxIoClient<Conn>, tonic::Status> {
        self.servers
            .iter()
            .position(|s| s == addr)
            .map(|i| self.io[i].clone())
            .ok_or_else(|| {
                tonic::Status::invalid_argument(format!("{addr} is not a server of this client"))
            })
    }

    /// A failure in the middle of a stream, as an error of this cluster.
    fn answer(&self, status: tonic::Status) -> ClientError {
        ClientError::from_status(&self.servers.join(","), self.creds.tls.is_some(), status)
    }

    fn jobs_at(&self, addr: &str) -> Result<pb::jobs_client::JobsClient<Conn>, tonic::Status> {
        connect::jobs(addr, &self.creds).map_err(|e| tonic::Status::invalid_argument(e.to_string()))
    }

    fn nodes_at(
        &self,
        addr: &str,
    ) -> Result<npb::node_api_client::NodeApiClient<Conn>, tonic::Status> {
        connect::nodes(addr, &self.creds)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))
    }

    fn cluster_at(
        &self,
        addr: &str,
    ) -> Result<surge_proto::cluster::cluster_client::ClusterClient<Conn>, tonic::Status> {
        connect::cluster(addr, &self.creds)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))
    }

    /// The cluster as the first replica that answers sees it.
    pub async fn status(&self) -> Result<StatusReply, ClientError> {
        self.call(Repeat::Safe, |a| async move {
            Ok(self
                .cluster_at(&a)?
                .status(StatusRequest {})
                .await?
                .into_inner())
        })
        .await
    }

    pub async fn add_member(&self, req: AddMemberRequest) -> Result<MembershipReply, ClientError> {
        self.call(Repeat::Never, |a| {
            let req = req.clone();
            async move { Ok(self.cluster_at(&a)?.add_member(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn remove_member(
        &self,
        req: RemoveMemberRequest,
    ) -> Result<MembershipReply, ClientError> {
        self.call(Repeat::Never, |a| async move {
            Ok(self.cluster_at(&a)?.remove_member(req).await?.into_inner())
        })
        .await
    }

    /// Submit a job. A request without an idempotency key gets one, so that a retry after a
    /// lost reply returns the first job instead of making a second.
    pub async fn submit(
        &self,
        mut req: pb::SubmitJobRequest,
    ) -> Result<pb::SubmitJobReply, ClientError> {
        if req.idempotency_key.is_empty() {
            req.idempotency_key = fresh_key();
        }
        self.call(Repeat::Safe, |a| {
            let req = req.clone();
            async move { Ok(self.jobs_at(&a)?.submit_job(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn get_job(&self, job_id: u64) -> Result<pb::Job, ClientError> {
        self.call(Repeat::Safe, |a| async move {
            Ok(self
                .jobs_at(&a)?
                .get_job(pb::GetJobRequest { job_id })
                .await?
                .into_inner())
        })
        .await
    }

    pub async fn list_jobs(
        &self,
        req: pb::ListJobsRequest,
    ) -> Result<pb::ListJobsReply, ClientError> {
        self.call(Repeat::Safe, |a| {
            let req = req.clone();
            async move { Ok(self.jobs_at(&a)?.list_jobs(req).await?.into_inner()) }
        })
        .await
    }

    /// A stream of the job as it changes, ending when the job does. Opening the stream is
    /// retried; a stream that breaks later is the caller's to reopen.
    pub async fn watch_job(
        &self,
        job_id: u64,
    ) -> Result<(String, tonic::Streaming<pb::Job>), ClientError> {
        self.call(Repeat::Safe, |a| async move {
            let s = self
                .jobs_at(&a)?
                .watch_job(pb::GetJobRequest { job_id })
                .await?
                .into_inner();
            Ok((a, s))
        })
        .await
    }

    /// One message of a stream from `addr`, with the stream's failure classified.
    pub async fn next<T>(
        &self,
        addr: &str,
        stream: &mut tonic::Streaming<T>,
    ) -> Result<Option<T>, ClientError> {
        match stream.message().await {
            Ok(m) => Ok(m),
            Err(s) => Err(self.fail(addr, s).await),
        }
    }

    pub async fn cancel_job(&self, job_id: u64) -> Result<pb::Job, ClientError> {
        self.call(Repeat::Safe, |a| async move {
            Ok(self
                .jobs_at(&a)?
                .cancel_job(pb::CancelJobRequest { job_id })
                .await?
                .into_inner())
        })
        .await
    }

    pub async fn get_sandbox(
        &self,
        job_id: u64,
        index: u32,
    ) -> Result<pb::SandboxInfo, ClientError> {
        self.call(Repeat::Safe, |a| async move {
            Ok(self
                .jobs_at(&a)?
                .get_sandbox(pb::GetSandboxRequest { job_id, index })
                .await?
                .into_inner())
        })
        .await
    }

    /// Pause, resume, stop or resize sandboxes: each sets a target, so a repeat is harmless.
    pub async fn update_sandboxes(
        &self,
        req: pb::UpdateSandboxesRequest,
    ) -> Result<pb::Job, ClientError> {
        self.call(Repeat::Safe, |a| async move {
            Ok(self.jobs_at(&a)?.update_sandboxes(req).await?.into_inner())
        })
        .await
    }

    /// Cancel every job of the caller's tenant whose labels match `req.labels` (one entry).
    pub async fn cancel_jobs(
        &self,
        req: pb::CancelJobsRequest,
    ) -> Result<pb::CancelJobsReply, ClientError> {
        self.call(Repeat::Safe, |a| {
            let req = req.clone();
            async move { Ok(self.jobs_at(&a)?.cancel_jobs(req).await?.into_inner()) }
        })
        .await
    }

    /// Renew the job's lease and, with `ttl_ms`, extend its sandboxes' TTL. An owner that
    /// submitted with a lease calls this every lease/3.
    pub async fn keepalive(&self, req: pb::KeepaliveRequest) -> Result<pb::Job, ClientError> {
        self.call(Repeat::Safe, |a| async move {
            Ok(self.jobs_at(&a)?.keepalive(req).await?.into_inner())
        })
        .await
    }

    /// Wait (server-side, without polling) until one sandbox or all of a job's are running
    /// or ended, the job ended, or the timeout passed; the reply says which.
    /// A wait longer than one request may last (`REQUEST_TIMEOUT`) is several server-side
    /// waits of at most [`WAIT_CHUNK_MS`] in a row, each retried across replicas.
    pub async fn wait_job(&self, req: pb::WaitJobRequest) -> Result<pb::WaitJobReply, ClientError> {
        let total_ms = if req.timeout_ms == 0 {
            60_000
        } else {
            req.timeout_ms
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(total_ms);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
            let chunk = pb::WaitJobRequest {
                timeout_ms: left_ms.min(WAIT_CHUNK_MS),
                ..req
            };
            let reply = self
                .call(Repeat::Safe, |a| async move {
                    Ok(self.jobs_at(&a)?.wait_job(chunk).await?.into_inner())
                })
                .await?;
            let timed_out = reply.outcome == pb::WaitOutcome::TimedOut as i32;
            if !timed_out || left_ms <= WAIT_CHUNK_MS {
                return Ok(reply);
            }
        }
    }

    pub async fn set_quota(&self, req: pb::SetQuotaRequest) -> Result<(), ClientError> {
        self.call(Repeat::Safe, |a| {
            let req = req.clone();
            async move {
                self.jobs_at(&a)?.set_quota(req).await?;
                Ok(())
            }
        })
        .await
    }

    pub async fn list_nodes(&self) -> Result<Vec<npb::NodeInfo>, ClientError> {
        self.call(Repeat::Safe, |a| async move {
            Ok(self
                .nodes_at(&a)?
                .list_nodes(npb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes)
        })
        .await
    }

    pub async fn drain_node(&self, node_id: String) -> Result<npb::NodeInfo, ClientError> {
        self.call(Repeat::Safe, |a| {
            let node_id = node_id.clone();
            async move {
                Ok(self
                    .nodes_at(&a)?
                    .drain_node(npb::DrainNodeRequest { node_id })
                    .await?
                    .into_inner())
            }
        })
        .await
    }
}

/// An idempotency key no other submission shares: the time, this process and a counter.
fn fresh_key() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "client-{nanos:x}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}
