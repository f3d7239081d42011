"""A job: a batch of sandboxes submitted in one call."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc.aio

from ._config import seconds
from ._proto import jobs_pb2
from ._transport import REQUEST_TIMEOUT, Repeat, to_error
from ._types import Counts, JobInfo, SandboxInfo
from .errors import SurgeError

if TYPE_CHECKING:
    from ._aio import AsyncClient
    from ._sandbox import AsyncSandbox
    from ._spec import Duration

# Longest server-side wait of one WaitJob request.
WAIT_CHUNK = 15.0


class AsyncJob:
    def __init__(self, client: AsyncClient, job_id: int, *, created: bool = True) -> None:
        self.client = client
        self.id = job_id
        # False when the idempotency key matched a job submitted before.
        self.created = created
        self.info: JobInfo | None = None

    def __repr__(self) -> str:
        return f"<surge job {self.id}>"

    @property
    def counts(self) -> Counts:
        """Sandboxes by state, as of the last `refresh()`, `wait()` or `cancel()`."""
        if self.info is None:
            raise SurgeError(f"job {self.id}: no state fetched yet; call refresh() or wait()")
        return self.info.counts

    async def refresh(self) -> JobInfo:
        j = await self.client._unary(
            Repeat.SAFE,
            f"job {self.id}",
            lambda s: s.GetJob,
            jobs_pb2.GetJobRequest(job_id=self.id),
        )
        self.info = JobInfo.from_pb(j)
        return self.info

    async def _wait(self, until: int, index: int | None, timeout: float) -> jobs_pb2.WaitJobReply:
        ms = max(1, round(timeout * 1000))
        req = jobs_pb2.WaitJobRequest(job_id=self.id, timeout_ms=ms, until=until)  # type: ignore[arg-type]
        if index is not None:
            req.index = index
        reply: jobs_pb2.WaitJobReply = await self.client._unary(
            Repeat.SAFE,
            f"wait for job {self.id}",
            lambda s: s.WaitJob,
            req,
            timeout=timeout + REQUEST_TIMEOUT,
        )
        self.info = JobInfo.from_pb(reply.job)
        return reply

    async def wait(self, timeout: Duration = None) -> JobInfo:
        """Wait (server-side, without polling) until every sandbox has ended; the job's final
        state. With `timeout`, returns the state at that time if it has not ended."""
        limit = seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            chunk = WAIT_CHUNK if deadline is None else min(WAIT_CHUNK, deadline - time.monotonic())
            reply = await self._wait(jobs_pb2.WAIT_FOR_ENDED, None, max(0.001, chunk))
            info = JobInfo.from_pb(reply.job)
            if reply.outcome != jobs_pb2.WAIT_OUTCOME_TIMED_OUT or info.ended:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                return info

    async def cancel(self) -> JobInfo:
        j = await self.client._unary(
            Repeat.SAFE,
            f"cancel job {self.id}",
            lambda s: s.CancelJob,
            jobs_pb2.CancelJobRequest(job_id=self.id),
        )
        self.client._owned.discard(self.id)
        self.info = JobInfo.from_pb(j)
        return self.info

    async def keepalive(self, ttl: Duration = None) -> JobInfo:
        """Renew the owner lease now; with `ttl`, the sandboxes may live that long from now."""
        from ._config import millis

        j = await self.client._unary(
            Repeat.SAFE,
            f"keepalive of job {self.id}",
            lambda s: s.Keepalive,
            jobs_pb2.KeepaliveRequest(job_id=self.id, ttl_ms=millis(ttl, "ttl")),
        )
        self.info = JobInfo.from_pb(j)
        return self.info

    async def sandbox_info(self, index: int) -> SandboxInfo:
        s = await self.client._unary(
            Repeat.SAFE,
            f"sandbox {self.id}.{index}",
            lambda st: st.GetSandbox,
            jobs_pb2.GetSandboxRequest(job_id=self.id, index=index),
        )
        return SandboxInfo.from_pb(s)

    async def sandboxes(self) -> list[AsyncSandbox]:
        from ._sandbox import AsyncSandbox

        info = self.info or await self.refresh()
        return [AsyncSandbox(self.client, self.id, i) for i in range(info.count)]

    async def watch(self) -> AsyncIterator[JobInfo]:
        """The job's current state, then every change, until it ends."""
        t = self.client.transport
        addr = t.order()[0]
        call = t.jobs(addr).WatchJob(jobs_pb2.GetJobRequest(job_id=self.id), metadata=t.metadata)
        try:
            async for j in call:
                self.info = JobInfo.from_pb(j)
                yield self.info
        except grpc.aio.AioRpcError as e:
            raise to_error(e, f"watch job {self.id}") from e
        finally:
            call.cancel()
