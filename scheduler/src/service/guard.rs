//! Who may call what: every gRPC request passes [`GuardLayer`] before it reaches a service.
//!
//! Two facts about the caller are gathered, then one pure function, [`decide`], rules:
//!
//! - the [`Peer`]: with `--tls-dir`, the role in the client certificate the TLS handshake
//!   already verified against the cluster CA (no certificate, or another CA's, never gets this
//!   far); without, a plaintext peer nobody can vouch for;
//! - the [`Bearer`]: with `--tokens`, what the `authorization: Bearer` token grants.
//!
//! | calls                                      | certificate role   | token (with `--tokens`) |
//! |--------------------------------------------|--------------------|-------------------------|
//! | Raft transport, `Cluster.Propose/ReadIndex` | replica            | -                       |
//! | node daemon calls (register, heartbeat...) | node, replica      | -                       |
//! | `Cluster.Status/Ping`                       | any                | -                       |
//! | job API, `ListNodes`, exec and files       | client             | tenant or admin         |
//! | membership, `DrainNode`, `SetQuota`         | client (or replica) | admin                  |
//!
//! A replica certificate counts as admin for membership because a joining replica adds itself.
//! Calls with no rule are refused: a service added later is closed until someone writes its
//! line here. The decision travels to the services as a [`Caller`] in the request extensions,
//! which the job API uses to keep a tenant to its own jobs.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{ready, Either, Ready};
use surge_security::role::{role_of, RoleError};
use surge_security::{tokens, Access, Role, Tokens};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

/// On whose behalf a request runs, as the services see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Unrestricted: an open server (no tokens), the admin token, or a replica.
    Admin,
    /// The job API for this tenant's jobs only.
    Tenant(String),
}

impl Caller {
    /// The tenant the caller is confined to, if any.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Tenant(t) => Some(t),
        }
    }

    /// Whether the caller may see a job of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant().is_none_or(|t| t == tenant)
    }

    /// The caller a service gets from the request [`GuardLayer`] checked.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
        req.extensions().get::<Caller>().cloned().ok_or_else(|| {
            Status::internal("no access decision on the request; the guard layer is missing")
        })
    }
}

/// What a method requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Another replica only.
    Replica,
    /// A node daemon (or a replica forwarding for one).
    NodeDaemon,
    /// Any authenticated peer; read-only cluster health.
    AnyPeer,
    /// A client with a tenant or admin token.
    Jobs,
    /// A client with the admin token (or a replica).
    Admin,
    /// Nobody: no rule names this method.
    Unknown,
}

/// The access rule of a gRPC method path (`/package.Service/Method`).
pub fn need_of(path: &str) -> Need {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Need::Unknown;
    };
    match (service, method) {
        ("surge.raft.RaftTransport", _) => Need::Replica,
        ("surge.cluster.Cluster", "Propose" | "ReadIndex") => Need::Replica,
        ("surge.cluster.Cluster", "Status" | "Ping") => Need::AnyPeer,
        ("surge.cluster.Cluster", "AddMember" | "RemoveMember") => Need::Admin,
        (
            "surge.node.NodeApi",
            "RegisterNode" | "Heartbeat" | "HeartbeatBatch" | "WatchAssignments" | "ReportStatus",
        ) => Need::NodeDaemon,
        ("surge.node.NodeApi", "ListNodes") => Need::Jobs,
        ("surge.node.NodeApi", "DrainNode") => Need::Admin,
        ("surge.jobs.Jobs", "SetQuota") => Need::Admin,
        ("surge.jobs.Jobs", _) => Need::Jobs,
        ("surge.sandbox.SandboxIo", "CopyTemplate") => Need::Admin,
        ("surge.sandbox.SandboxIo", _) => Need::Jobs,
        _ => Need::Unknown,
    }
}

/// The transport-level identity of a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The server runs without TLS.
    Plain,
    /// A verified certificate with this role.
    Cert(Role),
    /// A verified certificate that names no usable role.
    BadCert(String),
}

/// The token side of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bearer {
    /// The server has no tokens file: tokens are not checked.
    NotChecked,
    /// No `authorization` header.
    Missing,
    /// A header that is not a known token.
    Invalid,
    Valid(Access),
}

