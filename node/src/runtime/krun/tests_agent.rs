//! The guest agent in the krun runtime: the VM configuration that boots it, the agent socket
//! wired through libkrun, the node's error mapping, and exec and files through `SandboxIo`
//! end to end with a fake VM process that runs the real `surge-guest` against the VM's root
//! (what a microVM would do, minus the VM: this host cannot boot one).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::super::io::from_agent;
use super::*;
use crate::runtime::io::{ExecOutput, ExecSpec, IoError, SandboxIo, WriteSpec};

#[test]
fn the_agent_is_the_workload_and_its_socket_is_wired() {
    let s = spec(&["/bin/echo", "hi"], &[]);
    let mut p = params(&s, Path::new("/d"));
    p.agent = Some((1000, 1000));
    let cfg = build(&p).expect("config");
    assert_eq!(cfg.exec, vm::GUEST_AGENT_PATH);
    assert_eq!(
        cfg.args,
        [
            "--init",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--vsock-port",
            "1024",
            "--",
            "/bin/echo",
            "hi"
        ]
    );
    assert_eq!(cfg.agent_socket, Some(PathBuf::from("/d/agent.sock")));
    let api = Recorder::default();
    assert_eq!(configure(&api, &cfg), Ok(7));
    assert_eq!(
        api.calls.borrow().last().map(String::as_str),
        Some("add_vsock_port2 7 1024 /d/agent.sock true"),
        "the guest listens, the host connects"
    );
    // No command: the agent stays up (a long-lived sandbox).
    let empty = spec(&[], &[]);
    let mut p = params(&empty, Path::new("/d"));
    p.agent = Some((1000, 1000));
    let cfg = build(&p).expect("config");
    assert!(!cfg.args.iter().any(|a| a == "--"), "{:?}", cfg.args);
    // A socket path the kernel cannot bind is refused up front.
    let long = PathBuf::from(format!("/{}", "d".repeat(120)));
    let mut p = params(&s, &long);
    p.agent = Some((1000, 1000));
    assert!(build(&p)
        .expect_err("too long")
        .to_string()
        .contains("unix socket"));
    // A libkrun without krun_add_vsock_port2 is named.
    let api = Recorder {
        fail: Some(("add_vsock_port2", libc::ENOSYS)),
        ..Recorder::default()
    };
    let cfg = build(&{
        let mut p = params(&s, Path::new("/d"));
        p.agent = Some((1000, 1000));
        p
    })
    .expect("config");
    let err = configure(&api, &cfg).expect_err("no vsock");
    assert!(err.to_string().contains("krun_add_vsock_port2"), "{err}");
    // A vm.json of an older build (no agent socket) still reads.
    let old = r#"{"root":"/r","workdir":"/","exec":"/bin/sh","args":[],"env":[],"vcpus":1,"ram_mib":512,"console":"/c","krunfw":null,"libkrun":null,"entered_marker":"/e","setup_error":"/s","log_level":1}"#;
    let cfg: VmConfig = serde_json::from_str(old).expect("old vm.json");
    assert_eq!(cfg.agent_socket, None);
}

#[test]
fn agent_errors_map_to_io_errors() {
    use surge_guest::client::ClientError;
    use surge_guest::proto::ErrorKind;
    let agent = |kind| ClientError::Agent {
        kind,
        message: "m".into(),
    };
    assert!(matches!(
        from_agent(ID, "/x", agent(ErrorKind::NotFound)),
        IoError::NotFound { path } if path == "/x"
    ));
    assert!(matches!(
        from_agent(ID, "/x", agent(ErrorKind::BadArchive)),
        IoError::BadArchive(_)
    ));
    assert!(matches!(
        from_agent(ID, "/x", agent(ErrorKind::TooLarge)),
        IoError::TooLarge(_)
    ));
    assert!(matches!(
        from_agent(ID, "/x", agent(ErrorKind::Busy)),
        IoError::Busy(_)
    ));
    let late = from_agent(ID, "", ClientError::Timeout(Duration::from_secs(5))).to_string();
    assert!(
        late.contains("the guest agent of sandbox 42.7 did not answer within 5s"),
        "{late}"
    );
}

