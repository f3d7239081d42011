"""Typed errors across tenants and credentials, quotas, and retries that never make two jobs."""

from __future__ import annotations

import time
from typing import Any, cast

import grpc
import grpc.aio
import pytest

from surge import (
    Client,
    PermissionDenied,
    QuotaExceeded,
    SandboxNotFound,
    Unauthenticated,
    Unavailable,
)

from .conftest import REAL, SIM, Cluster


def test_another_tenants_sandbox_is_not_found(cluster: Cluster, alpha: Client) -> None:
    with alpha.create_sandbox(**REAL) as sb, cluster.client("beta") as beta:  # type: ignore[arg-type]
        theirs = beta.sandbox(sb.id)
        with pytest.raises(SandboxNotFound) as e:
            theirs.exec(["true"])
        assert "no job" in str(e.value)
        with pytest.raises(SandboxNotFound):
            theirs.read_file("/etc/passwd")
        with pytest.raises(SandboxNotFound):
            beta.job(sb.job_id).cancel()
        # The sandbox is untouched.
        assert sb.exec(["echo", "mine"]).stdout == "mine\n"


def test_credentials(cluster: Cluster, alpha: Client) -> None:
    with pytest.raises(PermissionDenied):
        alpha.set_quota("alpha", cpu=1000)
    bad = Client(cluster.servers, token="surge_" + "0" * 64, tls_dir=cluster.tls_dir)
    with bad, pytest.raises(Unauthenticated):
        bad.jobs()


def test_quota_exceeded_leaves_nothing(cluster: Cluster) -> None:
    with cluster.client("admin") as admin, cluster.client("beta") as beta:
        admin.set_quota("beta", cpu=0.1, memory_mib=64)
        try:
            with pytest.raises(QuotaExceeded, match="quota"):
                beta.create_sandbox(labels={"q": "over"}, **SIM)  # type: ignore[arg-type]
            jobs = beta.jobs(labels={"q": "over"})
            assert len(jobs) == 1 and jobs[0].state == "cancelled", jobs
        finally:
            admin.set_quota("beta")


def test_unavailable_only_after_retries() -> None:
    t0 = time.monotonic()
    with (
        Client("127.0.0.1:1,127.0.0.1:2") as c,
        pytest.raises(Unavailable, match="after 8 attempts across 2 replicas"),
    ):
        c.jobs()
    # Both replicas at once, then again after 0.1 s, 0.2 s and 0.4 s of backoff.
    assert time.monotonic() - t0 >= 0.7, "retried with backoff before giving up"


class DropFirstSubmitReply(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """The first SubmitJob reaches the leader and commits, but its reply is lost (as when a
    replica dies after the commit): the caller sees UNAVAILABLE and sends it again."""

    def __init__(self) -> None:
        self.dropped = 0

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        call = await continuation(details, request)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/SubmitJob") and self.dropped == 0:
            await call
            self.dropped += 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="connection reset after the commit (test)",
                debug_error_string="",
            )
        return call


def test_a_retried_create_makes_one_job(cluster: Cluster) -> None:
    drop = DropFirstSubmitReply()
    with Client(
        cluster.servers,
        token=cluster.tokens["alpha"],
        tls_dir=cluster.tls_dir,
        interceptors=[cast(Any, drop)],
    ) as c:
        sb = c.create_sandbox(labels={"retry": "once"}, **SIM)  # type: ignore[arg-type]
        assert drop.dropped == 1, "the first reply was lost"
        jobs = c.jobs(labels={"retry": "once"})
        assert [j.id for j in jobs] == [sb.job_id], "the retry returned the first job"
        sb.delete()
