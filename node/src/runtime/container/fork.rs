//! Fork: new sandboxes restored side by side from one checkpoint of a running sandbox (the
//! GRPO group: prepare once, roll out N times).
//!
//! ```text
//! <source bundle>/forks/<KEY>/   one fork image per fork job (KEY), 0700
//!   image/ work/                 CRIU's image (dumped with --leave-running) and logs
//!   upper/                       a copy of the source's writable layer at the same instant
//!   done                         written last: the image and the copy are whole
//! <fork bundle>/upper/           a copy of that copy (each fork writes its own)
//! <fork bundle>/checkpoint/image hard links to the fork image (CRIU only reads it)
//! ```
//!
//! **One instant.** The source is frozen (`crun pause`) while its writable layer is copied and
//! its memory dumped (`crun checkpoint --leave-running` of a frozen cgroup), then thawed: the
//! files its processes have open and their contents are those of the same instant, so every fork
//! restores consistently (CRIU checks the size of each open file).
//!
//! **Identity.** Each fork is a new sandbox: its own bundle, container id, cgroup and overlay;
//! its hostname is set in the image's UTS namespace before the restore (`sb-JOB-INDEX`, as a
//! started sandbox has). Its process ids are the source's, in its own pid namespace.
//!
//! The image of a fork job is made once, by the first of its sandboxes to start, and reused by
//! the others (a lock serialises the dump); it goes when the next fork job's image is made or the
//! source is removed.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::checkpoint::{self, criu_log_tail};
use super::crun::ShimMode;
use super::{container_id, ContainerRuntime, StartRequest};
use crate::runtime::sandbox_dir::release_mounts;
use crate::runtime::supervise::{process_start_ticks, RecordExtra};
use crate::runtime::{RuntimeError, SandboxHandle, SandboxId};

/// How long copying a writable layer may take.
const COPY_TIMEOUT_MS: u64 = 120_000;

/// Where the fork image of fork job `key` of a source lives.
pub fn fork_dir(source_bundle: &Path, key: u64) -> PathBuf {
    source_bundle.join("forks").join(key.to_string())
}

/// Make `d` (and its parents) with mode 0700.
fn private_dir(d: &Path) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(d)
        .map_err(|e| RuntimeError::io(format!("create {}", d.display()), e))?;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| RuntimeError::io(format!("chmod {}", d.display()), e))
}

