"""The async client: the same API with async/await, and many execs in flight from one process."""

from __future__ import annotations

import asyncio

from surge import AsyncClient, EndReason

from .conftest import REAL, SIM, Cluster


def aclient(cluster: Cluster) -> AsyncClient:
    return AsyncClient(cluster.servers, token=cluster.tokens["alpha"], tls_dir=cluster.tls_dir)


def test_200_concurrent_execs_on_simulated_nodes(cluster: Cluster) -> None:
    async def main() -> None:
        async with aclient(cluster) as ac:
            sbs = await ac.create_sandboxes(50, **SIM)  # type: ignore[arg-type]
            results = await asyncio.gather(*(s.exec(["true"]) for s in sbs for _ in range(4)))
            assert len(results) == 200 and all(r.exit_code == 0 for r in results)

    asyncio.run(main())


def test_concurrent_execs_in_containers_keep_outputs_apart(cluster: Cluster) -> None:
    async def main() -> None:
        async with aclient(cluster) as ac:
            sbs = await ac.create_sandboxes(8, **REAL)  # type: ignore[arg-type]
            results = await asyncio.gather(
                *(
                    s.exec(["sh", "-c", f"echo {s.index}-{k}; echo e{k} >&2"])
                    for s in sbs
                    for k in range(5)
                )
            )
            want = [(f"{s.index}-{k}\n", f"e{k}\n") for s in sbs for k in range(5)]
            assert [(r.stdout, r.stderr) for r in results] == want
            async with sbs[0] as first:
                async for chunk in first.exec_stream(["sh", "-c", "echo a; echo b >&2"]):
                    assert chunk.stream in ("stdout", "stderr")
            info = await sbs[0].wait(timeout=60)
            assert info.end_reason == EndReason.STOPPED, "leaving `async with` deleted it"
            assert (await sbs[1].info()).state == "running", "and only it"

    asyncio.run(main())
