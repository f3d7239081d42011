//! Sandbox templates: root filesystem directories under `<data_dir>/templates/<name>/`, used
//! read-only as the lower layer of every sandbox's root (see `runtime::container`).
//!
//! `busybox` is made on the spot from the host's static busybox (Debian's `busybox-static`), so a
//! node runs its first job with no preparation. Others are imported from a directory or a tarball.
//! Every template is assembled in a hidden staging directory and renamed into place, so a
//! half-written template is never visible under its name.
//!
//! These functions do blocking file I/O; the daemon calls them from `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

mod archive;
pub mod transfer;

pub use archive::{check_members, Member, MemberKind};

pub const TEMPLATE_NAME_MAX: usize = 64;
/// Templates one node may hold: the most a node may declare when it registers (the scheduler's
/// `TEMPLATES_PER_NODE_MAX`).
pub const TEMPLATES_MAX: usize = 1024;
/// Largest template an import accepts, in bytes of file content (the sum of regular files'
/// sizes): a root filesystem for agents is tens to hundreds of MiB; 8 GiB is a typo or the
/// wrong directory, and would fill the node's disk.
pub const TEMPLATE_BYTES_MAX: u64 = 8 << 30;
/// Most files, directories and links one import accepts.
pub const TEMPLATE_ENTRIES_MAX: u64 = 2_000_000;
/// Directories every template gets (mount points and the sandbox's working directory), made
/// when an import lacks them.
const TEMPLATE_DIRS: &[&str] = &["dev", "proc", "sys", "tmp", "work"];
pub const DEFAULT_TEMPLATE: &str = "busybox";
/// Where Debian's `busybox-static` installs its binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// The unprivileged user sandboxes run as (also in the templates' /etc/passwd).
pub const SANDBOX_UID: u32 = 1000;
pub const SANDBOX_GID: u32 = 1000;

