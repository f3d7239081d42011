//! Bad starts are refused with one clear line: port in use, corrupt or foreign data dir, id clash.

mod common;

use std::process::Command;

use common::*;

/// Run `surge server ARGS` to completion and return (success, stderr).
fn server(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .arg("server")
        .args(args)
        .output()
        .expect("run surge server");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn error_line(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"))
        .to_string()
}

#[test]
fn port_in_use_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("dir");
    let (ok, err) = server(&[
        "--id",
        "1",
        "--listen",
        &addr,
        "--data-dir",
        dir.path().to_str().expect("utf8"),
        "--bootstrap",
        &format!("1={addr}"),
    ]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(
        line.contains("cannot listen on") && line.contains("in use"),
        "{line}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Start a one-replica cluster on a data dir and stop it, so the dir holds a real cluster.
fn formed_data_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("dir");
    let port = surge_harness::cluster::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(bin())
        .arg("server")
        .args([
            "--id",
            "1",
            "--listen",
            &addr,
            "--bootstrap",
            &format!("1={addr}"),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    loop {
        let ready = rt.block_on(async {
            let mut c = surge_client::open::cluster(&addr).expect("client");
            c.status(surge_proto::cluster::StatusRequest {})
                .await
                .is_ok_and(|s| s.into_inner().leader_id == 1)
        });
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "single replica never led"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY-free signal via the kill command: a graceful stop.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    (dir, addr)
}

#[test]
fn foreign_cluster_and_id_clash_are_refused() {
    let (dir, addr) = formed_data_dir();
    let d = dir.path().to_str().expect("utf8");
    let other = format!(
        "127.0.0.1:{}",
        surge_harness::cluster::free_port().expect("port")
    );

    // Same data dir, a --bootstrap describing another cluster.
    let (ok, err) = server(&[
        "--id",
        "1",
        "--listen",
        &other,
        "--data-dir",
        d,
        "--bootstrap",
        &format!("1={other}"),
    ]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(line.contains("belongs to cluster"), "{line}");

    // Same data dir, another replica id.
    let (ok, err) = server(&["--id", "2", "--listen", &other, "--data-dir", d]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(
        line.contains("belongs to replica 1, not replica 2"),
        "{line}"
    );

    // --bootstrap that lists this id at another address.
    let fresh = tempfile::tempdir().expect("dir");
    let (ok, err) = server(&[
        "--id",
        "1",
        "--listen",
        &other,
        "--data-dir",
        fresh.path().to_str().expect("utf8"),
        "--bootstrap",
        &format!("1={addr}"),
    ]);
    assert!(!ok);
    assert!(error_line(&err).contains("id clash"), "{err}");

    // An empty data dir with neither --bootstrap nor --join.
    let (ok, err) = server(&[
        "--id",
        "1",
        "--listen",
        &other,
        "--data-dir",
        fresh.path().to_str().expect("utf8"),
    ]);
    assert!(!ok);
    assert!(error_line(&err).contains("holds no cluster"), "{err}");
}

#[test]
fn corrupt_data_dir_is_refused() {
    let (dir, addr) = formed_data_dir();
    let raft = dir.path().join("raft");
    // Damage every table and log file RocksDB wrote.
    let mut damaged = 0;
    for entry in std::fs::read_dir(&raft).expect("raft dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if name.starts_with("MANIFEST") || name.ends_with(".log") || name.ends_with(".sst") {
            let mut bytes = std::fs::read(&path).expect("read");
            for b in bytes.iter_mut().skip(7).step_by(13) {
                *b ^= 0x5a;
            }
            std::fs::write(&path, bytes).expect("write");
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let (ok, err) = server(&[
        "--id",
        "1",
        "--listen",
        &addr,
        "--data-dir",
        dir.path().to_str().expect("utf8"),
    ]);
    assert!(!ok, "damaged data dir accepted:\n{err}");
    let line = error_line(&err);
    assert!(line.contains("data dir"), "{line}");
    assert!(!err.contains("panicked"), "{err}");

    // A data dir whose RocksDB is missing its CURRENT file.
    let (dir, addr) = formed_data_dir();
    std::fs::remove_file(dir.path().join("raft").join("CURRENT")).expect("remove CURRENT");
    let (ok, err) = server(&[
        "--id",
        "1",
        "--listen",
        &addr,
        "--data-dir",
        dir.path().to_str().expect("utf8"),
    ]);
    assert!(!ok, "data dir without CURRENT accepted:\n{err}");
    assert!(error_line(&err).contains("data dir"), "{err}");
}

#[test]
fn bad_addresses_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().to_str().expect("utf8");
    for (args, expect) in [
        (
            vec![
                "--id",
                "1",
                "--listen",
                "nohost",
                "--data-dir",
                d,
                "--bootstrap",
                "1=nohost",
            ],
            "--listen",
        ),
        (
            vec![
                "--id",
                "1",
                "--listen",
                "127.0.0.1:7",
                "--data-dir",
                d,
                "--bootstrap",
                "1=127.0.0.1:7,2=x",
            ],
            "--bootstrap",
        ),
        (
            vec![
                "--id",
                "1",
                "--listen",
                "127.0.0.1:7",
                "--data-dir",
                d,
                "--join",
                "127.0.0.1:0",
            ],
            "--join",
        ),
        (
            vec![
                "--id",
                "0",
                "--listen",
                "127.0.0.1:7",
                "--data-dir",
                d,
                "--bootstrap",
                "0=127.0.0.1:7",
            ],
            "--id",
        ),
    ] {
        let (ok, err) = server(&args);
        assert!(!ok, "{args:?} accepted");
        let line = error_line(&err);
        assert!(line.contains(expect), "{args:?}: {line}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Nothing was written for a refused start.
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}
