//! The warm pool on real crun: a pooled start runs the job's command with the job's identity
//! and limits, the pool refills, and a drain leaves no container, cgroup, mount or directory.

use super::pool::*;
use super::tests::req;
use super::*;
use crate::testing::{is_root, unavailable};

fn pooled_runtime(test: &str) -> Option<(ContainerRuntime, PathBuf, String)> {
    if !is_root() || !Path::new(crate::template::HOST_BUSYBOX).is_file() {
        unavailable(&format!("{test}: needs root and /bin/busybox"));
        return None;
    }
    let data = std::env::temp_dir().join(format!("surge-pool-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let parent = format!("/surge-pool-test-{test}-{}", std::process::id());
    let config = ContainerConfig {
        cgroup_parent: parent.clone(),
        warm_pool: vec![parse_warm_pool("busybox=2:1000:256").expect("flag")],
        ..ContainerConfig::new(&data)
    };
    match ContainerRuntime::new(config) {
        Ok(rt) => {
            rt.templates().ensure_busybox().expect("busybox template");
            Some((rt, data, parent))
        }
        Err(e) => {
            unavailable(&format!("{test}: {e}"));
            None
        }
    }
}

/// Everything of the pools and sandboxes still on the host: pool dirs, crun states, cgroup
/// directories under `parent`, mounts under `data`.
fn leftovers(rt: &ContainerRuntime, data: &Path, parent: &str) -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(d) = std::fs::read_dir(data.join("pool")) {
        left.extend(d.filter_map(|e| Some(format!("pool dir {:?}", e.ok()?.file_name()))));
    }
    if let Ok(d) = std::fs::read_dir(rt.crun.root()) {
        left.extend(d.filter_map(|e| Some(format!("crun state {:?}", e.ok()?.file_name()))));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for m in parse_cgroup_mounts(&mounts) {
        if let Ok(d) = std::fs::read_dir(m.mount_point.join(parent.trim_matches('/'))) {
            left.extend(d.filter_map(|e| {
                let e = e.ok()?;
                e.file_type()
                    .ok()?
                    .is_dir()
                    .then(|| format!("cgroup {}", e.path().display()))
            }));
        }
    }
    let data_s = data.display().to_string();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&data_s))
            .map(|l| format!("mount {l}")),
    );
    left
}

