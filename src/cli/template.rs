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
    /// Copy template NAME from a node that holds it to other nodes, node to node (the cluster
    /// picks the source; each target pulls, checks the SHA-256, and imports atomically).
    /// Needs the admin token.
    Copy(CopyArgs),
}

#[derive(clap::Args)]
pub struct CopyArgs {
    pub name: String,
    /// A target node id; repeatable.
    #[arg(long = "to", value_name = "NODE")]
    pub to: Vec<String>,
    /// Copy to the ready nodes with this label (KEY=VALUE; repeatable) that lack the template.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Copy to at most N such nodes (with --label: of those; alone: any nodes lacking it).
    #[arg(long, default_value_t = 0)]
    pub count: u32,
    /// The source node (default: a ready node that holds it).
    #[arg(long = "from", value_name = "NODE", default_value = "")]
    pub from: String,
    #[command(flatten)]
    pub target: crate::Target,
}

/// `surge template copy`: one line per target node, then a summary; fails if any copy failed.
pub async fn copy(
    c: &surge_client::Client,
    output: surge_harness::output::Output,
    args: CopyArgs,
) -> anyhow::Result<()> {
    let req = surge_proto::sandbox::CopyTemplateRequest {
        template: args.name.clone(),
        to: args.to,
        labels: surge_client::convert::parse_labels(&args.labels)?,
        count: args.count,
        source: args.from,
    };
    let reply = c.copy_template(req).await?;
    let copied: Vec<_> = reply.copies.iter().filter(|c| c.bytes > 0).collect();
    let failed: Vec<_> = reply
        .copies
        .iter()
        .filter(|c| {
            c.bytes == 0
                && !c
                    .error
                    .starts_with(surge_scheduler::service::template_copy::ALREADY_HOLDS)
        })
        .collect();
    match output {
        surge_harness::output::Output::Json => {
            surge_harness::output::json(&serde_json::json!({
                "template": args.name,
                "source": reply.source,
                "copies": reply.copies.iter().map(|c| serde_json::json!({
                    "node": c.node_id, "error": c.error, "bytes": c.bytes,
                    "duration_ms": c.duration_ms, "sha256": c.sha256,
                })).collect::<Vec<_>>(),
            }));
        }
        surge_harness::output::Output::Table => {
            for c in &reply.copies {
                if c.error.is_empty() {
                    let mb_s = c.bytes as f64 / 1e6 / (c.duration_ms.max(1) as f64 / 1e3);
                    println!(
                        "{}  copied {:.1} MiB in {} ms ({mb_s:.0} MB/s), sha256 {}",
                        c.node_id,
                        c.bytes as f64 / f64::from(1u32 << 20),
                        c.duration_ms,
                        c.sha256
                    );
                } else {
                    println!("{}  {}", c.node_id, c.error);
                }
            }
            println!(
                "template {} from node {}: {} copied, {} failed",
                args.name,
                reply.source,
                copied.len(),
                failed.len()
            );
        }
    }
    if !failed.is_empty() {
        let why: Vec<String> = failed
            .iter()
            .map(|c| format!("{}: {}", c.node_id, c.error))
            .collect();
        anyhow::bail!("{} of the copies failed: {}", failed.len(), why.join("; "));
    }
    Ok(())
}

/// `surge snapshot JOB.INDEX --template NAME`.
pub async fn snapshot(
    c: &surge_client::Client,
    output: surge_harness::output::Output,
    sandbox: &str,
    template: &str,
) -> anyhow::Result<()> {
    let (job_id, index) = surge_client::Sandboxes::parse_one(sandbox)?;
    let r = c.snapshot(job_id, index, template).await?;
    match output {
        surge_harness::output::Output::Json => surge_harness::output::json(&serde_json::json!({
            "node": r.node_id, "template": r.template, "bytes": r.bytes,
            "entries": r.entries, "frozen_ms": r.frozen_ms,
        })),
        surge_harness::output::Output::Table => println!(
            "template {} made on node {} from sandbox {sandbox}: {:.1} MiB in {} entries (sandbox frozen {} ms); the node reports it within {} s",
            r.template,
            r.node_id,
            r.bytes as f64 / f64::from(1u32 << 20),
            r.entries,
            r.frozen_ms,
            TEMPLATE_RESCAN_INTERVAL_MS.div_ceil(1000)
        ),
    }
    Ok(())
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
        TemplateCmd::Copy(_) => anyhow::bail!("template copy is a cluster command (see main)"),
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
