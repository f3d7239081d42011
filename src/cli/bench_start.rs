//! `surge bench start`: flags and printing; the engine is `surge_harness::bench::start`.

use std::path::Path;

use surge_harness::bench::exec::Spread;
use surge_harness::bench::start::{self, StartConfig};
use surge_harness::output::{json as print_json, table, Output};

#[derive(clap::Args)]
pub struct StartArgs {
    /// Measured starts of `true` per path (cold, pooled, `crun run`), interleaved.
    #[arg(long, default_value_t = 50)]
    starts: u32,
    /// Long-lived sandboxes of the throughput burst (cold, then pooled) ...
    #[arg(long, default_value_t = 128)]
    burst: u32,
    /// ... started this many at once (the node's default start cap).
    #[arg(long, default_value_t = surge_node::agent::config::START_CONCURRENCY_DEFAULT)]
    cap: usize,
    /// Sandboxes created one at a time through the API, per path (cold node, pooled node).
    #[arg(long, default_value_t = 20)]
    api_starts: u32,
    /// Skip the part through the API (no cluster is started).
    #[arg(long)]
    skip_api: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub async fn run(args: StartArgs, bin: &Path) -> anyhow::Result<()> {
    if args.starts == 0 || args.starts > 10_000 || args.burst > 1024 || args.api_starts > 1000 {
        anyhow::bail!("--starts 1..=10000, --burst 0..=1024, --api-starts 0..=1000");
    }
    let cfg = StartConfig {
        starts: args.starts,
        burst: args.burst,
        cap: args.cap,
        api_starts: args.api_starts,
        skip_api: args.skip_api,
    };
    let r = start::run(cfg, bin).await?;
    if args.output == Output::Json {
        print_json(&r.json());
        return Ok(());
    }
    let row = |what: &str, s: &Spread| {
        vec![
            what.to_owned(),
            format!("{:.1}", s.p50_ms),
            format!("{:.1}", s.p99_ms),
            s.n.to_string(),
        ]
    };
    println!("load before the run: {}", r.load_before);
    table(
        &[
            "start of one sandbox (this process, the container runtime)",
            "p50 ms",
            "p99 ms",
            "n",
        ],
        &[
            row("cold: start() returns (running)", &r.cold_running),
            row("cold: start() to exit of `true`", &r.cold_exit),
            row("pooled: start() returns (running)", &r.pooled_running),
            row("pooled: start() to exit of `true`", &r.pooled_exit),
            row(
                "crun run of the same rootfs, to exit of `true`",
                &r.crun_run,
            ),
        ],
    );
    let anchor = r.crun_run.p50_ms.max(1e-9);
    println!(
        "to exit, p50: cold {:.2}x crun run, pooled {:.2}x (goal <= 1.0x)",
        r.cold_exit.p50_ms / anchor,
        r.pooled_exit.p50_ms / anchor
    );
    let b = |what: &str, x: &start::Burst| {
        vec![
            what.to_owned(),
            x.sandboxes.to_string(),
            format!("{:.2}", x.wall_s),
            format!("{:.1}", x.per_s),
        ]
    };
    table(
        &["burst at the start cap", "sandboxes", "wall s", "starts/s"],
        &[b("cold", &r.burst_cold), b("pooled", &r.burst_pooled)],
    );
    println!(
        "(the pool, one per burst sandbox, was filled from empty in {:.1} s before the latency part, one at a time; goal >= 100 starts/s)",
        r.pool_fill_s
    );
    if let (Some(c), Some(p)) = (&r.api_cold, &r.api_pooled) {
        table(
            &[
                "through the API (1 replica, 1 real node)",
                "p50 ms",
                "p99 ms",
                "n",
            ],
            &[
                row("cold node: create -> running", &c.running),
                row("cold node: create -> first exec output", &c.first_output),
                row("pooled node: create -> running", &p.running),
                row("pooled node: create -> first exec output", &p.first_output),
            ],
        );
        println!("goals: create -> running p50 < 50 ms, create -> first exec output p50 < 100 ms");
    }
    Ok(())
}
