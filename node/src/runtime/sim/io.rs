//! Exec and files of simulated sandboxes, for benchmarks that drive tens of thousands of them.
//! An exec waits a configured delay and prints a configured output (`cat` with stdin echoes
//! its stdin instead); files live in memory, per sandbox, capped at [`SIM_FS_BYTES_MAX`] and
//! [`SIM_FS_ENTRIES_MAX`], and are forgotten with the sandbox.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::SimRuntime;
use crate::runtime::io::{
    check_member, check_path, DirEntry, EntryKind, ExecControl, ExecOutput, ExecSpec, ExecStatus,
    IoError, Listing, MemberKind, SandboxIo, UploadStats, WriteSpec, CHUNK_BYTES,
    EXECS_PER_SANDBOX_MAX, LIST_ENTRIES_MAX,
};
use crate::runtime::{ObservedState, SandboxId};

/// Bytes of files one simulated sandbox holds, at most.
pub const SIM_FS_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Files and directories one simulated sandbox holds, at most.
pub const SIM_FS_ENTRIES_MAX: usize = 10_000;

/// What a simulated exec does.
#[derive(Clone, Debug, Default)]
pub struct SimExec {
    pub delay: Duration,
    pub stdout: Bytes,
}

#[derive(Default)]
pub(super) struct SimIo {
    pub(super) exec: SimExec,
    state: Mutex<HashMap<SandboxId, SimFs>>,
}

#[derive(Default)]
struct SimFs {
    /// Normalized absolute path -> entry. `/` is implicit.
    entries: BTreeMap<String, Entry>,
    bytes: u64,
    execs: usize,
}

#[derive(Clone)]
enum Entry {
    File { data: Bytes, mode: u32 },
    Dir,
}

impl SimIo {
    fn lock(&self) -> MutexGuard<'_, HashMap<SandboxId, SimFs>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn forget(&self, id: SandboxId) {
        self.lock().remove(&id);
    }
}

