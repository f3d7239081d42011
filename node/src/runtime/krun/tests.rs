//! Pure parts first (VM sizing, the explicit environment, the libkrun call sequence through a
//! recording fake, exit classification); then supervision with a fake VM process (a shell that
//! plays vm-exec: root and cgroups needed, skipped with a message otherwise); then real libkrun
//! (context setup when a libkrun is found, a boot test where hardware virtualization exists).

use std::cell::RefCell;
use std::ffi::{CStr, CString};

use super::exit::{classify, VmmStatus};
use super::ffi::{c_array, KrunApi, KRUN_ARRAY_SLOTS};
use super::vm::{
    build, configure, guest_env, guest_ram_mib, vcpus_for, VmConfig, VmError, VmParams,
};
use super::*;
use crate::detect::Virtualization;
use crate::runtime::{ObservedState, SandboxSpec};
use crate::template::DEFAULT_TEMPLATE;

fn spec(command: &[&str], env: &[(&str, &str)]) -> SandboxSpec {
    SandboxSpec {
        template: "t".into(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        cpu_millis: 1000,
        memory_mib: 256,
        user: String::new(),
        fork_of: None,
    }
}

const ID: SandboxId = SandboxId::new(42, 7);

#[test]
fn vcpus_round_up_and_ram_has_headroom() {
    assert_eq!(vcpus_for(0), 1);
    assert_eq!(vcpus_for(250), 1);
    assert_eq!(vcpus_for(1000), 1);
    assert_eq!(vcpus_for(1001), 2);
    assert_eq!(vcpus_for(3500), 4);
    assert_eq!(vcpus_for(u64::MAX), vm::VCPUS_MAX);
    // as much again, at least 256 MiB, at most 8 GiB
    assert_eq!(guest_ram_mib(100), Ok(356));
    assert_eq!(guest_ram_mib(512), Ok(1024));
    assert_eq!(guest_ram_mib(16_384), Ok(16_384 + 8192));
    assert!(matches!(guest_ram_mib(0), Err(VmError::Invalid(_))));
    assert!(matches!(guest_ram_mib(u64::MAX), Err(VmError::Invalid(_))));
}

#[test]
fn guest_environment_is_explicit() {
    // A host variable that must not reach the guest: the environment is built from the spec.
    let host_home = std::env::var("HOME").unwrap_or_default();
    let env =
        guest_env(ID, &spec(&[], &[("OPENAI_KEY", "k"), ("PATH", "/opt/bin")])).expect("valid env");
    assert_eq!(
        env,
        vec![
            "PATH=/opt/bin".to_owned(),
            "HOME=/root".to_owned(),
            "TERM=linux".to_owned(),
            "SURGE_SANDBOX_ID=42.7".to_owned(),
            "OPENAI_KEY=k".to_owned(),
        ]
    );
    if host_home != "/root" {
        assert!(!env.iter().any(|e| e.ends_with(&host_home)));
    }
    for bad in [
        ("", "v"),
        ("A=B", "v"),
        ("1X", "v"),
        ("X", "say \"hi\""),
        ("X", "a\nb"),
    ] {
        assert!(
            guest_env(ID, &spec(&[], &[bad])).is_err(),
            "{bad:?} must be refused"
        );
    }
}

fn params<'a>(s: &'a SandboxSpec, dir: &'a Path) -> VmParams<'a> {
    VmParams {
        id: ID,
        spec: s,
        cpu_millis: 1500,
        memory_mib: 512,
        root: Path::new("/data/vms/42.7/rootfs"),
        dir,
        krunfw: Some(Path::new("/k/libkrunfw.so.5")),
        libkrun: None,
        agent: None,
    }
}

#[test]
fn vm_config_from_a_sandbox() {
    let s = spec(&["/bin/echo", "hi", "there"], &[("A", "1")]);
    let cfg = build(&params(&s, Path::new("/data/vms/42.7"))).expect("config");
    assert_eq!(cfg.exec, "/bin/echo");
    assert_eq!(cfg.args, vec!["hi", "there"]);
    assert_eq!(cfg.vcpus, 2);
    assert_eq!(cfg.ram_mib, 1024);
    assert_eq!(cfg.console, PathBuf::from("/data/vms/42.7/console.log"));
    assert_eq!(cfg.env.last().map(String::as_str), Some("A=1"));
    // An empty command is the template's shell.
    let empty = spec(&[], &[]);
    assert_eq!(
        build(&params(&empty, Path::new("/d")))
            .expect("config")
            .exec,
        "/bin/sh"
    );
    // What does not fit on the guest kernel's command line is refused up front.
    let long = "x".repeat(vm::GUEST_CMDLINE_BYTES_MAX);
    let s = spec(&["/bin/true"], &[("BIG", long.as_str())]);
    let err = build(&params(&s, Path::new("/d"))).expect_err("too long");
    assert!(
        err.to_string().contains("guest kernel command line"),
        "{err}"
    );
    let s = spec(&["/bin/echo", "a\"b"], &[]);
    assert!(build(&params(&s, Path::new("/d"))).is_err());
}

/// Records every call; `fail` makes the named call return `-errno`.
#[derive(Default)]
struct Recorder {
    calls: RefCell<Vec<String>>,
    env: RefCell<Option<Vec<String>>>,
    fail: Option<(&'static str, i32)>,
}

impl Recorder {
    fn rc(&self, call: &'static str, ok: i32) -> i32 {
        match self.fail {
            Some((name, errno)) if name == call => -errno,
            _ => ok,
        }
    }
    fn push(&self, s: String) {
        self.calls.borrow_mut().push(s);
    }
}

fn text(c: &CStr) -> String {
    c.to_string_lossy().into_owned()
}

impl KrunApi for Recorder {
    fn set_log_level(&self, level: u32) -> i32 {
        self.push(format!("set_log_level {level}"));
        self.rc("set_log_level", 0)
    }
    fn create_ctx(&self) -> i32 {
        self.push("create_ctx".into());
        self.rc("create_ctx", 7)
    }
    fn free_ctx(&self, ctx: u32) -> i32 {
        self.push(format!("free_ctx {ctx}"));
        0
    }
    fn set_vm_config(&self, ctx: u32, vcpus: u8, ram_mib: u32) -> i32 {
        self.push(format!("set_vm_config {ctx} {vcpus} {ram_mib}"));
        self.rc("set_vm_config", 0)
    }
    fn set_root(&self, ctx: u32, root: &CStr) -> i32 {
        self.push(format!("set_root {ctx} {}", text(root)));
        self.rc("set_root", 0)
    }
    fn set_workdir(&self, ctx: u32, dir: &CStr) -> i32 {
        self.push(format!("set_workdir {ctx} {}", text(dir)));
        self.rc("set_workdir", 0)
    }
    fn set_exec(&self, ctx: u32, path: &CStr, argv: &[CString], envp: &[CString]) -> i32 {
        let argv: Vec<String> = argv.iter().map(|a| text(a)).collect();
        self.push(format!("set_exec {ctx} {} {argv:?}", text(path)));
        *self.env.borrow_mut() = Some(envp.iter().map(|e| text(e)).collect());
        self.rc("set_exec", 0)
    }
    fn set_console_output(&self, ctx: u32, path: &CStr) -> i32 {
        self.push(format!("set_console_output {ctx} {}", text(path)));
        self.rc("set_console_output", 0)
    }
    fn add_vsock_port2(&self, ctx: u32, port: u32, path: &CStr, listen: bool) -> i32 {
        self.push(format!(
            "add_vsock_port2 {ctx} {port} {} {listen}",
            text(path)
        ));
        self.rc("add_vsock_port2", 0)
    }
    fn start_enter(&self, ctx: u32) -> i32 {
        self.push(format!("start_enter {ctx}"));
        self.rc("start_enter", 0)
    }
}

fn sample_config(dir: &Path) -> VmConfig {
    let s = spec(&["/bin/echo", "hi"], &[("A", "1")]);
    build(&params(&s, dir)).expect("config")
}

#[test]
fn context_setup_calls_libkrun_in_order_with_an_explicit_environment() {
    let cfg = sample_config(Path::new("/data/vms/42.7"));
    let api = Recorder::default();
    assert_eq!(configure(&api, &cfg), Ok(7));
    assert_eq!(
        *api.calls.borrow(),
        vec![
            "set_log_level 1".to_owned(),
            "create_ctx".to_owned(),
            "set_vm_config 7 2 1024".to_owned(),
            "set_root 7 /data/vms/42.7/rootfs".to_owned(),
            "set_workdir 7 /".to_owned(),
            "set_exec 7 /bin/echo [\"hi\"]".to_owned(),
            "set_console_output 7 /data/vms/42.7/console.log".to_owned(),
        ]
    );
    assert_eq!(
        api.env.borrow().as_ref(),
        Some(&cfg.env),
        "envp is always the explicit list"
    );
}

#[test]
fn a_failed_libkrun_call_names_itself_and_frees_the_context() {
    let cfg = sample_config(Path::new("/d"));
    let api = Recorder {
        fail: Some(("set_root", libc::ENOENT)),
        ..Recorder::default()
    };
    let err = configure(&api, &cfg).expect_err("set_root fails");
    assert!(
        matches!(err, VmError::Krun { call: "krun_set_root", errno, .. } if errno == libc::ENOENT)
    );
    assert!(
        err.to_string().contains("No such file or directory"),
        "{err}"
    );
    assert_eq!(
        api.calls.borrow().last().map(String::as_str),
        Some("free_ctx 7")
    );
    assert!(!api.calls.borrow().iter().any(|c| c.starts_with("set_exec")));
}

#[test]
fn exec_marks_entered_then_reports_a_failed_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = sample_config(dir.path());
    let api = Recorder {
        fail: Some(("start_enter", libc::EINVAL)),
        ..Recorder::default()
    };
    let why = exec::enter(&api, &cfg);
    assert!(why.contains("krun_start_enter failed"), "{why}");
    assert!(cfg.entered_marker.exists());
    // A setup failure never gets as far as entering.
    std::fs::remove_file(&cfg.entered_marker).expect("rm");
    let api = Recorder {
        fail: Some(("create_ctx", libc::ENOMEM)),
        ..Recorder::default()
    };
    assert!(exec::enter(&api, &cfg).contains("krun_create_ctx"));
    assert!(!cfg.entered_marker.exists());
}

#[test]
fn string_arrays_are_null_terminated_and_padded_for_libkrun() {
    let items = vec![CString::new("a").expect("c"), CString::new("b").expect("c")];
    let arr = c_array(&items);
    assert_eq!(arr.len(), KRUN_ARRAY_SLOTS);
    assert_eq!(arr[0], items[0].as_ptr());
    assert!(arr[2].is_null() && arr[KRUN_ARRAY_SLOTS - 1].is_null());
    let many: Vec<CString> = (0..KRUN_ARRAY_SLOTS)
        .map(|i| CString::new(i.to_string()).expect("c"))
        .collect();
    let arr = c_array(&many);
    assert_eq!(arr.len(), KRUN_ARRAY_SLOTS + 1);
    assert!(arr[KRUN_ARRAY_SLOTS].is_null());
}

#[test]
fn exits_are_classified_from_status_console_and_cgroup() {
    const PANIC: &str = "[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n";
    // The libkrun trap: a panicked guest exits 0.
    let (state, code) = classify(VmmStatus::Code(0), PANIC, None, false);
    assert!(
        matches!(&state, ObservedState::Failed { reason } if reason.contains("guest kernel panicked") && reason.contains("Unable to mount root fs")),
        "{state:?}"
    );
    assert_eq!(code, None);
    assert_eq!(
        classify(VmmStatus::Code(0), "hi\n", None, false),
        (ObservedState::Exited { code: 0 }, Some(0))
    );
    assert_eq!(
        classify(VmmStatus::Code(3), "", None, false),
        (ObservedState::Exited { code: 3 }, Some(3))
    );
    assert_eq!(
        classify(VmmStatus::Signal(15), "", None, false),
        (ObservedState::Exited { code: 143 }, Some(143))
    );
    // The host OOM killer took the VMM; or the guest's own OOM killer took the command.
    assert_eq!(
        classify(VmmStatus::Signal(9), "", None, true),
        (ObservedState::OomKilled, Some(137))
    );
    assert_eq!(
        classify(
            VmmStatus::Code(137),
            "Out of memory: Killed process 77 (python)",
            None,
            false
        )
        .0,
        ObservedState::OomKilled
    );
    // ... but a command that survived an OOM kill in its guest and exited 0 succeeded.
    assert_eq!(
        classify(
            VmmStatus::Code(0),
            "Out of memory: Killed process 77 (python)",
            None,
            false
        )
        .0,
        ObservedState::Exited { code: 0 }
    );
    assert_eq!(
        classify(VmmStatus::Code(0), "Kernel panic - not syncing: System is deadlocked on memory\nOut of memory", None, false).0,
        ObservedState::Failed { reason: "the guest kernel panicked: Kernel panic - not syncing: System is deadlocked on memory".into() }
    );
    let (state, code) = classify(
        VmmStatus::Code(exit::SETUP_FAILED_CODE),
        "",
        Some("cannot load libkrun: no such file\n"),
        false,
    );
    assert_eq!(
        state,
        ObservedState::Failed {
            reason: "the microVM could not start: cannot load libkrun: no such file".into()
        }
    );
    assert_eq!(code, Some(125));
    assert!(matches!(
        classify(VmmStatus::Unknown, "", None, false).0,
        ObservedState::Failed { .. }
    ));
    assert_eq!(VmmStatus::from_wait_status(3 << 8), VmmStatus::Code(3));
    assert_eq!(VmmStatus::from_wait_status(9), VmmStatus::Signal(9));
}

#[test]
fn runtime_selection_reasons() {
    let ready = KrunHost {
        krunfw: Some("/k/libkrunfw.so.5".into()),
        libkrun: Ok(None),
    };
    let hw = Virtualization::Hardware { flag: "svm".into() };
    assert_eq!(unavailable_reason(&hw, &ready), None);
    let pvm = crate::detect::classify_virtualization("flags : fpu hypervisor\n", Ok(()));
    let why = unavailable_reason(&pvm, &ready).expect("no vmx/svm");
    assert!(
        why.contains("no hardware virtualization") && why.contains("kvm_pvm"),
        "{why}"
    );
    let dirs = search_dirs(
        Path::new("/data"),
        Some(Path::new("/opt/surge/bin")),
        Some(Path::new("/home/u")),
    );
    assert_eq!(
        dirs[0],
        PathBuf::from("/opt/surge/bin"),
        "next to the binary first"
    );
    assert_eq!(dirs[1], PathBuf::from("/data/krun"));
    assert_eq!(dirs[2], PathBuf::from("/home/u/.cache/surge/krun"));
}

// ---- supervision with a fake VM process ----

/// Plays vm-exec: reads the "command" from vm.json and behaves accordingly.
const FAKE_VM: &str = r#"
dir=$(dirname "$2")
mode=$(sed -n 's/.*"exec": *"\([^"]*\)".*/\1/p' "$2")
if [ "$mode" = setupfail ]; then
  echo "libkrun krun_set_root failed: No such file or directory (errno 2)" > "$dir/setup-error"
  exit 125
fi
: > "$dir/entered"
case "$mode" in
  ok) echo hi >> "$dir/console.log"; exit 0 ;;
  panic) echo "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100" >> "$dir/console.log"; exit 0 ;;
  fail3) exit 3 ;;
  sleep) exec sleep 120 ;;
