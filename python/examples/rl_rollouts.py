"""A GRPO-shaped rollout loop on surge: for each task, a group of rollouts in sandboxes created in
one call; each rollout is a scripted "policy" making tool calls (shell commands that read, test
and edit a small repo in its sandbox); its diff is then applied in a fresh sandbox where the
task's test gives the reward; group-relative advantages follow, with infrastructure failures
masked out rather than scored as zero.

    surge dev &                                   # a local cluster (see the README)
    python examples/rl_rollouts.py --tasks 8 --rollouts 8 --tool-calls 20

The repo is versioned the way busybox allows (the default template has no git): the pristine copy
is kept beside it and the rollout's change is `diff -ruN`, applied with `patch -p1` - the same
unified diff git would produce. With a template that has git, pass --git.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field

from surge import AsyncClient, AsyncSandbox, SandboxEnded, SurgeError, Unavailable

# (name, correct expression, buggy expression, a plausible wrong fix, test inputs)
OPS = [
    ("add", "$(( $1 + $2 ))", "$(( $1 - $2 ))", "$(( $2 - $1 ))", [(2, 3), (10, -4), (0, 7)]),
    ("mul", "$(( $1 * $2 ))", "$(( $1 + $2 ))", "$(( $1 * $1 ))", [(2, 3), (4, 5), (7, 1)]),
    ("sub", "$(( $1 - $2 ))", "$(( $2 - $1 ))", "$(( $1 + $2 ))", [(9, 3), (4, 5), (0, 2)]),
    ("sq", "$(( $1 * $1 ))", "$(( $1 * 2 ))", "$(( $1 + $1 ))", [(3, 0), (5, 0), (1, 0)]),
    ("mod", "$(( $1 % $2 ))", "$(( $1 / $2 ))", "$(( $2 % $1 ))", [(9, 4), (10, 3), (7, 7)]),
    (
        "avg",
        "$(( ($1 + $2) / 2 ))",
        "$(( $1 + $2 / 2 ))",
        "$(( $1 / 2 ))",
        [(4, 8), (2, 2), (6, 0)],
    ),
    ("dbl", "$(( $1 * 2 ))", "$(( $1 + 2 ))", "$(( $1 * 3 ))", [(3, 0), (5, 0), (2, 0)]),
    ("neg", "$(( 0 - $1 ))", "$(( $1 - 0 ))", "$(( 1 - $1 ))", [(3, 0), (-2, 0), (5, 0)]),
]

PY_OPS = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "sub": lambda a, b: a - b,
    "sq": lambda a, b: a * a,
    "mod": lambda a, b: a % b,
    "avg": lambda a, b: (a + b) // 2,
    "dbl": lambda a, b: a * 2,
    "neg": lambda a, b: -a,
}


def task_files(t: int) -> dict[str, str]:
    name, _good, bug, _wrong, cases = OPS[t % len(OPS)]
    lib = f"#!/bin/sh\n# task {t}: {name}\n{name}() {{\n  echo {bug}\n}}\n"
    checks = "\n".join(
        f'[ "$({name} {a} {b})" = "{PY_OPS[name](a, b)}" ] || {{ echo "FAIL {name} {a} {b}"; '
        f"exit 1; }}"
        for a, b in cases
    )
    test = f'#!/bin/sh\ncd "$(dirname "$0")"\n. ./lib.sh\n{checks}\necho PASS\n'
    return {"lib.sh": lib, "test.sh": test, "README": f"Fix {name}() so that test.sh passes.\n"}


def sed_replace(old: str, new: str) -> str:
    def esc(s: str, specials: str) -> str:
        return "".join("\\" + c if c in specials else c for c in s)

    # A basic regular expression on the left, a replacement on the right.
    left, right = esc(old, "\\/$*.[]^"), esc(new, "\\/&")
    return f"sed -i 's/{left}/{right}/' lib.sh"


def policy(t: int, n_calls: int, rng: random.Random) -> tuple[list[str], bool]:
    """A scripted policy: look around, run the test, try a fix (right or wrong), test again.
    Returns the tool calls and whether the last edit was the right fix (what the reward should
    say; the loop itself never looks at it)."""
    _name, good, bug, wrong, _ = OPS[t % len(OPS)]
    observe = [
        "ls -la",
        "cat lib.sh",
        "cat README",
        "sh test.sh",
        "grep -n echo lib.sh",
        "wc -l lib.sh",
    ]
    calls: list[str] = []
    edit_at = sorted(rng.sample(range(2, max(3, n_calls - 1)), k=min(2, max(1, n_calls - 3))))
    current = bug
    for i in range(n_calls):
        if i in edit_at:
            target = good if rng.random() < 0.55 else wrong
            calls.append(sed_replace(current, target))
            current = target
        elif i == n_calls - 1:
            calls.append("sh test.sh")
        else:
            calls.append(rng.choice(observe))
    return calls, current == good


@dataclass
class Stats:
    exec_s: list[float] = field(default_factory=list)
    create_to_first_exec_s: list[float] = field(default_factory=list)
    rewards: dict[int, list[float | None]] = field(default_factory=dict)
    masked: int = 0
    done: int = 0


def infra(e: BaseException) -> bool:
    """Not the policy's doing: mask the rollout rather than score it."""
    return isinstance(e, Unavailable) or (isinstance(e, SandboxEnded) and e.infrastructure)