/// Plays vm-exec with an agent: runs the real agent against the VM's root, serving the unix
/// socket libkrun would have mapped to its vsock port.
const FAKE_VM_WITH_AGENT: &str = r#"
dir=$(dirname "$2")
root=$(sed -n 's/.*"root": *"\([^"]*\)".*/\1/p' "$2")
: > "$dir/entered"
exec "$root/.surge/surge-guest" --root "$root" --listen-unix "$dir/agent.sock" --uid 1000 --gid 1000
"#;

fn built_agent() -> Option<PathBuf> {
    // target/<profile>/deps/<test binary> -> target/<profile>/surge-guest
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("surge-guest");
    path.is_file().then_some(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_files_through_the_agent_of_a_fake_vm() {
    use std::os::unix::fs::PermissionsExt;
    let Some(fx) = Fixture::new("agent") else {
        return;
    };
    let Some(agent) = built_agent() else {
        crate::testing::unavailable(
            "exec_and_files_through_the_agent_of_a_fake_vm: surge-guest is not built (cargo build --workspace)",
        );
        return;
    };
    for d in [
        fx.data.clone(),
        fx.data.join("templates"),
        fx.data.join("templates/t"),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let config = KrunConfig {
        data_dir: fx.data.clone(),
        program: PathBuf::from("/bin/sh"),
        program_args: vec!["-c".into(), FAKE_VM_WITH_AGENT.into(), "fake-vm".into()],
        cgroup_parent: fx.parent.clone(),
        krunfw: None,
        libkrun: None,
        overlay: false,
        agent: Some(agent),
    };
    let rt = KrunRuntime::with_layout(config, fx.layout.clone()).expect("runtime");
    let id = SandboxId::new(9, 60);
    let mut r = req(60, "unused");
    r.spec.command = Vec::new();
    rt.start(r).await.expect("start");

    let exec = |command: &str| ExecSpec {
        command: vec!["/bin/sh".into(), "-c".into(), command.into()],
        env: BTreeMap::new(),
        cwd: None,
        timeout: Duration::from_secs(20),
        stdin: false,
    };
    // The agent may take a moment to listen: the first call retries until it answers.
    let mut answered = None;
    for _ in 0..100 {
        let (_c, ctl) = mpsc::channel(1);
        let (tx, mut rx) = mpsc::channel(64);
        match rt
            .exec(id, exec("id -u; echo err >&2; exit 7"), ctl, tx)
            .await
        {
            Ok(status) => {
                let mut out = String::new();
                let mut err = String::new();
                while let Ok(o) = rx.try_recv() {
                    match o {
                        ExecOutput::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
                        ExecOutput::Stderr(b) => err.push_str(&String::from_utf8_lossy(&b)),
                    }
                }
                answered = Some((status, out, err));
                break;
            }
            Err(IoError::Runtime(m)) if m.contains("did not answer") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("exec: {e}"),
        }
    }
    let (status, out, err) = answered.expect("the agent answers within 5 s");
    assert_eq!(status.code, 7);
    assert_eq!(out, "1000\n", "as the sandbox's user");
    assert_eq!(err, "err\n");

    let (tx, rx) = mpsc::channel(1);
    tx.send(Bytes::from_static(b"through the agent"))
        .await
        .expect("send");
    drop(tx);
    let spec = WriteSpec {
        path: "/work/note.txt".into(),
        mode: 0o644,
        make_parents: true,
    };
    assert_eq!(rt.write_file(id, spec, rx).await.expect("write"), 17);
    let (tx, mut rx) = mpsc::channel(4);
    assert_eq!(
        rt.read_file(id, "/work/note.txt".into(), tx)
            .await
            .expect("read"),
        17
    );
    assert_eq!(
        rx.recv().await,
        Some(Bytes::from_static(b"through the agent"))
    );
    let listing = rt.list_dir(id, "/work".into()).await.expect("list");
    assert_eq!(listing.entries.len(), 1);
    assert_eq!(
        (listing.entries[0].uid, listing.entries[0].gid),
        (1000, 1000)
    );
    let err = rt
        .read_file(id, "/work/missing".into(), mpsc::channel(1).0)
        .await
        .expect_err("missing");
    assert!(matches!(err, IoError::NotFound { .. }), "{err}");

    // Another sandbox id is not here; a stopped one takes no exec.
    let (_c, ctl) = mpsc::channel(1);
    let err = rt
        .exec(SandboxId::new(9, 61), exec("true"), ctl, mpsc::channel(1).0)
        .await
        .expect_err("no such sandbox");
    assert!(matches!(err, IoError::NoSandbox(_)), "{err}");
    rt.stop(id, Duration::from_secs(2)).await.expect("stop");
    let (_c, ctl) = mpsc::channel(1);
    let err = rt
        .exec(id, exec("true"), ctl, mpsc::channel(1).0)
        .await
        .expect_err("stopped");
    assert!(matches!(err, IoError::NotRunning { .. }), "{err}");
    rt.remove(id).await.expect("remove");
}

/// The agent in a real microVM: exec and files of a booted guest. Runs where hardware
/// virtualization can boot a guest (never on this build machine) and a static agent is given
/// (`SURGE_TEST_GUEST_AGENT=/path/to/surge-guest`, from guest/scripts/build-static).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_a_microvm_and_exec_through_its_agent() {
    let virt = crate::detect::detect_virtualization();
    let Some(fx) = Fixture::new("bootagent") else {
        return;
    };
    let host = KrunHost::probe(&fx.data);
    if let Some(why) = unavailable_reason(&virt, &host) {
        // A hardware limit, as in `boot_a_microvm`: no setup makes this host boot a guest.
        eprintln!("SKIPPED boot_a_microvm_and_exec_through_its_agent: this host cannot boot a microVM: {why}");
        return;
    }
    let Some(agent) = std::env::var_os("SURGE_TEST_GUEST_AGENT").map(PathBuf::from) else {
        crate::testing::unavailable(
            "boot_a_microvm_and_exec_through_its_agent: set SURGE_TEST_GUEST_AGENT to a static surge-guest (guest/scripts/build-static)",
        );
        return;
    };
    let exe = std::env::current_exe().expect("test binary");
    Templates::new(&fx.data)
        .ensure_busybox()
        .expect("busybox template");
    let config = KrunConfig {
        data_dir: fx.data.clone(),
        program: PathBuf::from("/bin/sh"),
        program_args: vec![
            "-c".into(),
            r#"SURGE_VM_EXEC_CONFIG="$2" exec "$0" runtime::krun::tests::vm_exec_child --exact --include-ignored --nocapture"#.into(),
            exe.into_os_string(),
        ],
        cgroup_parent: fx.parent.clone(),
        krunfw: host.krunfw.clone(),
        libkrun: host.libkrun.clone().ok().flatten(),
        overlay: true,
        agent: Some(agent),
    };
    let rt = KrunRuntime::with_layout(config, fx.layout.clone()).expect("runtime");
    let id = SandboxId::new(9, 41);
    let mut r = req(41, "unused");
    r.spec.template = DEFAULT_TEMPLATE.into();
    r.spec.command = Vec::new();
    rt.start(r).await.expect("boot");
    let mut out = None;
    for _ in 0..200 {
        let (_c, ctl) = mpsc::channel(1);
        let (tx, mut rx) = mpsc::channel(16);
        let spec = ExecSpec {
            command: vec!["/bin/sh".into(), "-c".into(), "id -u; uname -s".into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout: Duration::from_secs(20),
            stdin: false,
        };
        match rt.exec(id, spec, ctl, tx).await {
            Ok(status) => {
                assert_eq!(status.code, 0);
                let mut text = String::new();
                while let Ok(ExecOutput::Stdout(b)) = rx.try_recv() {
                    text.push_str(&String::from_utf8_lossy(&b));
                }
                out = Some(text);
                break;
            }
            Err(IoError::Runtime(m)) if m.contains("did not answer") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("exec in the microVM: {e}"),
        }
    }
    assert_eq!(out.as_deref(), Some("1000\nLinux\n"));
    rt.stop(id, Duration::from_secs(5)).await.expect("stop");
    rt.remove(id).await.expect("remove");
}
