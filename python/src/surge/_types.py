"""Values the SDK returns: plain dataclasses made from the wire messages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, cast

from ._proto import jobs_pb2, sandbox_pb2


class EndReason(str, enum.Enum):
    """Why a sandbox ended, as `surge` prints it. `infrastructure` is true for surge's failures
    (the node, the runtime, preemption), which are not the command's doing."""

    EXITED = "exited"
    SIGNAL = "signal"
    OOM_KILLED = "oom-killed"
    TTL_EXPIRED = "ttl-expired"
    IDLE_TIMEOUT = "idle-timeout"
    LEASE_LOST = "lease-lost"
    NODE_LOST = "node-lost"
    PREEMPTED = "preempted"
    STOPPED = "stopped"
    CANCELLED = "cancelled"
    RUNTIME_ERROR = "runtime-error"

    @property
    def infrastructure(self) -> bool:
        return self in (EndReason.NODE_LOST, EndReason.RUNTIME_ERROR, EndReason.PREEMPTED)

    @staticmethod
    def from_pb(value: int) -> EndReason | None:
        return _END_REASONS.get(value)


_END_REASONS: dict[int, EndReason] = {
    jobs_pb2.END_REASON_EXITED: EndReason.EXITED,
    jobs_pb2.END_REASON_SIGNAL: EndReason.SIGNAL,
    jobs_pb2.END_REASON_OOM_KILLED: EndReason.OOM_KILLED,
    jobs_pb2.END_REASON_TTL_EXPIRED: EndReason.TTL_EXPIRED,
    jobs_pb2.END_REASON_IDLE_TIMEOUT: EndReason.IDLE_TIMEOUT,
    jobs_pb2.END_REASON_LEASE_LOST: EndReason.LEASE_LOST,
    jobs_pb2.END_REASON_NODE_LOST: EndReason.NODE_LOST,
    jobs_pb2.END_REASON_PREEMPTED: EndReason.PREEMPTED,
    jobs_pb2.END_REASON_STOPPED: EndReason.STOPPED,
    jobs_pb2.END_REASON_CANCELLED: EndReason.CANCELLED,
    jobs_pb2.END_REASON_RUNTIME_ERROR: EndReason.RUNTIME_ERROR,
}


def _name(prefix: str, full: str) -> str:
    """A wire enum value's name as surge prints it: SANDBOX_STATE_OOM_KILLED -> oom-killed."""
    return full.removeprefix(prefix).lower().replace("_", "-")


def sandbox_state_name(value: int) -> str:
    """A sandbox state's name ("" for unspecified or a value this SDK does not know)."""
    if value == jobs_pb2.SANDBOX_STATE_UNSPECIFIED:
        return ""
    try:
        return _name("SANDBOX_STATE_", jobs_pb2.SandboxState.Name(cast(Any, value)))
    except ValueError:
        return ""


def job_state_name(value: int) -> str:
    """A job state's name ("" for unspecified or a value this SDK does not know)."""
    if value == jobs_pb2.JOB_STATE_UNSPECIFIED:
        return ""
    try:
        return _name("JOB_STATE_", jobs_pb2.JobState.Name(cast(Any, value)))
    except ValueError:
        return ""


def job_state_value(name: str) -> jobs_pb2.JobState.ValueType:
    """The wire value of a job state name ("running"); ValueError for an unknown one."""
    names = [n for n in jobs_pb2.JobState.keys() if n != "JOB_STATE_UNSPECIFIED"]  # noqa: SIM118
    for full in names:
        if _name("JOB_STATE_", full) == name:
            return jobs_pb2.JobState.Value(full)
    known = ", ".join(_name("JOB_STATE_", n) for n in names)
    raise ValueError(f"unknown job state {name!r}; use {known}")


# Sandbox states after which nothing runs again.
ENDED_STATES = frozenset({"succeeded", "failed", "oom-killed", "lost", "cancelled", "stopped"})
# Job states after which nothing runs again.
JOB_ENDED_STATES = frozenset({"complete", "failed", "cancelled"})


@dataclass(frozen=True)
class ExecResult:
    """A finished command: its output (decoded as UTF-8, undecodable bytes replaced; the raw
    bytes are `stdout_bytes` / `stderr_bytes`), its exit code and how long it ran."""

    stdout_bytes: bytes
    stderr_bytes: bytes
    exit_code: int
    # The signal that killed it (0: none).
    signal: int = 0
    timed_out: bool = False
    duration_s: float = 0.0

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.signal == 0


