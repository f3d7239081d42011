"""surge: sandboxes that agents and RL trainers drive.

    from surge import Client
    with Client() as c, c.create_sandbox(cpu=0.5, memory_mib=256, ttl="10m") as sb:
        print(sb.exec(["echo", "hi"]).stdout)

`Client` blocks; `AsyncClient` is the same API with async/await. Addresses and credentials come
from the arguments or, as for the CLI, `SURGE_SERVER`, `SURGE_TOKEN` and `SURGE_TLS_DIR`.
"""

from ._aio import AsyncClient
from ._job import AsyncJob
from ._owner import OWNER_LABEL
from ._sandbox import AsyncSandbox, ExecStream, SandboxNotRunning
from ._sync import Client, Job, Sandbox, SyncExecStream
from ._types import Counts, DirEntry, EndReason, ExecChunk, ExecResult, JobInfo, SandboxInfo
from ._version import __version__
from .errors import (
    Busy,
    CannotCheckpoint,
    ExecTimeout,
    InvalidArgument,
    PermissionDenied,
    QuotaExceeded,
    SandboxEnded,
    SandboxNotFound,
    ServerError,
    StartTimeout,
    SurgeError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "OWNER_LABEL",
    "AsyncClient",
    "AsyncJob",
    "AsyncSandbox",
    "Busy",
    "CannotCheckpoint",
    "Client",
    "Counts",
    "DirEntry",
    "EndReason",
    "ExecChunk",
    "ExecResult",
    "ExecStream",
    "ExecTimeout",
    "InvalidArgument",
    "Job",
    "JobInfo",
    "PermissionDenied",
    "QuotaExceeded",
    "Sandbox",
    "SandboxEnded",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxNotRunning",
    "ServerError",
    "StartTimeout",
    "SurgeError",
    "SyncExecStream",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]
