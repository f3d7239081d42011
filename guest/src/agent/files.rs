//! File requests: read, atomic write, list, download (tar out) and upload (tar in). Request
//! paths are resolved inside the agent's root (see `fsys`); sizes are capped as the node's are.

use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::fsys::{self, beneath, in_root};
use super::Agent;
use crate::member::{check_member, MemberKind};
use crate::mux::Outbox;
use crate::proto::{
    check_path, ErrorKind, Frame, Header, Stream, WriteRequest, CHUNK_BYTES, ENTRIES_PER_FRAME,
    FILE_BYTES_MAX, LIST_ENTRIES_MAX, UPLOAD_BYTES_MAX, UPLOAD_ENTRIES_MAX,
};

/// Chunks queued between a blocking tar task and its connection.
const TAR_QUEUE_CHUNKS: usize = 4;
/// Directory depth a download walks, at most.
const DOWNLOAD_DEPTH_MAX: usize = 256;

type Failure = (ErrorKind, String);

fn failure(path: &str, what: &str, e: &std::io::Error) -> Failure {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::ENOTDIR | libc::EISDIR) => ErrorKind::WrongKind,
        Some(libc::EXDEV | libc::ELOOP) => ErrorKind::Invalid,
        Some(libc::EFBIG) => ErrorKind::TooLarge,
        _ => ErrorKind::Io,
    };
    (kind, format!("{path}: {what}: {e}"))
}

async fn done(out: &Outbox, bytes: u64, files: u64, truncated: bool) {
    let _ = out
        .send(Header::Done {
            id: out.id,
            bytes,
            files,
            truncated,
        })
        .await;
}

/// Run `fut` unless the request is cancelled (a `Cancel`, or the connection gone) first.
async fn unless_cancelled<T>(
    inbound: &mut mpsc::Receiver<Frame>,
    fut: impl Future<Output = T>,
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            v = &mut fut => return Some(v),
            f = inbound.recv() => match f.map(|f| f.header) {
                None | Some(Header::Cancel { .. }) => return None,
                Some(_) => {}
            }
        }
    }
}

fn checked(path: &str) -> Result<(), Failure> {
    check_path(path).map_err(|m| (ErrorKind::Invalid, m))
}

pub async fn read(agent: &Agent, path: String, mut inbound: mpsc::Receiver<Frame>, out: Outbox) {
    let opened = checked(&path).and_then(|()| {
        let fd = in_root(agent.root.as_fd(), &path, libc::O_RDONLY, 0)
            .map_err(|e| failure(&path, "open", &e))?;
        let st = fsys::fstat(fd.as_fd()).map_err(|e| failure(&path, "stat", &e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err((ErrorKind::WrongKind, format!("{path}: not a regular file")));
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size > FILE_BYTES_MAX {
            return Err((
                ErrorKind::TooLarge,
                format!(
                    "{path}: {size} bytes; at most {FILE_BYTES_MAX} are read at once (download it)"
                ),
            ));
        }
        Ok(fd)
    });
    let fd = match opened {
        Ok(fd) => fd,
        Err((kind, m)) => return out.error(kind, m).await,
    };
    let mut file = tokio::fs::File::from_std(std::fs::File::from(fd));
    let mut sent = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let (k, m) = failure(&path, "read", &e);
                return out.error(k, m).await;
            }
        };
        sent += n as u64;
        if sent > FILE_BYTES_MAX {
            return out
                .error(
                    ErrorKind::TooLarge,
                    format!("{path}: grew past {FILE_BYTES_MAX} bytes while read"),
                )
                .await;
        }
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        match unless_cancelled(&mut inbound, out.data(Stream::File, chunk)).await {
            Some(Ok(())) => {}
            _ => return,
        }
    }
    done(&out, sent, 1, false).await;
}

