//! The wire protocol between the host (the node daemon) and the guest agent.
//!
//! ```text
//!  frame   = total_len: u32 BE | header_len: u32 BE | header: JSON | payload: raw bytes
//!            total_len = 4 + header_len + payload_len, at most FRAME_BYTES_MAX
//! ```
//!
//! The header is a JSON object tagged by `"t"` ([`Header`]); the payload carries the bytes of
//! a [`Header::Data`] frame (stdin, stdout, stderr, file or tar data) unescaped, and is empty for
//! every other kind. Each kind has its own size cap ([`Header::header_bytes_max`]), checked
//! before the header is parsed (against [`FRAME_BYTES_MAX`]) and after (against the kind's cap).
//!
//! **Hello.** The client's first frame is `Hello { version }`; the agent answers with its own
//! `Hello` when it speaks that version, or an `Error` (id 0) and closes the connection.
//!
//! **Multiplexing.** Every other frame names a request id the client chose. A request frame
//! (`Exec`, `ReadFile`, `WriteFile`, `ListDir`, `Download`, `Upload`) opens it; `Data`, `Eof`,
//! `Signal`, `Cancel` and `Credit` travel while it runs; exactly one `Exited`, `Done` or `Error`
//! ends it. Many requests run at once over one connection.
//!
//! **Flow control.** A side may have at most [`WINDOW_CHUNKS`] `Data` (or `Entries`) frames of
//! one request that the other side has not consumed; the receiver gives each back with a
//! `Credit` once it has passed the chunk on. So one slow reader (a command that does not read
//! its stdin, a client that does not read its output) holds up only its own request, and memory
//! per request is bounded on both sides. A peer that sends past its window is broken: its
//! request ends with a protocol error.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The vsock port the agent listens on in the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// One frame, header and payload, at most.
pub const FRAME_BYTES_MAX: usize = 2 << 20;
/// Bytes of one `Data` payload, at most.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Unconsumed `Data`/`Entries` frames one side may have in flight per request.
pub const WINDOW_CHUNKS: u32 = 16;
/// Directory entries per `Entries` frame, at most.
pub const ENTRIES_PER_FRAME: usize = 64;

/// Arguments of one exec, at most (as the node's `runtime::io`).
pub const ARGV_MAX: usize = 4_096;
/// Bytes of argv plus env of one exec, at most.
pub const ARGV_BYTES_MAX: usize = 256 * 1024;
/// Environment variables added by one exec, at most.
pub const ENV_MAX: usize = 1_024;
/// The longest timeout an exec may ask for.
pub const EXEC_TIMEOUT_MAX_MS: u64 = 24 * 3600 * 1000;
/// A path, at most.
pub const PATH_BYTES_MAX: usize = 4_096;
/// One file read or written, at most.
pub const FILE_BYTES_MAX: u64 = 1 << 30;
/// One upload (a tar stream), at most.
pub const UPLOAD_BYTES_MAX: u64 = 4 << 30;
/// Entries one upload may create, at most.
pub const UPLOAD_ENTRIES_MAX: u64 = 100_000;
/// Entries a listing returns, at most.
pub const LIST_ENTRIES_MAX: usize = 10_000;
/// Execs running at once in one guest.
pub const EXECS_MAX: usize = 64;
/// Requests open at once on one connection.
pub const REQUESTS_PER_CONNECTION_MAX: usize = 256;

/// Header bytes of the small kinds.
const SMALL_HEADER_MAX: usize = 16 * 1024;
/// A JSON string may take 6 bytes per byte of text (`\u0001`).
const JSON_ESCAPE: usize = 6;

/// What to run (the node's `ExecSpec` on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `None`: `/`.
    pub cwd: Option<String>,
    pub timeout_ms: u64,
    /// `false`: stdin is `/dev/null`.
    pub stdin: bool,
}

/// How an exec ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// As a shell reports it: the exit code, or 128 + N for signal N.
    pub code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// How to write one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRequest {
    pub path: String,
    pub mode: u32,
    pub make_parents: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub modified_ms: u64,
    pub uid: u32,
    pub gid: u32,
}

/// Which byte stream a `Data` frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
    /// File contents or a tar stream, either way.
    File,
}

/// Why a request failed (maps one to one onto the node's `IoError`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Invalid,
    NotFound,
    WrongKind,
    TooLarge,
    BadArchive,
    Busy,
    Io,
    /// The peer broke the protocol (or speaks another version).
    Protocol,
}

