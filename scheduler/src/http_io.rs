//! Exec and files over the HTTP JSON API, for scripts without gRPC stubs. Same checks, routing
//! and node calls as the gRPC `SandboxIo` ([`crate::service::io_proxy`]):
//!
//! | method and path (`/v1/jobs/{id}/sandboxes/{index}/...`) | what                          |
//! |---------------------------------------------------------|-------------------------------|
//! | `POST exec` `{"command": [...], "env", "cwd", "timeout_ms", "stdin"}` | run to the end; JSON result |
//! | `GET files?path=/p`                                     | the file's bytes              |
//! | `PUT files?path=/p[&mode=644]` (body: the bytes)        | write it (atomically)         |
//! | `GET dir?path=/p`                                       | the listing, JSON             |
//! | `GET archive?path=/p`                                   | a file or tree as a tar       |
//! | `PUT archive?path=/p` (body: a tar)                     | unpack under /p               |
//!
//! Output of an exec is capped at [`EXEC_OUTPUT_MAX`] per stream here (the result says when it
//! was cut); gRPC streams it whole. Bodies stream to and from the node without being held.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use surge_proto::sandbox as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::http::{HttpState, JobCaller};
use crate::service::error::JobApiError;

/// Bytes of stdout, and of stderr, an HTTP exec returns at most.
pub const EXEC_OUTPUT_MAX: usize = 8 * 1024 * 1024;
/// Largest exec request body (argv, env and stdin).
pub const EXEC_BODY_MAX: usize = 16 * 1024 * 1024;
/// Largest file or archive body.
pub const UPLOAD_BODY_MAX: usize = 4 * 1024 * 1024 * 1024;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route(
            "/v1/jobs/{id}/sandboxes/{index}/exec",
            post(exec).layer(DefaultBodyLimit::max(EXEC_BODY_MAX)),
        )
        .route(
            "/v1/jobs/{id}/sandboxes/{index}/files",
            get(read_file)
                .put(write_file)
                .layer(DefaultBodyLimit::max(UPLOAD_BODY_MAX)),
        )
        .route("/v1/jobs/{id}/sandboxes/{index}/dir", get(list_dir))
        .route(
            "/v1/jobs/{id}/sandboxes/{index}/archive",
            get(download)
                .put(upload)
                .layer(DefaultBodyLimit::max(UPLOAD_BODY_MAX)),
        )
}

/// `{id}` and `{index}` of a sandbox path, numbers (else a JSON 400).
struct SandboxParam(pb::SandboxRef);