/// A temp name no other writer of this process uses.
fn temp_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        ".surge-write.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn write(
    agent: &Agent,
    spec: WriteRequest,
    mut inbound: mpsc::Receiver<Frame>,
    out: Outbox,
) {
    let path = spec.path.clone();
    let owner = agent.owner();
    let opened = checked(&path).and_then(|()| {
        let (parent, name) = fsys::split_parent(&path).map_err(|m| (ErrorKind::Invalid, m))?;
        let dir = if spec.make_parents {
            fsys::make_dirs(agent.root.as_fd(), parent, owner)
        } else {
            in_root(
                agent.root.as_fd(),
                parent,
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )
        }
        .map_err(|e| failure(parent, "open the directory", &e))?;
        let tmp = temp_name();
        let fd = fsys::open_at(
            dir.as_fd(),
            &tmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(|e| failure(&path, "create", &e))?;
        Ok((dir, name.to_string(), tmp, fd))
    });
    let (dir, name, tmp, fd) = match opened {
        Ok(v) => v,
        Err((kind, m)) => return out.error(kind, m).await,
    };
    let mut file = tokio::fs::File::from_std(std::fs::File::from(fd));
    let mut written = 0u64;
    let failed: Option<Failure> = loop {
        let Some(frame) = inbound.recv().await else {
            break Some((ErrorKind::Io, "cancelled".into()));
        };
        match frame.header {
            Header::Data { .. } => {
                written += frame.payload.len() as u64;
                if written > FILE_BYTES_MAX {
                    break Some((
                        ErrorKind::TooLarge,
                        format!(
                            "{path}: more than {FILE_BYTES_MAX} bytes; the file was not written"
                        ),
                    ));
                }
                if let Err(e) = file.write_all(&frame.payload).await {
                    break Some(failure(&path, "write", &e));
                }
                if out.credit().await.is_err() {
                    break Some((ErrorKind::Io, "cancelled".into()));
                }
            }
            Header::Eof { .. } => break None,
            Header::Cancel { .. } => break Some((ErrorKind::Io, "cancelled".into())),
            _ => {}
        }
    };
    let finished = match failed {
        Some(f) => Err(f),
        None => {
            async {
                file.flush()
                    .await
                    .map_err(|e| failure(&path, "write", &e))?;
                let std_file = file.into_std().await;
                fsys::fchown_mod(std_file.as_fd(), owner, spec.mode & 0o1777)
                    .map_err(|e| failure(&path, "set owner and mode", &e))?;
                fsys::rename_at(dir.as_fd(), &tmp, &name).map_err(|e| failure(&path, "replace", &e))
            }
            .await
        }
    };
    match finished {
        Ok(()) => done(&out, written, 1, false).await,
        Err((kind, m)) => {
            let _ = fsys::unlink_at(dir.as_fd(), &tmp);
            out.error(kind, m).await;
        }
    }
}

pub async fn list(agent: &Agent, path: String, out: Outbox) {
    let listed = checked(&path).and_then(|()| {
        let dir = in_root(
            agent.root.as_fd(),
            &path,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| failure(&path, "open the directory", &e))?;
        let (mut names, more) =
            fsys::read_names(dir.as_fd()).map_err(|e| failure(&path, "read the directory", &e))?;
        names.sort();
        let truncated = more || names.len() > LIST_ENTRIES_MAX;
        names.truncate(LIST_ENTRIES_MAX);
        let entries: Vec<_> = names
            .iter()
            .filter_map(|n| {
                fsys::stat_at(dir.as_fd(), n)
                    .ok()
                    .map(|st| fsys::entry(n, &st))
            })
            .collect();
        Ok((entries, truncated))
    });
    let (entries, truncated) = match listed {
        Ok(v) => v,
        Err((kind, m)) => return out.error(kind, m).await,
    };
    let count = entries.len() as u64;
    for batch in entries.chunks(ENTRIES_PER_FRAME) {
        if out.entries(batch.to_vec()).await.is_err() {
            return;
        }
    }
    done(&out, 0, count, truncated).await;
}

/// A `Write` into a channel of chunks, for the tar builder on a blocking thread.
struct ChunkWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    sent: u64,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK_BYTES - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.sent += self.buf.len() as u64;
        if self.sent > UPLOAD_BYTES_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("the archive is over {UPLOAD_BYTES_MAX} bytes"),
            ));
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("cancelled"))
    }
}

fn tar_header(st: &libc::stat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h
}

