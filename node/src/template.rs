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

pub const TEMPLATE_NAME_MAX: usize = 64;
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

    /// Copy a directory tree (ownership, modes and symlinks kept) as a new template.
    pub fn import_dir(&self, name: &str, source: &Path) -> Result<PathBuf, TemplateError> {
        validate_name(name)?;
        if !source.is_dir() {
            return Err(io(format!("import {}", source.display()))(
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        let mut from = source.as_os_str().to_owned();
        from.push("/.");
        self.install(name, |staging| {
            run(Command::new("cp").arg("-a").arg(&from).arg(staging))
        })
    }

    /// Unpack a tarball (any compression `tar` recognises) as a new template.
    pub fn import_tarball(&self, name: &str, tarball: &Path) -> Result<PathBuf, TemplateError> {
        validate_name(name)?;
        self.install(name, |staging| {
            run(Command::new("tar")
                .arg("--extract")
                .arg("--numeric-owner")
                .arg("--same-permissions")
                .arg("--file")
                .arg(tarball)
                .arg("--directory")
                .arg(staging))
        })
    }

    /// Build in a staging directory, then rename into place.
    fn install(
        &self,
        name: &str,
        build: impl FnOnce(&Path) -> Result<(), TemplateError>,
    ) -> Result<PathBuf, TemplateError> {
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
        let staging = self
            .root
            .join(format!(".staging-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&staging).map_err(io(format!("create {}", staging.display())))?;
        set_mode(&staging, 0o755)?;
        let result = build(&staging).and_then(|()| {
            std::fs::rename(&staging, &path).map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST | libc::ENOTEMPTY) => TemplateError::Exists {
                    name: name.to_owned(),
                    path: path.clone(),
                },
                _ => io(format!("rename into {}", path.display()))(e),
            })
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result.map(|()| path)
    }
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
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("surge-template-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn names_are_validated() {
        for ok in ["busybox", "python-3.12", "a", "ubuntu_24.04"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(TEMPLATE_NAME_MAX + 1);
        for bad in [
            "",
            "..",
            ".",
            ".hidden",
            "a/b",
            "../etc",
            "a b",
            "a,b",
            "a:b",
            long.as_str(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn applet_list_parsing_drops_junk() {
        assert_eq!(
            parse_applet_list("sh\n\n sleep \n../x\n.\necho\n"),
            vec!["sh", "sleep", "echo"]
        );
    }

    #[test]
    fn busybox_template_then_import_and_list() {
        if !Path::new(HOST_BUSYBOX).is_file() {
            eprintln!("SKIP: {HOST_BUSYBOX} missing; apt-get install -y busybox-static");
            return;
        }
        let data = scratch("bb");
        let templates = Templates::new(&data);
        let bb = templates.ensure_busybox().expect("busybox template");
        assert_eq!(templates.ensure_busybox().expect("idempotent"), bb);
        for applet in ["sh", "sleep", "echo", "cat", "yes", "head", "dd"] {
            let link = bb.join("bin").join(applet);
            assert_eq!(
                std::fs::read_link(&link).expect("applet link"),
                Path::new("busybox"),
                "{applet}"
            );
        }
        let out = Command::new(bb.join("bin/sh"))
            .args(["-c", "echo ok"])
            .output()
            .expect("run template sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");

        templates.import_dir("copy", &bb).expect("import dir");
        assert!(matches!(
            templates.import_dir("copy", &bb),
            Err(TemplateError::Exists { .. })
        ));
        let tarball = data.join("bb.tar");
        run(Command::new("tar")
            .arg("-cf")
            .arg(&tarball)
            .arg("-C")
            .arg(&bb)
            .arg("."))
        .expect("tar");
        templates
            .import_tarball("from-tar", &tarball)
            .expect("import tarball");
        assert!(templates
            .path("from-tar")
            .expect("path")
            .join("bin/busybox")
            .is_file());
        assert!(templates
            .import_tarball("broken", &data.join("missing.tar"))
            .is_err());
        assert_eq!(
            templates.list().expect("list"),
            vec!["busybox", "copy", "from-tar"]
        );
        assert!(matches!(
            templates.path("nope"),
            Err(TemplateError::NotFound { .. })
        ));
        std::fs::remove_dir_all(&data).expect("cleanup");
    }
}