/// `/a/./b/../c` -> `/a/c`; `..` at the root stays at the root, as in a real filesystem.
fn normalize(path: &str) -> Result<String, IoError> {
    check_path(path)?;
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

impl SimFs {
    fn is_dir(&self, path: &str) -> bool {
        path == "/" || matches!(self.entries.get(path), Some(Entry::Dir))
    }

    fn make_dirs(&mut self, path: &str) -> Result<(), IoError> {
        if self.is_dir(path) {
            return Ok(());
        }
        if matches!(self.entries.get(path), Some(Entry::File { .. })) {
            return Err(IoError::WrongKind {
                path: path.into(),
                what: "is a file, not a directory".into(),
            });
        }
        self.make_dirs(parent(path))?;
        self.insert(path.to_string(), Entry::Dir)
    }

    fn insert(&mut self, path: String, entry: Entry) -> Result<(), IoError> {
        let new = match &entry {
            Entry::File { data, .. } => data.len() as u64,
            Entry::Dir => 0,
        };
        let old = match self.entries.get(&path) {
            Some(Entry::File { data, .. }) => data.len() as u64,
            Some(Entry::Dir) => 0,
            None if self.entries.len() >= SIM_FS_ENTRIES_MAX => {
                return Err(IoError::TooLarge(format!(
                    "a simulated sandbox holds at most {SIM_FS_ENTRIES_MAX} files"
                )))
            }
            None => 0,
        };
        let bytes = self.bytes - old + new;
        if bytes > SIM_FS_BYTES_MAX {
            return Err(IoError::TooLarge(format!(
                "a simulated sandbox holds at most {SIM_FS_BYTES_MAX} bytes of files"
            )));
        }
        self.bytes = bytes;
        self.entries.insert(path, entry);
        Ok(())
    }

    fn write(&mut self, path: &str, data: Bytes, mode: u32, parents: bool) -> Result<(), IoError> {
        if parents {
            self.make_dirs(parent(path))?;
        } else if !self.is_dir(parent(path)) {
            return Err(IoError::NotFound {
                path: parent(path).into(),
            });
        }
        if self.is_dir(path) {
            return Err(IoError::WrongKind {
                path: path.into(),
                what: "is a directory".into(),
            });
        }
        self.insert(path.to_string(), Entry::File { data, mode })
    }

    /// Entries strictly below `dir`, with their paths relative to it.
    fn below<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        let prefix = if dir == "/" {
            "/".to_string()
        } else {
            format!("{dir}/")
        };
        let len = prefix.len();
        let start = prefix.clone();
        self.entries
            .range(start..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(move |(k, v)| (&k[len..], v))
    }
}

async fn send_chunks(out: &mpsc::Sender<Bytes>, data: &Bytes) -> Result<(), IoError> {
    for start in (0..data.len()).step_by(CHUNK_BYTES) {
        let end = (start + CHUNK_BYTES).min(data.len());
        out.send(data.slice(start..end))
            .await
            .map_err(|_| IoError::Runtime("the caller went away".into()))?;
    }
    Ok(())
}

/// Read a byte stream up to `max` bytes; more is refused.
async fn collect(mut data: mpsc::Receiver<Bytes>, max: u64, what: &str) -> Result<Bytes, IoError> {
    let mut buf = Vec::new();
    while let Some(chunk) = data.recv().await {
        if (buf.len() + chunk.len()) as u64 > max {
            return Err(IoError::TooLarge(format!(
                "{what} is larger than {max} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Releases an exec's slot when the exec ends or is dropped.
struct ExecSlot<'a> {
    io: &'a SimIo,
    id: SandboxId,
}

impl Drop for ExecSlot<'_> {
    fn drop(&mut self) {
        if let Some(fs) = self.io.lock().get_mut(&self.id) {
            fs.execs = fs.execs.saturating_sub(1);
        }
    }
}

impl SimRuntime {
    /// The sandbox must be running.
    fn check_running(&self, id: SandboxId) -> Result<(), IoError> {
        let observed = self.status_now(id).map_err(|_| IoError::NoSandbox(id))?;
        match observed.state {
            ObservedState::Running => Ok(()),
            other => Err(IoError::NotRunning {
                id,
                state: format!("{other:?}").to_lowercase(),
            }),
        }
    }

    fn fs<T>(&self, id: SandboxId, f: impl FnOnce(&mut SimFs) -> T) -> Result<T, IoError> {
        self.check_running(id)?;
        Ok(f(self.io.lock().entry(id).or_default()))
    }
}

impl SandboxIo for SimRuntime {
    async fn exec(
        &self,
        id: SandboxId,
        spec: ExecSpec,
        mut control: mpsc::Receiver<ExecControl>,
        out: mpsc::Sender<ExecOutput>,
    ) -> Result<ExecStatus, IoError> {
        spec.validate()?;
        self.fs(id, |fs| {
            if fs.execs >= EXECS_PER_SANDBOX_MAX {
                return Err(IoError::Busy(format!(
                    "sandbox {id} already runs {EXECS_PER_SANDBOX_MAX} execs; wait for one to end"
                )));
            }
            fs.execs += 1;
            Ok(())
        })??;
        let _slot = ExecSlot { io: &self.io, id };
        let started = Instant::now();
        let echo = spec.command[0] == "cat" && spec.stdin;
        let deadline = started + spec.timeout;
        let finish = started + self.io.exec.delay;
        let cancelled = || IoError::Runtime("the caller went away".into());
        // Stdin: `cat` echoes it; anything else reads and drops it.
        let mut stdin_open = spec.stdin;
        loop {
            tokio::select! {
                msg = control.recv(), if stdin_open => match msg {
                    Some(ExecControl::Stdin(b)) if echo => {
                        out.send(ExecOutput::Stdout(b)).await.map_err(|_| cancelled())?;
                    }
                    Some(ExecControl::Stdin(_)) => {}
                    Some(ExecControl::Signal(n)) => {
                        return Ok(ExecStatus {
                            code: 128 + n,
                            signal: Some(n),
                            timed_out: false,
                            duration: started.elapsed(),
                        });
                    }
                    Some(ExecControl::CloseStdin) | None => stdin_open = false,
                },
                () = tokio::time::sleep_until(deadline.min(finish)), if !stdin_open || !echo => {
                    break;
                }
                () = out.closed() => return Err(cancelled()),
            }
        }
        if finish > deadline {
            return Ok(ExecStatus {
                code: 137,
                signal: Some(9),
                timed_out: true,
                duration: started.elapsed(),
            });
        }
        // `cat` printed its stdin instead.
        let stdout = if echo {
            Bytes::new()
        } else {
            self.io.exec.stdout.clone()
        };
        for chunk in stdout.chunks(CHUNK_BYTES) {
            out.send(ExecOutput::Stdout(Bytes::copy_from_slice(chunk)))
                .await
                .map_err(|_| cancelled())?;
        }
        Ok(ExecStatus {
            code: 0,
            signal: None,
            timed_out: false,
            duration: started.elapsed(),
        })
    }

    async fn read_file(
        &self,
        id: SandboxId,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> Result<u64, IoError> {
        let path = normalize(&path)?;
        let data = self.fs(id, |fs| match fs.entries.get(&path) {
            Some(Entry::File { data, .. }) => Ok(data.clone()),
            Some(Entry::Dir) => Err(IoError::WrongKind {
                path: path.clone(),
                what: "is a directory".into(),
            }),
            None if path == "/" => Err(IoError::WrongKind {
                path: path.clone(),
                what: "is a directory".into(),
            }),
            None => Err(IoError::NotFound { path: path.clone() }),
        })??;
        send_chunks(&out, &data).await?;
        Ok(data.len() as u64)
    }

    async fn write_file(
        &self,
        id: SandboxId,
        spec: WriteSpec,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<u64, IoError> {
        let path = normalize(&spec.path)?;
        self.check_running(id)?;
        let data = collect(data, SIM_FS_BYTES_MAX, "the file").await?;
        let len = data.len() as u64;
        self.fs(id, |fs| fs.write(&path, data, spec.mode, spec.make_parents))??;
        Ok(len)
    }

    async fn list_dir(&self, id: SandboxId, path: String) -> Result<Listing, IoError> {
        let path = normalize(&path)?;
        self.fs(id, |fs| {
            if !fs.is_dir(&path) {
                return Err(match fs.entries.get(&path) {
                    Some(_) => IoError::WrongKind {
                        path: path.clone(),
                        what: "is not a directory".into(),
                    },
                    None => IoError::NotFound { path: path.clone() },
                });
            }
            let mut entries = Vec::new();
            let mut truncated = false;
            for (rel, e) in fs.below(&path).filter(|(rel, _)| !rel.contains('/')) {
                if entries.len() == LIST_ENTRIES_MAX {
                    truncated = true;
                    break;
                }
                let (kind, size, mode) = match e {
                    Entry::File { data, mode } => (EntryKind::File, data.len() as u64, *mode),
                    Entry::Dir => (EntryKind::Dir, 0, 0o755),
                };
                entries.push(DirEntry {
                    name: rel.to_string(),
                    kind,
                    size,
                    mode,
                    modified_ms: 0,
                    uid: 0,
                    gid: 0,
                });
            }
            Ok(Listing { entries, truncated })
        })?
    }

    async fn download(
        &self,
        id: SandboxId,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> Result<u64, IoError> {
        let path = normalize(&path)?;
        let archive = self.fs(id, |fs| -> Result<Vec<u8>, IoError> {
            let mut b = tar::Builder::new(Vec::new());
            let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, e: &Entry| {
                let mut h = tar::Header::new_gnu();
                match e {
                    Entry::File { data, mode } => {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_size(data.len() as u64);
                        h.set_mode(*mode);
                        h.set_cksum();
                        b.append_data(&mut h, name, &data[..])
                    }
                    Entry::Dir => {
                        h.set_entry_type(tar::EntryType::Directory);
                        h.set_size(0);
                        h.set_mode(0o755);
                        h.set_cksum();
                        b.append_data(&mut h, name, std::io::empty())
                    }
                }
                .map_err(|e| IoError::io("build the archive", e))
            };
            match fs.entries.get(&path) {
                Some(e @ Entry::File { .. }) => {
                    let name = path.rsplit('/').next().unwrap_or("file");
                    add(&mut b, name, e)?;
                }
                None if path != "/" => return Err(IoError::NotFound { path: path.clone() }),
                _ => {
                    for (rel, e) in fs.below(&path) {
                        add(&mut b, rel, e)?;
                    }
                }
            }
            b.into_inner()
                .map_err(|e| IoError::io("build the archive", e))
        })??;
        let archive = Bytes::from(archive);
        send_chunks(&out, &archive).await?;
        Ok(archive.len() as u64)
    }

    async fn upload(
        &self,
        id: SandboxId,
        path: String,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<UploadStats, IoError> {
        let root = normalize(&path)?;
        self.check_running(id)?;
        let data = collect(data, SIM_FS_BYTES_MAX, "the upload").await?;
        // Check and read the whole archive before changing anything.
        let mut staged = Vec::new();
        let mut archive = tar::Archive::new(&data[..]);
        let entries = archive
            .entries()
            .map_err(|e| IoError::BadArchive(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| IoError::BadArchive(e.to_string()))?;
            let raw = entry
                .path()
                .map_err(|e| IoError::BadArchive(e.to_string()))?
                .into_owned();
            let (parts, kind) = check_member(&raw, entry.header().entry_type())?;
            let target = normalize(&format!("{root}/{}", parts.join("/")))?;
            let item = match kind {
                MemberKind::Dir => Entry::Dir,
                // Symlinks are kept as empty files here: the simulation does not resolve them.
                MemberKind::Symlink => Entry::File {
                    data: Bytes::new(),
                    mode: 0o777,
                },
                MemberKind::File => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut entry, &mut buf)
                        .map_err(|e| IoError::BadArchive(e.to_string()))?;
                    Entry::File {
                        data: Bytes::from(buf),
                        mode: entry.header().mode().unwrap_or(0o644) & 0o7777,
                    }
                }
            };
            staged.push((target, item));
        }
        self.fs(id, |fs| {
            let mut stats = UploadStats::default();
            fs.make_dirs(&root)?;
            for (target, item) in staged {
                match item {
                    Entry::Dir => fs.make_dirs(&target)?,
                    Entry::File { data, mode } => {
                        stats.files += 1;
                        stats.bytes += data.len() as u64;
                        fs.write(&target, data, mode, true)?;
                    }
                }
            }
            Ok(stats)
        })?
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runtime::sim::SimProfile;
    use crate::runtime::{Resources, Runtime, SandboxSpec, StartRequest};

    async fn running() -> (SimRuntime, SandboxId) {
        let rt = SimRuntime::new(SimProfile {
            run_for: Duration::from_secs(3600),
            ..SimProfile::default()
        })
        .with_exec(Duration::from_millis(5), Bytes::from_static(b"ok\n"));
        let id = SandboxId::new(1, 0);
        rt.start(StartRequest {
            id,
            generation: 1,
            revision: 1,
            spec: SandboxSpec::default(),
            resources: Resources::default(),
        })
        .await
        .expect("ok");
        (rt, id)
    }

    fn spec(cmd: &str, timeout_ms: u64) -> ExecSpec {
        ExecSpec {
            command: vec![cmd.into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout: Duration::from_millis(timeout_ms),
            stdin: false,
        }
    }

    async fn write(rt: &SimRuntime, id: SandboxId, path: &str, data: &'static [u8]) -> u64 {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(data)).await.expect("ok");
        drop(tx);
        let spec = WriteSpec {
            path: path.into(),
            mode: 0o644,
            make_parents: true,
        };
        rt.write_file(id, spec, rx).await.expect("ok")
    }

    async fn read(rt: &SimRuntime, id: SandboxId, path: &str) -> Result<Vec<u8>, IoError> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let got = tokio::spawn(async move {
            let mut v = Vec::new();
            while let Some(c) = rx.recv().await {
                v.extend_from_slice(&c);
            }
            v
        });
        rt.read_file(id, path.into(), tx).await?;
        Ok(got.await.expect("ok"))
    }

    #[tokio::test(start_paused = true)]
    async fn exec_prints_the_configured_output_or_times_out() {
        let (rt, id) = running().await;
        let (_ctl, rx) = mpsc::channel(1);
        let (tx, mut out) = mpsc::channel(8);
        let st = rt.exec(id, spec("true", 1000), rx, tx).await.expect("ok");
        assert_eq!((st.code, st.timed_out), (0, false));
        assert_eq!(
            out.recv().await,
            Some(ExecOutput::Stdout(Bytes::from_static(b"ok\n")))
        );
        let (_ctl, rx) = mpsc::channel(1);
        let (tx, _out) = mpsc::channel(8);
        let st = rt.exec(id, spec("true", 1), rx, tx).await.expect("ok");
        assert!(st.timed_out);
        assert_eq!(st.signal, Some(9));
        // A missing sandbox is named.
        let (_ctl, rx) = mpsc::channel(1);
        let (tx, _out) = mpsc::channel(8);
        let err = rt
            .exec(SandboxId::new(9, 9), spec("true", 1000), rx, tx)
            .await
            .expect_err("an error");
        assert!(matches!(err, IoError::NoSandbox(_)), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn files_round_trip_and_stay_inside() {
        let (rt, id) = running().await;
        assert_eq!(write(&rt, id, "/work/a/b.txt", b"data").await, 4);
        assert_eq!(read(&rt, id, "/work/a/b.txt").await.expect("ok"), b"data");
        // `..` at the root stays at the root.
        assert_eq!(
            read(&rt, id, "/../../work/a/b.txt").await.expect("ok"),
            b"data"
        );
        assert!(matches!(
            read(&rt, id, "/nope").await.expect_err("an error"),
            IoError::NotFound { .. }
        ));
        let listing = rt.list_dir(id, "/work/a".into()).await.expect("ok");
        assert_eq!(listing.entries.len(), 1);
        assert_eq!(listing.entries[0].name, "b.txt");
        // A directory round trip through tar.
        let (tx, mut rx) = mpsc::channel(64);
        rt.download(id, "/work".into(), tx).await.expect("ok");
        let mut tarball = Vec::new();
        while let Some(c) = rx.recv().await {
            tarball.extend_from_slice(&c);
        }
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from(tarball)).await.expect("ok");
        drop(tx);
        let stats = rt.upload(id, "/copy".into(), rx).await.expect("ok");
        assert_eq!(stats.files, 1);
        assert_eq!(read(&rt, id, "/copy/a/b.txt").await.expect("ok"), b"data");
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_that_escapes_is_refused_whole() {
        let (rt, id) = running().await;
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_cksum();
        b.append_data(&mut h, "ok.txt", &b"x"[..]).expect("ok");
        let mut raw = b.into_inner().expect("ok");
        // A second member named ../escape (written by hand: the builder refuses such names).
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_size(1);
        h.set_cksum();
        raw.truncate(raw.len() - 1024);
        raw.extend_from_slice(h.as_bytes());
        raw.extend_from_slice(&[b'y'; 512]);
        raw.extend_from_slice(&[0; 1024]);
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from(raw)).await.expect("ok");
        drop(tx);
        let err = rt
            .upload(id, "/dst".into(), rx)
            .await
            .expect_err("an error");
        assert!(err.to_string().contains(".."), "{err}");
        assert!(
            read(&rt, id, "/dst/ok.txt").await.is_err(),
            "nothing was written"
        );
    }
}
