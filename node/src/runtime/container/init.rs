//! surge-init (`node/init/surge-init.c`): the static PID 1 of every container sandbox and the
//! wrapper of every exec. It reaps orphans (a `sleep` or a shell as PID 1 leaves zombies),
//! forwards SIGTERM to the command, and gives each exec a process group and a subreaper so a
//! cancel kills everything the command started. See the C file for its protocol.
//!
//! The binary is embedded in the node and written to `<data_dir>/bin/surge-init` when the
//! runtime starts; crun bind-mounts that file read-only at [`INIT_IN_SANDBOX`]. It is replaced
//! by rename, never rewritten in place, so running sandboxes keep the inode they mounted.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::runtime::RuntimeError;

/// The static binary built by `node/build.rs`.
pub const INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/surge-init"));

/// Where the init is mounted inside every sandbox: on the sandbox's own /dev tmpfs, so no
/// template needs a place for it and the root filesystem keeps no trace of it.
pub const INIT_IN_SANDBOX: &str = "/dev/.surge-init";

/// `config.json`'s `process.args`: the init, then the command (none: a long-lived sandbox).
pub fn init_args(command: &[String]) -> Vec<String> {
    let mut args = vec![INIT_IN_SANDBOX.to_owned(), "init".to_owned()];
    args.extend(command.iter().cloned());
    args
}

/// `process.args` of one exec: the wrapper, then the command.
pub fn exec_args(command: &[String]) -> Vec<String> {
    let mut args = vec![INIT_IN_SANDBOX.to_owned(), "exec".to_owned()];
    args.extend(command.iter().cloned());
    args
}

/// Write the init to `<data_dir>/bin/surge-init` unless it is there already; its path.
pub fn install(data_dir: &Path) -> Result<PathBuf, RuntimeError> {
    let dir = data_dir.join("bin");
    let path = dir.join("surge-init");
    if std::fs::read(&path).is_ok_and(|b| b == INIT_BINARY) {
        return Ok(path);
    }
    let ctx = |what: &str| format!("{what} {}", path.display());
    std::fs::create_dir_all(&dir)
        .map_err(|e| RuntimeError::io(ctx("create the directory of"), e))?;
    let tmp = dir.join(format!("surge-init.tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| RuntimeError::io(ctx("create"), e))?;
    f.write_all(INIT_BINARY)
        .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(0o555)))
        .and_then(|()| f.sync_all())
        .map_err(|e| RuntimeError::io(ctx("write"), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| RuntimeError::io(ctx("install"), e))?;
    Ok(path)
}
