use super::*;
use crate::reconcile::SandboxSpec;
use crate::runtime::{guard_memory, MemoryGrowthPolicy, MemoryHeadroom};

fn req(job: u64, index: u32, memory_mib: u64) -> StartRequest {
    StartRequest {
        id: SandboxId::new(job, index),
        generation: 1,
        revision: 1,
        spec: SandboxSpec {
            template: "busybox".into(),
            command: vec!["sim".into()],
            ..Default::default()
        },
        resources: Resources {
            cpu_millis: 1000,
            memory_mib,
        },
    }
}

fn profile(run_secs: u64, code: i32) -> SimProfile {
    SimProfile {
        run_for: Duration::from_secs(run_secs),
        exit_code: code,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn runs_for_its_duration_then_exits_with_its_code() {
    let rt = SimRuntime::new(profile(30, 3));
    let t0 = Instant::now();
    rt.start(req(1, 0, 64)).await.expect("start");
    assert_eq!(
        rt.status(SandboxId::new(1, 0)).await.expect("status").state,
        ObservedState::Running
    );
    let report = rt.wait(SandboxId::new(1, 0)).await.expect("wait");
    assert_eq!(report.state, ObservedState::Exited { code: 3 });
    assert_eq!(report.code, Some(3));
    assert_eq!(t0.elapsed(), Duration::from_secs(30));
    assert!(matches!(
        rt.start(req(1, 0, 64)).await,
        Err(RuntimeError::AlreadyExists { .. })
    ));
    rt.remove(SandboxId::new(1, 0)).await.expect("forget");
    assert!(rt.is_empty());
}

#[tokio::test(start_paused = true)]
async fn pause_stops_the_clock_of_the_sandbox() {
    let rt = Arc::new(SimRuntime::new(profile(10, 0)));
    let id = SandboxId::new(2, 0);
    rt.start(req(2, 0, 64)).await.expect("start");
    let t0 = Instant::now();
    let waiter = tokio::spawn({
        let rt = rt.clone();
        async move { rt.wait(id).await }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    rt.pause(id).await.expect("pause");
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Paused
    );
    rt.resume(id).await.expect("resume");
    let report = waiter.await.expect("join").expect("wait");
    assert_eq!(report.state, ObservedState::Exited { code: 0 });
    assert_eq!(t0.elapsed(), Duration::from_secs(110));
}

#[tokio::test(start_paused = true)]
async fn stop_is_graceful_then_forced() {
    let rt = SimRuntime::with_profiles(|r| SimProfile {
        term_exit_after: if r.id.index == 0 {
            Some(Duration::from_secs(1))
        } else {
            None
        },
        ..profile(3600, 0)
    });
    rt.start(req(3, 0, 64)).await.expect("start");
    rt.start(req(3, 1, 64)).await.expect("start");
    let t0 = Instant::now();
    let graceful = rt
        .stop(SandboxId::new(3, 0), Duration::from_secs(5))
        .await
        .expect("stop");
    assert_eq!(
        (graceful.code, t0.elapsed()),
        (Some(143), Duration::from_secs(1))
    );
    let forced = rt
        .stop(SandboxId::new(3, 1), Duration::from_secs(5))
        .await
        .expect("stop");
    assert_eq!(
        (forced.code, t0.elapsed()),
        (Some(137), Duration::from_secs(6))
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_stop_is_an_event_at_a_deadline() {
    let rt = SimRuntime::new(SimProfile {
        term_exit_after: Some(Duration::from_secs(2)),
        ..profile(3600, 0)
    });
    let id = SandboxId::new(6, 0);
    let t0 = Instant::now();
    rt.start_now(&req(6, 0, 64)).expect("start");
    assert_eq!(
        rt.deadline_of(id).expect("known"),
        Some(t0 + Duration::from_secs(3600))
    );
    let SimStop::EndsAt(at) = rt.stop_now(id, Duration::from_secs(10)).expect("stop") else {
        panic!("a stop that takes 2 s ends later")
    };
    assert_eq!(at, t0 + Duration::from_secs(2));
    assert_eq!(rt.deadline_of(id).expect("known"), Some(at));
    assert!(rt.ended(id, 1).expect("known").is_none(), "still stopping");
    tokio::time::advance(Duration::from_secs(2)).await;
    let report = rt.ended(id, 1).expect("known").expect("ended");
    assert_eq!(
        (report.state, report.code),
        (ObservedState::Exited { code: 143 }, Some(143))
    );
    assert!(
        rt.ended(id, 2).expect("known").is_none(),
        "not that incarnation"
    );
    assert_eq!(rt.deadline_of(id).expect("known"), None);
    // Stopping an ended sandbox reports how it ended.
    assert!(matches!(
        rt.stop_now(id, Duration::ZERO),
        Ok(SimStop::Exited(r)) if r.code == Some(143)
    ));
    rt.remove_now(id).expect("forget");
    assert!(rt.is_empty());
}

#[tokio::test(start_paused = true)]
async fn memory_ramp_is_oom_killed_unless_the_guard_grows_it() {
    let ramp = SimProfile {
        memory_mib_per_sec: 10,
        memory_peak_mib: 140,
        ..profile(60, 0)
    };
    let rt = SimRuntime::new(ramp);
    // No headroom: OOM-killed when the ramp crosses 100 MiB, at ~10 s.
    let starved = SandboxId::new(4, 0);
    rt.start(req(4, 0, 100)).await.expect("start");
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let none = MemoryHeadroom::new(0);
    let policy = MemoryGrowthPolicy {
        step_min_mib: 32,
        ..Default::default()
    };
    guard_memory(&rt, starved, 1000, &none, policy, tx.clone())
        .await
        .expect("guard");
    assert_eq!(
        rt.wait(starved).await.expect("wait").state,
        ObservedState::OomKilled
    );
    assert!(rx.try_recv().is_err());

    // Headroom: grown before the crossing, runs to completion.
    let fed = SandboxId::new(4, 1);
    rt.start(req(4, 1, 100)).await.expect("start");
    let headroom = MemoryHeadroom::new(1000);
    guard_memory(&rt, fed, 1000, &headroom, policy, tx)
        .await
        .expect("guard");
    assert_eq!(
        rt.wait(fed).await.expect("wait").state,
        ObservedState::Exited { code: 0 }
    );
    let growth = rx.recv().await.expect("a growth was reported");
    assert_eq!(growth.resources.memory_mib, 132);
    // 90% of 132 MiB is crossed at ~12 s: a second step of 25% (33 MiB) follows.
    assert_eq!(
        rx.recv().await.expect("second growth").resources.memory_mib,
        165
    );
    assert_eq!(headroom.available_mib(), 1000 - 32 - 33);
}

#[tokio::test(start_paused = true)]
async fn thousands_of_sandboxes_are_cheap() {
    let rt = Arc::new(SimRuntime::with_profiles(|r| {
        profile(1 + u64::from(r.id.index % 100), 0)
    }));
    for i in 0..5000 {
        rt.start(req(5, i, 64)).await.expect("start");
    }
    let waiters: Vec<_> = (0..5000)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.wait(SandboxId::new(5, i)).await })
        })
        .collect();
    for w in waiters {
        assert_eq!(w.await.expect("join").expect("wait").code, Some(0));
    }
    assert_eq!(rt.list().await.expect("list").len(), 5000);
}

#[tokio::test(start_paused = true)]
async fn a_sandbox_without_a_command_runs_until_it_is_stopped() {
    let rt = SimRuntime::new(profile(1, 0));
    let id = SandboxId::new(9, 0);
    let mut long_lived = req(9, 0, 64);
    long_lived.spec.command.clear();
    rt.start(long_lived).await.expect("start");
    tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)).await;
    assert_eq!(
        rt.status(id).await.expect("status").state,
        ObservedState::Running,
        "a year later it still runs"
    );
    let report = rt.stop(id, Duration::from_secs(5)).await.expect("stop");
    assert!(
        matches!(report.state, ObservedState::Exited { .. }),
        "{report:?}"
    );
}
