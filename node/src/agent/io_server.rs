//! The node daemon's I/O service: `surge.sandbox.SandboxIo`, served on `--listen` and called
//! only by the scheduler replicas (with `--tls-dir`, mutual TLS and a replica certificate), which
//! forward their clients' exec and file calls here after checking the caller. It carries each
//! call to the runtime's [`SandboxIo`] and every byte back, through bounded channels.
//!
//! One process may host many nodes (`--simulate N`): the call names the node (`SandboxRef.node_id`)
//! and the run (`generation`), and a call for another node, or an older run of the sandbox, is
//! refused: the replica that routed it had a stale view.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use surge_proto::sandbox as pb;
use surge_proto::sandbox::sandbox_io_server::{SandboxIo as SandboxIoApi, SandboxIoServer};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::activity::Activity;
use crate::runtime::io::{
    self, EntryKind, ExecControl, ExecOutput, ExecSpec, IoError, SandboxIo, WriteSpec,
    EXEC_TIMEOUT_DEFAULT,
};
use crate::runtime::{Runtime, SandboxId};

/// Chunks buffered per direction of one call before the sender waits.
const CHANNEL_CHUNKS: usize = 8;
/// Nodes one process serves, at most (`--simulate` caps lower).
pub const HOSTED_MAX: usize = 100_000;

/// One node this process serves.
pub struct Hosted<R> {
    pub runtime: Arc<R>,
    pub activity: Arc<Activity>,
    /// The node's templates (`None`: a simulated node, which has none on disk).
    pub templates: Option<crate::template::Templates>,
}

/// The service; see the module docs.
pub struct IoService<R> {
    pub(super) nodes: Arc<HashMap<String, Hosted<R>>>,
    /// `Some`: callers must present a replica certificate (the server runs mutual TLS).
    pub(super) tls: bool,
    /// How this process calls other nodes' template exports.
    pub(super) client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Template copies in and out at once (see `template_server`).
    pub(super) transfers: Arc<super::template_server::Transfers>,
}

impl<R> Clone for IoService<R> {
    fn clone(&self) -> Self {
        Self {
            nodes: self.nodes.clone(),
            tls: self.tls,
            client_tls: self.client_tls.clone(),
            transfers: self.transfers.clone(),
        }
    }
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl<R: Runtime + SandboxIo> IoService<R> {
    pub fn new(nodes: HashMap<String, Hosted<R>>, tls: bool) -> Self {
        Self {
            nodes: Arc::new(nodes),
            tls,
            client_tls: None,
            transfers: Arc::default(),
        }
    }

    pub fn with_client_tls(mut self, tls: Option<tonic::transport::ClientTlsConfig>) -> Self {
        self.client_tls = tls;
        self
    }

    pub fn into_server(self) -> SandboxIoServer<Self> {
        SandboxIoServer::new(self)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
    }

    /// Only a replica may call: with TLS its certificate says so; without, the node trusts its
    /// network (as the replicas' own internal APIs do).
    fn check_peer<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.check_peer_is(req, &[surge_security::Role::Replica])
    }

