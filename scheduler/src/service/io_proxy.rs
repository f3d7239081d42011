//! `surge.sandbox.SandboxIo` on the replicas: exec and files of running sandboxes.
//!
//! Every replica (follower or leader) serves it. A call is checked like the job API (the guard
//! layer authenticates; a tenant sees only its own jobs, and another tenant's sandbox is
//! "no job N", word for word as a missing one), routed with the replica's applied state to the
//! node that holds the sandbox, and forwarded there, to the node daemon's I/O service, which
//! serves the same gRPC service. Bytes stream through without touching Raft, so throughput grows
//! with the number of replicas and nodes, and a leader failover cuts no stream that does not run
//! through the leader. See `docs/ARCHITECTURE.md`, "Exec and files".

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;

use futures::{Stream, StreamExt};
use surge_proto::sandbox as pb;
use surge_proto::sandbox::sandbox_io_client::SandboxIoClient;
use surge_proto::sandbox::sandbox_io_server::{SandboxIo, SandboxIoServer};
use tokio::sync::mpsc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use super::guard::Caller;
use super::Replica;
use crate::runs::SandboxState;

/// Node connections kept open, at most (one per node; past this the cache starts over).
pub const NODE_CHANNELS_MAX: usize = 100_000;
/// Messages buffered from a client toward its node before the client waits.
const FORWARD_BUFFER: usize = 8;

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Where a call goes: the sandbox as the node knows it, and the node's I/O address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub sandbox: pb::SandboxRef,
    pub address: String,
}

/// Why a call has nowhere to go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NoRoute {
    /// No such job or sandbox (or another tenant's): worth one look at the latest state.
    Missing(String),
    /// Not running (yet, or any more): worth one look at the latest state too.
    NotRunning(String),
    /// Running on a node that cannot be reached for I/O.
    NoAddress(String),
}

impl From<NoRoute> for Status {
    fn from(r: NoRoute) -> Status {
        match r {
            NoRoute::Missing(m) => Status::not_found(m),
            NoRoute::NotRunning(m) => Status::failed_precondition(m),
            NoRoute::NoAddress(m) => Status::unavailable(m),
        }
    }
}

/// The route of `(job, index)` for `caller` in one state (pure).
fn route_in(
    s: &crate::state::ClusterState,
    caller: &Caller,
    job_id: u64,
    index: u32,
) -> Result<Route, NoRoute> {
    let job = s
        .jobs
        .get(&job_id)
        .filter(|j| caller.sees(&j.spec.tenant))
        .ok_or_else(|| NoRoute::Missing(format!("no job {job_id}")))?;
    let (_, run) = job.runs.get(index).ok_or_else(|| {
        NoRoute::Missing(format!(
            "job {job_id} has sandboxes {job_id}.0 to {job_id}.{}; there is no {job_id}.{index}",
            job.spec.count.saturating_sub(1)
        ))
    })?;
    let id = format!("{job_id}.{index}");
    match run.state {
        SandboxState::Running if run.paused || run.stop => Err(NoRoute::NotRunning(format!(
            "sandbox {id} is being {}",
            if run.stop { "stopped" } else { "paused" }
        ))),
        SandboxState::Running => {
            let node_id = run.node.clone().unwrap_or_default();
            let address = s
                .nodes
                .get(&node_id)
                .map(|n| n.spec.address.clone())
                .unwrap_or_default();
            if address.is_empty() {
                return Err(NoRoute::NoAddress(format!(
                    "sandbox {id} runs on node {node_id}, which serves no exec or files (its daemon gave no --listen address)"
                )));
            }
            Ok(Route {
                sandbox: pb::SandboxRef {
                    job_id,
                    index,
                    node_id,
                    generation: run.generation,
                },
                address,
            })
        }
        SandboxState::Pending | SandboxState::Placed => Err(NoRoute::NotRunning(format!(
            "sandbox {id} is {} and not running yet; wait for it (surge wait {id})",
            run.state.as_str()
        ))),
        SandboxState::Paused => Err(NoRoute::NotRunning(format!(
            "sandbox {id} is paused; resume it first (surge resume {id})"
        ))),
        ended => Err(NoRoute::NotRunning(format!(
            "sandbox {id} has ended ({}); exec and files need a running sandbox",
            ended.as_str()
        ))),
    }
}

