//! Exec into a container sandbox: `crun exec --process FILE --preserve-fds=1 ID`.
//!
//! Plain `crun exec ID CMD` ignores the bundle's process: it runs the command as uid 0 with
//! no_new_privs 0. The process file given here is the sandbox's own (user, environment, cwd,
//! rlimits, taken from its `config.json`, so a re-adopted sandbox works the same) with no
//! capabilities at all and no_new_privs, and the exec's command, env and cwd.
//!
//! The process crun starts is surge-init in its exec mode (see `node/init/surge-init.c`), with
//! a socket to the node on fd 3. It runs the command in a new session (a well-defined process
//! group), is its children's subreaper, and on "k" (timeout, cancel) or end of file on the
//! socket (the exec future dropped, the node gone) kills the group and every descendant and
//! reaps them. PID 1 (also surge-init) reaps whatever is orphaned past it. The node learns the
//! command's status from the socket ("x CODE SIGNAL"), so a signal is told from an exit code,
//! and an error of crun itself (nothing said "r" on the socket) from a failing command.
//!
//! `crun exec` runs without the private mount namespace `crun run` needs on hybrid cgroup hosts
//! (see the module docs of `container`): it joins the running container's namespaces and
//! cgroups by pid and creates no cgroup, which works on this hybrid host and saves copying the
//! mount table for every exec.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::crun::Crun;
use super::init::INIT_IN_SANDBOX;
use crate::runtime::io::{ExecControl, ExecOutput, ExecSpec, ExecStatus, IoError, CHUNK_BYTES};

/// After the command's status is known: how long output still held by its background
/// processes is waited for.
pub const EXEC_DRAIN_MS: u64 = 100;
/// After a kill was asked: how long the wrapper may take to report before crun exec is killed.
pub const EXEC_KILL_WAIT_MS: u64 = 5_000;
/// Bytes of stderr held until the wrapper runs (crun's own errors come before it).
const HELD_STDERR_MAX: usize = CHUNK_BYTES;
/// Bytes the wrapper may say on the control socket ("r\n", "x CODE SIGNAL\n").
const CONTROL_BYTES_MAX: usize = 256;

/// What an exec needs of its sandbox, read once from the bundle's `config.json`.
#[derive(Clone, Debug)]
pub struct ExecContext {
    pub uid: u32,
    pub gid: u32,
    user: Value,
    env: Vec<String>,
    cwd: String,
    rlimits: Value,
    /// surge-init is mounted (sandboxes started by an older surge have no wrapper).
    pub has_init: bool,
}

impl ExecContext {
    pub fn from_config(config: &Value) -> Result<Self, IoError> {
        let bad =
            |what: &str| IoError::Runtime(format!("the sandbox's config.json has no valid {what}"));
        let process = &config["process"];
        let user = process["user"].clone();
        let id = |k: &str| {
            user[k]
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(&format!("process.user.{k}")))
        };
        let env = process["env"]
            .as_array()
            .ok_or_else(|| bad("process.env"))?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let has_init = config["mounts"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["destination"] == INIT_IN_SANDBOX));
        Ok(Self {
            uid: id("uid")?,
            gid: id("gid")?,
            env,
            cwd: process["cwd"].as_str().unwrap_or("/").to_owned(),
            rlimits: process.get("rlimits").cloned().unwrap_or_else(|| json!([])),
            user,
            has_init,
        })
    }
}

/// The sandbox's environment with the exec's variables added (an exec's value wins).
pub fn merge_env(base: &[String], extra: &BTreeMap<String, String>) -> Vec<String> {
    let mut out: Vec<String> = base
        .iter()
        .filter(|kv| {
            let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            !extra.contains_key(key)
        })
        .cloned()
        .collect();
    out.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    out
}

