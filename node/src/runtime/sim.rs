//! The simulated runtime: no process, no files. A sandbox "runs" for the duration of its
//! [`SimProfile`], exits with the profile's code, and uses memory along a ramp so that OOM
//! prevention can be exercised. Time is tokio time: tests call `tokio::time::pause()` and a
//! thousand sandboxes that run for an hour finish in milliseconds.
//!
//! Cost per sandbox is one map entry (~200 bytes) and one `Notify`; no task is spawned per sandbox,
//! states are computed lazily from the clock when someone looks. One process can therefore host
//! hundreds of simulated nodes with thousands of sandboxes each.
//!
//! Every operation also has a synchronous form (`start_now`, `stop_now`, ...): nothing in the
//! simulation waits on anything but the clock, so a caller that tracks the clock itself (the
//! simulated fleet of `agent::fleet`, one timer queue per node instead of a task and a timer per
//! sandbox) can drive thousands of sandboxes from one task. A stop that takes time (SIGTERM
//! handled after a while, or SIGKILL after the grace) is an event at a deadline like an exit:
//! [`SimRuntime::deadline_of`] says when to look again and [`SimRuntime::ended`] what happened.

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

/// The running time of a sandbox with no command: it never ends by itself.
pub const LONG_LIVED: Duration = Duration::MAX;

type ProfileFn = dyn Fn(&StartRequest) -> SimProfile + Send + Sync;

/// See the module docs.
pub struct SimRuntime {
    sandboxes: Mutex<HashMap<SandboxId, SimSandbox>>,
    profile: Box<ProfileFn>,
    start_delay: Duration,
    /// Exec and files ([`io`]).
    io: io::SimIo,
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
    /// A stop in progress: the instant the sandbox ends and the exit code it ends with.
    term_at: Option<(Instant, i32)>,
    changed: Arc<Notify>,
}

/// What [`SimRuntime::stop_now`] led to.
#[derive(Debug)]
pub enum SimStop {
    /// The sandbox has ended (now, or before the stop).
    Exited(ExitReport),
    /// It ends at this instant: it handles SIGTERM by then, or is killed when the grace is up.
    EndsAt(Instant),
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

    /// Bring the state up to `now`: the first event due (its own end, or the end of a stop in
    /// progress) happens, at the instant it was due.
    fn settle(&mut self, now: Instant) {
        if self.done.is_some() {
            return;
        }
        let natural_at = self.natural_deadline().filter(|at| *at <= now);
        let term = self.term_at.filter(|(at, _)| *at <= now);
        match (natural_at, term) {
            (Some(n), Some((t, code))) if t < n => {
                self.finish(t, (ObservedState::Exited { code }, Some(code)));
            }
            (Some(n), _) => {
                let elapsed = self.elapsed(n);
                let outcome = match self.oom_at() {
                    Some(o) if o <= elapsed && o < self.profile.run_for => {
                        (ObservedState::OomKilled, Some(137))
                    }
                    _ => (
                        ObservedState::Exited {
                            code: self.profile.exit_code,
                        },
                        Some(self.profile.exit_code),
                    ),
                };
                self.finish(n, outcome);
            }
            (None, Some((t, code))) => {
                self.finish(t, (ObservedState::Exited { code }, Some(code)));
            }
            (None, None) => {}
        }
    }

    fn finish(&mut self, now: Instant, outcome: (ObservedState, Option<i32>)) {
        self.ran = self.elapsed(now);
        self.running_since = None;
        self.term_at = None;
        self.done = Some(outcome);
        self.changed.notify_waiters();
    }

    /// Wall-clock instant at which it ends by itself, while running.
    fn natural_deadline(&self) -> Option<Instant> {
        if self.done.is_some() {
            return None;
        }
        let since = self.running_since?;
        let next = self.next_event();
        if next == LONG_LIVED {
            return None;
        }
        since.checked_add(next.saturating_sub(self.ran))
    }

