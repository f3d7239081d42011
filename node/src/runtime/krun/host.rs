//! What a host needs for microVMs, found once at start-up: libkrun and its guest kernel
//! libkrunfw (where they are looked for), and the decision whether the krun runtime can run here.

use std::path::{Path, PathBuf};

use super::ffi;
use crate::detect::Virtualization;

/// The guest kernel library libkrun loads (by this soname).
pub const KRUNFW_FILE: &str = "libkrunfw.so.5";
/// The VMM library.
pub const LIBKRUN_FILE: &str = "libkrun.so.1";

/// Where the krun pieces are looked for, in order: next to the `surge` binary (where
/// `scripts/setup-krun` can put them), the daemon's data dir, the setup script's default
/// (`~/.cache/surge/krun`), then the system library directories.
pub fn search_dirs(data_dir: &Path, exe_dir: Option<&Path>, home: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    dirs.extend(exe_dir.map(Path::to_path_buf));
    dirs.push(data_dir.join("krun"));
    dirs.extend(home.map(|h| h.join(".cache/surge/krun")));
    for d in [
        "/usr/local/lib",
        "/usr/local/lib64",
        "/usr/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// What this host has for microVMs, found once at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KrunHost {
    /// `libkrunfw.so.5`, the guest kernel.
    pub krunfw: Option<PathBuf>,
    /// `Ok(Some(path))`: libkrun found at a path; `Ok(None)`: loadable by soname; `Err`: why not.
    pub libkrun: Result<Option<PathBuf>, String>,
}

impl KrunHost {
    /// Look in [`search_dirs`]; libkrun not found there is tried by soname with `dlopen`.
    pub fn probe(data_dir: &Path) -> Self {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let dirs = search_dirs(data_dir, exe_dir.as_deref(), home.as_deref());
        let find = |file: &str| dirs.iter().map(|d| d.join(file)).find(|p| p.is_file());
        let libkrun = match find(LIBKRUN_FILE) {
            Some(p) => Ok(Some(p)),
            None => ffi::DlKrun::load(None).map(|_| None).map_err(|e| {
                format!(
                    "libkrun is not installed (no {LIBKRUN_FILE} in {} or the library path: {e})",
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        };
        Self {
            krunfw: find(KRUNFW_FILE),
            libkrun,
        }
    }
}

/// Why this host cannot run microVMs, or `None` when it can. Pure: the runtime selection's
/// decision, in the order an operator fixes things.
pub fn unavailable_reason(virtualization: &Virtualization, host: &KrunHost) -> Option<String> {
    if let Virtualization::Unavailable { reason, note } = virtualization {
        return Some(match note {
            Some(note) => format!("{reason} ({note})"),
            None => reason.clone(),
        });
    }
    if host.krunfw.is_none() {
        return Some(format!(
            "the guest kernel {KRUNFW_FILE} is not installed (run scripts/setup-krun)"
        ));
    }
    if let Err(why) = &host.libkrun {
        return Some(why.clone());
    }
    None
}
