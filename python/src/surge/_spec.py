"""Turning what a caller passes (0.5 CPUs, "10m", {"kind": "real"}) into a JobSpec."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta

from ._config import millis
from ._proto import jobs_pb2
from .errors import InvalidArgument

Duration = float | str | timedelta | None
Constraints = Mapping[str, str] | Sequence[str] | None

# As the server's bounds (scheduler validate.rs): checked here too so the error names the
# argument as the caller wrote it.
COUNT_MAX = 1_000_000
LABELS_MAX = 16


def cpu_millis(cpu: float) -> int:
    if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not cpu > 0:
        raise InvalidArgument(f"cpu {cpu!r}: a positive number of CPUs (0.5 is half a CPU)")
    m = round(cpu * 1000)
    if m < 1:
        raise InvalidArgument(f"cpu {cpu!r}: at least 0.001")
    return m


def constraints(c: Constraints) -> list[jobs_pb2.Constraint]:
    if c is None:
        return []
    out = []
    if isinstance(c, Mapping):
        for k, v in c.items():
            out.append(jobs_pb2.Constraint(key=k, op="=", value=v))
        return out
    if isinstance(c, str):
        raise InvalidArgument(f"constraints {c!r}: a list of 'k=v' / 'k!=v' or a dict")
    for term in c:
        if "!=" in term:
            k, v = term.split("!=", 1)
            out.append(jobs_pb2.Constraint(key=k, op="!=", value=v))
        elif "=" in term:
            k, v = term.split("=", 1)
            out.append(jobs_pb2.Constraint(key=k, op="=", value=v))
        else:
            raise InvalidArgument(f"constraint {term!r}: write key=value or key!=value")
    return out


def job_spec(
    *,
    count: int,
    cpu: float,
    memory_mib: int,
    template: str | None,
    command: Sequence[str] | None,
    env: Mapping[str, str] | None,
    labels: Mapping[str, str] | None,
    owner: tuple[str, str] | None,
    ttl: Duration,
    idle_timeout: Duration,
    lease: Duration,
    constraints_: Constraints,
    priority: int,
    tenant: str | None,
    name: str | None,
    gang: bool,
    user: str | None = None,
) -> jobs_pb2.JobSpec:
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= COUNT_MAX:
        raise InvalidArgument(f"count {count!r}: 1 to {COUNT_MAX:,}")
    if isinstance(memory_mib, bool) or not isinstance(memory_mib, int) or memory_mib <= 0:
        raise InvalidArgument(f"memory_mib {memory_mib!r}: a positive whole number of MiB")
    if isinstance(command, str):
        raise InvalidArgument(
            f"command {command!r}: a list of arguments, e.g. ['sh', '-c', {command!r}]"
        )
    if user not in (None, "", "root"):
        raise InvalidArgument(
            f"user {user!r}: None (the node's sandbox user) or 'root' (uid 0 in the sandbox, "
            "still without capabilities; checkpointing needs it on most hosts)"
        )
    all_labels = dict(labels or {})
    if owner is not None:
        all_labels[owner[0]] = owner[1]
    if len(all_labels) > LABELS_MAX:
        raise InvalidArgument(
            f"labels: at most {LABELS_MAX - (owner is not None)} (the SDK adds its owner label)"
        )
    return jobs_pb2.JobSpec(
        count=count,
        cpu_millis=cpu_millis(cpu),
        memory_mib=memory_mib,
        template=template or "",
        command=list(command or []),
        env=dict(env or {}),
        priority=priority,
        tenant=tenant or "",
        gang=gang,
        constraints=constraints(constraints_),
        name=name or "",
        labels=all_labels,
        ttl_ms=millis(ttl, "ttl"),
        idle_timeout_ms=millis(idle_timeout, "idle_timeout"),
        lease_ms=millis(lease, "lease"),
        user=user or "",
    )
