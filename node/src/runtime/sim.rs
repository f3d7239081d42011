//! The simulated runtime: no process, no files. A sandbox "runs" for the duration of its
//! [`SimProfile`], exits with the profile's code, and uses memory along a ramp so that OOM
//! prevention can be exercised. Time is tokio time: tests call `tokio::time::pause()` and a
//! thousand sandboxes that run for an hour finish in milliseconds.
//!
//! Cost per sandbox is one map entry (~200 bytes) and one `Notify`; no task is spawned per sandbox,
//! states are computed lazily from the clock when someone looks. One process can therefore host
//! hundreds of simulated nodes with thousands of sandboxes each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    ExitReport, ObservedSandbox, ObservedState, Resources, Runtime, RuntimeError, SandboxHandle,
    SandboxId, StartRequest, Usage, MIB,
};

/// How a simulated sandbox behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimProfile {
    /// Running time (pauses excluded) until it exits by itself.
    pub run_for: Duration,
    pub exit_code: i32,
    /// Memory grows at this rate from zero ...
    pub memory_mib_per_sec: u64,
    /// ... up to this peak. Above the limit the sandbox is OOM-killed.
    pub memory_peak_mib: u64,
    /// Time it needs to exit after SIGTERM; `None` ignores SIGTERM (killed after the grace).
    pub term_exit_after: Option<Duration>,
}

impl Default for SimProfile {
    fn default() -> Self {
        Self {
            run_for: Duration::from_secs(60),
            exit_code: 0,
            memory_mib_per_sec: 0,
            memory_peak_mib: 0,
            term_exit_after: Some(Duration::ZERO),
        }
    }
}

type ProfileFn = dyn Fn(&StartRequest) -> SimProfile + Send + Sync;

/// See the module docs.
pub struct SimRuntime {
    sandboxes: Mutex<HashMap<SandboxId, SimSandbox>>,
    profile: Box<ProfileFn>,
    start_delay: Duration,
}

#[derive(Debug)]
struct SimSandbox {
    generation: u64,
    revision: u64,
    resources: Resources,
    profile: SimProfile,
    /// Running time accumulated before `running_since`.
    ran: Duration,
    /// `Some` while running, `None` while paused or done.
    running_since: Option<Instant>,
    done: Option<(ObservedState, Option<i32>)>,
    changed: Arc<Notify>,
}

impl SimSandbox {
    fn elapsed(&self, now: Instant) -> Duration {
        self.ran
            + self
                .running_since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }

    fn memory_mib_at(&self, elapsed: Duration) -> u64 {
        let ramp = u128::from(self.profile.memory_mib_per_sec) * elapsed.as_millis() / 1000;
        u64::try_from(ramp)
            .unwrap_or(u64::MAX)
            .min(self.profile.memory_peak_mib)
    }

    /// Running time at which memory crosses the limit, if it ever does.
    fn oom_at(&self) -> Option<Duration> {
        if self.profile.memory_peak_mib <= self.resources.memory_mib {
            return None;
        }
        if self.profile.memory_mib_per_sec == 0 {
            return Some(Duration::ZERO);
        }
        let ms =
            (self.resources.memory_mib + 1).saturating_mul(1000) / self.profile.memory_mib_per_sec;
        Some(Duration::from_millis(ms))
    }

    /// The next running-time instant at which something happens by itself.
    fn next_event(&self) -> Duration {
        self.oom_at()
            .map_or(self.profile.run_for, |o| o.min(self.profile.run_for))
    }

    /// Bring the state up to `now`.
    fn settle(&mut self, now: Instant) {
        if self.done.is_some() {
            return;
        }
        let elapsed = self.elapsed(now);
        let outcome = match self.oom_at() {
            Some(o) if o <= elapsed && o < self.profile.run_for => {
                Some((ObservedState::OomKilled, Some(137)))
            }
            _ if elapsed >= self.profile.run_for => Some((
                ObservedState::Exited {
                    code: self.profile.exit_code,
                },
                Some(self.profile.exit_code),
            )),
            _ => None,
        };
        if let Some(o) = outcome {
            self.finish(now, o);
        }
    }