esac
exit 99
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    parent: String,
    layout: CgroupLayout,
}

impl Fixture {
    fn new(test: &str) -> Option<Self> {
        if !crate::testing::is_root() {
            crate::testing::unavailable(&format!("{test}: needs root (cgroups)"));
            return None;
        }
        let layout = match CgroupLayout::detect() {
            Ok(l) => l,
            Err(e) => {
                crate::testing::unavailable(&format!("{test}: no usable cgroups ({e})"));
                return None;
            }
        };
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().to_path_buf();
        std::fs::create_dir_all(data.join("templates/t/bin")).expect("template");
        Some(Self {
            _dir: dir,
            data,
            parent: format!("/surge-vm-test-{}-{test}", std::process::id()),
            layout,
        })
    }

    fn runtime(&self) -> KrunRuntime {
        let config = KrunConfig {
            data_dir: self.data.clone(),
            program: PathBuf::from("/bin/sh"),
            program_args: vec!["-c".into(), FAKE_VM.into(), "fake-vm".into()],
            cgroup_parent: self.parent.clone(),
            krunfw: None,
            libkrun: None,
            overlay: false,
            agent: None,
        };
        KrunRuntime::with_layout(config, self.layout.clone()).expect("runtime")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let parent = self.parent.trim_matches('/');
        match &self.layout {
            CgroupLayout::V2 { root } => {
                let _ = std::fs::remove_dir(root.join(parent));
            }
            CgroupLayout::V1 {
                memory,
                cpu,
                cpuacct,
                ..
            } => {
                for d in [memory, cpu, cpuacct] {
                    let _ = std::fs::remove_dir(d.join(parent));
                }
            }
        }
    }
}