async def timed_exec(sb: AsyncSandbox, cmd: str, stats: Stats, git: bool) -> int:
    t0 = time.monotonic()
    r = await sb.exec(["sh", "-c", cmd], cwd="/work/repo", timeout=30)
    stats.exec_s.append(time.monotonic() - t0)
    return r.exit_code


async def rollout(
    sb: AsyncSandbox, t: int, k: int, args: argparse.Namespace, stats: Stats, created_at: float
) -> str:
    """One rollout: set up the repo, make the policy's tool calls, return its diff."""
    files = task_files(t)
    for name, body in files.items():
        await sb.write_file(f"/work/repo/{name}", body, mode=0o755)
    if args.git:
        setup = "git init -q && git add -A && git -c user.name=r -c user.email=r@x commit -qm base"
    else:
        setup = "rm -rf /work/base && cp -r /work/repo /work/base"
    await timed_exec(sb, setup, stats, args.git)
    stats.create_to_first_exec_s.append(time.monotonic() - created_at)
    rng = random.Random(args.seed * 1_000_003 + t * 1_000 + k)
    calls, _ = policy(t, args.tool_calls, rng)
    for cmd in calls:
        await timed_exec(sb, cmd, stats, args.git)
    diff_cmd = "git diff" if args.git else "cd /work && diff -ruN base repo; true"
    r = await sb.exec(["sh", "-c", diff_cmd], cwd="/work/repo", timeout=30)
    return r.stdout


async def judge(sb: AsyncSandbox, t: int, diff: str, git: bool) -> float:
    """Apply the diff to a pristine repo in a fresh sandbox; the task's test is the reward."""
    for name, body in task_files(t).items():
        await sb.write_file(f"/work/repo/{name}", body, mode=0o755)
    await sb.write_file("/work/change.diff", diff)
    apply = "git apply /work/change.diff" if git else "patch -p1 < /work/change.diff >/dev/null"
    r = await sb.exec(
        ["sh", "-c", f"{apply} && sh test.sh"] if diff.strip() else ["sh", "test.sh"],
        cwd="/work/repo",
        timeout=30,
    )
    return 1.0 if r.exit_code == 0 else 0.0


async def run_task(
    ac: AsyncClient, t: int, args: argparse.Namespace, stats: Stats, run: str, bar: Progress
) -> None:
    shape = dict(
        cpu=args.cpu,
        memory_mib=args.memory_mib,
        ttl="15m",
        constraints=[args.constraint] if args.constraint else None,
        template=args.template,
    )
    rewards: list[float | None] = [None] * args.rollouts
    created_at = time.monotonic()
    group = await ac.create_sandboxes(
        args.rollouts,
        labels={"run": run, "task": str(t), "phase": "rollout"},
        **shape,
    )
    diffs: list[str | None] = [None] * args.rollouts

    async def one(k: int, sb: AsyncSandbox) -> None:
        try:
            diffs[k] = await rollout(sb, t, k, args, stats, created_at)
        except SurgeError as e:
            if not infra(e):
                raise
            stats.masked += 1
        finally:
            await sb.delete()

    await asyncio.gather(*(one(k, sb) for k, sb in enumerate(group)))
    todo = [k for k in range(args.rollouts) if diffs[k] is not None]
    if todo:
        judges = await ac.create_sandboxes(
            len(todo),
            labels={"run": run, "task": str(t), "phase": "judge"},
            **shape,
        )

        async def score(k: int, sb: AsyncSandbox) -> None:
            try:
                rewards[k] = await judge(sb, t, diffs[k] or "", args.git)
            except SurgeError as e:
                if not infra(e):
                    raise
                stats.masked += 1
            finally:
                await sb.delete()
                stats.done += 1
                bar.update()

        await asyncio.gather(*(score(k, sb) for k, sb in zip(todo, judges, strict=True)))
    stats.rewards[t] = rewards


