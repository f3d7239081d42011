//! A checkpointable sandbox's network namespace, made by the daemon and kept as a file
//! (`<bundle>/netns`, a bind mount of the namespace) that the bundle's `config.json` names.
//!
//! Why not let crun make it: CRIU dumps and restores a network namespace it owns by running
//! `ip rule/route/addr save|restore` and `iptables-restore` — about 65 ms of each restore here
//! (a third of a 64 MiB restore), and as much again in every fork. A namespace named by path is
//! one crun declares *external* to CRIU (`net[INO]:extRootNetNS`) and hands back on restore
//! (`--inherit-fd`), so CRIU leaves it alone: a restore re-enters the sandbox's own namespace
//! (kept while the sandbox is checkpointed), a fork enters its fresh one. Sandboxes have only
//! `lo` (no network is configured), which the daemon brings up as crun would.
//!
//! The file is unmounted with the root (`sandbox_dir::release_mounts`) when the sandbox ends;
//! the namespace goes with its last user.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::runtime::RuntimeError;

/// The namespace file of a bundle.
pub fn path(bundle: &Path) -> std::path::PathBuf {
    bundle.join("netns")
}

/// A new network namespace with `lo` up, bound at `<bundle>/netns`.
pub fn create(bundle: &Path) -> Result<(), RuntimeError> {
    let target = path(bundle);
    let err = |what: &str, e: std::io::Error| {
        RuntimeError::io(format!("{what} for {}", target.display()), e)
    };
    std::fs::File::create(&target).map_err(|e| err("create the namespace file", e))?;
    let c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| RuntimeError::Cgroup(format!("path {} contains NUL", target.display())))?;
    // A thread of its own: unshare(CLONE_NEWNET) moves only the calling thread, which ends
    // once the namespace is bound to the file (the daemon's other threads never enter it).
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || enter_and_bind(&c))
        .map_err(|e| err("spawn the thread that makes the network namespace", e))?
        .join()
        .map_err(|_| {
            err(
                "make the network namespace",
                std::io::Error::other("panicked"),
            )
        })?
        .map_err(|e| err("make the network namespace", e))
}

/// In a thread that ends right after: a new network namespace, `lo` up, bound at `target`.
fn enter_and_bind(target: &CString) -> std::io::Result<()> {
    // SAFETY: unshare takes no pointers; it affects only this thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    loopback_up()?;
    let source = c"/proc/thread-self/ns/net";
    // SAFETY: both paths are NUL-terminated strings that outlive the call; the null fs type
    // and data are allowed for a bind mount.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `ip link set lo up` in the calling thread's network namespace.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket takes no pointers; the fd is closed below on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an all-zero ifreq is a valid value; its name is set before use.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: `req` is a live ifreq for the whole call; SIOCGIFFLAGS fills its flags.
    let mut rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    if rc == 0 {
        // SAFETY: after SIOCGIFFLAGS the union holds the flags.
        unsafe {
            req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
        }
        // SAFETY: as above; SIOCSIFFLAGS reads the name and flags.
        rc = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) };
    }
    let result = if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    result
}

/// Point the spec's network namespace at `<bundle>/netns`.
pub fn name_in_config(config: &mut serde_json::Value, bundle: &Path) -> Result<(), String> {
    let namespaces = config["linux"]["namespaces"]
        .as_array_mut()
        .ok_or("the spec has no namespaces")?;
    let net = namespaces
        .iter_mut()
        .find(|n| n["type"] == "network")
        .ok_or("the spec has no network namespace")?;
    net["path"] = path(bundle).display().to_string().into();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_names_the_bundles_namespace_file() {
        let mut config = serde_json::json!({
            "linux": { "namespaces": [{ "type": "pid" }, { "type": "network" }] }
        });
        name_in_config(&mut config, Path::new("/data/sandboxes/4.2")).expect("named");
        assert_eq!(
            config["linux"]["namespaces"][1]["path"],
            "/data/sandboxes/4.2/netns"
        );
        assert!(config["linux"]["namespaces"][0].get("path").is_none());
        let mut bare = serde_json::json!({ "linux": { "namespaces": [{ "type": "pid" }] } });
        assert!(name_in_config(&mut bare, Path::new("/b")).is_err());
    }

    #[test]
    fn a_made_namespace_is_a_new_one_with_loopback_up() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::testing::unavailable("needs root (unshare, mount)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        create(dir.path()).expect("create");
        let file = path(dir.path());
        use std::os::unix::fs::MetadataExt;
        let bound = std::fs::metadata(&file).expect("stat").ino();
        let own = std::fs::metadata("/proc/self/ns/net").expect("stat").ino();
        assert_ne!(bound, own, "a new namespace, not the daemon's");
        // Inside it (a thread that enters it): only lo, and lo is up (127.0.0.1 is bound only
        // on an up loopback).
        let f = std::fs::File::open(&file).expect("open");
        let (devices, bind) = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: `f` is an open namespace file for the whole call.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").expect("net/dev");
            let names: Vec<String> = dev
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
                .collect();
            (names, std::net::UdpSocket::bind("127.0.0.1:0").is_ok())
        })
        .join()
        .expect("thread");
        assert_eq!(devices, vec!["lo".to_owned()]);
        assert!(bind, "lo is up");
        crate::runtime::sandbox_dir::release_mounts(dir.path());
        assert!(
            std::fs::remove_file(&file).is_ok(),
            "unmounted, so removable"
        );
    }
}