/// The header of a frame. See the module docs for who sends what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Header {
    Hello {
        version: u32,
    },
    Exec {
        id: u64,
        spec: ExecRequest,
    },
    ReadFile {
        id: u64,
        path: String,
    },
    WriteFile {
        id: u64,
        spec: WriteRequest,
    },
    ListDir {
        id: u64,
        path: String,
    },
    Download {
        id: u64,
        path: String,
    },
    Upload {
        id: u64,
        path: String,
    },
    /// Deliver a signal to the exec's process group.
    Signal {
        id: u64,
        signal: i32,
    },
    /// Kill the exec's process group / abandon the file call.
    Cancel {
        id: u64,
    },
    /// Bytes in the payload.
    Data {
        id: u64,
        stream: Stream,
    },
    /// The client's data (stdin, a file, a tar stream) is complete.
    Eof {
        id: u64,
    },
    /// The receiver consumed `chunks` more `Data`/`Entries` frames of this request.
    Credit {
        id: u64,
        chunks: u32,
    },
    Entries {
        id: u64,
        entries: Vec<Entry>,
    },
    Exited {
        id: u64,
        status: ExitStatus,
    },
    /// A file call succeeded: bytes read/written/sent, files created, whether a listing was cut.
    Done {
        id: u64,
        bytes: u64,
        files: u64,
        truncated: bool,
    },
    Error {
        id: u64,
        kind: ErrorKind,
        message: String,
    },
}

impl Header {
    /// The request this frame belongs to (0 for `Hello`).
    pub fn id(&self) -> u64 {
        match self {
            Header::Hello { .. } => 0,
            Header::Exec { id, .. }
            | Header::ReadFile { id, .. }
            | Header::WriteFile { id, .. }
            | Header::ListDir { id, .. }
            | Header::Download { id, .. }
            | Header::Upload { id, .. }
            | Header::Signal { id, .. }
            | Header::Cancel { id }
            | Header::Data { id, .. }
            | Header::Eof { id }
            | Header::Credit { id, .. }
            | Header::Entries { id, .. }
            | Header::Exited { id, .. }
            | Header::Done { id, .. }
            | Header::Error { id, .. } => *id,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Header::Hello { .. } => "hello",
            Header::Exec { .. } => "exec",
            Header::ReadFile { .. } => "read_file",
            Header::WriteFile { .. } => "write_file",
            Header::ListDir { .. } => "list_dir",
            Header::Download { .. } => "download",
            Header::Upload { .. } => "upload",
            Header::Signal { .. } => "signal",
            Header::Cancel { .. } => "cancel",
            Header::Data { .. } => "data",
            Header::Eof { .. } => "eof",
            Header::Credit { .. } => "credit",
            Header::Entries { .. } => "entries",
            Header::Exited { .. } => "exited",
            Header::Done { .. } => "done",
            Header::Error { .. } => "error",
        }
    }

    /// The largest header of this kind, as JSON.
    pub fn header_bytes_max(&self) -> usize {
        match self {
            Header::Exec { .. } => {
                JSON_ESCAPE * (ARGV_BYTES_MAX + PATH_BYTES_MAX) + 8 * (ARGV_MAX + ENV_MAX) + 4096
            }
            Header::ReadFile { .. }
            | Header::WriteFile { .. }
            | Header::ListDir { .. }
            | Header::Download { .. }
            | Header::Upload { .. }
            | Header::Error { .. } => JSON_ESCAPE * PATH_BYTES_MAX + 4096,
            // A name is at most 255 bytes on Linux; the rest of an entry is under 200.
            Header::Entries { .. } => ENTRIES_PER_FRAME * (JSON_ESCAPE * 255 + 200) + 256,
            _ => SMALL_HEADER_MAX,
        }
    }
}

/// One message: a header and, for `Data`, its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(header: Header) -> Self {
        Self {
            header,
            payload: Bytes::new(),
        }
    }

    pub fn data(id: u64, stream: Stream, payload: Bytes) -> Self {
        Self {
            header: Header::Data { id, stream },
            payload,
        }
    }

    pub fn error(id: u64, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::new(Header::Error {
            id,
            kind,
            message: message.into(),
        })
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("a {what} of {bytes} bytes is over the limit of {max}")]
    TooLarge {
        what: String,
        bytes: usize,
        max: usize,
    },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("the peer speaks protocol version {theirs}; this side speaks {ours}")]
    Version { ours: u32, theirs: u32 },
    #[error("the connection closed")]
    Closed,
}

/// Check a frame against the caps of its kind.
fn check(frame: &Frame, header_len: usize) -> Result<(), ProtoError> {
    let max = frame.header.header_bytes_max();
    if header_len > max {
        return Err(ProtoError::TooLarge {
            what: format!("{} header", frame.header.kind()),
            bytes: header_len,
            max,
        });
    }
    let payload_max = match frame.header {
        Header::Data { .. } => CHUNK_BYTES,
        _ => 0,
    };
    if frame.payload.len() > payload_max {
        return Err(ProtoError::TooLarge {
            what: format!("{} payload", frame.header.kind()),
            bytes: frame.payload.len(),
            max: payload_max,
        });
    }
    Ok(())
}

