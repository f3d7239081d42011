//! The supervised sandbox: what the container and krun runtimes share about a sandbox that is one
//! host process (crun's shim, or the VMM) plus a directory of files.
//!
//! ```text
//!  record file (meta.json | state.json)   Record: id, generation, revision, resources, spec,
//!                                         paused, and the runtime's extra fields (its pid ...)
//!  <running marker>                       written once the sandbox runs (container.pid, entered)
//!  final.json                             how it ended, fixed once observed (`Final`)
//! ```
//!
//! A sandbox's state is decided from those files and the process's liveness, never from memory
//! alone, so a new daemon process re-adopts what an earlier one started: `final.json` present ->
//! its verdict; process alive (pid *and* start time match, so a recycled pid is not mistaken for
//! it) -> starting, running or paused; otherwise it ended and the runtime's [`Supervisor::verdict`]
//! decides how, once, and the verdict is written down.
//!
//! [`Sandboxes`] holds the records of one runtime and implements the operations both runtimes
//! answer the same way (`get` with re-adoption, `list`, the terminal check of `remove`, finalize,
//! state, exit report, waiting for a start). Each runtime implements [`Supervisor`] for what
//! differs: its record's extra fields, its cgroup, its logs and its verdict.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::sandbox_dir::{
    clear_debris, is_mount_point, lock, read_json, release_mounts, sandbox_ids, write_json_atomic,
    Final,
};
use super::{
    read_tail, ExitReport, ObservedSandbox, ObservedState, Resources, RuntimeError, SandboxId,
    SandboxSpec, LOG_TAIL_MAX_BYTES,
};

/// Bytes of the start log quoted in a failed start's error.
const START_ERROR_TAIL_BYTES: usize = 4096;

/// What a runtime keeps in its record beyond the common fields.
pub trait RecordExtra:
    Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The supervised process: pid and start time (clock ticks since boot); `(0, 0)` before
    /// it is spawned.
    fn process(&self) -> (u32, u64);
    fn set_process(&mut self, pid: u32, start_ticks: u64);
}

/// A runtime's persistent record of one sandbox. The runtime's own fields are flattened into
/// the same JSON object, so the file keeps the layout each runtime wrote before this type.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record<X> {
    pub id: SandboxId,
    pub generation: u64,
    pub revision: u64,
    pub resources: Resources,
    pub spec: SandboxSpec,
    pub paused: bool,
    #[serde(flatten)]
    pub extra: X,
}

/// What differs between the runtimes that supervise a process per sandbox.
pub trait Supervisor: Send + Sync + Sized + 'static {
    type Extra: RecordExtra;
    type Cgroup: Send + Sync + 'static;
    /// The runtime's name in `NotFound` errors.
    const RUNTIME: &'static str;
    /// What a sandbox is called in messages ("sandbox", "VM").
    const NOUN: &'static str;
    /// The record's file name in the sandbox's directory.
    const RECORD_FILE: &'static str;
    /// Files whose tails an exit report carries as stdout and stderr.
    const STDOUT_LOG: &'static str;
    const STDERR_LOG: &'static str;
    const START_TIMEOUT_MS: u64;
    /// Longest pause between two looks at a starting sandbox: the latency a start may gain.
    const START_POLL_MAX_MS: u64;

    fn cgroup(&self, record: &Record<Self::Extra>) -> Self::Cgroup;

    /// A state the runtime decides before liveness does (a checkpointed sandbox has no process
    /// and has not ended); `None` for the usual rules.
    fn held_state(_sb: &Supervised<Self>) -> Option<ObservedState> {
        None
    }

    /// A live sandbox found on disk by a new daemon process: resume watching it.
    fn readopt(&self, sb: &Arc<Supervised<Self>>);

    /// The pid to report once the sandbox runs; `None` while it is still starting.
    fn started_pid(sb: &Supervised<Self>) -> Option<u32>;

    /// How it ended. Called once its process is gone, at most once per daemon process
    /// (the result is written to `final.json`).
    fn verdict(
        &self,
        sb: &Supervised<Self>,
    ) -> impl Future<Output = Result<Final, RuntimeError>> + Send;
}

