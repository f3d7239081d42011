//! crun as the container runtime drives it: every crun process runs in the right cgroup view
//! (on hybrid hosts, a private mount namespace without the v2 mount: see the module docs of
//! `container`), with a bounded time, and the shim that outlives the daemon.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::runtime::cgroup::CgroupLayout;
use crate::runtime::{RuntimeError, SandboxId};

/// How long one crun command (other than `run`) may take.
pub const CRUN_COMMAND_TIMEOUT_MS: u64 = 10_000;

/// `sh -c SHIM_SCRIPT NAME CRUN ROOT BUNDLE CID`: `crun run` in the foreground creates, starts
/// and waits for the container; its status is kept in `exit.code` for whichever daemon process
/// looks next. fd 3 (`init.status`) reaches surge-init, which writes there "ok" once the command
/// runs, or why it could not be executed: a start failure, told apart from an exit.
const SHIM_SCRIPT: &str = r#""$1" --root "$2" run --preserve-fds 1 --bundle "$3" --pid-file "$3/container.pid" "$4" 3>>"$3/init.status"; echo $? > "$3/exit.code""#;

/// The shim of a warm-pool sandbox (`pool`): the same as [`SHIM_SCRIPT`], plus fd 4, the pipe
/// the job's process arrives on (`spec.fifo`, opened read-write so neither side blocks), and
/// with the files it writes after the start named relative to its working directory, the
/// bundle: a placement renames the bundle to the sandbox's own directory while the shim runs.
const SHIM_SCRIPT_POOL: &str = r#""$1" --root "$2" run --preserve-fds 2 --bundle "$3" --pid-file "$3/container.pid" "$4" 3>>init.status 4<>spec.fifo; echo $? > exit.code"#;

/// The shim of a checkpointable sandbox: the same, with stdin, stdout and stderr as pipes (CRIU
/// cannot dump a host file's descriptor; see `checkpoint`). `$5` is `run` or `restore`; a
/// foreground `crun restore` waits for the restored container like `crun run` does.
const SHIM_SCRIPT_PIPED: &str = r#"b="$3"
if [ "$5" = restore ]; then
  set -- "$1" --root "$2" restore --network-lock skip --image-path "$b/checkpoint/image" --work-path "$b/checkpoint/work" --bundle "$b" --pid-file "$b/container.pid" "$4"
else
  set -- "$1" --root "$2" run --preserve-fds 1 --bundle "$b" --pid-file "$b/container.pid" "$4"
fi
{ { : | "$@" 3>>"$b/init.status"; echo $? > "$b/exit.code"; } 2>&1 1>&4 | cat >>"$b/stderr.log"; } 4>&1 | cat >>"$b/stdout.log""#;

/// How the shim starts the container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShimMode {
    /// `crun run`, stdio on the log files (Debian's crun: no checkpoints).
    Run,
    /// `crun run`, stdio through pipes (a checkpointable sandbox).
    RunPiped,
    /// `crun restore` from the sandbox's image, stdio through pipes.
    Restore,
    /// `crun run` of a warm-pool sandbox, stdio on the log files (see `pool`).
    Pool,
}

/// The crun binary, its state directory, and the cgroup view its processes get.
pub struct Crun {
    binary: PathBuf,
    root: PathBuf,
    /// For crun's private mount namespace on hybrid hosts (prepared before any fork).
    hide_unified: Option<CString>,
    /// `PATH` for crun's processes: the CRIU kit's `bin/` first (libcriu runs `criu` from PATH).
    path_env: Option<std::ffi::OsString>,
}

impl Crun {
    /// Check that `binary` runs; crun keeps its state in `root` (created).
    pub fn new(binary: &Path, root: PathBuf, layout: &CgroupLayout) -> Result<Self, RuntimeError> {
        let status = std::process::Command::new(binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            return Err(RuntimeError::Command {
                command: format!("{} --version", binary.display()),
                status: "not runnable".into(),
                stderr: "crun is required for the container runtime: apt-get install -y crun"
                    .into(),
            });
        }
        std::fs::create_dir_all(&root)
            .map_err(|e| RuntimeError::io(format!("create {}", root.display()), e))?;
        let hide_unified = match layout {
            CgroupLayout::V1 {
                hide_unified: Some(p),
                ..
            } => Some(CString::new(p.as_os_str().as_bytes()).map_err(|_| {
                RuntimeError::Cgroup(format!("cgroup mount path {} contains NUL", p.display()))
            })?),
            _ => None,
        };
        Ok(Self {
            binary: binary.to_owned(),
            root,
            hide_unified,
            path_env: None,
        })
    }