/// The bytes of `frame` on the wire; refused when over its caps.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtoError> {
    let header = serde_json::to_vec(&frame.header)
        .map_err(|e| ProtoError::Malformed(format!("encode the header: {e}")))?;
    check(frame, header.len())?;
    let total = 4 + header.len() + frame.payload.len();
    if total > FRAME_BYTES_MAX {
        return Err(ProtoError::TooLarge {
            what: "frame".into(),
            bytes: total,
            max: FRAME_BYTES_MAX,
        });
    }
    let as_u32 = |n: usize| {
        u32::try_from(n).map_err(|_| ProtoError::Malformed(format!("length {n} over u32")))
    };
    let mut out = Vec::with_capacity(4 + total);
    out.extend_from_slice(&as_u32(total)?.to_be_bytes());
    out.extend_from_slice(&as_u32(header.len())?.to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&frame.payload);
    Ok(out)
}

/// Parse the body of a frame (what follows its total length).
pub fn decode(body: &[u8]) -> Result<Frame, ProtoError> {
    let (len, rest) = body
        .split_first_chunk::<4>()
        .ok_or_else(|| ProtoError::Malformed("a frame shorter than its header length".into()))?;
    let header_len = usize::try_from(u32::from_be_bytes(*len))
        .map_err(|_| ProtoError::Malformed("header length over usize".into()))?;
    if header_len > rest.len() {
        return Err(ProtoError::Malformed(format!(
            "header length {header_len} but only {} bytes follow",
            rest.len()
        )));
    }
    let (header, payload) = rest.split_at(header_len);
    let header: Header = serde_json::from_slice(header)
        .map_err(|e| ProtoError::Malformed(format!("header: {e}")))?;
    let frame = Frame {
        header,
        payload: Bytes::copy_from_slice(payload),
    };
    check(&frame, header_len)?;
    Ok(frame)
}

/// Read one frame; `Ok(None)` at a clean end of the stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtoError::Malformed(
                    "the stream ended inside a frame".into(),
                ))
            };
        }
        got += n;
    }
    let total = usize::try_from(u32::from_be_bytes(len))
        .map_err(|_| ProtoError::Malformed("frame length over usize".into()))?;
    if total > FRAME_BYTES_MAX {
        return Err(ProtoError::TooLarge {
            what: "frame".into(),
            bytes: total,
            max: FRAME_BYTES_MAX,
        });
    }
    let mut body = vec![0u8; total];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            ProtoError::Malformed("the stream ended inside a frame".into())
        }
        _ => ProtoError::Io(e),
    })?;
    decode(&body).map(Some)
}

/// Write one frame and flush it.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), ProtoError> {
    let bytes = encode(frame)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// The check of a peer's `Hello`.
pub fn check_version(theirs: u32) -> Result<(), ProtoError> {
    if theirs != PROTOCOL_VERSION {
        return Err(ProtoError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(())
}

impl ExecRequest {
    /// The limits and characters the node checks too (an agent never trusts its peer).
    pub fn validate(&self) -> Result<(), String> {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        check_command(&self.argv, &env, self.cwd.as_deref())?;
        if self.timeout_ms == 0 || self.timeout_ms > EXEC_TIMEOUT_MAX_MS {
            return Err(format!(
                "a timeout of {} ms is outside 1 ms ..= {EXEC_TIMEOUT_MAX_MS} ms",
                self.timeout_ms
            ));
        }
        Ok(())
    }
}

/// An exec's arguments, environment and working directory: the counts and bytes under the caps,
/// no NUL anywhere, names non-empty without `=`, the cwd an absolute path. The one rule the node
/// (`surge_node::runtime::io::ExecSpec::validate`) and the agent apply.
pub fn check_command(
    argv: &[String],
    env: &[(&str, &str)],
    cwd: Option<&str>,
) -> Result<(), String> {
    if argv.is_empty() {
        return Err("an exec needs a command".into());
    }
    if argv.len() > ARGV_MAX {
        return Err(format!("{} arguments; at most {ARGV_MAX}", argv.len()));
    }
    if env.len() > ENV_MAX {
        return Err(format!(
            "{} environment variables; at most {ENV_MAX}",
            env.len()
        ));
    }
    let size: usize = argv.iter().map(|a| a.len() + 1).sum::<usize>()
        + env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    if size > ARGV_BYTES_MAX {
        return Err(format!(
            "arguments and environment take {size} bytes; at most {ARGV_BYTES_MAX}"
        ));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("an argument contains a NUL byte".into());
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(format!(
                "bad environment variable name {k:?}: non-empty, no '=' and no NUL"
            ));
        }
    }
    if let Some(cwd) = cwd {
        check_path(cwd)?;
    }
    Ok(())
}

/// A path as requests carry it: absolute, at most [`PATH_BYTES_MAX`], no NUL.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!(
            "path {path:?} is not absolute; paths inside a sandbox start with /"
        ));
    }
    if path.len() > PATH_BYTES_MAX {
        return Err(format!(
            "path of {} bytes; at most {PATH_BYTES_MAX}",
            path.len()
        ));
    }
    if path.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    Ok(())
}
