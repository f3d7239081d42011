//! Checkpoint and restore of container sandboxes ("close the lid" for real): CRIU, driven by a
//! crun built with it (`scripts/setup-criu`, `vendor/crun-criu`).
//!
//! ```text
//! <bundle>/checkpoint/image/   CRIU's image: the process tree, its memory, tmpfs contents
//!                              (0700 directory, 0600 files: it holds the sandbox's memory)
//! <bundle>/checkpoint/work/    CRIU's logs of the last dump or restore, and its `stats-dump`
//! ```
//!
//! **Why a second crun.** Debian 12's crun 1.8 has no `checkpoint` command and its criu 3.17
//! fails `criu check` on kernels >= 6.13. A node uses the kit's crun for every container it runs
//! (the one that created a container must be the one that dumps it), and puts the kit's `bin/`
//! first on crun's PATH: libcriu starts the `criu` binary from PATH.
//!
//! **Stdio must be pipes.** CRIU cannot dump a descriptor of a host file that is not visible in
//! the container's mounts, so a checkpointable sandbox's shim feeds its stdout and stderr through
//! pipes into the log files (`cat >> stdout.log`); on restore crun hands its own stdio pipes to
//! CRIU in their place.
//!
//! **The record is the truth.** `checkpoint` in the record is `Pending` while a dump runs and
//! `Done` once the image is complete. A daemon killed during a dump finds, on restart, either the
//! container still running (the dump failed or never ended: the partial image is deleted) or a
//! complete image (CRIU writes `stats-dump`, into the work directory, last): never neither.
//!
//! **Same node, same bundle.** CRIU does not save the root filesystem; the overlay stays mounted
//! while the sandbox is checkpointed, and restore reopens files by path in the same bundle.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::RuntimeError;

/// Where `scripts/setup-criu` installs the kit by default.
pub const KIT_PREFIX_DEFAULT: &str = "/opt/surge-crun-criu";

/// Where this host's kit is: `$SURGE_CRIU_PREFIX`, else [`KIT_PREFIX_DEFAULT`].
pub fn kit_prefix() -> PathBuf {
    std::env::var_os("SURGE_CRIU_PREFIX")
        .map_or_else(|| PathBuf::from(KIT_PREFIX_DEFAULT), PathBuf::from)
}
/// How long one dump or restore may take (a 1 GiB sandbox writes 1 GiB).
pub const CHECKPOINT_TIMEOUT_MS: u64 = 300_000;
/// Bytes of CRIU's log quoted in an error.
const CRIU_LOG_TAIL_BYTES: usize = 1024;

/// A crun with checkpoint/restore and the directory holding its `criu`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriuKit {
    pub crun: PathBuf,
    pub bin_dir: PathBuf,
}

impl CriuKit {
    /// The kit under `prefix`, if it works here: its crun says `+CRIU` and its `criu check`
    /// passes. `Err` says why not, in one line.
    pub fn probe(prefix: &Path) -> Result<Self, String> {
        let crun = prefix.join("bin/crun");
        let criu = prefix.join("sbin/criu");
        if !crun.is_file() || !criu.is_file() {
            return Err(format!(
                "no usable CRIU: {} has no crun + criu (run scripts/setup-criu on this node)",
                prefix.display()
            ));
        }
        let run = |program: &Path, arg: &str| {
            std::process::Command::new(program)
                .arg(arg)
                .output()
                .map_err(|e| format!("no usable CRIU: cannot run {}: {e}", program.display()))
        };
        let version = run(&crun, "--version")?;
        if !String::from_utf8_lossy(&version.stdout).contains("+CRIU") {
            return Err(format!(
                "no usable CRIU: {} is built without CRIU",
                crun.display()
            ));
        }
        let check = run(&criu, "check")?;
        if !check.status.success() {
            let err = String::from_utf8_lossy(&check.stderr);
            let last = err.lines().last().unwrap_or("").trim();
            return Err(format!("no usable CRIU: `criu check` fails here: {last}"));
        }
        Ok(Self {
            crun,
            bin_dir: prefix.join("bin"),
        })
    }
}