fn req(index: u32, mode: &str) -> StartRequest {
    StartRequest {
        id: SandboxId::new(9, index),
        generation: 1,
        revision: 1,
        spec: spec(&[mode], &[]),
        resources: Resources {
            cpu_millis: 1500,
            memory_mib: 128,
        },
    }
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// The process state once `want` says yes, or the last one seen after 2 s: a signal is
/// delivered asynchronously, so /proc may lag the `kill` by a moment.
async fn settled_proc_state(pid: u32, want: impl Fn(Option<char>) -> bool) -> Option<char> {
    for _ in 0..200 {
        let s = proc_state(pid);
        if want(s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proc_state(pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_vm_exits_are_reported() {
    let Some(fx) = Fixture::new("exits") else {
        return;
    };
    let rt = fx.runtime();
    rt.start(req(1, "ok")).await.expect("start ok");
    let r = rt.wait(SandboxId::new(9, 1)).await.expect("wait");
    assert_eq!(r.state, ObservedState::Exited { code: 0 });
    assert_eq!(r.stdout_tail, "hi\n", "the console is the sandbox's output");

    rt.start(req(2, "panic")).await.expect("start panic");
    let r = rt.wait(SandboxId::new(9, 2)).await.expect("wait");
    assert!(
        matches!(&r.state, ObservedState::Failed { reason } if reason.contains("Attempted to kill init")),
        "a guest panic exits 0 and must not be a success: {r:?}"
    );

    rt.start(req(3, "fail3")).await.expect("start fail3");
    let r = rt.wait(SandboxId::new(9, 3)).await.expect("wait");
    assert_eq!(
        (r.state, r.code),
        (ObservedState::Exited { code: 3 }, Some(3))
    );

    let err = rt
        .start(req(4, "setupfail"))
        .await
        .expect_err("setup fails");
    assert!(
        matches!(&err, RuntimeError::StartFailed { reason, .. } if reason.contains("krun_set_root failed")),
        "{err}"
    );
    assert!(matches!(
        rt.status(SandboxId::new(9, 4)).await.expect("status").state,
        ObservedState::Failed { .. }
    ));
    for i in 1..=4 {
        rt.remove(SandboxId::new(9, i)).await.expect("remove");
    }
    assert!(rt.list().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_vm_pause_resume_resize_stop() {
    let Some(fx) = Fixture::new("lifecycle") else {
        return;
    };
    let rt = fx.runtime();
    let id = SandboxId::new(9, 10);
    let pid = rt
        .start(req(10, "sleep"))
        .await
        .expect("start")
        .pid
        .expect("pid");
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Running
    );
    let cg = vm_cgroup(&fx.layout, &fx.parent, id);
    let procs = std::fs::read_to_string(cg.memory.join("cgroup.procs")).expect("procs");
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "the VM runs in its cgroup: {procs}"
    );
    let limit_file = if cg.v2 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    let limit = || std::fs::read_to_string(cg.memory.join(limit_file)).expect("limit");
    assert_eq!(limit().trim(), ((128 + VMM_OVERHEAD_MIB) * MIB).to_string());

    rt.pause(id).await.expect("pause");
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Paused
    );
    assert_eq!(
        settled_proc_state(pid, |s| s == Some('T')).await,
        Some('T'),
        "the VMM process is stopped"
    );
    rt.resume(id).await.expect("resume");
    assert_ne!(settled_proc_state(pid, |s| s != Some('T')).await, Some('T'));

    // Within the RAM the guest booted with (128 + 256 MiB headroom): only the cgroup moves.
    rt.resize(
        id,
        Resources {
            cpu_millis: 2000,
            memory_mib: 300,
        },
        2,
    )
    .await
    .expect("resize");
    assert_eq!(limit().trim(), ((300 + VMM_OVERHEAD_MIB) * MIB).to_string());
    let o = rt.status(id).await.expect("status");
    assert_eq!((o.revision, o.resources.memory_mib), (2, 300));
    let err = rt
        .resize(
            id,
            Resources {
                cpu_millis: 2000,
                memory_mib: 4096,
            },
            3,
        )
        .await
        .expect_err("beyond the booted RAM");
    assert!(err.to_string().contains("booted with 384 MiB"), "{err}");
    assert!(rt
        .resize(
            id,
            Resources {
                cpu_millis: 3000,
                memory_mib: 300
            },
            3
        )
        .await
        .is_err());

    // Paused, then stopped: SIGCONT first, so SIGTERM is not left pending.
    rt.pause(id).await.expect("pause");
    let r = rt.stop(id, Duration::from_secs(5)).await.expect("stop");
    assert_eq!(r.state, ObservedState::Exited { code: 143 });
    assert!(rt.pause(id).await.is_err(), "an ended VM cannot be paused");
    rt.remove(id).await.expect("remove");
    assert!(!cg.memory.exists(), "the cgroup goes with the sandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_runtime_adopts_running_vms() {
    let Some(fx) = Fixture::new("adopt") else {
        return;
    };
    let first = fx.runtime();
    let id = SandboxId::new(9, 20);
    let pid = first
        .start(req(20, "sleep"))
        .await
        .expect("start")
        .pid
        .expect("pid");
    // A second runtime over the same data dir: what a re-executed daemon finds.
    let second = fx.runtime();
    let listed = second.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id, listed[0].state.clone(), listed[0].owned),
        (id, ObservedState::Running, false)
    );
    second.pause(id).await.expect("pause by the adopter");
    assert_eq!(settled_proc_state(pid, |s| s == Some('T')).await, Some('T'));
    let r = second
        .stop(id, Duration::from_secs(5))
        .await
        .expect("stop by the adopter");
    assert_eq!(r.state, ObservedState::Exited { code: 143 });
    assert_eq!(
        first.status(id).await.expect("status").state,
        ObservedState::Exited { code: 143 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_die_with_the_runtime_that_spawned_them() {
    let Some(fx) = Fixture::new("pdeathsig") else {
        return;
    };
    let rt = fx.runtime();
    let pid = rt
        .start(req(30, "sleep"))
        .await
        .expect("start")
        .pid
        .expect("pid");
    let ticks = process_start_ticks(pid);
    assert!(ticks.is_some());
    // Dropping the runtime ends its spawner thread, the VM's parent thread: PR_SET_PDEATHSIG.
    drop(rt);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_start_ticks(pid) == ticks {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM outlived its parent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A later daemon reports it as failed (no status), never as a success.
    let later = fx.runtime();
    let state = later
        .status(SandboxId::new(9, 30))
        .await
        .expect("status")
        .state;
    assert!(
        matches!(
            state,
            ObservedState::Exited { code: 137 } | ObservedState::Failed { .. }
        ),
        "{state:?}"
    );
}

// ---- real libkrun ----

/// Context setup against a real libkrun (no guest boots: start_enter is not called). Runs when
/// `SURGE_TEST_LIBKRUN` names a libkrun.so or one is installed; skipped with a message otherwise.
#[test]
fn real_libkrun_accepts_the_context() {
    let path = std::env::var_os("SURGE_TEST_LIBKRUN").map(PathBuf::from);
    let api = match ffi::DlKrun::load(path.as_deref()) {
        Ok(api) => api,
        Err(e) => {
            // Not `testing::unavailable`: libkrun is optional on every machine (the container
            // runtime is the default), so CI has none to insist on.
            eprintln!("SKIPPED real_libkrun_accepts_the_context: no libkrun ({e}); set SURGE_TEST_LIBKRUN=/path/to/libkrun.so");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = sample_config(dir.path());
    cfg.root = dir.path().to_path_buf();
    let ctx = configure(&api, &cfg).expect("libkrun accepts the configuration");
    assert_eq!(api.free_ctx(ctx), 0);
    assert!(api.free_ctx(ctx) < 0, "a freed context is gone");
}

/// Helper process for the boot test: `vm-exec` inside the test binary.
#[test]
#[ignore = "helper: run by boot_a_microvm as its VM process"]
fn vm_exec_child() {
    if let Some(cfg) = std::env::var_os("SURGE_VM_EXEC_CONFIG") {
        exec::vm_exec(Path::new(&cfg));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_a_microvm() {
    let virt = crate::detect::detect_virtualization();
    let Some(fx) = Fixture::new("boot") else {
        return;
    };
    let host = KrunHost::probe(&fx.data);
    if let Some(why) = unavailable_reason(&virt, &host) {
        // A hardware limit, not a missing tool: no setup makes a host without usable hardware
        // virtualization (this build machine's /dev/kvm cannot boot a guest) run a microVM, so
        // this skips everywhere, CI included, instead of going through `testing::unavailable`.
        eprintln!("SKIPPED boot_a_microvm: this host cannot boot a microVM: {why}");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let busybox = Templates::new(&fx.data)
        .ensure_busybox()
        .expect("busybox template");
    let _ = busybox;
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
        agent: None,
    };
    let rt = KrunRuntime::with_layout(config, fx.layout.clone()).expect("runtime");
    let mut r = req(40, "/bin/echo");
    r.spec.template = DEFAULT_TEMPLATE.into();
    r.spec.command = vec!["/bin/echo".into(), "hi".into()];
    rt.start(r).await.expect("boot");
    let report = rt.wait(SandboxId::new(9, 40)).await.expect("wait");
    assert_eq!(
        report.state,
        ObservedState::Exited { code: 0 },
        "{report:?}"
    );
    assert!(report.stdout_tail.contains("hi"), "{report:?}");
}

/// `scripts/setup-krun` for real: downloads the microsandbox wheel from PyPI (48 MB), so it
/// runs only with `SURGE_TEST_NETWORK=1`.
#[test]
fn setup_script_installs_the_guest_kernel() {
    if std::env::var_os("SURGE_TEST_NETWORK").is_none() {
        eprintln!("SKIPPED setup_script_installs_the_guest_kernel: set SURGE_TEST_NETWORK=1 (downloads from PyPI)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup-krun");
    let dest = tempfile::tempdir().expect("tmp");
    let run = || {
        let out = std::process::Command::new(&script)
            .arg("--dest")
            .arg(dest.path())
            .output()
            .expect("run setup-krun");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run().contains("installed"));
    let lib = dest.path().join(KRUNFW_FILE);
    let bytes = std::fs::read(&lib).expect("libkrunfw.so.5 via its soname link");
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert!(bytes.len() > 10 * 1024 * 1024, "the guest kernel is inside");
    assert!(run().contains("already installed"), "idempotent");
    // What the daemon's probe finds there.
    let found = search_dirs(Path::new("/nonexistent"), Some(dest.path()), None)
        .iter()
        .map(|d| d.join(KRUNFW_FILE))
        .find(|p| p.is_file());
    assert_eq!(found, Some(lib));
}

#[path = "tests_agent.rs"]
mod agent;
