//! `surge.sandbox.TemplateTransfer` on the node daemon: templates from node to node.
//!
//! ```text
//! surge template copy ──> replica (CopyTemplate: picks source and targets from its state)
//!     replica ──Pull(name, source address)──> target node
//!         target node ──Export(name)──> source node: tar pieces …, then SHA-256 + length
//!         target: unpack into staging as bytes come; digest and length match -> rename in place
//! ```
//!
//! No replica carries template bytes, and a copy's bytes are written once on the target (see
//! `template::transfer`). `Export` may be called by replicas and by other node daemons (a node
//! certificate), `Pull` by replicas only. Both are bounded: [`PULLS_MAX`] and [`EXPORTS_MAX`]
//! at once per process (more is refused as busy, the replica reports it), a connect timeout,
//! and [`PULL_TIMEOUT`] for a whole copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use surge_proto::sandbox as pb;
use surge_proto::sandbox::template_transfer_client::TemplateTransferClient;
use surge_proto::sandbox::template_transfer_server::{TemplateTransfer, TemplateTransferServer};
use surge_security::Role;
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use super::io_server::IoService;
use crate::runtime::io::SandboxIo;
use crate::runtime::Runtime;
use crate::template::transfer::{self, Piece};
use crate::template::{validate_name, TemplateError, Templates};

/// Copies one process receives at once: each writes at the disk's speed, so two already
/// share it; more would only slow all of them.
pub const PULLS_MAX: usize = 2;
/// Copies one process sends at once (a fan-out to many targets reads the same files, mostly
/// from the page cache).
pub const EXPORTS_MAX: usize = 8;
/// Longest a whole copy may take: 8 GiB (the template cap) at ~10 MB/s.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(900);
/// Connecting to the source node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pieces (of up to 1 MiB) buffered between the network and the disk.
const PIECES_IN_FLIGHT: usize = 4;

/// The bounds on copies in and out of this process.
pub struct Transfers {
    pulls: Arc<Semaphore>,
    exports: Arc<Semaphore>,
}

impl Default for Transfers {
    fn default() -> Self {
        Self {
            pulls: Arc::new(Semaphore::new(PULLS_MAX)),
            exports: Arc::new(Semaphore::new(EXPORTS_MAX)),
        }
    }
}

fn template_status(e: TemplateError) -> Status {
    let msg = e.to_string();
    match e {
        TemplateError::InvalidName { .. } => Status::invalid_argument(msg),
        TemplateError::Exists { .. } => Status::already_exists(msg),
        TemplateError::NotFound { .. } => Status::not_found(msg),
        TemplateError::TooLarge { .. } | TemplateError::TooMany { .. } => {
            Status::resource_exhausted(msg)
        }
        TemplateError::Damaged { .. } => Status::data_loss(msg),
        TemplateError::Escapes { .. } | TemplateError::NotARootfs { .. } => {
            Status::failed_precondition(msg)
        }
        _ => Status::internal(msg),
    }
}

/// A piece as it came over the wire.
fn piece_of(p: pb::TemplatePiece) -> Result<Piece, TemplateError> {
    match p.piece {
        Some(pb::template_piece::Piece::Data(d)) => Ok(Piece::Data(d)),
        Some(pb::template_piece::Piece::Digest(d)) => {
            let sha256: [u8; 32] =
                d.sha256
                    .as_ref()
                    .try_into()
                    .map_err(|_| TemplateError::Damaged {
                        name: String::new(),
                        why: format!("a digest of {} bytes, not 32", d.sha256.len()),
                    })?;
            Ok(Piece::Digest {
                sha256,
                bytes: d.bytes,
            })
        }
        None => Ok(Piece::Data(bytes::Bytes::new())),
    }
}

impl<R: Runtime + SandboxIo> IoService<R> {
    pub fn into_transfer_server(self) -> TemplateTransferServer<Self> {
        TemplateTransferServer::new(self)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
    }

    fn templates_of(&self, node_id: &str) -> Result<Templates, Status> {
        let hosted = self
            .nodes
            .get(node_id)
            .ok_or_else(|| Status::not_found(format!("node {node_id:?} is not served here")))?;
        hosted.templates.clone().ok_or_else(|| {
            Status::unimplemented(format!("node {node_id} keeps no templates on disk"))
        })
    }

    fn source(
        &self,
        address: &str,
    ) -> Result<TemplateTransferClient<tonic::transport::Channel>, Status> {
        let uri = surge_security::tls::uri_for(address, self.client_tls.is_some());
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| Status::invalid_argument(format!("source address {address:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            // Large windows: a copy is one long stream, and the defaults cap it well below a
            // disk's speed on a path with any latency.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20));
        if let Some(tls) = &self.client_tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::internal(format!("source node {address}: TLS: {e}")))?;
        }
        Ok(TemplateTransferClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX))
    }
}