/// CRIU's options for this host, as a config file crun hands to CRIU (the OCI annotation
/// `org.criu.config`), or `None` where the defaults do. `proc_self_cgroup` is the daemon's
/// `/proc/self/cgroup`.
///
/// **Why.** On a v1 or hybrid host crun places a container in the v1 hierarchies only; its
/// processes stay in the daemon's cgroup of the v2 hierarchy (often its root). CRIU dumps every
/// hierarchy a task is in, with the whole subtree below its cgroup, and recreates that subtree
/// under the restored container's cgroup: each restore copied the host's v2 tree one level
/// deeper (seen here as 88-deep `surge-ck-counter/surge-91-0/...` chains, and forks that timed
/// out creating them). Naming the v1 hierarchies makes CRIU leave the v2 one alone.
pub fn criu_config(proc_self_cgroup: &str) -> Option<String> {
    let mut names = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, Some(controllers)) = (parts.next(), parts.next()) else {
            continue;
        };
        if controllers.is_empty() {
            continue; // the v2 hierarchy
        }
        names.push(controllers.to_owned());
        if controllers.contains(',') {
            names.extend(controllers.split(',').map(str::to_owned));
        }
    }
    if names.is_empty() {
        return None; // a pure v2 host: the container has its own v2 cgroup
    }
    Some(
        names
            .iter()
            .map(|n| format!("cgroup-dump-controller {n}\n"))
            .collect(),
    )
}

/// Where the kit's CRIU caches what it probed of the running kernel (`criu.kdat`; the kit is
/// built with `RUNDIR` here, vendor/crun-criu/build.sh). Without the cache every dump and
/// restore probes the kernel again: ~55 ms each here, a third of a 64 MiB restore.
pub const KDAT_DIR: &str = "/run/surge-criu";

/// Make `dir` a root-only directory on a tmpfs, where CRIU keeps its kernel cache: CRIU
/// writes it only on a tmpfs (a cache that survived a reboot could describe another kernel).
/// Hosts whose /run is a tmpfs need no mount; elsewhere a small one is mounted on `dir`.
pub fn prepare_kdat_dir(dir: &Path) -> Result<(), RuntimeError> {
    let err =
        |what: &str, e: std::io::Error| RuntimeError::io(format!("{what} {}", dir.display()), e);
    std::fs::create_dir_all(dir).map_err(|e| err("create", e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err("chmod", e))?;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| RuntimeError::Cgroup(format!("path {} contains NUL", dir.display())))?;
    // SAFETY: an all-zero statfs is a valid value, filled by the call; `c` outlives it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut fs) } != 0 {
        return Err(err("statfs", std::io::Error::last_os_error()));
    }
    if fs.f_type == libc::TMPFS_MAGIC {
        return Ok(());
    }
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=1m,mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err("mount a tmpfs on", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Write [`criu_config`] for this host under `data_dir`; its path, or `None` where none is
/// needed. Also readies CRIU's kernel cache ([`prepare_kdat_dir`]; without it CRIU is only
/// slower, so a failure is logged, not fatal).
pub fn install_criu_config(data_dir: &Path) -> Result<Option<PathBuf>, RuntimeError> {
    if let Err(e) = prepare_kdat_dir(Path::new(KDAT_DIR)) {
        tracing::warn!("CRIU will probe the kernel in every dump and restore: {e}");
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| RuntimeError::io("read /proc/self/cgroup", e))?;
    let Some(text) = criu_config(&own) else {
        return Ok(None);
    };
    let path = data_dir.join("criu.conf");
    std::fs::write(&path, text)
        .map_err(|e| RuntimeError::io(format!("write {}", path.display()), e))?;
    Ok(Some(path))
}

/// Where a sandbox stands with respect to checkpointing (kept in `meta.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointRecord {
    /// A dump is under way.
    Pending,
    /// The sandbox is stopped; its image (this many bytes) is complete.
    Done { image_bytes: u64 },
}

