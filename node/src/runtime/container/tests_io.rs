//! Exec and files of real container sandboxes (root + crun + busybox-static; skipped with a
//! message where missing, failing in CI: `testing::unavailable`).

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Instant;

use super::tests::{cleanup, req, runtime};
use super::*;
use crate::runtime::io::{
    ExecControl, ExecOutput, ExecSpec, ExecStatus, IoError, SandboxIo, WriteSpec,
    EXECS_PER_SANDBOX_MAX,
};
use bytes::Bytes;
use tokio::sync::mpsc;

/// A long-lived sandbox (no command): surge-init alone as PID 1.
async fn long_lived(rt: &ContainerRuntime, job: u64, index: u32) -> SandboxId {
    let mut r = req(job, index, "", 64);
    r.spec.command = Vec::new();
    rt.start(r).await.expect("start a long-lived sandbox");
    SandboxId::new(job, index)
}

pub(super) fn spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        command: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        timeout: Duration::from_secs(30),
        stdin: false,
    }
}

pub(super) struct Ran {
    pub(super) status: Result<ExecStatus, IoError>,
    pub(super) stdout: String,
    pub(super) stderr: String,
    /// Stdout and stderr chunks in the order they came, tagged.
    order: Vec<(char, String)>,
}

/// Run an exec to its end, sending `stdin` first (then closing it).
pub(super) async fn run(
    rt: &ContainerRuntime,
    id: SandboxId,
    spec: ExecSpec,
    stdin: &[&str],
) -> Ran {
    let (ctl_tx, ctl_rx) = mpsc::channel(16);
    let (out_tx, mut out_rx) = mpsc::channel(16);
    for s in stdin {
        ctl_tx
            .send(ExecControl::Stdin(Bytes::copy_from_slice(s.as_bytes())))
            .await
            .expect("stdin");
    }
    drop(ctl_tx);
    let collect = async {
        let mut order = Vec::new();
        while let Some(o) = out_rx.recv().await {
            match o {
                ExecOutput::Stdout(b) => {
                    assert!(b.len() <= CHUNK_BYTES);
                    order.push(('o', String::from_utf8_lossy(&b).into_owned()));
                }
                ExecOutput::Stderr(b) => {
                    order.push(('e', String::from_utf8_lossy(&b).into_owned()))
                }
            }
        }
        order
    };
    let (status, order) = tokio::join!(rt.exec(id, spec, ctl_rx, out_tx), collect);
    let cat = |k: char| {
        order
            .iter()
            .filter(|(t, _)| *t == k)
            .map(|(_, s)| s.as_str())
            .collect()
    };
    Ran {
        status,
        stdout: cat('o'),
        stderr: cat('e'),
        order,
    }
}

use crate::runtime::io::CHUNK_BYTES;

/// Processes of the sandbox seen from the host: (pid, state, comm).
fn processes(rt: &ContainerRuntime, id: SandboxId) -> Vec<(u32, String, String)> {
    let cg = rt.get(id).expect("sandbox").cgroup.crun_path.clone();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        if !cgroup.lines().any(|l| l.ends_with(&format!(":{cg}"))) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm = stat[stat.find('(').unwrap_or(0) + 1..stat.rfind(')').unwrap_or(0)].to_owned();
        let state = stat[stat.rfind(')').unwrap_or(0) + 2..]
            .chars()
            .take(1)
            .collect();
        out.push((pid, state, comm));
    }
    out
}

