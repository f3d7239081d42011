//! The protocol both ends against an in-memory channel (`tokio::io::duplex`): the agent runs in
//! this process (waiting only for its own children) against a temp dir root, running real `sh`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::agent::{Agent, AgentConfig, ReapMode};
use crate::client::{Client, ClientError, Control, Output};
use crate::proto::*;

const HELLO_WITHIN: Duration = Duration::from_secs(5);

struct Pair {
    client: Client,
    root: tempfile::TempDir,
}

async fn pair() -> Pair {
    let root = tempfile::tempdir().expect("temp root");
    let agent = Agent::new(AgentConfig {
        root: root.path().to_path_buf(),
        user: None,
        reap: ReapMode::Own,
    })
    .expect("agent");
    let (near, far) = tokio::io::duplex(256 * 1024);
    tokio::spawn(agent.serve(far));
    let client = Client::connect(near, HELLO_WITHIN).await.expect("hello");
    Pair { client, root }
}

fn spec(argv: &[&str], timeout_ms: u64) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        timeout_ms,
        stdin: false,
    }
}

struct Ran {
    stdout: String,
    stderr: String,
    status: ExitStatus,
}

async fn run(client: &Client, spec: ExecRequest) -> Ran {
    let (_ctl_tx, ctl_rx) = mpsc::channel::<Control>(4);
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(1024);
    let status = client.exec(spec, ctl_rx, out_tx).await.expect("exec");
    let (mut stdout, mut stderr) = (String::new(), String::new());
    while let Ok(o) = out_rx.try_recv() {
        match o {
            Output::Stdout(b) => stdout.push_str(&String::from_utf8_lossy(&b)),
            Output::Stderr(b) => stderr.push_str(&String::from_utf8_lossy(&b)),
        }
    }
    Ran {
        stdout,
        stderr,
        status,
    }
}

fn sh(script: &str) -> ExecRequest {
    spec(&["/bin/sh", "-c", script], 30_000)
}

// ---- framing ----

#[tokio::test]
async fn frames_round_trip_and_oversize_frames_are_refused() {
    let f = Frame::data(7, Stream::Stdout, Bytes::from_static(b"hello\0world"));
    let wire = encode(&f).expect("encode");
    let mut r = &wire[..];
    assert_eq!(read_frame(&mut r).await.expect("read"), Some(f));
    assert_eq!(read_frame(&mut r).await.expect("clean end"), None);

    let big = Frame::data(1, Stream::Stdout, Bytes::from(vec![0u8; CHUNK_BYTES + 1]));
    assert!(matches!(encode(&big), Err(ProtoError::TooLarge { .. })));
    let mut payload = Frame::new(Header::Eof { id: 1 });
    payload.payload = Bytes::from_static(b"x");
    assert!(
        matches!(encode(&payload), Err(ProtoError::TooLarge { .. })),
        "only data carries bytes"
    );
    let long = Frame::error(1, ErrorKind::Io, "x".repeat(200_000));
    assert!(
        matches!(encode(&long), Err(ProtoError::TooLarge { .. })),
        "per-kind cap"
    );

    // A length prefix over the cap is refused before anything is allocated or read.
    let huge = u32::try_from(FRAME_BYTES_MAX + 1)
        .expect("fits")
        .to_be_bytes();
    let mut r = &huge[..];
    assert!(matches!(
        read_frame(&mut r).await,
        Err(ProtoError::TooLarge { .. })
    ));
    // A truncated frame and garbage are errors, not hangs.
    let mut r = &wire[..wire.len() - 1];
    assert!(matches!(
        read_frame(&mut r).await,
        Err(ProtoError::Malformed(_))
    ));
    let mut junk = 8u32.to_be_bytes().to_vec();
    junk.extend_from_slice(&4u32.to_be_bytes());
    junk.extend_from_slice(b"{no}");
    let mut r = &junk[..];
    assert!(matches!(
        read_frame(&mut r).await,
        Err(ProtoError::Malformed(_))
    ));
}

