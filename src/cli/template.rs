//! `surge template`: the root filesystems a node's sandboxes boot from, under its data dir.
//!
//! Runs on the node itself (templates are files on the node, there is no registry to pull
//! from). A running `surge node` with the same data dir notices a new template within
//! `TEMPLATE_RESCAN_INTERVAL_MS` and re-registers, so placement prefers nodes that hold it.

use std::path::PathBuf;

use anyhow::Context;
use surge_node::agent::TEMPLATE_RESCAN_INTERVAL_MS;
use surge_node::template::Templates;

/// The node daemon's default data dir (`surge node --data-dir`).
const DATA_DIR_DEFAULT: &str = "/var/lib/surge/node";

#[derive(clap::Subcommand)]
pub enum TemplateCmd {
    /// Add template NAME from a root filesystem directory or a tarball (tar, tar.gz, ...).
    Import {
        name: String,
        /// A directory or a tarball whose top is the root filesystem (bin/, etc/, ...).
        source: PathBuf,
        /// The node's data dir (as given to `surge node --data-dir`).
        #[arg(long, default_value = DATA_DIR_DEFAULT)]
        data_dir: PathBuf,
    },
    /// List the templates this node holds.
    List {
        #[arg(long, default_value = DATA_DIR_DEFAULT)]
        data_dir: PathBuf,
    },
}

pub async fn run(cmd: TemplateCmd) -> anyhow::Result<()> {
    match cmd {
        TemplateCmd::Import {
            name,
            source,
            data_dir,
        } => {
            let templates = Templates::new(&data_dir);
            let n = name.clone();
            let path = tokio::task::spawn_blocking(move || templates.import(&n, &source))
                .await
                .context("the import task panicked")??;
            println!(
                "template {name} imported into {}; a running node with this data dir reports it within {} s",
                path.display(),
                TEMPLATE_RESCAN_INTERVAL_MS.div_ceil(1000)
            );
        }
        TemplateCmd::List { data_dir } => {
            let templates = Templates::new(&data_dir);
            let names = tokio::task::spawn_blocking(move || templates.list())
                .await
                .context("the list task panicked")??;
            for n in names {
                println!("{n}");
            }
        }
    }
    Ok(())
}