type Out<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<R: Runtime + SandboxIo> TemplateTransfer for IoService<R> {
    type ExportStream = Out<pb::TemplatePiece>;

    async fn export(
        &self,
        req: Request<pb::ExportTemplateRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        self.check_peer_is(&req, &[Role::Replica, Role::Node])?;
        let req = req.into_inner();
        validate_name(&req.template).map_err(template_status)?;
        let templates = self.templates_of(&req.node_id)?;
        templates.path(&req.template).map_err(template_status)?;
        let permit = self
            .transfers
            .exports
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "node {} already sends {EXPORTS_MAX} templates; try again when one ends",
                    req.node_id
                ))
            })?;
        let (tx, rx) = mpsc::channel::<Result<pb::TemplatePiece, Status>>(PIECES_IN_FLIGHT);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let data = |d| {
                tx.blocking_send(Ok(pb::TemplatePiece {
                    piece: Some(pb::template_piece::Piece::Data(d)),
                }))
                .is_ok()
            };
            let last = match transfer::export(&templates, &req.template, data) {
                Ok(Piece::Digest { sha256, bytes }) => Ok(pb::TemplatePiece {
                    piece: Some(pb::template_piece::Piece::Digest(pb::TemplateDigest {
                        sha256: bytes::Bytes::copy_from_slice(&sha256),
                        bytes,
                    })),
                }),
                Ok(Piece::Data(_)) => Err(Status::internal("export ended without a digest")),
                Err(e) => Err(template_status(e)),
            };
            let _ = tx.blocking_send(last);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn pull(
        &self,
        req: Request<pb::PullTemplateRequest>,
    ) -> Result<Response<pb::PullTemplateReply>, Status> {
        self.check_peer_is(&req, &[Role::Replica])?;
        let req = req.into_inner();
        validate_name(&req.template).map_err(template_status)?;
        let templates = self.templates_of(&req.node_id)?;
        if req.source_address.is_empty() || req.source_node_id.is_empty() {
            return Err(Status::invalid_argument(
                "source_node_id and source_address are required",
            ));
        }
        if templates.path(&req.template).is_ok() {
            return Err(Status::already_exists(format!(
                "node {} already holds template {}",
                req.node_id, req.template
            )));
        }
        let _permit = self
            .transfers
            .pulls
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "node {} already receives {PULLS_MAX} templates; try again when one ends",
                    req.node_id
                ))
            })?;
        let started = Instant::now();
        let mut source = self.source(&req.source_address)?;
        let name = req.template.clone();
        let (tx, mut rx) = mpsc::channel::<Result<Piece, TemplateError>>(PIECES_IN_FLIGHT);
        let receiving = tokio::task::spawn_blocking(move || {
            transfer::receive(
                &templates,
                &name,
                std::iter::from_fn(move || rx.blocking_recv()),
            )
        });
        let from = format!("node {} ({})", req.source_node_id, req.source_address);
        let forward = async move {
            let mut stream = source
                .export(pb::ExportTemplateRequest {
                    node_id: req.source_node_id.clone(),
                    template: req.template.clone(),
                })
                .await
                .map_err(|s| Status::unavailable(format!("{from}: {}", s.message())))?
                .into_inner();
            loop {
                let next = match stream.message().await {
                    Ok(Some(p)) => piece_of(p),
                    Ok(None) => break,
                    Err(s) => Err(TemplateError::Damaged {
                        name: req.template.clone(),
                        why: format!("{from} failed midway: {}", s.message()),
                    }),
                };
                let failed = next.is_err();
                if tx.send(next).await.is_err() || failed {
                    break;
                }
            }
            Ok::<(), Status>(())
        };
        // Dropping the forwarder (timeout, or the source refused) closes the channel: the
        // receiving thread sees a stream without its digest and removes what it staged.
        let forwarded = tokio::time::timeout(PULL_TIMEOUT, forward).await;
        let received = receiving
            .await
            .map_err(|e| Status::internal(format!("the receiving task failed: {e}")))?;
        match forwarded {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "the copy took longer than {} s; nothing was imported",
                    PULL_TIMEOUT.as_secs()
                )))
            }
            Ok(Err(s)) => return Err(s),
            Ok(Ok(())) => {}
        }
        let got = received.map_err(template_status)?;
        Ok(Response::new(pb::PullTemplateReply {
            bytes: got.bytes,
            sha256: bytes::Bytes::copy_from_slice(&got.sha256),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }
}
