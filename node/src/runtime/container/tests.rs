//! Pure parts first; then real containers (root + crun + busybox-static): where those are
//! missing they are skipped with a message, and fail in CI (`testing::unavailable`).

use super::*;
use crate::runtime::cgroup::parse_limit;
use crate::runtime::sandbox_dir::write_json_atomic;
use crate::runtime::supervise::parse_start_ticks;
use crate::runtime::SandboxSpec;
use crate::runtime::{guard_memory, MemoryGrowthPolicy, MemoryHeadroom};
use crate::testing::{is_root, unavailable};
use serde_json::json;
use std::process::Stdio;
use std::time::Instant;

#[test]
fn sandbox_cgroups_as_crun_holds_them() {
    let hybrid = "\
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
";
    let v1 = CgroupLayout::from_mounts(&parse_cgroup_mounts(hybrid), |_| "hugetlb\n".into())
        .expect("layout");
    let v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    let layout = CgroupLayout::from_mounts(&parse_cgroup_mounts(v2), |_| "cpu memory pids".into())
        .expect("v2");
    let cg = SandboxCgroup::new(&layout, "/surge", "surge-42-7");
    assert_eq!(cg.crun_path, "/surge/surge-42-7/ctr");
    assert_eq!(
        cg.dirs.memory,
        Path::new("/sys/fs/cgroup/surge/surge-42-7/ctr")
    );
    assert!(cg.dirs.v2);
    assert_eq!(
        cg.owned.as_deref(),
        Some(Path::new("/sys/fs/cgroup/surge/surge-42-7"))
    );
    let cg1 = SandboxCgroup::new(&v1, "/surge/", "surge-42-7");
    assert_eq!(cg1.crun_path, "/surge/surge-42-7");
    assert_eq!(
        cg1.dirs.memory,
        Path::new("/sys/fs/cgroup/memory/surge/surge-42-7")
    );
    assert_eq!(cg1.owned, None);
}

#[test]
fn records_and_ids() {
    let stat =
        "1234 (sh (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 100";
    assert_eq!(parse_start_ticks(stat), Some(987_654));
    assert_eq!(parse_start_ticks(&stat.replace(") S ", ") Z ")), None);
    assert_eq!(container_id(SandboxId::new(42, 7)), "surge-42-7");
    // meta.json keeps the layout of records written before the shared record type, so a new
    // daemon re-adopts what an older one started.
    let old = r#"{"id":{"job":5,"index":2},"generation":3,"revision":4,"resources":{"cpu_millis":500,"memory_mib":64},
        "spec":{"template":"busybox","command":[],"env":[],"cpu_millis":500,"memory_mib":64},
        "shim_pid":77,"shim_start_ticks":99,"paused":true}"#;
    let r: Record<ShimRecord> = serde_json::from_str(old).expect("an old meta.json");
    assert_eq!((r.generation, r.revision, r.paused), (3, 4, true));
    assert_eq!(r.extra.process(), (77, 99));
    assert_eq!(r.extra.cgroup_parent, None);
    let back = serde_json::to_value(&r).expect("encode");
    assert_eq!(back["shim_pid"], 77);
    assert_eq!(back["id"], serde_json::to_value(r.id).expect("id"));
}