#[tokio::test]
async fn pooled_starts_run_the_jobs_command_as_the_job_and_the_pool_drains_clean() {
    let Some((rt, data, parent)) = pooled_runtime("identity") else {
        return;
    };
    assert_eq!(rt.pool_refill().await.expect("fill"), 2);
    assert_eq!(rt.pool_ready().get("busybox"), Some(&2));
    let show = "echo host=$(hostname) id=$SURGE_SANDBOX_ID g=$GREETING uid=$(id -u) cwd=$(pwd) \
                mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max) \
                seen=$(cat /work/secret 2>/dev/null || echo none); echo mine > /work/secret; env | sort";
    let (a, b) = (SandboxId::new(41, 0), SandboxId::new(42, 3));
    for (id, memory_mib) in [(a, 64u64), (b, 96)] {
        let mut r = req(id.job, id.index, show, memory_mib);
        r.spec.env.push(("ONLY".into(), format!("job{}", id.job)));
        rt.start(r).await.expect("pooled start");
        let limit = rt.usage(id).await.map(|u| u.memory_limit_bytes);
        let report = rt.wait(id).await.expect("wait");
        assert_eq!(report.code, Some(0), "{report:?}");
        let out = report.stdout_tail;
        let want = format!(
            "host=sb-{}-{} id={id} g=hi uid={} cwd=/work mem={} seen=none",
            id.job,
            id.index,
            SANDBOX_UID,
            memory_mib * MIB
        );
        assert!(out.contains(&want), "want {want:?} in {out:?}");
        assert!(out.contains(&format!("ONLY=job{}", id.job)), "{out}");
        assert!(
            !out.contains("sb-pool"),
            "the pool's identity leaked: {out}"
        );
        // While it ran, the host saw the job's limit on the sandbox's own cgroup.
        if let Ok(l) = limit {
            assert!(l == memory_mib * MIB || l == u64::MAX, "limit {l}");
        }
    }
    assert_eq!(
        rt.pool_ready().get("busybox"),
        Some(&0),
        "both starts were pooled"
    );
    // A long-lived pooled sandbox answers stop like a cold one (crun finds it by its new id).
    assert_eq!(
        rt.pool_refill().await.expect("refill"),
        2,
        "the pool refills"
    );
    let c = SandboxId::new(43, 0);
    rt.start(req(43, 0, "sleep 60", 64))
        .await
        .expect("pooled start");
    rt.pause(c).await.expect("pause");
    rt.resume(c).await.expect("resume");
    let stopped = rt.stop(c, Duration::from_millis(500)).await.expect("stop");
    assert_eq!(stopped.code, Some(143), "{stopped:?}");
    // A root job never takes a pool sandbox.
    let mut root = req(44, 0, "id -u", 64);
    root.spec.user = "root".into();
    rt.start(root).await.expect("cold start");
    assert_eq!(rt.pool_ready().get("busybox"), Some(&1));
    assert!(rt
        .wait(SandboxId::new(44, 0))
        .await
        .expect("wait")
        .stdout_tail
        .starts_with('0'));

    rt.pool_drain().await;
    for id in [a, b, c, SandboxId::new(44, 0)] {
        rt.remove(id).await.expect("remove");
    }
    let left = leftovers(&rt, &data, &parent);
    assert!(left.is_empty(), "left behind: {left:#?}");
    for m in parse_cgroup_mounts(&std::fs::read_to_string("/proc/self/mountinfo").expect("mi")) {
        let _ = std::fs::remove_dir(m.mount_point.join(parent.trim_matches('/')));
    }
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_new_runtime_clears_pool_sandboxes_a_dead_daemon_left() {
    let Some((rt, data, parent)) = pooled_runtime("leftover") else {
        return;
    };
    assert_eq!(rt.pool_refill().await.expect("fill"), 2);
    drop(rt); // the daemon dies without draining: its pool sandboxes keep running
    let config = ContainerConfig {
        cgroup_parent: parent.clone(),
        ..ContainerConfig::new(&data)
    };
    let rt = ContainerRuntime::new(config).expect("second runtime");
    rt.pool_clear_leftovers().await;
    let left = leftovers(&rt, &data, &parent);
    assert!(left.is_empty(), "left behind: {left:#?}");
    for m in parse_cgroup_mounts(&std::fs::read_to_string("/proc/self/mountinfo").expect("mi")) {
        let _ = std::fs::remove_dir(m.mount_point.join(parent.trim_matches('/')));
    }
    let _ = std::fs::remove_dir_all(&data);
}

// ---- pure parts ----

#[test]
fn warm_pool_flags_are_validated() {
    let p = parse_warm_pool("busybox=4").expect("plain");
    assert_eq!(
        (p.template.as_str(), p.count, p.resources),
        ("busybox", 4, WARM_POOL_DEFAULT)
    );
    let p = parse_warm_pool("py=2:500:128").expect("sized");
    assert_eq!(
        p.resources,
        Resources {
            cpu_millis: 500,
            memory_mib: 128
        }
    );
    for bad in [
        "busybox",
        "busybox=x",
        "busybox=100000",
        "=3",
        "../x=1",
        "b=1:500",
        "b=1:0:64",
        "b=1:5:1:2",
    ] {
        assert!(parse_warm_pool(bad).is_err(), "{bad} accepted");
    }
    let twice = [
        parse_warm_pool("a=1").expect("a"),
        parse_warm_pool("a=2").expect("a"),
    ];
    assert!(validate_warm_pools(&twice).is_err());
}

#[test]
fn the_pool_reserves_what_it_holds_when_full() {
    let specs = [
        parse_warm_pool("a=4").expect("a"),
        parse_warm_pool("b=2:500:128").expect("b"),
    ];
    assert_eq!(
        reservation(&specs),
        Resources {
            cpu_millis: 4 * 1000 + 2 * 500,
            memory_mib: 4 * 256 + 2 * 128
        }
    );
    assert_eq!(reservation(&[]), Resources::default());
}

#[test]
fn spec_messages_are_framed_and_bounded() {
    let m = spec_message(&["sh".into(), "-c".into(), "x".into()], &["A=1".into()]).expect("small");
    assert_eq!(m, b"14\n3\0sh\0-c\0x\0A=1\0".to_vec());
    assert_eq!(spec_message(&[], &[]).expect("empty"), b"2\n0\0".to_vec());
    assert!(spec_message(&["a\0b".into()], &[]).is_none());
    assert!(spec_message(&["x".repeat(SPEC_MESSAGE_MAX)], &[]).is_none());
}

#[test]
fn v2_weights_follow_crun() {
    assert_eq!(cpu_weight(2), 1);
    assert_eq!(cpu_weight(262_144), 10_000);
    assert_eq!(cpu_weight(1024), 39);
}
