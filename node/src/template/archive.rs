//! Checking a template tarball before GNU tar unpacks it as root.
//!
//! The members are read with the `tar` crate, which resolves GNU long names and pax path and
//! link records the way GNU tar does, so the names checked are the names tar will write (the old
//! check parsed `tar --list` text, where a name containing ` -> ` or a newline could hide what it
//! was). A compressed archive is read through the same decompressor GNU tar would run for it,
//! chosen by its magic bytes.
//!
//! The rules ([`check_members`], pure) are those of a root filesystem that must stay inside its
//! directory: no absolute member, no `..`, nothing written through a symlink the archive itself
//! made earlier (it would land wherever that link points), no hard link to an absolute path or
//! through `..`. Symlinks may point anywhere: they are resolved inside the sandbox, not on the
//! host. Devices, fifos and the like are allowed, as before (the sandbox's device cgroup denies
//! them all).

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::{io, TemplateError, TreeSize, TEMPLATE_BYTES_MAX, TEMPLATE_ENTRIES_MAX};

/// Bytes read to recognise a compression format.
const MAGIC_BYTES_MAX: usize = 6;

/// Decompressors by magic bytes: those GNU tar itself runs for `--extract` on such a file.
const DECOMPRESSORS: &[(&[u8], &str, &[&str])] = &[
    (b"\x1f\x8b", "gzip", &["-d", "-c"]),
    (b"\x1f\x9d", "gzip", &["-d", "-c"]), // compress (.Z): gzip reads it
    (b"BZh", "bzip2", &["-d", "-c"]),
    (b"\xfd7zXZ\x00", "xz", &["-d", "-c"]),
    (b"\x5d\x00\x00", "xz", &["--format=lzma", "-d", "-c"]),
    (b"\x28\xb5\x2f\xfd", "zstd", &["-d", "-c"]),
    (b"LZIP", "lzip", &["-d", "-c"]),
    (b"\x89LZO", "lzop", &["-d", "-c"]),
];

/// What a member is, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberKind {
    /// Content that lands on disk (regular, contiguous or sparse file).
    File,
    Dir,
    Symlink,
    HardLink,
    /// Devices, fifos and whatever else GNU tar makes without content.
    Other,
}

/// One member of an archive: its kind, the names and link targets it may be written under, and
/// the bytes of content it unpacks to.
///
/// `names[0]` is the name the `tar` crate resolves (GNU long name, else pax `path`, else the
/// header's); the others are what the header and a pax record say when they differ. A member
/// that carries several is checked under each, so an archive cannot show one name to this check
/// and another to GNU tar. Likewise `links` for link targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub kind: MemberKind,
    pub names: Vec<Vec<u8>>,
    pub links: Vec<Vec<u8>>,
    pub size: u64,
}

/// A member path, relative to the archive root, with `./` and empty components dropped;
/// `Err` says why it would land outside the root.
fn components(name: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if name.starts_with(b"/") {
        return Err("is an absolute path");
    }
    let mut parts = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("contains `..`"),
            c => parts.push(c),
        }
    }
    Ok(parts)
}

/// Check an archive's members in order and return what it unpacks to. Stops counting (and
/// returns) once past [`TEMPLATE_BYTES_MAX`] or [`TEMPLATE_ENTRIES_MAX`]: the caller's size
/// check refuses it then, and a hostile archive need not be read to its end.
pub fn check_members(
    path: &Path,
    members: impl IntoIterator<Item = Result<Member, TemplateError>>,
) -> Result<TreeSize, TemplateError> {
    let mut size = TreeSize::default();
    let mut symlinks: HashSet<Vec<Vec<u8>>> = HashSet::new();
    for member in members {
        let member = member?;
        let shown = member
            .names
            .first()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        let escapes = |why| TemplateError::Escapes {
            path: path.to_owned(),
            member: shown.clone(),
            why,
        };
        let mut all_parts = Vec::with_capacity(member.names.len());
        for name in &member.names {
            let parts = components(name).map_err(escapes)?;
            // Writing through a symlink the archive made earlier would land wherever it points.
            for depth in 1..parts.len() {
                let prefix: Vec<Vec<u8>> = parts[..depth].iter().map(|p| p.to_vec()).collect();
                if symlinks.contains(&prefix) {
                    return Err(escapes("goes through a symlink of the same archive"));
                }
            }
            all_parts.push(parts);
        }
        match member.kind {
            MemberKind::Symlink => {
                for parts in &all_parts {
                    symlinks.insert(parts.iter().map(|p| p.to_vec()).collect());
                }
            }
            MemberKind::HardLink => {
                for target in &member.links {
                    components(target).map_err(|why| {
                        escapes(if why == "contains `..`" {
                            "is a hard link whose target contains `..`"
                        } else {
                            "is a hard link to an absolute path"
                        })
                    })?;
                }
            }
            MemberKind::File => size.bytes = size.bytes.saturating_add(member.size),
            MemberKind::Dir | MemberKind::Other => {}
        }
        size.entries += 1;
        if size.bytes > TEMPLATE_BYTES_MAX || size.entries > TEMPLATE_ENTRIES_MAX {
            break;
        }
    }
    Ok(size)
}