#[tokio::test]
async fn unknown_versions_are_refused() {
    let root = tempfile::tempdir().expect("temp root");
    let agent = Agent::new(AgentConfig {
        root: root.path().to_path_buf(),
        user: None,
        reap: ReapMode::Own,
    })
    .expect("agent");
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(agent.clone().serve(far));
    write_frame(&mut near, &Frame::new(Header::Hello { version: 99 }))
        .await
        .expect("send");
    match read_frame(&mut near).await.expect("answer") {
        Some(Frame {
            header: Header::Error { kind, message, .. },
            ..
        }) => {
            assert_eq!(kind, ErrorKind::Protocol);
            assert!(message.contains("99"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(
        read_frame(&mut near).await.expect("closed").is_none(),
        "the agent hangs up"
    );
    assert!(matches!(
        served.await.expect("join"),
        Err(ProtoError::Version { .. })
    ));

    // A request before the hello is refused too.
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    tokio::spawn(agent.serve(far));
    write_frame(
        &mut near,
        &Frame::new(Header::ListDir {
            id: 1,
            path: "/".into(),
        }),
    )
    .await
    .expect("send");
    let answer = read_frame(&mut near)
        .await
        .expect("answer")
        .expect("a frame");
    assert!(matches!(
        answer.header,
        Header::Error {
            kind: ErrorKind::Protocol,
            ..
        }
    ));

    // And the client refuses an agent of another version.
    let (near, mut far) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let _ = read_frame(&mut far).await;
        let _ = write_frame(&mut far, &Frame::new(Header::Hello { version: 2 })).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let err = Client::connect(near, HELLO_WITHIN)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            ClientError::Proto(ProtoError::Version { theirs: 2, .. })
        ),
        "{err}"
    );
}

// ---- exec ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_are_separate_and_in_order() {
    let p = pair().await;
    let r = run(
        &p.client,
        sh("for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 3"),
    )
    .await;
    assert_eq!(r.stdout, "out1\nout2\nout3\n");
    assert_eq!(r.stderr, "err1\nerr2\nerr3\n");
    assert_eq!(r.status.code, 3);
    assert_eq!(r.status.signal, None);
    assert!(!r.status.timed_out);
    // More than one chunk, in order.
    let r = run(&p.client, sh("seq 1 100000")).await;
    let expected: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    assert!(
        r.stdout == expected,
        "{} bytes of output, {} expected",
        r.stdout.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_signals_env_and_cwd() {
    let p = pair().await;
    let r = run(&p.client, sh("kill -TERM $$")).await;
    assert_eq!((r.status.code, r.status.signal), (128 + 15, Some(15)));
    std::fs::create_dir(p.root.path().join("work")).expect("mkdir");
    let mut s = sh("echo $GREETING; pwd");
    s.env.push(("GREETING".into(), "hi".into()));
    s.cwd = Some("/work".into());
    let r = run(&p.client, s).await;
    let work = p.root.path().join("work");
    assert_eq!(r.stdout, format!("hi\n{}\n", work.display()));
    // A signal from the caller reaches the command.
    let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(4);
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(16);
    let client = &p.client;
    let exec = client.exec(sh("echo up; sleep 30"), ctl_rx, out_tx);
    let signal = async {
        assert!(matches!(out_rx.recv().await, Some(Output::Stdout(_))));
        ctl_tx.send(Control::Signal(9)).await.expect("send");
        std::future::pending::<()>().await
    };
    let status = tokio::select! { s = exec => s.expect("exec"), () = signal => unreachable!() };
    assert_eq!((status.code, status.signal), (137, Some(9)));
    // A missing program is a clear error, not a hang.
    let (_c, ctl_rx) = mpsc::channel::<Control>(1);
    let (out_tx, _o) = mpsc::channel::<Output>(1);
    let err = client
        .exec(spec(&["/no/such/program"], 1000), ctl_rx, out_tx)
        .await
        .expect_err("no program");
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{err}"
    );
    // Bad requests are refused by the agent itself.
    let (_c, ctl_rx) = mpsc::channel::<Control>(1);
    let (out_tx, _o) = mpsc::channel::<Output>(1);
    let err = client
        .exec(spec(&["true"], 0), ctl_rx, out_tx)
        .await
        .expect_err("timeout 0");
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::Invalid,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_streams_in() {
    let p = pair().await;
    let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(4);
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(1024);
    let mut s = sh("wc -c");
    s.stdin = true;
    let feeder = tokio::spawn(async move {
        for _ in 0..40 {
            ctl_tx
                .send(Control::Stdin(Bytes::from(vec![b'x'; 50_000])))
                .await
                .expect("stdin");
        }
        ctl_tx.send(Control::CloseStdin).await.expect("close");
    });
    let status = p.client.exec(s, ctl_rx, out_tx).await.expect("exec");
    feeder.await.expect("fed");
    assert_eq!(status.code, 0);
    let Some(Output::Stdout(b)) = out_rx.recv().await else {
        panic!("no output")
    };
    assert_eq!(String::from_utf8_lossy(&b).trim(), "2000000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_execs_share_one_connection() {
    let p = pair().await;
    let client = Arc::new(p.client);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            run(
                &c,
                sh(&format!(
                    "echo start {i}; sleep 0.3; echo end {i} >&2; exit {i}"
                )),
            )
            .await
        }));
    }
    let started = std::time::Instant::now();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.expect("join");
        assert_eq!(r.stdout, format!("start {i}\n"));
        assert_eq!(r.stderr, format!("end {i}\n"));
        assert_eq!(r.status.code, i32::try_from(i).expect("small"));
    }
    // Eight 0.3 s sleeps one after another would take 2.4 s.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}: not concurrent",
        started.elapsed()
    );
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for this purpose.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

