//! Single files and listings of a container sandbox, through [`resolve`](super::resolve): read,
//! write (a temporary file renamed over the target, so a reader never sees half a file and a
//! symlink at the target is replaced, not followed), list.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::resolve::{
    io_error, lstat_at, open_name, proc_fd_path, rename_at, split_parent, unlink_at, SandboxRoot,
};
use crate::runtime::io::{
    DirEntry, EntryKind, IoError, Listing, WriteSpec, CHUNK_BYTES, FILE_BYTES_MAX, LIST_ENTRIES_MAX,
};

/// Names read from one directory before sorting and cutting to [`LIST_ENTRIES_MAX`].
pub const LIST_SCAN_MAX: usize = 10 * LIST_ENTRIES_MAX;
/// Permission bits a file written through the API may have (no setuid, setgid or sticky).
pub const MODE_BITS: u32 = 0o777;

/// What the async side of a write sends the thread that writes.
pub enum Piece {
    Data(Bytes),
    /// The stream ended normally: commit the file. (The channel closing without it: cancel.)
    End,
}

pub fn caller_gone() -> IoError {
    IoError::Runtime("the caller went away".into())
}

/// A name for a temporary file next to its target, unique within this process.
pub fn temp_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        ".surge-tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn kind_of(mode: libc::mode_t) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

/// Open a regular file for reading: resolved as `O_PATH` first, so a FIFO or a device is
/// refused before it is opened (opening one could block or act), then reopened through our own
/// descriptor.
pub fn open_regular(root: &SandboxRoot, path: &str) -> Result<(std::fs::File, u64), IoError> {
    let fd = root.open(path, libc::O_PATH, 0)?;
    let st = super::resolve::fstat(fd.as_fd()).map_err(|e| io_error(path, "stat", e))?;
    if kind_of(st.st_mode) != EntryKind::File {
        return Err(IoError::WrongKind {
            path: path.into(),
            what: "is not a regular file".into(),
        });
    }
    let file =
        std::fs::File::open(proc_fd_path(fd.as_fd())).map_err(|e| io_error(path, "open", e))?;
    Ok((file, u64::try_from(st.st_size).unwrap_or(0)))
}

/// Stream a regular file to `out` in chunks; its size.
pub fn read_file(
    root: &SandboxRoot,
    path: &str,
    out: &mpsc::Sender<Bytes>,
) -> Result<u64, IoError> {
    let (file, size) = open_regular(root, path)?;
    if size > FILE_BYTES_MAX {
        return Err(IoError::TooLarge(format!(
            "{path} has {size} bytes; files are read up to {FILE_BYTES_MAX} bytes (download it as an archive)"
        )));
    }
    let mut file = file.take(FILE_BYTES_MAX);
    let mut sent = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let n = file.read(&mut buf).map_err(|e| io_error(path, "read", e))?;
        if n == 0 {
            return Ok(sent);
        }
        buf.truncate(n);
        sent += u64::try_from(n).unwrap_or(0);
        out.blocking_send(Bytes::from(buf))
            .map_err(|_| caller_gone())?;
    }
}

/// Write a file from `pieces`: a temporary file in the target's directory, renamed over the
/// target once [`Piece::End`] arrives. Over [`FILE_BYTES_MAX`] or cancelled: no file is left.
pub fn write_file(
    root: &SandboxRoot,
    spec: &WriteSpec,
    pieces: &mut mpsc::Receiver<Piece>,
) -> Result<u64, IoError> {
    let path = spec.path.as_str();
    let (parent, name) = split_parent(path).ok_or_else(|| IoError::WrongKind {
        path: path.into(),
        what: "names a directory, not a file".into(),
    })?;
    let dir = root.dir(&parent, spec.make_parents)?;
    // A directory there cannot be replaced by a file: say so before writing anything.
    if let Ok(st) = lstat_at(dir.as_fd(), name) {
        if kind_of(st.st_mode) == EntryKind::Dir {
            return Err(IoError::WrongKind {
                path: path.into(),
                what: "is a directory".into(),
            });
        }
    }
    let tmp = temp_name();
    let written = write_temp(&dir, &tmp, spec.mode & MODE_BITS, path, pieces).and_then(|n| {
        rename_at(dir.as_fd(), &tmp, name)
            .map(|()| n)
            .map_err(|e| io_error(path, "replace", e))
    });
    if written.is_err() {
        unlink_at(dir.as_fd(), &tmp);
    }
    written
}

/// Create `tmp` in `dir` and fill it from `pieces`; bytes written.
fn write_temp(
    dir: &OwnedFd,
    tmp: &str,
    mode: u32,
    path: &str,
    pieces: &mut mpsc::Receiver<Piece>,
) -> Result<u64, IoError> {
    let fd = open_name(
        dir.as_fd(),
        tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        mode,
    )
    .map_err(|e| io_error(path, "create", e))?;
    let mut file = std::fs::File::from(fd);
    let mut total = 0u64;
    loop {
        match pieces.blocking_recv() {
            Some(Piece::Data(b)) => {
                total += u64::try_from(b.len()).unwrap_or(u64::MAX);
                if total > FILE_BYTES_MAX {
                    return Err(IoError::TooLarge(format!(
                        "{path}: more than {FILE_BYTES_MAX} bytes; nothing was written"
                    )));
                }
                file.write_all(&b).map_err(|e| io_error(path, "write", e))?;
            }
            Some(Piece::End) => break,
            None => return Err(caller_gone()),
        }
    }
    // The umask applied at creation: set the mode asked for.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| io_error(path, "chmod", e))?;
    Ok(total)
}

/// The entries of a directory, sorted by name, at most [`LIST_ENTRIES_MAX`].
pub fn list_dir(root: &SandboxRoot, path: &str) -> Result<Listing, IoError> {
    let dir = root.open(path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut names = Vec::new();
    let mut truncated = false;
    let read =
        std::fs::read_dir(proc_fd_path(dir.as_fd())).map_err(|e| io_error(path, "list", e))?;
    for entry in read {
        let entry = entry.map_err(|e| io_error(path, "list", e))?;
        if names.len() == LIST_SCAN_MAX {
            truncated = true;
            break;
        }
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    if names.len() > LIST_ENTRIES_MAX {
        names.truncate(LIST_ENTRIES_MAX);
        truncated = true;
    }
    let mut entries = Vec::with_capacity(names.len());
    for name in names {
        // Gone since it was listed: skip it.
        let Ok(st) = lstat_at(dir.as_fd(), &name) else {
            continue;
        };
        entries.push(DirEntry {
            kind: kind_of(st.st_mode),
            size: u64::try_from(st.st_size).unwrap_or(0),
            mode: st.st_mode & 0o7777,
            modified_ms: u64::try_from(st.st_mtime)
                .unwrap_or(0)
                .saturating_mul(1000)
                .saturating_add(u64::try_from(st.st_mtime_nsec / 1_000_000).unwrap_or(0)),
            uid: st.st_uid,
            gid: st.st_gid,
            name,
        });
    }
    Ok(Listing { entries, truncated })
}
