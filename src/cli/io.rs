//! `surge exec` and `surge cp`: drive a running sandbox.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use surge_client::convert::Sandboxes;
use surge_client::io::{Exec, OUTPUT_CAP_DEFAULT};
use surge_client::Client;
use surge_harness::output::Output;
use surge_proto::sandbox as pb;
use tokio::sync::mpsc;

/// Exit status of `surge exec` when surge itself failed (the command did not run or its end is
/// unknown), as `docker exec` does; the command's own status is passed through otherwise.
pub const EXIT_SURGE_ERROR: i32 = 125;
/// Exit status of a command killed at its timeout (as `timeout(1)` reports it).
pub const EXIT_TIMEOUT: i32 = 124;
/// Bytes per chunk read from local files and stdin.
const CHUNK: usize = 64 * 1024;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// The sandbox: JOB.INDEX.
    sandbox: String,
    /// Kill the command (and everything it started) after this long: 60s, 10m, 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// KEY=VALUE added to the command's environment; repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(long)]
    cwd: Option<String>,
    /// Send this program's stdin to the command (otherwise its stdin is empty).
    #[arg(long)]
    stdin: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Run the command; returns the exit status `surge exec` ends with.
pub async fn exec(c: &Client, output: Output, args: ExecArgs) -> anyhow::Result<i32> {
    let (job, index) = Sandboxes::parse_one(&args.sandbox)?;
    let exec = Exec {
        command: args.command,
        env: surge_client::convert::parse_env(&args.env)?,
        cwd: args.cwd.unwrap_or_default(),
        timeout: args.timeout,
    };
    if output == Output::Json {
        let stdin = if args.stdin {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("read stdin")?;
            Some(Bytes::from(buf))
        } else {
            None
        };
        let r = c
            .exec_output(job, index, &exec, stdin, OUTPUT_CAP_DEFAULT)
            .await?;
        let v = serde_json::json!({
            "sandbox": format!("{job}.{index}"),
            "exit_code": r.exit.exit_code,
            "signal": (r.exit.signal != 0).then_some(r.exit.signal),
            "timed_out": r.exit.timed_out,
            "duration_ms": r.exit.duration_ms,
            "stdout": String::from_utf8_lossy(&r.stdout),
            "stderr": String::from_utf8_lossy(&r.stderr),
            "stdout_truncated": r.stdout_truncated,
            "stderr_truncated": r.stderr_truncated,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(status_of(&r.exit, false));
    }
    let (tx, rx) = mpsc::channel(surge_client::io::INPUT_BUFFER);
    if args.stdin {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let msg = pb::ExecInput {
                    input: Some(pb::exec_input::Input::Stdin(Bytes::copy_from_slice(
                        &buf[..n],
                    ))),
                };
                if tx.blocking_send(msg).is_err() {
                    return;
                }
            }
            let _ = tx.blocking_send(pb::ExecInput {
                input: Some(pb::exec_input::Input::CloseStdin(true)),
            });
        });
    }
    // Ctrl-C is passed on to the command as SIGINT; a second one leaves (which kills it).
    let ctrl_c = tx;
    let mut stream = c.exec(exec.start(job, index, args.stdin), Some(rx)).await?;
    let mut interrupted = false;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            r = tokio::signal::ctrl_c() => {
                r.context("listen for Ctrl-C")?;
                if interrupted {
                    eprintln!("surge exec: interrupted twice; the command is killed");
                    return Ok(130);
                }
                interrupted = true;
                let _ = ctrl_c.send(pb::ExecInput { input: Some(pb::exec_input::Input::Signal(2)) }).await;
                continue;
            }
        };
        let msg = msg
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .ok_or_else(|| {
                anyhow::anyhow!("the exec stream ended without the command's exit status")
            })?;
        match msg.output {
            Some(pb::exec_output::Output::Stdout(b)) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Some(pb::exec_output::Output::Stderr(b)) => {
                err.write_all(&b)?;
                err.flush()?;
            }
            Some(pb::exec_output::Output::Exit(e)) => return Ok(status_of(&e, true)),
            None => {}
        }
    }
}

