//! The rule for members of an uploaded tar stream, the one the node applies too (its
//! `surge_node::runtime::io::check_member` calls this): a relative path that stays below the target (no `..`, no absolute path, UTF-8), of a kind
//! an upload may create (file, directory, symlink; never a device, FIFO or hard link).

use std::path::{Component, Path};

use crate::proto::PATH_BYTES_MAX;

/// The kinds of member an upload may create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberKind {
    File,
    Dir,
    Symlink,
}

/// Check one member; its path's components and kind, or why it is refused.
pub fn check_member(
    path: &Path,
    kind: tar::EntryType,
) -> Result<(Vec<String>, MemberKind), String> {
    let shown = path.display();
    let kind = match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous => MemberKind::File,
        tar::EntryType::Directory => MemberKind::Dir,
        tar::EntryType::Symlink => MemberKind::Symlink,
        other => {
            return Err(format!(
                "member {shown} is a {other:?}; only files, directories and symlinks are accepted"
            ))
        }
    };
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => {
                let p = p
                    .to_str()
                    .ok_or_else(|| format!("member {shown}: the name is not UTF-8"))?;
                parts.push(p.to_string());
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "member {shown} has an absolute path; members must be relative"
                ))
            }
            Component::ParentDir => {
                return Err(format!(
                    "member {shown} leaves the target directory through '..'"
                ))
            }
        }
    }
    if parts.is_empty() && kind != MemberKind::Dir {
        return Err(format!("member {shown} has no name"));
    }
    let joined: usize = parts.iter().map(|p| p.len() + 1).sum();
    if joined > PATH_BYTES_MAX {
        return Err(format!(
            "member path of {joined} bytes; at most {PATH_BYTES_MAX}"
        ));
    }
    Ok((parts, kind))
}