/// Wait until no process of the sandbox is named `comm` and none is a zombie.
async fn settles(rt: &ContainerRuntime, id: SandboxId, comm: &str) -> Vec<(u32, String, String)> {
    let t0 = Instant::now();
    loop {
        let ps = processes(rt, id);
        let bad: Vec<_> = ps
            .iter()
            .filter(|(_, s, c)| c == comm || s == "Z")
            .cloned()
            .collect();
        if bad.is_empty() || t0.elapsed() > Duration::from_secs(5) {
            return bad;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn exec_streams_output_codes_stdin_as_the_sandbox_user() {
    let Some((rt, data)) = runtime("io-exec") else {
        return;
    };
    let id = long_lived(&rt, 20, 0).await;
    let r = run(
        &rt,
        id,
        spec(&[
            "sh",
            "-c",
            "echo out1; echo err1 >&2; sleep 0.1; echo out2; echo err2 >&2; exit 3",
        ]),
        &[],
    )
    .await;
    let st = r.status.expect("exec");
    assert_eq!((st.code, st.signal, st.timed_out), (3, None, false));
    assert_eq!(r.stdout, "out1\nout2\n");
    assert_eq!(r.stderr, "err1\nerr2\n");
    let first_out2 = r
        .order
        .iter()
        .position(|(_, s)| s.contains("out2"))
        .expect("out2");
    let first_err1 = r
        .order
        .iter()
        .position(|(_, s)| s.contains("err1"))
        .expect("err1");
    assert!(
        first_err1 < first_out2,
        "streamed as they came: {:?}",
        r.order
    );
    assert_eq!(
        run(&rt, id, spec(&["true"]), &[])
            .await
            .status
            .expect("true")
            .code,
        0
    );
    let killed = run(&rt, id, spec(&["sh", "-c", "kill -9 $$"]), &[])
        .await
        .status
        .expect("exec");
    assert_eq!((killed.code, killed.signal), (137, Some(9)));
    let missing = run(&rt, id, spec(&["no-such-command"]), &[]).await;
    assert_eq!(missing.status.expect("exec").code, 127);
    assert!(
        missing.stderr.contains("no-such-command"),
        "{}",
        missing.stderr
    );

    // Who runs it: the sandbox's user, no capabilities, no_new_privs, its env and rlimits.
    let mut s = spec(&["sh", "-c", "grep -E '^(Uid|Gid|CapEff|CapPrm|NoNewPrivs)' /proc/self/status; echo $GREETING $EXTRA; pwd; ulimit -n"]);
    s.env.insert("EXTRA".into(), "x=y".into());
    s.cwd = Some("/tmp".into());
    let who = run(&rt, id, s, &[]).await;
    assert_eq!(who.status.expect("exec").code, 0, "{}", who.stderr);
    let status: BTreeMap<&str, String> = who
        .stdout
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k, v.split_whitespace().next().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(status["Uid"], "1000", "{}", who.stdout);
    assert_eq!(status["Gid"], "1000");
    assert_eq!(status["CapEff"], "0000000000000000");
    assert_eq!(status["CapPrm"], "0000000000000000");
    assert_eq!(status["NoNewPrivs"], "1");
    assert!(
        who.stdout.contains("hi x=y\n/tmp\n4096\n"),
        "{}",
        who.stdout
    );

    // Stdin streams in.
    let wc = run(
        &rt,
        id,
        ExecSpec {
            stdin: true,
            ..spec(&["wc", "-c"])
        },
        &["hello ", "world"],
    )
    .await;
    assert_eq!(wc.stdout.trim(), "11");
    let cat = run(
        &rt,
        id,
        ExecSpec {
            stdin: true,
            ..spec(&["cat"])
        },
        &["a\n", "b\n"],
    )
    .await;
    assert_eq!(cat.stdout, "a\nb\n");
    // Without stdin, stdin is empty.
    assert_eq!(
        run(&rt, id, spec(&["wc", "-c"]), &[]).await.stdout.trim(),
        "0"
    );

    // A signal goes to the command's process group.
    let (ctl_tx, ctl_rx) = mpsc::channel(4);
    let (out_tx, _out_rx) = mpsc::channel(4);
    let signal = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ctl_tx.send(ExecControl::Signal(15)).await.expect("signal");
    };
    let (st, ()) = tokio::join!(rt.exec(id, spec(&["sleep", "30"]), ctl_rx, out_tx), signal);
    let st = st.expect("exec");
    assert_eq!((st.code, st.signal), (143, Some(15)));

    // crun's own failure (a missing cwd) is an error of the call, not the command's output.
    let mut nowhere = spec(&["true"]);
    nowhere.cwd = Some("/no-such-dir".into());
    let r = run(&rt, id, nowhere, &[]).await;
    assert!(
        matches!(&r.status, Err(IoError::Runtime(m)) if m.contains("no-such-dir")),
        "{:?} {}",
        r.status,
        r.stderr
    );
    assert!(
        r.stderr.is_empty(),
        "crun's message is not streamed as output"
    );

    // Bad input: refused with a clear error.
    let mut bad = spec(&["true"]);
    bad.timeout = Duration::ZERO;
    let (_c, ctl_rx) = mpsc::channel(1);
    let (out_tx, _o) = mpsc::channel(1);
    assert!(matches!(
        rt.exec(id, bad, ctl_rx, out_tx).await,
        Err(IoError::Invalid(_))
    ));
    let (_c, ctl_rx) = mpsc::channel(1);
    let (out_tx, _o) = mpsc::channel(1);
    let missing = rt
        .exec(SandboxId::new(20, 99), spec(&["true"]), ctl_rx, out_tx)
        .await;
    assert!(matches!(missing, Err(IoError::NoSandbox(_))), "{missing:?}");
    rt.pause(id).await.expect("pause");
    let (_c, ctl_rx) = mpsc::channel(1);
    let (out_tx, _o) = mpsc::channel(1);
    let paused = rt.exec(id, spec(&["true"]), ctl_rx, out_tx).await;
    assert!(
        matches!(paused, Err(IoError::NotRunning { .. })),
        "{paused:?}"
    );
    rt.resume(id).await.expect("resume");
    cleanup(&rt, &data, &[id]).await;
}

#[tokio::test]
async fn timeout_and_cancel_kill_the_whole_tree_and_leave_no_zombie() {
    let Some((rt, data)) = runtime("io-kill") else {
        return;
    };
    let id = long_lived(&rt, 21, 0).await;
    let mut s = spec(&[
        "sh",
        "-c",
        "sleep 100 & setsid sleep 100 & (sleep 100 &); sleep 100",
    ]);
    s.timeout = Duration::from_millis(700);
    let r = run(&rt, id, s, &[]).await;
    let st = r.status.expect("exec");
    // Killed at its timeout (it would sleep 100 s): the status says so, no clock needed.
    assert!(st.timed_out, "{st:?}");
    assert_eq!((st.code, st.signal), (137, Some(9)));
    let left = settles(&rt, id, "sleep").await;
    assert!(left.is_empty(), "the tree and no zombie is left: {left:?}");
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Running,
        "PID 1 lives"
    );

    // Cancel: the caller drops the output receiver.
    let (_ctl_tx, ctl_rx) = mpsc::channel(1);
    let (out_tx, out_rx) = mpsc::channel(1);
    let drop_later = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !processes(&rt, id).iter().all(|(_, _, c)| c != "sleep"),
            "it runs"
        );
        drop(out_rx);
    };
    let (res, ()) = tokio::join!(
        rt.exec(
            id,
            spec(&["sh", "-c", "sleep 101 & sleep 101"]),
            ctl_rx,
            out_tx
        ),
        drop_later
    );
    assert!(res.is_err(), "{res:?}");
    let left = settles(&rt, id, "sleep").await;
    assert!(left.is_empty(), "cancel killed the tree: {left:?}");

    // Cancel: the exec future itself is dropped.
    let (_ctl_tx, ctl_rx) = mpsc::channel(1);
    let (out_tx, _out_rx) = mpsc::channel(1);
    tokio::select! {
        r = rt.exec(id, spec(&["sh", "-c", "sleep 102 & sleep 102"]), ctl_rx, out_tx) => panic!("ended: {r:?}"),
        () = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
    let left = settles(&rt, id, "sleep").await;
    assert!(
        left.is_empty(),
        "dropping the exec killed the tree: {left:?}"
    );
    assert_eq!(
        run(&rt, id, spec(&["true"]), &[])
            .await
            .status
            .expect("after")
            .code,
        0
    );
    cleanup(&rt, &data, &[id]).await;
}

