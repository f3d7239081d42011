"""The blocking API: the same calls as `AsyncClient`, run on a private event loop thread (one
per client), so a trainer's plain Python code needs no asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc.aio

from ._aio import LEASE_DEFAULT, START_TIMEOUT_DEFAULT, AsyncClient
from ._job import AsyncJob
from ._proto import cluster_pb2, sandbox_pb2
from ._sandbox import OUTPUT_CAP_DEFAULT, AsyncSandbox, ExecStream
from ._spec import Constraints, Duration
from ._types import Counts, DirEntry, ExecChunk, ExecResult, JobInfo, SandboxInfo

T = TypeVar("T")


class _Loop:
    """An event loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="surge", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except (KeyboardInterrupt, concurrent.futures.CancelledError):
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


class Client:
    """A client of one surge cluster (blocking). See `AsyncClient` for the arguments; use it as
    `with Client() as c:` or call `close()`: what it created is deleted then."""

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
        self.aio = AsyncClient(
            server,
            token=token,
            tls_dir=tls_dir,
            lease=lease,
            detach=detach,
            interceptors=interceptors,
        )
        self._loop = _Loop()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_running():
            self._run(self.aio.close())
            self._loop.stop()

    @property
    def owner(self) -> str:
        """The value of this client's `surge-owner` label on everything it creates."""
        return self.aio.owner

    def create_sandbox(
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
    ) -> Sandbox:
        sb = self._run(
            self.aio.create_sandbox(
                template,
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
        )
        return Sandbox(self, sb)

    def create_sandboxes(
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
    ) -> list[Sandbox]:
        sbs = self._run(
            self.aio.create_sandboxes(
                count,
                template,
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
                gang=gang,
                start_timeout=start_timeout,
                idempotency_key=idempotency_key,
                user=user,
            )
        )
        return [Sandbox(self, s) for s in sbs]

    def sandbox(self, ref: str | tuple[int, int]) -> Sandbox:
        return Sandbox(self, self.aio.sandbox(ref))

    def submit(
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
    ) -> Job:
        j = self._run(
            self.aio.submit(
                count,
                command,
                cpu=cpu,
                memory_mib=memory_mib,
                template=template,
                env=env,
                labels=labels,
                constraints=constraints,
                priority=priority,
                tenant=tenant,
                name=name,
                gang=gang,
                ttl=ttl,
                idempotency_key=idempotency_key,
            )
        )
        return Job(self, j)

    def job(self, job_id: int) -> Job:
        return Job(self, self.aio.job(job_id))

    def jobs(
        self,
        *,
        tenant: str | None = None,
        state: str | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[JobInfo]:
        return self._run(self.aio.jobs(tenant=tenant, state=state, labels=labels, limit=limit))

    def delete(self, *, labels: Mapping[str, str], tenant: str | None = None) -> int:
        return self._run(self.aio.delete(labels=labels, tenant=tenant))

    def set_quota(self, tenant: str, *, cpu: float = 0.0, memory_mib: int = 0) -> None:
        self._run(self.aio.set_quota(tenant, cpu=cpu, memory_mib=memory_mib))

    def status(self) -> cluster_pb2.StatusReply:
        return self._run(self.aio.status())


class Job:
    def __init__(self, client: Client, job: AsyncJob) -> None:
        self.client = client
        self.aio = job

    def __repr__(self) -> str:
        return f"<surge job {self.id}>"

    @property
    def id(self) -> int:
        return self.aio.id

    @property
    def created(self) -> bool:
        return self.aio.created

    @property
    def counts(self) -> Counts:
        """Sandboxes by state, fetched now."""
        return self.refresh().counts

    @property
    def info(self) -> JobInfo | None:
        return self.aio.info

    def refresh(self) -> JobInfo:
        return self.client._run(self.aio.refresh())

    def wait(self, timeout: Duration = None) -> JobInfo:
        return self.client._run(self.aio.wait(timeout))

    def cancel(self) -> JobInfo:
        return self.client._run(self.aio.cancel())

    def keepalive(self, ttl: Duration = None) -> JobInfo:
        return self.client._run(self.aio.keepalive(ttl))

    def sandbox_info(self, index: int) -> SandboxInfo:
        return self.client._run(self.aio.sandbox_info(index))

    def sandboxes(self) -> list[Sandbox]:
        return [Sandbox(self.client, s) for s in self.client._run(self.aio.sandboxes())]


class Sandbox:
    def __init__(self, client: Client, sandbox: AsyncSandbox) -> None:
        self.client = client
        self.aio = sandbox

    def __repr__(self) -> str:
        return f"<surge sandbox {self.id}>"

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def job_id(self) -> int:
        return self.aio.job_id

    @property
    def index(self) -> int:
        return self.aio.index

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def info(self) -> SandboxInfo:
        return self.client._run(self.aio.info())

    def wait(self, timeout: Duration = None) -> SandboxInfo:
        return self.client._run(self.aio.wait(timeout))

    def wait_running(self, timeout: Duration = 120.0) -> SandboxInfo:
        return self.client._run(self.aio.wait_running(timeout))

    def keepalive(self, ttl: Duration = None) -> None:
        self.client._run(self.aio.keepalive(ttl))

    def checkpoint(self, timeout: Duration = None) -> SandboxInfo:
        """See `AsyncSandbox.checkpoint`."""
        return self.client._run(self.aio.checkpoint(timeout))

    def resume(self, timeout: Duration = None) -> SandboxInfo:
        """See `AsyncSandbox.resume`."""
        return self.client._run(self.aio.resume(timeout))

    def fork(
        self,
        count: int = 8,
        *,
        start_timeout: Duration = None,
        idempotency_key: str | None = None,
    ) -> list[Sandbox]:
        """See `AsyncSandbox.fork`."""
        sbs = self.client._run(
            self.aio.fork(count, start_timeout=start_timeout, idempotency_key=idempotency_key)
        )
        return [Sandbox(self.client, s) for s in sbs]

    def delete(self) -> None:
        self.client._run(self.aio.delete())

    def exec(
        self,
        command: Sequence[str],
        *,
        timeout: Duration = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        output_cap: int = OUTPUT_CAP_DEFAULT,
    ) -> ExecResult:
        return self.client._run(
            self.aio.exec(
                command, timeout=timeout, env=env, cwd=cwd, stdin=stdin, output_cap=output_cap
            )
        )

    def exec_stream(
        self,
        command: Sequence[str],
        *,
        timeout: Duration = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        interactive: bool = False,
    ) -> SyncExecStream:
        s = self.aio.exec_stream(
            command, timeout=timeout, env=env, cwd=cwd, stdin=stdin, interactive=interactive
        )
        return SyncExecStream(self.client, s)

    def read_file(self, path: str, *, max_bytes: int = 1 << 30) -> bytes:
        return self.client._run(self.aio.read_file(path, max_bytes=max_bytes))

    def write_file(
        self, path: str, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True
    ) -> int:
        return self.client._run(
            self.aio.write_file(path, data, mode=mode, make_parents=make_parents)
        )

    def list_dir(self, path: str) -> list[DirEntry]:
        return self.client._run(self.aio.list_dir(path))

    def upload_dir(self, local_dir: str | os.PathLike[str], remote_dir: str) -> int:
        return self.client._run(self.aio.upload_dir(local_dir, remote_dir))

    def download_dir(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> int:
        return self.client._run(self.aio.download_dir(remote_dir, local_dir))


class SyncExecStream:
    """`for chunk in sb.exec_stream([...])`; `stream.result` / `stream.exit_code` afterwards."""

    def __init__(self, client: Client, stream: ExecStream) -> None:
        self._client = client
        self.aio = stream

    def __iter__(self) -> Iterator[ExecChunk]:
        return self

    def __next__(self) -> ExecChunk:
        async def step() -> ExecChunk | None:
            try:
                return await self.aio.__anext__()
            except StopAsyncIteration:
                return None

        chunk = self._client._run(step())
        if chunk is None:
            raise StopIteration
        return chunk

    def __enter__(self) -> SyncExecStream:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    @property
    def result(self) -> sandbox_pb2.ExecExit:
        return self.aio.result

    @property
    def exit_code(self) -> int:
        return self.aio.exit_code

    def send_stdin(self, data: bytes | str) -> None:
        self._client._run(self.aio.send_stdin(data))

    def close_stdin(self) -> None:
        self._client._run(self.aio.close_stdin())

    def signal(self, signum: int) -> None:
        self._client._run(self.aio.signal(signum))

    def cancel(self) -> None:
        async def go() -> None:
            self.aio.cancel()

        self._client._run(go())
