//! The checkpoint routes of the HTTP job API ("close the lid"; see `state::checkpoint` and
//! `state::fork`), as the gRPC `UpdateSandboxes` and `ForkSandbox` do them:
//!
//! * `POST /v1/jobs/{id}/sandboxes/{index}/checkpoint`: dump it to its node's disk and release
//!   its CPU and memory (`surge pause --checkpoint`); the job afterwards;
//! * `POST /v1/jobs/{id}/sandboxes/{index}/resume`: thaw a paused sandbox, or restore a
//!   checkpointed one on its node (`surge resume`); the job afterwards;
//! * `POST /v1/jobs/{id}/sandboxes/{index}/fork` `{"count": 8, "idempotency_key": "k"}` (and
//!   optionally `"labels": {..}`, `"lease_ms": N` for the fork job): COUNT
//!   new sandboxes (a new job) restored side by side from one checkpoint of a running sandbox,
//!   on its node (`surge fork`); `{"job_id", "created"}`.
//!
//! A refusal (a node that cannot checkpoint, a source that is not running, a count out of 1..64)
//! is a JSON error with the state machine's one line.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use surge_proto::jobs as pb;

use crate::api_json::JobJson;
use crate::http::{bad_request, error, HttpState, JobCaller};

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route(
            "/v1/jobs/{id}/sandboxes/{index}/checkpoint",
            post(checkpoint),
        )
        .route("/v1/jobs/{id}/sandboxes/{index}/resume", post(resume))
        .route("/v1/jobs/{id}/sandboxes/{index}/fork", post(fork))
}

/// The sandbox a path names, or why not.
fn sandbox(id: &str, index: &str) -> Result<(u64, u32), String> {
    match (id.parse::<u64>(), index.parse::<u32>()) {
        (Ok(job), Ok(index)) => Ok((job, index)),
        _ => Err(format!(
            "sandbox {id:?}.{index:?}: job id and index are numbers"
        )),
    }
}

async fn act(
    state: HttpState,
    caller: crate::service::guard::Caller,
    (job_id, index): (u64, u32),
    action: pb::SandboxAction,
) -> Response {
    let req = pb::UpdateSandboxesRequest {
        job_id,
        first_index: index,
        count: 1,
        action: action as i32,
        ..Default::default()
    };
    match state.jobs.update_sandboxes(&caller, req).await {
        Ok(j) => Json(JobJson::from(&j)).into_response(),
        Err(e) => error(e),
    }
}

async fn checkpoint(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    Path((id, index)): Path<(String, String)>,
) -> Response {
    match sandbox(&id, &index) {
        Ok(s) => act(state, caller, s, pb::SandboxAction::Checkpoint).await,
        Err(why) => bad_request(why),
    }
}

async fn resume(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    Path((id, index)): Path<(String, String)>,
) -> Response {
    match sandbox(&id, &index) {
        Ok(s) => act(state, caller, s, pb::SandboxAction::Resume).await,
        Err(why) => bad_request(why),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkBody {
    count: u32,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    lease_ms: u64,
}

async fn fork(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    Path((id, index)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> Response {
    let (job_id, index) = match sandbox(&id, &index) {
        Ok(s) => s,
        Err(why) => return bad_request(why),
    };
    // An object only: serde would read a struct from a JSON array too (`[8]`).
    let parsed = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|v| {
            if v.is_object() {
                serde_json::from_value::<ForkBody>(v).map_err(|e| e.to_string())
            } else {
                Err("must be a JSON object".to_string())
            }
        });
    let b = match parsed {
        Ok(b) => b,
        Err(e) => {
            return bad_request(format!(
                "request body: {e} (expected {{\"count\": N, \"idempotency_key\": \"...\"}})"
            ))
        }
    };
    let req = pb::ForkSandboxRequest {
        job_id,
        index,
        count: b.count,
        idempotency_key: b.idempotency_key,
        labels: b.labels,
        lease_ms: b.lease_ms,
    };
    match state.jobs.fork(&caller, req).await {
        Ok(r) => {
            Json(serde_json::json!({ "job_id": r.job_id, "created": r.created })).into_response()
        }
        Err(e) => error(e),
    }
}
