"""The RL rollout example, CI-sized, against the test cluster: every rollout is judged, and each
reward is what the scripted policy's final edit deserves (the diff travelled and applied)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from .conftest import Cluster

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import rl_rollouts  # noqa: E402


def expected_rewards(t: int, rollouts: int, calls: int, seed: int) -> str:
    out = ""
    for k in range(rollouts):
        _, fixed = rl_rollouts.policy(t, calls, random.Random(seed * 1_000_003 + t * 1_000 + k))
        out += "1" if fixed else "0"
    return out


def test_rl_rollouts_ci_sized(cluster: Cluster) -> None:
    tasks, rollouts, calls = 3, 3, 6
    r = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "rl_rollouts.py"),
            "--tasks",
            str(tasks),
            "--rollouts",
            str(rollouts),
            "--tool-calls",
            str(calls),
            "--seed",
            "7",
        ],
        env=cluster.env("alpha"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{tasks * rollouts} judged, 0 masked" in r.stdout, r.stdout
    for t in range(tasks):
        want = expected_rewards(t, rollouts, calls, 7)
        assert f"{t:>4}  [{want}]" in r.stdout, (t, want, r.stdout)
    assert "exec round trip" in r.stdout and "create->1st exec" in r.stdout
