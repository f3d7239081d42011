//! The body of `surge vm-exec --config FILE`: the process one microVM lives in.
//!
//! The krun runtime starts this, one process per VM, because libkrun's `krun_start_enter` takes
//! over its calling process and exits it when the guest ends. It reads the VM configuration the
//! daemon wrote, builds the libkrun context (an explicit guest environment, console to a file),
//! marks itself entered and hands the process to libkrun. Synchronous on purpose: no tokio
//! runtime (and its threads) in a process that becomes a VMM. When anything fails before the
//! guest runs, the reason goes to the config's `setup_error` file and the process exits with
//! [`SETUP_FAILED_CODE`], which the daemon reports as `Failed` with that reason.

use std::path::Path;

use super::exit::SETUP_FAILED_CODE;
use super::ffi::{dlopen, DlKrun, KrunApi};
use super::vm::{self, VmConfig};

/// Run the VM described by `config`; never returns (libkrun or the failure path exits).
pub fn vm_exec(config: &Path) -> ! {
    let cfg = match std::fs::read(config)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<VmConfig>(&b).map_err(|e| e.to_string()))
    {
        Ok(cfg) => cfg,
        Err(e) => {
            // No config, so no setup-error path: vm.json sits beside it.
            let reason = format!("cannot read the VM configuration {}: {e}", config.display());
            fail(&config.with_file_name("setup-error"), &reason)
        }
    };
    let reason = match load(&cfg) {
        Ok(api) => enter(&api, &cfg),
        Err(reason) => reason,
    };
    fail(&cfg.setup_error, &reason)
}

fn fail(setup_error: &Path, reason: &str) -> ! {
    eprintln!("surge vm-exec: {reason}");
    if let Err(e) = std::fs::write(setup_error, format!("{reason}\n")) {
        eprintln!("surge vm-exec: cannot write {}: {e}", setup_error.display());
    }
    std::process::exit(SETUP_FAILED_CODE)
}

fn load(cfg: &VmConfig) -> Result<DlKrun, String> {
    if let Some(fw) = &cfg.krunfw {
        // libkrun dlopens `libkrunfw.so.5` by soname; once this file is loaded, that lookup
        // finds it wherever it is installed.
        dlopen(&fw.to_string_lossy(), true)
            .map_err(|e| format!("cannot load the guest kernel {}: {e}", fw.display()))?;
    }
    DlKrun::load(cfg.libkrun.as_deref()).map_err(|e| format!("cannot load libkrun: {e}"))
}

/// Configure, mark entered, start. Returns only why it failed.
pub fn enter(api: &dyn KrunApi, cfg: &VmConfig) -> String {
    let ctx = match vm::configure(api, cfg) {
        Ok(ctx) => ctx,
        Err(e) => return e.to_string(),
    };
    if let Err(e) = std::fs::write(&cfg.entered_marker, b"") {
        api.free_ctx(ctx);
        return format!("write {}: {e}", cfg.entered_marker.display());
    }
    vm::enter(api, ctx).to_string()
}
