//! What the container and krun runtimes share about their per-sandbox directories
//! (`<data_dir>/sandboxes/<JOB.INDEX>/`, `<data_dir>/vms/<JOB.INDEX>/`): JSON records written
//! atomically, the `final.json` verdict, finding the directories again after a daemon restart,
//! the template a sandbox's root comes from, and the overlay mount over it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{ObservedState, RuntimeError, SandboxId};
use crate::template::{TemplateError, Templates, DEFAULT_TEMPLATE};

/// How it ended (`final.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Final {
    pub state: ObservedState,
    pub code: Option<i32>,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain records; a panic elsewhere does not make them unusable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| {
        RuntimeError::io(
            format!("encode {}", path.display()),
            std::io::Error::other(e),
        )
    })?;
    std::fs::write(&tmp, bytes)
        .map_err(|e| RuntimeError::io(format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| RuntimeError::io(format!("rename to {}", path.display()), e))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, RuntimeError> {
    let bytes =
        std::fs::read(path).map_err(|e| RuntimeError::io(format!("read {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        RuntimeError::io(
            format!("decode {}", path.display()),
            std::io::Error::other(e),
        )
    })
}

/// The directory of template `name`; the default template is made on first use.
pub fn template_dir(templates: &Templates, name: &str) -> Result<PathBuf, RuntimeError> {
    let missing = |e: TemplateError| RuntimeError::TemplateMissing {
        template: name.to_owned(),
        path: format!("{} ({e})", templates.root().join(name).display()),
    };
    match templates.path(name) {
        Ok(p) => Ok(p),
        Err(TemplateError::NotFound { .. }) if name == DEFAULT_TEMPLATE => {
            templates.ensure_busybox().map_err(missing)
        }
        Err(e) => Err(missing(e)),
    }
}

/// Clear a sandbox directory left without its record (a start that died half-way): unmount
/// its root and remove it. Nothing there is fine.
pub fn clear_debris(dir: &Path) -> Result<(), RuntimeError> {
    if !dir.exists() {
        return Ok(());
    }
    release_mounts(dir);
    std::fs::remove_dir_all(dir)
        .map_err(|e| RuntimeError::io(format!("clear {}", dir.display()), e))
}

/// The sandboxes that have a directory under `dir` (named `JOB.INDEX`), in id order; other
/// entries are ignored.
pub fn sandbox_ids(dir: &Path) -> Result<Vec<SandboxId>, RuntimeError> {
    let list = |e| RuntimeError::io(format!("list {}", dir.display()), e);
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(list)? {
        let entry = entry.map_err(list)?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<SandboxId>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}

pub fn cstring(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Mount an overlay of `lower` (read-only template) and `upper` (the sandbox's writes) on
/// `target`. Paths with `,` or `:` are refused: they would be read as overlay options.
pub fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
) -> std::io::Result<()> {
    for p in [lower, upper, work] {
        let b = p.as_os_str().as_bytes();
        if b.contains(&b',') || b.contains(&b':') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} contains `,` or `:` (overlay options)", p.display()),
            ));
        }
    }
    let options = CString::new(format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    ))
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    let target = cstring(target)?;
    // SAFETY: every pointer is a NUL-terminated C string (two literals, `target` and `options`
    // owned by this frame) that outlives the call; mount(2) only reads them.
    let rc = unsafe {
        libc::mount(
            c"overlay".as_ptr(),
            target.as_ptr(),
            c"overlay".as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(parent)) = (std::fs::metadata(path), path.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != me.dev())
}

/// Unmount what a sandbox directory holds: its root and, for a checkpointable container, its
/// network namespace file (`container::netns`). Lazily; not mounted is fine.
pub fn release_mounts(dir: &Path) {
    unmount(&dir.join("rootfs"));
    unmount(&dir.join("netns"));
}

/// Lazily unmount; not mounted is fine.
pub fn unmount(target: &Path) {
    let Ok(t) = cstring(target) else { return };
    // SAFETY: `t` is a NUL-terminated path owned by this frame for the whole call; umount2 only
    // reads it.
    let _ = unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_sandbox_dirs_are_found() {
        let dir = std::env::temp_dir().join(format!("surge-sandbox-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for name in ["3.1", "1.2", "not-a-sandbox", "1.10"] {
            std::fs::create_dir_all(dir.join(name)).expect("mkdir");
        }
        assert_eq!(
            sandbox_ids(&dir).expect("list"),
            vec![
                SandboxId::new(1, 2),
                SandboxId::new(1, 10),
                SandboxId::new(3, 1)
            ]
        );
        let path = dir.join("3.1/final.json");
        let f = Final {
            state: ObservedState::Exited { code: 3 },
            code: Some(3),
        };
        write_json_atomic(&path, &f).expect("write");
        let back: Final = read_json(&path).expect("read");
        assert_eq!((back.state, back.code), (f.state, f.code));
        assert!(
            !dir.join("3.1/final.json.tmp").exists(),
            "no temporary file is left"
        );
        assert!(read_json::<Final>(&dir.join("1.2/final.json")).is_err());
        let bad = dir.join("a,b");
        assert!(
            mount_overlay(&bad, &dir, &dir, &dir).is_err(),
            "option separators refused"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
