//! The client side of the gRPC Raft transport and the pool of connections to peers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use surge_proto::raft::raft_transport_client::RaftTransportClient;
use surge_proto::raft::RaftRequest;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::codec;
use crate::types::{Node, NodeId, TypeConfig};

/// How many distinct peer addresses the pool keeps channels for.
pub const PEERS_MAX: usize = 1024;
/// Largest AppendEntries payload sent in one message (headroom below the gRPC limit).
pub const APPEND_BYTES_MAX: usize = surge_proto::MESSAGE_BYTES_MAX / 2;
/// Time to establish a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause before the leader tries an unreachable follower again. openraft's default is 500 ms,
/// longer than a restarted follower waits before it stands (leader lease + election timeout,
/// from 450 ms): it would stand before its first heartbeat and depose a healthy leader with
/// its higher term. A retry is one refused connect on a closed port, cheap at this rate.
pub const UNREACHABLE_RETRY: Duration = Duration::from_millis(100);

/// Lazily connected, reconnecting gRPC channels to other replicas, one per address; over mutual
/// TLS (this replica's certificate, the cluster CA) when the replica has a `--tls-dir`.
#[derive(Clone, Default)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    tls: Option<ClientTlsConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad peer address {addr:?}: {reason}")]
pub struct BadAddress {
    pub addr: String,
    pub reason: String,
}

impl Peers {
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        Peers {
            channels: Arc::default(),
            tls,
        }
    }

    pub fn channel(&self, addr: &str) -> Result<Channel, BadAddress> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let bad = |e: tonic::transport::Error| BadAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(bad)?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(bad)?;
        }
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2));
        let channel = endpoint.connect_lazy();
        if channels.len() >= PEERS_MAX {
            channels.clear();
        }
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Creates one [`PeerClient`] per replication stream.
#[derive(Clone)]
pub struct Network {
    pub cluster_id: Arc<Mutex<String>>,
    pub peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerClient {
            target,
            addr: node.addr.clone(),
            cluster_id: self.cluster_id.clone(),
            channel: self.peers.channel(&node.addr).map_err(|e| e.to_string()),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    cluster_id: Arc<Mutex<String>>,
    channel: Result<Channel, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

/// Which transport call a [`PeerClient::call`] makes.
#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl PeerClient {
    async fn call<Resp, E>(
        &self,
        rpc: Rpc,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self
            .channel
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&TransportError(e))))?;
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX);
        let request = RaftRequest {
            cluster_id: self
                .cluster_id
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            payload,
        };
        let fut = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::InstallSnapshot => client.install_snapshot(request).await,
            }
        };
        let reply = match tokio::time::timeout(timeout, fut).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&TransportError(
                    format!("{} did not answer within {timeout:?}", self.addr),
                ))))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)))
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        let result: Result<Resp, RaftError<NodeId, E>> = codec::from_bytes(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_RETRY))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let payload = codec::to_bytes(&rpc);
        // A batch larger than a gRPC message would be refused by the transport forever (the
        // follower could never catch up): ask openraft to resend it in smaller pieces instead.
        if payload.len() > APPEND_BYTES_MAX && rpc.entries.len() > 1 {
            let entries = rpc.entries.len() as u64;
            let fit =
                (entries * APPEND_BYTES_MAX as u64 / payload.len() as u64).clamp(1, entries - 1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fit),
            ));
        }
        self.call(Rpc::AppendEntries, payload, option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(
            Rpc::InstallSnapshot,
            codec::to_bytes(&rpc),
            option.hard_ttl(),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Vote, codec::to_bytes(&rpc), option.hard_ttl())
            .await
    }
}