    fn finish(&mut self, now: Instant, outcome: (ObservedState, Option<i32>)) {
        self.ran = self.elapsed(now);
        self.running_since = None;
        self.done = Some(outcome);
        self.changed.notify_waiters();
    }

    /// Wall-clock instant of the next event while running.
    fn deadline(&self) -> Option<Instant> {
        let since = self.running_since?;
        Some(since + self.next_event().saturating_sub(self.ran))
    }

    fn state(&self) -> ObservedState {
        match (&self.done, self.running_since) {
            (Some((s, _)), _) => s.clone(),
            (None, Some(_)) => ObservedState::Running,
            (None, None) => ObservedState::Paused,
        }
    }

    fn observed(&self, id: SandboxId) -> ObservedSandbox {
        ObservedSandbox {
            id,
            generation: self.generation,
            revision: self.revision,
            state: self.state(),
            resources: self.resources,
            owned: false,
        }
    }

    fn report(&self, id: SandboxId) -> ExitReport {
        let (state, code) = self.done.clone().unwrap_or((ObservedState::Running, None));
        ExitReport {
            id,
            generation: self.generation,
            stdout_tail: format!("simulated sandbox {id} ran {} ms\n", self.ran.as_millis()),
            stderr_tail: String::new(),
            state,
            code,
        }
    }
}

impl SimRuntime {
    /// Every sandbox behaves as `profile`.
    pub fn new(profile: SimProfile) -> Self {
        Self::with_profiles(move |_| profile)
    }

    /// Each sandbox's behaviour is chosen from its start request (e.g. by job or by command).
    pub fn with_profiles(
        profile: impl Fn(&StartRequest) -> SimProfile + Send + Sync + 'static,
    ) -> Self {
        Self {
            sandboxes: Mutex::new(HashMap::new()),
            profile: Box::new(profile),
            start_delay: Duration::ZERO,
        }
    }

    /// Simulated start latency.
    pub fn with_start_delay(mut self, delay: Duration) -> Self {
        self.start_delay = delay;
        self
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SandboxId, SimSandbox>> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.sandboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with<T>(
        &self,
        id: SandboxId,
        f: impl FnOnce(&mut SimSandbox, Instant) -> T,
    ) -> Result<T, RuntimeError> {
        let now = Instant::now();
        let mut map = self.lock();
        let sb = map
            .get_mut(&id)
            .ok_or(RuntimeError::NotFound { id, runtime: "sim" })?;
        sb.settle(now);
        Ok(f(sb, now))
    }
}

impl Runtime for SimRuntime {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn start(&self, req: StartRequest) -> Result<SandboxHandle, RuntimeError> {
        if let Some(existing) = self.lock().get(&req.id) {
            return Err(RuntimeError::AlreadyExists {
                id: req.id,
                generation: existing.generation,
            });
        }
        if !self.start_delay.is_zero() {
            tokio::time::sleep(self.start_delay).await;
        }
        let profile = (self.profile)(&req);
        let mut map = self.lock();
        if let Some(existing) = map.get(&req.id) {
            return Err(RuntimeError::AlreadyExists {
                id: req.id,
                generation: existing.generation,
            });
        }
        map.insert(
            req.id,
            SimSandbox {
                generation: req.generation,
                revision: req.revision,
                resources: req.resources,
                profile,
                ran: Duration::ZERO,
                running_since: Some(Instant::now()),
                done: None,
                changed: Arc::new(Notify::new()),
            },
        );
        Ok(SandboxHandle {
            id: req.id,
            generation: req.generation,
            pid: None,
        })
    }

    async fn stop(&self, id: SandboxId, grace: Duration) -> Result<ExitReport, RuntimeError> {
        let (delay, code) = self
            .with(id, |sb, now| {
                if sb.done.is_some() {
                    return None;
                }
                if sb.running_since.is_none() {
                    sb.running_since = Some(now); // thawed so SIGTERM can be handled
                }
                Some(match sb.profile.term_exit_after {
                    Some(after) if after <= grace => (after, 128 + 15),
                    _ => (grace, 128 + 9),
                })
            })?
            .unwrap_or((Duration::ZERO, 0));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.with(id, |sb, now| {
            if sb.done.is_none() {
                sb.finish(now, (ObservedState::Exited { code }, Some(code)));
            }
            sb.report(id)
        })
    }

