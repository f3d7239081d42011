"""A sandbox: exec, files and its lifetime."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from grpc.aio import EOF  # type: ignore[attr-defined]

from . import _archive
from ._config import seconds
from ._proto import jobs_pb2, sandbox_pb2
from ._transport import REQUEST_TIMEOUT, Repeat, to_error, unreached
from ._types import DirEntry, ExecChunk, ExecResult, SandboxInfo
from .errors import (
    ExecTimeout,
    InvalidArgument,
    SandboxEnded,
    SandboxNotFound,
    SurgeError,
)

if TYPE_CHECKING:
    from ._aio import AsyncClient
    from ._spec import Duration

# What exec() keeps of each stream unless told otherwise (the command runs to its end anyway).
OUTPUT_CAP_DEFAULT = 16 * 1024 * 1024
# As the server's caps (surge_guest::proto).
FILE_BYTES_MAX = 1 << 30
STDIN_CHUNK = 256 * 1024
T = TypeVar("T")
_REF = re.compile(r"^(\d+)\.(\d+)$")


class SandboxNotRunning(SurgeError):
    """The sandbox has not started yet (or waits to be placed again); `wait_running()` first."""


def parse_ref(ref: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(ref, tuple):
        job, index = ref
    else:
        m = _REF.match(ref.strip())
        if not m:
            raise InvalidArgument(f"sandbox {ref!r}: write JOB.INDEX, e.g. 12.0")
        job, index = int(m.group(1)), int(m.group(2))
    if job <= 0 or not 0 <= index < 2**32:
        raise InvalidArgument(f"sandbox {ref!r}: no such sandbox id")
    return job, index


class AsyncSandbox:
    def __init__(self, client: AsyncClient, job_id: int, index: int) -> None:
        self.client = client
        self.job_id = job_id
        self.index = index

    @property
    def id(self) -> str:
        return f"{self.job_id}.{self.index}"

    def __repr__(self) -> str:
        return f"<surge sandbox {self.id}>"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.delete()

    def _ref(self) -> sandbox_pb2.SandboxRef:
        return sandbox_pb2.SandboxRef(job_id=self.job_id, index=self.index)

    # ----- state and lifetime

    async def info(self) -> SandboxInfo:
        s = await self.client._unary(
            Repeat.SAFE,
            f"sandbox {self.id}",
            lambda st: st.GetSandbox,
            jobs_pb2.GetSandboxRequest(job_id=self.job_id, index=self.index),
        )
        return SandboxInfo.from_pb(s)

    async def wait(self, timeout: Duration = None) -> SandboxInfo:
        """Wait until the sandbox has ended (or `timeout`); its state then."""
        from ._job import WAIT_CHUNK, AsyncJob

        limit = seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        job = AsyncJob(self.client, self.job_id)
        while True:
            chunk = WAIT_CHUNK if deadline is None else min(WAIT_CHUNK, deadline - time.monotonic())
            reply = await job._wait(jobs_pb2.WAIT_FOR_ENDED, self.index, max(0.001, chunk))
            info = SandboxInfo.from_pb(reply.sandbox)
            if info.ended or (deadline is not None and time.monotonic() >= deadline):
                return info

    async def wait_running(self, timeout: Duration = 120.0) -> SandboxInfo:
        from ._job import AsyncJob

        limit = seconds(timeout, "timeout") or 120.0
        reply = await AsyncJob(self.client, self.job_id)._wait(
            jobs_pb2.WAIT_FOR_RUNNING, self.index, limit
        )
        return SandboxInfo.from_pb(reply.sandbox)

    async def keepalive(self, ttl: Duration = None) -> None:
        """Renew its job's owner lease; with `ttl`, it may live that long from now."""
        from ._config import millis

        await self.client._unary(
            Repeat.SAFE,
            f"keepalive of sandbox {self.id}",
            lambda s: s.Keepalive,
            jobs_pb2.KeepaliveRequest(
                job_id=self.job_id, first_index=self.index, count=1, ttl_ms=millis(ttl, "ttl")
            ),
        )

    async def delete(self) -> None:
        """Delete the sandbox: its job is cancelled when it is the job's only sandbox, else this
        one is stopped. Deleting one that already ended or is gone is not an error."""
        from ._job import AsyncJob

        job = AsyncJob(self.client, self.job_id)
        try:
            info = job.info or await job.refresh()
            if info.count == 1:
                await job.cancel()
            else:
                await self.client._unary(
                    Repeat.SAFE,
                    f"stop sandbox {self.id}",
                    lambda s: s.UpdateSandboxes,
                    jobs_pb2.UpdateSandboxesRequest(
                        job_id=self.job_id,
                        first_index=self.index,
                        count=1,
                        action=jobs_pb2.SANDBOX_ACTION_STOP,
                    ),
                )
        except SandboxNotFound:
            return

    # ----- close the lid (checkpoint, resume, fork)

    async def checkpoint(self, timeout: Duration = None) -> SandboxInfo:
        """Save the sandbox (processes, memory, files) to its node's disk and stop it: it holds
        no CPU or memory until `resume()`, which restores it on that node. Returns its state
        ("checkpointed", `image_bytes`, `node`). `CannotCheckpoint` says why when it cannot be
        (not running, a node that cannot checkpoint, a failed dump: it then keeps running)."""
        from . import _lid

        return await _lid.checkpoint(self, timeout)

    async def resume(self, timeout: Duration = None) -> SandboxInfo:
        """Restore a checkpointed sandbox on its node (or thaw a paused one); running when this
        returns. Its processes continue where they were."""
        from . import _lid

        return await _lid.resume(self, timeout)

    async def fork(
        self,
        count: int = 8,
        *,
        start_timeout: Duration = None,
        idempotency_key: str | None = None,
    ) -> list[AsyncSandbox]:
        """`count` new sandboxes (one new job, label `surge-fork-of=JOB.INDEX`) restored from one
        checkpoint of this running sandbox, on its node; this one keeps running. Each has its own
        copy of the filesystem. All are running when this returns; else the fork job is deleted
        and the error raised (`CannotCheckpoint`, `StartTimeout`, `SandboxEnded`). The client
        deletes the forks on close, like what it creates."""
        from . import _lid

        job_id, n = await _lid.fork(self, count, start_timeout, idempotency_key)
        return [AsyncSandbox(self.client, job_id, i) for i in range(n)]

    # ----- errors of exec and file calls

    async def _io_error(self, e: grpc.aio.AioRpcError, what: str) -> SurgeError:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            return to_error(e, what)
        msg = f"{what}: {e.details()}"
        try:
            info = await self.info()
        except SurgeError:
            return SurgeError(msg)
        if info.ended:
            reason = info.end_reason
            return SandboxEnded(
                f"{what}: sandbox {self.id} has ended ({reason.value if reason else info.state})"
                + (f": {info.message}" if info.message else ""),
                reason=reason,
                infrastructure=info.infrastructure,
                exit_code=info.exit_code,
            )
        if "not running" in (e.details() or ""):
            return SandboxNotRunning(msg)
        return SurgeError(msg)

    # ----- exec

    def exec_stream(
        self,
        command: Sequence[str],
        *,
        timeout: Duration = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        interactive: bool = False,
    ) -> ExecStream:
        """Run `command` and stream its output as it comes: `async for chunk in stream` yields
        `ExecChunk`s (stdout and stderr apart); afterwards `stream.result` holds the exit code.
        `interactive=True` keeps stdin open for `send_stdin()` / `close_stdin()`."""
        if isinstance(command, str) or not command:
            raise InvalidArgument(
                f"command {command!r}: a non-empty list of arguments, e.g. ['sh', '-c', 'ls']"
            )
        t = seconds(timeout, "timeout")
        start = sandbox_pb2.ExecStart(
            sandbox=self._ref(),
            command=list(command),
            env=dict(env or {}),
            cwd=cwd or "",
            stdin=interactive or stdin is not None,
        )
        if t is not None:
            start.timeout_ms = max(1, round(t * 1000))
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return ExecStream(self, start, data, interactive)

    async def exec(
        self,
        command: Sequence[str],
        *,
        timeout: Duration = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        output_cap: int = OUTPUT_CAP_DEFAULT,
    ) -> ExecResult:
        """Run `command` to its end: stdout, stderr (each kept up to `output_cap` bytes) and
        the exit code. A non-zero exit is a result, not an error; running past `timeout` raises
        `ExecTimeout` (with the output so far); a sandbox that ended raises `SandboxEnded`."""
        stream = self.exec_stream(command, timeout=timeout, env=env, cwd=cwd, stdin=stdin)
        out, err = bytearray(), bytearray()
        async with stream:
            async for ch in stream:
                buf = out if ch.stream == "stdout" else err
                room = output_cap - len(buf)
                if room > 0:
                    buf += ch.data[:room]
        r = stream.result
        result = ExecResult(
            bytes(out), bytes(err), r.exit_code, r.signal, r.timed_out, r.duration_ms / 1000
        )
        if result.timed_out:
            raise ExecTimeout(
                f"exec in sandbox {self.id}: {list(command)!r} ran past its timeout", result
            )
        return result

    # ----- files

    async def read_file(self, path: str, *, max_bytes: int = FILE_BYTES_MAX) -> bytes:
        t = self.client.transport
        what = f"read {path!r} in sandbox {self.id}"

        async def go(addr: str) -> bytes:
            call = t.io(addr).ReadFile(
                sandbox_pb2.ReadFileRequest(sandbox=self._ref(), path=path), metadata=t.metadata
            )
            buf = bytearray()
            async for c in call:
                buf += c.data
                if len(buf) > max_bytes:
                    call.cancel()
                    raise InvalidArgument(f"{what}: larger than max_bytes={max_bytes}")
            return bytes(buf)

        return await self._io(Repeat.SAFE, what, go)

    async def write_file(
        self, path: str, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True
    ) -> int:
        """Write a whole file atomically (readers see the old or the new content); returns its
        size."""
        blob = data.encode() if isinstance(data, str) else bytes(data)
        if len(blob) > FILE_BYTES_MAX:
            raise InvalidArgument(f"write_file: {len(blob)} bytes; at most {FILE_BYTES_MAX}")
        if not 0 <= mode <= 0o7777:
            raise InvalidArgument(f"write_file: mode {mode:o} is not a file mode")
        t = self.client.transport
        what = f"write {path!r} in sandbox {self.id}"

        def inputs() -> Iterator[sandbox_pb2.WriteFileInput]:
            yield sandbox_pb2.WriteFileInput(
                start=sandbox_pb2.WriteFileStart(
                    sandbox=self._ref(), path=path, mode=mode, make_parents=make_parents
                )
            )
            for i in range(0, len(blob), STDIN_CHUNK):
                yield sandbox_pb2.WriteFileInput(data=blob[i : i + STDIN_CHUNK])

        async def go(addr: str) -> int:
            r: sandbox_pb2.WriteFileReply = await t.io(addr).WriteFile(
                inputs(), metadata=t.metadata, timeout=REQUEST_TIMEOUT + len(blob) / 1e6
            )
            return int(r.bytes)

        return await self._io(Repeat.UNSENT, what, go)

    async def list_dir(self, path: str) -> list[DirEntry]:
        t = self.client.transport
        what = f"list {path!r} in sandbox {self.id}"

        async def go(addr: str) -> list[DirEntry]:
            r: sandbox_pb2.ListDirReply = await t.io(addr).ListDir(
                sandbox_pb2.ListDirRequest(sandbox=self._ref(), path=path),
                metadata=t.metadata,
                timeout=REQUEST_TIMEOUT,
            )
            return [DirEntry.from_pb(e) for e in r.entries]

        return await self._io(Repeat.SAFE, what, go)

    async def upload_dir(self, local_dir: str | os.PathLike[str], remote_dir: str) -> int:
        """Copy a local directory's contents into `remote_dir` in the sandbox (created); returns
        the number of files written."""
        archive = await asyncio.to_thread(_archive.pack, local_dir)
        t = self.client.transport
        what = f"upload to {remote_dir!r} in sandbox {self.id}"

        def inputs() -> Iterator[sandbox_pb2.UploadInput]:
            yield sandbox_pb2.UploadInput(
                start=sandbox_pb2.UploadStart(sandbox=self._ref(), path=remote_dir)
            )
            archive.seek(0)
            for b in _archive.chunks(archive):
                yield sandbox_pb2.UploadInput(data=b)

        async def go(addr: str) -> int:
            r: sandbox_pb2.UploadReply = await t.io(addr).Upload(inputs(), metadata=t.metadata)
            return int(r.files)

        try:
            return await self._io(Repeat.UNSENT, what, go)
        finally:
            archive.close()

    async def download_dir(self, remote_dir: str, local_dir: str | os.PathLike[str]) -> int:
        """Copy `remote_dir` from the sandbox into `local_dir` (created); returns the number of
        entries unpacked. A member that would leave `local_dir` refuses the whole archive."""
        t = self.client.transport
        what = f"download {remote_dir!r} from sandbox {self.id}"
        spool = tempfile.SpooledTemporaryFile(max_size=_archive.SPOOL_BYTES)  # noqa: SIM115

        async def go(addr: str) -> None:
            spool.seek(0)
            spool.truncate()
            call = t.io(addr).Download(
                sandbox_pb2.DownloadRequest(sandbox=self._ref(), path=remote_dir),
                metadata=t.metadata,
            )
            async for c in call:
                spool.write(c.data)
                if spool.tell() > _archive.ARCHIVE_BYTES_MAX:
                    call.cancel()
                    raise SurgeError(f"{what}: larger than 4 GiB")

        try:
            await self._io(Repeat.SAFE, what, go)
            spool.seek(0)
            return await asyncio.to_thread(_archive.unpack, spool, local_dir)
        finally:
            spool.close()

    async def _io(self, repeat: Repeat, what: str, f: Callable[[str], Awaitable[T]]) -> T:
        try:
            return await self.client.transport.call(repeat, what, f)
        except SurgeError as e:
            cause = e.__cause__
            if isinstance(cause, grpc.aio.AioRpcError):
                raise await self._io_error(cause, what) from cause
            raise