/// The OCI process of one exec: the sandbox's user, rlimits and environment, no capability,
/// no_new_privs. `args` is the full argv (the wrapper and the command, or the bare command).
pub fn process_spec(
    ctx: &ExecContext,
    args: &[String],
    spec_env: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> Value {
    let none: [&str; 0] = [];
    json!({
        "terminal": false,
        "user": ctx.user,
        "args": args,
        "env": merge_env(&ctx.env, spec_env),
        "cwd": cwd.unwrap_or(&ctx.cwd),
        "capabilities": { "bounding": none, "effective": none, "permitted": none, "inheritable": none, "ambient": none },
        "noNewPrivileges": true,
        "rlimits": ctx.rlimits,
    })
}

/// A process file in the bundle's `exec/` directory, removed when dropped.
pub struct ProcessFile(PathBuf);

impl ProcessFile {
    pub fn write(bundle: &Path, name: Option<&str>, process: &Value) -> Result<Self, IoError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = bundle.join("exec");
        std::fs::create_dir_all(&dir)
            .map_err(|e| IoError::io(format!("create {}", dir.display()), e))?;
        let path = match name {
            Some(n) => dir.join(n),
            None => dir.join(format!("{}.json", NEXT.fetch_add(1, Ordering::Relaxed))),
        };
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(process)
            .map_err(|e| IoError::Runtime(format!("encode the exec's process: {e}")))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| IoError::io(format!("write {}", path.display()), e))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Keep the file (the benchmark's anchor command reads it after this returns).
    pub fn keep(self) -> PathBuf {
        let p = self.0.clone();
        std::mem::forget(self);
        p
    }
}

impl Drop for ProcessFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the wrapper said on the control socket.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WrapperReport {
    pub started: bool,
    /// (code, signal) of the command.
    pub status: Option<(i32, i32)>,
}

/// Parse the wrapper's complete lines (pure); unknown lines are ignored.
pub fn parse_report(text: &str, report: &mut WrapperReport) {
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("r") => report.started = true,
            Some("x") => {
                let code = f.next().and_then(|v| v.parse().ok());
                let sig = f.next().and_then(|v| v.parse().ok());
                if let (Some(c), Some(s)) = (code, sig) {
                    report.status = Some((c, s));
                }
            }
            _ => {}
        }
    }
}

/// Forward the caller's stdin and signals while the exec runs; ends when `control` closes
/// (which closes the command's stdin).
async fn pump_control(
    mut control: mpsc::Receiver<ExecControl>,
    mut stdin: Option<tokio::process::ChildStdin>,
    signals: mpsc::Sender<i32>,
) {
    while let Some(msg) = control.recv().await {
        match msg {
            ExecControl::Stdin(b) => {
                if let Some(s) = stdin.as_mut() {
                    if s.write_all(&b).await.is_err() {
                        stdin = None; // the command closed its stdin
                    }
                }
            }
            ExecControl::CloseStdin => stdin = None,
            ExecControl::Signal(n) => {
                if signals.send(n).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// `fd` moved to a descriptor number of 3 or more (close-on-exec).
fn above_stdio(fd: std::os::fd::OwnedFd) -> Result<std::os::fd::OwnedFd, IoError> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new descriptor or -1; no memory
    // is touched.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(IoError::io(
            "move the exec's control socket",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `dup` is a new descriptor just returned to us (checked >= 0), owned by nothing else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) })
}

