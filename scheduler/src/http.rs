//! The replica's HTTP port: Prometheus `/metrics`, `/healthz`, and the job API as JSON
//! (`/v1/jobs`), so an RL script can submit with `curl` or Python `requests` without gRPC stubs.
//!
//! Plain HTTP without `--tls-dir` (`surge dev`); with it, [`crate::https`] serves this router
//! over mutual TLS and tags each request with the [`Peer`] its client certificate names.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Deserialize;
use surge_proto::jobs as pb;

use crate::api_json::{JobJson, SubmitJson};
use crate::service::error::JobApiError;
use crate::service::guard::{decide, Caller, Guard, Need, Peer};
use crate::service::jobs::JobsService;
use crate::service::Replica;

/// Largest JSON request body.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// Most bytes of a plain-text error body (axum's own rejections) carried into the JSON error.
pub const ERROR_TEXT_BYTES_MAX: usize = 4096;

#[derive(Clone)]
pub struct HttpState {
    pub replica: Replica,
    pub registry: Arc<Registry>,
    pub jobs: Arc<JobsService>,
    /// The same tokens as the gRPC job API: `authorization: Bearer TOKEN`.
    pub guard: Arc<Guard>,
    /// Exec and files ([`crate::http_io`]).
    pub io: Arc<crate::service::io_proxy::IoProxy>,
    /// The leader side of this replica: the heartbeats' used resources for the console.
    pub leader: Arc<crate::leader::Leader>,
}

/// The caller of a job-API request: the connection's certificate role (with TLS; a request
/// that reached here without one is refused, never taken for plaintext) and the bearer token,
/// decided as the gRPC job API decides. Refusal is the JSON error.
pub struct JobCaller(pub(crate) Caller);

impl FromRequestParts<HttpState> for JobCaller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, Response> {
        let peer = request_peer(state.guard.tls, parts.extensions.get::<Peer>().cloned());
        decide(Need::Jobs, &peer, &state.guard.bearer(&parts.headers))
            .map(JobCaller)
            .map_err(error)
    }
}

/// The `{id}` of a job path, a number (else a JSON 400).
pub struct JobIdParam(pub(crate) u64);

impl FromRequestParts<HttpState> for JobIdParam {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, Response> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        raw.parse()
            .map(JobIdParam)
            .map_err(|_| bad_request(format!("job id {raw:?} is not a number")))
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
        .merge(crate::http_io::routes())
        .merge(crate::http_lid::routes())
        .merge(crate::ui_api::routes())
        .merge(crate::ui::routes())
        .route("/v1/jobs/cancel", post(crate::http_life::cancel_jobs))
        .route("/v1/jobs/{id}/keepalive", post(crate::http_life::keepalive))
        .route("/v1/jobs/{id}/wait", get(crate::http_life::wait_job))
        .route(
            "/v1/jobs/{id}/sandboxes/{index}",
            get(crate::http_life::get_sandbox),
        )
        .fallback(no_route)
        // After the routes and the fallback, so it sees every answer: axum's own (405, 413,
        // query and path rejections) are plain text, and every error of this API is JSON.
        .layer(axum::middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

async fn no_route() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "no such path; the job API is /v1/jobs, the console /ui",
    )
}

fn json_error(code: StatusCode, message: &str) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

/// An error answer that is not JSON yet becomes `{"error": TEXT}`, TEXT its plain-text body
/// (axum's rejection reason) or, when it has none, the status's reason phrase.
async fn json_errors(response: Response) -> Response {
    let code = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(code.is_client_error() || code.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, ERROR_TEXT_BYTES_MAX)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        code.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let body = serde_json::json!({ "error": message }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

pub(crate) fn bad_request(msg: String) -> Response {
    JobApiError::Invalid(msg).into_response()
}

/// Any job-API error (or a status from the guard) as HTTP: the status and `{"error": "..."}`.
pub(crate) fn error(e: impl Into<JobApiError>) -> Response {
    e.into().into_response()
}

/// The submission body as a [`SubmitJson`]. Only a JSON object is one: serde would also take
/// a sequence for a struct, and `[1,2,3]` became a job.
fn submission(body: &[u8]) -> Result<SubmitJson, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("request body: {e}"))?;
    if !value.is_object() {
        return Err(
            "request body: must be a JSON object, e.g. {\"count\": 1, \"template\": \"busybox\"}"
                .to_string(),
        );
    }
    serde_json::from_value(value).map_err(|e| format!("request body: {e}"))
}

async fn submit_job(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    body: axum::body::Bytes,
) -> Response {
    let parsed = match submission(&body) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let req = match parsed.into_request() {
        Ok(r) => r,
        Err(e) => return bad_request(e.to_string()),
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
    /// `KEY=VALUE[,KEY=VALUE...]`: only jobs carrying all of these labels.
    #[serde(default)]
    labels: String,
}

async fn list_jobs(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    Query(q): Query<ListQuery>,
) -> Response {
    let labels = match crate::http_life::selector(&q.labels) {
        Ok(l) => l,
        Err(e) => return bad_request(e.to_string()),
    };
    let job_state = match q.state.as_str() {
        "" => pb::JobState::Unspecified,
        s => match pb::JobState::from_name(s) {
            Some(st) => st,
            None => {
                return bad_request(format!(
                    "state: unknown {s:?}; use {}",
                    pb::JobState::names().join(", ")
                ))
            }
        },
    };
    let req = pb::ListJobsRequest {
        tenant: q.tenant,
        state: job_state as i32,
        limit: q.limit,
        before_id: q.before_id,
        labels,
    };
    match state.jobs.list(&caller, req).await {
        Ok(r) => Json(r.jobs.iter().map(JobJson::from).collect::<Vec<_>>()).into_response(),
        Err(s) => error(s),
    }
}

async fn get_job(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    JobIdParam(id): JobIdParam,
) -> Response {
    match state.jobs.get(&caller, id).await {
        Ok(j) => Json(JobJson::from(&j)).into_response(),
        Err(s) => error(s),
    }
}

async fn cancel_job(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    JobIdParam(id): JobIdParam,
) -> Response {
    match state.jobs.cancel(&caller, id).await {
        Ok(j) => Json(JobJson::from(&j)).into_response(),
        Err(s) => error(s),
    }
}

/// Newline-delimited JSON: the job now, then every change, until it ends.
async fn watch_job(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    JobIdParam(id): JobIdParam,
) -> Response {
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

    #[test]
    fn only_a_json_object_is_a_submission() {
        for body in ["[1,2,3]", "[]", "1", "\"x\"", "null", "true"] {
            let e = submission(body.as_bytes()).expect_err(body);
            assert!(e.contains("must be a JSON object"), "{body}: {e}");
        }
        assert!(submission(b"{").is_err());
        // Control: an object is one.
        let ok = submission(br#"{"count": 2}"#).expect("an object parses");
        assert_eq!(ok.count, 2);
    }
}