    /// The caller's certificate names one of `roles` (always true without TLS).
    pub(super) fn check_peer_is<T>(
        &self,
        req: &Request<T>,
        roles: &[surge_security::Role],
    ) -> Result<(), Status> {
        if !self.tls {
            return Ok(());
        }
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::permission_denied("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::permission_denied("a client certificate is required"))?;
        match surge_security::role::role_of(leaf.as_ref()) {
            Ok(role) if roles.contains(&role) => Ok(()),
            Ok(role) => Err(Status::permission_denied(format!(
                "a {} certificate may not call this on a node; only {} may",
                role.as_str(),
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))),
            Err(e) => Err(Status::permission_denied(e.to_string())),
        }
    }

    /// The node and sandbox a call targets, checked against what runs here.
    async fn target(
        &self,
        sandbox: Option<&pb::SandboxRef>,
    ) -> Result<(Arc<R>, Arc<Activity>, SandboxId), Status> {
        let s = sandbox.ok_or_else(|| Status::invalid_argument("sandbox: missing"))?;
        let hosted = self
            .nodes
            .get(&s.node_id)
            .ok_or_else(|| Status::not_found(format!("node {:?} is not served here", s.node_id)))?;
        let id = SandboxId::new(s.job_id, s.index);
        let observed =
            hosted.runtime.status(id).await.map_err(|_| {
                Status::not_found(format!("sandbox {id} is not on node {}", s.node_id))
            })?;
        if observed.generation != s.generation {
            return Err(Status::not_found(format!(
                "sandbox {id} on node {} is run {}, not run {}; it was restarted or moved",
                s.node_id, observed.generation, s.generation
            )));
        }
        hosted.activity.touch(id);
        Ok((hosted.runtime.clone(), hosted.activity.clone(), id))
    }
}

/// The gRPC status of an I/O error.
pub fn status_of(e: IoError) -> Status {
    let msg = e.to_string();
    match e {
        IoError::NoSandbox(_) | IoError::NotFound { .. } => Status::not_found(msg),
        IoError::NotRunning { .. } | IoError::WrongKind { .. } => Status::failed_precondition(msg),
        IoError::Invalid(_) | IoError::BadArchive(_) | IoError::TooLarge(_) => {
            Status::invalid_argument(msg)
        }
        IoError::Busy(_) => Status::resource_exhausted(msg),
        IoError::Exists(_) => Status::already_exists(msg),
        IoError::Unsupported(_) => Status::unimplemented(msg),
        IoError::Runtime(_) | IoError::Io { .. } => Status::internal(msg),
    }
}

/// The exec a start message asks for, checked.
pub fn exec_spec(start: &pb::ExecStart) -> Result<ExecSpec, IoError> {
    let spec = ExecSpec {
        command: start.command.clone(),
        env: start.env.clone(),
        cwd: (!start.cwd.is_empty()).then(|| start.cwd.clone()),
        timeout: start
            .timeout_ms
            .map_or(EXEC_TIMEOUT_DEFAULT, Duration::from_millis),
        stdin: start.stdin,
    };
    spec.validate()?;
    Ok(spec)
}

fn entry_kind(k: EntryKind) -> pb::EntryKind {
    match k {
        EntryKind::File => pb::EntryKind::File,
        EntryKind::Dir => pb::EntryKind::Dir,
        EntryKind::Symlink => pb::EntryKind::Symlink,
        EntryKind::Other => pb::EntryKind::Other,
    }
}

/// Forward a client's byte stream (after its first message) into a channel, stopping at the
/// first error or when the receiver is gone.
fn pump_in<T: Send + 'static>(
    mut inbound: Streaming<T>,
    tx: mpsc::Sender<Bytes>,
    data: impl Fn(T) -> Option<Bytes> + Send + 'static,
) {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = inbound.next().await {
            let Some(b) = data(msg) else { break };
            if tx.send(b).await.is_err() {
                break;
            }
        }
    });
}

/// Run `call` (which writes chunks to the channel it is given) and stream those chunks as the
/// reply. An error before the first chunk (no such file, a directory) is the call's status; a
/// later one ends the stream. A client that goes away drops the call.
async fn stream_out<F, Fut>(call: F) -> Result<Out<pb::Chunk>, Status>
where
    F: FnOnce(mpsc::Sender<Bytes>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<u64, IoError>> + Send + 'static,
{
    let (resp_tx, resp_rx) = mpsc::channel::<Result<pb::Chunk, Status>>(CHANNEL_CHUNKS);
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
        let work = call(tx);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                Some(data) = rx.recv() => {
                    if resp_tx.send(Ok(pb::Chunk { data })).await.is_err() {
                        return;
                    }
                }
                () = resp_tx.closed() => return,
            }
        };
        while let Ok(data) = rx.try_recv() {
            if resp_tx.send(Ok(pb::Chunk { data })).await.is_err() {
                return;
            }
        }
        if let Err(e) = result {
            let _ = resp_tx.send(Err(status_of(e))).await;
        }
    });
    let mut resp_rx = resp_rx;
    let first = match resp_rx.recv().await {
        None => None,
        Some(Err(s)) => return Err(s),
        Some(Ok(c)) => Some(Ok(c)),
    };
    Ok(Box::pin(futures::stream::iter(first).chain(
        tokio_stream::wrappers::ReceiverStream::new(resp_rx),
    )))
}

