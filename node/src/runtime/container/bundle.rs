//! A sandbox's bundle as the container runtime writes it: directories, the overlay root, the
//! cgroup directory surge owns, `config.json` (see `oci`) and `meta.json`. Cold starts write
//! all of it at once; the warm pool (`pool`) writes it ahead and rewrites the spec at take.

use std::path::Path;

use super::{container_id, oci_config, ContainerRuntime, OciParams, SandboxCgroup, ShimRecord};
use crate::runtime::sandbox_dir::{mount_overlay, template_dir, write_json_atomic};
use crate::runtime::supervise::Record;
use crate::runtime::{RuntimeError, StartRequest};

impl ContainerRuntime {
    /// Bundle directory, overlay root, config.json, meta.json.
    pub(super) fn prepare_bundle(
        &self,
        req: &StartRequest,
        bundle: &Path,
    ) -> Result<Record<ShimRecord>, RuntimeError> {
        let cgroup = SandboxCgroup::new(
            &self.layout,
            &self.config.cgroup_parent,
            &container_id(req.id),
        );
        let config = self.make_bundle(req, bundle, &cgroup)?;
        write_json_atomic(&bundle.join("config.json"), &config)?;
        let record = self.record_of(req);
        write_json_atomic(&bundle.join("meta.json"), &record)?;
        Ok(record)
    }

    /// The record of a sandbox about to start (its shim not known yet).
    pub(super) fn record_of(&self, req: &StartRequest) -> Record<ShimRecord> {
        Record {
            id: req.id,
            generation: req.generation,
            revision: req.revision,
            resources: req.resources,
            spec: req.spec.clone(),
            paused: false,
            extra: ShimRecord {
                shim_pid: 0,
                shim_start_ticks: 0,
                cgroup_parent: Some(self.config.cgroup_parent.clone()),
                checkpoint: None,
            },
        }
    }

    /// Bundle directories, the overlay root and the cgroup directory; returns the OCI spec
    /// (not written: the warm pool changes it first).
    pub(super) fn make_bundle(
        &self,
        req: &StartRequest,
        bundle: &Path,
        cgroup: &SandboxCgroup,
    ) -> Result<serde_json::Value, RuntimeError> {
        let ctx = |what: &str| format!("sandbox {}: {what}", req.id);
        let template = template_dir(&self.templates, &req.spec.template)?;
        for dir in ["", "upper", "ovl-work", "rootfs"] {
            std::fs::create_dir_all(bundle.join(dir))
                .map_err(|e| RuntimeError::io(ctx("create bundle"), e))?;
        }
        // /work is the sandbox user's: writable, and visible from the host in upper/work.
        let work = bundle.join("upper/work");
        std::fs::create_dir_all(&work).map_err(|e| RuntimeError::io(ctx("create /work"), e))?;
        let (uid, gid) = self.user_of(&req.spec);
        std::os::unix::fs::chown(&work, Some(uid), Some(gid))
            .map_err(|e| RuntimeError::io(ctx("chown /work"), e))?;
        mount_overlay(&template, &bundle.join("upper"), &bundle.join("ovl-work"), &bundle.join("rootfs"))
            .map_err(|e| RuntimeError::io(ctx("mount the overlay root (is the data dir on a filesystem overlayfs accepts as upper, e.g. ext4 or xfs?)"), e))?;
        if let Some(owned) = &cgroup.owned {
            std::fs::create_dir_all(owned)
                .map_err(|e| RuntimeError::io(ctx("create cgroup"), e))?;
        }
        let mut config = self.oci_config_of(req, &cgroup.crun_path)?;
        if let Some(conf) = &self.criu_conf {
            config["annotations"]["org.criu.config"] = conf.display().to_string().into();
        }
        if self.criu.is_ok() {
            // A namespace CRIU treats as external: no `ip`/`iptables` runs in a restore
            // (`netns`). Checkpointing nodes start cold (no warm pool), so only cold starts
            // and forks come here with it.
            super::netns::create(bundle)?;
            super::netns::name_in_config(&mut config, bundle).map_err(|reason| {
                RuntimeError::StartFailed {
                    id: req.id,
                    reason,
                    stderr_tail: String::new(),
                }
            })?;
        }
        Ok(config)
    }

    /// The OCI spec of `req` with its cgroup at `cgroups_path`.
    pub(super) fn oci_config_of(
        &self,
        req: &StartRequest,
        cgroups_path: &str,
    ) -> Result<serde_json::Value, RuntimeError> {
        let (uid, gid) = self.user_of(&req.spec);
        oci_config(&OciParams {
            id: req.id,
            spec: &req.spec,
            resources: req.resources,
            cgroups_path,
            uid,
            gid,
            tmp_size_mib: self.config.tmp_size_mib,
            init: &self.init,
        })
        .map_err(|reason| RuntimeError::StartFailed {
            id: req.id,
            reason,
            stderr_tail: String::new(),
        })
    }
}