async fn wait_dead(pid: i32) -> bool {
    for _ in 0..100 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_whole_group() {
    let p = pair().await;
    let mut s = sh("sleep 30 & echo $!; wait");
    s.timeout_ms = 300;
    let r = run(&p.client, s).await;
    assert!(r.status.timed_out);
    assert_eq!((r.status.code, r.status.signal), (137, Some(9)));
    let pid: i32 = r.stdout.trim().parse().expect("the background pid");
    assert!(
        wait_dead(pid).await,
        "the background sleep {pid} outlived the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_whole_group() {
    let p = pair().await;
    let client = Arc::new(p.client);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(4);
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(16);
    let c = client.clone();
    let exec = tokio::spawn(async move {
        let _keep = ctl_tx;
        c.exec(sh("sleep 30 & echo $!; wait"), ctl_rx, out_tx).await
    });
    let Some(Output::Stdout(b)) = out_rx.recv().await else {
        panic!("no pid")
    };
    let pid: i32 = String::from_utf8_lossy(&b).trim().parse().expect("pid");
    assert!(alive(pid));
    exec.abort(); // the caller went away: the Call is dropped, a Cancel goes out
    assert!(
        wait_dead(pid).await,
        "the background sleep {pid} outlived the cancel"
    );
    // The connection still works.
    assert_eq!(run(&client, sh("echo ok")).await.stdout, "ok\n");
}

// ---- files ----

async fn write(
    client: &Client,
    path: &str,
    data: &[u8],
    make_parents: bool,
) -> Result<u64, ClientError> {
    let (tx, rx) = mpsc::channel(4);
    let chunks: Vec<Bytes> = data.chunks(100_000).map(Bytes::copy_from_slice).collect();
    tokio::spawn(async move {
        for c in chunks {
            let _ = tx.send(c).await;
        }
    });
    let spec = WriteRequest {
        path: path.into(),
        mode: 0o640,
        make_parents,
    };
    client.write_file(spec, rx).await
}

async fn read(client: &Client, path: &str) -> Result<Vec<u8>, ClientError> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let collect = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(b) = rx.recv().await {
            all.extend_from_slice(&b);
        }
        all
    });
    let n = client.read_file(path.into(), tx).await?;
    let all = collect.await.expect("join");
    assert_eq!(n, all.len() as u64);
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip() {
    use std::os::unix::fs::MetadataExt;
    let p = pair().await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let n = write(&p.client, "/a/b/data.bin", &data, true)
        .await
        .expect("write");
    assert_eq!(n, data.len() as u64);
    assert_eq!(read(&p.client, "/a/b/data.bin").await.expect("read"), data);
    let meta = std::fs::metadata(p.root.path().join("a/b/data.bin")).expect("on disk");
    assert_eq!(meta.mode() & 0o777, 0o640);
    // Replaced atomically: no temp file is left beside it.
    write(&p.client, "/a/b/data.bin", b"short", false)
        .await
        .expect("rewrite");
    assert_eq!(
        read(&p.client, "/a/b/data.bin").await.expect("read"),
        b"short"
    );
    let (entries, truncated) = p.client.list_dir("/a/b".into()).await.expect("list");
    assert!(!truncated);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].name, "data.bin");
    assert_eq!(entries[0].kind, EntryKind::File);
    assert_eq!(entries[0].size, 5);
    // Without make_parents a missing directory is NotFound; a directory is not a file.
    let err = write(&p.client, "/nope/x", b"x", false)
        .await
        .expect_err("no parent");
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{err}"
    );
    let err = read(&p.client, "/a").await.expect_err("a directory");
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::WrongKind,
                ..
            }
        ),
        "{err}"
    );
    let err = read(&p.client, "/missing").await.expect_err("missing");
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{err}"
    );
    let err = read(&p.client, "relative").await.expect_err("relative");
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::Invalid,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_stay_in_the_root() {
    let p = pair().await;
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("secret"), b"host").expect("secret");
    std::os::unix::fs::symlink(outside.path(), p.root.path().join("link")).expect("symlink");
    let via_link = "/link/secret";
    let err = read(&p.client, via_link)
        .await
        .expect_err("resolved in the root");
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{err}"
    );
    let err = read(
        &p.client,
        &format!("/../../..{}", outside.path().join("secret").display()),
    )
    .await
    .expect_err("'..' stops at the root");
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{err}"
    );
    // A write through the link lands in the root, never outside it.
    let _ = write(&p.client, "/link/planted", b"x", true).await;
    assert!(!outside.path().join("planted").exists());
}

