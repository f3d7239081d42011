"""Create, exec, streams, files, directories and delete, through the blocking client."""

from __future__ import annotations

import os
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

from surge import Client, ExecTimeout, InvalidArgument, SandboxEnded, SandboxNotFound
from surge._archive import check_member, unpack

from .conftest import REAL, Cluster


def test_the_issue_example_end_to_end(alpha: Client, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "src" / "deep").mkdir(parents=True)
    (repo / "README").write_text("hello\n")
    (repo / "src" / "main.sh").write_text("echo main\n")
    (repo / "src" / "deep" / "blob.bin").write_bytes(os.urandom(300_000))
    os.symlink("src/main.sh", repo / "link")

    with alpha.create_sandbox(ttl="10m", **REAL) as sb:  # type: ignore[arg-type]
        r = sb.exec(["sh", "-c", "echo hi; echo oops >&2; exit 3"], timeout=60)
        assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "oops\n", 3)

        sb.write_file("/tmp/x.txt", b"data")
        assert sb.read_file("/tmp/x.txt") == b"data"

        chunks = list(
            stream := sb.exec_stream(["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.1; done"])
        )
        assert b"".join(c.data for c in chunks) == b"1\n2\n3\n"
        assert all(c.stream == "stdout" for c in chunks)
        assert len(chunks) >= 2, "output streams as it comes, not at the end"
        assert stream.exit_code == 0

        assert sb.upload_dir(repo, "/work/repo") >= 3
        listing = {e.name: e for e in sb.list_dir("/work/repo")}
        assert listing["README"].kind == "file" and listing["src"].kind == "dir"
        assert listing["link"].kind == "symlink"
        sb.exec(
            [
                "sh",
                "-c",
                "mkdir -p /work/out && cp -r /work/repo/src /work/out/ && "
                "echo made > /work/out/new.txt",
            ]
        )
        out = tmp_path / "out"
        sb.download_dir("/work/out", out)
        assert (out / "new.txt").read_text() == "made\n"
        assert (out / "src" / "deep" / "blob.bin").read_bytes() == (
            repo / "src" / "deep" / "blob.bin"
        ).read_bytes()
        job = alpha.job(sb.job_id)
    # Leaving the block deleted it.
    info = job.refresh()
    assert info.state == "cancelled", info
    with pytest.raises(SandboxEnded) as e:
        sb.exec(["true"])
    assert e.value.reason is not None and e.value.reason.value == "cancelled"
    assert not e.value.infrastructure


def test_exec_stdin_env_cwd_and_big_output(alpha: Client) -> None:
    with alpha.create_sandbox(**REAL) as sb:  # type: ignore[arg-type]
        r = sb.exec(
            ["sh", "-c", "cat; echo $FOO; pwd"], stdin="in\n", env={"FOO": "bar"}, cwd="/tmp"
        )
        assert r.stdout == "in\nbar\n/tmp\n"
        big = sb.exec(["sh", "-c", "head -c 3000000 /dev/zero"])
        assert len(big.stdout_bytes) == 3_000_000
        capped = sb.exec(["sh", "-c", "head -c 100000 /dev/zero"], output_cap=1000)
        assert len(capped.stdout_bytes) == 1000 and capped.exit_code == 0


def test_interactive_stream_and_signal(alpha: Client) -> None:
    import signal

    with alpha.create_sandbox(**REAL) as sb:  # type: ignore[arg-type]
        s = sb.exec_stream(["sh", "-c", "read a; echo got $a; sleep 30"], interactive=True)
        s.send_stdin("x\n")
        first = next(iter(s))
        assert first.text == "got x\n"
        s.signal(signal.SIGKILL)
        rest = list(s)
        assert rest == [] and s.result.signal == signal.SIGKILL


def test_timeout_raises_with_the_output_so_far(alpha: Client) -> None:
    with alpha.create_sandbox(**REAL) as sb:  # type: ignore[arg-type]
        with pytest.raises(ExecTimeout) as e:
            sb.exec(["sh", "-c", "echo before; sleep 30"], timeout=1)
        assert e.value.result.stdout == "before\n" and e.value.result.timed_out
        # The sandbox is fine afterwards.
        assert sb.exec(["echo", "after"]).stdout == "after\n"


def test_missing_things_and_bad_input(alpha: Client) -> None:
    with pytest.raises(SandboxNotFound):
        alpha.sandbox("999999.0").exec(["true"])
    with pytest.raises(SandboxNotFound):
        alpha.job(999999).refresh()
    with pytest.raises(InvalidArgument, match="cpu"):
        alpha.create_sandbox(cpu=-1)
    with pytest.raises(InvalidArgument, match=r"JOB\.INDEX"):
        alpha.sandbox("12")
    with pytest.raises(InvalidArgument, match="list of arguments"):
        alpha.submit(1, "echo hi")
    with pytest.raises(InvalidArgument, match="ttl"):
        alpha.create_sandbox(ttl="10 parsecs")
    # The server's own validation names the field.
    with pytest.raises(InvalidArgument, match="label"):
        alpha.create_sandbox(labels={"bad key!": "x"}, **REAL)  # type: ignore[arg-type]
    with alpha.create_sandbox(**REAL) as sb:  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            sb.write_file("relative/path", b"x")
        with pytest.raises(SandboxNotFound):
            sb.read_file("/no/such/file")


def test_ttl_end_is_typed(alpha: Client) -> None:
    sb = alpha.create_sandbox(ttl="2s", **REAL)  # type: ignore[arg-type]
    info = sb.wait(timeout=60)
    assert info.end_reason is not None and info.end_reason.value == "ttl-expired", info
    with pytest.raises(SandboxEnded) as e:
        sb.exec(["true"])
    assert e.value.reason == info.end_reason and not e.value.infrastructure


def test_many_sandboxes_in_one_call_and_delete_by_label(alpha: Client, cluster: Cluster) -> None:
    sbs = alpha.create_sandboxes(12, labels={"run": "exp7"}, **REAL)  # type: ignore[arg-type]
    assert len({s.job_id for s in sbs}) == 1, "one call, one job"
    assert [s.exec(["sh", "-c", f"echo {s.index}"]).stdout for s in sbs] == [
        f"{i}\n" for i in range(12)
    ]
    jobs = alpha.jobs(labels={"run": "exp7"})
    assert [j.id for j in jobs] == [sbs[0].job_id]
    assert jobs[0].counts.running == 12
    assert alpha.delete(labels={"run": "exp7"}) == 1
    assert alpha.job(sbs[0].job_id).wait(timeout=30).state == "cancelled"


def test_an_archive_that_escapes_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    def archive(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> BytesIO:
        buf = BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            ok = tarfile.TarInfo("ok.txt")
            t.addfile(ok, BytesIO(b""))
            m = tarfile.TarInfo(name)
            m.type = kind
            m.linkname = link
            t.addfile(m, BytesIO(b""))
        buf.seek(0)
        return buf

    for bad in [
        archive("../escape"),
        archive("/abs"),
        archive("a/../../x"),
        archive("dev", tarfile.CHRTYPE),
        archive("l", tarfile.SYMTYPE, "/etc/passwd"),
        archive("d/l", tarfile.SYMTYPE, "../../x"),
    ]:
        dest = tmp_path / "dest"
        with pytest.raises(Exception, match="refused"):
            unpack(bad, dest)
        assert not dest.exists() or not any(dest.iterdir())
    good = tarfile.TarInfo("d/l")
    good.type = tarfile.SYMTYPE
    good.linkname = "../ok.txt"
    assert check_member(good) is None