/// One sandbox of a runtime, loaded in memory.
pub struct Supervised<S: Supervisor> {
    pub id: SandboxId,
    pub dir: PathBuf,
    pub cgroup: S::Cgroup,
    record: Mutex<Record<S::Extra>>,
    ended: Mutex<Option<Final>>,
    /// Set while this daemon process watches the sandbox's end (v1 OOM watcher, VMM waiter);
    /// turns `true` when the watcher has recorded what it saw.
    pub watcher: Mutex<Option<watch::Receiver<bool>>>,
}

impl<S: Supervisor> Supervised<S> {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn record(&self) -> Record<S::Extra> {
        lock(&self.record).clone()
    }

    /// Change the record and write it down before anyone sees the change.
    pub fn update(&self, f: impl FnOnce(&mut Record<S::Extra>)) -> Result<(), RuntimeError> {
        let mut r = lock(&self.record);
        f(&mut r);
        write_json_atomic(&self.file(S::RECORD_FILE), &*r)
    }

    /// The supervised process still runs (the same process: pid and start time match).
    pub fn alive(&self) -> bool {
        let (pid, ticks) = lock(&self.record).extra.process();
        pid != 0 && process_start_ticks(pid) == Some(ticks)
    }

    pub fn observed(&self, state: ObservedState) -> ObservedSandbox {
        let r = lock(&self.record);
        ObservedSandbox {
            id: self.id,
            generation: r.generation,
            revision: r.revision,
            state,
            resources: r.resources,
            owned: false,
        }
    }

    /// The watcher's receiver, if this process watches the sandbox.
    pub fn watcher(&self) -> Option<watch::Receiver<bool>> {
        lock(&self.watcher).clone()
    }
}

/// The sandboxes of one runtime: the directories under `dir` and their in-memory copies.
pub struct Sandboxes<S: Supervisor> {
    dir: PathBuf,
    loaded: Mutex<HashMap<SandboxId, Arc<Supervised<S>>>>,
}

