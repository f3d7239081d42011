//! `surge server`: one scheduler replica — Raft, the gRPC APIs and the HTTP port.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use surge_raft::{RaftConfig, RaftNode, Start, StartError};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::http;
use crate::service::guard::{Guard, GuardLayer};
use crate::service::io_proxy::IoProxy;
use crate::service::jobs::JobsService;
use crate::service::nodes::NodesService;
use crate::state::ClusterState;
use surge_proto::jobs::jobs_server::JobsServer;
use surge_security::{Role, TlsDir, Tokens};

/// How long shutdown waits for open gRPC streams to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Concurrent requests one client connection may have in flight.
pub const REQUESTS_PER_CONNECTION_MAX: usize = 1024;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub raft: RaftConfig,
    /// gRPC listen address (`--listen`).
    pub listen: String,
    /// HTTP listen address for `/metrics`, `/healthz` and `/v1/jobs` (`--metrics`); HTTPS with
    /// client certificates when `tls` is set.
    pub http_listen: Option<String>,
    pub start: Start,
    /// Nodes silent this long are marked down.
    pub node_ttl_ms: u64,
    /// `--tls-dir`: mutual TLS on the gRPC and HTTP ports and to the other replicas.
    pub tls: Option<TlsDir>,
    /// `--tokens`: the job API requires a tenant or admin token.
    pub tokens: Option<Tokens>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("{0}")]
    Security(String),
}

/// Refuse credential setups that would look secure and not be.
fn check_security(config: &ServerConfig) -> Result<(), ServerError> {
    match (&config.tls, &config.tokens) {
        (None, Some(_)) => Err(ServerError::Security(
            "--tokens needs --tls-dir: without certificates a client cannot be told from a \
             replica (whose internal calls need no token), and tokens would cross the network \
             in clear"
                .into(),
        )),
        (Some(tls), _) if tls.role() != Role::Replica => Err(ServerError::Security(format!(
            "--tls-dir {}: cert.pem is a {} certificate; a replica needs one issued with \
             `surge cert issue --role replica`",
            tls.dir().display(),
            tls.role()
        ))),
        _ => Ok(()),
    }
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// Run a replica until `shutdown` resolves.
pub async fn run(
    mut config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    check_security(&config)?;
    // Bind first: a port in use is refused before the data dir is touched.
    let grpc = bind("gRPC, --listen", &config.listen).await?;
    let http_listener = match &config.http_listen {
        Some(a) => Some(bind("HTTP, --metrics", a).await?),
        None => None,
    };
    if config.raft.address.is_empty() {
        config.raft.address = grpc
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| config.listen.clone());
    }
    config.raft.tls = config.tls.as_ref().map(TlsDir::client_config);
    let https = match &config.tls {
        Some(tls) if http_listener.is_some() => Some(
            tls.https_server_config()
                .map_err(|e| ServerError::Security(e.to_string()))?,
        ),
        _ => None,
    };
    let guard = Arc::new(Guard {
        tls: config.tls.is_some(),
        tokens: config.tokens.take(),
    });
    let registry = Arc::new(prometheus::Registry::new());
    let replica = RaftNode::open(
        config.raft.clone(),
        config.start.clone(),
        ClusterState::default(),
        &registry,
    )
    .await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stepping = replica.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Before any server drains: from here on this replica never stands for election (a
        // draining replica hears no heartbeats, and would win with its current log and then
        // exit as leader), and a leader hands leadership to its most up-to-date voter.
        let leader = stepping.step_aside().await;
        tracing::info!(?leader, "stepped aside; draining");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let leader = crate::leader::Leader::start(replica.clone(), config.node_ttl_ms, &registry)
        .map_err(|e| ServerError::Start(StartError::Metrics(e)))?;
    crate::capacity_metrics::CapacityCollector::register(
        &registry,
        replica.clone(),
        leader.clone(),
    )
    .map_err(|e| ServerError::Start(StartError::Metrics(e)))?;
    let (transport, cluster) = surge_raft::service::services(replica.clone());
    let jobs = Arc::new(JobsService::new(replica.clone()));
    let io = Arc::new(IoProxy::new(
        replica.clone(),
        config.tls.as_ref().map(TlsDir::client_config),
    ));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.server_config())?;
    }
    let grpc_server = builder
        .layer(GuardLayer::new(guard.clone()))
        .layer(crate::service::decode_status::DecodeErrorLayer)
        .concurrency_limit_per_connection(REQUESTS_PER_CONNECTION_MAX)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(transport)
        .add_service(cluster)
        .add_service(
            JobsServer::from_arc(jobs.clone())
                .max_decoding_message_size(surge_proto::MESSAGE_BYTES_MAX),
        )
        .add_service(NodesService::new(replica.clone(), leader.clone()).into_server())
        .add_service(io.clone().into_server_arc())
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stopped(stop_rx.clone()));
    let grpc_task = tokio::spawn(grpc_server);

    let http_task = http_listener.map(|listener| {
        let app = http::router(http::HttpState {
            replica: replica.clone(),
            registry: registry.clone(),
            jobs: jobs.clone(),
            guard: guard.clone(),
            io: io.clone(),
            leader: leader.clone(),
        });
        let stop = stopped(stop_rx.clone());
        match https.clone() {
            // With --tls-dir the HTTP port is mutual TLS too: tokens sent to /v1/jobs never
            // cross the network in clear, and only holders of a cluster certificate get in.
            Some(tls) => tokio::spawn(async move {
                crate::https::serve(listener, tls, app, stop).await;
                Ok(())
            }),
            None => tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
                    .map_err(ServerError::Http)
            }),
        }
    });

    tracing::info!(
        id = replica.id(),
        address = replica.address(),
        cluster = replica.cluster_id(),
        tls = guard.tls,
        http = ?config.http_listen,
        https = https.is_some(),
        tokens = guard.tokens.as_ref().map_or(0, Tokens::len),
        "replica serving"
    );
    let joined = tokio::select! {
        r = replica.join_cluster() => r.map_err(ServerError::from),
        _ = stopped(stop_rx.clone()) => Ok(()),
    };
    if let Err(e) = joined {
        replica.shutdown().await;
        return Err(e);
    }

    // Graceful shutdown waits for open streams (job and assignment watches) that would never
    // end on their own: give them a moment, then stop regardless.
    let mut grpc_task = grpc_task;
    let finished = tokio::select! {
        joined = &mut grpc_task => Some(joined),
        _ = stopped(stop_rx.clone()) => {
            tokio::time::timeout(SHUTDOWN_GRACE, &mut grpc_task).await.ok()
        }
    };
    let served = match finished {
        Some(joined) => joined.unwrap_or_else(|e| panic!("gRPC server task panicked: {e}")),
        None => {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "open streams still served at shutdown; closing them");
            grpc_task.abort();
            Ok(())
        }
    };
    if let Some(mut t) = http_task {
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut t).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server"),
            Ok(_) => {}
            Err(_) => t.abort(),
        }
    }
    replica.shutdown().await;
    served.map_err(ServerError::from)
}
