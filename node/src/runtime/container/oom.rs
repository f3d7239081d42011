//! OOM evidence of container sandboxes: v1's `memory.oom_control` eventfd watcher and the
//! verdict's question "did the kernel OOM-kill something in it?" (see the module docs of
//! `container`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{ContainerRuntime, Sandbox};
use crate::runtime::cgroup::{
    oom_kill_counted, register_v1_oom_eventfd, watch_v1_oom, OOM_VERDICT_TIMEOUT_MS,
};
use crate::runtime::sandbox_dir::lock;

impl ContainerRuntime {
    /// v1: watch `memory.oom_control` through an eventfd (see the module docs).
    pub(super) fn watch_oom(&self, sb: &Arc<Sandbox>) {
        if sb.cgroup.dirs.v2 {
            return;
        }
        let mut slot = lock(&sb.watcher);
        if slot.is_some() {
            return;
        }
        match register_v1_oom_eventfd(&sb.cgroup.dirs.memory) {
            Ok(efd) => {
                let (tx, rx) = watch::channel(false);
                *slot = Some(rx);
                let memcg = sb.cgroup.dirs.memory.clone();
                let marker = sb.file("oom");
                let id = sb.id;
                tokio::spawn(async move {
                    if let Err(e) = watch_v1_oom(efd, &memcg, &marker).await {
                        tracing::warn!(sandbox = %id, error = %e, "OOM watcher failed; OOM kills may be reported as exits");
                    }
                    let _ = tx.send(true);
                });
            }
            Err(e) => {
                tracing::warn!(sandbox = %sb.id, error = %e, "cannot watch memory.oom_control")
            }
        }
    }

    /// Whether the kernel OOM-killed something in the sandbox.
    pub(super) async fn oom_evidence(&self, sb: &Sandbox) -> bool {
        if let Some(owned) = &sb.cgroup.owned {
            return oom_kill_counted(owned, true);
        }
        if let Some(mut rx) = sb.watcher() {
            let settled = rx.wait_for(|done| *done);
            let _ =
                tokio::time::timeout(Duration::from_millis(OOM_VERDICT_TIMEOUT_MS + 500), settled)
                    .await;
        }
        sb.file("oom").exists()
    }
}
