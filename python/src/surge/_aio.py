"""The asynchronous client: every call of the SDK is made here (the blocking `Client` runs these
coroutines on its own event loop thread)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from ._config import Config, seconds
from ._job import AsyncJob
from ._owner import OWNER_LABEL, REGISTRY, cancel_owned_blocking, new_owner_id
from ._proto import cluster_pb2, jobs_pb2
from ._sandbox import AsyncSandbox, parse_ref
from ._spec import Constraints, Duration, job_spec
from ._transport import REQUEST_TIMEOUT, Repeat, Transport
from ._types import JobInfo, job_state_value
from .errors import InvalidArgument, QuotaExceeded, SandboxEnded, StartTimeout, SurgeError

# Owner lease of what a client creates, unless told otherwise.
LEASE_DEFAULT = 30.0
# Longest server-side wait of one WaitJob request.
WAIT_CHUNK = 15.0
# How long create_sandbox(es) waits for the sandboxes to run, unless told otherwise.
START_TIMEOUT_DEFAULT = 120.0
# Keepalive calls in flight at once while renewing leases.
RENEW_CONCURRENCY = 32
JOBS_LIMIT_MAX = 10_000


class AsyncClient:
    """A client of one surge cluster.

    `server` is one replica's HOST:PORT or several, comma separated; with none given,
    `SURGE_SERVER`, else `127.0.0.1:7070`. `token` / `tls_dir` default to `SURGE_TOKEN` /
    `SURGE_TLS_DIR`. What the client creates holds an owner lease of `lease` seconds, renewed in the
    background, and is deleted on `close()` (and at exit, and on SIGTERM); `detach=True` keeps what
    it creates alive after the client (no lease, no clean-up).
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        token: str | None = None,
        tls_dir: str | os.PathLike[str] | None = None,
        lease: Duration = LEASE_DEFAULT,
        detach: bool = False,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        self.config = Config.resolve(server, token, tls_dir)
        lease_s = seconds(lease, "lease")
        if lease_s is None or not 1.0 <= lease_s <= 30 * 86400:
            raise InvalidArgument(f"lease {lease!r}: 1 s to 30 days")
        self.lease = lease_s
        self.detach = detach
        self.owner = new_owner_id()
        self._t = Transport(self.config, interceptors)
        # Jobs this client created and still renews.
        self._owned: set[int] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        REGISTRY.add(self)

    # ----- lifecycle

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Delete what this client created (unless `detach`), stop renewing, close channels."""
        if self._closed:
            return
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewer
        if self._owned and not self.detach:
            with contextlib.suppress(SurgeError):
                await self.delete(labels={OWNER_LABEL: self.owner})
        self._owned.clear()
        await self._t.close()
        REGISTRY.remove(self)

    def _cleanup_blocking(self) -> None:
        """At exit or on SIGTERM: cancel what is owned, whatever the event loop is doing."""
        if self._closed or self.detach or not self._owned:
            return
        self._closed = True
        cancel_owned_blocking(self.config, self.owner)
        self._owned.clear()

    def _own(self, job_id: int) -> None:
        if self.detach:
            return
        self._owned.add(job_id)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        sem = asyncio.Semaphore(RENEW_CONCURRENCY)

        async def renew(job_id: int) -> None:
            async with sem:
                try:
                    job = await self._unary(
                        Repeat.SAFE,
                        f"keepalive of job {job_id}",
                        lambda s: s.Keepalive,
                        jobs_pb2.KeepaliveRequest(job_id=job_id),
                    )
                    if JobInfo.from_pb(job).ended:
                        self._owned.discard(job_id)
                except SurgeError as e:
                    from .errors import SandboxNotFound

                    if isinstance(e, SandboxNotFound):
                        self._owned.discard(job_id)

        while True:
            await asyncio.sleep(self.lease / 3)
            await asyncio.gather(*(renew(j) for j in list(self._owned)))

    # ----- plumbing

    async def _unary(
        self, repeat: Repeat, what: str, method: Any, request: Any, timeout: float | None = None
    ) -> Any:
        t = self._t

        async def go(addr: str) -> Any:
            return await method(t.jobs(addr))(
                request, timeout=timeout or REQUEST_TIMEOUT, metadata=t.metadata
            )

        return await t.call(repeat, what, go)

    @property
    def transport(self) -> Transport:
        return self._t

    # ----- sandboxes

    async def create_sandbox(
        self,
        template: str | None = "busybox",
        *,
        cpu: float = 1.0,
        memory_mib: int = 1024,
        ttl: Duration = None,
        idle_timeout: Duration = None,
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        constraints: Constraints = None,
        priority: int = 0,
        tenant: str | None = None,
        name: str | None = None,
        start_timeout: Duration = START_TIMEOUT_DEFAULT,
        user: str | None = None,
    ) -> AsyncSandbox:
        """A long-lived sandbox, running when this returns. Use it as `async with` to delete it
        on leaving the block. `user="root"` runs it as uid 0 in the sandbox (still with no
        capabilities): checkpoint and fork need that on hosts where root lacks CAP_SYS_RESOURCE."""
        (sb,) = await self.create_sandboxes(
            1,
            template=template,
            cpu=cpu,
            memory_mib=memory_mib,
            ttl=ttl,
            idle_timeout=idle_timeout,
            labels=labels,
            env=env,
            constraints=constraints,
            priority=priority,
            tenant=tenant,
            name=name,
            start_timeout=start_timeout,
            user=user,
        )
        return sb

    async def create_sandboxes(
        self,
        count: int,
        template: str | None = "busybox",
        *,
        cpu: float = 1.0,
        memory_mib: int = 1024,
        ttl: Duration = None,
        idle_timeout: Duration = None,
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        constraints: Constraints = None,
        priority: int = 0,
        tenant: str | None = None,
        name: str | None = None,
        gang: bool = False,
        start_timeout: Duration = START_TIMEOUT_DEFAULT,
        idempotency_key: str | None = None,
        user: str | None = None,
    ) -> list[AsyncSandbox]:
        """`count` long-lived sandboxes in one call (one job), all running when this returns.

        If they cannot all start within `start_timeout`, or the tenant is at its quota, the job
        is deleted and `StartTimeout` / `QuotaExceeded` is raised: nothing is left behind."""
        spec = job_spec(
            count=count,
            cpu=cpu,
            memory_mib=memory_mib,
            template=template,
            command=None,
            env=env,
            labels=labels,
            owner=None if self.detach else (OWNER_LABEL, self.owner),
            ttl=ttl,
            idle_timeout=idle_timeout,
            lease=None if self.detach else self.lease,
            constraints_=constraints,
            priority=priority,
            tenant=tenant,
            name=name,
            gang=gang,
            user=user,
        )
        job = await self._submit(spec, idempotency_key)
        limit = seconds(start_timeout, "start_timeout") or START_TIMEOUT_DEFAULT
        try:
            await self._wait_running(job, limit)
        except BaseException:
            with contextlib.suppress(SurgeError):
                await job.cancel()
            raise
        return [AsyncSandbox(self, job.id, i) for i in range(count)]

    async def _submit(self, spec: jobs_pb2.JobSpec, key: str | None) -> AsyncJob:
        # The key makes the submission safe to send again: a retry after a lost reply returns the
        # first job instead of making a second.
        req = jobs_pb2.SubmitJobRequest(spec=spec, idempotency_key=key or uuid.uuid4().hex)
        reply = await self._unary(Repeat.SAFE, "submit", lambda s: s.SubmitJob, req)
        self._own(reply.job_id)
        return AsyncJob(self, reply.job_id, created=reply.created)

    async def _wait_running(self, job: AsyncJob, limit: float) -> None:
        deadline = time.monotonic() + limit
        # A short first wait: a tenant at its quota is told at once rather than at the deadline.
        chunk = 1.0
        while True:
            left = deadline - time.monotonic()
            reply = await job._wait(jobs_pb2.WAIT_FOR_RUNNING, None, max(0.0, min(chunk, left)))
            info = JobInfo.from_pb(reply.job)
            if reply.outcome == jobs_pb2.WAIT_OUTCOME_MET:
                return
            if reply.outcome == jobs_pb2.WAIT_OUTCOME_ENDED:
                first_bad = next((e for e in info.exits if e[3] is not None), None)
                reason = first_bad[3] if first_bad else None
                raise SandboxEnded(
                    f"job {job.id} ended before its sandboxes ran ({info.state}"
                    + (f", {reason.value}" if reason else "")
                    + ")",
                    reason=reason,
                    infrastructure=bool(reason and reason.infrastructure),
                )
            if " at quota " in f" {info.pending_reason} ":
                raise QuotaExceeded(f"job {job.id}: {info.pending_reason}")
            if time.monotonic() >= deadline:
                raise StartTimeout(
                    f"job {job.id}: {info.counts.running} of {info.count} sandboxes running "
                    f"after {limit:g} s ({info.pending_reason or info.state})"
                )
            chunk = WAIT_CHUNK

    def sandbox(self, ref: str | tuple[int, int]) -> AsyncSandbox:
        """A handle on an existing sandbox, `"JOB.INDEX"` or `(job, index)`. Not owned: leaving
        its `async with` block deletes it, but the client's clean-up does not."""
        job_id, index = parse_ref(ref)
        return AsyncSandbox(self, job_id, index)

    # ----- jobs

    async def submit(
        self,
        count: int,
        command: Sequence[str],
        *,
        cpu: float = 1.0,
        memory_mib: int = 1024,
        template: str | None = "busybox",
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        constraints: Constraints = None,
        priority: int = 0,
        tenant: str | None = None,
        name: str | None = None,
        gang: bool = False,
        ttl: Duration = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """The batch API: `count` sandboxes that each run `command` to its end."""
        if not command:
            raise InvalidArgument("command: give the program to run (a list of arguments)")
        spec = job_spec(
            count=count,
            cpu=cpu,
            memory_mib=memory_mib,
            template=template,
            command=command,
            env=env,
            labels=labels,
            owner=None if self.detach else (OWNER_LABEL, self.owner),
            ttl=ttl,
            idle_timeout=None,
            lease=None if self.detach else self.lease,
            constraints_=constraints,
            priority=priority,
            tenant=tenant,
            name=name,
            gang=gang,
        )
        return await self._submit(spec, idempotency_key)

    def job(self, job_id: int) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def jobs(
        self,
        *,
        tenant: str | None = None,
        state: str | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[JobInfo]:
        """Jobs, newest first (a tenant's token sees its own)."""
        if not 0 < limit <= JOBS_LIMIT_MAX:
            raise InvalidArgument(f"limit {limit}: 1 to {JOBS_LIMIT_MAX}")
        try:
            wire_state = job_state_value(state) if state else jobs_pb2.JOB_STATE_UNSPECIFIED
        except ValueError as e:
            raise InvalidArgument(f"state: {e}") from None
        req = jobs_pb2.ListJobsRequest(
            tenant=tenant or "", state=wire_state, limit=limit, labels=dict(labels or {})
        )
        reply = await self._unary(Repeat.SAFE, "list jobs", lambda s: s.ListJobs, req)
        return [JobInfo.from_pb(j) for j in reply.jobs]

    async def delete(
        self, *, labels: Mapping[str, str] | None = None, tenant: str | None = None
    ) -> int:
        """Delete (cancel) every job whose labels carry all of `labels`, in one replicated entry.
        Returns how many jobs were cancelled."""
        if not labels:
            raise InvalidArgument("labels: give at least one KEY=VALUE to match")
        req = jobs_pb2.CancelJobsRequest(labels=dict(labels), tenant=tenant or "")
        reply = await self._unary(Repeat.SAFE, "delete by labels", lambda s: s.CancelJobs, req)
        for j in reply.job_ids:
            self._owned.discard(j)
        return int(reply.cancelled)

    async def set_quota(self, tenant: str, *, cpu: float = 0.0, memory_mib: int = 0) -> None:
        """Set a tenant's quota (both 0: remove it). Needs an admin token."""
        req = jobs_pb2.SetQuotaRequest(
            tenant=tenant, cpu_millis=round(cpu * 1000), memory_mib=memory_mib
        )
        await self._unary(Repeat.SAFE, "set quota", lambda s: s.SetQuota, req)

    async def status(self) -> cluster_pb2.StatusReply:
        t = self._t

        async def go(addr: str) -> cluster_pb2.StatusReply:
            r: cluster_pb2.StatusReply = await t.cluster(addr).Status(
                cluster_pb2.StatusRequest(), timeout=REQUEST_TIMEOUT, metadata=t.metadata
            )
            return r

        return await t.call(Repeat.SAFE, "status", go)

    async def watch(self, job_id: int) -> AsyncIterator[JobInfo]:
        """A job's progress: its current counts, then every change until it ends."""
        async for info in AsyncJob(self, job_id).watch():
            yield info
