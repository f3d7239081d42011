//! The job API's one error type, shared by the gRPC `JobsService` and the HTTP `/v1/jobs`: each
//! refusal is decided once, in `jobs.rs`, and mapped here to a `tonic::Status` for gRPC and to an
//! HTTP status with a JSON body `{"error": "..."}` for HTTP, so both APIs refuse the same
//! request the same way.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tonic::{Code, Status};

use crate::validate::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum JobApiError {
    /// The request is wrong; the message says which field and how to fix it.
    #[error("{0}")]
    Invalid(String),
    /// No such job, or another tenant's (a tenant learns nothing about the others).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this (a tenant's token acting for another tenant).
    #[error("{0}")]
    PermissionDenied(String),
    /// The cluster's answer (no leader, a proposal timed out, a refusal of the state machine
    /// carried as a status), passed through with its code.
    #[error("{}", .0.message())]
    Cluster(Status),
    /// A reply the state machine should never give.
    #[error("{0}")]
    Internal(String),
}

impl From<Invalid> for JobApiError {
    fn from(e: Invalid) -> Self {
        JobApiError::Invalid(e.to_string())
    }
}

impl From<Status> for JobApiError {
    fn from(s: Status) -> Self {
        JobApiError::Cluster(s)
    }
}

/// Raft's refusals (no leader, a proposal that timed out) keep the code `surge_raft` gives them.
impl From<surge_raft::ClusterError> for JobApiError {
    fn from(e: surge_raft::ClusterError) -> Self {
        JobApiError::Cluster(Status::from(e))
    }
}

impl From<JobApiError> for Status {
    fn from(e: JobApiError) -> Self {
        match e {
            JobApiError::Invalid(m) => Status::invalid_argument(m),
            JobApiError::NotFound(m) => Status::not_found(m),
            JobApiError::PermissionDenied(m) => Status::permission_denied(m),
            JobApiError::Cluster(s) => s,
            JobApiError::Internal(m) => Status::internal(m),
        }
    }
}

impl JobApiError {
    /// The HTTP status that says whose fault it is, as the gRPC code does.
    pub fn http_status(&self) -> StatusCode {
        match self {
            JobApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            JobApiError::NotFound(_) => StatusCode::NOT_FOUND,
            JobApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            JobApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            JobApiError::Cluster(s) => http_status_of(s.code()),
        }
    }
}

/// A gRPC code as the HTTP status of the same meaning.
fn http_status_of(code: Code) -> StatusCode {
    match code {
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
    }
}

impl IntoResponse for JobApiError {
    fn into_response(self) -> Response {
        let code = self.http_status();
        (code, Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_and_http_say_the_same_thing() {
        let cases = [
            (
                JobApiError::Invalid("count: too many".into()),
                Code::InvalidArgument,
                400,
            ),
            (
                JobApiError::NotFound("no job 7".into()),
                Code::NotFound,
                404,
            ),
            (
                JobApiError::PermissionDenied("tenant a".into()),
                Code::PermissionDenied,
                403,
            ),
            (
                JobApiError::Cluster(Status::unavailable("no leader")),
                Code::Unavailable,
                503,
            ),
            (JobApiError::Internal("odd".into()), Code::Internal, 500),
        ];
        for (e, code, http) in cases {
            assert_eq!(e.http_status().as_u16(), http, "{e:?}");
            let message = e.to_string();
            let status = Status::from(e);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }
}