@dataclass(frozen=True)
class ExecChunk:
    """A piece of a running command's output: `stream` is "stdout" or "stderr"."""

    stream: str
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class DirEntry:
    name: str
    # "file", "dir", "symlink" or "other"
    kind: str
    size: int
    mode: int
    modified_ms: int

    @staticmethod
    def from_pb(e: sandbox_pb2.DirEntry) -> DirEntry:
        kind = {
            sandbox_pb2.ENTRY_KIND_FILE: "file",
            sandbox_pb2.ENTRY_KIND_DIR: "dir",
            sandbox_pb2.ENTRY_KIND_SYMLINK: "symlink",
        }.get(e.kind, "other")
        return DirEntry(e.name, kind, e.size, e.mode, e.modified_ms)


@dataclass(frozen=True)
class Counts:
    """Sandboxes of a job by state."""

    pending: int = 0
    placed: int = 0
    running: int = 0
    paused: int = 0
    succeeded: int = 0
    failed: int = 0
    oom_killed: int = 0
    lost: int = 0
    cancelled: int = 0
    stopped: int = 0
    # Saved to their nodes' disks (`surge pause --checkpoint`), holding no CPU or memory.
    checkpointed: int = 0
    # Times sandboxes were preempted (they went back to pending).
    preempted: int = 0

    @staticmethod
    def from_pb(c: jobs_pb2.Counts) -> Counts:
        return Counts(
            pending=c.pending,
            placed=c.placed,
            running=c.running,
            paused=c.paused,
            succeeded=c.succeeded,
            failed=c.failed,
            oom_killed=c.oom_killed,
            lost=c.lost,
            cancelled=c.cancelled,
            stopped=c.stopped,
            checkpointed=c.checkpointed,
            preempted=c.preempted,
        )

    @property
    def ended(self) -> int:
        return (
            self.succeeded
            + self.failed
            + self.oom_killed
            + self.lost
            + self.cancelled
            + self.stopped
        )


@dataclass(frozen=True)
class JobInfo:
    id: int
    state: str
    tenant: str
    count: int
    counts: Counts
    labels: dict[str, str]
    # Why sandboxes still wait, in words ("" when none do).
    pending_reason: str
    submitted_at_ms: int
    finished_at_ms: int
    name: str = ""
    exits: list[tuple[str, int, int, EndReason | None]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.state in JOB_ENDED_STATES

    @staticmethod
    def from_pb(j: jobs_pb2.Job) -> JobInfo:
        return JobInfo(
            id=j.id,
            state=job_state_name(j.state),
            tenant=j.spec.tenant,
            count=j.spec.count,
            counts=Counts.from_pb(j.counts),
            labels=dict(j.spec.labels),
            pending_reason=j.pending_reason,
            submitted_at_ms=j.submitted_at_ms,
            finished_at_ms=j.finished_at_ms,
            name=j.spec.name,
            exits=[
                (sandbox_state_name(e.state), e.exit_code, e.count, EndReason.from_pb(e.reason))
                for e in j.exits
            ],
        )


@dataclass(frozen=True)
class SandboxInfo:
    job_id: int
    index: int
    state: str
    node: str
    exit_code: int
    end_reason: EndReason | None
    # The end was surge's failure, not the command's doing.
    infrastructure: bool
    message: str
    # The last bytes of stdout+stderr once it ended (when the job kept them).
    log_tail: str
    expires_at_ms: int
    # With state "checkpointed": the size of its image on `node`, where it is pinned.
    image_bytes: int = 0
    # What the scheduler asks its node for ("running", "paused", "stopped", "checkpointed").
    desired_state: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @staticmethod
    def from_pb(s: jobs_pb2.SandboxInfo) -> SandboxInfo:
        return SandboxInfo(
            job_id=s.job_id,
            index=s.index,
            state=sandbox_state_name(s.state),
            node=s.node,
            exit_code=s.exit_code,
            end_reason=EndReason.from_pb(s.end_reason),
            infrastructure=s.infrastructure,
            message=s.message,
            log_tail=s.log_tail,
            expires_at_ms=s.expires_at_ms,
            image_bytes=s.image_bytes,
            desired_state=sandbox_state_name(s.desired_state),
        )
