//! `surge vm-exec --config FILE` (hidden): the process one microVM lives in. The node daemon's
//! krun runtime starts it, one per VM; the work is in `surge_node::runtime::krun::exec`.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// The VM configuration (vm.json) written by the node daemon.
    #[arg(long)]
    pub config: PathBuf,
}

/// Never returns: libkrun exits the process with the guest's status when the VM ends, and a
/// failure before that exits with status 125 after recording why (see `krun::exec`).
pub fn run(args: VmArgs) -> anyhow::Result<()> {
    surge_node::runtime::krun::exec::vm_exec(&args.config)
}
