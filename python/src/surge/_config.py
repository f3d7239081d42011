"""Where the cluster is and who is calling: the same addresses and credentials the CLI takes
(`SURGE_SERVER`, `SURGE_TOKEN`, `SURGE_TLS_DIR`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .errors import InvalidArgument

DEFAULT_SERVER = "127.0.0.1:7070"
# Replica addresses one client accepts (as the CLI).
SERVERS_MAX = 16
# A PEM file of the TLS dir (as the server's own loader caps it).
PEM_BYTES_MAX = 256 * 1024
TOKEN_BYTES_MAX = 4096

_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


@dataclass(frozen=True)
class Tls:
    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class Config:
    servers: tuple[str, ...]
    token: str | None
    tls: Tls | None

    @staticmethod
    def resolve(
        server: str | None = None,
        token: str | None = None,
        tls_dir: str | os.PathLike[str] | None = None,
    ) -> Config:
        """Arguments first, then the environment, then `127.0.0.1:7070` with no credentials."""
        spec = server or os.environ.get("SURGE_SERVER") or DEFAULT_SERVER
        servers = tuple(s.strip() for s in spec.split(",") if s.strip())
        if not servers:
            raise InvalidArgument(f"server {spec!r}: give HOST:PORT[,HOST:PORT...]")
        if len(servers) > SERVERS_MAX:
            raise InvalidArgument(f"server: {len(servers)} addresses given; at most {SERVERS_MAX}")
        for s in servers:
            m = _HOSTPORT.match(s)
            if not m or not 0 < int(m.group(2)) < 65536:
                raise InvalidArgument(f"server {s!r}: expected HOST:PORT")
        tok = token if token is not None else os.environ.get("SURGE_TOKEN")
        tok = tok or None
        if tok is not None and (
            len(tok) > TOKEN_BYTES_MAX or not tok.isascii() or not tok.isprintable()
        ):
            raise InvalidArgument("token: printable ASCII of at most 4096 bytes")
        dir_ = tls_dir if tls_dir is not None else os.environ.get("SURGE_TLS_DIR")
        tls = _load_tls(Path(dir_)) if dir_ else None
        return Config(servers, tok, tls)


def _read_pem(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(PEM_BYTES_MAX + 1)
    except OSError as e:
        raise InvalidArgument(f"tls_dir: cannot read {path}: {e.strerror}") from e
    if len(data) > PEM_BYTES_MAX:
        raise InvalidArgument(f"tls_dir: {path} is larger than {PEM_BYTES_MAX} bytes")
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"tls_dir: {path} is not PEM")
    return data


def _load_tls(d: Path) -> Tls:
    """A `surge cert issue --role client` directory: ca.pem, cert.pem, key.pem."""
    return Tls(_read_pem(d / "ca.pem"), _read_pem(d / "cert.pem"), _read_pem(d / "key.pem"))


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def seconds(value: float | str | timedelta | None, what: str) -> float | None:
    """`90`, `90.5`, `"90s"`, `"10m"`, `"2h"`, `"1d"`, `"500ms"` or a timedelta, in seconds."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        s = value.total_seconds()
    elif isinstance(value, bool):
        raise InvalidArgument(f"{what}: expected a duration, got {value!r}")
    elif isinstance(value, (int, float)):
        s = float(value)
    else:
        m = _DURATION.match(value)
        if not m:
            raise InvalidArgument(
                f"{what} {value!r}: write a number and a unit: 500ms, 90s, 10m, 2h, 1d"
            )
        s = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not s >= 0:
        raise InvalidArgument(f"{what}: {value!r} is negative")
    return s


def millis(value: float | str | timedelta | None, what: str) -> int:
    """A duration in whole milliseconds for the wire (0: none)."""
    s = seconds(value, what)
    return 0 if s is None else round(s * 1000)
