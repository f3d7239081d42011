//! Channels to one replica, with the credentials a secured cluster asks for: a `--tls-dir`
//! (mutual TLS) and a bearer token. Credentials are always passed in; nothing is global.

use std::time::Duration;

use surge_proto::cluster::cluster_client::ClusterClient;
use surge_proto::jobs::jobs_client::JobsClient;
use surge_proto::node::node_api_client::NodeApiClient;
use surge_proto::sandbox::sandbox_io_client::SandboxIoClient;
use surge_security::TlsDir;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Time to connect to a replica.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest any one client call waits (a write waits for a commit, forwarding included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad server address {0:?}: expected HOST:PORT")]
    BadAddress(String),
    #[error("the token is not usable in a header (printable ASCII only)")]
    BadToken,
    #[error("TLS settings for {addr}: {reason}")]
    Tls { addr: String, reason: String },
}

/// What a client presents to a replica. The default is nothing: an open cluster.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// Client certificate and cluster CA (`--tls-dir`).
    pub tls: Option<TlsDir>,
    /// Tenant or admin token (`--token`), sent as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel to a replica with the caller's token on every call.
pub type Conn = InterceptedService<Channel, Bearer>;

/// A lazily connected channel to `addr`, over mutual TLS when `creds` has a TLS dir.
pub fn channel(addr: &str, creds: &Credentials) -> Result<Channel, ConnectError> {
    Ok(endpoint(addr, creds)?
        .timeout(REQUEST_TIMEOUT)
        .connect_lazy())
}

/// A channel for exec and files: no per-call timeout (an exec runs as long as its own timeout
/// says; an upload as long as its bytes take), keepalive pings instead to notice a dead peer.
pub fn io_channel(addr: &str, creds: &Credentials) -> Result<Channel, ConnectError> {
    Ok(endpoint(addr, creds)?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect_lazy())
}

fn endpoint(addr: &str, creds: &Credentials) -> Result<Endpoint, ConnectError> {
    let uri = surge_security::tls::uri_for(addr, creds.tls.is_some());
    let mut endpoint =
        Endpoint::from_shared(uri).map_err(|_| ConnectError::BadAddress(addr.to_string()))?;
    if let Some(tls) = &creds.tls {
        endpoint = endpoint
            .tls_config(tls.client_config())
            .map_err(|e| ConnectError::Tls {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
    }
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
}

/// A channel to `addr` that adds the caller's token to every call.
pub fn conn(addr: &str, creds: &Credentials) -> Result<Conn, ConnectError> {
    Ok(InterceptedService::new(
        channel(addr, creds)?,
        bearer(creds)?,
    ))
}

/// The exec and files API of the replica at `addr` (see [`io_channel`]).
pub fn sandbox_io(addr: &str, creds: &Credentials) -> Result<SandboxIoClient<Conn>, ConnectError> {
    Ok(SandboxIoClient::new(InterceptedService::new(
        io_channel(addr, creds)?,
        bearer(creds)?,
    ))
    .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX)
    .max_encoding_message_size(surge_proto::MESSAGE_BYTES_MAX))
}

fn bearer(creds: &Credentials) -> Result<Bearer, ConnectError> {
    let bearer = match &creds.token {
        None => Bearer(None),
        Some(t) => Bearer(Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| ConnectError::BadToken)?,
        )),
    };
    Ok(bearer)
}

/// The cluster API (status, membership) of the replica at `addr`.
pub fn cluster(addr: &str, creds: &Credentials) -> Result<ClusterClient<Conn>, ConnectError> {
    Ok(ClusterClient::new(conn(addr, creds)?)
        .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX))
}

/// The job API of the replica at `addr`.
pub fn jobs(addr: &str, creds: &Credentials) -> Result<JobsClient<Conn>, ConnectError> {
    Ok(JobsClient::new(conn(addr, creds)?)
        .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX))
}

/// The node API (list, drain) of the replica at `addr`.
pub fn nodes(addr: &str, creds: &Credentials) -> Result<NodeApiClient<Conn>, ConnectError> {
    Ok(NodeApiClient::new(conn(addr, creds)?)
        .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX))
}

/// Calls to an open cluster (no TLS, no token): what tests, benches and `surge dev` use against
/// the clusters they start themselves. A secured cluster needs [`crate::Client`] or the functions
/// above with [`Credentials`].
pub mod open {
    use super::*;

    const NONE: &Credentials = &Credentials {
        tls: None,
        token: None,
    };

    pub fn cluster(addr: &str) -> Result<ClusterClient<Conn>, ConnectError> {
        super::cluster(addr, NONE)
    }

    pub fn jobs(addr: &str) -> Result<JobsClient<Conn>, ConnectError> {
        super::jobs(addr, NONE)
    }

    pub fn nodes(addr: &str) -> Result<NodeApiClient<Conn>, ConnectError> {
        super::nodes(addr, NONE)
    }

    pub fn sandbox_io(addr: &str) -> Result<SandboxIoClient<Conn>, ConnectError> {
        super::sandbox_io(addr, NONE)
    }
}