impl FromRequestParts<HttpState> for SandboxParam {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, Response> {
        let Path((job, index)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let bad = |what: &str, raw: &str| {
            JobApiError::Invalid(format!("{what} {raw:?} is not a number")).into_response()
        };
        Ok(SandboxParam(pb::SandboxRef {
            job_id: job.parse().map_err(|_| bad("job id", &job))?,
            index: index.parse().map_err(|_| bad("sandbox index", &index))?,
            ..Default::default()
        }))
    }
}

/// Where a call about `sandbox` goes, and a client of that node (or the JSON error).
async fn target(
    state: &HttpState,
    caller: &crate::service::guard::Caller,
    sandbox: &pb::SandboxRef,
) -> Result<
    (
        crate::service::io_proxy::Route,
        surge_proto::sandbox::sandbox_io_client::SandboxIoClient<tonic::transport::Channel>,
    ),
    Response,
> {
    let route = state.io.route(caller, Some(sandbox)).await.map_err(error)?;
    let node = state.io.node(&route.address).map_err(error)?;
    Ok((route, node))
}

fn error(s: tonic::Status) -> Response {
    JobApiError::from(s).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecJson {
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: String,
    timeout_ms: Option<u64>,
    /// Sent to the command's stdin, then closed.
    stdin: Option<String>,
}

async fn exec(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    SandboxParam(sandbox): SandboxParam,
    body: axum::body::Bytes,
) -> Response {
    let req: ExecJson = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return JobApiError::Invalid(format!("request body: {e}")).into_response(),
    };
    let (route, mut node) = match target(&state, &caller, &sandbox).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let start = pb::ExecStart {
        sandbox: Some(route.sandbox),
        command: req.command,
        env: req.env,
        cwd: req.cwd,
        timeout_ms: req.timeout_ms,
        stdin: req.stdin.is_some(),
    };
    let (tx, rx) = mpsc::channel(4);
    let mut msgs = vec![pb::exec_input::Input::Start(start)];
    if let Some(stdin) = req.stdin {
        msgs.push(pb::exec_input::Input::Stdin(stdin.into_bytes().into()));
        msgs.push(pb::exec_input::Input::CloseStdin(true));
    }
    tokio::spawn(async move {
        for m in msgs {
            if tx.send(pb::ExecInput { input: Some(m) }).await.is_err() {
                return;
            }
        }
    });
    let mut stream = match node.exec(ReceiverStream::new(rx)).await {
        Ok(s) => s.into_inner(),
        Err(s) => return error(s),
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_cut, mut err_cut) = (false, false);
    let keep = |buf: &mut Vec<u8>, cut: &mut bool, b: &[u8]| {
        let room = EXEC_OUTPUT_MAX.saturating_sub(buf.len());
        buf.extend_from_slice(&b[..b.len().min(room)]);
        *cut |= b.len() > room;
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => match m.output {
                Some(pb::exec_output::Output::Stdout(b)) => keep(&mut out, &mut out_cut, &b),
                Some(pb::exec_output::Output::Stderr(b)) => keep(&mut err, &mut err_cut, &b),
                Some(pb::exec_output::Output::Exit(e)) => {
                    return Json(serde_json::json!({
                        "exit_code": e.exit_code,
                        "signal": (e.signal != 0).then_some(e.signal),
                        "timed_out": e.timed_out,
                        "duration_ms": e.duration_ms,
                        "stdout": String::from_utf8_lossy(&out),
                        "stderr": String::from_utf8_lossy(&err),
                        "stdout_truncated": out_cut,
                        "stderr_truncated": err_cut,
                    }))
                    .into_response()
                }
                None => {}
            },
            Ok(None) => {
                return error(tonic::Status::internal(
                    "the exec stream ended without the command's exit status",
                ))
            }
            Err(s) => return error(s),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
    /// Octal permission bits of a written file (`644`).
    mode: Option<String>,
}

/// A node's stream of chunks as the HTTP answer: its status before the first chunk is the JSON
/// error; an error midway ends the body early.
fn chunks_response(
    r: Result<tonic::Response<tonic::Streaming<pb::Chunk>>, tonic::Status>,
    content_type: &'static str,
) -> Response {
    match r {
        Ok(s) => {
            let chunks = s.into_inner();
            let body =
                Body::from_stream(chunks.map(|c| c.map(|c| c.data).map_err(std::io::Error::other)));
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Err(s) => error(s),
    }
}

/// An HTTP body as the chunks of a client-streaming node call.
fn chunks_of(body: Body) -> mpsc::Receiver<axum::body::Bytes> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut data = body.into_data_stream();
        while let Some(Ok(b)) = data.next().await {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    });
    rx
}

async fn read_file(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    SandboxParam(sandbox): SandboxParam,
    Query(q): Query<PathQuery>,
) -> Response {
    let (route, mut node) = match target(&state, &caller, &sandbox).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let req = pb::ReadFileRequest {
        sandbox: Some(route.sandbox),
        path: q.path,
    };
    chunks_response(node.read_file(req).await, "application/octet-stream")
}

async fn write_file(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    SandboxParam(sandbox): SandboxParam,
    Query(q): Query<PathQuery>,
    body: Body,
) -> Response {
    let mode = match q.mode.as_deref().map(|m| u32::from_str_radix(m, 8)) {
        None => 0,
        Some(Ok(m)) if m <= 0o7777 => m,
        Some(_) => {
            return JobApiError::Invalid(format!(
                "mode {:?} is not an octal permission mode such as 644",
                q.mode.unwrap_or_default()
            ))
            .into_response()
        }
    };
    let (route, mut node) = match target(&state, &caller, &sandbox).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let start = pb::WriteFileInput {
        input: Some(pb::write_file_input::Input::Start(pb::WriteFileStart {
            sandbox: Some(route.sandbox),
            path: q.path,
            mode,
            make_parents: true,
        })),
    };
    let data = ReceiverStream::new(chunks_of(body)).map(|b| pb::WriteFileInput {
        input: Some(pb::write_file_input::Input::Data(b)),
    });
    match node
        .write_file(futures::stream::iter([start]).chain(data))
        .await
    {
        Ok(r) => Json(serde_json::json!({ "bytes": r.into_inner().bytes })).into_response(),
        Err(s) => error(s),
    }
}

async fn list_dir(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    SandboxParam(sandbox): SandboxParam,
    Query(q): Query<PathQuery>,
) -> Response {
    let (route, mut node) = match target(&state, &caller, &sandbox).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let req = pb::ListDirRequest {
        sandbox: Some(route.sandbox),
        path: q.path,
    };
    match node.list_dir(req).await {
        Ok(r) => {
            let r = r.into_inner();
            let entries: Vec<_> = r
                .entries
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "name": e.name,
                        "kind": match e.kind() {
                            pb::EntryKind::File => "file",
                            pb::EntryKind::Dir => "dir",
                            pb::EntryKind::Symlink => "symlink",
                            pb::EntryKind::Other => "other",
                        },
                        "size": e.size,
                        "mode": format!("{:o}", e.mode),
                        "modified_ms": e.modified_ms,
                        "uid": e.uid,
                        "gid": e.gid,
                    })
                })
                .collect();
            Json(serde_json::json!({ "entries": entries, "truncated": r.truncated }))
                .into_response()
        }
        Err(s) => error(s),
    }
}

async fn download(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    SandboxParam(sandbox): SandboxParam,
    Query(q): Query<PathQuery>,
) -> Response {
    let (route, mut node) = match target(&state, &caller, &sandbox).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let req = pb::DownloadRequest {
        sandbox: Some(route.sandbox),
        path: q.path,
    };
    chunks_response(node.download(req).await, "application/x-tar")
}

async fn upload(
    State(state): State<HttpState>,
    JobCaller(caller): JobCaller,
    SandboxParam(sandbox): SandboxParam,
    Query(q): Query<PathQuery>,
    body: Body,
) -> Response {
    let (route, mut node) = match target(&state, &caller, &sandbox).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let start = pb::UploadInput {
        input: Some(pb::upload_input::Input::Start(pb::UploadStart {
            sandbox: Some(route.sandbox),
            path: q.path,
        })),
    };
    let data = ReceiverStream::new(chunks_of(body)).map(|b| pb::UploadInput {
        input: Some(pb::upload_input::Input::Data(b)),
    });
    match node
        .upload(futures::stream::iter([start]).chain(data))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            (
                StatusCode::OK,
                Json(serde_json::json!({ "files": r.files, "bytes": r.bytes })),
            )
                .into_response()
        }
        Err(s) => error(s),
    }
}
