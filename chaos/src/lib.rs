//! Fault injection and invariant checking against real multi-process surge clusters, and the
//! deterministic simulator.
//!
//! The clusters come from `surge-harness` ([`surge_harness::cluster::LocalCluster`]: replicas as
//! separate `surge server` processes on loopback, which it can kill, pause, restart, wipe and
//! re-add). `surge chaos` ([`run`]) adds simulated and container node daemons, a workload, faults
//! on a seeded schedule ([`faults`]) and the [`checker`]s over the recorded [`history`]; [`sim`]
//! is the deterministic simulator, on tokio's paused clock. This crate is a tool, not part of the
//! product: its binary is `surge-chaos` (which `surge chaos` runs), so the `surge` binary links
//! neither the fault injector nor tokio's `test-util`.

pub mod checker;
pub mod faults;
pub mod history;
pub mod holdings;
pub mod lid;
pub mod memory;
pub mod report;
pub mod run;
pub mod sim;
pub mod workload;