/// The rule (pure): may this peer with this bearer call a method that needs `need`?
pub fn decide(need: Need, peer: &Peer, bearer: &Bearer) -> Result<Caller, Status> {
    let role = match peer {
        Peer::Plain => None,
        Peer::Cert(r) => Some(*r),
        Peer::BadCert(why) => return Err(Status::permission_denied(why.clone())),
    };
    let refused = |what: &str| {
        Status::permission_denied(format!(
            "a {} certificate may not call {what}",
            role.map_or("plaintext", Role::as_str)
        ))
    };
    let token = |admin_only: bool| {
        match bearer {
        Bearer::NotChecked => Ok(Caller::Admin),
        Bearer::Missing => Err(Status::unauthenticated(
            "this cluster requires a token: pass --token or set SURGE_TOKEN (header authorization: Bearer TOKEN)",
        )),
        Bearer::Invalid => Err(Status::unauthenticated("the token is not valid here")),
        Bearer::Valid(Access::Admin) => Ok(Caller::Admin),
        Bearer::Valid(Access::Tenant(t)) if admin_only => Err(Status::permission_denied(
            format!("tenant {t}'s token cannot do this; it needs the admin token"),
        )),
        Bearer::Valid(Access::Tenant(t)) => Ok(Caller::Tenant(t.clone())),
    }
    };
    match (need, role) {
        (Need::Unknown, _) => Err(Status::permission_denied("no access rule allows this call")),
        // Without TLS the transport cannot tell a replica from anyone else (the server then
        // refuses to run with tokens, see `server::run`).
        (Need::Replica | Need::NodeDaemon | Need::AnyPeer, None) => Ok(Caller::Admin),
        (Need::Replica, Some(Role::Replica)) => Ok(Caller::Admin),
        (Need::Replica, Some(_)) => Err(refused("the replicas' internal API")),
        (Need::NodeDaemon, Some(Role::Node | Role::Replica)) => Ok(Caller::Admin),
        (Need::NodeDaemon, Some(_)) => Err(refused("the node daemon API")),
        (Need::AnyPeer, Some(_)) => Ok(Caller::Admin),
        (Need::Admin, Some(Role::Replica)) => Ok(Caller::Admin),
        (Need::Admin, None | Some(Role::Client)) => token(true),
        (Need::Admin, Some(Role::Node)) => Err(refused("membership, drain or quotas")),
        (Need::Jobs, None | Some(Role::Client)) => token(false),
        (Need::Jobs, Some(_)) => Err(refused("the job API")),
    }
}

/// The server's credentials policy: TLS on or off, and the tokens file if any.
#[derive(Debug, Default)]
pub struct Guard {
    pub tls: bool,
    pub tokens: Option<Tokens>,
}

impl Guard {
    /// The bearer of a request's headers.
    pub fn bearer(&self, headers: &http::HeaderMap) -> Bearer {
        let Some(tokens) = &self.tokens else {
            return Bearer::NotChecked;
        };
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Bearer::Missing;
        };
        match value.to_str().ok().and_then(tokens::bearer) {
            None => Bearer::Invalid,
            Some(t) => tokens.resolve(t).map_or(Bearer::Invalid, Bearer::Valid),
        }
    }

    /// The peer of a request, from the TLS connection info tonic puts in its extensions.
    pub fn peer(&self, extensions: &http::Extensions) -> Peer {
        if !self.tls {
            return Peer::Plain;
        }
        let leaf = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        match leaf {
            None => Peer::BadCert("no client certificate".into()),
            Some(der) => match role_of(&der) {
                Ok(role) => Peer::Cert(role),
                Err(e @ (RoleError::Missing | RoleError::Ambiguous | RoleError::Unknown(_))) => {
                    Peer::BadCert(e.to_string())
                }
                Err(e) => Peer::BadCert(e.to_string()),
            },
        }
    }

    /// The decision for a job-API request over HTTP (which has no client certificate).
    pub fn http_caller(&self, headers: &http::HeaderMap, admin: bool) -> Result<Caller, Status> {
        let need = if admin { Need::Admin } else { Need::Jobs };
        decide(need, &Peer::Plain, &self.bearer(headers))
    }
}

/// Checks every request against [`Guard`] and puts the [`Caller`] in its extensions.
#[derive(Clone)]
pub struct GuardLayer {
    guard: Arc<Guard>,
}