pub fn image_dir(bundle: &Path) -> PathBuf {
    bundle.join("checkpoint/image")
}

pub fn work_dir(bundle: &Path) -> PathBuf {
    bundle.join("checkpoint/work")
}

/// CRIU writes `stats-dump` at the very end of a successful dump, into its work directory
/// (`-W`), not the image directory.
fn stats_dump(bundle: &Path) -> PathBuf {
    work_dir(bundle).join("stats-dump")
}

/// Whether the last dump finished: its `stats-dump` exists ([`remove_images`] deletes it with
/// the image, so a previous dump's never counts).
pub fn image_complete(bundle: &Path) -> bool {
    stats_dump(bundle).is_file() && image_dir(bundle).is_dir()
}

/// Fresh, private directories for a dump (a previous image is removed).
pub fn prepare_dump(bundle: &Path) -> Result<(), RuntimeError> {
    let top = bundle.join("checkpoint");
    remove_images(bundle)?;
    for d in [top.clone(), image_dir(bundle), work_dir(bundle)] {
        std::fs::create_dir_all(&d)
            .map_err(|e| RuntimeError::io(format!("create {}", d.display()), e))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| RuntimeError::io(format!("chmod {}", d.display()), e))?;
    }
    Ok(())
}

/// Make every image file 0600 and return the image's size.
pub fn seal_image(bundle: &Path) -> Result<u64, RuntimeError> {
    seal_dir(&image_dir(bundle))
}

/// Make every file of the image directory `dir` 0600 (it holds a sandbox's memory) and return
/// their total size.
pub fn seal_dir(dir: &Path) -> Result<u64, RuntimeError> {
    let mut total = 0u64;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| RuntimeError::io(format!("read {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| RuntimeError::io(format!("read {}", dir.display()), e))?;
        let meta = entry
            .metadata()
            .map_err(|e| RuntimeError::io(format!("stat {}", entry.path().display()), e))?;
        if meta.is_file() {
            total = total.saturating_add(meta.len());
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
                .map_err(|e| RuntimeError::io(format!("chmod {}", entry.path().display()), e))?;
        }
    }
    Ok(total)
}

/// Delete a sandbox's images and the mark that they are complete (after a restore, a failed
/// dump, or when it is forgotten). CRIU's logs stay for diagnosis.
pub fn remove_images(bundle: &Path) -> Result<(), RuntimeError> {
    let stats = stats_dump(bundle);
    match std::fs::remove_file(&stats) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RuntimeError::io(format!("remove {}", stats.display()), e)),
    }
    let image = image_dir(bundle);
    match std::fs::remove_dir_all(&image) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::io(format!("remove {}", image.display()), e)),
    }
}

/// Remove a restored sandbox's image without waiting for it: its completion mark goes now, the
/// image directory is renamed aside at once and deleted on a blocking thread (unlinking a
/// 64 MiB image held in the page cache takes 20-30 ms here, longer than the rest of a restore
/// after CRIU). A retired image left by a daemon that died goes with the sandbox's directory.
pub fn retire_images(bundle: &Path) -> Result<(), RuntimeError> {
    remove_file(&stats_dump(bundle))?;
    let image = image_dir(bundle);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let retired = bundle.join("checkpoint").join(format!("retired-{nanos}"));
    match std::fs::rename(&image, &retired) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RuntimeError::io(format!("retire {}", image.display()), e)),
    }
    tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::remove_dir_all(&retired) {
            tracing::warn!("remove {}: {e}", retired.display());
        }
    });
    Ok(())
}

/// The end of CRIU's log of the last `what` ("dump" or "restore"), for an error message.
pub fn criu_log_tail(bundle: &Path, what: &str) -> String {
    log_error_line(&work_dir(bundle).join(format!("{what}.log")))
}

/// The last error line of the CRIU log `log` (else its last line), for an error message.
pub fn log_error_line(log: &Path) -> String {
    let text = super::super::read_tail(log, CRIU_LOG_TAIL_BYTES).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("Error") || l.contains("rror ("))
        .unwrap_or_else(|| text.lines().last().unwrap_or(""))
        .trim()
        .to_owned()
}

