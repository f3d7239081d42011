//! Helpers of the operations tests (t80 Prometheus, t85 Ansible): the tools they drive
//! (installed on demand by `scripts/setup` and `scripts/setup-ops`), a minimal HTTP client for
//! Prometheus' API, and child processes that cannot outlive the test.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

/// Longest one HTTP request to a local server may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest HTTP response read (a /metrics page or a query result).
pub const HTTP_RESPONSE_BYTES_MAX: u64 = 16 << 20;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `name` on PATH (or in `/usr/sbin`, `/usr/bin`), if present.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The Debian-packaged tool `name`, installing it with `scripts/setup` when it is missing.
/// `None` (with the reason printed) only when it cannot be installed on this machine.
pub fn debian_tool(name: &str) -> Option<PathBuf> {
    if let Some(p) = which(name) {
        return Some(p);
    }
    eprintln!("{name} is missing; running scripts/setup to install it");
    let status = Command::new(repo().join("scripts/setup")).status();
    match (status, which(name)) {
        (_, Some(p)) => Some(p),
        (status, None) => {
            surge_node::testing::unavailable(&format!(
                "{name} is not installed and scripts/setup could not install it ({status:?}); \
                 install Debian's `prometheus` package to run this test"
            ));
            None
        }
    }
}

/// Run a command to completion; panic with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Percent-encoding of a URL query value (RFC 3986 unreserved characters kept).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `GET http://addr/path` with HTTP/1.0 semantics (the server closes the connection); returns
/// the status code and the body. Enough for Prometheus' API and surge's /metrics, no more.
pub fn http_get(addr: &str, path_and_query: &str) -> Result<(u16, String), String> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, HTTP_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.take(HTTP_RESPONSE_BYTES_MAX)
        .read_to_end(&mut raw)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {} bytes", raw.len()))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:.80}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err("chunked responses are not supported".into());
    }
    Ok((code, body.to_string()))
}

/// The metric families a /metrics page declares (`# TYPE name kind`).
pub fn metric_families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// Every `surge_...` metric name an expression refers to (recording rules, `surge:...`, are not
/// metric names and are skipped; so are label values, which sit inside quotes).
pub fn surge_metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_quotes = false;
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'"' {
            in_quotes = !in_quotes;
            i += 1;
            continue;
        }
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if !in_quotes && starts_word && expr[i..].starts_with("surge_") {
            let end = expr[i..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_' || ch == ':'))
                .map_or(expr.len(), |n| i + n);
            let name = &expr[i..end];
            if !name.contains(':') {
                names.push(name.to_string());
            }
            i = end;
            continue;
        }
        i += 1;
    }
    names
}

/// A histogram's series names back to the family name (`x_bucket` -> `x`).
pub fn family_of(series: &str, families: &[(String, String)]) -> Option<String> {
    if families.iter().any(|(n, _)| n == series) {
        return Some(series.to_string());
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if families
                .iter()
                .any(|(n, k)| n == base && (k == "histogram" || k == "summary"))
            {
                return Some(base.to_string());
            }
        }
    }
    None
}

/// A child process killed (and reaped) when dropped, and by the kernel when this test process
/// dies first.
pub struct Guarded {
    pub child: Child,
    pub name: String,
}

impl Guarded {
    pub fn spawn(name: &str, cmd: &mut Command) -> Guarded {
        die_with_parent(cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Guarded {
            child,
            name: name.to_string(),
        }
    }

    pub fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}):\n{}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // The state is the field after the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

/// SIGKILL a process this test did not spawn directly (a daemon started by a playbook).
pub fn kill_pid(pid: i32) {
    // SAFETY: kill(2) touches no memory; a stale pid at worst gets ESRCH.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// PATH with `dir` first (a venv's bin dir, so its tools find each other).
pub fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).expect("PATH")
}
