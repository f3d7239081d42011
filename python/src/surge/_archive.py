"""Directories as tar streams, both ways, under the rule the node applies to uploads: members
are relative, never leave the target (no `..`, no absolute paths, no links out), and are files,
directories or symlinks only."""

from __future__ import annotations

import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import InvalidArgument, SurgeError

CHUNK_BYTES = 1024 * 1024
# As the server's caps (surge_guest::proto::UPLOAD_BYTES_MAX / UPLOAD_ENTRIES_MAX).
ARCHIVE_BYTES_MAX = 4 << 30
ENTRIES_MAX = 100_000
# Archives up to this size stay in memory; bigger ones spill to a temporary file.
SPOOL_BYTES = 32 * 1024 * 1024


def pack(local_dir: str | os.PathLike[str]) -> IO[bytes]:
    """`local_dir`'s contents as a tar archive (members relative to it), rewound."""
    root = Path(local_dir)
    if not root.is_dir():
        raise InvalidArgument(f"upload_dir: {root} is not a directory")
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (returned open)
    count = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                count += 1
                if count > ENTRIES_MAX:
                    raise InvalidArgument(f"upload_dir: {root} has more than {ENTRIES_MAX} entries")
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                tar.add(full, arcname=rel, recursive=False)
                if out.tell() > ARCHIVE_BYTES_MAX:
                    raise InvalidArgument(f"upload_dir: {root} is larger than 4 GiB")
    out.seek(0)
    return out


def chunks(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        b = f.read(CHUNK_BYTES)
        if not b:
            return
        yield b


def check_member(m: tarfile.TarInfo) -> str | None:
    """Why `m` may not be unpacked, or None."""
    name = m.name
    if not name or name.startswith("/") or "\0" in name:
        return f"{name!r}: not a relative path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return f"{name!r}: leaves the target directory"
    if not (m.isfile() or m.isdir() or m.issym()):
        return f"{name!r}: only files, directories and symlinks are unpacked"
    if m.issym():
        target = m.linkname
        joined = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), target))
        if target.startswith("/") or joined == ".." or joined.startswith("../"):
            return f"{name!r}: a symlink out of the target directory ({target!r})"
    return None


def unpack(f: IO[bytes], local_dir: str | os.PathLike[str]) -> int:
    """Unpack the archive in `f` under `local_dir` (created). Every member is checked before
    anything is written: a bad archive writes nothing. Returns the number of members."""
    dest = Path(local_dir)
    with tarfile.open(fileobj=f, mode="r:") as tar:
        members = tar.getmembers()
        if len(members) > ENTRIES_MAX:
            raise SurgeError(f"download_dir: more than {ENTRIES_MAX} entries")
        for m in members:
            why = check_member(m)
            if why:
                raise SurgeError(f"download_dir: refused archive member {why}")
        dest.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python < 3.10.12: the checks above are the filter
            tar.extractall(dest, members=members)
    return len(members)
