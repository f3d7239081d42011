"""Typed errors. Every error of the SDK is a `SurgeError`; the message is the server's own words
(it names what was wrong), prefixed with what the SDK was doing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._types import EndReason, ExecResult


class SurgeError(Exception):
    """Anything that went wrong talking to surge."""


class InvalidArgument(SurgeError, ValueError):
    """The request was refused as malformed or out of bounds (the message says which field)."""


class SandboxNotFound(SurgeError, LookupError):
    """No such job or sandbox for this caller (another tenant's sandbox looks exactly like this)."""


class PermissionDenied(SurgeError):
    """The credentials do not allow this call (a tenant token on an admin call, no token, ...)."""


class Unauthenticated(PermissionDenied):
    """No token, or a token the cluster does not know."""


class QuotaExceeded(SurgeError):
    """The tenant is at its quota: the sandboxes could not start (and were deleted)."""


class Busy(SurgeError):
    """The sandbox runs as many execs as it takes at once; try again when one ends."""


class Unavailable(SurgeError, ConnectionError):
    """No replica could answer, after retries across every replica given."""


class StartTimeout(SurgeError, TimeoutError):
    """Sandboxes did not start running within `start_timeout` (they were deleted)."""


class ExecTimeout(SurgeError, TimeoutError):
    """The command ran past its timeout and was killed, with what it printed until then."""

    def __init__(self, message: str, result: ExecResult) -> None:
        super().__init__(message)
        self.result = result


class CannotCheckpoint(SurgeError):
    """A checkpoint, resume or fork was refused or failed: the sandbox is not running (or not
    checkpointed, for resume), its node cannot checkpoint (krun, simulated, no usable CRIU), the
    forks can never fit there, or the node's dump failed (the sandbox keeps running). `reason` is
    the server's one line."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SandboxEnded(SurgeError):
    """The sandbox is no longer running. `reason` says why (`EndReason`); `infrastructure` is true
    when that was surge's doing (node lost, runtime error), which a trainer masks out of its
    rewards rather than scoring."""

    def __init__(
        self,
        message: str,
        *,
        reason: EndReason | None,
        infrastructure: bool,
        exit_code: int = 0,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.infrastructure = infrastructure
        self.exit_code = exit_code


class ServerError(SurgeError):
    """The server failed in a way the SDK has no better name for (the gRPC code is kept)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code