    async fn pause(&self, id: SandboxId) -> Result<(), RuntimeError> {
        self.with(id, |sb, now| match sb.state() {
            ObservedState::Running => {
                sb.ran = sb.elapsed(now);
                sb.running_since = None;
                sb.changed.notify_waiters();
                Ok(())
            }
            ObservedState::Paused => Ok(()),
            state => Err(RuntimeError::WrongState {
                id,
                state,
                operation: "pause",
            }),
        })?
    }

    async fn resume(&self, id: SandboxId) -> Result<(), RuntimeError> {
        self.with(id, |sb, now| match sb.state() {
            ObservedState::Paused => {
                sb.running_since = Some(now);
                sb.changed.notify_waiters();
                Ok(())
            }
            ObservedState::Running => Ok(()),
            state => Err(RuntimeError::WrongState {
                id,
                state,
                operation: "resume",
            }),
        })?
    }

    async fn resize(
        &self,
        id: SandboxId,
        resources: Resources,
        revision: u64,
    ) -> Result<(), RuntimeError> {
        self.with(id, |sb, now| {
            if let Some((state, _)) = &sb.done {
                return Err(RuntimeError::WrongState {
                    id,
                    state: state.clone(),
                    operation: "resize",
                });
            }
            sb.resources = resources;
            sb.revision = revision;
            // A shrink below current usage OOM-kills, as the kernel would.
            if sb.memory_mib_at(sb.elapsed(now)) > resources.memory_mib {
                sb.finish(now, (ObservedState::OomKilled, Some(137)));
            }
            sb.changed.notify_waiters();
            Ok(())
        })?
    }

    async fn status(&self, id: SandboxId) -> Result<ObservedSandbox, RuntimeError> {
        self.with(id, |sb, _| sb.observed(id))
    }

    async fn wait(&self, id: SandboxId) -> Result<ExitReport, RuntimeError> {
        loop {
            let step = self.with(id, |sb, _| match sb.done {
                Some(_) => Err(sb.report(id)),
                None => Ok((sb.changed.clone(), sb.deadline())),
            })?;
            let (changed, deadline) = match step {
                Err(report) => return Ok(report),
                Ok(next) => next,
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering, so a change between the two locks is not missed.
            if self.with(id, |sb, _| sb.done.is_some() || sb.deadline() != deadline)? {
                continue;
            }
            match deadline {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn usage(&self, id: SandboxId) -> Result<Usage, RuntimeError> {
        self.with(id, |sb, now| {
            let elapsed = sb.elapsed(now);
            let live = sb.done.is_none();
            Usage {
                memory_bytes: if live {
                    sb.memory_mib_at(elapsed) * MIB
                } else {
                    0
                },
                memory_limit_bytes: sb.resources.memory_mib * MIB,
                cpu_usage_ns: u64::try_from(
                    elapsed.as_nanos() * u128::from(sb.resources.cpu_millis) / 1000,
                )
                .unwrap_or(u64::MAX),
            }
        })
    }

    async fn list(&self) -> Result<Vec<ObservedSandbox>, RuntimeError> {
        let now = Instant::now();
        let mut map = self.lock();
        let mut out: Vec<_> = map
            .iter_mut()
            .map(|(id, sb)| {
                sb.settle(now);
                sb.observed(*id)
            })
            .collect();
        out.sort_by_key(|o| o.id);
        Ok(out)
    }

    async fn remove(&self, id: SandboxId) -> Result<(), RuntimeError> {
        let now = Instant::now();
        let mut map = self.lock();
        let sb = map
            .get_mut(&id)
            .ok_or(RuntimeError::NotFound { id, runtime: "sim" })?;
        sb.settle(now);
        if sb.done.is_none() {
            return Err(RuntimeError::WrongState {
                id,
                state: sb.state(),
                operation: "forget",
            });
        }
        map.remove(&id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
}