/// `crun checkpoint` of container `cid`, bounded by [`CHECKPOINT_TIMEOUT_MS`].
pub async fn dump(crun: &super::Crun, bundle: &Path, cid: &str) -> Result<(), RuntimeError> {
    match crun_checkpoint(crun, &image_dir(bundle), &work_dir(bundle), cid, false).await {
        Ok(_) => Ok(()),
        // CRIU writes `stats-dump` (into the work directory, `-W`) only after a successful dump,
        // and a successful dump has ended the container's processes. What fails after it is
        // crun's own clean-up racing the shim's foreground `crun run`, which removes the
        // container's state when its process exits: seen as "cannot rm state directory" and
        // "cannot open directory" (No such file or directory). The image is whole either way.
        Err(RuntimeError::Command { .. }) if image_complete(bundle) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `crun checkpoint` of `cid` into `image` (CRIU's logs and stats in `work`), bounded by
/// [`CHECKPOINT_TIMEOUT_MS`]; `leave_running` keeps the container running (a fork's source).
pub async fn crun_checkpoint(
    crun: &super::Crun,
    image: &Path,
    work: &Path,
    cid: &str,
    leave_running: bool,
) -> Result<String, RuntimeError> {
    let mut args: Vec<&OsStr> = vec![OsStr::new("checkpoint")];
    if leave_running {
        args.push(OsStr::new("--leave-running"));
    }
    args.extend([
        OsStr::new("--network-lock"),
        OsStr::new("skip"),
        OsStr::new("--image-path"),
        image.as_os_str(),
        OsStr::new("--work-path"),
        work.as_os_str(),
        OsStr::new(cid),
    ]);
    crun.run_for(&args, Duration::from_millis(CHECKPOINT_TIMEOUT_MS))
        .await
}

// ---- the runtime's side ----

use super::super::sandbox_dir::{lock, Final};
use super::super::{ObservedState, SandboxId};
use super::{container_id, ContainerRuntime, Sandbox};
use crate::runtime::container::crun::ShimMode;

/// The state a checkpoint decides, if any: `Some(Checkpointed)` for a complete image whose
/// container is gone (also after a daemon died between the dump and writing `Done`).
pub(super) fn held_state(sb: &Sandbox) -> Option<ObservedState> {
    match sb.record().extra.checkpoint? {
        CheckpointRecord::Done { image_bytes } => Some(ObservedState::Checkpointed { image_bytes }),
        CheckpointRecord::Pending if !sb.alive() && image_complete(&sb.dir) => {
            Some(ObservedState::Checkpointed {
                image_bytes: seal_image(&sb.dir).unwrap_or(0),
            })
        }
        CheckpointRecord::Pending => None,
    }
}

fn remove_file(path: &Path) -> Result<(), RuntimeError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::io(format!("remove {}", path.display()), e)),
    }
}

/// Remove what a failed `crun restore` leaves of a sandbox's cgroup (its `.proxy-crun` child
/// and the cgroup itself, in every hierarchy): left there, the next start of the same id fails
/// (`write to devices.deny: Invalid argument`, a v1 cgroup with a child).
fn clear_cgroup_debris(crun_path: &str) {
    let relative = crun_path.trim_start_matches('/');
    let Ok(mounts) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = mounts.flatten().map(|e| e.path()).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        let dir = root.join(relative);
        let _ = std::fs::remove_dir(dir.join(".proxy-crun"));
        let _ = std::fs::remove_dir(&dir);
    }
}

impl ContainerRuntime {
    /// Whether this node's sandboxes can be checkpointed, or why not (one line).
    pub fn checkpoint_support(&self) -> Result<(), String> {
        match &self.criu {
            Ok(_) => Ok(()),
            Err(why) => Err(why.clone()),
        }
    }