#[tonic::async_trait]
impl<R: Runtime + SandboxIo> SandboxIoApi for IoService<R> {
    type ExecStream = Out<pb::ExecOutput>;

    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        self.check_peer(&req)?;
        let mut inbound = req.into_inner();
        let start = pb::first_message(&mut inbound, "an exec", |m: pb::ExecInput| match m.input {
            Some(pb::exec_input::Input::Start(s)) => Some(s),
            _ => None,
        })
        .await?;
        let spec = exec_spec(&start).map_err(status_of)?;
        let (runtime, activity, id) = self.target(start.sandbox.as_ref()).await?;
        let (ctl_tx, ctl_rx) = mpsc::channel(CHANNEL_CHUNKS);
        let stdin = spec.stdin;
        let input = tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                let ctl = match msg.input {
                    Some(pb::exec_input::Input::Stdin(b)) if stdin => ExecControl::Stdin(b),
                    Some(pb::exec_input::Input::CloseStdin(_)) => ExecControl::CloseStdin,
                    Some(pb::exec_input::Input::Signal(n)) if (1..=64).contains(&n) => {
                        ExecControl::Signal(n)
                    }
                    // Stdin the exec did not ask for, a second start, or a bad signal: ignored.
                    _ => continue,
                };
                if ctl_tx.send(ctl).await.is_err() {
                    break;
                }
            }
        });
        let (resp_tx, resp_rx) = mpsc::channel(CHANNEL_CHUNKS);
        tokio::spawn(async move {
            let _input = AbortOnDrop(input);
            let (out_tx, mut out_rx) = mpsc::channel(CHANNEL_CHUNKS);
            let work = runtime.exec(id, spec, ctl_rx, out_tx);
            tokio::pin!(work);
            let convert = |o: ExecOutput| pb::ExecOutput {
                output: Some(match o {
                    ExecOutput::Stdout(b) => pb::exec_output::Output::Stdout(b),
                    ExecOutput::Stderr(b) => pb::exec_output::Output::Stderr(b),
                }),
            };
            let result = loop {
                tokio::select! {
                    r = &mut work => break r,
                    Some(o) = out_rx.recv() => {
                        // The client went away: returning drops the exec, which kills it.
                        if resp_tx.send(Ok(convert(o))).await.is_err() {
                            return;
                        }
                    }
                    // ... also while the command prints nothing.
                    () = resp_tx.closed() => return,
                }
            };
            while let Some(o) = out_rx.recv().await {
                if resp_tx.send(Ok(convert(o))).await.is_err() {
                    return;
                }
            }
            activity.touch(id);
            let last = match result {
                Ok(st) => Ok(pb::ExecOutput {
                    output: Some(pb::exec_output::Output::Exit(pb::ExecExit {
                        exit_code: st.code,
                        signal: st.signal.unwrap_or(0),
                        timed_out: st.timed_out,
                        duration_ms: u64::try_from(st.duration.as_millis()).unwrap_or(u64::MAX),
                    })),
                }),
                Err(e) => Err(status_of(e)),
            };
            let _ = resp_tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(resp_rx),
        )))
    }

    type ReadFileStream = Out<pb::Chunk>;

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        self.check_peer(&req)?;
        let req = req.into_inner();
        io::check_path(&req.path).map_err(status_of)?;
        let (runtime, _, id) = self.target(req.sandbox.as_ref()).await?;
        let path = req.path;
        Ok(Response::new(
            stream_out(move |tx| async move { runtime.read_file(id, path, tx).await }).await?,
        ))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileInput>>,
    ) -> Result<Response<pb::WriteFileReply>, Status> {
        self.check_peer(&req)?;
        let mut inbound = req.into_inner();
        let start = pb::first_message(
            &mut inbound,
            "a file write",
            |m: pb::WriteFileInput| match m.input {
                Some(pb::write_file_input::Input::Start(s)) => Some(s),
                _ => None,
            },
        )
        .await?;
        io::check_path(&start.path).map_err(status_of)?;
        if start.mode > 0o7777 {
            return Err(Status::invalid_argument(format!(
                "mode {:o} is not a permission mode (at most 7777 octal)",
                start.mode
            )));
        }
        let (runtime, _, id) = self.target(start.sandbox.as_ref()).await?;
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        pump_in(inbound, tx, |m: pb::WriteFileInput| match m.input {
            Some(pb::write_file_input::Input::Data(b)) => Some(b),
            _ => None,
        });
        let spec = WriteSpec {
            path: start.path,
            mode: if start.mode == 0 { 0o644 } else { start.mode },
            make_parents: start.make_parents,
        };
        let bytes = runtime.write_file(id, spec, rx).await.map_err(status_of)?;
        Ok(Response::new(pb::WriteFileReply { bytes }))
    }

    async fn list_dir(
        &self,
        req: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirReply>, Status> {
        self.check_peer(&req)?;
        let req = req.into_inner();
        io::check_path(&req.path).map_err(status_of)?;
        let (runtime, _, id) = self.target(req.sandbox.as_ref()).await?;
        let listing = runtime.list_dir(id, req.path).await.map_err(status_of)?;
        Ok(Response::new(pb::ListDirReply {
            entries: listing
                .entries
                .into_iter()
                .map(|e| pb::DirEntry {
                    name: e.name,
                    kind: entry_kind(e.kind).into(),
                    size: e.size,
                    mode: e.mode,
                    modified_ms: e.modified_ms,
                    uid: e.uid,
                    gid: e.gid,
                })
                .collect(),
            truncated: listing.truncated,
        }))
    }

    type DownloadStream = Out<pb::Chunk>;

    async fn download(
        &self,
        req: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        self.check_peer(&req)?;
        let req = req.into_inner();
        io::check_path(&req.path).map_err(status_of)?;
        let (runtime, _, id) = self.target(req.sandbox.as_ref()).await?;
        let path = req.path;
        Ok(Response::new(
            stream_out(move |tx| async move { runtime.download(id, path, tx).await }).await?,
        ))
    }

    async fn upload(
        &self,
        req: Request<Streaming<pb::UploadInput>>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        self.check_peer(&req)?;
        let mut inbound = req.into_inner();
        let start = pb::first_message(&mut inbound, "an upload", |m: pb::UploadInput| {
            match m.input {
                Some(pb::upload_input::Input::Start(s)) => Some(s),
                _ => None,
            }
        })
        .await?;
        io::check_path(&start.path).map_err(status_of)?;
        let (runtime, _, id) = self.target(start.sandbox.as_ref()).await?;
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        pump_in(inbound, tx, |m: pb::UploadInput| match m.input {
            Some(pb::upload_input::Input::Data(b)) => Some(b),
            _ => None,
        });
        let stats = runtime
            .upload(id, start.path, rx)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::UploadReply {
            files: stats.files,
            bytes: stats.bytes,
        }))
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        self.check_peer(&req)?;
        let req = req.into_inner();
        crate::template::validate_name(&req.template)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let node_id = req
            .sandbox
            .as_ref()
            .map(|s| s.node_id.clone())
            .unwrap_or_default();
        let (runtime, _, id) = self.target(req.sandbox.as_ref()).await?;
        let templates = self
            .nodes
            .get(&node_id)
            .and_then(|h| h.templates.clone())
            .ok_or_else(|| {
                Status::unimplemented(format!(
                    "a snapshot into a template is not supported by this runtime ({}) on node {node_id}: only container sandboxes have a root filesystem on the host to copy",
                    runtime.name()
                ))
            })?;
        let stats = runtime
            .snapshot(id, templates, req.template.clone())
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::SnapshotReply {
            node_id,
            template: req.template,
            bytes: stats.size.bytes,
            entries: stats.size.entries,
            frozen_ms: u64::try_from(stats.frozen.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn copy_template(
        &self,
        _req: Request<pb::CopyTemplateRequest>,
    ) -> Result<Response<pb::CopyTemplateReply>, Status> {
        Err(Status::unimplemented(
            "a node daemon does not plan template copies; ask a scheduler replica (surge template copy)",
        ))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serve the I/O service of `nodes` on `listener` until `stop`.
pub async fn serve<R: Runtime + SandboxIo>(
    listener: tokio::net::TcpListener,
    service: IoService<R>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(service.clone().into_transfer_server())
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await
}
