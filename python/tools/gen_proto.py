"""Regenerate surge's gRPC stubs (src/surge/_proto) from the repository's proto/ directory.

    python tools/gen_proto.py            # write the stubs
    python tools/gen_proto.py --check    # exit 1 when the checked-in stubs differ (tests run it)

The stubs are checked in so that `pip install ./python` needs no protoc; this script (grpcio-tools
and mypy-protobuf, the SDK's dev extras) keeps them equal to proto/.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "proto" / "proto"
OUT = HERE.parent / "src" / "surge" / "_proto"
# The services the SDK calls: jobs and lifetimes, exec and files, cluster status.
PROTOS = ("jobs.proto", "sandbox.proto", "cluster.proto")


def generate(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        pkg = src / "surge" / "_proto"
        pkg.mkdir(parents=True)
        for p in PROTOS:
            shutil.copy(PROTO_DIR / p, pkg / p)
        out = Path(tmp) / "out"
        out.mkdir()
        bindir = Path(sys.executable).parent
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *[f"surge/_proto/{p}" for p in PROTOS],
        ]
        subprocess.run(cmd, check=True)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((out / "surge" / "_proto").iterdir()):
            shutil.copy(f, dest / f.name)
    (dest / "__init__.py").write_text(
        '"""Generated from proto/ by tools/gen_proto.py; do not edit."""\n'
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        generate(fresh)
        names = sorted(p.name for p in fresh.iterdir())
        have = sorted(p.name for p in OUT.iterdir() if p.name != "__pycache__")
        _, mismatch, errors = filecmp.cmpfiles(fresh, OUT, names, shallow=False)
        if mismatch or errors or names != have:
            print(
                f"the stubs in {OUT} differ from proto/ ({mismatch + errors or have}): "
                "run python tools/gen_proto.py",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
