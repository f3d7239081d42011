//! Exec and files of a container sandbox ([`SandboxIo`]): the checks every call shares (the
//! sandbox runs and is not paused; at most [`EXECS_PER_SANDBOX_MAX`] execs at once), then
//! [`exec`](super::exec) for commands and [`files`](super::files) / [`tarball`](super::tarball)
//! for files, on a thread acting as the sandbox's user ([`as_sandbox_user`]).
//!
//! Everything an exec needs is derived from the bundle (`config.json`: user, env, cwd, rlimits;
//! `container.pid`: PID 1), so sandboxes re-adopted after a daemon restart take execs too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};

use super::exec::{self, ExecContext};
use super::files::{self, Piece};
use super::init::exec_args;
use super::resolve::{as_sandbox_user, open_sandbox_root, SandboxRoot};
use super::{container_id, container_pid, ContainerRuntime, Sandbox};
use crate::runtime::io::{
    check_path, ExecControl, ExecOutput, ExecSpec, ExecStatus, IoError, Listing, SandboxIo,
    UploadStats, WriteSpec, EXECS_PER_SANDBOX_MAX,
};
use crate::runtime::sandbox_dir::{lock, read_json};
use crate::runtime::{ObservedState, SandboxId};

/// Chunks of a write or an upload in flight between the caller and the writing thread.
const PIECES_IN_FLIGHT: usize = 4;

/// One sandbox's exec slots and context, for one incarnation (generation).
pub struct PerSandbox {
    generation: u64,
    execs: Arc<Semaphore>,
    ctx: ExecContext,
}

/// Per-sandbox I/O state of the runtime; an entry is dropped when its sandbox is forgotten.
#[derive(Default)]
pub struct IoState {
    sandboxes: Mutex<HashMap<SandboxId, Arc<PerSandbox>>>,
}

impl IoState {
    pub fn forget(&self, id: SandboxId) {
        lock(&self.sandboxes).remove(&id);
    }
}

impl ContainerRuntime {
    /// A sandbox that runs (not starting, paused or ended) and its I/O state.
    pub(super) async fn running(
        &self,
        id: SandboxId,
    ) -> Result<(Arc<Sandbox>, Arc<PerSandbox>), IoError> {
        let sb = self.get(id).map_err(|_| IoError::NoSandbox(id))?;
        let state = self
            .sandboxes
            .state_of(self, &sb)
            .await
            .map_err(|e| IoError::Runtime(e.to_string()))?;
        if state != ObservedState::Running {
            return Err(IoError::NotRunning {
                id,
                state: format!("{state:?}").to_lowercase(),
            });
        }
        let generation = sb.record().generation;
        if let Some(p) = lock(&self.io.sandboxes).get(&id) {
            if p.generation == generation {
                return Ok((sb, p.clone()));
            }
        }
        let config =
            read_json(&sb.file("config.json")).map_err(|e| IoError::Runtime(e.to_string()))?;
        let per = Arc::new(PerSandbox {
            generation,
            execs: Arc::new(Semaphore::new(EXECS_PER_SANDBOX_MAX)),
            ctx: ExecContext::from_config(&config)?,
        });
        lock(&self.io.sandboxes).insert(id, per.clone());
        Ok((sb, per))
    }

    /// The root of a running sandbox, for one file operation.
    async fn root(&self, id: SandboxId) -> Result<SandboxRoot, IoError> {
        let (sb, per) = self.running(id).await?;
        let pid = container_pid(&sb).ok_or_else(|| IoError::NotRunning {
            id,
            state: "starting".into(),
        })?;
        Ok(SandboxRoot {
            root: open_sandbox_root(pid, &sb.cgroup.crun_path)?,
            uid: per.ctx.uid,
            gid: per.ctx.gid,
        })
    }

    /// `crun --root R exec --process FILE ID` running `argv` in a running sandbox exactly as a
    /// user of crun would (the sandbox's user, env, cwd and rlimits, no capabilities,
    /// no_new_privs; no surge-init wrapper, no control socket): the anchor `surge bench exec`
    /// compares exec through the API with. Its stdio is the caller's to set.
    pub async fn crun_exec_command(
        &self,
        id: SandboxId,
        argv: &[String],
    ) -> Result<std::process::Command, IoError> {
        if argv.is_empty() {
            return Err(IoError::Invalid("an exec needs a command".into()));
        }
        let (sb, per) = self.running(id).await?;
        exec::anchor_command(&self.crun, &container_id(id), &sb.dir, &per.ctx, argv)
    }
}