    pub(super) async fn checkpoint_sandbox(&self, id: SandboxId) -> Result<u64, RuntimeError> {
        if let Err(why) = &self.criu {
            return Err(RuntimeError::Checkpoint {
                id,
                reason: why.clone(),
            });
        }
        let sb = self.sandboxes.live(self, id, "checkpoint").await?;
        let cid = container_id(id);
        if sb.record().paused {
            // CRIU freezes the tree itself; a cgroup already frozen by `crun pause` is thawed
            // first so the dump sees the same tree a running sandbox has.
            self.crun
                .run(&[OsStr::new("resume"), OsStr::new(&cid)])
                .await?;
            sb.update(|r| r.paused = false)?;
        }
        prepare_dump(&sb.dir)?;
        sb.update(|r| r.extra.checkpoint = Some(CheckpointRecord::Pending))?;
        if let Err(e) = dump(&self.crun, &sb.dir, &cid).await {
            let criu = criu_log_tail(&sb.dir, "dump");
            let _ = remove_images(&sb.dir);
            sb.update(|r| r.extra.checkpoint = None)?;
            let reason = match e {
                RuntimeError::Command { stderr, .. } => stderr,
                other => other.to_string(),
            };
            return Err(RuntimeError::Checkpoint {
                id,
                reason: format!("{reason}; criu: {criu}"),
            });
        }
        // The container is gone; its shim records an exit status that means nothing here.
        let _ = tokio::time::timeout(
            Duration::from_millis(super::CRUN_COMMAND_TIMEOUT_MS),
            self.wait_shim(&sb),
        )
        .await;
        remove_file(&sb.file("exit.code"))?;
        remove_file(&sb.file("container.pid"))?;
        let image_bytes = seal_image(&sb.dir)?;
        sb.update(|r| r.extra.checkpoint = Some(CheckpointRecord::Done { image_bytes }))?;
        *lock(&sb.watcher) = None;
        Ok(image_bytes)
    }

    pub(super) async fn restore_sandbox(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let sb = self.sandboxes.get(self, id)?;
        let state = self.sandboxes.state_of(self, &sb).await?;
        if !matches!(state, ObservedState::Checkpointed { .. }) {
            return Err(RuntimeError::WrongState {
                id,
                state,
                operation: "restore",
            });
        }
        let cid = container_id(id);
        remove_file(&sb.file("exit.code"))?;
        remove_file(&sb.file("container.pid"))?;
        // A crun killed half-way may have left its state; restore recreates the container.
        // (Only then: a crun process is ~10 ms of a restore.)
        if self.crun.root().join(&cid).exists() {
            self.crun.delete_force(&cid).await;
        }
        clear_cgroup_debris(&sb.cgroup.crun_path);
        sb.update(|r| r.extra.checkpoint = None)?;
        *lock(&sb.watcher) = None;
        let pid = self.crun.spawn_shim(id, &sb.dir, &cid, ShimMode::Restore)?;
        let ticks = super::process_start_ticks(pid).unwrap_or(0);
        sb.update(|r| super::RecordExtra::set_process(&mut r.extra, pid, ticks))?;
        match self.sandboxes.await_started(self, &sb).await {
            Ok(_) => {
                self.watch_oom(&sb);
                retire_images(&sb.dir)?;
                Ok(())
            }
            Err(e) => {
                self.crun.delete_force(&cid).await;
                clear_cgroup_debris(&sb.cgroup.crun_path);
                let criu = criu_log_tail(&sb.dir, "restore");
                Err(RuntimeError::Checkpoint {
                    id,
                    reason: format!("restore failed: {e}; criu: {criu}"),
                })
            }
        }
    }

