"""A real local cluster for the SDK's tests: `surge dev --secure` (3 replicas with mutual TLS and
tenant tokens, one container node, simulated nodes), started once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from surge import Client
from surge.testing import DevCluster, criu_kit_problem, dev_cluster

REPO = Path(__file__).resolve().parents[2]
Cluster = DevCluster

# Small container sandboxes on the test cluster's one real node (1 CPU, 4 GiB).
REAL = {"cpu": 0.02, "memory_mib": 32, "constraints": {"kind": "real"}}
# Sandboxes on the simulated nodes (exec there answers at once, with no output).
SIM = {"cpu": 0.5, "memory_mib": 256, "constraints": {"kind": "sim"}}


def unavailable(reason: str) -> None:
    """A test that cannot run on this host: it fails under CI=true (CI must run it), else skips
    saying why (as the Rust tests' `surge_node::testing::unavailable`)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"unavailable under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    # The container node checkpoints when this host's CRIU kit works (the lid tests need it).
    kit = criu_kit_problem()
    with dev_cluster(secure=True, sim_nodes=200, real_nodes=1, checkpoint=kit is None) as dc:
        if kit is not None:
            dc.no_checkpoint = kit
        yield dc


@pytest.fixture(scope="session")
def alpha(cluster: DevCluster) -> Iterator[Client]:
    with cluster.client("alpha") as c:
        yield c