class Progress:
    """tqdm when installed, else a line per rollout judged."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar: object | None = tqdm(total=total, unit="rollout", file=sys.stderr)
        except ImportError:
            self._bar = None

    def update(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)  # type: ignore[attr-defined]
        else:
            print(f"  {self.n}/{self.total} rollouts judged", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # type: ignore[attr-defined]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def main(args: argparse.Namespace) -> int:
    run = f"rl-{uuid.uuid4().hex[:8]}"
    stats = Stats()
    bar = Progress(args.tasks * args.rollouts)
    started = time.monotonic()
    async with AsyncClient(args.server) as ac:
        await asyncio.gather(*(run_task(ac, t, args, stats, run, bar) for t in range(args.tasks)))
    elapsed = time.monotonic() - started
    bar.close()

    print(
        f"\nrun {run}: {args.tasks} tasks x {args.rollouts} rollouts x {args.tool_calls} tool calls"
    )
    print(f"{'task':>4}  {'rewards':<{2 * args.rollouts + 2}} {'mean':>5}  advantages (GRPO)")
    for t in range(args.tasks):
        rs = stats.rewards.get(t, [])
        scored = [r for r in rs if r is not None]
        mean = statistics.fmean(scored) if scored else float("nan")
        sd = statistics.pstdev(scored) if len(scored) > 1 else 0.0
        adv = [None if r is None else (r - mean) / (sd + 1e-6) for r in rs]
        shown = "".join("-" if r is None else str(int(r)) for r in rs)
        advs = " ".join("  mask" if a is None else f"{a:+.2f}" for a in adv)
        print(f"{t:>4}  [{shown}]{'':<{2 * args.rollouts - len(shown)}} {mean:>5.2f}  {advs}")
    n = args.tasks * args.rollouts
    print()
    print(f"rollouts          {stats.done} judged, {stats.masked} masked (infrastructure)")
    print(f"rollouts/s        {n / elapsed:.2f}  ({elapsed:.1f} s in all)")
    print(f"tool calls        {len(stats.exec_s)}, {len(stats.exec_s) / elapsed:.1f}/s")
    print(
        f"exec round trip   p50 {pct(stats.exec_s, 0.5) * 1000:.1f} ms   "
        f"p99 {pct(stats.exec_s, 0.99) * 1000:.1f} ms"
    )
    print(
        f"create->1st exec  p50 {pct(stats.create_to_first_exec_s, 0.5) * 1000:.0f} ms   "
        f"p99 {pct(stats.create_to_first_exec_s, 0.99) * 1000:.0f} ms"
    )
    return 0 if stats.done + stats.masked == n else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--server", help="replicas (default: SURGE_SERVER, else 127.0.0.1:7070)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=8, help="rollouts per task (the GRPO group)")
    ap.add_argument("--tool-calls", type=int, default=20)
    ap.add_argument("--cpu", type=float, default=0.025)
    ap.add_argument("--memory-mib", type=int, default=32)
    ap.add_argument("--template", default="busybox")
    ap.add_argument(
        "--constraint",
        default="kind=real",
        help="placement constraint (surge dev labels its container nodes kind=real; '' for none)",
    )
    ap.add_argument("--git", action="store_true", help="the template has git: use git diff/apply")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("tasks", "rollouts", "tool_calls"):
        if not 0 < getattr(args, name) <= 1000:
            ap.error(f"--{name.replace('_', '-')}: 1 to 1000")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
