//! Fault injection and invariant checking against real multi-process surge clusters.
//!
//! [`cluster::LocalCluster`] runs replicas as separate `surge server` processes on loopback, each
//! with its own RocksDB data dir, and can kill (`SIGKILL`), pause (`SIGSTOP`), restart, wipe and
//! re-add them. `surge dev`, `surge bench` and the cluster tests all drive real clusters through it.
//! `surge chaos` ([`run`]) adds simulated and container node daemons, a workload, faults on a
//! seeded schedule and the [`checker`]s; [`sim`] is the deterministic simulator.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod containers;
pub mod faults;
pub mod history;
pub mod holdings;
pub mod memory;
pub mod netns;
pub mod report;
pub mod run;
pub mod sim;
pub mod workload;
