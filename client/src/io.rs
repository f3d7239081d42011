//! Exec and files of running sandboxes, through any replica (which forwards to the node that
//! holds the sandbox). Calls that send a stream are sent once; reads are repeated across the
//! replicas like other reads; an exec or a write whose bytes are all in memory is sent again
//! only when no replica was reached (nothing can have run).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use surge_proto::sandbox as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::{Client, ClientError, Repeat};

/// Output an [`Client::exec_output`] keeps per stream, unless told otherwise.
pub const OUTPUT_CAP_DEFAULT: usize = 16 * 1024 * 1024;
/// Messages of a caller's input stream buffered toward the replica.
pub const INPUT_BUFFER: usize = 8;

/// One sandbox: `JOB.INDEX`.
pub fn sandbox(job_id: u64, index: u32) -> Option<pb::SandboxRef> {
    Some(pb::SandboxRef {
        job_id,
        index,
        ..Default::default()
    })
}

/// What to run (the CLI's `surge exec` flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exec {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
    /// `None`: the server's default.
    pub timeout: Option<Duration>,
}

impl Exec {
    pub fn new<S: Into<String>>(command: impl IntoIterator<Item = S>) -> Self {
        Exec {
            command: command.into_iter().map(Into::into).collect(),
            ..Exec::default()
        }
    }

    pub fn start(&self, job_id: u64, index: u32, stdin: bool) -> pb::ExecStart {
        pb::ExecStart {
            sandbox: sandbox(job_id, index),
            command: self.command.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            timeout_ms: self
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            stdin,
        }
    }
}

/// An exec's collected result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// More output came than the cap kept (the command still ran to its end).
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub exit: pb::ExecExit,
    /// From the call until the first output (or the end, if there was none).
    pub first_output: Duration,
}

/// The end of an exec stream that did not say how the command ended.
fn no_exit() -> ClientError {
    ClientError::Input("the exec stream ended without the command's exit status".into())
}