#[tokio::test]
async fn a_thousand_concurrent_execs_are_capped_and_the_sandbox_is_fine() {
    let Some((rt, data)) = runtime("io-busy") else {
        return;
    };
    let id = long_lived(&rt, 22, 0).await;
    let rt = &rt;
    let one = move |_| async move {
        let (_c, ctl_rx) = mpsc::channel(1);
        let (out_tx, _o) = mpsc::channel(1);
        rt.exec(id, spec(&["sleep", "1"]), ctl_rx, out_tx).await
    };
    let results = futures::future::join_all((0..1000).map(one)).await;
    let ok = results
        .iter()
        .filter(|r| matches!(r, Ok(s) if s.code == 0))
        .count();
    let busy = results
        .iter()
        .filter(|r| matches!(r, Err(IoError::Busy(_))))
        .count();
    assert_eq!(ok + busy, 1000, "every exec ran or was refused as busy");
    assert!((1..=2 * EXECS_PER_SANDBOX_MAX).contains(&ok), "{ok} ran");
    assert!(busy >= 1000 - 2 * EXECS_PER_SANDBOX_MAX, "{busy} refused");
    assert_eq!(
        run(rt, id, spec(&["true"]), &[])
            .await
            .status
            .expect("after")
            .code,
        0
    );
    assert!(settles(rt, id, "sleep").await.is_empty());
    cleanup(rt, &data, &[id]).await;
}