    /// Wall-clock instant of the next event: its own end, or the end of a stop in progress.
    fn deadline(&self) -> Option<Instant> {
        if self.done.is_some() {
            return None;
        }
        let term = self.term_at.map(|(at, _)| at);
        match (self.natural_deadline(), term) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
            io: io::SimIo::default(),
        }
    }

    /// What every exec does: wait `delay`, print `stdout`, exit 0.
    pub fn with_exec(mut self, delay: Duration, stdout: bytes::Bytes) -> Self {
        self.io.exec = io::SimExec { delay, stdout };
        self
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

impl SimRuntime {
    /// [`Runtime::start`] at once: the start delay (a knob of the async form) is not applied.
    pub fn start_now(&self, req: &StartRequest) -> Result<SandboxHandle, RuntimeError> {
        let mut profile = (self.profile)(req);
        if req.spec.command.is_empty() {
            // No command: long-lived, it runs until stopped (its memory ramp still applies).
            profile.run_for = LONG_LIVED;
        }
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
                term_at: None,
                changed: Arc::new(Notify::new()),
            },
        );
        Ok(SandboxHandle {
            id: req.id,
            generation: req.generation,
            pid: None,
        })
    }

    /// Ask the sandbox to stop (SIGTERM, then SIGKILL after `grace`). A paused sandbox is thawed
    /// so it can handle SIGTERM. A stop already in progress keeps its earlier end.
    pub fn stop_now(&self, id: SandboxId, grace: Duration) -> Result<SimStop, RuntimeError> {
        self.with(id, |sb, now| {
            if sb.done.is_some() {
                return SimStop::Exited(sb.report(id));
            }
            if sb.running_since.is_none() {
                sb.running_since = Some(now); // thawed so SIGTERM can be handled
            }
            let (after, code) = match sb.profile.term_exit_after {
                Some(after) if after <= grace => (after, 128 + 15),
                _ => (grace, 128 + 9),
            };
            if after.is_zero() {
                sb.finish(now, (ObservedState::Exited { code }, Some(code)));
                return SimStop::Exited(sb.report(id));
            }
            let at = now + after;
            match sb.term_at {
                Some((earlier, _)) if earlier <= at => {}
                _ => sb.term_at = Some((at, code)),
            }
            sb.changed.notify_waiters();
            SimStop::EndsAt(sb.deadline().unwrap_or(at))
        })
    }

    pub fn pause_now(&self, id: SandboxId) -> Result<(), RuntimeError> {
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

    pub fn resume_now(&self, id: SandboxId) -> Result<(), RuntimeError> {
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

    pub fn resize_now(
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

    pub fn status_now(&self, id: SandboxId) -> Result<ObservedSandbox, RuntimeError> {
        self.with(id, |sb, _| sb.observed(id))
    }

    pub fn usage_now(&self, id: SandboxId) -> Result<Usage, RuntimeError> {
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

    pub fn remove_now(&self, id: SandboxId) -> Result<(), RuntimeError> {
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
        drop(map);
        self.io.forget(id);
        Ok(())
    }

    /// When something next happens to `id` by itself (its end, or the end of a stop), while it
    /// lives. `None`: it has ended, or it is paused and nothing happens until it is resumed.
    pub fn deadline_of(&self, id: SandboxId) -> Result<Option<Instant>, RuntimeError> {
        self.with(id, |sb, _| sb.deadline())
    }

    /// How incarnation `generation` of `id` ended, if it has (what [`Runtime::wait`] returns).
    /// `None` while it lives, or when the runtime holds another incarnation.
    pub fn ended(
        &self,
        id: SandboxId,
        generation: u64,
    ) -> Result<Option<ExitReport>, RuntimeError> {
        self.with(id, |sb, _| {
            (sb.generation == generation && sb.done.is_some()).then(|| sb.report(id))
        })
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
        self.start_now(&req)
    }

    async fn stop(&self, id: SandboxId, grace: Duration) -> Result<ExitReport, RuntimeError> {
        let at = match self.stop_now(id, grace)? {
            SimStop::Exited(report) => return Ok(report),
            SimStop::EndsAt(at) => at,
        };
        tokio::time::sleep_until(at).await;
        // `with` settles the sandbox at the current instant, past the stop's end.
        self.with(id, |sb, _| sb.report(id))
    }

    async fn pause(&self, id: SandboxId) -> Result<(), RuntimeError> {
        self.pause_now(id)
    }

    async fn resume(&self, id: SandboxId) -> Result<(), RuntimeError> {
        self.resume_now(id)
    }

    async fn resize(
        &self,
        id: SandboxId,
        resources: Resources,
        revision: u64,
    ) -> Result<(), RuntimeError> {
        self.resize_now(id, resources, revision)
    }

    async fn status(&self, id: SandboxId) -> Result<ObservedSandbox, RuntimeError> {
        self.status_now(id)
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
        self.usage_now(id)
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
        self.remove_now(id)
    }
}

mod io;
#[cfg(test)]
mod tests;