fn tar_of(members: &[(&[u8], tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in members {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        if *kind == tar::EntryType::Symlink {
            h.as_old_mut().linkname[..data.len()].copy_from_slice(data);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty()).expect("append");
        } else {
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
    }
    b.into_inner().expect("tar")
}

async fn upload(client: &Client, path: &str, tar: Vec<u8>) -> Result<(u64, u64), ClientError> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for c in tar.chunks(10_000) {
            let _ = tx.send(Bytes::copy_from_slice(c)).await;
        }
    });
    client.upload(path.into(), rx).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_up_and_down() {
    use tar::EntryType as T;
    let p = pair().await;
    let good = tar_of(&[
        (b"d", T::Directory, b""),
        (b"d/f.txt", T::Regular, b"hello"),
        (b"d/l", T::Symlink, b"f.txt"),
        (b"top.txt", T::Regular, b"top"),
    ]);
    let (files, bytes) = upload(&p.client, "/up", good).await.expect("upload");
    assert_eq!((files, bytes), (2, 8));
    assert_eq!(
        std::fs::read(p.root.path().join("up/d/f.txt")).expect("f"),
        b"hello"
    );
    assert_eq!(
        std::fs::read_link(p.root.path().join("up/d/l")).expect("l"),
        std::path::PathBuf::from("f.txt")
    );
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let collect = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(b) = rx.recv().await {
            all.extend_from_slice(&b);
        }
        all
    });
    p.client.download("/up".into(), tx).await.expect("download");
    let archive = collect.await.expect("join");
    let mut names = Vec::new();
    for e in tar::Archive::new(&archive[..]).entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = e.path().expect("path").display().to_string();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut e, &mut body).expect("body");
        names.push((name, body));
    }
    assert_eq!(
        names,
        vec![
            ("d".to_string(), String::new()),
            ("d/f.txt".to_string(), "hello".to_string()),
            ("d/l".to_string(), String::new()),
            ("top.txt".to_string(), "top".to_string()),
        ]
    );

    // Bad members are refused, each with a reason.
    for (bad, why) in [
        (tar_of(&[(b"/etc/evil", T::Regular, b"x")]), "absolute"),
        (tar_of(&[(b"a/../../evil", T::Regular, b"x")]), "'..'"),
        (tar_of(&[(b"dev", T::Char, b"")]), "Char"),
        (tar_of(&[(b"hard", T::Link, b"")]), "Link"),
        (
            tar_of(&[(b"esc", T::Symlink, b"/"), (b"esc/evil", T::Regular, b"x")]),
            "links may not leave",
        ),
    ] {
        let err = upload(&p.client, "/bad", bad).await.expect_err(why);
        assert!(
            matches!(&err, ClientError::Agent { kind: ErrorKind::BadArchive, message } if message.contains(why)),
            "{why}: {err}"
        );
    }
    assert!(!p.root.path().join("bad/evil").exists());
    assert!(!p.root.path().join("bad/dev").exists());
}