#[tokio::test]
async fn a_long_lived_sandbox_reaps_orphans_stops_cleanly_and_survives_a_restart() {
    let Some((first, data)) = runtime("io-long") else {
        return;
    };
    let id = long_lived(&first, 23, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        first.status(id).await.expect("status").state,
        ObservedState::Running
    );
    let r = run(&first, id, spec(&["sh", "-c", "sleep 1 &"]), &[]).await;
    assert_eq!(r.status.expect("exec").code, 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ps = processes(&first, id);
    assert!(
        ps.iter().all(|(_, s, _)| s != "Z"),
        "orphans are reaped: {ps:?}"
    );
    assert!(ps.iter().all(|(_, _, c)| c != "sleep"), "{ps:?}");
    drop(first); // the daemon restarts

    let second = ContainerRuntime::new(ContainerConfig::new(&data)).expect("second instance");
    assert_eq!(
        second.list().await.expect("list")[0].state,
        ObservedState::Running
    );
    let r = run(&second, id, spec(&["sh", "-c", "echo again; id -u"]), &[]).await;
    assert_eq!(r.stdout, "again\n1000\n", "{}", r.stderr);
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let size = second
        .read_file(id, "/etc/passwd".into(), tx)
        .await
        .expect("read after restart");
    assert!(size > 0 && rx.recv().await.is_some());
    let anchor = second
        .crun_exec_command(id, &["id".to_owned(), "-u".to_owned()])
        .await
        .expect("anchor")
        .output()
        .expect("run crun exec");
    assert_eq!(
        String::from_utf8_lossy(&anchor.stdout),
        "1000\n",
        "{anchor:?}"
    );
    let t0 = Instant::now();
    let report = second
        .stop(id, Duration::from_secs(10))
        .await
        .expect("stop");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stopped on SIGTERM, not after the grace"
    );
    assert_eq!(report.code, Some(0), "{report:?}");
    // Ended: exec and files say so.
    let (_c, ctl_rx) = mpsc::channel(1);
    let (out_tx, _o) = mpsc::channel(1);
    let ended = second.exec(id, spec(&["true"]), ctl_rx, out_tx).await;
    assert!(
        matches!(ended, Err(IoError::NotRunning { .. })),
        "{ended:?}"
    );
    assert!(matches!(
        read(&second, id, "/etc/passwd").await,
        Err(IoError::NotRunning { .. })
    ));
    cleanup(&second, &data, &[id]).await;
}

// ---- files ----

async fn write(
    rt: &ContainerRuntime,
    id: SandboxId,
    path: &str,
    data: &[u8],
    parents: bool,
) -> Result<u64, IoError> {
    let (tx, rx) = mpsc::channel(4);
    let spec = WriteSpec {
        path: path.into(),
        mode: 0o640,
        make_parents: parents,
    };
    let chunks: Vec<Bytes> = data
        .chunks(CHUNK_BYTES)
        .map(Bytes::copy_from_slice)
        .collect();
    let send = async move {
        for c in chunks {
            if tx.send(c).await.is_err() {
                return;
            }
        }
    };
    let (r, ()) = tokio::join!(rt.write_file(id, spec, rx), send);
    r
}

