//! The lifetime routes of the HTTP job API (see `service::lifetimes`):
//!
//! * `POST /v1/jobs/cancel` `{"labels": {"run": "exp7"}}`: cancel the caller's matching jobs;
//! * `POST /v1/jobs/{id}/keepalive` `{"first_index": 0, "count": 0, "ttl_ms": 0}` (all
//!   optional): renew the lease, extend the TTL;
//! * `GET /v1/jobs/{id}/wait?index=I&timeout_ms=T&until=running|ended`: wait without polling;
//! * `GET /v1/jobs/{id}/sandboxes/{index}`: one sandbox with its end reason.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use surge_proto::jobs as pb;

use crate::api_json::{JobJson, SandboxJson};
use crate::http::{bad_request, error, HttpState, JobCaller, JobIdParam};

/// `KEY=VALUE[,KEY=VALUE...]` as a selector (empty: none).
pub fn selector(s: &str) -> Result<BTreeMap<String, String>, crate::lifetime::LabelError> {
    let mut out = BTreeMap::new();
    for term in s.split(',').filter(|t| !t.is_empty()) {
        let (k, v) = crate::lifetime::parse_label(term)?;
        out.insert(k, v);
    }
    Ok(out)
}

fn body<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, String> {
    if bytes.is_empty() {
        return Ok(T::default());
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("request body: {e}"))?;
    if !value.is_object() {
        return Err("request body: must be a JSON object".to_string());
    }
    serde_json::from_value(value).map_err(|e| format!("request body: {e}"))
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    tenant: String,
}

pub async fn cancel_jobs(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    bytes: axum::body::Bytes,
) -> Response {
    let b: CancelBody = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return bad_request(e),
    };
    let req = pb::CancelJobsRequest {
        labels: b.labels,
        tenant: b.tenant,
    };
    match state.jobs.cancel_by_label(&caller, req).await {
        Ok(r) => Json(serde_json::json!({
            "cancelled": r.cancelled,
            "job_ids": r.job_ids,
            "index": r.index,
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeepaliveBody {
    #[serde(default)]
    first_index: u32,
    #[serde(default)]
    count: u32,
    #[serde(default)]
    ttl_ms: u64,
}

pub async fn keepalive(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    JobIdParam(id): JobIdParam,
    bytes: axum::body::Bytes,
) -> Response {
    let b: KeepaliveBody = match body(&bytes) {
        Ok(b) => b,
        Err(e) => return bad_request(e),
    };
    let req = pb::KeepaliveRequest {
        job_id: id,
        first_index: b.first_index,
        count: b.count,
        ttl_ms: b.ttl_ms,
    };
    match state.jobs.keepalive(&caller, req).await {
        Ok(j) => Json(JobJson::from(&j)).into_response(),
        Err(e) => error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    index: Option<u32>,
    #[serde(default)]
    timeout_ms: u64,
    #[serde(default)]
    until: String,
}

/// `running`/`ended` as the wire's enum.
pub fn parse_until(s: &str) -> Result<pb::WaitFor, String> {
    match s {
        "" | "running" => Ok(pb::WaitFor::Running),
        "ended" => Ok(pb::WaitFor::Ended),
        other => Err(format!("until {other:?}: use running or ended")),
    }
}

/// The outcome's name (`met`, `ended`, `timed-out`).
pub fn outcome_name(o: i32) -> &'static str {
    match pb::WaitOutcome::try_from(o) {
        Ok(pb::WaitOutcome::Met) => "met",
        Ok(pb::WaitOutcome::Ended) => "ended",
        Ok(pb::WaitOutcome::TimedOut) | Err(_) => "timed-out",
    }
}

pub async fn wait_job(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    JobIdParam(id): JobIdParam,
    Query(q): Query<WaitQuery>,
) -> Response {
    let until = match parse_until(&q.until) {
        Ok(u) => u,
        Err(e) => return bad_request(e),
    };
    let req = pb::WaitJobRequest {
        job_id: id,
        index: q.index,
        timeout_ms: q.timeout_ms,
        until: until as i32,
    };
    match state.jobs.wait(&caller, req).await {
        Ok(r) => Json(serde_json::json!({
            "outcome": outcome_name(r.outcome),
            "job": r.job.as_ref().map(JobJson::from),
            "sandbox": r.sandbox.as_ref().map(SandboxJson::from),
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

pub async fn get_sandbox(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    Path((id, index)): Path<(String, String)>,
) -> Response {
    let (Ok(job_id), Ok(index)) = (id.parse::<u64>(), index.parse::<u32>()) else {
        return bad_request(format!(
            "sandbox {id:?}.{index:?}: job id and index are numbers"
        ));
    };
    match state
        .jobs
        .get_sandbox(&caller, pb::GetSandboxRequest { job_id, index })
        .await
    {
        Ok(s) => Json(SandboxJson::from(&s)).into_response(),
        Err(e) => error(e),
    }
}