#[test]
fn oci_spec_has_isolation_and_limits() {
    let spec = SandboxSpec {
        template: "busybox".into(),
        command: vec!["sh".into(), "-c".into(), "echo hi".into()],
        env: vec![("A".into(), "b=c".into())],
        cpu_millis: 500,
        memory_mib: 64,
        user: String::new(),
        fork_of: None,
    };
    let p = OciParams {
        id: SandboxId::new(42, 7),
        spec: &spec,
        resources: Resources {
            cpu_millis: 250,
            memory_mib: 128,
        },
        cgroups_path: "/surge/surge-42-7",
        uid: 1000,
        gid: 1000,
        tmp_size_mib: 64,
        init: Path::new("/data/bin/surge-init"),
    };
    let c = oci_config(&p).expect("config");
    let ns: Vec<&str> = c["linux"]["namespaces"]
        .as_array()
        .expect("namespaces")
        .iter()
        .filter_map(|n| n["type"].as_str())
        .collect();
    for want in ["pid", "network", "ipc", "uts", "mount"] {
        assert!(ns.contains(&want), "{want} namespace");
    }
    assert_eq!(c["linux"]["resources"]["memory"]["limit"], 128 * MIB);
    assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 25_000);
    assert_eq!(c["process"]["user"]["uid"], 1000);
    assert!(c["process"]["env"]
        .as_array()
        .expect("env")
        .iter()
        .any(|e| e == "A=b=c"));
    assert_eq!(
        c["process"]["args"],
        json!([init::INIT_IN_SANDBOX, "init", "sh", "-c", "echo hi"]),
        "surge-init is PID 1 and runs the command"
    );
    let binds: Vec<&serde_json::Value> = c["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter(|m| m["type"] == "bind")
        .collect();
    assert_eq!(binds.len(), 1, "no host path but surge-init: {binds:?}");
    assert_eq!(binds[0]["source"], "/data/bin/surge-init");
    assert_eq!(binds[0]["destination"], init::INIT_IN_SANDBOX);
    assert!(
        binds[0]["options"]
            .as_array()
            .expect("options")
            .iter()
            .any(|o| o == "ro"),
        "read-only"
    );
    let bad = SandboxSpec {
        env: vec![("A=B".into(), "x".into())],
        ..spec.clone()
    };
    assert!(oci_config(&OciParams {
        spec: &bad,
        ..p.clone()
    })
    .is_err());
    let shell = SandboxSpec {
        command: vec![],
        ..spec.clone()
    };
    assert_eq!(
        oci_config(&OciParams { spec: &shell, ..p }).expect("config")["process"]["args"],
        json!([init::INIT_IN_SANDBOX, "init"]),
        "no command: a long-lived sandbox, surge-init alone"
    );
}

// ---- real containers ----

/// A runtime on a fresh data dir, or `None` (with a printed reason) when this host cannot run one.
pub(super) fn runtime(test: &str) -> Option<(ContainerRuntime, PathBuf)> {
    if !is_root() {
        unavailable(&format!(
            "{test}: needs root (namespaces, cgroups, overlay mounts)"
        ));
        return None;
    }
    if !Path::new(crate::template::HOST_BUSYBOX).is_file() {
        unavailable(&format!(
            "{test}: /bin/busybox missing; apt-get install -y busybox-static"
        ));
        return None;
    }
    let data = std::env::temp_dir().join(format!("surge-ct-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    match ContainerRuntime::new(ContainerConfig::new(&data)) {
        Ok(rt) => Some((rt, data)),
        Err(RuntimeError::Command { stderr, .. }) => {
            unavailable(&format!("{test}: {stderr}"));
            None
        }
        Err(e) => panic!("container runtime unusable on this host: {e}"),
    }
}

pub(super) fn req(job: u64, index: u32, script: &str, memory_mib: u64) -> StartRequest {
    StartRequest {
        id: SandboxId::new(job, index),
        generation: 1,
        revision: 1,
        spec: SandboxSpec {
            template: "busybox".into(),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("GREETING".into(), "hi".into())],
            cpu_millis: 500,
            memory_mib,
            user: String::new(),
            fork_of: None,
        },
        resources: Resources {
            cpu_millis: 500,
            memory_mib,
        },
    }
}

pub(super) async fn cleanup(rt: &ContainerRuntime, data: &Path, ids: &[SandboxId]) {
    for id in ids {
        let _ = rt.stop(*id, Duration::from_millis(100)).await;
        rt.remove(*id).await.expect("forget");
        assert!(!data.join("sandboxes").join(id.to_string()).exists());
    }
    let _ = std::fs::remove_dir_all(data);
}

fn counter(data: &Path, id: SandboxId) -> u64 {
    let path = data
        .join("sandboxes")
        .join(id.to_string())
        .join("upper/work/counter");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn runs_in_its_own_namespaces_and_reports_exit_code_and_output() {
    let Some((rt, data)) = runtime("exit") else {
        return;
    };
    let id = SandboxId::new(1, 0);
    let script = "echo $GREETING; echo pid=$$; echo uid=$(id -u); hostname; ls /sys/class/net; \
                  echo oops >&2; touch /work/file; exit 3";
    let handle = rt.start(req(1, 0, script, 64)).await.expect("start");
    assert!(handle.pid.is_some());
    let report = rt.wait(id).await.expect("wait");
    assert_eq!(
        report.state,
        ObservedState::Exited { code: 3 },
        "{report:?}"
    );
    assert_eq!(report.code, Some(3));
    assert_eq!(
        report.stdout_tail, "hi\npid=2\nuid=1000\nsb-1-0\nlo\n",
        "pid ns (surge-init is 1, the command its first child), user, uts, netns with only lo"
    );
    assert!(report.stderr_tail.contains("oops"));
    assert!(
        data.join("sandboxes/1.0/upper/work/file").exists(),
        "writes land in the overlay upper"
    );
    assert!(
        !data.join("templates/busybox/work/file").exists(),
        "the template is untouched"
    );
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Exited { code: 3 }
    );
    assert!(matches!(
        rt.start(req(1, 0, "true", 64)).await,
        Err(RuntimeError::AlreadyExists { .. })
    ));
    cleanup(&rt, &data, &[id]).await;
}

