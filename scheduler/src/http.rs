//! The replica's HTTP port: Prometheus `/metrics`, `/healthz`, and the job API as JSON
//! (`/v1/jobs`), so an RL script can submit with `curl` or Python `requests` without gRPC stubs.
//!
//! Plain HTTP without `--tls-dir` (`surge dev`); with it, [`crate::https`] serves this router
//! over mutual TLS and tags each request with the [`Peer`] its client certificate names.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Deserialize;
use surge_proto::jobs as pb;

use crate::api_json::{JobJson, SubmitJson};
use crate::service::guard::{decide, Caller, Guard, Need, Peer};
use crate::service::jobs::JobsService;
use crate::service::Replica;

/// Largest JSON request body.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

#[derive(Clone)]
pub struct HttpState {
    pub replica: Replica,
    pub registry: Arc<Registry>,
    pub jobs: Arc<JobsService>,
    /// The same tokens as the gRPC job API: `authorization: Bearer TOKEN`.
    pub guard: Arc<Guard>,
}

impl HttpState {
    /// The job API's access decision: the connection's certificate role (with TLS; a request
    /// that reached here without one is refused, never taken for plaintext) and the token.
    fn caller(
        &self,
        headers: &HeaderMap,
        peer: Option<Extension<Peer>>,
    ) -> Result<Caller, Box<Response>> {
        let peer = request_peer(self.guard.tls, peer.map(|Extension(p)| p));
        decide(Need::Jobs, &peer, &self.guard.bearer(headers)).map_err(|s| Box::new(error(s)))
    }
}

/// The peer of a request (pure): plaintext without TLS; with TLS the one [`crate::https`] put
/// on the request, and a request that has none is refused rather than taken for plaintext.
fn request_peer(tls: bool, from_connection: Option<Peer>) -> Peer {
    match (tls, from_connection) {
        (false, _) => Peer::Plain,
        (true, Some(p)) => p,
        (true, None) => Peer::BadCert("no client certificate".into()),
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/v1/jobs", get(list_jobs).post(submit_job))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/watch", get(watch_job))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

/// A gRPC status as an HTTP error with a JSON body `{"error": "..."}`.
fn error(status: tonic::Status) -> Response {
    use tonic::Code;
    let code = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(serde_json::json!({"error": status.message()}))).into_response()
}

fn bad_request(msg: String) -> Response {
    error(tonic::Status::invalid_argument(msg))
}

async fn submit_job(
    State(state): State<HttpState>,
    headers: HeaderMap,
    peer: Option<Extension<Peer>>,
    body: axum::body::Bytes,
) -> Response {
    let caller = match state.caller(&headers, peer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let parsed: SubmitJson = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return bad_request(format!("request body: {e}")),
    };
    let req = match parsed.into_request() {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    match state.jobs.submit(&caller, req).await {
        Ok(r) => {
            let code = if r.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body =
                serde_json::json!({"job_id": r.job_id, "created": r.created, "index": r.index});
            (code, Json(body)).into_response()
        }
        Err(s) => error(s),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    limit: u32,
    #[serde(default)]
    before_id: u64,
}

async fn list_jobs(
    State(state): State<HttpState>,
    headers: HeaderMap,
    peer: Option<Extension<Peer>>,
    Query(q): Query<ListQuery>,
) -> Response {
    let caller = match state.caller(&headers, peer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let req = pb::ListJobsRequest {
        tenant: q.tenant,
        state: q.state,
        limit: q.limit,
        before_id: q.before_id,
    };
    match state.jobs.list(&caller, req).await {
        Ok(r) => Json(r.jobs.iter().map(JobJson::from).collect::<Vec<_>>()).into_response(),
        Err(s) => error(s),
    }
}

fn job_id(raw: &str) -> Result<u64, Box<Response>> {
    raw.parse()
        .map_err(|_| Box::new(bad_request(format!("job id {raw:?} is not a number"))))
}

async fn get_job(
    State(state): State<HttpState>,
    headers: HeaderMap,
    peer: Option<Extension<Peer>>,
    Path(id): Path<String>,
) -> Response {
    let caller = match state.caller(&headers, peer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let id = match job_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    match state.jobs.get(&caller, id).await {
        Ok(j) => Json(JobJson::from(&j)).into_response(),
        Err(s) => error(s),
    }
}

async fn cancel_job(
    State(state): State<HttpState>,
    headers: HeaderMap,
    peer: Option<Extension<Peer>>,
    Path(id): Path<String>,
) -> Response {
    let caller = match state.caller(&headers, peer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let id = match job_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    match state.jobs.cancel(&caller, id).await {
        Ok(j) => Json(JobJson::from(&j)).into_response(),
        Err(s) => error(s),
    }
}

/// Newline-delimited JSON: the job now, then every change, until it ends.
async fn watch_job(
    State(state): State<HttpState>,
    headers: HeaderMap,
    peer: Option<Extension<Peer>>,
    Path(id): Path<String>,
) -> Response {
    let caller = match state.caller(&headers, peer) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let id = match job_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let rx = match state.jobs.watch(&caller, id).await {
        Ok(rx) => rx,
        Err(s) => return error(s),
    };
    let lines = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |job| {
        let mut line = serde_json::to_vec(&JobJson::from(&job)).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string().into_bytes(),
        ),
    }
}

/// 200 while this replica knows a leader (it can serve reads and forward writes), 503 otherwise.
async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    let leader = state.replica.leader();
    let body = serde_json::json!({
        "id": state.replica.id(),
        "leader_id": leader.as_ref().map(|l| l.0),
        "applied_index": state.replica.applied_index(),
    });
    let code = if leader.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use surge_security::Role;

    #[test]
    fn a_tls_request_without_a_connection_peer_is_refused() {
        assert_eq!(request_peer(false, None), Peer::Plain);
        assert_eq!(
            request_peer(true, Some(Peer::Cert(Role::Client))),
            Peer::Cert(Role::Client)
        );
        let none = request_peer(true, None);
        assert!(matches!(none, Peer::BadCert(_)), "{none:?}");
        let refused = decide(
            Need::Jobs,
            &none,
            &crate::service::guard::Bearer::NotChecked,
        );
        assert_eq!(
            refused.map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied)
        );
        // Control: a client certificate passes (no tokens file).
        let passed = decide(
            Need::Jobs,
            &Peer::Cert(Role::Client),
            &crate::service::guard::Bearer::NotChecked,
        );
        assert_eq!(passed.ok(), Some(Caller::Admin));
    }
}
