"""Owner leases and clean-up: a client's sandboxes live while it does and not much longer."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from surge import Client, EndReason

from .conftest import Cluster

# A trainer: makes sandboxes (and a batch job on the container node, which runs until killed)
# under a short owner lease, says their jobs, then
# works until it is killed.
TRAINER = """
import sys, time
from surge import Client
c = Client(lease="3s")
sbs = c.create_sandboxes(2, cpu=0.5, memory_mib=256, constraints={"kind": "sim"})
job = c.submit(1, ["sleep", "3600"], cpu=0.02, memory_mib=32, constraints={"kind": "real"})
print(sbs[0].job_id, job.id, flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)
while True:
    time.sleep(0.1)
"""


def start_trainer(cluster: Cluster, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    p = subprocess.Popen(
        [sys.executable, "-c", TRAINER, mode],
        env=cluster.env("alpha"),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the trainer failed (exit {p.wait()})"
    return p, [int(x) for x in line.split()]


def test_sigkill_ends_sandboxes_lease_lost_and_renewal_keeps_them(
    cluster: Cluster, alpha: Client
) -> None:
    p, jobs = start_trainer(cluster, "run")
    try:
        # Three leases long: alive only because the client renews in the background.
        time.sleep(9)
        assert alpha.job(jobs[0]).refresh().counts.running == 2
        assert alpha.job(jobs[1]).refresh().counts.running == 1
        p.kill()
        p.wait()
        killed = time.monotonic()
        for j in jobs:
            info = alpha.job(j).sandbox_info(0)
            while not info.ended and time.monotonic() - killed < 30:
                time.sleep(0.2)
                info = alpha.job(j).sandbox_info(0)
            assert info.end_reason == EndReason.LEASE_LOST, info
            assert not info.infrastructure
        assert time.monotonic() - killed < 3 + 10, "ended within the lease (and a tick)"
    finally:
        p.kill()


def cleaned_up_on(cluster: Cluster, alpha: Client, how: str) -> None:
    p, jobs = start_trainer(cluster, "exit" if how == "exit" else "run")
    if how == "sigterm":
        p.send_signal(signal.SIGTERM)
    elif how == "sigint":
        p.send_signal(signal.SIGINT)
    code = p.wait(timeout=30)
    if how == "sigterm":
        assert code == -signal.SIGTERM, "it still dies of SIGTERM"
    for j in jobs:
        info = alpha.job(j).refresh()
        # Cancelled by the client's clean-up at once, not by the lease running out.
        assert info.state == "cancelled", (how, info)
        reasons = {e[3] for e in info.exits}
        assert reasons == {EndReason.CANCELLED}, (how, info.exits)


def test_normal_exit_cleans_up(cluster: Cluster, alpha: Client) -> None:
    cleaned_up_on(cluster, alpha, "exit")


def test_sigterm_cleans_up(cluster: Cluster, alpha: Client) -> None:
    cleaned_up_on(cluster, alpha, "sigterm")


def test_sigint_cleans_up(cluster: Cluster, alpha: Client) -> None:
    cleaned_up_on(cluster, alpha, "sigint")


def test_detached_sandboxes_outlive_the_client(cluster: Cluster, alpha: Client) -> None:
    with cluster.client("alpha", detach=True) as c:
        sb = c.create_sandbox(cpu=0.5, memory_mib=256, constraints={"kind": "sim"})
    assert alpha.job(sb.job_id).refresh().counts.running == 1
    alpha.job(sb.job_id).cancel()


def test_batch_submit_wait_counts_and_listing(cluster: Cluster, alpha: Client) -> None:
    job = alpha.submit(
        20, ["episode"], cpu=0.5, memory_mib=256, constraints={"kind": "sim"}, labels={"b": "1"}
    )
    final = job.wait(timeout=120)
    assert final.state == "complete", final
    assert job.counts.succeeded == 20
    assert job.id in [j.id for j in alpha.jobs(tenant="alpha", labels={"b": "1"})]