/// Read and check the members of the archive at `tarball` (plain or compressed).
pub fn check_archive(tarball: &Path) -> Result<TreeSize, TemplateError> {
    let mut magic = Vec::with_capacity(MAGIC_BYTES_MAX);
    std::fs::File::open(tarball)
        .and_then(|f| f.take(MAGIC_BYTES_MAX as u64).read_to_end(&mut magic))
        .map_err(io(format!("read {}", tarball.display())))?;
    let Some((_, program, args)) = DECOMPRESSORS.iter().find(|(m, _, _)| magic.starts_with(m))
    else {
        let file =
            std::fs::File::open(tarball).map_err(io(format!("read {}", tarball.display())))?;
        return check_stream(tarball, file);
    };
    let command = format!("{program} {} {}", args.join(" "), tarball.display());
    let mut child = Command::new(program)
        .args(*args)
        .arg(tarball)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("run {command}")))?;
    let Some(mut stdout) = child.stdout.take() else {
        reap(&mut child);
        return Err(io(format!("run {command}"))(std::io::Error::other(
            "no stdout pipe",
        )));
    };
    let checked = check_stream(tarball, &mut stdout);
    let size = match checked {
        Ok(size) => size,
        Err(e) => {
            // Refused (or unreadable) before the end: the rest of the stream is not wanted.
            reap(&mut child);
            return Err(e);
        }
    };
    let capped = size.bytes > TEMPLATE_BYTES_MAX || size.entries > TEMPLATE_ENTRIES_MAX;
    if capped {
        // Refused by the size check anyway; do not decompress a bomb to its end.
        reap(&mut child);
        return Ok(size);
    }
    // Read what follows the end-of-archive blocks (tar pads to its record size), so the
    // decompressor finishes instead of dying of a closed pipe.
    std::io::copy(&mut stdout, &mut std::io::sink()).map_err(io(format!("run {command}")))?;
    drop(stdout);
    let out = child
        .wait_with_output()
        .map_err(io(format!("run {command}")))?;
    if !out.status.success() {
        return Err(TemplateError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(size)
}

fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The members of an uncompressed tar stream, checked.
fn check_stream(tarball: &Path, reader: impl Read) -> Result<TreeSize, TemplateError> {
    let mut archive = tar::Archive::new(reader);
    let unreadable = |e| io(format!("read the members of {}", tarball.display()))(e);
    let entries = archive.entries().map_err(unreadable)?;
    let members = entries.filter_map(|entry| {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return Some(Err(unreadable(e))),
        };
        let kind = entry.header().entry_type();
        // A pax global header describes the archive, not a member; GNU tar writes nothing
        // for it.
        if kind.is_pax_global_extensions() {
            return None;
        }
        let kind = if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            MemberKind::File
        } else if kind.is_dir() {
            MemberKind::Dir
        } else if kind.is_symlink() {
            MemberKind::Symlink
        } else if kind.is_hard_link() {
            MemberKind::HardLink
        } else {
            MemberKind::Other
        };
        let mut names = vec![entry.path_bytes().into_owned()];
        let mut links: Vec<Vec<u8>> = entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .into_iter()
            .collect();
        let header = entry.header();
        let (header_name, header_link) = (
            header.path_bytes().into_owned(),
            header.link_name_bytes().map(|l| l.into_owned()),
        );
        let size = entry.size();
        let pax = match entry.pax_extensions() {
            Ok(p) => p.map(|exts| {
                exts.flatten()
                    .map(|e| (e.key_bytes().to_vec(), e.value_bytes().to_vec()))
                    .collect::<Vec<_>>()
            }),
            Err(e) => return Some(Err(unreadable(e))),
        };
        for (key, value) in pax.into_iter().flatten() {
            match key.as_slice() {
                b"path" => names.push(value),
                b"linkpath" => links.push(value),
                _ => {}
            }
        }
        names.push(header_name);
        links.extend(header_link);
        names.dedup();
        links.dedup();
        Some(Ok(Member {
            kind,
            names,
            links,
            size,
        }))
    });
    check_members(tarball, members)
}
