//! Directories in and out of a container sandbox as tar streams, through
//! [`resolve`](super::resolve). A download walks the tree by directory descriptors, one name at
//! a time with `O_NOFOLLOW` (symlinks travel as symlinks, never followed). An upload checks each
//! member ([`check_member`]) and writes it below the target directory, walking the member's
//! directories with `O_NOFOLLOW`: a member is never written through a symlink, whether the
//! sandbox made it or an earlier member of the same archive did. Members are written as they
//! come: a refused member stops the upload with an error naming it, after the members before it.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::files::{caller_gone, kind_of, temp_name, Piece, MODE_BITS};
use super::resolve::{
    fstat, io_error, lstat_at, mkdir_at, open_name, proc_fd_path, readlink_at, rename_at,
    split_parent, symlink_at, unlink_at, SandboxRoot,
};
use crate::runtime::io::{
    check_member, EntryKind, IoError, MemberKind, UploadStats, CHUNK_BYTES, FILE_BYTES_MAX,
    PATH_BYTES_MAX, UPLOAD_BYTES_MAX, UPLOAD_ENTRIES_MAX,
};

/// Writes the archive to `out` in chunks of [`CHUNK_BYTES`], counting.
struct ChunkWriter<'a> {
    out: &'a mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    sent: u64,
}

impl ChunkWriter<'_> {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.sent += u64::try_from(chunk.len()).unwrap_or(0);
        self.out.blocking_send(Bytes::from(chunk)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the caller went away")
        })
    }
}

impl Write for ChunkWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.flush_chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_chunk()
    }
}

fn archive_error(e: std::io::Error) -> IoError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return caller_gone();
    }
    IoError::io("build the archive", e)
}

/// Adds entries to the archive, within the caps.
struct Packer<'a> {
    tar: tar::Builder<ChunkWriter<'a>>,
    entries: u64,
    bytes: u64,
}

impl Packer<'_> {
    fn header(
        &mut self,
        st: &libc::stat,
        kind: tar::EntryType,
        size: u64,
    ) -> Result<tar::Header, IoError> {
        self.entries += 1;
        self.bytes += size;
        if self.entries > UPLOAD_ENTRIES_MAX || self.bytes > UPLOAD_BYTES_MAX {
            return Err(IoError::TooLarge(format!(
                "a download holds at most {UPLOAD_ENTRIES_MAX} entries and {UPLOAD_BYTES_MAX} bytes"
            )));
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(u64::from(st.st_uid));
        h.set_gid(u64::from(st.st_gid));
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        Ok(h)
    }

    /// A regular file; exactly the size it had when stat'ed (a file growing or shrinking
    /// meanwhile is cut or padded with zeros, so the archive stays well formed).
    fn file(&mut self, name: &str, file: std::fs::File, st: &libc::stat) -> Result<(), IoError> {
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let mut h = self.header(st, tar::EntryType::Regular, size)?;
        let data = file.take(size).chain(std::io::repeat(0)).take(size);
        self.tar
            .append_data(&mut h, name, data)
            .map_err(archive_error)
    }
}

/// The file or directory tree at `path` as a tar stream: a file as one member named after it,
/// a directory as its contents (member paths relative to it). Bytes sent.
pub fn download(root: &SandboxRoot, path: &str, out: &mpsc::Sender<Bytes>) -> Result<u64, IoError> {
    let fd = root.open(path, libc::O_PATH, 0)?;
    let st = fstat(fd.as_fd()).map_err(|e| io_error(path, "stat", e))?;
    let mut p = Packer {
        tar: tar::Builder::new(ChunkWriter {
            out,
            buf: Vec::with_capacity(CHUNK_BYTES),
            sent: 0,
        }),
        entries: 0,
        bytes: 0,
    };
    match kind_of(st.st_mode) {
        EntryKind::File => {
            let name = split_parent(path).map_or("file", |(_, n)| n);
            let (file, _) = super::files::open_regular(root, path)?;
            p.file(name, file, &st)?;
        }
        EntryKind::Dir => {
            let dir = root.open(path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            pack_dir(&mut p, dir, path)?;
        }
        _ => {
            return Err(IoError::WrongKind {
                path: path.into(),
                what: "is neither a file nor a directory".into(),
            })
        }
    }
    let mut w = p.tar.into_inner().map_err(archive_error)?;
    w.flush().map_err(archive_error)?;
    Ok(w.sent)
}

/// One directory being walked: its descriptor, member prefix and names still to visit.
struct Frame {
    fd: OwnedFd,
    prefix: String,
    names: std::vec::IntoIter<String>,
}

fn names_of(fd: BorrowedFd<'_>, shown: &str) -> Result<std::vec::IntoIter<String>, IoError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(proc_fd_path(fd)).map_err(|e| io_error(shown, "list", e))? {
        let entry = entry.map_err(|e| io_error(shown, "list", e))?;
        if let Some(n) = entry.file_name().to_str() {
            names.push(n.to_owned());
        }
        if u64::try_from(names.len()).unwrap_or(u64::MAX) > UPLOAD_ENTRIES_MAX {
            return Err(IoError::TooLarge(format!(
                "{shown} holds more than {UPLOAD_ENTRIES_MAX} entries"
            )));
        }
    }
    names.sort();
    Ok(names.into_iter())
}

