//! The replica's HTTP port: Prometheus `/metrics` and `/healthz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};

use crate::service::Replica;

#[derive(Clone)]
pub struct HttpState {
    pub replica: Replica,
    pub registry: Arc<Registry>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
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