/// Run one exec to its end. `process` is [`process_spec`] with the wrapper's argv.
pub async fn run(
    crun: &Crun,
    cid: &str,
    bundle: &Path,
    process: &Value,
    spec: &ExecSpec,
    control: mpsc::Receiver<ExecControl>,
    out: mpsc::Sender<ExecOutput>,
) -> Result<ExecStatus, IoError> {
    let started_at = Instant::now();
    let file = ProcessFile::write(bundle, None, process)?;
    let (host, wrapper) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| IoError::io("create the exec's control socket", e))?;
    // Above the stdio descriptors, which the child's stdio setup overwrites before `pre_exec`
    // runs (a daemon started with a closed stdin could get the socket as fd 0).
    let wrapper = above_stdio(std::os::fd::OwnedFd::from(wrapper))?;
    let mut cmd = tokio::process::Command::new(crun.binary());
    cmd.arg("--root")
        .arg(crun.root())
        .arg("exec")
        .arg("--process")
        .arg(file.path())
        .arg("--preserve-fds=1")
        .arg(cid)
        .stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    let fd = wrapper.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: dup2 and fcntl on plain integers. `fd` is the wrapper's end of the
    // socket, open in the child (it is close-on-exec, hence the dup to fd 3 without the flag).
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| IoError::io(format!("run {} exec", crun.binary().display()), e))?;
    drop(wrapper);
    host.set_nonblocking(true)
        .map_err(|e| IoError::io("set up the exec's control socket", e))?;
    let host = tokio::net::UnixStream::from_std(host)
        .map_err(|e| IoError::io("set up the exec's control socket", e))?;
    let (mut ctl_in, mut ctl_out) = host.into_split();
    let (sig_tx, mut sig_rx) = mpsc::channel::<i32>(8);
    let _pump = AbortOnDrop(tokio::spawn(pump_control(
        control,
        child.stdin.take(),
        sig_tx,
    )));
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| IoError::Runtime("no stdout pipe".into()))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| IoError::Runtime("no stderr pipe".into()))?;

    let mut queue: VecDeque<ExecOutput> = VecDeque::new();
    let mut held = Vec::new();
    let mut report = WrapperReport::default();
    let mut said = Vec::new();
    let (mut out_open, mut err_open, mut ctl_open, mut sig_open) = (true, true, true, true);
    let mut exited: Option<std::process::ExitStatus> = None;
    let (mut timed_out, mut killed) = (false, false);
    let timeout = tokio::time::sleep_until(started_at + spec.timeout);
    tokio::pin!(timeout);
    let far = started_at + spec.timeout + Duration::from_secs(24 * 3600);
    let drain = tokio::time::sleep_until(far);
    tokio::pin!(drain);
    let kill_wait = tokio::time::sleep_until(far);
    tokio::pin!(kill_wait);
    let mut obuf = vec![0u8; CHUNK_BYTES];
    let mut ebuf = vec![0u8; CHUNK_BYTES];
    let mut cbuf = [0u8; 64];
    loop {
        let finished = exited.is_some() && !out_open && !err_open && !ctl_open;
        if finished && queue.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            () = out.closed() => {
                // Cancelled: the wrapper kills the tree on "k" (and on the socket closing).
                let _ = ctl_out.write_all(b"k\n").await;
                drop(ctl_out);
                let _ = tokio::time::timeout(Duration::from_millis(EXEC_KILL_WAIT_MS), child.wait()).await;
                return Err(super::files::caller_gone());
            }
            () = &mut timeout, if !killed => {
                let _ = ctl_out.write_all(b"k\n").await;
                killed = true;
                timed_out = true;
                kill_wait.as_mut().reset(Instant::now() + Duration::from_millis(EXEC_KILL_WAIT_MS));
            }
            () = &mut kill_wait, if exited.is_none() => {
                // The wrapper did not answer (killed by the sandbox itself?): end crun exec.
                let _ = child.start_kill();
                kill_wait.as_mut().reset(far);
            }
            () = &mut drain, if exited.is_some() => {
                // Background processes still hold the pipes: stop reading, send what is queued.
                (out_open, err_open, ctl_open) = (false, false, false);
                drain.as_mut().reset(far);
            }
            permit = out.reserve(), if !queue.is_empty() => {
                let Ok(permit) = permit else { continue };
                if let Some(o) = queue.pop_front() {
                    permit.send(o);
                }
            }
            n = stdout.read(&mut obuf), if queue.is_empty() && out_open => match n {
                Ok(n) if n > 0 => queue.push_back(ExecOutput::Stdout(Bytes::copy_from_slice(&obuf[..n]))),
                _ => out_open = false,
            },
            n = stderr.read(&mut ebuf), if queue.is_empty() && err_open && (report.started || held.len() < HELD_STDERR_MAX) => match n {
                Ok(n) if n > 0 && report.started => queue.push_back(ExecOutput::Stderr(Bytes::copy_from_slice(&ebuf[..n]))),
                Ok(n) if n > 0 => held.extend_from_slice(&ebuf[..n]),
                _ => err_open = false,
            },
            n = ctl_in.read(&mut cbuf), if ctl_open => match n {
                Ok(n) if n > 0 && said.len() < CONTROL_BYTES_MAX => {
                    said.extend_from_slice(&cbuf[..n]);
                    let complete = said.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                    let was_started = report.started;
                    parse_report(&String::from_utf8_lossy(&said[..complete]), &mut report);
                    said.drain(..complete);
                    if report.started && !was_started && !held.is_empty() {
                        queue.push_back(ExecOutput::Stderr(Bytes::from(std::mem::take(&mut held))));
                    }
                }
                Ok(n) if n > 0 => {}
                _ => ctl_open = false,
            },
            sig = sig_rx.recv(), if sig_open => match sig {
                Some(n) => {
                    let _ = ctl_out.write_all(format!("s {n}\n").as_bytes()).await;
                }
                None => sig_open = false,
            },
            st = child.wait(), if exited.is_none() => {
                exited = Some(st.map_err(|e| IoError::io("wait for crun exec", e))?);
                drain.as_mut().reset(Instant::now() + Duration::from_millis(EXEC_DRAIN_MS));
            }
        }
    }
    drop(file);
    let crun_status = exited.unwrap_or_default();
    if !report.started {
        return Err(IoError::Runtime(format!(
            "crun exec failed ({crun_status}): {}",
            String::from_utf8_lossy(&held).trim()
        )));
    }
    let (code, signal) = match report.status {
        Some((code, sig)) => (code, (sig > 0).then_some(sig)),
        // The wrapper died without a word (killed from inside the sandbox, or with it).
        None => (crun_status.code().unwrap_or(137), None),
    };
    Ok(ExecStatus {
        code,
        signal,
        timed_out,
        duration: started_at.elapsed(),
    })
}

