//! Thin gRPC client helpers for talking to replicas.

use std::time::Duration;

use surge_proto::cluster::cluster_client::ClusterClient;
use surge_proto::jobs::jobs_client::JobsClient;
use surge_proto::node::node_api_client::NodeApiClient;
use tonic::transport::{Channel, Endpoint};

/// Time to connect to a replica.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest any one client call waits (a write waits for a commit, forwarding included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad server address {0:?}: expected HOST:PORT")]
    BadAddress(String),
}

/// A lazily connected channel to the replica at `addr` (`host:port`).
pub fn channel(addr: &str) -> Result<Channel, ConnectError> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|_| ConnectError::BadAddress(addr.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

pub fn cluster(addr: &str) -> Result<ClusterClient<Channel>, ConnectError> {
    Ok(
        ClusterClient::new(channel(addr)?)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX),
    )
}

pub fn jobs(addr: &str) -> Result<JobsClient<Channel>, ConnectError> {
    Ok(JobsClient::new(channel(addr)?).max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX))
}

pub fn nodes(addr: &str) -> Result<NodeApiClient<Channel>, ConnectError> {
    Ok(
        NodeApiClient::new(channel(addr)?)
            .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX),
    )
}
