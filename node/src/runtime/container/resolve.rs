//! Paths inside a container sandbox, opened from the host without ever leaving the sandbox.
//!
//! The root is `/proc/<PID 1>/root`: the sandbox's own mount namespace, so its /tmp tmpfs and
//! other mounts are there (the bundle's `rootfs/` would miss them). Every path is resolved from
//! that root by `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: `..` stops at the sandbox's
//! root, absolute symlinks the sandbox made resolve inside it, and `/proc/N/root`-style magic
//! links are refused, so no path and no link can lead the node to a host file. Where a final
//! symlink must not be followed (replacing, creating, walking an upload), single names are
//! opened relative to a resolved directory with `O_NOFOLLOW`.
//!
//! The work runs on its own short-lived thread whose filesystem uid and gid are the sandbox
//! user's and which has no supplementary groups ([`as_sandbox_user`]): permission checks are the
//! sandbox user's, new files and directories are owned by it, and the files only root may read
//! (in the sandbox's /proc and /sys, too) stay closed. The credentials die with the thread.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::runtime::io::{check_path, IoError};

/// `struct open_how` of openat2(2) (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Resolution of every sandbox path: inside the root, no magic links.
const RESOLVE: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
/// Bytes of `/proc/<pid>/cgroup` read to check a pid (a few hundred in practice).
const CGROUP_FILE_MAX: u64 = 64 * 1024;

fn cstr(s: &str) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// A new descriptor returned by a syscall, or its errno.
fn owned(fd: libc::c_long) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `fd` was just returned by the kernel as a new descriptor of ours (checked >= 0);
    // nothing else owns it, so the OwnedFd closes it exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// openat2(2) of `path` below `dir` with `resolve` flags.
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &str,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> std::io::Result<OwnedFd> {
    let path = cstr(path)?;
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0),
        mode: u64::from(mode),
        resolve,
    };
    // SAFETY: `path` is a NUL-terminated string and `how` an initialized open_how, both alive
    // for the call, and the size passed is `how`'s; openat2 only reads them and returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    owned(fd)
}

/// openat(2) of one name in `dir`, never following a symlink there.
pub fn open_name(
    dir: BorrowedFd<'_>,
    name: &str,
    flags: i32,
    mode: u32,
) -> std::io::Result<OwnedFd> {
    let name = cstr(name)?;
    // SAFETY: `name` is NUL-terminated and outlives the call; openat returns a new descriptor
    // or -1.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    owned(libc::c_long::from(fd))
}