    /// Put `dir` first on the PATH of crun's processes.
    pub fn with_path_first(mut self, dir: &Path) -> Self {
        let mut path = dir.as_os_str().to_owned();
        path.push(":");
        path.push(
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        );
        self.path_env = Some(path);
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// crun's state directory (`--root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A crun command in the right cgroup view; `setsid` for the long-lived shim.
    pub fn command(&self, program: &OsStr, setsid: bool) -> Command {
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null()).kill_on_drop(false);
        if let Some(path) = &self.path_env {
            cmd.env("PATH", path);
        }
        let hide = self.hide_unified.clone();
        if hide.is_none() && !setsid {
            return cmd;
        }
        let root = c"/";
        // SAFETY: pre_exec's contract is that the closure runs in the forked child, where only
        // async-signal-safe work is allowed. It makes raw syscalls only (setsid, unshare, mount,
        // umount2, and errno reads for the errors), allocates nothing, and reads only memory
        // prepared before the fork: `hide` (a CString moved in) and the static `root`.
        unsafe {
            cmd.pre_exec(move || {
                if setsid && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(unified) = &hide {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let flags = libc::MS_REC | libc::MS_PRIVATE;
                    if libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::umount2(unified.as_ptr(), libc::MNT_DETACH) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    /// Run `crun --root R <args>` to completion.
    pub async fn run(&self, args: &[&OsStr]) -> Result<String, RuntimeError> {
        self.run_for(args, Duration::from_millis(CRUN_COMMAND_TIMEOUT_MS))
            .await
    }

    /// Run `crun --root R <args>` to completion within `limit`.
    pub async fn run_for(&self, args: &[&OsStr], limit: Duration) -> Result<String, RuntimeError> {
        let mut cmd = self.command(self.binary.as_os_str(), false);
        cmd.arg("--root")
            .arg(&self.root)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = format!(
            "crun {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| RuntimeError::Timeout {
                what: command.clone(),
                after_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            })?
            .map_err(|e| RuntimeError::io(format!("run {command}"), e))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(RuntimeError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// `crun delete --force CID`, for clean-up: its failure (no such container) is not an error.
    pub async fn delete_force(&self, cid: &str) {
        let _ = self
            .run(&[OsStr::new("delete"), OsStr::new("--force"), OsStr::new(cid)])
            .await;
    }

    /// Start the shim of a sandbox whose bundle is ready, in its own session (it outlives a
    /// daemon restart). Returns its pid; the child is not awaited: tokio reaps it when it exits,
    /// and the daemon follows it by pidfd.
    pub fn spawn_shim(
        &self,
        id: SandboxId,
        bundle: &Path,
        cid: &str,
        mode: ShimMode,
    ) -> Result<u32, RuntimeError> {
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(bundle.join(name))
                .map_err(|e| RuntimeError::io(format!("open {name} of sandbox {id}"), e))
        };
        let mut cmd = self.command(OsStr::new("/bin/sh"), true);
        let script = match mode {
            ShimMode::Run => SHIM_SCRIPT,
            ShimMode::Pool => SHIM_SCRIPT_POOL,
            ShimMode::RunPiped | ShimMode::Restore => SHIM_SCRIPT_PIPED,
        };
        cmd.arg("-c")
            .arg(script)
            .arg(format!("surge-shim-{id}"))
            .arg(&self.binary)
            .arg(&self.root)
            .arg(bundle)
            .arg(cid)
            .arg(if mode == ShimMode::Restore {
                "restore"
            } else {
                "run"
            })
            .current_dir(bundle)
            .stdout(open("stdout.log")?)
            .stderr(open("stderr.log")?);
        let child = cmd
            .spawn()
            .map_err(|e| RuntimeError::io(format!("spawn the shim of sandbox {id}"), e))?;
        child.id().ok_or_else(|| RuntimeError::StartFailed {
            id,
            reason: "the shim exited before its pid was known".into(),
            stderr_tail: String::new(),
        })
    }
}
