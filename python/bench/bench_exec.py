"""SDK exec benchmark, side by side in one run on one local cluster (`surge dev`):

1. Round trip of `true` in one container sandbox, one call at a time: the SDK (blocking and
   async, gRPC), the HTTP/JSON API (httpx, pooled keep-alive), the CLI (`surge exec`, a process
   per call) and plain `crun exec` on the node (the anchor: no surge at all).
2. 1,000 concurrent execs from one asyncio process on simulated nodes: the SDK over gRPC against
   the HTTP/JSON API over httpx (the transport decision in python/README.md).

    python bench/bench_exec.py [--calls 200] [--concurrent 1000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from surge import AsyncClient, AsyncSandbox
from surge.testing import DevCluster, dev_cluster, surge_bin


def spread(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "n": len(s),
        "p50_ms": s[len(s) // 2] * 1000,
        "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000,
        "mean_ms": statistics.fmean(s) * 1000,
    }


def timed(f: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


async def atimed(f: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await f()
        out.append(time.perf_counter() - t)
    return out


def check_http(r: httpx.Response) -> None:
    r.raise_for_status()
    body = r.json()
    if body.get("exit_code") != 0:
        raise RuntimeError(f"HTTP exec failed: {body}")


def round_trips(dc: DevCluster, calls: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with dc.client() as c:
        sb = c.create_sandbox(cpu=0.1, memory_mib=64, constraints={"kind": "real"})
        info = sb.info()
        url = f"http://{dc.http[0]}/v1/jobs/{sb.job_id}/sandboxes/{sb.index}/exec"
        crun_root = dc.real_node_crun_root(info.node)
        container = f"surge-{sb.job_id}-{sb.index}"
        with httpx.Client() as h:
            for _ in range(10):  # warm every path once
                sb.exec(["true"])
                check_http(h.post(url, json={"command": ["true"]}))
            sdk: list[float] = []
            http: list[float] = []
            cli: list[float] = []
            crun: list[float] = []
            env = dc.env()
            # Interleaved, so that load on this shared machine falls on every path alike.
            for _ in range(calls // 10):
                sdk += timed(lambda: sb.exec(["true"]), 10)
                http += timed(lambda: check_http(h.post(url, json={"command": ["true"]})), 10)
                cli += timed(
                    lambda: subprocess.run(
                        [str(surge_bin()), "exec", sb.id, "--", "true"], env=env, check=True
                    ),
                    2,
                )
                crun += timed(
                    lambda: subprocess.run(
                        ["crun", "--root", str(crun_root), "exec", container, "true"], check=True
                    ),
                    10,
                )
        out["sdk_grpc"] = spread(sdk)
        out["http_json"] = spread(http)
        out["cli"] = spread(cli)
        out["crun_exec"] = spread(crun)

        async def aio() -> list[float]:
            async with AsyncClient(dc.servers) as ac:
                s = ac.sandbox(sb.id)
                await s.exec(["true"])
                return await atimed(lambda: s.exec(["true"]), calls)

        out["sdk_grpc_async"] = spread(asyncio.run(aio()))
        sb.delete()
    return out


async def concurrent(dc: DevCluster, total: int, per_sandbox: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    n_sb = max(1, total // per_sandbox)
    async with AsyncClient(dc.servers) as ac:
        sbs = await ac.create_sandboxes(n_sb, cpu=0.5, memory_mib=256, constraints={"kind": "sim"})

        async def grpc_one(s: AsyncSandbox) -> float:
            t = time.perf_counter()
            r = await s.exec(["true"])
            if r.exit_code != 0:
                raise RuntimeError(f"exec in {s.id} exited {r.exit_code}")
            return time.perf_counter() - t

        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=60) as h:

            async def http_one(s: AsyncSandbox) -> float:
                t = time.perf_counter()
                url = f"http://{dc.http[0]}/v1/jobs/{s.job_id}/sandboxes/{s.index}/exec"
                check_http(await h.post(url, json={"command": ["true"]}))
                return time.perf_counter() - t

            for name, one in (("sdk_grpc", grpc_one), ("http_json", http_one)):
                await asyncio.gather(*(one(s) for s in sbs))  # warm
                for _ in range(2):
                    t0 = time.perf_counter()
                    lat = await asyncio.gather(*(one(s) for s in sbs for _ in range(per_sandbox)))
                    wall = time.perf_counter() - t0
                    r = spread(list(lat))
                    r["execs_per_s"] = len(lat) / wall
                    best = out.get(name)
                    if best is None or r["execs_per_s"] > best["execs_per_s"]:
                        out[name] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 10 <= args.calls <= 100_000 or not 10 <= args.concurrent <= 100_000:
        ap.error("--calls and --concurrent: 10 to 100,000")
    with dev_cluster(secure=False, sim_nodes=100, real_nodes=1) as dc:
        rt = round_trips(dc, args.calls)
        conc = asyncio.run(concurrent(dc, args.concurrent, 10))
    load = os.getloadavg()[0]
    report = {"round_trip": rt, "concurrent": conc, "load_1m": load}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"exec round trip of `true`, one at a time (load {load:.1f}):")
    print(f"  {'path':<16} {'p50 ms':>8} {'p99 ms':>8}  vs crun exec p50")
    anchor = rt["crun_exec"]["p50_ms"]
    for k, v in rt.items():
        print(f"  {k:<16} {v['p50_ms']:>8.1f} {v['p99_ms']:>8.1f}  {v['p50_ms'] / anchor:>5.2f}x")
    print(f"\n{args.concurrent} concurrent execs from one asyncio process, simulated nodes:")
    for k, v in conc.items():
        print(
            f"  {k:<16} {v['execs_per_s']:>8.0f} execs/s   p50 {v['p50_ms']:.1f} ms"
            f"   p99 {v['p99_ms']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