/// fstat(2).
pub fn fstat(fd: BorrowedFd<'_>) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat` for the call's duration.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// fstatat(2) of one name in `dir`, not following a symlink.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<libc::stat> {
    let name = cstr(name)?;
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` writable, both alive for the call.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// mkdirat(2) of one name in `dir`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> std::io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// renameat(2) within one directory: replaces `to` (a symlink there is replaced, not followed).
pub fn rename_at(dir: BorrowedFd<'_>, from: &str, to: &str) -> std::io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: both names are NUL-terminated and outlive the call.
    if unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// unlinkat(2) of a file name in `dir` (best effort: cleanup of a temporary file).
pub fn unlink_at(dir: BorrowedFd<'_>, name: &str) {
    if let Ok(name) = cstr(name) {
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let _ = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
    }
}

/// symlinkat(2): `name` in `dir` pointing to `target` (never resolved by the node).
pub fn symlink_at(target: &str, dir: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
    let (target, name) = (cstr(target)?, cstr(name)?);
    // SAFETY: both strings are NUL-terminated and outlive the call.
    if unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// readlinkat(2) of one name in `dir`, at most `PATH_MAX` bytes.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<Vec<u8>> {
    let name = cstr(name)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: `name` is NUL-terminated; `buf` is writable for `buf.len()` bytes; readlinkat
    // writes at most that many and returns how many.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    buf.truncate(n);
    Ok(buf)
}

/// A descriptor opened again through `/proc/self/fd` (an `O_PATH` descriptor made readable,
/// or a directory for `read_dir`): our own descriptor, so nothing of the sandbox is resolved.
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// The root of a running sandbox: `/proc/<pid>/root`, once `/proc/<pid>/cgroup` shows that
/// `pid` is still the sandbox's PID 1 (a recycled pid would be another process, maybe the
/// host's: its root is refused). The `/proc/<pid>` descriptor pins that one process.
pub fn open_sandbox_root(pid: u32, crun_cgroup: &str) -> Result<OwnedFd, IoError> {
    let gone = || IoError::Runtime(format!("the sandbox's PID 1 ({pid}) is gone"));
    let proc_dir = std::fs::File::open(format!("/proc/{pid}")).map_err(|_| gone())?;
    let proc_dir = OwnedFd::from(proc_dir);
    let cgroup =
        open_name(proc_dir.as_fd_ref(), "cgroup", libc::O_RDONLY, 0).map_err(|_| gone())?;
    let mut text = String::new();
    std::fs::File::from(cgroup)
        .take(CGROUP_FILE_MAX)
        .read_to_string(&mut text)
        .map_err(|_| gone())?;
    let ours = text
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .any(|path| path == crun_cgroup || path.starts_with(&format!("{crun_cgroup}/")));
    if !ours {
        return Err(IoError::Runtime(format!(
            "pid {pid} is not the sandbox's PID 1 any more (not in cgroup {crun_cgroup})"
        )));
    }
    // "root" is the magic link we mean to follow: it is the sandbox's root directory.
    let name = cstr("root").map_err(|e| IoError::io("open the sandbox's root", e))?;
    // SAFETY: `name` is NUL-terminated and outlives the call; openat returns a new descriptor
    // or -1.
    let fd = unsafe {
        libc::openat(
            proc_dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    owned(libc::c_long::from(fd)).map_err(|e| IoError::io("open the sandbox's root", e))
}

trait AsFdRef {
    fn as_fd_ref(&self) -> BorrowedFd<'_>;
}

impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// A sandbox's root, opened for one file operation, and the user the operation acts as.
pub struct SandboxRoot {
    pub root: OwnedFd,
    pub uid: u32,
    pub gid: u32,
}

/// An absolute sandbox path as openat2 takes it below the root (`/` is `.`).
pub fn relative(path: &str) -> &str {
    let p = path.trim_start_matches('/');
    if p.is_empty() {
        "."
    } else {
        p
    }
}

/// The parent directory and the last name of an absolute path; `None` when the path names
/// no entry that could be created or replaced (`/`, or a last component `.` or `..`).
pub fn split_parent(path: &str) -> Option<(String, &str)> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = trimmed.rsplit_once('/')?;
    if name.is_empty() || name == "." || name == ".." {
        return None;
    }
    Some((
        if parent.is_empty() {
            "/".to_owned()
        } else {
            parent.to_owned()
        },
        name,
    ))
}

/// An errno of a file operation as the API reports it.
pub fn io_error(path: &str, what: &str, e: std::io::Error) -> IoError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => IoError::NotFound { path: path.into() },
        Some(libc::ENOTDIR) => IoError::WrongKind {
            path: path.into(),
            what: "a component of the path is not a directory".into(),
        },
        Some(libc::EISDIR) => IoError::WrongKind {
            path: path.into(),
            what: "is a directory".into(),
        },
        Some(libc::ELOOP) => IoError::WrongKind {
            path: path.into(),
            what: "is a symlink, or too many links, or a /proc magic link (not followed)".into(),
        },
        Some(libc::EXDEV) => IoError::WrongKind {
            path: path.into(),
            what: "resolution left the sandbox's root (refused)".into(),
        },
        _ => IoError::io(format!("{what} {path} in the sandbox"), e),
    }
}

impl SandboxRoot {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd_ref()
    }

    /// Open an absolute sandbox path, resolved inside the sandbox.
    pub fn open(&self, path: &str, flags: i32, mode: u32) -> Result<OwnedFd, IoError> {
        check_path(path)?;
        openat2(self.fd(), relative(path), flags, mode, RESOLVE)
            .map_err(|e| io_error(path, "open", e))
    }

    /// The directory `path`, created with its missing parents (owned by the sandbox's user,
    /// since the thread's fsuid is theirs) when `create`.
    pub fn dir(&self, path: &str, create: bool) -> Result<OwnedFd, IoError> {
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        match self.open(path, flags, 0) {
            Err(IoError::NotFound { .. }) if create => {}
            other => return other,
        }
        let (parent, name) =
            split_parent(path).ok_or_else(|| IoError::NotFound { path: path.into() })?;
        let parent_fd = self.dir(&parent, true)?;
        match mkdir_at(parent_fd.as_fd_ref(), name, 0o755) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(io_error(path, "create directory", e)),
        }
        open_name(parent_fd.as_fd_ref(), name, flags, 0).map_err(|e| io_error(path, "open", e))
    }
}

/// Run `work` on a new thread acting as the sandbox's user for the filesystem (fsuid, fsgid,
/// no supplementary groups), and wait for its result without blocking the runtime.
pub async fn as_sandbox_user<T: Send + 'static>(
    uid: u32,
    gid: u32,
    work: impl FnOnce() -> Result<T, IoError> + Send + 'static,
) -> Result<T, IoError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("surge-sandbox-fs".into())
        .spawn(move || {
            let result = become_user(uid, gid).and_then(|()| work());
            let _ = tx.send(result);
        })
        .map_err(|e| IoError::io("start a file-operation thread", e))?;
    rx.await
        .map_err(|_| IoError::Runtime("a file-operation thread panicked".into()))?
}

/// This thread's filesystem credentials become the sandbox user's. Raw syscalls: they change
/// the calling thread only (glibc's wrappers would change every thread of the daemon).
fn become_user(uid: u32, gid: u32) -> Result<(), IoError> {
    let failed = |what: &str| IoError::io(what.to_owned(), std::io::Error::last_os_error());
    // SAFETY: setgroups with a count of 0 reads no memory; it changes this thread's
    // credentials only.
    if unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) } != 0 {
        return Err(failed("drop supplementary groups"));
    }
    // SAFETY: setfsgid/setfsuid take an id by value and return the previous one; they touch
    // no memory. Calling them again with -1 (an invalid id) returns the current one, which is
    // how success is checked.
    let (g, u) = unsafe {
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
        (
            libc::syscall(libc::SYS_setfsgid, u32::MAX),
            libc::syscall(libc::SYS_setfsuid, u32::MAX),
        )
    };
    if g != libc::c_long::from(gid) || u != libc::c_long::from(uid) {
        return Err(IoError::Runtime(format!(
            "could not act as uid {uid} gid {gid} for the sandbox's files (fsuid {u}, fsgid {g})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_parent_and_name() {
        assert_eq!(relative("/"), ".");
        assert_eq!(relative("/a/b"), "a/b");
        assert_eq!(split_parent("/a/b"), Some(("/a".to_owned(), "b")));
        assert_eq!(split_parent("/b/"), Some(("/".to_owned(), "b")));
        assert_eq!(split_parent("/"), None);
        assert_eq!(split_parent("/a/.."), None);
        assert_eq!(split_parent("/a/."), None);
    }
}