impl Client {
    /// Start an exec; the reply streams output chunks and ends with the exit status. `input`
    /// carries stdin chunks, `close_stdin` and signals (set `start.stdin` to send stdin); drop
    /// the returned stream to cancel, which kills the command and what it started.
    pub async fn exec(
        &self,
        start: pb::ExecStart,
        input: Option<mpsc::Receiver<pb::ExecInput>>,
    ) -> Result<Streaming<pb::ExecOutput>, ClientError> {
        let first = pb::ExecInput {
            input: Some(pb::exec_input::Input::Start(start)),
        };
        let mut input = input;
        let repeat = if input.is_some() {
            Repeat::Never
        } else {
            Repeat::Unsent
        };
        self.call(repeat, |a| {
            let first = first.clone();
            let more = input.take();
            async move {
                let (tx, rx) = mpsc::channel(INPUT_BUFFER);
                tokio::spawn(async move {
                    if tx.send(first).await.is_err() {
                        return;
                    }
                    if let Some(mut more) = more {
                        while let Some(m) = more.recv().await {
                            if tx.send(m).await.is_err() {
                                return;
                            }
                        }
                    }
                });
                Ok(self
                    .io_at(&a)?
                    .exec(ReceiverStream::new(rx))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// Run a command to its end and collect its output (each stream capped at `cap` bytes);
    /// `stdin`, if any, is sent whole and closed.
    pub async fn exec_output(
        &self,
        job_id: u64,
        index: u32,
        exec: &Exec,
        stdin: Option<Bytes>,
        cap: usize,
    ) -> Result<ExecResult, ClientError> {
        let started = tokio::time::Instant::now();
        let input = match stdin {
            None => None,
            Some(data) => {
                let (tx, rx) = mpsc::channel(INPUT_BUFFER);
                tokio::spawn(async move {
                    for chunk in data.chunks(64 * 1024) {
                        let msg = pb::ExecInput {
                            input: Some(pb::exec_input::Input::Stdin(Bytes::copy_from_slice(
                                chunk,
                            ))),
                        };
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx
                        .send(pb::ExecInput {
                            input: Some(pb::exec_input::Input::CloseStdin(true)),
                        })
                        .await;
                });
                Some(rx)
            }
        };
        let stdin = input.is_some();
        let mut stream = self.exec(exec.start(job_id, index, stdin), input).await?;
        let mut r = ExecResult::default();
        let mut first = None;
        let keep = |buf: &mut Vec<u8>, truncated: &mut bool, data: &[u8]| {
            let room = cap.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..data.len().min(room)]);
            *truncated |= data.len() > room;
        };
        loop {
            let msg = stream
                .message()
                .await
                .map_err(|s| self.answer(s))?
                .ok_or_else(no_exit)?;
            first.get_or_insert_with(|| started.elapsed());
            match msg.output {
                Some(pb::exec_output::Output::Stdout(b)) => {
                    keep(&mut r.stdout, &mut r.stdout_truncated, &b)
                }
                Some(pb::exec_output::Output::Stderr(b)) => {
                    keep(&mut r.stderr, &mut r.stderr_truncated, &b)
                }
                Some(pb::exec_output::Output::Exit(e)) => {
                    r.exit = e;
                    r.first_output = first.unwrap_or_else(|| started.elapsed());
                    return Ok(r);
                }
                None => {}
            }
        }
    }

    /// One file, as a stream of chunks.
    pub async fn read_file(
        &self,
        job_id: u64,
        index: u32,
        path: &str,
    ) -> Result<Streaming<pb::Chunk>, ClientError> {
        let req = pb::ReadFileRequest {
            sandbox: sandbox(job_id, index),
            path: path.to_string(),
        };
        self.call(Repeat::Safe, |a| {
            let req = req.clone();
            async move { Ok(self.io_at(&a)?.read_file(req).await?.into_inner()) }
        })
        .await
    }

    /// One file, whole (at most `cap` bytes; a larger file is an error).
    pub async fn read_file_bytes(
        &self,
        job_id: u64,
        index: u32,
        path: &str,
        cap: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let mut s = self.read_file(job_id, index, path).await?;
        let mut buf = Vec::new();
        while let Some(c) = s.message().await.map_err(|s| self.answer(s))? {
            if buf.len() + c.data.len() > cap {
                return Err(ClientError::Input(format!(
                    "{path} is larger than {cap} bytes; read it as a stream"
                )));
            }
            buf.extend_from_slice(&c.data);
        }
        Ok(buf)
    }

    /// Write one file from a stream of chunks (sent once).
    pub async fn write_file(
        &self,
        start: pb::WriteFileStart,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<pb::WriteFileReply, ClientError> {
        let mut data = Some(data);
        self.call(Repeat::Never, |a| {
            let start = start.clone();
            let data = data.take();
            async move {
                let rx = stream_of(
                    pb::WriteFileInput {
                        input: Some(pb::write_file_input::Input::Start(start)),
                    },
                    data,
                    |b| pb::WriteFileInput {
                        input: Some(pb::write_file_input::Input::Data(b)),
                    },
                );
                Ok(self.io_at(&a)?.write_file(rx).await?.into_inner())
            }
        })
        .await
    }

    /// Write one file from memory (replaces it atomically; parent directories are made).
    pub async fn write_file_bytes(
        &self,
        job_id: u64,
        index: u32,
        path: &str,
        data: Bytes,
        mode: u32,
    ) -> Result<pb::WriteFileReply, ClientError> {
        let start = pb::WriteFileStart {
            sandbox: sandbox(job_id, index),
            path: path.to_string(),
            mode,
            make_parents: true,
        };
        self.call(Repeat::Unsent, |a| {
            let start = start.clone();
            let data = data.clone();
            async move {
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.try_send(data);
                drop(tx);
                let s = stream_of(
                    pb::WriteFileInput {
                        input: Some(pb::write_file_input::Input::Start(start)),
                    },
                    Some(rx),
                    |b| pb::WriteFileInput {
                        input: Some(pb::write_file_input::Input::Data(b)),
                    },
                );
                Ok(self.io_at(&a)?.write_file(s).await?.into_inner())
            }
        })
        .await
    }

    pub async fn list_dir(
        &self,
        job_id: u64,
        index: u32,
        path: &str,
    ) -> Result<pb::ListDirReply, ClientError> {
        let req = pb::ListDirRequest {
            sandbox: sandbox(job_id, index),
            path: path.to_string(),
        };
        self.call(Repeat::Safe, |a| {
            let req = req.clone();
            async move { Ok(self.io_at(&a)?.list_dir(req).await?.into_inner()) }
        })
        .await
    }

    /// A file or directory tree as a tar stream.
    pub async fn download(
        &self,
        job_id: u64,
        index: u32,
        path: &str,
    ) -> Result<Streaming<pb::Chunk>, ClientError> {
        let req = pb::DownloadRequest {
            sandbox: sandbox(job_id, index),
            path: path.to_string(),
        };
        self.call(Repeat::Safe, |a| {
            let req = req.clone();
            async move { Ok(self.io_at(&a)?.download(req).await?.into_inner()) }
        })
        .await
    }

    /// Unpack a tar stream under directory `path` in the sandbox (sent once).
    pub async fn upload(
        &self,
        job_id: u64,
        index: u32,
        path: &str,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<pb::UploadReply, ClientError> {
        let start = pb::UploadStart {
            sandbox: sandbox(job_id, index),
            path: path.to_string(),
        };
        let mut data = Some(data);
        self.call(Repeat::Never, |a| {
            let start = start.clone();
            let data = data.take();
            async move {
                let s = stream_of(
                    pb::UploadInput {
                        input: Some(pb::upload_input::Input::Start(start)),
                    },
                    data,
                    |b| pb::UploadInput {
                        input: Some(pb::upload_input::Input::Data(b)),
                    },
                );
                Ok(self.io_at(&a)?.upload(s).await?.into_inner())
            }
        })
        .await
    }

    /// Capture sandbox `job_id.index`'s filesystem as template `template` on its node
    /// (`surge snapshot`). Not repeated once a replica took it (a second try would find the
    /// template made by the first).
    pub async fn snapshot(
        &self,
        job_id: u64,
        index: u32,
        template: &str,
    ) -> Result<pb::SnapshotReply, ClientError> {
        let req = pb::SnapshotRequest {
            sandbox: sandbox(job_id, index),
            template: template.to_string(),
        };
        self.call(Repeat::Unsent, |a| {
            let req = req.clone();
            async move { Ok(self.io_at(&a)?.snapshot(req).await?.into_inner()) }
        })
        .await
    }

    /// Copy a template from a node that holds it to others (`surge template copy`; admin).
    /// Repeating it is harmless (nodes that hold it by then are skipped), so it is retried
    /// like a read.
    pub async fn copy_template(
        &self,
        req: pb::CopyTemplateRequest,
    ) -> Result<pb::CopyTemplateReply, ClientError> {
        self.call(Repeat::Safe, |a| {
            let req = req.clone();
            async move { Ok(self.io_at(&a)?.copy_template(req).await?.into_inner()) }
        })
        .await
    }
}

/// A request stream: `first`, then each chunk of `data` wrapped by `wrap`.
fn stream_of<T: Send + 'static>(
    first: T,
    data: Option<mpsc::Receiver<Bytes>>,
    wrap: impl Fn(Bytes) -> T + Send + 'static,
) -> ReceiverStream<T> {
    let (tx, rx) = mpsc::channel(INPUT_BUFFER);
    tokio::spawn(async move {
        if tx.send(first).await.is_err() {
            return;
        }
        if let Some(mut data) = data {
            while let Some(b) = data.recv().await {
                if tx.send(wrap(b)).await.is_err() {
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