/// Applets linked when `busybox --list` cannot be run.
const BUSYBOX_APPLETS_FALLBACK: &[&str] = &[
    "sh",
    "ash",
    "sleep",
    "echo",
    "cat",
    "yes",
    "head",
    "tail",
    "dd",
    "ls",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "env",
    "true",
    "false",
    "test",
    "[",
    "seq",
    "wc",
    "grep",
    "sed",
    "awk",
    "sort",
    "uniq",
    "tr",
    "cut",
    "printf",
    "kill",
    "ps",
    "id",
    "date",
    "touch",
    "chmod",
    "stat",
    "find",
    "xargs",
    "tee",
    "hostname",
    "ip",
    "free",
    "uname",
    "pwd",
    "which",
    "md5sum",
    "sha256sum",
    "tar",
    "gzip",
    "gunzip",
    "vi",
    "wget",
];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template name `{name}` is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("template `{name}` already exists at {path}; pick another name or remove it first")]
    Exists { name: String, path: PathBuf },
    #[error("template `{name}` is not installed (no directory {path})")]
    NotFound { name: String, path: PathBuf },
    #[error("{path} not found: install Debian's busybox-static (apt-get install -y busybox-static) to get the default template")]
    BusyboxMissing { path: PathBuf },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("this node holds {held} templates, the most it may declare; remove one first")]
    TooMany { held: usize },
    #[error("cannot import {path}: no such file or directory")]
    SourceMissing { path: PathBuf },
    #[error("{path} is larger than a template may be: {what} (at most {max}); check the path or import a smaller root filesystem")]
    TooLarge {
        path: PathBuf,
        what: String,
        max: String,
    },
    #[error("{path} escapes its root: member `{member}` {why}; refusing to unpack it")]
    Escapes {
        path: PathBuf,
        member: String,
        why: &'static str,
    },
    #[error("{path} does not look like a root filesystem: {why}")]
    NotARootfs { path: PathBuf, why: String },
    #[error("the copy of template `{name}` is damaged: {why}; nothing was imported")]
    Damaged { name: String, why: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TemplateError {
    let context = context.into();
    move |source| TemplateError::Io { context, source }
}

/// Names become path components and overlay mount options: letters, digits, `.`, `_`, `-`,
/// not starting with a dot, at most [`TEMPLATE_NAME_MAX`] bytes.
pub fn validate_name(name: &str) -> Result<(), TemplateError> {
    let bad = |reason| {
        Err(TemplateError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > TEMPLATE_NAME_MAX {
        return bad("it is longer than 64 bytes");
    }
    if name.starts_with('.') {
        return bad("it starts with `.` (hidden, `.` and `..` are reserved)");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad(
            "only letters, digits, `.`, `_` and `-` are allowed (no `/`, spaces, `,` or `:`)",
        );
    }
    Ok(())
}

/// The templates of one node.
#[derive(Clone, Debug)]
pub struct Templates {
    root: PathBuf,
}

impl Templates {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("templates"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of an installed template.
    pub fn path(&self, name: &str) -> Result<PathBuf, TemplateError> {
        validate_name(name)?;
        let path = self.root.join(name);
        if !path.is_dir() {
            return Err(TemplateError::NotFound {
                name: name.to_owned(),
                path,
            });
        }
        Ok(path)
    }

    /// Installed template names, sorted.
    pub fn list(&self) -> Result<Vec<String>, TemplateError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("list {}", self.root.display()))(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(format!("list {}", self.root.display())))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_name(&name).is_ok() && entry.path().is_dir() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Make sure the default `busybox` template exists; returns its directory.
    pub fn ensure_busybox(&self) -> Result<PathBuf, TemplateError> {
        let path = self.root.join(DEFAULT_TEMPLATE);
        if path.is_dir() {
            return Ok(path);
        }
        match self.create_busybox(DEFAULT_TEMPLATE, Path::new(HOST_BUSYBOX)) {
            // Another caller made it meanwhile.
            Err(TemplateError::Exists { path, .. }) => Ok(path),
            other => other,
        }
    }

    /// A minimal root filesystem: a static busybox, a symlink per applet, /etc basics.
    pub fn create_busybox(&self, name: &str, busybox: &Path) -> Result<PathBuf, TemplateError> {
        validate_name(name)?;
        if !busybox.is_file() {
            return Err(TemplateError::BusyboxMissing {
                path: busybox.to_owned(),
            });
        }
        self.install(name, |staging| {
            for dir in ["bin", "dev", "proc", "sys", "tmp", "etc", "root", "work", "usr/bin"] {
                std::fs::create_dir_all(staging.join(dir)).map_err(io(format!("create {dir} in template")))?;
            }
            set_mode(&staging.join("tmp"), 0o1777)?;
            let target = staging.join("bin/busybox");
            std::fs::copy(busybox, &target).map_err(io(format!("copy {}", busybox.display())))?;
            set_mode(&target, 0o755)?;
            for applet in busybox_applets(busybox) {
                if applet == "busybox" {
                    continue;
                }
                let link = staging.join("bin").join(&applet);
                if !link.exists() {
                    std::os::unix::fs::symlink("busybox", &link).map_err(io(format!("link applet {applet}")))?;
                }
            }
            let files = [
                ("etc/passwd", format!(
                    "root:x:0:0:root:/root:/bin/sh\nsandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:/work:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                )),
                ("etc/group", format!("root:x:0:\nsandbox:x:{SANDBOX_GID}:\nnogroup:x:65534:\n")),
                ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n".to_owned()),
            ];
            for (file, content) in files {
                std::fs::write(staging.join(file), content).map_err(io(format!("write {file}")))?;
            }
            Ok(())
        })
    }

    /// Import `source`, a directory or a tarball, as template `name` (what
    /// `surge template import` does).
    pub fn import(&self, name: &str, source: &Path) -> Result<PathBuf, TemplateError> {
        validate_name(name)?;
        let held = self.list()?.len();
        if held >= TEMPLATES_MAX {
            return Err(TemplateError::TooMany { held });
        }
        match std::fs::metadata(source) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(TemplateError::SourceMissing {
                    path: source.to_owned(),
                })
            }
            Err(e) => Err(io(format!("import {}", source.display()))(e)),
            Ok(m) if m.is_dir() => self.import_dir(name, source),
            Ok(_) => self.import_tarball(name, source),
        }
    }

    /// Copy a directory tree (ownership, modes and symlinks kept) as a new template.
    pub fn import_dir(&self, name: &str, source: &Path) -> Result<PathBuf, TemplateError> {
        validate_name(name)?;
        if !source.is_dir() {
            return Err(TemplateError::SourceMissing {
                path: source.to_owned(),
            });
        }
        let size = tree_size(source)?;
        check_size(source, size)?;
        let mut from = source.as_os_str().to_owned();
        from.push("/.");
        self.install(name, |staging| {
            run(Command::new("cp").arg("-a").arg(&from).arg(staging))?;
            finish_rootfs(source, staging)
        })
    }

    /// Unpack a tarball (any compression `tar` recognises) as a new template. Its members are
    /// checked first (see [`check_members`]): no absolute or `..` member, none that goes through
    /// a symlink of the archive, no hard link out of it, and at most [`TEMPLATE_BYTES_MAX`] of
    /// content. GNU tar then unpacks it, keeping numeric owners and modes.
    pub fn import_tarball(&self, name: &str, tarball: &Path) -> Result<PathBuf, TemplateError> {
        validate_name(name)?;
        if !tarball.is_file() {
            return Err(TemplateError::SourceMissing {
                path: tarball.to_owned(),
            });
        }
        let size = archive::check_archive(tarball)?;
        check_size(tarball, size)?;
        self.install(name, |staging| {
            run(Command::new("tar")
                .arg("--extract")
                .arg("--numeric-owner")
                .arg("--same-permissions")
                .arg("--no-overwrite-dir")
                .arg("--file")
                .arg(tarball)
                .arg("--directory")
                .arg(staging))?;
            finish_rootfs(tarball, staging)
        })
    }

    /// Build in a staging directory, then rename into place.
    fn install(
        &self,
        name: &str,
        build: impl FnOnce(&Path) -> Result<(), TemplateError>,
    ) -> Result<PathBuf, TemplateError> {
        let staging = self.stage_unchecked(name)?;
        build(staging.dir())?;
        staging.rename()
    }

    /// A staging directory for a new template `name` (checked: a valid name, not installed
    /// yet, room for one more). Fill it, then [`Staging::commit`]; dropping it removes it.
    pub fn stage(&self, name: &str) -> Result<Staging, TemplateError> {
        validate_name(name)?;
        let held = self.list()?.len();
        if held >= TEMPLATES_MAX {
            return Err(TemplateError::TooMany { held });
        }
        self.stage_unchecked(name)
    }

    fn stage_unchecked(&self, name: &str) -> Result<Staging, TemplateError> {
        let path = self.root.join(name);
        if path.exists() {
            return Err(TemplateError::Exists {
                name: name.to_owned(),
                path,
            });
        }
        std::fs::create_dir_all(&self.root)
            .map_err(io(format!("create {}", self.root.display())))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = self
            .root
            .join(format!(".staging-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
        let staging = Staging {
            dir,
            target: path,
            name: name.to_owned(),
            done: false,
        };
        set_mode(&staging.dir, 0o755)?;
        Ok(staging)
    }
}

/// A template being assembled in a hidden directory of the templates root, invisible under its
/// name until [`Staging::commit`] renames it there; dropped uncommitted, it is removed.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    target: PathBuf,
    name: String,
    done: bool,
}

impl Staging {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Check that the staging directory holds a root filesystem (see `finish_rootfs`;
    /// `source` names where it came from in errors), flush it to disk, and rename it into
    /// place.
    pub fn commit(self, source: &Path) -> Result<PathBuf, TemplateError> {
        finish_rootfs(source, &self.dir)?;
        sync_filesystem(&self.dir)?;
        self.rename()
    }

    fn rename(mut self) -> Result<PathBuf, TemplateError> {
        std::fs::rename(&self.dir, &self.target).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST | libc::ENOTEMPTY) => TemplateError::Exists {
                name: self.name.clone(),
                path: self.target.clone(),
            },
            _ => io(format!("rename into {}", self.target.display()))(e),
        })?;
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Flush the filesystem holding `dir` (the new template's files) before it is renamed into
/// place: a template is whole on disk before it has a name.
fn sync_filesystem(dir: &Path) -> Result<(), TemplateError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).map_err(io(format!("open {}", dir.display())))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc != 0 {
        return Err(io(format!("sync {}", dir.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Copy a directory tree (a sandbox's root, seen through its overlay) into `staging`, owners,
/// modes and links kept; refused past the template caps before anything is copied.
pub fn copy_tree(source: &Path, staging: &Staging) -> Result<TreeSize, TemplateError> {
    let size = tree_size(source)?;
    check_size(source, size)?;
    let mut from = source.as_os_str().to_owned();
    from.push("/.");
    run(Command::new("cp").arg("-a").arg(&from).arg(staging.dir()))?;
    Ok(size)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), TemplateError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))
}

fn busybox_applets(busybox: &Path) -> Vec<String> {
    match Command::new(busybox).arg("--list").output() {
        Ok(out) if out.status.success() => parse_applet_list(&String::from_utf8_lossy(&out.stdout)),
        _ => BUSYBOX_APPLETS_FALLBACK
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
    }
}

/// One applet per line; anything that is not a plain file name is dropped.
pub fn parse_applet_list(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "." && *a != "..")
        .map(str::to_owned)
        .collect()
}

/// What a tree holds: bytes of file content and entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeSize {
    pub bytes: u64,
    pub entries: u64,
}

pub(crate) fn check_size(path: &Path, size: TreeSize) -> Result<(), TemplateError> {
    if size.bytes > TEMPLATE_BYTES_MAX {
        return Err(TemplateError::TooLarge {
            path: path.to_owned(),
            what: format!("{} MiB of files", size.bytes >> 20),
            max: format!("{} MiB", TEMPLATE_BYTES_MAX >> 20),
        });
    }
    if size.entries > TEMPLATE_ENTRIES_MAX {
        return Err(TemplateError::TooLarge {
            path: path.to_owned(),
            what: format!("{} entries", size.entries),
            max: format!("{TEMPLATE_ENTRIES_MAX} entries"),
        });
    }
    Ok(())
}

/// Sizes of a directory tree, not following symlinks; stops counting past the caps.
fn tree_size(root: &Path) -> Result<TreeSize, TemplateError> {
    let mut size = TreeSize::default();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(io(format!("read {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io(format!("read {}", dir.display())))?;
            let meta = entry
                .metadata()
                .map_err(io(format!("stat {}", entry.path().display())))?;
            size.entries += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                size.bytes = size.bytes.saturating_add(meta.len());
            }
            if size.bytes > TEMPLATE_BYTES_MAX || size.entries > TEMPLATE_ENTRIES_MAX {
                return Ok(size);
            }
        }
    }
    Ok(size)
}

/// Check that `staging` looks like a root filesystem, and add the directories every template
/// needs.
fn finish_rootfs(source: &Path, staging: &Path) -> Result<(), TemplateError> {
    let mut top: Vec<String> = std::fs::read_dir(staging)
        .map_err(io(format!("read {}", staging.display())))?
        .filter_map(|e| {
            e.ok()
                .and_then(|e| e.file_name().to_str().map(str::to_owned))
        })
        .collect();
    top.sort();
    if top.is_empty() {
        return Err(TemplateError::NotARootfs {
            path: source.to_owned(),
            why: "it is empty".into(),
        });
    }
    if !top
        .iter()
        .any(|t| matches!(t.as_str(), "bin" | "usr" | "sbin"))
    {
        let why = match top.as_slice() {
            [only] => format!(
                "it holds a single directory `{only}` and no bin/ or usr/ at its top; pack the root itself (tar -C {only} -cf t.tar .)"
            ),
            _ => format!("no bin/, sbin/ or usr/ at its top (it has {})", top.join(", ")),
        };
        return Err(TemplateError::NotARootfs {
            path: source.to_owned(),
            why,
        });
    }
    for dir in TEMPLATE_DIRS {
        let p = staging.join(dir);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::create_dir(&p).map_err(io(format!("create {dir} in template")))?;
            set_mode(&p, if *dir == "tmp" { 0o1777 } else { 0o755 })?;
        }
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<(), TemplateError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(io(format!("run {command}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(TemplateError::Command {
        command,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests;
