//! Checkpoint and restore of real container sandboxes with the vendored CRIU + crun
//! (`scripts/setup-criu`; root, busybox-static). Where the kit is missing the tests are skipped
//! with a message, and fail in CI (`testing::unavailable`).
//!
//! The sandboxes run as uid 0 (no capabilities, no_new_privs): on these machines root lacks
//! CAP_SYS_RESOURCE, and CRIU cannot dump a process of another uid without it.

use std::path::Path;

use super::checkpoint::{image_dir, CriuKit, KIT_PREFIX_DEFAULT};
use super::tests::req;
use super::tests_io::{run, spec};
use super::*;
use crate::testing::{is_root, unavailable};

pub(super) fn runtime(test: &str) -> Option<(ContainerRuntime, PathBuf)> {
    if !is_root() {
        unavailable(&format!("{test}: needs root (namespaces, cgroups, CRIU)"));
        return None;
    }
    let kit = match CriuKit::probe(Path::new(KIT_PREFIX_DEFAULT)) {
        Ok(k) => k,
        Err(why) => {
            unavailable(&format!("{test}: {why}"));
            return None;
        }
    };
    let data = std::env::temp_dir().join(format!("surge-ck-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let config = ContainerConfig {
        sandbox_uid: 0,
        sandbox_gid: 0,
        criu: Ok(kit),
        // Each test its own cgroup parent, as each node daemon has (`/surge/<node id>`).
        cgroup_parent: format!("/surge-ck-{test}"),
        ..ContainerConfig::new(&data)
    };
    Some((
        ContainerRuntime::new(config).expect("container runtime"),
        data,
    ))
}

/// The numbers a counter loop printed so far.
pub(super) fn printed(data: &Path, id: SandboxId) -> Vec<u64> {
    let log = data
        .join("sandboxes")
        .join(id.to_string())
        .join("stdout.log");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub(super) async fn until_printed(data: &Path, id: SandboxId, at_least: usize) {
    for _ in 0..600 {
        if printed(data, id).len() >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{id} printed {:?}, wanted {at_least} lines",
        printed(data, id)
    );
}

pub(super) const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done";

#[tokio::test]
async fn a_counter_continues_across_checkpoints_and_exec_works_after() {
    let Some((rt, data)) = runtime("counter") else {
        return;
    };
    let id = SandboxId::new(91, 0);
    rt.start(req(91, 0, COUNTER, 64)).await.expect("start");
    let mut seen = 3;
    for cycle in 0..3 {
        until_printed(&data, id, seen).await;
        let bytes = rt.checkpoint(id).await.expect("checkpoint");
        assert!(bytes > 0, "cycle {cycle}: an empty image");
        let o = rt.status(id).await.expect("status");
        assert_eq!(o.state, ObservedState::Checkpointed { image_bytes: bytes });
        let bundle = data.join("sandboxes").join(id.to_string());
        for f in std::fs::read_dir(image_dir(&bundle)).expect("image") {
            let mode = f.expect("entry").metadata().expect("stat").permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
                0,
                "image files are private"
            );
        }
        // Stopped: nothing is printed while it is checkpointed.
        let before = printed(&data, id);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            printed(&data, id),
            before,
            "cycle {cycle}: it ran while checkpointed"
        );
        rt.restore(id).await.expect("restore");
        assert_eq!(
            rt.status(id).await.expect("status").state,
            ObservedState::Running
        );
        assert!(
            !image_dir(&bundle).exists(),
            "the image goes after a restore"
        );
        // ... and its bytes too: the retired copy is deleted in the background.
        let retired = || {
            std::fs::read_dir(bundle.join("checkpoint"))
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with("retired-"))
                        .count()
                })
                .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while retired() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            retired(),
            0,
            "cycle {cycle}: the retired image was never deleted"
        );
        seen = before.len() + 3;
    }
    until_printed(&data, id, seen).await;
    let ran = run(
        &rt,
        id,
        spec(&[
            "/bin/sh",
            "-c",
            "echo after; ls /sys/class/net; cat /sys/class/net/lo/flags",
        ]),
        &[],
    )
    .await;
    assert!(ran.status.is_ok(), "exec after restore: {:?}", ran.status);
    // Its own network namespace (only lo), kept across the restores, with lo up (IFF_UP 0x1).
    assert_eq!(ran.stdout, "after\nlo\n0x9\n", "{}", ran.stderr);
    let numbers = printed(&data, id);
    let expected: Vec<u64> = (1..=u64::try_from(numbers.len()).expect("len")).collect();
    assert_eq!(
        numbers, expected,
        "no gap and no repeat across three restores"
    );
    let _ = rt.stop(id, Duration::from_millis(200)).await;
    rt.remove(id).await.expect("forget");
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_damaged_image_fails_the_restore_and_the_sandbox_ends() {
    let Some((rt, data)) = runtime("damaged") else {
        return;
    };
    let id = SandboxId::new(92, 0);
    rt.start(req(92, 0, COUNTER, 64)).await.expect("start");
    until_printed(&data, id, 2).await;
    rt.checkpoint(id).await.expect("checkpoint");
    let bundle = data.join("sandboxes").join(id.to_string());
    for f in std::fs::read_dir(image_dir(&bundle)).expect("image") {
        let f = f.expect("entry").path();
        if f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
        {
            std::fs::write(&f, b"garbage").expect("damage");
        }
    }
    std::fs::remove_file(image_dir(&bundle).join("pstree.img")).expect("damage pstree");
    let e = rt
        .restore(id)
        .await
        .expect_err("a damaged image cannot restore");
    assert!(e.to_string().contains("restore failed"), "{e}");
    let state = rt.status(id).await.expect("status").state;
    assert!(state.is_terminal(), "{state:?}");
    rt.remove(id).await.expect("forget");
    // Nothing is left behind that stops the same sandbox id from starting again.
    rt.start(req(92, 0, COUNTER, 64))
        .await
        .expect("the same id starts after a failed restore");
    let _ = rt.stop(id, Duration::from_millis(200)).await;
    rt.remove(id).await.expect("forget");
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_full_disk_during_a_dump_leaves_the_sandbox_running() {
    let Some((rt, data)) = runtime("fulldisk") else {
        return;
    };
    let id = SandboxId::new(93, 0);
    // 8 MiB in its /tmp (a tmpfs CRIU saves) and a counter.
    let script = format!("dd if=/dev/urandom of=/tmp/blob bs=1M count=8 2>/dev/null; {COUNTER}");
    rt.start(req(93, 0, &script, 64)).await.expect("start");
    until_printed(&data, id, 2).await;
    let top = data
        .join("sandboxes")
        .join(id.to_string())
        .join("checkpoint");
    std::fs::create_dir_all(&top).expect("mkdir");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&top)
        .status()
        .expect("mount");
    assert!(status.success());
    let e = rt.checkpoint(id).await.expect_err("no room for the image");
    let _ = std::process::Command::new("umount").arg(&top).status();
    assert!(e.to_string().contains("cannot checkpoint"), "{e}");
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Running
    );
    let n = printed(&data, id).len();
    until_printed(&data, id, n + 3).await;
    let _ = rt.stop(id, Duration::from_millis(200)).await;
    rt.remove(id).await.expect("forget");
    let _ = std::fs::remove_dir_all(&data);
}
