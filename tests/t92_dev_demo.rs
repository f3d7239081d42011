//! The README's "run it" command, CI-sized: `surge dev --demo` brings up replicas, simulated and
//! (where the host allows) real container nodes, runs the burst to its summary, and on Ctrl-C
//! leaves no process, container, mount or cgroup behind.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use surge_harness::containers::{self, ContainerDaemon};

/// Longest the CI-sized demo may take to print its summary.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(240);
const REAL_NODES: u32 = 2;

/// Processes whose command line names `root` (replicas and node daemons of this run).
fn processes_under(root: &Path) -> Vec<String> {
    let needle = root.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

#[test]
fn dev_demo_runs_the_burst_and_ctrl_c_leaves_nothing_behind() {
    let dir = tempfile::Builder::new()
        .prefix("surge-t92-")
        .tempdir()
        .expect("temp dir");
    let root = dir.path().to_path_buf();
    let real_nodes = match containers::usable() {
        Ok(()) => REAL_NODES,
        Err(why) => {
            eprintln!("t92: no real container nodes on this host ({why}); simulated nodes only");
            0
        }
    };
    // Replica i listens on PORT+i-1 and PORT+10+i-1.
    let port = surge_harness::cluster::free_port().expect("a free port");
    let mut dev = Command::new(bin())
        .args(["dev", "--demo", "--replicas", "3"])
        .args(["--port", &port.to_string()])
        .args(["--sim-nodes", "40", "--sim-sandboxes", "4000"])
        .args(["--real-nodes", &real_nodes.to_string()])
        .args(["--real-sandboxes", "6"])
        .args(["--agent-sandboxes", "4", "--agent-execs", "5"])
        .arg("--data-dir")
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group, as a shell gives a foreground job: Ctrl-C goes to the group.
        .process_group(0)
        .spawn()
        .expect("start surge dev");
    let group = dev.id() as libc::pid_t;
    // On a failure below, nothing of the run may outlive the test either.
    let kill_group = || {
        // SAFETY: kill(2) on the process group we created.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    };

    let (lines_tx, lines) = mpsc::channel();
    let stdout = dev.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut seen = Vec::new();
    let summary = loop {
        let left = SUMMARY_TIMEOUT.saturating_sub(started.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("CPU utilisation at peak");
                seen.push(line.clone());
                if done {
                    break line;
                }
            }
            Err(_) => {
                kill_group();
                panic!(
                    "no demo summary within {SUMMARY_TIMEOUT:?}; output so far:\n{}",
                    seen.join("\n")
                );
            }
        }
    };
    let text = seen.join("\n");
    eprintln!("{text}");
    assert!(
        text.contains(&format!("{real_nodes} real nodes")),
        "dev did not start {real_nodes} real nodes:\n{text}"
    );
    // The summary table: one row per job, every stage reached ("-" marks one never reached).
    let row_done = |label: &str, count: u32| {
        let row = seen
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| {
                cells.first() == Some(&label) && cells.get(1) == Some(&&*count.to_string())
            })
            .unwrap_or_else(|| panic!("no summary row for {label}:\n{text}"));
        assert!(
            !row.contains(&"-"),
            "the {label} sandboxes did not all get placed, started and done: {row:?}\n{text}"
        );
    };
    row_done("sim", 4000);
    if real_nodes > 0 {
        row_done("real", 6);
    }
    assert!(summary.contains("capacity released"), "{summary}");
    // The agent phase on the real nodes: its table's row says every sandbox took its execs and
    // its file came back equal.
    if real_nodes > 0 {
        let row = loop {
            let left = SUMMARY_TIMEOUT.saturating_sub(started.elapsed());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    seen.push(line.clone());
                    let cells: Vec<String> = line.split_whitespace().map(str::to_string).collect();
                    if cells.first().map(String::as_str) == Some("4")
                        && cells.get(1).map(String::as_str) == Some("5")
                    {
                        break cells;
                    }
                }
                Err(_) => {
                    kill_group();
                    panic!("no agent phase row; output so far:\n{}", seen.join("\n"));
                }
            }
        };
        assert!(
            row.iter().any(|c| c == "4/4"),
            "agent phase: {row:?}\n{}",
            seen.join("\n")
        );
    }

    // Ctrl-C, as a terminal sends it: SIGINT to the whole foreground group. Everything stops and
    // nothing of the run stays on the host.
    // SAFETY: kill(2) on the process group we created.
    unsafe {
        libc::kill(-group, libc::SIGINT);
    }
    let stopping = Instant::now();
    let status = loop {
        if let Some(s) = dev.try_wait().expect("wait for surge dev") {
            break s;
        }
        if stopping.elapsed() > Duration::from_secs(60) {
            let late: Vec<String> = lines.try_iter().collect();
            kill_group();
            panic!(
                "surge dev did not stop within 60 s of Ctrl-C; its last output:\n{}",
                late.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "surge dev exited with {status}");
    let processes = processes_under(&root);
    assert!(
        processes.is_empty(),
        "processes of the run outlived Ctrl-C:\n{}",
        processes.join("\n")
    );
    let daemons: Vec<ContainerDaemon> = (0..real_nodes)
        .map(|i| ContainerDaemon {
            node: format!("real-{i}"),
            data_dir: root.join(format!("real-{i}")),
        })
        .collect();
    let left = containers::leftovers(&daemons, &root);
    assert!(
        left.is_empty(),
        "containers, mounts or cgroups outlived Ctrl-C:\n{}",
        left.join("\n")
    );
}