async fn read(rt: &ContainerRuntime, id: SandboxId, path: &str) -> Result<Vec<u8>, IoError> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let collect = async {
        let mut v = Vec::new();
        while let Some(b) = rx.recv().await {
            v.extend_from_slice(&b);
        }
        v
    };
    let (r, v) = tokio::join!(rt.read_file(id, path.into(), tx), collect);
    r.map(|n| {
        assert_eq!(n, u64::try_from(v.len()).expect("len"));
        v
    })
}

async fn stream_in(chunks: Vec<u8>) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        for c in chunks.chunks(CHUNK_BYTES) {
            if tx.send(Bytes::copy_from_slice(c)).await.is_err() {
                return;
            }
        }
    });
    rx
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).expect("small").wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn files_round_trip_owned_by_the_sandbox_user() {
    let Some((rt, data)) = runtime("io-files") else {
        return;
    };
    let id = long_lived(&rt, 24, 0).await;
    let big = pattern(300_000, 7);
    assert_eq!(
        write(&rt, id, "/work/a.bin", &big, false)
            .await
            .expect("write"),
        300_000
    );
    assert_eq!(read(&rt, id, "/work/a.bin").await.expect("read"), big);
    // /tmp is a tmpfs of the sandbox's mount namespace: written from the host, seen inside.
    write(&rt, id, "/tmp/deep/er/t.txt", b"in tmpfs", true)
        .await
        .expect("write with parents");
    let r = run(
        &rt,
        id,
        spec(&[
            "sh",
            "-c",
            "cat /tmp/deep/er/t.txt; stat -c '%u:%g %a' /tmp/deep/er/t.txt /tmp/deep",
        ]),
        &[],
    )
    .await;
    assert_eq!(
        r.stdout, "in tmpfs1000:1000 640\n1000:1000 755\n",
        "{}",
        r.stderr
    );
    // Replaced atomically, no temporary file left.
    write(&rt, id, "/work/a.bin", b"short", false)
        .await
        .expect("rewrite");
    let listing = rt.list_dir(id, "/work".into()).await.expect("list");
    let names: Vec<&str> = listing.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["a.bin"], "{listing:?}");
    assert_eq!(
        (
            listing.entries[0].size,
            listing.entries[0].uid,
            listing.entries[0].mode
        ),
        (5, 1000, 0o640)
    );
    assert!(matches!(
        read(&rt, id, "/work/nope").await,
        Err(IoError::NotFound { .. })
    ));
    assert!(matches!(
        read(&rt, id, "/work").await,
        Err(IoError::WrongKind { .. })
    ));
    assert!(
        write(&rt, id, "/work/x/y", b"", false).await.is_err(),
        "no parents without make_parents"
    );

    // A directory travels as a tar stream, both ways.
    let mut b = tar::Builder::new(Vec::new());
    let files = [
        ("top.txt", pattern(1000, 1)),
        ("sub/inner.bin", pattern(70_000, 2)),
        ("sub/deeper/e", Vec::new()),
    ];
    for (name, content) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(u64::try_from(content.len()).expect("len"));
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, name, &content[..]).expect("append");
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "link", "sub/inner.bin")
        .expect("link");
    let archive = b.into_inner().expect("archive");
    let stats = rt
        .upload(id, "/work/up".into(), stream_in(archive).await)
        .await
        .expect("upload");
    assert_eq!((stats.files, stats.bytes), (3, 71_000));
    let r = run(
        &rt,
        id,
        spec(&[
            "sh",
            "-c",
            "cd /work/up && stat -c '%n %u:%g %a' top.txt sub sub/inner.bin && readlink link",
        ]),
        &[],
    )
    .await;
    assert_eq!(
        r.stdout,
        "top.txt 1000:1000 600\nsub 1000:1000 755\nsub/inner.bin 1000:1000 600\nsub/inner.bin\n",
        "{}",
        r.stderr
    );
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let got = async {
        let mut v = Vec::new();
        while let Some(b) = rx.recv().await {
            v.extend_from_slice(&b);
        }
        v
    };
    let (sent, tarball) = tokio::join!(rt.download(id, "/work/up".into(), tx), got);
    assert_eq!(
        sent.expect("download"),
        u64::try_from(tarball.len()).expect("len")
    );
    let mut back = BTreeMap::new();
    for e in tar::Archive::new(&tarball[..]).entries().expect("entries") {
        let mut e = e.expect("entry");
        let path = e.path().expect("path").display().to_string();
        let mut content = Vec::new();
        e.read_to_end(&mut content).expect("content");
        back.insert(
            path.trim_end_matches('/').to_owned(),
            (e.header().entry_type(), content),
        );
    }
    for (name, content) in &files {
        assert_eq!(&back[*name].1, content, "{name} round trips");
    }
    assert_eq!(back["link"].0, tar::EntryType::Symlink);
    assert_eq!(back["sub"].0, tar::EntryType::Directory);
    // A single file travels as one member named after it.
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let got = async {
        let mut v = Vec::new();
        while let Some(b) = rx.recv().await {
            v.extend_from_slice(&b);
        }
        v
    };
    let (sent, one) = tokio::join!(rt.download(id, "/work/a.bin".into(), tx), got);
    sent.expect("download a file");
    let mut members = tar::Archive::new(&one[..]);
    let mut entries = members.entries().expect("entries");
    let mut e = entries.next().expect("one member").expect("entry");
    assert_eq!(e.path().expect("path").display().to_string(), "a.bin");
    let mut content = String::new();
    e.read_to_string(&mut content).expect("content");
    assert_eq!(content, "short");
    cleanup(&rt, &data, &[id]).await;
}

