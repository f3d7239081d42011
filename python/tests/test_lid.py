"""Close the lid from the SDK: fork, checkpoint and resume on the test cluster's container node
(which checkpoints with the CRIU kit of scripts/setup-criu; without it these fail under CI=true
and skip, saying why, elsewhere). Checkpointed sandboxes run as user root (README: "Why --user
root")."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid

import pytest

from surge import (
    OWNER_LABEL,
    AsyncClient,
    CannotCheckpoint,
    Client,
    EndReason,
    InvalidArgument,
    Sandbox,
    SandboxNotFound,
    SurgeError,
)

from .conftest import REAL, SIM, Cluster, unavailable

# Counts in /tmp/count (tmpfs: its contents are in the checkpoint) every 0.1 s, in the background.
COUNTER = (
    "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; "
    "sleep 0.1; done) </dev/null >/dev/null 2>&1 &"
)


def needs_checkpoint(cluster: Cluster) -> None:
    if cluster.no_checkpoint:
        unavailable(f"the test cluster's container node cannot checkpoint: {cluster.no_checkpoint}")


def count(sb: Sandbox) -> int:
    return int(sb.read_file("/tmp/count").decode().strip() or "0")


def count_past(sb: Sandbox, at_least: int, what: str) -> int:
    """The counter once it is past `at_least` (polled: no timed assertion, a generous bound)."""
    for _ in range(600):
        try:
            n = count(sb)
        except SandboxNotFound:
            # Not written yet: the counter has just started.
            n = 0
        if n > at_least:
            return n
        time.sleep(0.1)
    raise AssertionError(f"{what}: the counter stayed at {at_least}")


def test_fork_three_each_sees_the_prepared_state_and_diverges(
    alpha: Client, cluster: Cluster
) -> None:
    needs_checkpoint(cluster)
    with alpha.create_sandbox(user="root", ttl="10m", **REAL) as src:  # type: ignore[arg-type]
        src.write_file("/work/prepared.txt", "prepared once\n")
        forks = src.fork(count=3)
        assert len({f.id for f in forks}) == 3 and all(f.job_id != src.job_id for f in forks)
        job = alpha.job(forks[0].job_id).refresh()
        assert job.labels["surge-fork-of"] == src.id
        assert job.labels[OWNER_LABEL] == alpha.owner, "forks are the client's, deleted with it"
        assert job.counts.running == 3
        for f in forks:
            assert f.read_file("/work/prepared.txt") == b"prepared once\n"
            f.write_file("/work/mine.txt", f.id)
        for f in forks:
            assert f.read_file("/work/mine.txt") == f.id.encode()
            names = {e.name for e in f.list_dir("/work")}
            assert names == {"prepared.txt", "mine.txt"}, (f.id, names)
        assert {e.name for e in src.list_dir("/work")} == {"prepared.txt"}
        # The source kept running through the fork.
        assert src.exec(["cat", "/work/prepared.txt"]).stdout == "prepared once\n"

        # 64 forks of 0.02 CPU can never fit on the 1-CPU node: refused whole, nothing made.
        with pytest.raises(CannotCheckpoint, match="can never fit"):
            src.fork(64)

        # One idempotency key, one fork job (a retried call finds the first).
        key = uuid.uuid4().hex
        once = src.fork(1, idempotency_key=key)
        again = src.fork(1, idempotency_key=key)
        assert [s.id for s in once] == [s.id for s in again]


def test_checkpoint_and_resume_keep_files_and_the_counter_going(
    alpha: Client, cluster: Cluster
) -> None:
    needs_checkpoint(cluster)
    with alpha.create_sandbox(user="root", ttl="10m", **REAL) as sb:  # type: ignore[arg-type]
        sb.write_file("/work/kept.txt", "kept\n")
        sb.exec(["sh", "-c", COUNTER])
        before = count_past(sb, 3, "before the checkpoint")
        for cycle in range(2):
            saved = sb.checkpoint()
            assert saved.state == "checkpointed" and saved.image_bytes > 0, saved
            assert sb.info().state == "checkpointed"
            # Checkpointed: not running, so neither a fork nor a second checkpoint.
            with pytest.raises(CannotCheckpoint, match="only a running sandbox"):
                sb.fork(2)
            with pytest.raises(CannotCheckpoint, match="running or paused"):
                sb.checkpoint()
            back = sb.resume()
            assert back.state == "running" and back.node == saved.node, back
            after = count(sb)
            assert after >= before, f"cycle {cycle}: the counter went back ({before} -> {after})"
            before = count_past(sb, after, f"after resume {cycle}")
            assert sb.read_file("/work/kept.txt") == b"kept\n"
        assert sb.exec(["sh", "-c", "echo still here"]).stdout == "still here\n"


def test_a_dump_the_node_cannot_make_leaves_the_sandbox_running(
    alpha: Client, cluster: Cluster
) -> None:
    """A sandbox of the node's default user (uid 1000): where root lacks CAP_SYS_RESOURCE, as here,
    CRIU cannot dump it ("Can't get rlimit"); the SDK says why and the sandbox keeps running.
    Where the dump works, it must then resume like any other."""
    needs_checkpoint(cluster)
    with alpha.create_sandbox(ttl="10m", **REAL) as sb:  # type: ignore[arg-type]
        sb.write_file("/tmp/x", "x")
        try:
            saved = sb.checkpoint()
        except CannotCheckpoint as e:
            assert e.reason, "the reason is the node's words"
            info = sb.info()
            assert info.state == "running" and info.desired_state == "running", info
        else:
            assert saved.state == "checkpointed"
            assert sb.resume().state == "running"
        assert sb.read_file("/tmp/x") == b"x"


def test_lid_errors_are_typed(alpha: Client, cluster: Cluster) -> None:
    with pytest.raises(InvalidArgument, match="user"):
        alpha.create_sandbox(user="nobody", **REAL)  # type: ignore[arg-type]
    # A simulated node cannot checkpoint: one clear line, a typed exception.
    with alpha.create_sandbox(**SIM) as sim:  # type: ignore[arg-type]
        with pytest.raises(CannotCheckpoint) as e:
            sim.checkpoint()
        assert "cannot checkpoint" in e.value.reason and "simulated" in e.value.reason
        with pytest.raises(CannotCheckpoint, match="cannot checkpoint"):
            sim.fork(3)
        for bad in (0, 65):
            with pytest.raises(InvalidArgument, match="1 to 64"):
                sim.fork(bad)
        # Another tenant's sandbox is "no such sandbox", for every lid call.
        with cluster.client("beta") as beta:
            theirs = beta.sandbox(sim.id)
            with pytest.raises(SandboxNotFound):
                theirs.checkpoint()
            with pytest.raises(SandboxNotFound):
                theirs.resume()
            with pytest.raises(SandboxNotFound):
                theirs.fork(2)
        assert sim.info().state == "running"
    assert issubclass(CannotCheckpoint, SurgeError)


def test_async_fork_checkpoint_resume(cluster: Cluster) -> None:
    needs_checkpoint(cluster)

    async def main() -> None:
        async with AsyncClient(
            cluster.servers, token=cluster.tokens["alpha"], tls_dir=cluster.tls_dir
        ) as ac:
            src = await ac.create_sandbox(user="root", ttl="10m", **REAL)  # type: ignore[arg-type]
            await src.write_file("/work/base.txt", "base")
            forks = await src.fork(2)
            await asyncio.gather(*(f.write_file("/work/own.txt", f.id) for f in forks))
            for f in forks:
                assert await f.read_file("/work/base.txt") == b"base"
                assert await f.read_file("/work/own.txt") == f.id.encode()
            saved = await forks[0].checkpoint()
            assert saved.state == "checkpointed"
            back = await forks[0].resume()
            assert back.state == "running"
            assert await forks[0].read_file("/work/own.txt") == forks[0].id.encode()
            fork_job = forks[0].job_id
        # Closing the client deleted the forks too.
        with cluster.client("alpha") as c:
            assert c.job(fork_job).refresh().state == "cancelled"

    asyncio.run(main())


# A trainer that forks under a short owner lease, says the fork job, then works until killed.
FORKING_TRAINER = """
import time
from surge import Client
c = Client(lease="3s")
sb = c.create_sandbox(user="root", ttl="10m", cpu=0.02, memory_mib=32, constraints={"kind": "real"})
forks = sb.fork(1)
print(forks[0].job_id, flush=True)
while True:
    time.sleep(0.1)
"""


def test_a_killed_clients_forks_end_lease_lost(alpha: Client, cluster: Cluster) -> None:
    needs_checkpoint(cluster)
    p = subprocess.Popen(
        [sys.executable, "-c", FORKING_TRAINER],
        env=cluster.env("alpha"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line, f"the trainer failed (exit {p.wait()})"
        fork_job = int(line)
        # The fork job is the trainer's: its owner label and lease, not its source's TTL.
        assert alpha.job(fork_job).refresh().labels[OWNER_LABEL] != alpha.owner
        p.kill()
        p.wait()
        info = alpha.job(fork_job).sandbox_info(0)
        for _ in range(300):
            if info.ended:
                break
            time.sleep(0.2)
            info = alpha.job(fork_job).sandbox_info(0)
        assert info.end_reason == EndReason.LEASE_LOST, info
    finally:
        p.kill()
