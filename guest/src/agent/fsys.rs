//! File system calls relative to directory fds, with `openat2` resolution: inside the agent's
//! root for request paths (`RESOLVE_IN_ROOT`: `..` and absolute symlinks stay in the root, which
//! lets the agent run against a temp dir in tests exactly as against `/` in a guest), and
//! beneath the target directory for upload members (`RESOLVE_BENEATH`: a symlink an upload
//! made cannot lead a later member out of the target).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::proto::{Entry, EntryKind};

/// Names read from one directory before sorting, at most (a listing returns the first
/// `LIST_ENTRIES_MAX` of them by name).
pub const DIR_SCAN_MAX: usize = 1_000_000;

pub fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}

fn rc(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("fd over c_int"))?;
    // SAFETY: `fd` was just returned by the kernel as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The root directory, as an `O_PATH` fd.
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    let path = cstr(&root.to_string_lossy())?;
    // SAFETY: open reads the NUL-terminated `path`, which outlives the call.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    owned(fd.into())
}

fn openat2(
    dir: BorrowedFd<'_>,
    path: &str,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let path = cstr(if path.is_empty() { "." } else { path })?;
    // SAFETY: open_how is plain data; all zeroes is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0);
    how.mode = u64::from(mode);
    how.resolve = resolve | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated `path` and `how` (of the size passed), both
    // live locals that outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    owned(fd)
}

/// Open `path` (a request path) inside the root.
pub fn in_root(root: BorrowedFd<'_>, path: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    openat2(root, path, flags, mode, libc::RESOLVE_IN_ROOT)
}

/// Open `rel` beneath `dir`; never leaves it.
pub fn beneath(dir: BorrowedFd<'_>, rel: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    openat2(dir, rel, flags, mode, libc::RESOLVE_BENEATH)
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; all zeroes is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat through the pointer, a live local.
    rc(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `lstat` of `name` in `dir`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; all zeroes is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat reads the NUL-terminated `name` and writes one stat, both live.
    rc(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: mkdirat reads the NUL-terminated `name`, live for the call.
    rc(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
}

/// Open (creating with `mode` when `flags` says so) `name` directly in `dir`.
pub fn open_at(dir: BorrowedFd<'_>, name: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    // SAFETY: openat reads the NUL-terminated `name`, live for the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    };
    owned(fd.into())
}

pub fn chown_at(dir: BorrowedFd<'_>, name: &str, owner: (u32, u32)) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: fchownat reads the NUL-terminated `name`, live for the call.
    rc(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            owner.0,
            owner.1,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn fchown_mod(fd: BorrowedFd<'_>, owner: (u32, u32), mode: u32) -> io::Result<()> {
    // SAFETY: fchown and fchmod take integers only.
    rc(unsafe { libc::fchown(fd.as_raw_fd(), owner.0, owner.1) })?;
    // SAFETY: as above.
    rc(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
}

pub fn rename_at(dir: BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: renameat reads two NUL-terminated names, live for the call.
    rc(unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) })
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: unlinkat reads the NUL-terminated `name`, live for the call.
    rc(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })
}

pub fn symlink_at(target: &str, dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let (target, name) = (cstr(target)?, cstr(name)?);
    // SAFETY: symlinkat reads two NUL-terminated strings, live for the call.
    rc(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

pub fn read_link_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: readlinkat writes at most `buf.len()` bytes into `buf`, a live buffer.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The names in directory `dir` (not `.` and `..`), at most [`DIR_SCAN_MAX`]; `true` when
/// there were more.
pub fn read_names(dir: BorrowedFd<'_>) -> io::Result<(Vec<CString>, bool)> {
    // A fresh description (not a dup, which would share the offset), for readdir.
    let fd = open_at(dir, ".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is an open directory fd we own; fdopendir takes it over on success.
    let d = unsafe { libc::fdopendir(raw) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut names = Vec::new();
    let mut more = false;
    loop {
        // SAFETY: resetting this thread's errno, to tell the end of the stream from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `d` is the open DIR of this function.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated; it is copied
        // before the next readdir.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name == c"." || name == c".." {
            continue;
        }
        if names.len() >= DIR_SCAN_MAX {
            more = true;
            break;
        }
        names.push(name.to_owned());
    }
    let err = io::Error::last_os_error();
    // SAFETY: `d` is open and closed exactly once, here (with its fd).
    unsafe { libc::closedir(d) };
    if err.raw_os_error().is_some_and(|e| e != 0) && !more {
        return Err(err);
    }
    Ok((names, more))
}

pub fn kind_of(mode: u32) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

pub fn entry(name: &CStr, st: &libc::stat) -> Entry {
    let ms = st.st_mtime.saturating_mul(1000) + st.st_mtime_nsec / 1_000_000;
    Entry {
        name: name.to_string_lossy().into_owned(),
        kind: kind_of(st.st_mode),
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
        modified_ms: u64::try_from(ms).unwrap_or(0),
        uid: st.st_uid,
        gid: st.st_gid,
    }
}

/// Split a request path into its parent and last name (`/a/b/` -> `/a`, `b`).
pub fn split_parent(path: &str) -> Result<(&str, &str), String> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("{path:?} does not name a file"));
    }
    Ok((if parent.is_empty() { "/" } else { parent }, name))
}

/// Open directory `path` in the root, creating it and its missing parents (owned by `owner`).
pub fn make_dirs(root: BorrowedFd<'_>, path: &str, owner: (u32, u32)) -> io::Result<OwnedFd> {
    let mut prefix = String::new();
    let mut dir = in_root(root, "/", libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        prefix.push('/');
        prefix.push_str(c);
        match in_root(root, &prefix, libc::O_PATH | libc::O_DIRECTORY, 0) {
            Ok(fd) => dir = fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && c != ".." => {
                use std::os::fd::AsFd;
                mkdir_at(dir.as_fd(), c, 0o755)?;
                chown_at(dir.as_fd(), c, owner)?;
                dir = in_root(root, &prefix, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(dir)
}
