"""What a client owns, and keeping it from outliving the client.

- Every job a client creates carries the label `surge-owner=<the client's id>` and an owner lease
  (`lease` seconds). A background task renews the leases every lease/3 (`Keepalive`), so the
  sandboxes live while the client does.
- On `close()`, at normal interpreter exit and on SIGTERM, the client cancels what it owns in one
  call (`CancelJobs` by its owner label). SIGINT raises KeyboardInterrupt as usual; `with` blocks
  and the exit hook then clean up.
- A client killed with SIGKILL (or a machine that dies) cleans nothing: its leases run out and the
  sandboxes end `lease-lost`, at most `lease` seconds later.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import threading
import weakref
from types import FrameType
from typing import Any

import grpc

from ._config import Config
from ._proto import jobs_pb2, jobs_pb2_grpc

OWNER_LABEL = "surge-owner"
# How long the exit-time clean-up may take per replica tried.
CLEANUP_TIMEOUT = 5.0


def new_owner_id() -> str:
    return secrets.token_hex(8)


def cancel_owned_blocking(config: Config, owner: str) -> int:
    """Cancel every job labelled with `owner`, with a short-lived blocking channel: usable from a
    signal handler or an exit hook whatever state the client's event loop is in. Returns the
    number of jobs cancelled (0 when no replica answered: the leases end them)."""
    md = (("authorization", f"Bearer {config.token}"),) if config.token else ()
    for addr in config.servers:
        if config.tls is None:
            ch = grpc.insecure_channel(addr)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=config.tls.ca,
                private_key=config.tls.key,
                certificate_chain=config.tls.cert,
            )
            ch = grpc.secure_channel(addr, creds)
        try:
            stub = jobs_pb2_grpc.JobsStub(ch)
            reply = stub.CancelJobs(
                jobs_pb2.CancelJobsRequest(labels={OWNER_LABEL: owner}),
                timeout=CLEANUP_TIMEOUT,
                metadata=md,
            )
            return int(reply.cancelled)
        except grpc.RpcError:
            continue
        finally:
            ch.close()
    return 0


class _Registry:
    """Clients alive in this process, cleaned up at exit and on SIGTERM."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()
        self._hooked = False
        self._previous_term: Any = None

    def add(self, client: Any) -> None:
        with self._lock:
            self._clients.add(client)
            if not self._hooked:
                self._hooked = True
                atexit.register(self.cleanup_all)
                self._hook_sigterm()

    def remove(self, client: Any) -> None:
        with self._lock:
            self._clients.discard(client)

    def _hook_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        with contextlib.suppress(ValueError, OSError):
            self._previous_term = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.cleanup_all()
        prev = self._previous_term
        if callable(prev):
            prev(signum, frame)
            return
        # The default action: die of SIGTERM, as the process would have without us.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def cleanup_all(self) -> None:
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            with contextlib.suppress(Exception):
                c._cleanup_blocking()


REGISTRY = _Registry()
