//! The host side: a client of one guest agent over one connection (in surge, the unix socket
//! libkrun maps to the agent's vsock port), with many requests multiplexed over it.
//!
//! [`Client::call`] opens a request and returns a [`Call`]: send data into it, pull its events
//! out (each pulled `Data` gives its credit back, so a slow consumer slows only its own
//! request), and drop it to cancel (the agent kills an exec's process group). The typed methods
//! (`exec`, `read_file`, ...) are built on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::mux::{write_all, Outbox, Route, Slots, OUTGOING_FRAMES_MAX};
use crate::proto::{
    check_version, read_frame, write_frame, Entry, ErrorKind, ExecRequest, ExitStatus, Frame,
    Header, ProtoError, Stream, WriteRequest, CHUNK_BYTES, PROTOCOL_VERSION,
};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent refused or failed the request.
    #[error("{message}")]
    Agent { kind: ErrorKind, message: String },
    #[error("the connection to the guest agent closed")]
    Closed,
    #[error("guest agent protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// From the caller while an exec runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    Stdin(Bytes),
    CloseStdin,
    Signal(i32),
}

/// To the caller while an exec runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// What a call yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Data(Stream, Bytes),
    Entries(Vec<Entry>),
    Exited(ExitStatus),
    Done {
        bytes: u64,
        files: u64,
        truncated: bool,
    },
}

/// A connection to one guest agent. Cheap to share (`Arc`); calls run concurrently.
pub struct Client {
    tx: mpsc::Sender<Frame>,
    slots: Slots,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

impl Client {
    /// Say hello over `stream` and start serving it; the agent must answer within `within`.
    pub async fn connect<S>(stream: S, within: Duration) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let hello = async {
            write_frame(
                &mut wr,
                &Frame::new(Header::Hello {
                    version: PROTOCOL_VERSION,
                }),
            )
            .await?;
            match read_frame(&mut rd).await? {
                Some(Frame {
                    header: Header::Hello { version },
                    ..
                }) => check_version(version).map_err(ClientError::from),
                Some(Frame {
                    header: Header::Error { kind, message, .. },
                    ..
                }) => Err(ClientError::Agent { kind, message }),
                Some(f) => Err(ProtoError::Malformed(format!(
                    "the agent answered hello with {:?}",
                    f.header
                ))
                .into()),
                None => Err(ClientError::Closed),
            }
        };
        tokio::time::timeout(within, hello)
            .await
            .map_err(|_| ClientError::Timeout(within))??;
        let (tx, rx) = mpsc::channel(OUTGOING_FRAMES_MAX);
        tokio::spawn(write_all(wr, rx));
        let slots = Slots::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (s, c, t) = (slots.clone(), closed.clone(), tx.clone());
        tokio::spawn(async move {
            while let Ok(Some(frame)) = read_frame(&mut rd).await {
                let id = frame.header.id();
                if s.route(frame) == Route::Overrun {
                    // The agent sent past its window: that request fails, the rest go on.
                    s.close(id);
                    let _ = t.send(Frame::new(Header::Cancel { id })).await;
                }
            }
            c.store(true, Ordering::Relaxed);
            // Every open call sees its channel close: `ClientError::Closed`.
            s.lock().clear();
        });
        Ok(Self {
            tx,
            slots,
            next_id: AtomicU64::new(1),
            closed,
        })
    }

