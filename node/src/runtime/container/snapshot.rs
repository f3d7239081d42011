//! `surge snapshot`: a running container sandbox's filesystem as a new template.
//!
//! The sandbox's root is an overlay (template below, the sandbox's writes in `upper/`) that
//! stays mounted in the host's mount namespace under the bundle's `rootfs/`; its merged view is
//! exactly the filesystem the sandbox sees (its own mounts — /proc, /dev, tmpfs — live in its
//! mount namespace and are not in it). The sandbox is frozen with the cgroup freezer
//! (`crun pause`) while `cp -a` copies that view into a staging directory, so the copy is one
//! instant of it, and thawed as soon as the copy ends, whether it succeeded or not. The copy
//! is then checked and renamed into place like any import.
//!
//! Why the merged view and not just `upper/` (smaller, and quicker to copy): a template must
//! stand alone — `surge template copy` sends it to nodes that may not hold the template below,
//! and a template made of whiteouts over another could not be used without it. The freeze
//! lasts as long as the copy; the template caps bound that (and a tree past them is refused
//! before the sandbox is frozen).

use std::ffi::OsStr;
use std::time::Instant;

use super::{container_id, ContainerRuntime};
use crate::runtime::io::{IoError, SnapshotStats};
use crate::runtime::SandboxId;
use crate::template::{copy_tree, Templates};

impl ContainerRuntime {
    pub(super) async fn snapshot_rootfs(
        &self,
        id: SandboxId,
        templates: Templates,
        name: String,
    ) -> Result<SnapshotStats, IoError> {
        let (sb, _) = self.running(id).await?;
        let rootfs = sb.file("rootfs");
        let blocking = |e: tokio::task::JoinError| IoError::Runtime(format!("snapshot task: {e}"));
        let staging = {
            let (t, n) = (templates.clone(), name.clone());
            tokio::task::spawn_blocking(move || t.stage(&n))
                .await
                .map_err(blocking)??
        };
        let cid = container_id(id);
        self.crun
            .run(&[OsStr::new("pause"), OsStr::new(&cid)])
            .await
            .map_err(|e| IoError::Runtime(format!("freeze sandbox {id} for the snapshot: {e}")))?;
        let frozen_at = Instant::now();
        let from = rootfs.clone();
        let copied = tokio::task::spawn_blocking(move || {
            copy_tree(&from, &staging).map(|size| (size, staging))
        })
        .await;
        let frozen = frozen_at.elapsed();
        // Thawed whatever the copy did; a sandbox left frozen by a snapshot would be a bug
        // nobody asked for.
        let thawed = self
            .crun
            .run(&[OsStr::new("resume"), OsStr::new(&cid)])
            .await;
        if let Err(e) = &thawed {
            tracing::error!(sandbox = %id, error = %e, "could not thaw a sandbox after its snapshot");
        }
        let (size, staging) = copied.map_err(blocking)??;
        thawed
            .map_err(|e| IoError::Runtime(format!("thaw sandbox {id} after the snapshot: {e}")))?;
        tokio::task::spawn_blocking(move || staging.commit(&rootfs))
            .await
            .map_err(blocking)??;
        tracing::info!(sandbox = %id, template = %name, bytes = size.bytes, entries = size.entries,
            frozen_ms = frozen.as_millis(), "snapshot taken");
        Ok(SnapshotStats { size, frozen })
    }
}