fn pack_dir(p: &mut Packer<'_>, dir: OwnedFd, shown: &str) -> Result<(), IoError> {
    let names = names_of(dir.as_fd(), shown)?;
    let mut stack = vec![Frame {
        fd: dir,
        prefix: String::new(),
        names,
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(name) = frame.names.next() else {
            stack.pop();
            continue;
        };
        let member = format!("{}{name}", frame.prefix);
        if member.len() > PATH_BYTES_MAX {
            return Err(IoError::TooLarge(format!(
                "{shown}/{member}: path too long for a download"
            )));
        }
        let Ok(st) = lstat_at(frame.fd.as_fd(), &name) else {
            continue; // gone since it was listed
        };
        match kind_of(st.st_mode) {
            EntryKind::Dir => {
                let Ok(fd) = open_name(
                    frame.fd.as_fd(),
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY,
                    0,
                ) else {
                    continue; // replaced or unreadable meanwhile
                };
                let mut h = p.header(&st, tar::EntryType::Directory, 0)?;
                p.tar
                    .append_data(&mut h, format!("{member}/"), std::io::empty())
                    .map_err(archive_error)?;
                let names = names_of(fd.as_fd(), &member)?;
                stack.push(Frame {
                    fd,
                    prefix: format!("{member}/"),
                    names,
                });
            }
            EntryKind::File => {
                let opened = open_name(
                    frame.fd.as_fd(),
                    &name,
                    libc::O_RDONLY | libc::O_NONBLOCK,
                    0,
                );
                let Ok(fd) = opened else { continue };
                let Ok(st) = fstat(fd.as_fd()) else { continue };
                if kind_of(st.st_mode) != EntryKind::File {
                    continue;
                }
                p.file(&member, std::fs::File::from(fd), &st)?;
            }
            EntryKind::Symlink => {
                let Ok(target) = readlink_at(frame.fd.as_fd(), &name) else {
                    continue;
                };
                let target = String::from_utf8_lossy(&target).into_owned();
                let mut h = p.header(&st, tar::EntryType::Symlink, 0)?;
                p.tar
                    .append_link(&mut h, &member, &target)
                    .map_err(archive_error)?;
            }
            EntryKind::Other => {} // FIFOs, sockets, devices: not archived
        }
    }
    Ok(())
}

// ---- upload ----

/// Reads the uploaded stream from the async side, within [`UPLOAD_BYTES_MAX`]; a failure is
/// kept in `failed` so it is reported as itself, not as a broken archive.
struct PieceReader<'a> {
    pieces: &'a mut mpsc::Receiver<Piece>,
    current: Bytes,
    total: u64,
    ended: bool,
    failed: Rc<RefCell<Option<IoError>>>,
}