/// A raw tar member with any name and type (the tar crate refuses to write some of these).
fn raw_member(name: &str, kind: tar::EntryType, link: &str) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn archive_of(members: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = members.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[tokio::test]
async fn symlinks_and_dot_dots_never_reach_the_host() {
    let Some((rt, data)) = runtime("io-escape") else {
        return;
    };
    let id = long_lived(&rt, 25, 0).await;
    let secret = data.join("host-secret");
    std::fs::write(&secret, "HOST").expect("host file");
    let host_passwd = std::fs::read("/etc/passwd").expect("host passwd");
    let script = format!(
        "ln -s /etc /work/etc-link && ln -s {s} /work/secret-link && ln -s {d} /work/data-link && ln -s / /work/root-link",
        s = secret.display(),
        d = data.display()
    );
    assert_eq!(
        run(&rt, id, spec(&["sh", "-c", &script]), &[])
            .await
            .status
            .expect("ln")
            .code,
        0
    );
    // Reads resolve inside the sandbox: its own /etc/passwd, never the host's; host paths
    // do not exist there.
    let passwd = read(&rt, id, "/work/etc-link/passwd")
        .await
        .expect("the sandbox's passwd");
    assert_ne!(passwd, host_passwd);
    assert!(matches!(
        read(&rt, id, "/work/secret-link").await,
        Err(IoError::NotFound { .. })
    ));
    let dotdot = format!("/../../../../..{}", secret.display());
    assert!(matches!(
        read(&rt, id, &dotdot).await,
        Err(IoError::NotFound { .. })
    ));
    let through_root = format!("/work/root-link/../..{}", secret.display());
    assert!(read(&rt, id, &through_root).await.is_err());
    assert!(
        read(&rt, id, "/proc/1/root/etc/passwd").await.is_err(),
        "magic links are refused"
    );
    // Writes too: through a dir link to a host path, over a link to a host file.
    let via_dir = format!("/work/data-link/{}", "host-secret");
    assert!(write(&rt, id, &via_dir, b"PWNED", false).await.is_err());
    write(&rt, id, "/work/secret-link", b"replaced", false)
        .await
        .expect("replace the link");
    assert_eq!(
        std::fs::read_to_string(&secret).expect("host file"),
        "HOST",
        "the host file is untouched"
    );
    let r = run(
        &rt,
        id,
        spec(&[
            "sh",
            "-c",
            "cat /work/secret-link; [ -L /work/secret-link ] || echo ' not a link'",
        ]),
        &[],
    )
    .await;
    assert_eq!(r.stdout, "replaced not a link\n");
    // As the sandbox's user: root-owned places of the sandbox stay closed to the API too.
    assert!(write(&rt, id, "/etc/surge-root-only", b"x", false)
        .await
        .is_err());
    assert!(!data
        .join("sandboxes")
        .join(id.to_string())
        .join("upper/etc/surge-root-only")
        .exists());

    // Uploads: absolute paths, `..`, device files, and writing through a link are refused.
    for (what, member) in [
        (
            "absolute",
            raw_member("/etc/evil", tar::EntryType::Regular, ""),
        ),
        (
            "dot-dot",
            raw_member("../../evil", tar::EntryType::Regular, ""),
        ),
        ("device", raw_member("dev-null", tar::EntryType::Char, "")),
        (
            "hard link",
            raw_member("hard", tar::EntryType::Link, "/etc/passwd"),
        ),
    ] {
        let r = rt
            .upload(
                id,
                "/work/up".into(),
                stream_in(archive_of(&[member])).await,
            )
            .await;
        assert!(matches!(r, Err(IoError::BadArchive(_))), "{what}: {r:?}");
    }
    let through = archive_of(&[
        raw_member("l", tar::EntryType::Symlink, "/etc"),
        raw_member("l/evil", tar::EntryType::Regular, ""),
    ]);
    let r = rt
        .upload(id, "/work/up2".into(), stream_in(through).await)
        .await;
    assert!(
        matches!(r, Err(IoError::BadArchive(ref m)) if m.contains("symlink")),
        "{r:?}"
    );
    let up = data.join("sandboxes").join(id.to_string()).join("upper");
    assert!(!up.join("etc/evil").exists() && !Path::new("/etc/evil").exists());
    cleanup(&rt, &data, &[id]).await;
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// `cargo test --workspace --lib -- --ignored --nocapture exec_latency`: exec of `true` through
/// `SandboxIo::exec` vs the anchor (`crun exec --process` of the same sandbox), and a 1 KiB file
/// written and read back.
#[tokio::test]
#[ignore = "benchmark: prints exec latencies"]
async fn exec_latency() {
    const N: usize = 100;
    let Some((rt, data)) = runtime("io-latency") else {
        return;
    };
    let id = long_lived(&rt, 26, 0).await;
    let (mut api, mut anchor, mut files) = (Vec::new(), Vec::new(), Vec::new());
    let mut cmd = rt
        .crun_exec_command(id, &["true".to_owned()])
        .await
        .expect("anchor");
    cmd.stdout(std::process::Stdio::null());
    for _ in 0..N {
        let t0 = Instant::now();
        assert_eq!(
            run(&rt, id, spec(&["true"]), &[])
                .await
                .status
                .expect("exec")
                .code,
            0
        );
        api.push(t0.elapsed());
        let t0 = Instant::now();
        assert!(cmd.status().expect("crun exec").success());
        anchor.push(t0.elapsed());
        let t0 = Instant::now();
        write(&rt, id, "/work/f", &[7u8; 1024], false)
            .await
            .expect("write");
        assert_eq!(read(&rt, id, "/work/f").await.expect("read").len(), 1024);
        files.push(t0.elapsed());
    }
    for v in [&mut api, &mut anchor, &mut files] {
        v.sort();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (name, v) in [
        ("SandboxIo::exec `true`", &api),
        ("crun exec --process `true`", &anchor),
        ("write + read 1 KiB", &files),
    ] {
        eprintln!(
            "{name:<32} p50 {:>7.2} ms   p99 {:>7.2} ms",
            ms(percentile(v, 50)),
            ms(percentile(v, 99))
        );
    }
    eprintln!(
        "exec ratio (API / crun exec): p50 {:.2}, p99 {:.2}",
        ms(percentile(&api, 50)) / ms(percentile(&anchor, 50)),
        ms(percentile(&api, 99)) / ms(percentile(&anchor, 99))
    );
    cleanup(&rt, &data, &[id]).await;
}