/// The status `surge exec` ends with, saying on stderr when it is not the command's own.
fn status_of(e: &pb::ExecExit, explain: bool) -> i32 {
    if e.timed_out {
        if explain {
            eprintln!(
                "surge exec: the command ran past its timeout ({} ms) and was killed with everything it started",
                e.duration_ms
            );
        }
        return EXIT_TIMEOUT;
    }
    if e.signal != 0 {
        if explain {
            eprintln!("surge exec: the command was killed by signal {}", e.signal);
        }
        return 128 + e.signal;
    }
    e.exit_code
}

#[derive(clap::Args)]
pub struct CpArgs {
    /// LOCAL_PATH or JOB.INDEX:/PATH
    src: String,
    /// LOCAL_PATH or JOB.INDEX:/PATH (exactly one of the two is in a sandbox)
    dst: String,
}

/// `JOB.INDEX:/PATH` -> `(job, index, path)`; `None` for a local path.
fn remote(s: &str) -> anyhow::Result<Option<(u64, u32, String)>> {
    let Some((sb, path)) = s.split_once(':') else {
        return Ok(None);
    };
    if !sb.contains('.') || !sb.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Ok(None);
    }
    let (job, index) = Sandboxes::parse_one(sb)?;
    if !path.starts_with('/') {
        bail!("{s:?}: the path in a sandbox must be absolute (JOB.INDEX:/PATH)");
    }
    Ok(Some((job, index, path.to_string())))
}

pub async fn cp(c: &Client, output: Output, args: CpArgs) -> anyhow::Result<()> {
    let summary = match (remote(&args.src)?, remote(&args.dst)?) {
        (Some(_), Some(_)) => bail!("both paths are in sandboxes; copy through a local path"),
        (None, None) => bail!("neither path is in a sandbox (JOB.INDEX:/PATH); use cp"),
        (None, Some((job, index, path))) => {
            upload(c, Path::new(&args.src), job, index, &path).await?
        }
        (Some((job, index, path)), None) => {
            download(c, job, index, &path, Path::new(&args.dst)).await?
        }
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
        _ => println!(
            "copied {} file(s), {} bytes",
            summary["files"], summary["bytes"]
        ),
    }
    Ok(())
}

/// A blocking reader's bytes as a channel of chunks (for a file or a tar being built).
fn chunks_of(
    mut r: impl Read + Send + 'static,
) -> (
    mpsc::Receiver<Bytes>,
    std::thread::JoinHandle<std::io::Result<u64>>,
) {
    let (tx, rx) = mpsc::channel(8);
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
            if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                return Ok(total);
            }
        }
    });
    (rx, t)
}

/// A `Write` that sends what it is given as chunks on a channel (the tar builder's sink).
struct ChannelWriter(mpsc::Sender<Bytes>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload ended"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn upload(
    c: &Client,
    local: &Path,
    job: u64,
    index: u32,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let meta = std::fs::metadata(local).with_context(|| format!("{}", local.display()))?;
    if meta.is_file() {
        let name = local.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let target = if path.ends_with('/') {
            format!("{path}{name}")
        } else {
            path.to_string()
        };
        let file = std::fs::File::open(local).with_context(|| format!("{}", local.display()))?;
        let (rx, reader) = chunks_of(file);
        let start = pb::WriteFileStart {
            sandbox: surge_client::io::sandbox(job, index),
            path: target,
            mode: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
            make_parents: true,
        };
        let reply = c.write_file(start, rx).await?;
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the file reader panicked"))?
            .with_context(|| format!("read {}", local.display()))?;
        return Ok(serde_json::json!({"files": 1, "bytes": reply.bytes}));
    }
    if !meta.is_dir() {
        bail!("{} is neither a file nor a directory", local.display());
    }
    let (tx, rx) = mpsc::channel(8);
    let dir = local.to_path_buf();
    let builder = std::thread::spawn(move || -> std::io::Result<()> {
        let mut b = tar::Builder::new(ChannelWriter(tx));
        b.follow_symlinks(false);
        b.append_dir_all(".", &dir)?;
        b.finish()
    });
    let reply = c.upload(job, index, path, rx).await?;
    builder
        .join()
        .map_err(|_| anyhow::anyhow!("the archive builder panicked"))?
        .with_context(|| format!("archive {}", local.display()))?;
    Ok(serde_json::json!({"files": reply.files, "bytes": reply.bytes}))
}