class ExecStream:
    """A running command's output, chunk by chunk; see `AsyncSandbox.exec_stream`."""

    def __init__(
        self,
        sandbox: AsyncSandbox,
        start: sandbox_pb2.ExecStart,
        stdin: bytes | None,
        interactive: bool,
    ) -> None:
        self.sandbox = sandbox
        self._start = start
        self._stdin = stdin
        self._interactive = interactive
        self._call: Any = None
        self._pending: list[sandbox_pb2.ExecOutput] = []
        self._exit: sandbox_pb2.ExecExit | None = None
        self._done = False

    async def __aenter__(self) -> ExecStream:
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    def __aiter__(self) -> ExecStream:
        return self

    @property
    def what(self) -> str:
        return f"exec in sandbox {self.sandbox.id}"

    async def _open(self) -> None:
        t = self.sandbox.client.transport
        order = t.order()
        for attempt, addr in enumerate(order):
            call: Any = t.io(addr).Exec(metadata=t.metadata)  # type: ignore[call-arg]
            try:
                await call.write(sandbox_pb2.ExecInput(start=self._start))
                if self._stdin is not None:
                    for i in range(0, len(self._stdin), STDIN_CHUNK):
                        await call.write(
                            sandbox_pb2.ExecInput(stdin=self._stdin[i : i + STDIN_CHUNK])
                        )
                    if not self._interactive:
                        await call.write(sandbox_pb2.ExecInput(close_stdin=True))
                if self._interactive:
                    # The command may wait for input before it prints anything: wait only for
                    # the reply's headers (the replica took the call), not for a first message.
                    await call.wait_for_connection()
                    first = None
                else:
                    await call.done_writing()
                    first = await call.read()
            except grpc.aio.AioRpcError as e:
                # Sent again only when no replica was reached: nothing can have run.
                if unreached(e) and attempt + 1 < len(order):
                    continue
                raise await self.sandbox._io_error(e, self.what) from e
            except asyncio.InvalidStateError:
                # Writing to a call that already failed: its status says why.
                code = await call.code()
                details = await call.details()
                raise SurgeError(f"{self.what}: {details or code}") from None
            t.answered(addr)
            self._call = call
            if first is EOF:
                self._done = True
            elif first is not None:
                self._pending.append(first)
            return

    async def __anext__(self) -> ExecChunk:
        if self._call is None and not self._done:
            await self._open()
        while True:
            if self._pending:
                msg = self._pending.pop()
            elif self._done:
                if self._exit is None:
                    raise SurgeError(f"{self.what}: the stream ended without the exit status")
                raise StopAsyncIteration
            else:
                try:
                    got = await self._call.read()
                except grpc.aio.AioRpcError as e:
                    raise await self.sandbox._io_error(e, self.what) from e
                if got is EOF:
                    self._done = True
                    continue
                msg = got
            kind = msg.WhichOneof("output")
            if kind == "stdout":
                return ExecChunk("stdout", msg.stdout)
            if kind == "stderr":
                return ExecChunk("stderr", msg.stderr)
            if kind == "exit":
                self._exit = msg.exit
                self._done = True

    @property
    def result(self) -> sandbox_pb2.ExecExit:
        """How the command ended (after the iteration finished)."""
        if self._exit is None:
            raise SurgeError(f"{self.what}: the command has not ended (read the stream first)")
        return self._exit

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    async def _send(self, msg: sandbox_pb2.ExecInput) -> None:
        if self._call is None:
            await self._open()
        await self._call.write(msg)

    async def send_stdin(self, data: bytes | str) -> None:
        """More input for the command (`interactive=True`)."""
        b = data.encode() if isinstance(data, str) else data
        for i in range(0, len(b), STDIN_CHUNK):
            await self._send(sandbox_pb2.ExecInput(stdin=b[i : i + STDIN_CHUNK]))

    async def close_stdin(self) -> None:
        await self._send(sandbox_pb2.ExecInput(close_stdin=True))

    async def signal(self, signum: int) -> None:
        """Send a signal (e.g. `signal.SIGINT`) to the command."""
        await self._send(sandbox_pb2.ExecInput(signal=int(signum)))

    def cancel(self) -> None:
        """Stop following the command; it is killed with what it started."""
        if self._call is not None and not self._done:
            self._call.cancel()
        self._done = True