    /// The connection is gone (the agent or its VM ended); a new one is needed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.tx.is_closed()
    }

    /// Open a request (`header`'s id is replaced by a fresh one).
    pub async fn call(&self, header: Header) -> Result<Call, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header = with_id(header, id);
        let (inbound, credits) = self.slots.open(id);
        let out = Outbox {
            id,
            tx: self.tx.clone(),
            credits,
        };
        let call = Call {
            out,
            inbound,
            slots: self.slots.clone(),
            finished: false,
        };
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        call.out
            .send(header)
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(call)
    }

    /// Run a command: output to `out` as it comes, stdin and signals from `control`.
    pub async fn exec<C, O>(
        &self,
        spec: ExecRequest,
        mut control: mpsc::Receiver<C>,
        out: mpsc::Sender<O>,
    ) -> Result<ExitStatus, ClientError>
    where
        C: Into<Control> + Send,
        O: From<Output> + Send,
    {
        let stdin = spec.stdin;
        let mut call = self.call(Header::Exec { id: 0, spec }).await?;
        let credits = call.out.credits.clone();
        let mut control_open = true;
        // Stdin not yet sent: taken from `control` only when empty, so a command that never
        // reads its stdin holds up its own stdin and nothing else (its output still flows).
        let mut pending = Bytes::new();
        if !stdin {
            call.eof().await?;
        }
        loop {
            tokio::select! {
                c = control.recv(), if control_open && pending.is_empty() => match c.map(Into::into) {
                    Some(Control::Stdin(b)) => pending = b,
                    Some(Control::Signal(n)) => call.signal(n).await?,
                    Some(Control::CloseStdin) | None => {
                        control_open = false;
                        call.eof().await?;
                    }
                },
                p = credits.acquire(), if !pending.is_empty() => {
                    p.map_err(|_| ClientError::Closed)?.forget();
                    let chunk = pending.split_to(pending.len().min(CHUNK_BYTES));
                    call.send_counted(Stream::Stdin, chunk).await?;
                }
                e = call.next() => match e? {
                    Event::Data(Stream::Stderr, b) => {
                        out.send(O::from(Output::Stderr(b))).await.map_err(|_| ClientError::Closed)?
                    }
                    Event::Data(_, b) => {
                        out.send(O::from(Output::Stdout(b))).await.map_err(|_| ClientError::Closed)?
                    }
                    Event::Exited(status) => return Ok(status),
                    other => return Err(unexpected(&other)),
                },
            }
        }
    }

    /// Stream a file to `out`; its size.
    pub async fn read_file(
        &self,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> Result<u64, ClientError> {
        let mut call = self.call(Header::ReadFile { id: 0, path }).await?;
        call.pull_data(out).await
    }

    /// A tar stream of a file or directory to `out`; bytes sent.
    pub async fn download(
        &self,
        path: String,
        out: mpsc::Sender<Bytes>,
    ) -> Result<u64, ClientError> {
        let mut call = self.call(Header::Download { id: 0, path }).await?;
        call.pull_data(out).await
    }

    /// Write a file from `data` (its end ends the file); bytes written.
    pub async fn write_file(
        &self,
        spec: WriteRequest,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<u64, ClientError> {
        let mut call = self.call(Header::WriteFile { id: 0, spec }).await?;
        call.push_data(data).await.map(|(bytes, _)| bytes)
    }

    /// Unpack a tar stream from `data` under `path`; (files, bytes) created.
    pub async fn upload(
        &self,
        path: String,
        data: mpsc::Receiver<Bytes>,
    ) -> Result<(u64, u64), ClientError> {
        let mut call = self.call(Header::Upload { id: 0, path }).await?;
        call.push_data(data)
            .await
            .map(|(bytes, files)| (files, bytes))
    }

    /// A directory's entries, sorted by name, and whether the list was cut at the cap.
    pub async fn list_dir(&self, path: String) -> Result<(Vec<Entry>, bool), ClientError> {
        let mut call = self.call(Header::ListDir { id: 0, path }).await?;
        let mut all = Vec::new();
        loop {
            match call.next().await? {
                Event::Entries(e) => all.extend(e),
                Event::Done { truncated, .. } => return Ok((all, truncated)),
                other => return Err(unexpected(&other)),
            }
        }
    }
}

fn unexpected(e: &Event) -> ClientError {
    ProtoError::Malformed(format!("unexpected {e:?} from the agent")).into()
}

fn with_id(h: Header, id: u64) -> Header {
    match h {
        Header::Exec { spec, .. } => Header::Exec { id, spec },
        Header::ReadFile { path, .. } => Header::ReadFile { id, path },
        Header::WriteFile { spec, .. } => Header::WriteFile { id, spec },
        Header::ListDir { path, .. } => Header::ListDir { id, path },
        Header::Download { path, .. } => Header::Download { id, path },
        Header::Upload { path, .. } => Header::Upload { id, path },
        other => other,
    }
}

/// One open request. Dropping it before its end cancels it.
pub struct Call {
    out: Outbox,
    inbound: mpsc::Receiver<Frame>,
    slots: Slots,
    finished: bool,
}

impl Call {
    pub fn id(&self) -> u64 {
        self.out.id
    }

    /// Send bytes (split into chunks), waiting for credit as the agent consumes them.
    pub async fn send_data(&self, stream: Stream, bytes: Bytes) -> Result<(), ClientError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(CHUNK_BYTES));
            self.out
                .data(stream, chunk)
                .await
                .map_err(|_| ClientError::Closed)?;
        }
        Ok(())
    }

    pub async fn eof(&self) -> Result<(), ClientError> {
        self.out
            .send(Header::Eof { id: self.out.id })
            .await
            .map_err(|_| ClientError::Closed)
    }

    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.out
            .send(Header::Signal {
                id: self.out.id,
                signal,
            })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The next event; the last one is `Exited` or `Done` (or an error).
    pub async fn next(&mut self) -> Result<Event, ClientError> {
        let frame = self.inbound.recv().await.ok_or(ClientError::Closed)?;
        let event = match frame.header {
            Header::Data { stream, .. } => {
                self.out.credit().await.map_err(|_| ClientError::Closed)?;
                Event::Data(stream, frame.payload)
            }
            Header::Entries { entries, .. } => {
                self.out.credit().await.map_err(|_| ClientError::Closed)?;
                Event::Entries(entries)
            }
            Header::Exited { status, .. } => {
                self.finished = true;
                Event::Exited(status)
            }
            Header::Done {
                bytes,
                files,
                truncated,
                ..
            } => {
                self.finished = true;
                Event::Done {
                    bytes,
                    files,
                    truncated,
                }
            }
            Header::Error { kind, message, .. } => {
                self.finished = true;
                return Err(ClientError::Agent { kind, message });
            }
            other => {
                return Err(
                    ProtoError::Malformed(format!("unexpected {other:?} from the agent")).into(),
                )
            }
        };
        Ok(event)
    }

    async fn pull_data(&mut self, out: mpsc::Sender<Bytes>) -> Result<u64, ClientError> {
        loop {
            match self.next().await? {
                Event::Data(_, b) => out.send(b).await.map_err(|_| ClientError::Closed)?,
                Event::Done { bytes, .. } => return Ok(bytes),
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Send all of `data`, then its end; (bytes, files) from the agent's `Done`. An agent that
    /// fails early (a bad member, over a cap) ends the call at once.
    async fn push_data(
        &mut self,
        mut data: mpsc::Receiver<Bytes>,
    ) -> Result<(u64, u64), ClientError> {
        let credits = self.out.credits.clone();
        let mut sending = true;
        let mut pending = Bytes::new();
        loop {
            tokio::select! {
                d = data.recv(), if sending && pending.is_empty() => match d {
                    Some(b) => pending = b,
                    None => {
                        sending = false;
                        self.eof().await?;
                    }
                },
                p = credits.acquire(), if !pending.is_empty() => {
                    p.map_err(|_| ClientError::Closed)?.forget();
                    let chunk = pending.split_to(pending.len().min(CHUNK_BYTES));
                    self.send_counted(Stream::File, chunk).await?;
                }
                e = self.next() => match e? {
                    Event::Done { bytes, files, .. } => return Ok((bytes, files)),
                    other => return Err(unexpected(&other)),
                },
            }
        }
    }

    /// Send one chunk whose credit the caller already took.
    async fn send_counted(&self, stream: Stream, chunk: Bytes) -> Result<(), ClientError> {
        self.out
            .tx
            .send(Frame::data(self.out.id, stream, chunk))
            .await
            .map_err(|_| ClientError::Closed)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .out
                .tx
                .try_send(Frame::new(Header::Cancel { id: self.out.id }));
        }
        self.slots.close(self.out.id);
    }
}
