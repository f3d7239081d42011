//! The replica's HTTP port over mutual TLS (`surge server --tls-dir`).
//!
//! The same router as plain HTTP ([`crate::http::router`]), served connection by connection:
//!
//! ```text
//!   accept ─► slot (HTTPS_CONNECTIONS_MAX) ─► TLS handshake (HANDSHAKE_TIMEOUT, client cert
//!   from the cluster CA required) ─► peer role from the certificate ─► HTTP/1.1 ─► router
//! ```
//!
//! rustls refuses a client without a certificate, or with one of another CA, during the
//! handshake, before any request is read. The role in the verified certificate travels to the
//! handlers as a [`Peer`] request extension, so the JSON job API applies the same rule as the
//! gRPC job API (a node certificate may not submit jobs).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use surge_security::role::role_of;
use surge_security::tls::HANDSHAKE_TIMEOUT;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::service::guard::Peer;

/// Most HTTPS connections open at once (handshaking or serving); the next one waits in the
/// listen backlog.
pub const HTTPS_CONNECTIONS_MAX: usize = 1024;
/// Longest a client may take to send a request's headers once connected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (out of file descriptors, say) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The peer a verified certificate chain names (pure): its leaf's role.
pub fn peer_of(chain: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Peer {
    match chain.and_then(|c| c.first()) {
        None => Peer::BadCert("no client certificate".into()),
        Some(leaf) => match role_of(leaf.as_ref()) {
            Ok(role) => Peer::Cert(role),
            Err(e) => Peer::BadCert(e.to_string()),
        },
    }
}

/// Serve `app` over TLS on `listener` until `stop` resolves; then open connections finish the
/// request they are on (the caller bounds how long that may take by dropping this future).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    stop: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(HTTPS_CONNECTIONS_MAX));
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            tcp,
            remote,
            acceptor.clone(),
            app.clone(),
            drain_rx.clone(),
            slot,
        ));
    }
    let _ = drain_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// One connection: the handshake (bounded), then HTTP/1.1 until the client closes or the
/// server drains.
async fn connection(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    mut drain: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "HTTPS handshake refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, timeout = ?HANDSHAKE_TIMEOUT, "HTTPS handshake timed out");
            return;
        }
    };
    let peer = peer_of(stream.get_ref().1.peer_certificates());
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        app.clone().oneshot(req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let served = tokio::select! {
        r = conn.as_mut() => r,
        () = async { drop(drain.wait_for(|d| *d).await) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(%remote, error = %e, "HTTPS connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use surge_security::{certs, Role};

    #[test]
    fn the_leaf_certificate_names_the_peer() {
        let ca = certs::new_ca("t").expect("ca");
        let leaf = certs::issue(&ca, "c", Role::Client, &["127.0.0.1".into()], 30).expect("leaf");
        let der = certs::first_cert_der(&leaf.cert_pem).expect("der");
        let ca_der = certs::first_cert_der(&ca.cert_pem).expect("der");
        let chain = [
            rustls::pki_types::CertificateDer::from(der),
            rustls::pki_types::CertificateDer::from(ca_der.clone()),
        ];
        assert_eq!(peer_of(Some(&chain)), Peer::Cert(Role::Client));
        assert!(matches!(peer_of(None), Peer::BadCert(_)));
        assert!(matches!(peer_of(Some(&[])), Peer::BadCert(_)));
        // The CA's own certificate names no role.
        let ca_only = [rustls::pki_types::CertificateDer::from(ca_der)];
        assert!(matches!(peer_of(Some(&ca_only)), Peer::BadCert(_)));
    }
}
