//! Local surge clusters and the engines that drive them: what `surge dev`, `surge bench`, the
//! chaos tool and the cluster tests share.
//!
//! - [`cluster::LocalCluster`]: replicas as separate `surge server` processes on loopback (or on
//!   network namespaces, [`netns`]), each with its own RocksDB data dir; kill, pause, restart,
//!   wipe and re-add them, and start simulated or container node daemons beside them.
//! - [`containers`]: whether this host can run container node daemons, what crun runs for them,
//!   and removing everything they leave behind.
//! - [`etcd`]: an etcd cluster on loopback, the peer `surge bench raft` compares itself with.
//! - [`bench`]: the engines of `surge bench` (raft, failover, burst); [`demo`] and [`dev`]:
//!   `surge dev` and its demo burst; [`tracker`]: the one burst tracker they all count with.
//! - [`output`]: tables for people, JSON for programs, shared by `surge` and `surge-chaos`.
//!
//! Everything here talks to the clusters it starts through `surge-client`. The engines report
//! with `anyhow`: this crate is tooling around the product, like its tests.

pub mod bench;
pub mod cluster;
pub mod containers;
pub mod demo;
pub mod dev;
pub mod dev_secure;
pub mod etcd;
pub mod netns;
pub mod output;
pub mod rolling;
pub mod tracker;

use std::path::PathBuf;

/// The `surge` binary a harness starts replicas and node daemons from: `SURGE_BIN` when set,
/// else the `surge` beside the running executable (the `surge` binary itself, `surge-chaos`
/// next to it, or a test binary in `target/*/deps` whose `surge` is one level up).
pub fn surge_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SURGE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?;
    if exe.file_name().is_some_and(|n| n == "surge") {
        return Ok(exe);
    }
    for candidate in [dir.join("surge"), dir.join("../surge")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "no `surge` binary beside {} (build the workspace, or set SURGE_BIN)",
        exe.display()
    )
}