impl GuardLayer {
    pub fn new(guard: Arc<Guard>) -> Self {
        GuardLayer { guard }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GuardService {
            inner,
            guard: self.guard.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GuardService<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GuardService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let need = need_of(req.uri().path());
        let peer = self.guard.peer(req.extensions());
        let bearer = match need {
            Need::Jobs | Need::Admin => self.guard.bearer(req.headers()),
            _ => Bearer::NotChecked,
        };
        match decide(need, &peer, &bearer) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Either::Right(self.inner.call(req))
            }
            Err(status) => {
                tracing::debug!(path = req.uri().path(), ?peer, code = ?status.code(), "refused");
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn code(r: Result<Caller, Status>) -> Result<Caller, Code> {
        r.map_err(|s| s.code())
    }

    #[test]
    fn every_method_of_every_service_has_a_rule() {
        let paths = [
            ("/surge.raft.RaftTransport/AppendEntries", Need::Replica),
            ("/surge.cluster.Cluster/Propose", Need::Replica),
            ("/surge.cluster.Cluster/ReadIndex", Need::Replica),
            ("/surge.cluster.Cluster/Status", Need::AnyPeer),
            ("/surge.cluster.Cluster/AddMember", Need::Admin),
            ("/surge.node.NodeApi/Heartbeat", Need::NodeDaemon),
            ("/surge.node.NodeApi/HeartbeatBatch", Need::NodeDaemon),
            ("/surge.node.NodeApi/WatchAssignments", Need::NodeDaemon),
            ("/surge.node.NodeApi/ListNodes", Need::Jobs),
            ("/surge.node.NodeApi/DrainNode", Need::Admin),
            ("/surge.jobs.Jobs/SubmitJob", Need::Jobs),
            ("/surge.jobs.Jobs/SetQuota", Need::Admin),
            ("/surge.cluster.Cluster/Shiny", Need::Unknown),
            ("/grpc.health.v1.Health/Check", Need::Unknown),
            ("nonsense", Need::Unknown),
        ];
        for (p, need) in paths {
            assert_eq!(need_of(p), need, "{p}");
        }
    }

    /// A method added to a .proto without a line in [`need_of`] is refused to everyone; this
    /// test says so at once instead of when a client first calls it.
    #[test]
    fn every_rpc_of_the_protos_has_a_rule() {
        let protos = [
            (
                "surge.raft",
                include_str!("../../../proto/proto/raft.proto"),
            ),
            (
                "surge.cluster",
                include_str!("../../../proto/proto/cluster.proto"),
            ),
            (
                "surge.jobs",
                include_str!("../../../proto/proto/jobs.proto"),
            ),
            (
                "surge.node",
                include_str!("../../../proto/proto/node.proto"),
            ),
        ];
        let mut seen = 0;
        for (package, text) in protos {
            let mut service = "";
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next().unwrap_or_default();
                } else if let Some(rest) = line.strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap_or_default().trim();
                    let path = format!("/{package}.{service}/{method}");
                    assert_ne!(need_of(&path), Need::Unknown, "{path} has no access rule");
                    seen += 1;
                }
            }
        }
        assert!(seen >= 20, "only {seen} rpcs found in the protos");
    }

    #[test]
    fn certificate_roles_gate_the_internal_apis() {
        let none = Bearer::NotChecked;
        let replica = Peer::Cert(Role::Replica);
        let node = Peer::Cert(Role::Node);
        let client = Peer::Cert(Role::Client);
        assert_eq!(
            code(decide(Need::Replica, &replica, &none)),
            Ok(Caller::Admin)
        );
        assert_eq!(
            code(decide(Need::Replica, &client, &none)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(decide(Need::Replica, &node, &none)),
            Err(Code::PermissionDenied)
        );
        assert!(decide(Need::NodeDaemon, &node, &none).is_ok());
        assert!(decide(Need::NodeDaemon, &replica, &none).is_ok());
        assert_eq!(
            code(decide(Need::NodeDaemon, &client, &none)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(decide(Need::Jobs, &node, &none)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(decide(Need::Admin, &node, &none)),
            Err(Code::PermissionDenied)
        );
        assert!(decide(Need::Admin, &replica, &Bearer::Missing).is_ok());
        let bad = Peer::BadCert("no role".into());
        assert_eq!(
            code(decide(Need::AnyPeer, &bad, &none)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(decide(Need::Unknown, &replica, &none)),
            Err(Code::PermissionDenied)
        );
    }

    #[test]
    fn tokens_gate_the_job_api_and_admin_calls() {
        let client = Peer::Cert(Role::Client);
        let eval = Bearer::Valid(Access::Tenant("eval".into()));
        let admin = Bearer::Valid(Access::Admin);
        assert_eq!(
            code(decide(Need::Jobs, &client, &Bearer::Missing)),
            Err(Code::Unauthenticated)
        );
        assert_eq!(
            code(decide(Need::Jobs, &client, &Bearer::Invalid)),
            Err(Code::Unauthenticated)
        );
        assert_eq!(
            code(decide(Need::Jobs, &client, &eval)),
            Ok(Caller::Tenant("eval".into()))
        );
        assert_eq!(code(decide(Need::Jobs, &client, &admin)), Ok(Caller::Admin));
        assert_eq!(
            code(decide(Need::Admin, &client, &eval)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(decide(Need::Admin, &client, &Bearer::Missing)),
            Err(Code::Unauthenticated)
        );
        assert_eq!(
            code(decide(Need::Admin, &client, &admin)),
            Ok(Caller::Admin)
        );
        // An open server (no tokens file) lets clients do everything, as before.
        assert_eq!(
            code(decide(Need::Admin, &Peer::Plain, &Bearer::NotChecked)),
            Ok(Caller::Admin)
        );
    }

    #[test]
    fn a_tenant_sees_only_its_own() {
        let t = Caller::Tenant("a".into());
        assert!(t.sees("a"));
        assert!(!t.sees("b"));
        assert!(Caller::Admin.sees("b"));
    }
}
