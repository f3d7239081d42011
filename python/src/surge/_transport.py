"""Channels to the replicas and the retry rule: a call goes to any replica (it forwards to the
leader); a call that is safe to repeat is sent again to the next replica, with backoff, while
replicas are unreachable or between leaders. `Unavailable` is raised only when that is over."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from ._config import Config
from ._proto import cluster_pb2_grpc, jobs_pb2_grpc, sandbox_pb2_grpc
from .errors import (
    Busy,
    InvalidArgument,
    PermissionDenied,
    SandboxNotFound,
    ServerError,
    SurgeError,
    Unauthenticated,
    Unavailable,
)

T = TypeVar("T")

# The server's largest message (surge_proto::MESSAGE_BYTES_MAX).
MESSAGE_BYTES_MAX = 16 * 1024 * 1024
# Attempts of one retryable call, across the replicas given; backoff and window as the CLI's.
ATTEMPTS_MAX = 8
RETRY_BACKOFF_FIRST = 0.1
RETRY_BACKOFF_MAX = 2.0
RETRY_WINDOW = 8.0
# Longest one unary call waits (a write waits for a commit, forwarding included).
REQUEST_TIMEOUT = 20.0


class Repeat(enum.Enum):
    # Reads, and writes made idempotent (a submission's idempotency key, cancel, keepalive).
    SAFE = 1
    # Again only when no replica was reached, so nothing can have happened.
    UNSENT = 2
    NEVER = 3


def unreached(e: grpc.aio.AioRpcError) -> bool:
    """The call never reached a replica (connection refused, no route, TLS failed)."""
    if e.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    d = (e.details() or "").lower()
    return any(
        w in d
        for w in (
            "failed to connect",
            "connection refused",
            "connect failed",
            "dns resolution",
            "no route",
            "handshake",
        )
    )


def to_error(e: grpc.aio.AioRpcError, what: str) -> SurgeError:
    code = e.code()
    msg = f"{what}: {e.details() or code.name.lower()}"
    if code == grpc.StatusCode.NOT_FOUND:
        return SandboxNotFound(msg)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(msg)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(msg)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidArgument(msg)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Busy(msg)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(msg)
    return ServerError(msg, code.name)


class Transport:
    """One channel per replica, made on first use in the running event loop."""

    def __init__(
        self,
        config: Config,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        self.config = config
        self._interceptors = list(interceptors or [])
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )
        # The replica that answered last: the next call starts there.
        self._preferred = 0

    def channel(self, addr: str) -> grpc.aio.Channel:
        ch = self._channels.get(addr)
        if ch is None:
            options: list[tuple[str, Any]] = [
                ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.enable_retries", 0),
            ]
            tls = self.config.tls
            if tls is None:
                ch = grpc.aio.insecure_channel(
                    addr, options=options, interceptors=self._interceptors
                )
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
                )
                ch = grpc.aio.secure_channel(
                    addr, creds, options=options, interceptors=self._interceptors
                )
            self._channels[addr] = ch
        return ch

    def jobs(self, addr: str) -> jobs_pb2_grpc.JobsAsyncStub:
        return jobs_pb2_grpc.JobsStub(self.channel(addr))

    def io(self, addr: str) -> sandbox_pb2_grpc.SandboxIoAsyncStub:
        return sandbox_pb2_grpc.SandboxIoStub(self.channel(addr))

    def cluster(self, addr: str) -> cluster_pb2_grpc.ClusterAsyncStub:
        return cluster_pb2_grpc.ClusterStub(self.channel(addr))

    def order(self) -> list[str]:
        """The replicas, starting with the one that answered last."""
        s = self.config.servers
        return [s[(self._preferred + i) % len(s)] for i in range(len(s))]

    def answered(self, addr: str) -> None:
        self._preferred = self.config.servers.index(addr)

    async def call(self, repeat: Repeat, what: str, f: Callable[[str], Awaitable[T]]) -> T:
        """Run `f(addr)` against the replicas in turn until it succeeds, fails for good, or (for a
        call safe to repeat) ATTEMPTS_MAX attempts or RETRY_WINDOW have passed."""
        started = time.monotonic()
        backoff = RETRY_BACKOFF_FIRST
        order = self.order()
        attempt = 0
        while True:
            addr = order[attempt % len(order)]
            try:
                v = await f(addr)
                self.answered(addr)
                return v
            except grpc.aio.AioRpcError as e:
                attempt += 1
                retry = e.code() == grpc.StatusCode.UNAVAILABLE and (
                    repeat == Repeat.SAFE or (repeat == Repeat.UNSENT and unreached(e))
                )
                if (
                    not retry
                    or attempt >= ATTEMPTS_MAX
                    or time.monotonic() - started + backoff > RETRY_WINDOW
                ):
                    err = to_error(e, what)
                    if isinstance(err, Unavailable) and retry:
                        raise Unavailable(
                            f"{err} (after {attempt} attempts across {len(order)} replicas)"
                        ) from e
                    raise err from e
                if unreached(e) and attempt % len(order) != 0:
                    # Another replica is worth trying at once; the same ones after a wait.
                    continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_BACKOFF_MAX)

    async def close(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            await ch.close(None)