/// Issue 7: a sandbox never sees host paths the job did not ask for, and runs without the
/// daemon's privileges (the daemon is root here).
#[tokio::test]
async fn runs_unprivileged_and_sees_no_host_paths() {
    let Some((rt, data)) = runtime("privileges") else {
        return;
    };
    // A host file beside the daemon's data: it must not be reachable from inside.
    let secret = data.join("host-secret");
    std::fs::write(&secret, "host only").expect("write host file");
    let id = SandboxId::new(7, 0);
    let script = format!(
        "echo uid=$(id -u) gid=$(id -g); grep -E '^(CapEff|CapPrm|CapAmb|NoNewPrivs):' /proc/self/status; \
         if cat {secret} 2>/dev/null; then echo SECRET-VISIBLE; fi; \
         if ls /var/lib >/dev/null 2>&1 || ls {data} >/dev/null 2>&1; then echo HOST-DIR-VISIBLE; fi; \
         echo ---mounts; cat /proc/self/mountinfo",
        secret = secret.display(),
        data = data.display(),
    );
    rt.start(req(7, 0, &script, 64)).await.expect("start");
    let report = rt.wait(id).await.expect("wait");
    let out = &report.stdout_tail;
    assert_eq!(report.code, Some(0), "{out}\n{}", report.stderr_tail);
    assert!(
        out.contains("uid=1000 gid=1000"),
        "runs as the sandbox user, not root: {out}"
    );
    for line in [
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapAmb:\t0000000000000000",
    ] {
        assert!(
            out.contains(line),
            "no capabilities in effect ({line}): {out}"
        );
    }
    assert!(out.contains("NoNewPrivs:\t1"), "no_new_privs is set: {out}");
    assert!(
        !out.contains("SECRET-VISIBLE"),
        "a host file was readable: {out}"
    );
    assert!(
        !out.contains("HOST-DIR-VISIBLE"),
        "a host directory was visible: {out}"
    );
    // Every mount is the overlay root or a kernel filesystem made for the sandbox: a host
    // bind mount would show the host's filesystem type (ext4, xfs, ...). The one exception is
    // how crun masks files (`maskedPaths`): the host's /dev/null bound over them, read-only;
    // and surge-init, the one host file bound in, read-only.
    let mounts = out.split("---mounts\n").nth(1).expect("mountinfo printed");
    let allowed = [
        "overlay", "proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2",
    ];
    let mut masked = 0;
    for line in mounts.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (root, target) = (fields.get(3).copied(), fields.get(4).unwrap_or(&"?"));
        let fstype = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?");
        if *target == init::INIT_IN_SANDBOX {
            assert!(
                fields
                    .get(5)
                    .is_some_and(|o| o.split(',').any(|o| o == "ro")),
                "surge-init is mounted read-only: {line}"
            );
            continue;
        }
        if fstype == "devtmpfs" && root == Some("/null") {
            assert!(
                target.starts_with("/proc/") || target.starts_with("/sys/"),
                "/dev/null masks only /proc and /sys paths: {line}"
            );
            masked += 1;
            continue;
        }
        assert!(
            allowed.contains(&fstype),
            "unexpected mount ({fstype}): {line}"
        );
    }
    assert!(masked > 0, "crun masks /proc/kcore and others: {mounts}");
    cleanup(&rt, &data, &[id]).await;
}

#[tokio::test]
async fn missing_template_and_bad_command_fail_with_reasons() {
    let Some((rt, data)) = runtime("fail") else {
        return;
    };
    let mut r = req(2, 0, "true", 64);
    r.spec.template = "nope".into();
    let err = rt.start(r).await.expect_err("missing template");
    assert!(matches!(err, RuntimeError::TemplateMissing { .. }), "{err}");
    let mut r = req(2, 1, "", 64);
    r.spec.command = vec!["/bin/does-not-exist".into()];
    let err = rt.start(r).await;
    // surge-init reports it could not execute the command: a failed start, with the reason,
    // never a start followed by an exit.
    assert!(
        matches!(&err, Err(RuntimeError::StartFailed { reason, .. }) if reason.contains("/bin/does-not-exist")),
        "{err:?}"
    );
    let report = rt.wait(SandboxId::new(2, 1)).await.expect("wait");
    assert!(
        matches!(&report.state, ObservedState::Failed { reason } if reason.contains("cannot run")),
        "{report:?}"
    );
    assert_eq!(report.code, None);
    cleanup(&rt, &data, &[SandboxId::new(2, 1)]).await;
}

