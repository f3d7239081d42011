//! Forks of real container sandboxes with the vendored CRIU + crun (see `tests_checkpoint`:
//! root, the kit, sandboxes as uid 0; skipped with a message where the kit is missing, failed in
//! CI).

use super::tests::req;
use super::tests_checkpoint::{printed, runtime, until_printed, COUNTER};
use super::tests_io::{run, spec};
use super::*;

async fn sh(rt: &ContainerRuntime, id: SandboxId, script: &str) -> String {
    let ran = run(rt, id, spec(&["/bin/sh", "-c", script]), &[]).await;
    assert!(ran.status.is_ok(), "{id}: {script}: {:?}", ran.status);
    ran.stdout
}

#[tokio::test]
async fn a_fork_of_three_continues_the_counter_with_independent_filesystems() {
    let Some((rt, data)) = runtime("fork") else {
        return;
    };
    let source = SandboxId::new(95, 0);
    rt.start(req(95, 0, COUNTER, 64)).await.expect("start");
    sh(&rt, source, "echo prepared > /work/prepared").await;
    until_printed(&data, source, 5).await;

    let forks: Vec<SandboxId> = (0..3).map(|i| SandboxId::new(96, i)).collect();
    let started = futures::future::join_all(
        forks
            .iter()
            .map(|f| rt.fork(source, 96, req(96, f.index, "unused", 64))),
    )
    .await;
    for (f, s) in forks.iter().zip(started) {
        let h = s.unwrap_or_else(|e| panic!("fork {f}: {e}"));
        assert_eq!(h.id, *f);
    }
    assert_eq!(
        rt.status(source).await.expect("status").state,
        ObservedState::Running,
        "the source keeps running"
    );

    // Each fork continues the source's counter from the same instant, without a gap.
    let mut firsts = Vec::new();
    for f in &forks {
        until_printed(&data, *f, 3).await;
        let numbers = printed(&data, *f);
        let first = numbers[0];
        let expected: Vec<u64> =
            (first..first + u64::try_from(numbers.len()).expect("len")).collect();
        assert_eq!(numbers, expected, "{f}: a gap or a repeat");
        firsts.push(first);
    }
    assert!(
        firsts[0] > 5,
        "the forks start where the source was: {firsts:?}"
    );
    assert!(
        firsts.iter().all(|&x| x == firsts[0]),
        "one checkpoint for all: {firsts:?}"
    );
    let src_numbers = printed(&data, source);
    assert!(
        src_numbers.contains(&(firsts[0] - 1)),
        "the source printed {} before the fork",
        firsts[0] - 1
    );

    // Each has its own filesystem (the source's files at the fork) and identity.
    for f in &forks {
        sh(
            &rt,
            *f,
            &format!("echo {} > /work/mine-{}", f.index, f.index),
        )
        .await;
    }
    sh(&rt, source, "echo later > /work/source-later").await;
    for f in &forks {
        let files = sh(&rt, *f, "ls /work; cat /work/prepared").await;
        let want = format!("mine-{}\nprepared\nprepared\n", f.index);
        assert_eq!(files, want, "{f} sees only its own writes");
        assert_eq!(
            sh(&rt, *f, "hostname").await.trim(),
            format!("sb-96-{}", f.index)
        );
    }
    assert_eq!(
        sh(&rt, source, "ls /work").await,
        "prepared\nsource-later\n",
        "the source sees no fork's writes"
    );
    assert_eq!(sh(&rt, source, "hostname").await.trim(), "sb-95-0");

    // They diverge: stopping one leaves the others and the source running.
    let _ = rt.stop(forks[0], Duration::from_millis(200)).await;
    for f in &forks[1..] {
        let n = printed(&data, *f).len();
        until_printed(&data, *f, n + 2).await;
    }
    for id in forks.iter().chain([&source]) {
        let _ = rt.stop(*id, Duration::from_millis(200)).await;
        rt.remove(*id).await.expect("forget");
    }
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_fork_of_a_sandbox_that_is_not_running_fails_clearly() {
    let Some((rt, data)) = runtime("forkgone") else {
        return;
    };
    let e = rt
        .fork(SandboxId::new(97, 0), 98, req(98, 0, "unused", 64))
        .await
        .expect_err("no source");
    assert!(e.to_string().contains("97"), "{e}");
    let _ = std::fs::remove_dir_all(&data);
}