/// `cp -a SRC/. DST` (ownership, modes, xattrs such as overlay whiteouts and opaque marks).
async fn copy_tree(src: &Path, dst: &Path) -> Result<(), RuntimeError> {
    let mut from = src.as_os_str().to_owned();
    from.push("/.");
    let out = tokio::time::timeout(
        Duration::from_millis(COPY_TIMEOUT_MS),
        tokio::process::Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(&from)
            .arg(dst)
            .output(),
    )
    .await
    .map_err(|_| RuntimeError::Timeout {
        what: format!("copy {}", src.display()),
        after_ms: COPY_TIMEOUT_MS,
    })?
    .map_err(|e| RuntimeError::io(format!("copy {}", src.display()), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(RuntimeError::Command {
        command: format!("cp -a {} {}", src.display(), dst.display()),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Hard-link every file of `src` into `dst` (a fork's own view of the shared, read-only image).
fn link_files(src: &Path, dst: &Path) -> Result<(), RuntimeError> {
    let entries = std::fs::read_dir(src)
        .map_err(|e| RuntimeError::io(format!("read {}", src.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| RuntimeError::io(format!("read {}", src.display()), e))?;
        let to = dst.join(entry.file_name());
        std::fs::hard_link(entry.path(), &to)
            .map_err(|e| RuntimeError::io(format!("link {}", to.display()), e))?;
    }
    Ok(())
}

/// One CRIU image entry of a UTS namespace (`utsns.proto`: nodename = 1, domainname = 2).
fn utsns_entry(nodename: &str, domainname: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, value) in [(0x0a_u8, nodename.as_bytes()), (0x12, domainname)] {
        out.push(tag);
        let mut len = value.len();
        loop {
            let byte = u8::try_from(len & 0x7f).expect("seven bits");
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(value);
    }
    out
}

/// Read a protobuf string field `tag` of a small message (the domain name kept as it was).
fn field(msg: &[u8], want: u8) -> Option<Vec<u8>> {
    let mut i = 0;
    while i < msg.len() {
        let tag = msg[i];
        i += 1;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let b = *msg.get(i)?;
            i += 1;
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let value = msg.get(i..i.checked_add(len)?)?;
        if tag == want {
            return Some(value.to_vec());
        }
        i += len;
    }
    None
}

/// Give the image's UTS namespace the hostname `name`. An image file is two magic words, then
/// entries of a little-endian u32 size and a protobuf message.
pub fn set_image_hostname(image: &Path, name: &str) -> Result<(), RuntimeError> {
    let entries = std::fs::read_dir(image)
        .map_err(|e| RuntimeError::io(format!("read {}", image.display()), e))?;
    for entry in entries.flatten() {
        let file = entry.file_name();
        if !file.to_string_lossy().starts_with("utsns-") {
            continue;
        }
        let path = entry.path();
        let bytes = std::fs::read(&path)
            .map_err(|e| RuntimeError::io(format!("read {}", path.display()), e))?;
        let bad = || RuntimeError::Checkpoint {
            id: SandboxId::new(0, 0),
            reason: format!("unexpected UTS namespace image {}", path.display()),
        };
        let size = bytes.get(8..12).ok_or_else(bad)?;
        let size = usize::try_from(u32::from_le_bytes(size.try_into().map_err(|_| bad())?))
            .map_err(|_| bad())?;
        let msg = bytes.get(12..12 + size).ok_or_else(bad)?;
        let domain = field(msg, 0x12).unwrap_or_default();
        let entry = utsns_entry(name, &domain);
        let mut out = bytes[..8].to_vec();
        out.extend_from_slice(&u32::try_from(entry.len()).map_err(|_| bad())?.to_le_bytes());
        out.extend_from_slice(&entry);
        out.extend_from_slice(&bytes[12 + size..]);
        // A new file, not a write through the hard link: the other forks keep their own.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &out)
            .map_err(|e| RuntimeError::io(format!("write {}", tmp.display()), e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| RuntimeError::io(format!("chmod {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| RuntimeError::io(format!("rename {}", path.display()), e))?;
    }
    Ok(())
}

impl ContainerRuntime {
    /// The fork image of fork job `key` of `source`: made now (source frozen, layer copied,
    /// memory dumped, source thawed) unless it already is. Returns its directory.
    async fn fork_image(&self, source: SandboxId, key: u64) -> Result<PathBuf, RuntimeError> {
        let fail = |reason: String| RuntimeError::Checkpoint { id: source, reason };
        if let Err(why) = &self.criu {
            return Err(fail(why.clone()));
        }
        let _one_dump = self.fork_lock.lock().await;
        let sb = self.sandboxes.live(self, source, "fork").await?;
        let dir = fork_dir(&sb.dir, key);
        if dir.join("done").is_file() {
            return Ok(dir);
        }
        // Older fork images of this source go: one at a time is kept.
        let _ = std::fs::remove_dir_all(sb.dir.join("forks"));
        for d in [
            dir.clone(),
            dir.join("image"),
            dir.join("work"),
            dir.join("upper"),
        ] {
            private_dir(&d)?;
        }
        let cid = container_id(source);
        let was_paused = sb.record().paused;
        if !was_paused {
            self.crun
                .run(&[OsStr::new("pause"), OsStr::new(&cid)])
                .await?;
        }
        let made = async {
            copy_tree(&sb.file("upper"), &dir.join("upper")).await?;
            let image = dir.join("image");
            let work = dir.join("work");
            checkpoint::crun_checkpoint(&self.crun, &image, &work, &cid, true)
                .await
                .map_err(|e| {
                    let criu = checkpoint::log_error_line(&work.join("dump.log"));
                    fail(format!("dump for a fork failed: {e}; criu: {criu}"))
                })?;
            checkpoint::seal_dir(&image)?;
            Ok::<(), RuntimeError>(())
        }
        .await;
        if !was_paused {
            // CRIU leaves the cgroup frozen as it found it; thaw it whatever happened.
            let _ = self
                .crun
                .run(&[OsStr::new("resume"), OsStr::new(&cid)])
                .await;
        }
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        std::fs::write(dir.join("done"), b"")
            .map_err(|e| RuntimeError::io(format!("write {}", dir.display()), e))?;
        Ok(dir)
    }

    /// Start `req` as a fork of the running sandbox `source` (fork job `key`: its forks share
    /// one image). The new sandbox runs the source's spec with `req`'s id and resources.
    pub(super) async fn fork_sandbox(
        &self,
        source: SandboxId,
        key: u64,
        req: StartRequest,
    ) -> Result<SandboxHandle, RuntimeError> {
        let image = self.fork_image(source, key).await?;
        let src = self.sandboxes.get(self, source)?;
        let spec = StartRequest {
            spec: src.record().spec,
            ..req.clone()
        };
        let bundle = self.sandboxes.begin_start(self, req.id)?;
        let prepared = async {
            std::fs::create_dir_all(bundle.join("upper"))
                .map_err(|e| RuntimeError::io(format!("create {}", bundle.display()), e))?;
            copy_tree(&image.join("upper"), &bundle.join("upper")).await?;
            let record = self.prepare_bundle(&spec, &bundle)?;
            for d in [
                bundle.join("checkpoint"),
                checkpoint::image_dir(&bundle),
                checkpoint::work_dir(&bundle),
            ] {
                private_dir(&d)?;
            }
            link_files(&image.join("image"), &checkpoint::image_dir(&bundle))?;
            set_image_hostname(
                &checkpoint::image_dir(&bundle),
                &format!("sb-{}-{}", req.id.job, req.id.index),
            )?;
            // surge-init said "ok" once, in the source; the restored one does not say it again.
            std::fs::write(bundle.join("init.status"), b"ok\n")
                .map_err(|e| RuntimeError::io("write init.status", e))?;
            Ok::<_, RuntimeError>(record)
        }
        .await;
        let record = match prepared {
            Ok(r) => r,
            Err(e) => {
                release_mounts(&bundle);
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let sb = self.sandboxes.insert(self, record);
        let pid =
            self.crun
                .spawn_shim(req.id, &sb.dir, &container_id(req.id), ShimMode::Restore)?;
        let ticks = process_start_ticks(pid).unwrap_or(0);
        sb.update(|r| r.extra.set_process(pid, ticks))?;
        match self.sandboxes.await_started(self, &sb).await {
            Ok(pid) => {
                self.watch_oom(&sb);
                checkpoint::retire_images(&sb.dir)?;
                Ok(SandboxHandle {
                    id: req.id,
                    generation: req.generation,
                    pid: Some(pid),
                })
            }
            Err(e) => {
                let criu = criu_log_tail(&sb.dir, "restore");
                Err(RuntimeError::Checkpoint {
                    id: req.id,
                    reason: format!("fork of {source} failed: {e}; criu: {criu}"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uts_image_gets_the_forks_hostname_and_keeps_its_domain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let msg = utsns_entry("sb-7-0", b"(none)");
        let mut file = vec![1, 2, 3, 4, 5, 6, 7, 8];
        file.extend_from_slice(&u32::try_from(msg.len()).expect("len").to_le_bytes());
        file.extend_from_slice(&msg);
        let path = dir.path().join("utsns-12.img");
        std::fs::write(&path, &file).expect("write");
        set_image_hostname(dir.path(), "sb-42-3").expect("set");
        let out = std::fs::read(&path).expect("read");
        assert_eq!(&out[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let size =
            usize::try_from(u32::from_le_bytes(out[8..12].try_into().expect("4"))).expect("size");
        let msg = &out[12..12 + size];
        assert_eq!(field(msg, 0x0a).expect("nodename"), b"sb-42-3");
        assert_eq!(field(msg, 0x12).expect("domain"), b"(none)");
        assert_eq!(out.len(), 12 + size);
    }
}