#[tokio::test]
async fn oom_kill_is_reported_when_memory_cannot_grow() {
    let Some((rt, data)) = runtime("oom") else {
        return;
    };
    let id = SandboxId::new(3, 0);
    // dd allocates its 64 MiB block; the limit is 32 MiB.
    rt.start(req(3, 0, "dd if=/dev/zero of=/dev/null bs=64M count=1", 32))
        .await
        .expect("start");
    let (tx, _rx) = tokio::sync::mpsc::channel(4);
    let no_headroom = MemoryHeadroom::new(0);
    let policy = MemoryGrowthPolicy {
        step_min_mib: 32,
        poll_interval_ms: 20,
        ..Default::default()
    };
    let guard = guard_memory(&rt, id, 1024, &no_headroom, policy, tx);
    let (report, guarded) = tokio::join!(rt.wait(id), guard);
    guarded.expect("guard");
    let report = report.expect("wait");
    assert_eq!(report.state, ObservedState::OomKilled, "{report:?}");
    assert_eq!(report.code, Some(137));
    cleanup(&rt, &data, &[id]).await;
}

#[tokio::test]
async fn memory_grown_in_time_keeps_the_sandbox_alive() {
    let Some((rt, data)) = runtime("grow") else {
        return;
    };
    let id = SandboxId::new(4, 0);
    // Ten 8 MiB allocations, one every 0.3 s, each held for 4 s: peaks near 85 MiB.
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do \
                    (dd if=/dev/zero bs=8M count=1 2>/dev/null | sleep 4) & sleep 0.3; \
                  done; wait; echo done";
    rt.start(req(4, 0, script, 64)).await.expect("start");
    let (tx, mut growths) = tokio::sync::mpsc::channel(16);
    let headroom = MemoryHeadroom::new(1024);
    let policy = MemoryGrowthPolicy {
        step_min_mib: 32,
        poll_interval_ms: 20,
        ..Default::default()
    };
    let peak = async {
        let mut peak = 0;
        while let Ok(u) = rt.usage(id).await {
            peak = peak.max(u.memory_bytes);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    };
    let (report, guarded, peak) = tokio::join!(
        rt.wait(id),
        guard_memory(&rt, id, 1024, &headroom, policy, tx),
        peak
    );
    guarded.expect("guard");
    let report = report.expect("wait");
    assert_eq!(
        report.state,
        ObservedState::Exited { code: 0 },
        "{report:?}"
    );
    assert!(report.stdout_tail.contains("done"));
    assert!(
        peak > 64 * MIB,
        "the sandbox used {} MiB: more than its first limit",
        peak / MIB
    );
    let first = growths.recv().await.expect("a growth was reported");
    assert_eq!(first.resources.memory_mib, 96);
    let status = rt.status(id).await.expect("status");
    assert!(status.resources.memory_mib >= 96);
    assert_eq!(
        status.revision, 1,
        "a local growth keeps the scheduler's revision"
    );
    assert_eq!(
        headroom.available_mib(),
        1024 - (status.resources.memory_mib - 64)
    );
    cleanup(&rt, &data, &[id]).await;
}

#[tokio::test]
async fn pause_stops_progress_and_resume_continues() {
    let Some((rt, data)) = runtime("pause") else {
        return;
    };
    let id = SandboxId::new(5, 0);
    let script = "i=0; while true; do i=$((i+1)); echo $i > /work/counter; sleep 0.05; done";
    rt.start(req(5, 0, script, 64)).await.expect("start");
    let t0 = Instant::now();
    while counter(&data, id) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "counter never advanced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.pause(id).await.expect("pause");
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Paused
    );
    let frozen = counter(&data, id);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(counter(&data, id), frozen, "progress while paused");
    rt.resume(id).await.expect("resume");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(counter(&data, id) > frozen + 2, "no progress after resume");
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Running
    );
    // Stopping a paused sandbox thaws it first.
    rt.pause(id).await.expect("pause again");
    let report = rt.stop(id, Duration::from_millis(300)).await.expect("stop");
    assert_eq!(
        report.code,
        Some(143),
        "surge-init forwards SIGTERM to the shell (no longer PID 1), which dies of it"
    );
    cleanup(&rt, &data, &[id]).await;
}

