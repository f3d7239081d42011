//! Exec and files of a krun sandbox ([`SandboxIo`]), through its guest agent.
//!
//! A microVM has no `crun exec`: each VM boots `surge-guest` (the `surge-guest` crate) as its
//! workload, which runs the sandbox's command and serves exec and file requests on vsock port
//! [`AGENT_VSOCK_PORT`]. libkrun maps that port to `<vm dir>/agent.sock` on this host
//! (`krun_add_vsock_port2` with `listen`, set up in `vm::configure`). The runtime keeps one
//! connection per VM ([`AgentClients`]), made on first use and made again when the old one
//! closed; every exec and file call of that sandbox is a request multiplexed over it.
//!
//! The guest's own kernel enforces what the node's runtimes enforce by other means: the agent
//! runs execs as the sandbox's user with no capabilities and `no_new_privs`, in a process
//! group that a timeout or a cancel kills; paths are resolved in the guest's root, which is
//! the guest's own file system (no host path is ever opened for the sandbox).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use surge_guest::client::{Client, ClientError, Control, Output};
use surge_guest::proto::{self, ErrorKind, AGENT_VSOCK_PORT};
use tokio::sync::mpsc;

use super::vm::AGENT_SOCKET;
use super::KrunRuntime;
use crate::runtime::io::{
    check_path, DirEntry, EntryKind, ExecControl, ExecOutput, ExecSpec, ExecStatus, IoError,
    Listing, SandboxIo, UploadStats, WriteSpec,
};
use crate::runtime::{ObservedState, RuntimeError, SandboxId};

/// How long the guest agent has to accept a connection and answer its hello.
pub const AGENT_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past an exec's own timeout the host waits for the agent's verdict (the agent kills
/// the command at its timeout; this only bounds a VM that stopped answering).
pub const EXEC_VERDICT_GRACE: Duration = Duration::from_secs(10);

/// One agent connection per VM.
#[derive(Default)]
pub struct AgentClients {
    clients: Mutex<HashMap<SandboxId, Arc<Client>>>,
}

impl AgentClients {
    fn cached(&self, id: SandboxId) -> Option<Arc<Client>> {
        let map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&id).filter(|c| !c.is_closed()).cloned()
    }

    fn keep(&self, id: SandboxId, client: Arc<Client>) {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        // Entries of VMs that ended are dropped here (and at remove), so the map holds at most
        // one per VM this runtime runs.
        map.retain(|_, c| !c.is_closed());
        map.insert(id, client);
    }

    /// Drop the connection of a VM that is gone.
    pub fn forget(&self, id: SandboxId) {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&id);
    }
}

impl From<ExecControl> for Control {
    fn from(c: ExecControl) -> Self {
        match c {
            ExecControl::Stdin(b) => Control::Stdin(b),
            ExecControl::CloseStdin => Control::CloseStdin,
            ExecControl::Signal(n) => Control::Signal(n),
        }
    }
}

impl From<Output> for ExecOutput {
    fn from(o: Output) -> Self {
        match o {
            Output::Stdout(b) => ExecOutput::Stdout(b),
            Output::Stderr(b) => ExecOutput::Stderr(b),
        }
    }
}

fn from_runtime(id: SandboxId, e: RuntimeError) -> IoError {
    match e {
        RuntimeError::NotFound { .. } => IoError::NoSandbox(id),
        RuntimeError::WrongState { state, .. } => IoError::NotRunning {
            id,
            state: state_name(&state),
        },
        other => IoError::Runtime(other.to_string()),
    }
}