impl Read for PieceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() && !self.ended {
            match self.pieces.blocking_recv() {
                Some(Piece::Data(b)) => {
                    self.total += u64::try_from(b.len()).unwrap_or(u64::MAX);
                    if self.total > UPLOAD_BYTES_MAX {
                        *self.failed.borrow_mut() = Some(IoError::TooLarge(format!(
                            "the upload is larger than {UPLOAD_BYTES_MAX} bytes"
                        )));
                        return Err(std::io::Error::other("upload too large"));
                    }
                    self.current = b;
                }
                Some(Piece::End) => self.ended = true,
                None => {
                    *self.failed.borrow_mut() = Some(caller_gone());
                    return Err(std::io::Error::other("the caller went away"));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

/// Unpack a tar stream below directory `path` (created, with its parents, if missing).
pub fn upload(
    root: &SandboxRoot,
    path: &str,
    pieces: &mut mpsc::Receiver<Piece>,
) -> Result<UploadStats, IoError> {
    let target = root.dir(path, true)?;
    let failed = Rc::new(RefCell::new(None));
    let reader = PieceReader {
        pieces,
        current: Bytes::new(),
        total: 0,
        ended: false,
        failed: failed.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let result = unpack(&mut archive, &target);
    if let Some(e) = failed.borrow_mut().take() {
        return Err(e);
    }
    result
}

fn bad(e: std::io::Error) -> IoError {
    IoError::BadArchive(e.to_string())
}

fn unpack<R: Read>(
    archive: &mut tar::Archive<R>,
    target: &OwnedFd,
) -> Result<UploadStats, IoError> {
    let mut stats = UploadStats::default();
    let mut count = 0u64;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        count += 1;
        if count > UPLOAD_ENTRIES_MAX {
            return Err(IoError::TooLarge(format!(
                "the upload has more than {UPLOAD_ENTRIES_MAX} members"
            )));
        }
        let raw = entry.path().map_err(bad)?.into_owned();
        let (parts, kind) = check_member(&raw, entry.header().entry_type())?;
        let shown = raw.display().to_string();
        let Some((name, dirs)) = parts.split_last() else {
            continue; // "./": the target itself
        };
        let parent = walk(target, dirs, &shown)?;
        let mode = entry.header().mode().unwrap_or(0o644) & MODE_BITS;
        match kind {
            MemberKind::Dir => make_dir(parent.as_fd(), name, mode | 0o700, &shown)?,
            MemberKind::File => {
                let size = entry.header().size().map_err(bad)?;
                if size > FILE_BYTES_MAX {
                    return Err(IoError::TooLarge(format!(
                        "member {shown} has {size} bytes; at most {FILE_BYTES_MAX}"
                    )));
                }
                replace(parent.as_fd(), name, &shown, |dir, tmp| {
                    let fd = open_name(
                        dir,
                        tmp,
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                        mode,
                    )?;
                    let mut file = std::fs::File::from(fd);
                    std::io::copy(&mut entry, &mut file)?;
                    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
                })?;
                stats.files += 1;
                stats.bytes += size;
            }
            MemberKind::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| IoError::BadArchive(format!("symlink {shown} has no target")))?;
                let link = link
                    .to_str()
                    .ok_or_else(|| {
                        IoError::BadArchive(format!("symlink {shown}: the target is not UTF-8"))
                    })?
                    .to_owned();
                replace(parent.as_fd(), name, &shown, |dir, tmp| {
                    symlink_at(&link, dir, tmp)
                })?;
            }
        }
    }
    Ok(stats)
}

/// The directory of a member: `dirs` below the target, each created if missing and each
/// opened with `O_NOFOLLOW` (a symlink there is refused).
fn walk(target: &OwnedFd, dirs: &[String], shown: &str) -> Result<OwnedFd, IoError> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY;
    let mut cur = target
        .try_clone()
        .map_err(|e| IoError::io("duplicate a descriptor", e))?;
    for d in dirs {
        let next = match open_name(cur.as_fd(), d, flags, 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                make_dir(cur.as_fd(), d, 0o755, shown)?;
                open_name(cur.as_fd(), d, flags, 0)
            }
            other => other,
        };
        cur = next.map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => IoError::BadArchive(format!(
                "member {shown}: `{d}` is a symlink or not a directory; members are never written through links"
            )),
            _ => io_error(shown, "open", e),
        })?;
    }
    Ok(cur)
}

fn make_dir(parent: BorrowedFd<'_>, name: &str, mode: u32, shown: &str) -> Result<(), IoError> {
    match mkdir_at(parent, name, mode) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => match lstat_at(parent, name) {
            Ok(st) if kind_of(st.st_mode) == EntryKind::Dir => Ok(()),
            _ => Err(IoError::BadArchive(format!(
                "member {shown}: `{name}` exists and is not a directory"
            ))),
        },
        Err(e) => Err(io_error(shown, "create directory", e)),
    }
}

/// Create an entry under a temporary name with `make`, then rename it over `name`.
fn replace(
    parent: BorrowedFd<'_>,
    name: &str,
    shown: &str,
    make: impl FnOnce(BorrowedFd<'_>, &str) -> std::io::Result<()>,
) -> Result<(), IoError> {
    let tmp = temp_name();
    let done = make(parent, &tmp)
        .map_err(|e| io_error(shown, "write", e))
        .and_then(|()| rename_at(parent, &tmp, name).map_err(|e| io_error(shown, "replace", e)));
    if done.is_err() {
        unlink_at(parent, &tmp);
    }
    done
}