#[tokio::test]
async fn resize_changes_the_cgroup_limits() {
    let Some((rt, data)) = runtime("resize") else {
        return;
    };
    let id = SandboxId::new(6, 0);
    rt.start(req(6, 0, "sleep 60", 64)).await.expect("start");
    let sb = rt.get(id).expect("record");
    let read = |dir: &Path, v1: &str, v2: &str| {
        std::fs::read_to_string(dir.join(if sb.cgroup.dirs.v2 { v2 } else { v1 }))
            .expect("cgroup file")
    };
    assert_eq!(
        parse_limit(&read(
            &sb.cgroup.dirs.memory,
            "memory.limit_in_bytes",
            "memory.max"
        )),
        Some(64 * MIB)
    );
    let bigger = Resources {
        cpu_millis: 1500,
        memory_mib: 200,
    };
    rt.resize(id, bigger, 2).await.expect("resize");
    assert_eq!(
        parse_limit(&read(
            &sb.cgroup.dirs.memory,
            "memory.limit_in_bytes",
            "memory.max"
        )),
        Some(200 * MIB)
    );
    let cpu = read(&sb.cgroup.dirs.cpu, "cpu.cfs_quota_us", "cpu.max");
    assert_eq!(cpu.split_whitespace().next(), Some("150000"), "{cpu}");
    let status = rt.status(id).await.expect("status");
    assert_eq!((status.resources, status.revision), (bigger, 2));
    let usage = rt.usage(id).await.expect("usage");
    assert_eq!(usage.memory_limit_bytes, 200 * MIB);
    assert!(usage.memory_bytes > 0 && usage.memory_bytes < 200 * MIB);
    cleanup(&rt, &data, &[id]).await;
}

#[tokio::test]
async fn stop_is_graceful_then_forced() {
    let Some((rt, data)) = runtime("stop") else {
        return;
    };
    let polite = SandboxId::new(7, 0);
    let stubborn = SandboxId::new(7, 1);
    rt.start(req(
        7,
        0,
        "trap 'echo bye; exit 7' TERM; while true; do sleep 0.05; done",
        64,
    ))
    .await
    .expect("start");
    rt.start(req(
        7,
        1,
        "trap '' TERM; while true; do sleep 0.05; done",
        64,
    ))
    .await
    .expect("start");
    let grace = Duration::from_millis(1500);
    let report = rt.stop(polite, grace).await.expect("stop");
    // Exit 7 is its TERM trap's: it ended on SIGTERM, not SIGKILL after the grace (no timing
    // asserted: this machine is shared).
    assert_eq!(report.state, ObservedState::Exited { code: 7 });
    assert!(report.stdout_tail.contains("bye"));
    let t1 = Instant::now();
    let report = rt.stop(stubborn, grace).await.expect("stop");
    assert_eq!(report.state, ObservedState::Exited { code: 137 });
    assert!(
        t1.elapsed() >= grace,
        "killed before the grace ended: {:?}",
        t1.elapsed()
    );
    cleanup(&rt, &data, &[polite, stubborn]).await;
}