impl<S: Supervisor> Sandboxes<S> {
    /// Records live in `dir/<JOB.INDEX>/`; `dir` is created.
    pub fn new(dir: PathBuf) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| RuntimeError::io(format!("create {}", dir.display()), e))?;
        Ok(Self {
            dir,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir_of(&self, id: SandboxId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn supervised(&self, sup: &S, record: Record<S::Extra>) -> Supervised<S> {
        Supervised {
            id: record.id,
            dir: self.dir_of(record.id),
            cgroup: sup.cgroup(&record),
            record: Mutex::new(record),
            ended: Mutex::new(None),
            watcher: Mutex::new(None),
        }
    }

    /// The in-memory record, loading it from disk (re-adoption) after a daemon restart.
    pub fn get(&self, sup: &S, id: SandboxId) -> Result<Arc<Supervised<S>>, RuntimeError> {
        if let Some(sb) = lock(&self.loaded).get(&id) {
            return Ok(sb.clone());
        }
        let path = self.dir_of(id).join(S::RECORD_FILE);
        if !path.is_file() {
            return Err(RuntimeError::NotFound {
                id,
                runtime: S::RUNTIME,
            });
        }
        let sb = Arc::new(self.supervised(sup, read_json(&path)?));
        if let Ok(f) = read_json::<Final>(&sb.file("final.json")) {
            *lock(&sb.ended) = Some(f);
        } else if sb.alive() {
            sup.readopt(&sb);
        }
        Ok(lock(&self.loaded).entry(id).or_insert(sb).clone())
    }

    /// Before a start: refuse a second incarnation, clear debris of a start that died half-way
    /// (a directory without its record). Returns the sandbox's directory.
    pub fn begin_start(&self, sup: &S, id: SandboxId) -> Result<PathBuf, RuntimeError> {
        if let Ok(existing) = self.get(sup, id) {
            return Err(RuntimeError::AlreadyExists {
                id,
                generation: existing.record().generation,
            });
        }
        let dir = self.dir_of(id);
        clear_debris(&dir)?;
        Ok(dir)
    }

    /// Stop holding a sandbox in memory (its directory was removed: a warm-pool sandbox that
    /// could not be taken).
    pub fn forget_loaded(&self, id: SandboxId) {
        lock(&self.loaded).remove(&id);
    }

    /// Hold a sandbox whose record was just written; from here on it is reported (a failed
    /// start is a terminal `Failed`).
    pub fn insert(&self, sup: &S, record: Record<S::Extra>) -> Arc<Supervised<S>> {
        let sb = Arc::new(self.supervised(sup, record));
        lock(&self.loaded).insert(sb.id, sb.clone());
        sb
    }

    /// Fix how a sandbox ended once its process is gone: the runtime's verdict, written to
    /// `final.json`; the root's mount is not needed any more (the writes stay in `upper/`).
    pub async fn finalize(&self, sup: &S, sb: &Supervised<S>) -> Result<Final, RuntimeError> {
        if let Some(f) = lock(&sb.ended).clone() {
            return Ok(f);
        }
        let f = sup.verdict(sb).await?;
        write_json_atomic(&sb.file("final.json"), &f)?;
        release_mounts(&sb.dir);
        *lock(&sb.ended) = Some(f.clone());
        Ok(f)
    }

    pub async fn state_of(
        &self,
        sup: &S,
        sb: &Supervised<S>,
    ) -> Result<ObservedState, RuntimeError> {
        if let Some(f) = lock(&sb.ended).clone() {
            return Ok(f.state);
        }
        if let Some(state) = S::held_state(sb) {
            return Ok(state);
        }
        if sb.alive() {
            return Ok(match (S::started_pid(sb), sb.record().paused) {
                (None, _) => ObservedState::Starting,
                (Some(_), true) => ObservedState::Paused,
                (Some(_), false) => ObservedState::Running,
            });
        }
        Ok(self.finalize(sup, sb).await?.state)
    }

    /// Fix how a sandbox ended without asking the verdict (a checkpointed sandbox stopped).
    pub fn settle(&self, sb: &Supervised<S>, f: Final) -> Result<(), RuntimeError> {
        write_json_atomic(&sb.file("final.json"), &f)?;
        release_mounts(&sb.dir);
        *lock(&sb.ended) = Some(f);
        Ok(())
    }

    pub async fn report(&self, sup: &S, sb: &Supervised<S>) -> Result<ExitReport, RuntimeError> {
        let f = self.finalize(sup, sb).await?;
        Ok(ExitReport {
            id: sb.id,
            generation: sb.record().generation,
            state: f.state,
            code: f.code,
            stdout_tail: read_tail(&sb.file(S::STDOUT_LOG), LOG_TAIL_MAX_BYTES)?,
            stderr_tail: read_tail(&sb.file(S::STDERR_LOG), LOG_TAIL_MAX_BYTES)?,
        })
    }

    /// A sandbox that runs or is paused; `operation` names what the caller wants to do.
    pub async fn live(
        &self,
        sup: &S,
        id: SandboxId,
        operation: &'static str,
    ) -> Result<Arc<Supervised<S>>, RuntimeError> {
        let sb = self.get(sup, id)?;
        match self.state_of(sup, &sb).await? {
            ObservedState::Running | ObservedState::Paused => Ok(sb),
            state => Err(RuntimeError::WrongState {
                id,
                state,
                operation,
            }),
        }
    }

    /// Wait until the sandbox runs (its pid) or its process gives up (`StartFailed` with the
    /// runtime's reason).
    pub async fn await_started(&self, sup: &S, sb: &Supervised<S>) -> Result<u32, RuntimeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(S::START_TIMEOUT_MS);
        let mut delay = Duration::from_micros(500);
        loop {
            // Started first: a short command may have run and ended already; that is a
            // successful start whose exit `wait` reports.
            if let Some(pid) = S::started_pid(sb) {
                return Ok(pid);
            }
            if !sb.alive() {
                if let Some(pid) = S::started_pid(sb) {
                    return Ok(pid); // started and ended between the two looks
                }
                let f = self.finalize(sup, sb).await?;
                let reason = match f.state {
                    ObservedState::Failed { reason } => reason,
                    other => format!(
                        "the {} ended before it was seen running: {other:?}",
                        S::NOUN
                    ),
                };
                return Err(RuntimeError::StartFailed {
                    id: sb.id,
                    reason,
                    stderr_tail: read_tail(&sb.file(S::STDERR_LOG), START_ERROR_TAIL_BYTES)?,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Timeout {
                    what: format!("start of {} {}", S::NOUN, sb.id),
                    after_ms: S::START_TIMEOUT_MS,
                });
            }
            tokio::time::sleep(delay).await;
            // A stat every few ms at most: cheap, and adds at most that to the start latency.
            delay = (delay * 2).min(Duration::from_millis(S::START_POLL_MAX_MS));
        }
    }

    /// Every sandbox with a record, in id order.
    pub async fn list(&self, sup: &S) -> Result<Vec<ObservedSandbox>, RuntimeError> {
        let mut out = Vec::new();
        for id in sandbox_ids(&self.dir)? {
            match self.get(sup, id) {
                Ok(sb) => {
                    let state = self.state_of(sup, &sb).await?;
                    out.push(sb.observed(state));
                }
                Err(RuntimeError::NotFound { .. }) => {} // debris without a record; cleared on start
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|o| o.id);
        Ok(out)
    }

    /// The first half of a `remove`: the sandbox, if it has ended (else `WrongState`).
    pub async fn ended(&self, sup: &S, id: SandboxId) -> Result<Arc<Supervised<S>>, RuntimeError> {
        let sb = self.get(sup, id)?;
        let state = self.state_of(sup, &sb).await?;
        if !state.is_terminal() {
            return Err(RuntimeError::WrongState {
                id,
                state,
                operation: "forget",
            });
        }
        Ok(sb)
    }

    /// The second half of a `remove`, once the runtime released its own resources: unmount the
    /// root, delete the directory, forget the record. A root still mounted is never deleted
    /// through (that would delete the sandbox's writes through the mount, or worse).
    pub fn delete(&self, sb: &Supervised<S>) -> Result<(), RuntimeError> {
        let rootfs = sb.file("rootfs");
        release_mounts(&sb.dir);
        if is_mount_point(&rootfs) {
            return Err(RuntimeError::Cgroup(format!(
                "{} is still mounted; not deleting the {} directory",
                rootfs.display(),
                S::NOUN
            )));
        }
        std::fs::remove_dir_all(&sb.dir)
            .map_err(|e| RuntimeError::io(format!("remove {}", sb.dir.display()), e))?;
        lock(&self.loaded).remove(&sb.id);
        Ok(())
    }
}

// ---- processes ----

/// Start time (clock ticks since boot, field 22) of a `/proc/PID/stat` line; `None` for a zombie
/// or dead process, which for our purposes has exited.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Start time of a process that has not exited (zombies count as exited).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    parse_start_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A pidfd of `pid`: signals through it and waits on it reach that process even after its pid
/// is recycled. Check the start time after opening it to know it is the process you meant.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and a flags integer, passes no pointer and returns a new fd
    // or -1; it cannot touch our memory.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "fd out of range"))?;
    // SAFETY: `fd` is a descriptor pidfd_open just created for us (checked >= 0); nothing else
    // holds it, so the OwnedFd is its only owner and closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