    /// Stop a checkpointed sandbox: there is no process; its image goes, and it ends.
    pub(super) fn discard_checkpoint(&self, sb: &Sandbox) -> Result<(), RuntimeError> {
        remove_images(&sb.dir)?;
        sb.update(|r| r.extra.checkpoint = None)?;
        self.sandboxes.settle(
            sb,
            Final {
                state: ObservedState::Exited { code: 0 },
                code: Some(0),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_is_told_to_leave_the_v2_hierarchy_alone_on_v1_and_hybrid_hosts() {
        let hybrid = "9:name=systemd:/\n4:memory:/a/b\n1:cpu,cpuacct:/\n0::/\n";
        let conf = criu_config(hybrid).expect("a v1 host needs one");
        assert_eq!(
            conf,
            "cgroup-dump-controller name=systemd\ncgroup-dump-controller memory\n\
             cgroup-dump-controller cpu,cpuacct\ncgroup-dump-controller cpu\n\
             cgroup-dump-controller cpuacct\n"
        );
        assert_eq!(criu_config("0::/user.slice\n"), None, "pure v2: none");
    }

    #[test]
    fn images_are_sealed_private_and_measured() {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare_dump(dir.path()).expect("prepare");
        std::fs::write(image_dir(dir.path()).join("pages-1.img"), vec![7u8; 4096]).expect("w");
        assert!(!image_complete(dir.path()), "no stats-dump yet");
        std::fs::write(work_dir(dir.path()).join("stats-dump"), b"x").expect("w");
        assert!(image_complete(dir.path()));
        assert_eq!(seal_image(dir.path()).expect("seal"), 4096);
        let mode = std::fs::metadata(image_dir(dir.path()).join("pages-1.img"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(image_dir(dir.path()))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        remove_images(dir.path()).expect("remove");
        assert!(!image_complete(dir.path()));
    }

    /// A stand-in for crun whose `checkpoint` fails the way crun does when the shim's `crun run`
    /// removed the container's state first; it writes CRIU's `stats-dump` where CRIU does (the
    /// work directory) only if `whole`.
    fn racing_crun(dir: &Path, whole: bool) -> super::super::Crun {
        let script = dir.join("crun");
        let write = if whole {
            r#"w=""; prev=""; for a in "$@"; do [ "$prev" = --work-path ] && w="$a"; prev="$a"; done; echo stats > "$w/stats-dump""#
        } else {
            ":"
        };
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = --version ] && exit 0\n{write}\necho 'cannot rm state directory `/r/surge-1-0`: No such file or directory' >&2\nexit 1\n"
            ),
        )
        .expect("write script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let layout = crate::runtime::cgroup::CgroupLayout::V2 {
            root: dir.to_owned(),
        };
        super::super::Crun::new(&script, dir.join("root"), &layout).expect("fake crun")
    }

    #[tokio::test]
    async fn a_dump_that_lost_only_crun_clean_up_counts_when_criu_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bundle");
        prepare_dump(&bundle).expect("prepare");
        let crun = racing_crun(dir.path(), true);
        dump(&crun, &bundle, "surge-1-0").await.expect("whole dump");
        assert!(image_complete(&bundle));

        prepare_dump(&bundle).expect("prepare again");
        assert!(!image_complete(&bundle), "a previous dump's mark is gone");
        let crun = racing_crun(dir.path(), false);
        let e = dump(&crun, &bundle, "surge-1-0")
            .await
            .expect_err("CRIU did not finish");
        assert!(e.to_string().contains("cannot rm state directory"), "{e}");
    }

    #[test]
    fn criu_gets_a_private_tmpfs_for_its_kernel_cache() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::testing::unavailable("needs root (mount)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("surge-criu");
        prepare_kdat_dir(&run).expect("prepared");
        prepare_kdat_dir(&run).expect("again: already a tmpfs, nothing mounted twice");
        let out = std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(&run)
            .output()
            .expect("stat");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tmpfs");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&run).expect("stat").mode() & 0o777, 0o700);
        super::super::super::sandbox_dir::unmount(&run);
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
        let stacked = mounts.matches(run.to_string_lossy().as_ref()).count();
        assert_eq!(stacked, 0, "one mount, gone after one unmount");
    }

    #[test]
    fn a_missing_kit_says_why_in_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = CriuKit::probe(dir.path()).expect_err("empty prefix");
        assert!(
            e.contains("no usable CRIU") && e.contains("setup-criu"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }
}
