//! The agent's duties as the guest's first process: the file systems a workload expects, and
//! reaping. libkrun's init normally mounts `/proc`, `/sys` and `/dev` before it starts the
//! workload; mounting again is harmless (EBUSY), and needed when the agent is PID 1 itself.

use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd};

/// What is mounted (if not already): source, target, type, flags, data.
const MOUNTS: &[(&CStr, &CStr, &CStr, libc::c_ulong, &CStr)] = &[
    (
        c"proc",
        c"/proc",
        c"proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        c"",
    ),
    (
        c"sysfs",
        c"/sys",
        c"sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        c"",
    ),
    (
        c"devtmpfs",
        c"/dev",
        c"devtmpfs",
        libc::MS_NOSUID,
        c"mode=0755",
    ),
    (
        c"devpts",
        c"/dev/pts",
        c"devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        c"ptmxmode=0666,mode=0620",
    ),
    (
        c"tmpfs",
        c"/dev/shm",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        c"mode=1777",
    ),
    (
        c"tmpfs",
        c"/tmp",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        c"mode=1777",
    ),
];

/// Mount the basics; the failures other than "already mounted", as text for the console.
pub fn mount_basics() -> Vec<String> {
    let mut problems = Vec::new();
    for (source, target, fstype, flags, data) in MOUNTS {
        // SAFETY: mkdir reads a NUL-terminated static string.
        unsafe { libc::mkdir(target.as_ptr(), 0o755) };
        // SAFETY: mount reads NUL-terminated static strings only.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                *flags,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                problems.push(format!("mount {target:?}: {e}"));
            }
        }
    }
    problems
}

/// Orphans of the execs re-parent to the agent (when it is not PID 1 already), which reaps them.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Listen on vsock `port` (any CID): the guest end of the agent's socket.
pub fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket takes integers only.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or(40);
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).unwrap_or(16);
    use std::os::fd::AsRawFd;
    // SAFETY: bind reads `len` bytes of `addr`, a live local of that size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: listen takes integers only.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Accept one connection (blocking), non-blocking and close-on-exec.
pub fn accept(listener: &OwnedFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: accept4 with null address pointers writes nothing of ours.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` is a new connection nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}
