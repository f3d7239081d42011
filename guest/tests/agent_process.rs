//! The host client driving a real `surge-guest` process over a unix socket: exec and files end
//! to end, minus the VM (the agent serves `--listen-unix` instead of vsock, against a temp dir
//! root, and runs this host's `sh`). As root, the agent runs execs as uid/gid 1000 and the test
//! checks what an exec'd process has: that uid, no capabilities, `no_new_privs`.

use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use surge_guest::client::{Client, Control, Output};
use surge_guest::proto::{ExecRequest, ExitStatus, WriteRequest};
use tokio::sync::mpsc;

const USER: (u32, u32) = (1000, 1000);

struct Agent {
    child: Child,
    root: tempfile::TempDir,
    client: Client,
    as_root: bool,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid only returns this process's effective uid.
    unsafe { libc::geteuid() == 0 }
}

async fn start() -> Agent {
    let root = tempfile::tempdir().expect("root");
    let sock_dir = tempfile::tempdir().expect("socket dir");
    let sock = sock_dir.path().join("agent.sock");
    let as_root = is_root();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_surge-guest"));
    cmd.arg("--root")
        .arg(root.path())
        .arg("--listen-unix")
        .arg(&sock);
    if as_root {
        // The sandbox's user must be able to enter the root.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod root");
        cmd.args(["--uid", &USER.0.to_string(), "--gid", &USER.1.to_string()]);
    }
    let child = cmd.spawn().expect("start surge-guest");
    let mut stream = None;
    for _ in 0..250 {
        if let Ok(s) = tokio::net::UnixStream::connect(&sock).await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stream = stream.expect("the agent listens within 5 s");
    let client = Client::connect(stream, Duration::from_secs(5))
        .await
        .expect("hello");
    std::mem::forget(sock_dir); // the socket lives as long as the agent; the dir is tiny
    Agent {
        child,
        root,
        client,
        as_root,
    }
}

async fn run(client: &Client, script: &str, timeout_ms: u64) -> (String, String, ExitStatus) {
    let spec = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: None,
        timeout_ms,
        stdin: false,
    };
    let (_c, ctl) = mpsc::channel::<Control>(1);
    let (tx, mut rx) = mpsc::channel::<Output>(4096);
    let status = client.exec(spec, ctl, tx).await.expect("exec");
    let (mut out, mut err) = (String::new(), String::new());
    while let Ok(o) = rx.try_recv() {
        match o {
            Output::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
            Output::Stderr(b) => err.push_str(&String::from_utf8_lossy(&b)),
        }
    }
    (out, err, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_as_the_sandbox_user_without_privileges() {
    let a = start().await;
    let (out, _, status) = run(
        &a.client,
        "id -u; id -g; grep -E '^(NoNewPrivs|CapEff|CapPrm|CapBnd):' /proc/self/status",
        10_000,
    )
    .await;
    assert_eq!(status.code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    if a.as_root {
        assert_eq!(lines[0], USER.0.to_string());
        assert_eq!(lines[1], USER.1.to_string());
        for cap in ["CapEff", "CapPrm", "CapBnd"] {
            assert!(
                out.contains(&format!("{cap}:\t0000000000000000")),
                "{cap}: {out}"
            );
        }
    } else {
        eprintln!("not root: the exec runs as the test's own user; uid and caps not checked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs_exit_codes_and_timeouts_over_a_real_socket() {
    let a = Arc::new(start().await);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            run(
                &a.client,
                &format!("echo o{i}; echo e{i} >&2; sleep 0.2; exit {i}"),
                10_000,
            )
            .await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (out, err, status) = t.await.expect("join");
        assert_eq!((out, err), (format!("o{i}\n"), format!("e{i}\n")));
        assert_eq!(status.code, i32::try_from(i).expect("small"));
    }
    // A program that does not exist is an error of its own, and the agent (which reaps every
    // child) survives it.
    let (_c, ctl) = mpsc::channel::<Control>(1);
    let (tx, _rx) = mpsc::channel::<Output>(1);
    let missing = ExecRequest {
        argv: vec!["/no/such/program".into()],
        env: vec![],
        cwd: None,
        timeout_ms: 1_000,
        stdin: false,
    };
    let err = a
        .client
        .exec(missing, ctl, tx)
        .await
        .expect_err("no program");
    assert!(err.to_string().contains("/no/such/program"), "{err}");
    let (out, _, status) = run(&a.client, "sleep 30 & echo $!; wait", 300).await;
    assert!(status.timed_out);
    assert_eq!(status.signal, Some(9));
    let pid: u32 = out.trim().parse().expect("pid");
    let mut gone = false;
    for _ in 0..100 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or at most a zombie on its way to being reaped by the agent (a subreaper).
        if stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gone,
        "the timed-out command's background process {pid} survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_belong_to_the_sandbox_user_and_tar_round_trips() {
    let a = start().await;
    let (tx, rx) = mpsc::channel(2);
    tx.send(Bytes::from_static(b"hello ")).await.expect("send");
    tx.send(Bytes::from_static(b"agent")).await.expect("send");
    drop(tx);
    let spec = WriteRequest {
        path: "/work/dir/greeting.txt".into(),
        mode: 0o600,
        make_parents: true,
    };
    assert_eq!(a.client.write_file(spec, rx).await.expect("write"), 11);
    let on_disk = a.root.path().join("work/dir/greeting.txt");
    assert_eq!(std::fs::read(&on_disk).expect("file"), b"hello agent");
    let meta = std::fs::metadata(&on_disk).expect("meta");
    assert_eq!(meta.mode() & 0o777, 0o600);
    if a.as_root {
        assert_eq!(
            (meta.uid(), meta.gid()),
            USER,
            "files written belong to the sandbox's user"
        );
        let dir = std::fs::metadata(a.root.path().join("work/dir")).expect("dir");
        assert_eq!(
            (dir.uid(), dir.gid()),
            USER,
            "so do the directories made for it"
        );
        // The sandbox's user can read what was written for it.
        let (out, _, _) = run(&a.client, &format!("cat {}", on_disk.display()), 5_000).await;
        assert_eq!(out, "hello agent");
    }

    // Download the directory, upload it elsewhere, compare.
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let collect = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(b) = rx.recv().await {
            all.extend_from_slice(&b);
        }
        all
    });
    a.client
        .download("/work".into(), tx)
        .await
        .expect("download");
    let archive = collect.await.expect("join");
    let (tx, rx) = mpsc::channel(4);
    let chunks: Vec<Bytes> = archive.chunks(4096).map(Bytes::copy_from_slice).collect();
    tokio::spawn(async move {
        for c in chunks {
            let _ = tx.send(c).await;
        }
    });
    let (files, bytes) = a.client.upload("/copy".into(), rx).await.expect("upload");
    assert_eq!((files, bytes), (1, 11));
    assert_eq!(
        std::fs::read(a.root.path().join("copy/dir/greeting.txt")).expect("copied"),
        b"hello agent"
    );
    let (entries, truncated) = a.client.list_dir("/copy/dir".into()).await.expect("list");
    assert!(!truncated);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "greeting.txt");
}

/// 200 sequential execs of `true` through a real agent process: each exits 0; the latency is
/// printed (a figure, not an assertion: speed belongs in benchmarks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_execs_of_true() {
    let a = start().await;
    let mut took = Vec::new();
    for _ in 0..200 {
        let spec = ExecRequest {
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            timeout_ms: 10_000,
            stdin: false,
        };
        let (_c, ctl) = mpsc::channel::<Control>(1);
        let (tx, _rx) = mpsc::channel::<Output>(4);
        let t = std::time::Instant::now();
        let status = a.client.exec(spec, ctl, tx).await.expect("exec");
        took.push(t.elapsed());
        assert_eq!(status.code, 0);
    }
    took.sort();
    eprintln!(
        "exec of `true` through surge-guest over a unix socket: p50 {:?}, p99 {:?}",
        took[took.len() / 2],
        took[took.len() * 99 / 100]
    );
}