#[tokio::test]
async fn a_new_runtime_instance_readopts_running_and_exited_sandboxes() {
    let Some((first, data)) = runtime("adopt") else {
        return;
    };
    let running = SandboxId::new(8, 0);
    let exited = SandboxId::new(8, 1);
    first.start(req(8, 0, "sleep 60", 64)).await.expect("start");
    first
        .start(req(8, 1, "echo bye; exit 5", 64))
        .await
        .expect("start");
    first.wait(exited).await.expect("wait");
    drop(first); // the daemon restarts; the shims keep running

    let second = ContainerRuntime::new(ContainerConfig::new(&data)).expect("second instance");
    let listed = second.list().await.expect("list");
    let states: Vec<_> = listed
        .iter()
        .map(|o| (o.id, o.state.clone(), o.generation, o.owned))
        .collect();
    assert_eq!(
        states,
        vec![
            (running, ObservedState::Running, 1, false),
            (exited, ObservedState::Exited { code: 5 }, 1, false)
        ]
    );
    assert!(second
        .wait(exited)
        .await
        .expect("report")
        .stdout_tail
        .contains("bye"));
    let waiter = second.wait(running);
    let stopper = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        second.stop(running, Duration::from_millis(200)).await
    };
    let (waited, stopped) = tokio::join!(waiter, stopper);
    assert_eq!(
        waited.expect("wait").code,
        Some(143),
        "an adopted sandbox's exit is observed (sleep dies of the forwarded SIGTERM)"
    );
    assert_eq!(stopped.expect("stop").code, Some(143));
    cleanup(&second, &data, &[running, exited]).await;
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// `cargo test --workspace --lib -- --ignored --nocapture start_latency`: start latency of this
/// runtime vs. plain `crun run` of the same root filesystem, then sandboxes started per second
/// on one node at the start cap.
#[tokio::test]
#[ignore = "benchmark: prints start latencies"]
async fn start_latency() {
    const STARTS: u32 = 50;
    let Some((rt, data)) = runtime("latency") else {
        return;
    };
    let (mut start, mut to_exit) = (Vec::new(), Vec::new());
    for i in 0..STARTS {
        let id = SandboxId::new(9, i);
        let t0 = Instant::now();
        rt.start(req(9, i, "true", 64)).await.expect("start");
        start.push(t0.elapsed());
        rt.wait(id).await.expect("wait");
        to_exit.push(t0.elapsed());
        rt.remove(id).await.expect("forget");
    }
    // The same rootfs, bundle prepared once, straight `crun run`.
    let bundle = data.join("direct");
    std::fs::create_dir_all(bundle.join("rootfs")).expect("bundle");
    let template = rt.templates().path("busybox").expect("template");
    let spec = SandboxSpec {
        command: vec!["/bin/true".into()],
        ..Default::default()
    };
    let mut config = oci_config(&OciParams {
        id: SandboxId::new(9, 999),
        spec: &spec,
        resources: Resources {
            cpu_millis: 500,
            memory_mib: 64,
        },
        cgroups_path: "/surge/direct",
        uid: 1000,
        gid: 1000,
        tmp_size_mib: 64,
        init: &rt.init,
    })
    .expect("config");
    config["root"] = json!({ "path": template, "readonly": true });
    config["process"]["cwd"] = json!("/");
    write_json_atomic(&bundle.join("config.json"), &config).expect("config.json");
    let mut direct = Vec::new();
    for i in 0..STARTS {
        let mut cmd = rt.crun.command(rt.crun.binary().as_os_str(), false);
        cmd.arg("--root")
            .arg(rt.crun.root())
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("direct-{i}"));
        let t0 = Instant::now();
        let status = cmd.stdout(Stdio::null()).status().await.expect("crun run");
        direct.push(t0.elapsed());
        assert!(status.success());
    }
    for v in [&mut start, &mut to_exit, &mut direct] {
        v.sort();
    }
    let line = |name: &str, v: &[Duration]| {
        eprintln!(
            "{name:<44} p50 {:>7.2} ms   p99 {:>7.2} ms",
            percentile(v, 50).as_secs_f64() * 1e3,
            percentile(v, 99).as_secs_f64() * 1e3
        );
    };
    eprintln!("start latency over {STARTS} starts ({:?})", rt.layout());
    line("surge container: start() returns (running)", &start);
    line("surge container: start() to exit of `true`", &to_exit);
    line("crun run of the same rootfs to exit", &direct);

    // Throughput at the start cap: a burst of long-running sandboxes started the way the node
    // daemon starts them, at most `--start-concurrency` (default 16) at once.
    let cap = crate::agent::config::START_CONCURRENCY_DEFAULT;
    let burst = u32::try_from(cap * 8).expect("small");
    let permits = tokio::sync::Semaphore::new(cap);
    let t0 = Instant::now();
    let starts = (0..burst).map(|i| {
        let (rt, permits) = (&rt, &permits);
        async move {
            let _permit = permits.acquire().await.expect("open semaphore");
            rt.start(req(10, i, "sleep 60", 16)).await.expect("start");
        }
    });
    futures::future::join_all(starts).await;
    let elapsed = t0.elapsed();
    eprintln!(
        "{:<44} {:>7.1} sandboxes/s ({burst} started in {:.2} s, {cap} at once)",
        "surge container: starts per second at the cap",
        f64::from(burst) / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    for i in 0..burst {
        let id = SandboxId::new(10, i);
        let _ = rt.stop(id, Duration::from_millis(100)).await;
        rt.remove(id).await.expect("forget");
    }
    let _ = std::fs::remove_dir_all(&data);
}
