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
