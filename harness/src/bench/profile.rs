//! `perf record` of the leader during a burst (`surge bench burst --profile DIR`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// How long `perf record` is given to attach before the measured phase starts.
const PERF_ATTACH: Duration = Duration::from_millis(500);

/// `perf record` of one process while it lives, for `--profile`: where a missed goal's time goes.
pub struct Profiler {
    child: std::process::Child,
    data: PathBuf,
}

impl Profiler {
    pub fn start(pid: u32, data: PathBuf) -> anyhow::Result<Self> {
        let child = std::process::Command::new("perf")
            .args(["record", "-F", "499", "-g", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("--profile needs `perf` (Debian: linux-perf)")?;
        // perf takes a moment to attach; the burst's clock starts after this.
        std::thread::sleep(PERF_ATTACH);
        Ok(Profiler { child, data })
    }

    /// Stops recording and writes the report (`perf report --stdio`, hottest symbols) next to
    /// the data; returns the report's path.
    pub fn finish(mut self) -> anyhow::Result<PathBuf> {
        // SIGINT lets perf flush its buffers; it exits on its own.
        let pid = i32::try_from(self.child.id()).context("perf pid")?;
        // SAFETY: kill(2) only sends a signal to the child we spawned and still own.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        self.child.wait()?;
        let out = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "1",
                "-i",
            ])
            .arg(&self.data)
            .output()?;
        let report = self.data.with_extension("txt");
        std::fs::write(&report, &out.stdout)?;
        Ok(report)
    }
}
