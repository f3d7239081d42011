//! Exec and files of a running sandbox: the [`SandboxIo`] trait every runtime implements, its
//! types, limits and errors. The node daemon's gRPC service (`agent::io_server`) drives it; the
//! scheduler replicas forward clients' calls there (see `docs/ARCHITECTURE.md`, "Exec and files").
//!
//! Contracts every implementation keeps:
//!
//! * An exec runs as the sandbox's user, with the sandbox's capabilities (none), `no_new_privs`
//!   and limits, never as the node's root.
//! * Cancelling an exec (the `out` receiver is dropped, or the `exec` future itself is dropped)
//!   kills the command and every process it started; so does its timeout.
//! * Paths are resolved inside the sandbox: a symlink the sandbox made can never lead the node to
//!   read or write a file of the host. Files written belong to the sandbox's user.
//! * Every size is capped ([`FILE_BYTES_MAX`], [`UPLOAD_BYTES_MAX`], [`ARGV_BYTES_MAX`], ...), and
//!   bad input gets an [`IoError`] naming what was wrong, leaving the sandbox as it was.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::SandboxId;

// The limits are the guest agent's (the lowest crate that needs them; a krun guest enforces the
// same ones without trusting the node), re-exported here for every runtime.
pub use surge_guest::proto::{
    ARGV_BYTES_MAX, ARGV_MAX, CHUNK_BYTES, ENV_MAX, FILE_BYTES_MAX, LIST_ENTRIES_MAX,
    PATH_BYTES_MAX, UPLOAD_BYTES_MAX, UPLOAD_ENTRIES_MAX,
};

/// Execs running at once in one sandbox; one more is refused with [`IoError::Busy`].
pub const EXECS_PER_SANDBOX_MAX: usize = surge_guest::proto::EXECS_MAX;
/// Timeout of an exec that names none.
pub const EXEC_TIMEOUT_DEFAULT: Duration = Duration::from_secs(600);
/// The longest timeout an exec may ask for.
pub const EXEC_TIMEOUT_MAX: Duration =
    Duration::from_millis(surge_guest::proto::EXEC_TIMEOUT_MAX_MS);

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecSpec {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `None`: the sandbox's working directory.
    pub cwd: Option<String>,
    pub timeout: Duration,
    /// `false`: stdin is empty.
    pub stdin: bool,
}

impl ExecSpec {
    /// Check the limits and the characters (no NUL anywhere, `KEY` without `=`, absolute cwd).
    pub fn validate(&self) -> Result<(), IoError> {
        let bad = |m: String| Err(IoError::Invalid(m));
        if self.timeout.is_zero() {
            return bad("a timeout of 0 would kill the command at once; give one > 0".into());
        }
        if self.timeout > EXEC_TIMEOUT_MAX {
            return bad(format!(
                "a timeout of {} s is longer than the limit of {} s",
                self.timeout.as_secs(),
                EXEC_TIMEOUT_MAX.as_secs()
            ));
        }
        // Arguments, environment and cwd: the guest agent's rule, the one every runtime keeps.
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        surge_guest::proto::check_command(&self.command, &env, self.cwd.as_deref())
            .map_err(IoError::Invalid)
    }
}

/// A path inside a sandbox as the API takes it: absolute, at most [`PATH_BYTES_MAX`], no NUL.
/// (`..` is allowed in the text; resolution never leaves the sandbox's root.)
pub fn check_path(path: &str) -> Result<(), IoError> {
    surge_guest::proto::check_path(path).map_err(IoError::Invalid)
}

pub use surge_guest::member::MemberKind;

/// Check one member of an uploaded tar stream: its path must be relative and stay below the
/// target (no `..`, no absolute path, no NUL), and its type must be a file, a directory or a
/// symlink (device files, FIFOs and hard links are refused). Returns the path's components.
/// A symlink's target may say anything: it is only ever resolved inside the sandbox. The rule
/// is the guest agent's, so a krun guest and the node refuse the same members.
pub fn check_member(
    path: &std::path::Path,
    kind: tar::EntryType,
) -> Result<(Vec<String>, MemberKind), IoError> {
    surge_guest::member::check_member(path, kind).map_err(IoError::BadArchive)
}

