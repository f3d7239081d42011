"""A whole local surge cluster for tests and benchmarks: `surge dev` as a context manager.

    from surge.testing import dev_cluster
    with dev_cluster(secure=True, sim_nodes=200, real_nodes=1) as dc:
        with dc.client("alpha") as c:
            ...

It needs the `surge` binary (`surge_bin`, else SURGE_BIN, else the workspace's debug build), and
root with crun for the container nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._sync import Client

START_TIMEOUT = 240.0
# Where scripts/setup-criu installs the CRIU kit (`$SURGE_CRIU_PREFIX` overrides, as for the node).
CRIU_PREFIX_DEFAULT = "/opt/surge-crun-criu"


def criu_kit_problem() -> str | None:
    """Why this host's CRIU kit cannot checkpoint (None: it can). The same probe as the node's
    (`CriuKit::probe`): its crun says +CRIU and its `criu check` passes (as root)."""
    prefix = Path(os.environ.get("SURGE_CRIU_PREFIX") or CRIU_PREFIX_DEFAULT)
    crun, criu = prefix / "bin/crun", prefix / "sbin/criu"
    if not crun.is_file() or not criu.is_file():
        return f"no usable CRIU: {prefix} has no crun + criu (run scripts/setup-criu)"
    if os.geteuid() != 0:
        return "no usable CRIU: checkpointing needs root"
    try:
        version = subprocess.run([crun, "--version"], capture_output=True, text=True, timeout=30)
        if "+CRIU" not in version.stdout:
            return f"no usable CRIU: {crun} is built without CRIU"
        check = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no usable CRIU: {e}"
    if check.returncode != 0:
        last = (check.stderr or check.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"no usable CRIU: `criu check` fails: {last[0]}"
    return None


def surge_bin() -> Path:
    """SURGE_BIN, else the workspace's debug build under CARGO_TARGET_DIR or ~/.cache/surge."""
    if os.environ.get("SURGE_BIN"):
        return Path(os.environ["SURGE_BIN"])
    target = os.environ.get("CARGO_TARGET_DIR") or str(Path.home() / ".cache/surge/target")
    p = Path(target) / "debug" / "surge"
    if not p.is_file():
        raise RuntimeError(f"no surge binary at {p}: build the workspace or set SURGE_BIN")
    return p


def free_base_port() -> int:
    """A base port P with P..P+2 (gRPC) and P+10..P+12 (HTTP) free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base > 65000:
            continue
        socks: list[socket.socket] = []
        try:
            for p in [base, base + 1, base + 2, base + 10, base + 11, base + 12]:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for the cluster")


@dataclass
class DevCluster:
    servers: str
    http: list[str]
    tls_dir: str | None
    tokens: dict[str, str]
    root: Path
    real_nodes: int
    # The container nodes can checkpoint (None), else why not.
    no_checkpoint: str | None = "started without checkpoint=True"

    def client(self, who: str | None = None, **kw: Any) -> Client:
        """A client as `who` (with --secure: "admin", "alpha" or "beta")."""
        token = self.tokens[who] if who else None
        return Client(self.servers, token=token, tls_dir=self.tls_dir, **kw)

    def env(self, who: str | None = None) -> dict[str, str]:
        """The environment a CLI or SDK process uses to reach the cluster as `who`."""
        e = dict(os.environ)
        e["SURGE_SERVER"] = self.servers
        for k in ("SURGE_TOKEN", "SURGE_TLS_DIR"):
            e.pop(k, None)
        if who:
            e["SURGE_TOKEN"] = self.tokens[who]
        if self.tls_dir:
            e["SURGE_TLS_DIR"] = self.tls_dir
        return e

    def real_node_crun_root(self, node: str) -> Path:
        """The crun state dir of container node `real-N` (`crun --root`)."""
        return self.root / "data" / node / "crun"


@contextlib.contextmanager
def dev_cluster(
    *,
    secure: bool = False,
    sim_nodes: int = 200,
    real_nodes: int = 1,
    replicas: int = 3,
    bin: Path | None = None,
    checkpoint: bool = False,
) -> Iterator[DevCluster]:
    """`checkpoint=True`: the container nodes can checkpoint (`surge dev --checkpoint`; needs the
    CRIU kit, see `criu_kit_problem()`)."""
    root = Path(tempfile.mkdtemp(prefix="surge-dev-py-"))
    info_file = root / "info.json"
    args = [
        str(bin or surge_bin()),
        "dev",
        "--replicas", str(replicas),
        "--port", str(free_base_port()),
        "--sim-nodes", str(sim_nodes),
        "--real-nodes", str(real_nodes),
        "--data-dir", str(root / "data"),
        "--info-file", str(info_file),
    ]  # fmt: skip
    if secure:
        args.append("--secure")
    if checkpoint:
        args.append("--checkpoint")
    with open(root / "dev.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not info_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = (root / "dev.log").read_text()[-3000:]
                    raise RuntimeError(f"surge dev did not come up:\n{tail}")
                time.sleep(0.2)
            info = json.loads(info_file.read_text())
            if info["real_nodes"] < real_nodes:
                raise RuntimeError(
                    f"surge dev started {info['real_nodes']} of {real_nodes} container nodes "
                    "(they need root and crun; see dev.log)"
                )
            yield DevCluster(
                servers=info["servers"],
                http=info["http"],
                tls_dir=info["tls_dir"],
                tokens=info["tokens"],
                root=root,
                real_nodes=info["real_nodes"],
                no_checkpoint=None if checkpoint else "started without checkpoint=True",
            )
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # The run's data, logs and keys go with it (SURGE_KEEP_DEV=1 keeps them to look at).
            if not os.environ.get("SURGE_KEEP_DEV"):
                shutil.rmtree(root, ignore_errors=True)