/// A `Read` over a stream of chunks (the tar reader's source).
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    buf: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

async fn download(
    c: &Client,
    job: u64,
    index: u32,
    path: &str,
    local: &Path,
) -> anyhow::Result<serde_json::Value> {
    // A file is read as itself; a directory travels as a tar stream.
    let is_dir = match c.list_dir(job, index, path).await {
        Ok(_) => true,
        Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => false,
        Err(e) => return Err(e.into()),
    };
    if !is_dir {
        let target: PathBuf = if local.is_dir() {
            local.join(Path::new(path).file_name().unwrap_or_default())
        } else {
            local.to_path_buf()
        };
        let mut s = c.read_file(job, index, path).await?;
        let mut f =
            std::fs::File::create(&target).with_context(|| format!("{}", target.display()))?;
        let mut bytes = 0u64;
        while let Some(chunk) = s
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        {
            f.write_all(&chunk.data)?;
            bytes += chunk.data.len() as u64;
        }
        return Ok(serde_json::json!({"files": 1, "bytes": bytes}));
    }
    std::fs::create_dir_all(local).with_context(|| format!("{}", local.display()))?;
    let mut s = c.download(job, index, path).await?;
    let (tx, rx) = mpsc::channel(8);
    let dest = local.to_path_buf();
    let unpacker = std::thread::spawn(move || {
        unpack(
            ChannelReader {
                rx,
                buf: Bytes::new(),
            },
            &dest,
        )
    });
    loop {
        match s.message().await {
            Ok(Some(chunk)) => {
                if tx.send(Ok(chunk.data)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(e.message().to_string())).await;
                break;
            }
        }
    }
    drop(tx);
    let (files, bytes) = unpacker
        .join()
        .map_err(|_| anyhow::anyhow!("the archive reader panicked"))??;
    Ok(serde_json::json!({"files": files, "bytes": bytes}))
}

/// Unpack a tar stream from a sandbox into `dest` under the node's member rule (what a sandbox
/// sends is not trusted either).
fn unpack(r: impl Read, dest: &Path) -> anyhow::Result<(u64, u64)> {
    let mut a = tar::Archive::new(r);
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in a.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        // The rule the node applies to uploads: relative, no `..`, files, directories and
        // symlinks only.
        let (_, kind) = surge_node::runtime::io::check_member(&path, entry.header().entry_type())
            .map_err(|e| anyhow::anyhow!("{e}; refused"))?;
        if kind == surge_node::runtime::io::MemberKind::File {
            files += 1;
            bytes += entry.size();
        }
        // `unpack_in` also refuses to write through a symlink that leaves `dest`.
        entry.unpack_in(dest)?;
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of one member whose name is written into the header as is.
    fn tar_with(name: &[u8], kind: tar::EntryType) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[b'y'; 512]);
        raw.extend_from_slice(&[0; 1024]);
        raw
    }

    #[test]
    fn a_download_that_escapes_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let dest = dir.path().join("dest");
        std::fs::create_dir(&dest).expect("mkdir");
        for (name, kind) in [
            (&b"../escape"[..], tar::EntryType::Regular),
            (b"/abs", tar::EntryType::Regular),
            (b"dev", tar::EntryType::Char),
        ] {
            let err = unpack(&tar_with(name, kind)[..], &dest).expect_err("refused");
            assert!(err.to_string().contains("refused"), "{err}");
        }
        assert!(!dir.path().join("escape").exists());
        assert_eq!(std::fs::read_dir(&dest).expect("read").count(), 0);
        // Control: a plain member lands.
        let (files, bytes) =
            unpack(&tar_with(b"ok.txt", tar::EntryType::Regular)[..], &dest).expect("ok");
        assert_eq!((files, bytes), (1, 1));
        assert_eq!(std::fs::read(dest.join("ok.txt")).expect("read"), b"y");
    }
}