/// From the caller, while an exec runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecControl {
    Stdin(Bytes),
    /// End of stdin. (The channel closing means the same.)
    CloseStdin,
    /// Deliver a signal to the command's process group.
    Signal(i32),
}

/// To the caller, while an exec runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// How an exec ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecStatus {
    /// Exit status as a shell reports it (128 + N for signal N).
    pub code: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// It ran past its timeout and was killed.
    pub timed_out: bool,
    pub duration: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub modified_ms: u64,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    /// Sorted by name, at most [`LIST_ENTRIES_MAX`].
    pub entries: Vec<DirEntry>,
    pub truncated: bool,
}

/// What an upload created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    pub files: u64,
    pub bytes: u64,
}

/// How to write one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteSpec {
    pub path: String,
    /// Permission bits (0o644 when the caller gave none).
    pub mode: u32,
    pub make_parents: bool,
}

/// Errors of exec and file calls; each maps to one gRPC code (see `agent::io_server`).
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("sandbox {0} is not running on this node")]
    NoSandbox(SandboxId),
    #[error("sandbox {id} is {state}; exec and files need it running")]
    NotRunning { id: SandboxId, state: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: no such file or directory in the sandbox")]
    NotFound { path: String },
    #[error("{path}: {what}")]
    WrongKind { path: String, what: String },
    #[error("{0}")]
    TooLarge(String),
    #[error("bad archive: {0}")]
    BadArchive(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0} is not supported by this runtime")]
    Unsupported(&'static str),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Runtime(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl IoError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Exec and files of the sandboxes a runtime holds. Byte streams travel through bounded
/// channels of chunks of at most [`CHUNK_BYTES`].
pub trait SandboxIo: Send + Sync + 'static {
    /// Run a command in a running sandbox; stdout and stderr chunks go to `out` as they come.
    /// `control` carries stdin and signals; its closing is end of stdin. Dropping `out`'s
    /// receiver (the caller went away) or this future kills the command's process tree.
    fn exec(
        &self,
        id: SandboxId,
        spec: ExecSpec,
        control: mpsc::Receiver<ExecControl>,
        out: mpsc::Sender<ExecOutput>,
    ) -> impl Future<Output = Result<ExecStatus, IoError>> + Send;

    /// Stream one regular file (at most [`FILE_BYTES_MAX`]) to `out`; its size.
    fn read_file(
        &self,
        id: SandboxId,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> impl Future<Output = Result<u64, IoError>> + Send;

    /// Write one file from `data` (its closing ends the file), replacing it atomically; bytes
    /// written. A stream over [`FILE_BYTES_MAX`] is refused and leaves no file.
    fn write_file(
        &self,
        id: SandboxId,
        spec: WriteSpec,
        data: mpsc::Receiver<Bytes>,
    ) -> impl Future<Output = Result<u64, IoError>> + Send;

    fn list_dir(
        &self,
        id: SandboxId,
        path: String,
    ) -> impl Future<Output = Result<Listing, IoError>> + Send;

    /// A file or directory tree as a tar stream to `out`; bytes sent.
    fn download(
        &self,
        id: SandboxId,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> impl Future<Output = Result<u64, IoError>> + Send;

    /// Unpack a tar stream under directory `path`. Absolute member paths, `..`, device files
    /// and links that leave the target are refused; so is more than [`UPLOAD_BYTES_MAX`] or
    /// [`UPLOAD_ENTRIES_MAX`].
    fn upload(
        &self,
        id: SandboxId,
        path: String,
        data: mpsc::Receiver<Bytes>,
    ) -> impl Future<Output = Result<UploadStats, IoError>> + Send;

    /// Capture the running sandbox's filesystem as template `name` of `templates` (see
    /// `surge snapshot`). Runtimes without a host-visible root filesystem cannot.
    fn snapshot(
        &self,
        id: SandboxId,
        templates: crate::template::Templates,
        name: String,
    ) -> impl Future<Output = Result<SnapshotStats, IoError>> + Send {
        let _ = (id, templates, name);
        async {
            Err(IoError::Unsupported(
                "a snapshot into a template (only container sandboxes have a root filesystem on the host to copy)",
            ))
        }
    }
}

/// What a snapshot captured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    pub size: crate::template::TreeSize,
    /// How long the sandbox was frozen for the copy.
    pub frozen: Duration,
}

impl From<crate::template::TemplateError> for IoError {
    fn from(e: crate::template::TemplateError) -> Self {
        use crate::template::TemplateError as T;
        let msg = e.to_string();
        match e {
            T::InvalidName { .. } | T::NotARootfs { .. } | T::Escapes { .. } => {
                IoError::Invalid(msg)
            }
            T::Exists { .. } => IoError::Exists(msg),
            T::NotFound { .. } | T::SourceMissing { .. } => IoError::Invalid(msg),
            T::TooLarge { .. } => IoError::TooLarge(msg),
            T::TooMany { .. } => IoError::Busy(msg),
            _ => IoError::Runtime(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &[&str]) -> ExecSpec {
        ExecSpec {
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            timeout: Duration::from_secs(60),
            stdin: false,
        }
    }

    #[test]
    fn exec_specs_are_checked() {
        assert!(spec(&["true"]).validate().is_ok());
        assert!(spec(&[]).validate().is_err());
        assert!(spec(&["a\0b"]).validate().is_err());
        let mut s = spec(&["true"]);
        s.timeout = Duration::ZERO;
        assert!(s
            .validate()
            .expect_err("an error")
            .to_string()
            .contains("timeout of 0"));
        s.timeout = Duration::from_secs(3 * 24 * 3600);
        assert!(s
            .validate()
            .expect_err("an error")
            .to_string()
            .contains("longer"));
        let mut s = spec(&["true"]);
        s.env.insert("A=B".into(), "x".into());
        assert!(s.validate().is_err());
        let mut s = spec(&["true"]);
        s.cwd = Some("relative".into());
        assert!(s.validate().is_err());
        let big = "x".repeat(ARGV_BYTES_MAX);
        assert!(spec(&["echo", &big]).validate().is_err());
        let many: Vec<&str> = std::iter::repeat_n("x", ARGV_MAX + 1).collect();
        assert!(spec(&many).validate().is_err());
    }

    #[test]
    fn archive_members_are_checked() {
        use std::path::Path;
        use tar::EntryType as T;
        let ok = check_member(Path::new("./a/b.txt"), T::Regular).expect("ok");
        assert_eq!(
            ok,
            (vec!["a".to_string(), "b.txt".to_string()], MemberKind::File)
        );
        assert!(check_member(Path::new("/etc/passwd"), T::Regular).is_err());
        assert!(check_member(Path::new("a/../../x"), T::Regular).is_err());
        assert!(check_member(Path::new("dev"), T::Char).is_err());
        assert!(check_member(Path::new("dev"), T::Block).is_err());
        assert!(check_member(Path::new("l"), T::Link).is_err());
        assert!(check_member(Path::new("f"), T::Fifo).is_err());
        assert!(check_member(Path::new("./"), T::Directory).is_ok());
        assert!(check_member(Path::new("l"), T::Symlink).is_ok());
    }

    #[test]
    fn paths_are_checked() {
        assert!(check_path("/tmp/x").is_ok());
        assert!(
            check_path("/../../etc/passwd").is_ok(),
            "resolution confines it"
        );
        assert!(check_path("tmp/x").is_err());
        assert!(check_path("/a\0b").is_err());
        assert!(check_path(&format!("/{}", "a".repeat(PATH_BYTES_MAX))).is_err());
    }
}