pub struct IoProxy {
    replica: Replica,
    tls: Option<ClientTlsConfig>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl IoProxy {
    pub fn new(replica: Replica, tls: Option<ClientTlsConfig>) -> Self {
        Self {
            replica,
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    pub fn into_server_arc(self: std::sync::Arc<Self>) -> SandboxIoServer<Self> {
        SandboxIoServer::from_arc(self)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
    }

    /// Where `sandbox` runs, as `caller` may see it. This replica's applied state first; if that
    /// has no running sandbox there (it may lag), once more after catching up with the leader.
    pub async fn route(
        &self,
        caller: &Caller,
        sandbox: Option<&pb::SandboxRef>,
    ) -> Result<Route, Status> {
        let r = sandbox.ok_or_else(|| Status::invalid_argument("sandbox: missing"))?;
        let (job, index) = (r.job_id, r.index);
        let local = match self.replica.read(|s, _| route_in(s, caller, job, index)) {
            Ok(route) => return Ok(route),
            Err(NoRoute::NoAddress(m)) => return Err(Status::unavailable(m)),
            Err(e) => e,
        };
        // Between leaders there is nothing newer to catch up with: this replica's answer
        // stands ("not running yet" is then as true as it can be known).
        if self.replica.linearizable_read().await.is_err() {
            return Err(local.into());
        }
        Ok(self.replica.read(|s, _| route_in(s, caller, job, index))?)
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// A client of the node at `address` (connections are made lazily and kept).
    pub fn node(&self, address: &str) -> Result<SandboxIoClient<Channel>, Status> {
        self.channel(address).map(client)
    }

    /// The connection to the node at `address`.
    pub fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let uri = surge_security::tls::uri_for(address, self.tls.is_some());
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| Status::internal(format!("node address {address:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(5))
            .http2_keep_alive_interval(std::time::Duration::from_secs(10));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::internal(format!("node {address}: TLS: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        if map.len() >= NODE_CHANNELS_MAX {
            map.clear();
        }
        map.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// Open the node's side of a client-streaming call: the first message (with the route
    /// filled in), then the client's messages as they come.
    fn forward<T: Send + 'static>(
        first: T,
        mut inbound: Streaming<T>,
    ) -> tokio_stream::wrappers::ReceiverStream<T> {
        let (tx, rx) = mpsc::channel(FORWARD_BUFFER);
        tokio::spawn(async move {
            if tx.send(first).await.is_err() {
                return;
            }
            while let Some(Ok(msg)) = inbound.next().await {
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn client(c: Channel) -> SandboxIoClient<Channel> {
    SandboxIoClient::new(c)
        .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
}

/// A node's failure as the client sees it: its own statuses pass through; a node that cannot
/// be reached is named.
fn node_status(address: &str, s: Status) -> Status {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown if s.message().contains("transport") => {
            Status::unavailable(format!(
                "the node holding this sandbox ({address}) cannot be reached: {}",
                s.message()
            ))
        }
        _ => s,
    }
}

#[tonic::async_trait]
impl SandboxIo for IoProxy {
    type ExecStream = Out<pb::ExecOutput>;

    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let caller = Caller::of(&req)?;
        let mut inbound = req.into_inner();
        let mut start =
            pb::first_message(&mut inbound, "an exec", |m: pb::ExecInput| match m.input {
                Some(pb::exec_input::Input::Start(s)) => Some(s),
                _ => None,
            })
            .await?;
        let route = self.route(&caller, start.sandbox.as_ref()).await?;
        start.sandbox = Some(route.sandbox);
        let msg = pb::ExecInput {
            input: Some(pb::exec_input::Input::Start(start)),
        };
        let out = self
            .node(&route.address)?
            .exec(Self::forward(msg, inbound))
            .await
            .map_err(|s| node_status(&route.address, s))?;
        Ok(Response::new(Box::pin(out.into_inner())))
    }

    type ReadFileStream = Out<pb::Chunk>;

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let caller = Caller::of(&req)?;
        let mut req = req.into_inner();
        let route = self.route(&caller, req.sandbox.as_ref()).await?;
        req.sandbox = Some(route.sandbox);
        let out = self
            .node(&route.address)?
            .read_file(req)
            .await
            .map_err(|s| node_status(&route.address, s))?;
        Ok(Response::new(Box::pin(out.into_inner())))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileInput>>,
    ) -> Result<Response<pb::WriteFileReply>, Status> {
        let caller = Caller::of(&req)?;
        let mut inbound = req.into_inner();
        let mut start =
            pb::first_message(
                &mut inbound,
                "a file write",
                |m: pb::WriteFileInput| match m.input {
                    Some(pb::write_file_input::Input::Start(s)) => Some(s),
                    _ => None,
                },
            )
            .await?;
        let route = self.route(&caller, start.sandbox.as_ref()).await?;
        start.sandbox = Some(route.sandbox);
        let msg = pb::WriteFileInput {
            input: Some(pb::write_file_input::Input::Start(start)),
        };
        self.node(&route.address)?
            .write_file(Self::forward(msg, inbound))
            .await
            .map_err(|s| node_status(&route.address, s))
    }

    async fn list_dir(
        &self,
        req: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirReply>, Status> {
        let caller = Caller::of(&req)?;
        let mut req = req.into_inner();
        let route = self.route(&caller, req.sandbox.as_ref()).await?;
        req.sandbox = Some(route.sandbox);
        self.node(&route.address)?
            .list_dir(req)
            .await
            .map_err(|s| node_status(&route.address, s))
    }

    type DownloadStream = Out<pb::Chunk>;

    async fn download(
        &self,
        req: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let caller = Caller::of(&req)?;
        let mut req = req.into_inner();
        let route = self.route(&caller, req.sandbox.as_ref()).await?;
        req.sandbox = Some(route.sandbox);
        let out = self
            .node(&route.address)?
            .download(req)
            .await
            .map_err(|s| node_status(&route.address, s))?;
        Ok(Response::new(Box::pin(out.into_inner())))
    }

    async fn upload(
        &self,
        req: Request<Streaming<pb::UploadInput>>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        let caller = Caller::of(&req)?;
        let mut inbound = req.into_inner();
        let mut start = pb::first_message(&mut inbound, "an upload", |m: pb::UploadInput| match m
            .input
        {
            Some(pb::upload_input::Input::Start(s)) => Some(s),
            _ => None,
        })
        .await?;
        let route = self.route(&caller, start.sandbox.as_ref()).await?;
        start.sandbox = Some(route.sandbox);
        let msg = pb::UploadInput {
            input: Some(pb::upload_input::Input::Start(start)),
        };
        self.node(&route.address)?
            .upload(Self::forward(msg, inbound))
            .await
            .map_err(|s| node_status(&route.address, s))
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        let caller = Caller::of(&req)?;
        let mut req = req.into_inner();
        crate::validate::name("template", &req.template)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let route = self.route(&caller, req.sandbox.as_ref()).await?;
        req.sandbox = Some(route.sandbox);
        self.node(&route.address)?
            .snapshot(req)
            .await
            .map_err(|s| node_status(&route.address, s))
    }

    async fn copy_template(
        &self,
        req: Request<pb::CopyTemplateRequest>,
    ) -> Result<Response<pb::CopyTemplateReply>, Status> {
        // Admin only (the guard's rule): templates are shared by every tenant of a node.
        Caller::of(&req)?;
        self.run_copy(req.into_inner()).await.map(Response::new)
    }
}
