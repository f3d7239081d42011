"""The package itself: versioned with the server, stubs equal to proto/."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import surge

from .conftest import REPO


def test_version_is_the_servers() -> None:
    cargo = (REPO / "Cargo.toml").read_text()
    m = re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', cargo, re.M | re.S)
    assert m, "Cargo.toml has a workspace version"
    assert surge.__version__ == m.group(1)
    pyproject = (REPO / "python" / "pyproject.toml").read_text()
    assert f'version = "{m.group(1)}"' in pyproject


def test_stubs_match_the_protos() -> None:
    tool = Path(__file__).resolve().parents[1] / "tools" / "gen_proto.py"
    r = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_builds_a_wheel_with_types_and_stubs(tmp_path: Path) -> None:
    """`pip install ./python` builds this wheel: the package, its type marker and the stubs."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO / "python")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    wheels = list(tmp_path.glob("surge_sdk-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for want in ["surge/__init__.py", "surge/py.typed", "surge/_proto/jobs_pb2.py",
                 "surge/_proto/jobs_pb2.pyi", "surge/testing.py"]:  # fmt: skip
        assert want in names, (want, sorted(names))


def test_wire_states_read_as_surge_prints_them() -> None:
    from surge._proto import jobs_pb2
    from surge._types import job_state_name, job_state_value, sandbox_state_name

    # The names the CLI and the HTTP API print (proto/src/lib.rs holds the same table).
    rust = (REPO / "proto" / "src" / "lib.rs").read_text()
    for full in jobs_pb2.SandboxState.keys():  # noqa: SIM118
        name = sandbox_state_name(jobs_pb2.SandboxState.Value(full))
        if full == "SANDBOX_STATE_UNSPECIFIED":
            assert name == ""
        else:
            assert f'=> "{name}"' in rust, name
    assert sandbox_state_name(jobs_pb2.SANDBOX_STATE_OOM_KILLED) == "oom-killed"
    assert sandbox_state_name(999) == ""
    assert job_state_name(jobs_pb2.JOB_STATE_COMPLETE) == "complete"
    assert job_state_value("cancelled") == jobs_pb2.JOB_STATE_CANCELLED
    try:
        job_state_value("done")
    except ValueError as e:
        assert "pending, running, complete, failed, cancelled" in str(e)
    else:
        raise AssertionError("an unknown job state is refused")
