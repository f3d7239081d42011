//! Templates between nodes: the source streams a template as tar (GNU tar reading the
//! template's directory), with the stream's SHA-256 and length as its last piece; the target
//! unpacks the stream into a hidden staging directory as it arrives, and renames it into place
//! only once the digest and the length match what the source sent. A damaged, truncated or
//! refused copy removes its staging directory: nothing of it is left under the templates.
//!
//! One write of the bytes on the target (no intermediate tarball): unpacking as the bytes come
//! is what keeps a copy near the disk's sequential speed. The unpacking is the `tar` crate's,
//! which refuses members that would land outside the staging directory (`..`, through a
//! symlink, hard links out of it); a source node is a peer with a node certificate, but its
//! template may have come from a sandbox (`surge snapshot`), whose contents its tenant chose.
//!
//! Blocking I/O throughout: the daemon runs these on `spawn_blocking` threads, fed by and
//! feeding bounded channels.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::{io, TemplateError, Templates, TreeSize};
use super::{TEMPLATE_BYTES_MAX, TEMPLATE_ENTRIES_MAX};

/// Bytes of tar stream per piece (well below the gRPC message cap).
pub const TRANSFER_CHUNK_BYTES: usize = 1 << 20;
/// Most bytes a copy's tar stream may carry: the content cap plus headers and padding
/// (at most 2 KiB per entry: a header, a long-name record, padding).
pub const TRANSFER_BYTES_MAX: u64 = TEMPLATE_BYTES_MAX + TEMPLATE_ENTRIES_MAX * 2048;

/// One piece of a copy's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Data(Bytes),
    /// The last piece: what the source sent.
    Digest {
        sha256: [u8; 32],
        bytes: u64,
    },
}

/// What a finished copy received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: [u8; 32],
    pub size: TreeSize,
}

/// Hex of a digest, for messages and replies.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stream template `name` as tar to `out` (which returns false when the receiver is gone), then
/// return its digest. GNU tar writes numeric owners, modes, symlinks and hard links as they are.
pub fn export(
    templates: &Templates,
    name: &str,
    mut out: impl FnMut(Bytes) -> bool,
) -> Result<Piece, TemplateError> {
    let dir = templates.path(name)?;
    let mut cmd = Command::new("tar");
    cmd.arg("--create")
        .arg("--numeric-owner")
        .arg("--file")
        .arg("-")
        .arg("--directory")
        .arg(&dir)
        .arg(".")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io(format!("run {cmd:?}")))?;
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let result = (|| loop {
        let mut buf = vec![0u8; TRANSFER_CHUNK_BYTES];
        let n = read_full(&mut stdout, &mut buf)
            .map_err(io(format!("read the tar stream of template {name}")))?;
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        hasher.update(&buf);
        total += n as u64;
        if total > TRANSFER_BYTES_MAX {
            return Err(TemplateError::TooLarge {
                path: dir.clone(),
                what: format!("a tar stream over {} MiB", total >> 20),
                max: format!("{} MiB", TRANSFER_BYTES_MAX >> 20),
            });
        }
        if !out(Bytes::from(buf)) {
            return Err(TemplateError::Io {
                context: format!("send template {name}"),
                source: std::io::Error::other("the receiver went away"),
            });
        }
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let output = child
        .wait_with_output()
        .map_err(io(format!("wait for {cmd:?}")))?;
    result?;
    if !output.status.success() {
        return Err(TemplateError::Command {
            command: format!("{cmd:?}"),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(Piece::Digest {
        sha256: hasher.finalize().into(),
        bytes: total,
    })
}

/// Fill `buf` as far as the reader goes (a pipe returns short reads).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The stream as a reader: hashes and counts the data pieces, stops at the digest, and keeps
/// the first error of the pieces themselves (the tar crate sees only an `io::Error`).
struct PieceReader<I> {
    pieces: I,
    current: Bytes,
    hasher: Sha256,
    bytes: u64,
    digest: Option<([u8; 32], u64)>,
    failed: Option<TemplateError>,
}

impl<I: Iterator<Item = Result<Piece, TemplateError>>> Read for PieceReader<I> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if self.digest.is_some() || self.failed.is_some() {
                return Ok(0);
            }
            match self.pieces.next() {
                None => return Ok(0),
                Some(Ok(Piece::Data(d))) => {
                    self.bytes += d.len() as u64;
                    if self.bytes > TRANSFER_BYTES_MAX {
                        self.failed = Some(TemplateError::TooLarge {
                            path: PathBuf::from("the copy's stream"),
                            what: format!("over {} MiB", self.bytes >> 20),
                            max: format!("{} MiB", TRANSFER_BYTES_MAX >> 20),
                        });
                        return Err(std::io::Error::other("the stream is too large"));
                    }
                    self.hasher.update(&d);
                    self.current = d;
                }
                Some(Ok(Piece::Digest { sha256, bytes })) => self.digest = Some((sha256, bytes)),
                Some(Err(e)) => {
                    let msg = e.to_string();
                    self.failed = Some(e);
                    return Err(std::io::Error::other(msg));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Receive a copy of template `name` from `pieces` (see the module docs): unpack into staging,
/// check the digest and the length, then rename into place. On any error nothing is left.
pub fn receive(
    templates: &Templates,
    name: &str,
    pieces: impl Iterator<Item = Result<Piece, TemplateError>>,
) -> Result<Received, TemplateError> {
    let staging = templates.stage(name)?;
    let mut reader = PieceReader {
        pieces,
        current: Bytes::new(),
        hasher: Sha256::new(),
        bytes: 0,
        digest: None,
        failed: None,
    };
    let unpacked = unpack(staging.dir(), &mut reader);
    if let Some(e) = reader.failed.take() {
        return Err(e);
    }
    let size = unpacked?;
    // The end-of-archive blocks and whatever follows them are part of the digest.
    let drained = std::io::copy(&mut reader, &mut std::io::sink());
    if let Some(e) = reader.failed.take() {
        return Err(e);
    }
    drained.map_err(io(format!("read the rest of the copy of template {name}")))?;
    let Some((sha256, bytes)) = reader.digest else {
        return Err(TemplateError::Damaged {
            name: name.to_owned(),
            why: format!(
                "the stream ended after {} bytes without its digest (the source failed or the connection broke)",
                reader.bytes
            ),
        });
    };
    let got: [u8; 32] = reader.hasher.finalize().into();
    if bytes != reader.bytes || got != sha256 {
        return Err(TemplateError::Damaged {
            name: name.to_owned(),
            why: format!(
                "received {} bytes with SHA-256 {}, the source sent {bytes} bytes with SHA-256 {}",
                reader.bytes,
                hex(&got),
                hex(&sha256)
            ),
        });
    }
    let path = staging.commit(Path::new(name))?;
    Ok(Received {
        path,
        bytes,
        sha256,
        size,
    })
}

/// Unpack a tar stream into `dir`, keeping owners, modes and times; counts against the caps.
fn unpack(dir: &Path, reader: impl Read) -> Result<TreeSize, TemplateError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(false);
    let unreadable = |e| io("unpack the copy's tar stream")(e);
    let mut size = TreeSize::default();
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        size.entries += 1;
        size.bytes = size.bytes.saturating_add(entry.size());
        super::check_size(dir, size)?;
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let inside = entry
            .unpack_in(dir)
            .map_err(io(format!("unpack member `{shown}`")))?;
        if !inside {
            return Err(TemplateError::Escapes {
                path: PathBuf::from("the copy's stream"),
                member: shown,
                why: "would land outside the template",
            });
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests;