fn state_name(state: &ObservedState) -> String {
    match state {
        ObservedState::Running => "running".into(),
        ObservedState::Paused => "paused".into(),
        ObservedState::Exited { code } => format!("exited (code {code})"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The node's error for an agent's answer. `path` is the request's path, for file errors.
pub fn from_agent(id: SandboxId, path: &str, e: ClientError) -> IoError {
    match e {
        ClientError::Agent { kind, message } => match kind {
            ErrorKind::Invalid => IoError::Invalid(message),
            ErrorKind::NotFound => IoError::NotFound {
                path: path.to_owned(),
            },
            ErrorKind::WrongKind => IoError::WrongKind {
                path: path.to_owned(),
                what: message,
            },
            ErrorKind::TooLarge => IoError::TooLarge(message),
            ErrorKind::BadArchive => IoError::BadArchive(message),
            ErrorKind::Busy => IoError::Busy(message),
            ErrorKind::Io => IoError::Runtime(format!("in sandbox {id}: {message}")),
            ErrorKind::Protocol => IoError::Runtime(format!(
                "the guest agent of sandbox {id} refused the request: {message}"
            )),
        },
        ClientError::Closed => IoError::Runtime(format!(
            "the connection to the guest agent of sandbox {id} closed (did the VM stop?)"
        )),
        ClientError::Proto(e) => IoError::Runtime(format!("the guest agent of sandbox {id}: {e}")),
        ClientError::Timeout(d) => IoError::Runtime(format!(
            "the guest agent of sandbox {id} did not answer within {d:?}"
        )),
    }
}

impl KrunRuntime {
    /// The agent connection of a running VM, made (or made again) when needed.
    async fn agent(&self, id: SandboxId, operation: &'static str) -> Result<Arc<Client>, IoError> {
        let vm = self
            .vms
            .live(self, id, operation)
            .await
            .map_err(|e| from_runtime(id, e))?;
        if vm.record().paused {
            return Err(IoError::NotRunning {
                id,
                state: "paused".into(),
            });
        }
        if self.config.agent.is_none() {
            return Err(IoError::Runtime(format!(
                "sandbox {id} runs without a guest agent: no surge-guest binary was found when it started (build it with guest/scripts/build-static and put it next to surge)"
            )));
        }
        if let Some(c) = self.agents.cached(id) {
            return Ok(c);
        }
        let sock = vm.file(AGENT_SOCKET);
        let late = |what: String| {
            IoError::Runtime(format!(
                "the guest agent of sandbox {id} did not answer within {AGENT_ANSWER_TIMEOUT:?} ({what}; vsock port {AGENT_VSOCK_PORT} at {})",
                sock.display()
            ))
        };
        let stream =
            tokio::time::timeout(AGENT_ANSWER_TIMEOUT, tokio::net::UnixStream::connect(&sock))
                .await
                .map_err(|_| late("connect timed out".into()))?
                .map_err(|e| late(format!("connect: {e}")))?;
        let client = Client::connect(stream, AGENT_ANSWER_TIMEOUT)
            .await
            .map_err(|e| late(e.to_string()))?;
        let client = Arc::new(client);
        self.agents.keep(id, client.clone());
        Ok(client)
    }
}

fn entry_kind(k: proto::EntryKind) -> EntryKind {
    match k {
        proto::EntryKind::File => EntryKind::File,
        proto::EntryKind::Dir => EntryKind::Dir,
        proto::EntryKind::Symlink => EntryKind::Symlink,
        proto::EntryKind::Other => EntryKind::Other,
    }
}

/// The wire form of an exec.
pub fn exec_request(spec: ExecSpec) -> proto::ExecRequest {
    proto::ExecRequest {
        argv: spec.command,
        env: spec.env.into_iter().collect(),
        cwd: spec.cwd,
        timeout_ms: u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
        stdin: spec.stdin,
    }
}

impl SandboxIo for KrunRuntime {
    async fn exec(
        &self,
        id: SandboxId,
        spec: ExecSpec,
        control: mpsc::Receiver<ExecControl>,
        out: mpsc::Sender<ExecOutput>,
    ) -> Result<ExecStatus, IoError> {
        spec.validate()?;
        let client = self.agent(id, "exec").await?;
        let bound = spec.timeout + EXEC_VERDICT_GRACE;
        let status = tokio::time::timeout(bound, client.exec(exec_request(spec), control, out))
            .await
            .map_err(|_| from_agent(id, "", ClientError::Timeout(bound)))?
            .map_err(|e| from_agent(id, "", e))?;
        Ok(ExecStatus {
            code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
            duration: Duration::from_millis(status.duration_ms),
        })
    }

    async fn read_file(
        &self,
        id: SandboxId,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> Result<u64, IoError> {
        check_path(&path)?;
        let client = self.agent(id, "read files").await?;
        client
            .read_file(path.clone(), out)
            .await
            .map_err(|e| from_agent(id, &path, e))
    }

    async fn write_file(
        &self,
        id: SandboxId,
        spec: WriteSpec,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<u64, IoError> {
        check_path(&spec.path)?;
        let client = self.agent(id, "write files").await?;
        let path = spec.path.clone();
        let request = proto::WriteRequest {
            path: spec.path,
            mode: spec.mode,
            make_parents: spec.make_parents,
        };
        client
            .write_file(request, data)
            .await
            .map_err(|e| from_agent(id, &path, e))
    }

    async fn list_dir(&self, id: SandboxId, path: String) -> Result<Listing, IoError> {
        check_path(&path)?;
        let client = self.agent(id, "list directories").await?;
        let (entries, truncated) = client
            .list_dir(path.clone())
            .await
            .map_err(|e| from_agent(id, &path, e))?;
        Ok(Listing {
            entries: entries
                .into_iter()
                .map(|e| DirEntry {
                    name: e.name,
                    kind: entry_kind(e.kind),
                    size: e.size,
                    mode: e.mode,
                    modified_ms: e.modified_ms,
                    uid: e.uid,
                    gid: e.gid,
                })
                .collect(),
            truncated,
        })
    }

    async fn download(
        &self,
        id: SandboxId,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> Result<u64, IoError> {
        check_path(&path)?;
        let client = self.agent(id, "download").await?;
        client
            .download(path.clone(), out)
            .await
            .map_err(|e| from_agent(id, &path, e))
    }

    async fn upload(
        &self,
        id: SandboxId,
        path: String,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<UploadStats, IoError> {
        check_path(&path)?;
        let client = self.agent(id, "upload").await?;
        let (files, bytes) = client
            .upload(path.clone(), data)
            .await
            .map_err(|e| from_agent(id, &path, e))?;
        Ok(UploadStats { files, bytes })
    }
}