/// `crun --root R exec --process FILE ID` for `argv`, as a user of crun would run it by hand:
/// the sandbox's user, env, cwd and rlimits, no capabilities, no_new_privs, and no surge-init
/// wrapper. The benchmark's anchor (`surge bench exec`).
pub fn anchor_command(
    crun: &Crun,
    cid: &str,
    bundle: &Path,
    ctx: &ExecContext,
    argv: &[String],
) -> Result<std::process::Command, IoError> {
    let process = process_spec(ctx, argv, &BTreeMap::new(), None);
    let file = ProcessFile::write(bundle, Some("anchor.json"), &process)?.keep();
    let mut cmd = std::process::Command::new(crun.binary());
    cmd.arg("--root")
        .arg(crun.root())
        .arg("exec")
        .arg("--process")
        .arg(file)
        .arg(cid);
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::container::init::exec_args;

    #[test]
    fn exec_process_keeps_the_sandbox_user_and_drops_privileges() {
        let config = json!({
            "process": {
                "user": { "uid": 1000, "gid": 1001 },
                "env": ["PATH=/bin", "HOME=/work", "A=1"],
                "cwd": "/work",
                "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096 }],
                "capabilities": { "bounding": ["CAP_KILL"] },
                "noNewPrivileges": true
            },
            "mounts": [{ "destination": INIT_IN_SANDBOX }]
        });
        let ctx = ExecContext::from_config(&config).expect("context");
        assert_eq!((ctx.uid, ctx.gid, ctx.has_init), (1000, 1001, true));
        let mut env = BTreeMap::new();
        env.insert("A".to_owned(), "2".to_owned());
        env.insert("B".to_owned(), "x=y".to_owned());
        let p = process_spec(&ctx, &exec_args(&["id".to_owned()]), &env, Some("/tmp"));
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["cwd"], "/tmp");
        assert_eq!(p["args"], json!([INIT_IN_SANDBOX, "exec", "id"]));
        assert_eq!(p["env"], json!(["PATH=/bin", "HOME=/work", "A=2", "B=x=y"]));
        for set in [
            "bounding",
            "effective",
            "permitted",
            "inheritable",
            "ambient",
        ] {
            assert_eq!(p["capabilities"][set], json!([]), "{set} is empty");
        }
        assert_eq!(p["rlimits"][0]["hard"], 4096);
        assert_eq!(
            process_spec(&ctx, &[], &BTreeMap::new(), None)["cwd"],
            "/work"
        );
        let old = json!({ "process": { "user": { "uid": 1, "gid": 1 }, "env": [] }, "mounts": [] });
        assert!(!ExecContext::from_config(&old).expect("old").has_init);
        assert!(ExecContext::from_config(&json!({})).is_err());
    }

    #[test]
    fn wrapper_reports_are_parsed() {
        let mut r = WrapperReport::default();
        parse_report("r\n", &mut r);
        assert_eq!(
            r,
            WrapperReport {
                started: true,
                status: None
            }
        );
        parse_report("x 137 9\n", &mut r);
        assert_eq!(r.status, Some((137, 9)));
        let mut r = WrapperReport::default();
        parse_report("junk\nx nope\n", &mut r);
        assert_eq!(r, WrapperReport::default());
    }
}