/// Append the tree below `dir` (names relative to it, prefixed by `prefix`).
fn append_tree<W: Write>(
    b: &mut tar::Builder<W>,
    dir: BorrowedFd<'_>,
    prefix: &str,
    depth: usize,
    entries: &mut u64,
) -> std::io::Result<()> {
    if depth > DOWNLOAD_DEPTH_MAX {
        return Err(std::io::Error::other(format!(
            "{prefix}: deeper than {DOWNLOAD_DEPTH_MAX} directories"
        )));
    }
    let (mut names, _) = fsys::read_names(dir)?;
    names.sort();
    for name in names {
        *entries += 1;
        if *entries > UPLOAD_ENTRIES_MAX {
            return Err(std::io::Error::other(format!(
                "more than {UPLOAD_ENTRIES_MAX} entries"
            )));
        }
        let st = fsys::stat_at(dir, &name)?;
        let text = name.to_string_lossy();
        let rel = if prefix.is_empty() {
            text.into_owned()
        } else {
            format!("{prefix}/{text}")
        };
        match fsys::kind_of(st.st_mode) {
            crate::proto::EntryKind::Dir => {
                let mut h = tar_header(&st, tar::EntryType::Directory, 0);
                b.append_data(&mut h, &rel, std::io::empty())?;
                let sub = fsys::open_at(
                    dir,
                    &name.to_string_lossy(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                append_tree(b, sub.as_fd(), &rel, depth + 1, entries)?;
            }
            crate::proto::EntryKind::File => {
                let fd = fsys::open_at(
                    dir,
                    &name.to_string_lossy(),
                    libc::O_RDONLY | libc::O_NOFOLLOW,
                    0,
                )?;
                let size = u64::try_from(st.st_size).unwrap_or(0);
                let mut h = tar_header(&st, tar::EntryType::Regular, size);
                b.append_data(&mut h, &rel, std::fs::File::from(fd).take(size))?;
            }
            crate::proto::EntryKind::Symlink => {
                let target = fsys::read_link_at(dir, &name)?;
                let mut h = tar_header(&st, tar::EntryType::Symlink, 0);
                b.append_link(&mut h, &rel, &target)?;
            }
            crate::proto::EntryKind::Other => {}
        }
    }
    Ok(())
}

fn build_archive(fd: OwnedFd, base: String, tx: mpsc::Sender<Bytes>) -> std::io::Result<u64> {
    let mut b = tar::Builder::new(ChunkWriter {
        tx,
        buf: Vec::with_capacity(CHUNK_BYTES),
        sent: 0,
    });
    let st = fsys::fstat(fd.as_fd())?;
    match fsys::kind_of(st.st_mode) {
        crate::proto::EntryKind::Dir => {
            let mut entries = 0;
            append_tree(&mut b, fd.as_fd(), "", 0, &mut entries)?;
        }
        crate::proto::EntryKind::File => {
            let size = u64::try_from(st.st_size).unwrap_or(0);
            let mut h = tar_header(&st, tar::EntryType::Regular, size);
            b.append_data(&mut h, &base, std::fs::File::from(fd).take(size))?;
        }
        _ => {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
    }
    let mut w = b.into_inner()?;
    w.flush()?;
    Ok(w.sent)
}

pub async fn download(
    agent: &Agent,
    path: String,
    mut inbound: mpsc::Receiver<Frame>,
    out: Outbox,
) {
    let opened = checked(&path).and_then(|()| {
        in_root(agent.root.as_fd(), &path, libc::O_RDONLY, 0)
            .map_err(|e| failure(&path, "open", &e))
    });
    let fd = match opened {
        Ok(fd) => fd,
        Err((kind, m)) => return out.error(kind, m).await,
    };
    let base = fsys::split_parent(&path)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|_| "root".into());
    let (tx, mut rx) = mpsc::channel::<Bytes>(TAR_QUEUE_CHUNKS);
    let builder = tokio::task::spawn_blocking(move || build_archive(fd, base, tx));
    let pump = async {
        while let Some(chunk) = rx.recv().await {
            if out.data(Stream::File, chunk).await.is_err() {
                return;
            }
        }
    };
    // Cancelled: dropping `rx` ends the builder at its next chunk.
    if unless_cancelled(&mut inbound, pump).await.is_none() {
        return;
    }
    match builder.await {
        Ok(Ok(bytes)) => done(&out, bytes, 0, false).await,
        Ok(Err(e)) => {
            let (kind, m) = failure(&path, "archive", &e);
            let kind = if e.kind() == std::io::ErrorKind::FileTooLarge {
                ErrorKind::TooLarge
            } else {
                kind
            };
            out.error(kind, m).await;
        }
        Err(e) => {
            out.error(ErrorKind::Io, format!("{path}: archive: {e}"))
                .await
        }
    }
}

/// A `Read` over a channel of chunks, for the tar reader on a blocking thread.
struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
    cancelled: Arc<AtomicBool>,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None if self.cancelled.load(Ordering::Relaxed) => {
                    return Err(std::io::Error::other("cancelled"))
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// What an upload made.
#[derive(Default)]
struct Unpacked {
    files: u64,
    bytes: u64,
}

fn unpack(target: OwnedFd, reader: ChunkReader, owner: (u32, u32)) -> Result<Unpacked, Failure> {
    let mut archive = tar::Archive::new(reader);
    let mut made = Unpacked::default();
    let mut count = 0u64;
    let io = |what: &str, e: std::io::Error| failure("upload", what, &e);
    for entry in archive.entries().map_err(|e| io("read the archive", e))? {
        let mut entry = entry.map_err(|e| (ErrorKind::BadArchive, format!("bad archive: {e}")))?;
        count += 1;
        if count > UPLOAD_ENTRIES_MAX {
            return Err((
                ErrorKind::TooLarge,
                format!("more than {UPLOAD_ENTRIES_MAX} entries in one upload"),
            ));
        }
        let path = entry
            .path()
            .map_err(|e| (ErrorKind::BadArchive, format!("a member's name: {e}")))?
            .into_owned();
        let (parts, kind) = check_member(&path, entry.header().entry_type())
            .map_err(|m| (ErrorKind::BadArchive, m))?;
        let Some((name, dirs)) = parts.split_last() else {
            continue; // "./": the target itself
        };
        let mut parent = target
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| io("dup", e))?;
        let mut rel = String::new();
        for d in dirs {
            rel = if rel.is_empty() {
                d.clone()
            } else {
                format!("{rel}/{d}")
            };
            match fsys::mkdir_at(parent.as_fd(), d, 0o755) {
                Ok(()) => fsys::chown_at(parent.as_fd(), d, owner).map_err(|e| io(&rel, e))?,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(failure(&rel, "create the directory", &e)),
            }
            parent = beneath(target.as_fd(), &rel, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(
                |e| {
                    (
                        ErrorKind::BadArchive,
                        format!(
                            "member {}: {rel}: {e} (links may not leave the target)",
                            path.display()
                        ),
                    )
                },
            )?;
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o1777;
        match kind {
            MemberKind::Dir => {
                match fsys::mkdir_at(parent.as_fd(), name, 0o755) {
                    Ok(()) | Err(_) => {}
                }
                let fd = fsys::open_at(
                    parent.as_fd(),
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .map_err(|e| failure(&path.display().to_string(), "directory", &e))?;
                fsys::fchown_mod(fd.as_fd(), owner, mode | 0o700).map_err(|e| io("chown", e))?;
            }
            MemberKind::File => {
                let fd = fsys::open_at(
                    parent.as_fd(),
                    name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
                    0o600,
                )
                .map_err(|e| failure(&path.display().to_string(), "create", &e))?;
                let mut file = std::fs::File::from(fd);
                let n = std::io::copy(&mut entry, &mut file)
                    .map_err(|e| failure(&path.display().to_string(), "write", &e))?;
                fsys::fchown_mod(file.as_fd(), owner, mode).map_err(|e| io("chown", e))?;
                made.files += 1;
                made.bytes += n;
            }
            MemberKind::Symlink => {
                let link = entry.link_name().ok().flatten().ok_or_else(|| {
                    (
                        ErrorKind::BadArchive,
                        format!("symlink {} has no target", path.display()),
                    )
                })?;
                fsys::symlink_at(&link.to_string_lossy(), parent.as_fd(), name)
                    .map_err(|e| failure(&path.display().to_string(), "symlink", &e))?;
                fsys::chown_at(parent.as_fd(), name, owner).map_err(|e| io("chown", e))?;
            }
        }
    }
    Ok(made)
}

pub async fn upload(agent: &Agent, path: String, mut inbound: mpsc::Receiver<Frame>, out: Outbox) {
    let owner = agent.owner();
    let opened = checked(&path).and_then(|()| {
        fsys::make_dirs(agent.root.as_fd(), &path, owner)
            .map_err(|e| failure(&path, "open the target directory", &e))
    });
    let target = match opened {
        Ok(fd) => fd,
        Err((kind, m)) => return out.error(kind, m).await,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(TAR_QUEUE_CHUNKS);
    let cancelled = Arc::new(AtomicBool::new(false));
    let reader = ChunkReader {
        rx,
        chunk: Bytes::new(),
        cancelled: cancelled.clone(),
    };
    let mut unpacker = tokio::task::spawn_blocking(move || unpack(target, reader, owner));
    let mut tx = Some(tx);
    let mut received = 0u64;
    let mut over: Option<Failure> = None;
    let result = loop {
        tokio::select! {
            r = &mut unpacker => break r,
            f = inbound.recv(), if tx.is_some() => match f {
                Some(Frame { header: Header::Data { .. }, payload }) => {
                    received += payload.len() as u64;
                    if received > UPLOAD_BYTES_MAX {
                        over = Some((ErrorKind::TooLarge, format!("the upload is over {UPLOAD_BYTES_MAX} bytes")));
                        cancelled.store(true, Ordering::Relaxed);
                        tx = None;
                        continue;
                    }
                    if let Some(t) = &tx {
                        // Waits while the unpacker is behind; the peer's window bounds the rest.
                        let _ = t.send(payload).await;
                    }
                    let _ = out.credit().await;
                }
                Some(Frame { header: Header::Eof { .. }, .. }) => tx = None,
                None | Some(Frame { header: Header::Cancel { .. }, .. }) => {
                    cancelled.store(true, Ordering::Relaxed);
                    tx = None;
                }
                Some(_) => {}
            }
        }
    };
    if cancelled.load(Ordering::Relaxed) && over.is_none() {
        return;
    }
    match (over, result) {
        (Some((kind, m)), _) => out.error(kind, m).await,
        (None, Ok(Ok(made))) => done(&out, made.bytes, made.files, false).await,
        (None, Ok(Err((kind, m)))) => out.error(kind, m).await,
        (None, Err(e)) => out.error(ErrorKind::Io, format!("upload: {e}")).await,
    }
}
