//! The node daemon's building blocks: what runs sandboxes on a bare-metal host.
//!
//! ```text
//!   desired set (from the scheduler) ─┐
//!                                     ├─► reconcile (pure) ─► actions ─► Runtime (container | sim)
//!   observed sandboxes (Runtime::list)┘                                    │
//!                                           OOM prevention: grow memory ◄──┘ usage near limit
//! ```
//!
//! - [`reconcile`]: desired vs observed -> actions; a pure function, property-tested.
//! - [`runtime`]: the `Runtime` trait and its implementations: `container` (crun, namespaces,
//!   cgroups v1/v2, freezer pause, live resize, OOM prevention) and `sim` (no process; for scale
//!   tests and benchmarks).
//! - [`template`]: root filesystems sandboxes boot from (a default busybox one out of the box).
//! - [`agent`]: the `surge node` daemon: session with the scheduler, one owner task per sandbox,
//!   batched status reports, metrics.
//! - [`detect`]: host CPUs, memory, and whether hardware virtualization is really there.
//! - [`testing`]: for tests here and in other crates: [`testing::unavailable`] skips a test on
//!   a host without root, crun or busybox, and fails it in CI.

pub mod agent;
pub mod detect;
pub mod reconcile;
pub mod runtime;
pub mod template;
pub mod testing;