/// Forward `data` to a writing thread as [`Piece`]s, then [`Piece::End`]; stops early when
/// the thread stopped (its result says why).
async fn forward(mut data: mpsc::Receiver<Bytes>, tx: mpsc::Sender<Piece>) {
    while let Some(b) = data.recv().await {
        if tx.send(Piece::Data(b)).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Piece::End).await;
}

/// Run a writing thread fed by `data`: its result as soon as it has one.
async fn feed<T: Send + 'static>(
    data: mpsc::Receiver<Bytes>,
    root: SandboxRoot,
    work: impl FnOnce(&SandboxRoot, &mut mpsc::Receiver<Piece>) -> Result<T, IoError> + Send + 'static,
) -> Result<T, IoError> {
    let (tx, mut rx) = mpsc::channel(PIECES_IN_FLIGHT);
    let (uid, gid) = (root.uid, root.gid);
    let worker = as_sandbox_user(uid, gid, move || work(&root, &mut rx));
    tokio::pin!(worker);
    tokio::select! {
        r = &mut worker => return r,
        () = forward(data, tx) => {}
    }
    worker.await
}

impl SandboxIo for ContainerRuntime {
    async fn exec(
        &self,
        id: SandboxId,
        spec: ExecSpec,
        control: mpsc::Receiver<ExecControl>,
        out: mpsc::Sender<ExecOutput>,
    ) -> Result<ExecStatus, IoError> {
        spec.validate()?;
        let (sb, per) = self.running(id).await?;
        if !per.ctx.has_init {
            return Err(IoError::Unsupported(
                "exec into a sandbox started by a surge without surge-init (restart the sandbox)",
            ));
        }
        let _slot = per.execs.clone().try_acquire_owned().map_err(|_| {
            IoError::Busy(format!(
                "sandbox {id} already runs {EXECS_PER_SANDBOX_MAX} execs; wait for one to end"
            ))
        })?;
        let process = exec::process_spec(
            &per.ctx,
            &exec_args(&spec.command),
            &spec.env,
            spec.cwd.as_deref(),
        );
        exec::run(
            &self.crun,
            &container_id(id),
            &sb.dir,
            &process,
            &spec,
            control,
            out,
        )
        .await
    }

    async fn read_file(
        &self,
        id: SandboxId,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> Result<u64, IoError> {
        check_path(&path)?;
        let root = self.root(id).await?;
        let (uid, gid) = (root.uid, root.gid);
        as_sandbox_user(uid, gid, move || files::read_file(&root, &path, &out)).await
    }

    async fn write_file(
        &self,
        id: SandboxId,
        spec: WriteSpec,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<u64, IoError> {
        check_path(&spec.path)?;
        let root = self.root(id).await?;
        feed(data, root, move |root, rx| {
            files::write_file(root, &spec, rx)
        })
        .await
    }

    async fn list_dir(&self, id: SandboxId, path: String) -> Result<Listing, IoError> {
        check_path(&path)?;
        let root = self.root(id).await?;
        let (uid, gid) = (root.uid, root.gid);
        as_sandbox_user(uid, gid, move || files::list_dir(&root, &path)).await
    }

    async fn download(
        &self,
        id: SandboxId,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> Result<u64, IoError> {
        check_path(&path)?;
        let root = self.root(id).await?;
        let (uid, gid) = (root.uid, root.gid);
        as_sandbox_user(uid, gid, move || {
            super::tarball::download(&root, &path, &out)
        })
        .await
    }

    async fn snapshot(
        &self,
        id: SandboxId,
        templates: crate::template::Templates,
        name: String,
    ) -> Result<crate::runtime::io::SnapshotStats, IoError> {
        self.snapshot_rootfs(id, templates, name).await
    }

    async fn upload(
        &self,
        id: SandboxId,
        path: String,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<UploadStats, IoError> {
        check_path(&path)?;
        let root = self.root(id).await?;
        feed(data, root, move |root, rx| {
            super::tarball::upload(root, &path, rx)
        })
        .await
    }
}
