"""Close the lid: checkpoint a sandbox to its node's disk, resume it there, fork it N times.

checkpoint: UpdateSandboxes(CHECKPOINT) --refused--> CannotCheckpoint(reason)
    --> poll until state "checkpointed" (done) | desired back to "running" (the node's
        dump failed: CannotCheckpoint with its note) | ended (SandboxEnded)
resume:     UpdateSandboxes(RESUME) --> WaitJob(RUNNING, index) (it may wait for room)
fork:       ForkSandbox(count, one key per call) --refused--> CannotCheckpoint(reason)
    --> WaitJob(RUNNING) for the whole fork job, else it is cancelled and the error raised
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any

from ._config import seconds
from ._owner import OWNER_LABEL
from ._proto import jobs_pb2
from ._transport import Repeat
from ._types import SandboxInfo
from .errors import CannotCheckpoint, InvalidArgument, SandboxEnded, StartTimeout, SurgeError

if TYPE_CHECKING:
    from ._sandbox import AsyncSandbox
    from ._spec import Duration

# How long checkpoint() / resume() / fork() wait unless told otherwise (a 1 GiB dump writes 1 GiB).
LID_TIMEOUT_DEFAULT = 300.0
# As the server's FORK_COUNT_MAX.
FORK_COUNT_MAX = 64
# Polling a dump in progress: first step, growth, and the longest step.
POLL_FIRST = 0.05
POLL_MAX = 1.0


def _limit(timeout: Duration) -> float:
    return seconds(timeout, "timeout") or LID_TIMEOUT_DEFAULT


def _ended(sb: AsyncSandbox, info: SandboxInfo, what: str) -> SandboxEnded:
    reason = info.end_reason
    return SandboxEnded(
        f"{what}: sandbox {sb.id} has ended ({reason.value if reason else info.state})"
        + (f": {info.message}" if info.message else ""),
        reason=reason,
        infrastructure=info.infrastructure,
        exit_code=info.exit_code,
    )


async def _refusable(sb: AsyncSandbox, what: str, method: str, request: Any) -> Any:
    """A lid call whose refusal (INVALID_ARGUMENT: the server's one line) is CannotCheckpoint."""
    try:
        return await sb.client._unary(Repeat.SAFE, what, lambda s: getattr(s, method), request)
    except InvalidArgument as e:
        reason = str(e).removeprefix(f"{what}: ")
        raise CannotCheckpoint(str(e), reason) from None


async def _act(sb: AsyncSandbox, what: str, action: jobs_pb2.SandboxAction.ValueType) -> None:
    """Ask for `action` on this one sandbox (refusals: CannotCheckpoint)."""
    req = jobs_pb2.UpdateSandboxesRequest(
        job_id=sb.job_id, first_index=sb.index, count=1, action=action
    )
    await _refusable(sb, what, "UpdateSandboxes", req)


async def checkpoint(sb: AsyncSandbox, timeout: Duration) -> SandboxInfo:
    what = f"checkpoint of sandbox {sb.id}"
    limit = _limit(timeout)
    await _act(sb, what, jobs_pb2.SANDBOX_ACTION_CHECKPOINT)
    deadline = time.monotonic() + limit
    step = POLL_FIRST
    while True:
        info = await sb.info()
        if info.state == "checkpointed":
            return info
        if info.ended:
            raise _ended(sb, info, what)
        if info.desired_state != "checkpointed":
            # The node's dump failed; the sandbox keeps running and its note says why.
            reason = info.message or f"the node gave up the dump; the sandbox is {info.state}"
            raise CannotCheckpoint(f"{what}: {reason}", reason)
        if time.monotonic() >= deadline:
            raise SurgeError(
                f"{what}: not checkpointed after {limit:g} s (it is {info.state}"
                + (f": {info.message}" if info.message else "")
                + ")"
            )
        await asyncio.sleep(step)
        step = min(step * 2, POLL_MAX)


async def resume(sb: AsyncSandbox, timeout: Duration) -> SandboxInfo:
    """Thaw a paused sandbox or restore a checkpointed one on its node; running when this
    returns (a restore may wait for room there: then StartTimeout after `timeout`)."""
    from ._job import AsyncJob

    what = f"resume of sandbox {sb.id}"
    limit = _limit(timeout)
    await _act(sb, what, jobs_pb2.SANDBOX_ACTION_RESUME)
    reply = await AsyncJob(sb.client, sb.job_id)._wait(jobs_pb2.WAIT_FOR_RUNNING, sb.index, limit)
    info = SandboxInfo.from_pb(reply.sandbox)
    if info.state == "running":
        return info
    if info.ended:
        raise _ended(sb, info, what)
    raise StartTimeout(
        f"{what}: not running after {limit:g} s (it is {info.state}"
        + (f": {info.message}" if info.message else "")
        + ")"
    )


async def fork(
    sb: AsyncSandbox, count: int, start_timeout: Duration, idempotency_key: str | None
) -> tuple[int, int]:
    """Fork `sb` into a new job of `count` sandboxes, all running when this returns. Returns the
    fork job's id and count; on any failure after the fork job exists, it is cancelled."""
    from ._job import AsyncJob

    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= FORK_COUNT_MAX:
        raise InvalidArgument(f"count {count!r}: one fork makes 1 to {FORK_COUNT_MAX} sandboxes")
    what = f"fork of sandbox {sb.id}"
    client = sb.client
    limit = seconds(start_timeout, "start_timeout") or LID_TIMEOUT_DEFAULT
    # One key for the whole call: the transport's retries after a lost reply find the first job.
    req = jobs_pb2.ForkSandboxRequest(
        job_id=sb.job_id,
        index=sb.index,
        count=count,
        idempotency_key=idempotency_key or uuid.uuid4().hex,
    )
    if not client.detach:
        # The fork job is this client's like any job it submits: its owner label (close() and
        # the exit clean-up cancel it by label) and its owner lease (a killed client's forks
        # end lease-lost).
        req.labels[OWNER_LABEL] = client.owner
        req.lease_ms = int(client.lease * 1000)
    reply = await _refusable(sb, what, "ForkSandbox", req)
    job_id = int(reply.job_id)
    client._own(job_id)
    job = AsyncJob(client, job_id, created=bool(reply.created))
    try:
        await client._wait_running(job, limit)
    except BaseException:
        with contextlib.suppress(SurgeError):
            await job.cancel()
        raise
    return job_id, count
