//! The guest agent: serves exec and file requests over one connection at a time per
//! [`Agent::serve`] call (many connections may be served at once).
//!
//! ```text
//!  reader (this task) ──frame──► Slots ──► one task per request ──► Outbox ──► writer task
//!        │ Hello first                      exec / read / write /         (one per
//!        │ requests open a slot             list / download / upload       connection)
//! ```
//!
//! The agent never trusts its peer: every request is checked against the same caps as the
//! node's, requests per connection and execs per guest are capped, and a peer that breaks the
//! protocol loses its connection (or, past a window, its request).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};

use crate::mux::{write_all, Outbox, Route, Slots, OUTGOING_FRAMES_MAX};
use crate::proto::{
    check_version, read_frame, ErrorKind, Frame, Header, ProtoError, EXECS_MAX, PROTOCOL_VERSION,
    REQUESTS_PER_CONNECTION_MAX,
};

mod exec;
mod files;
pub mod fsys;
pub mod pid1;
pub mod reap;

pub use reap::{ReapMode, Reaper};

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Files are resolved inside this directory (`/` in a guest; a temp dir in tests). Execs
    /// start there when they name no working directory.
    pub root: PathBuf,
    /// The sandbox's user: execs run as it and files written belong to it. `None`: the agent's
    /// own (tests that do not run as root).
    pub user: Option<(u32, u32)>,
    pub reap: ReapMode,
}

/// See the module docs.
pub struct Agent {
    config: AgentConfig,
    root: OwnedFd,
    reaper: Reaper,
    execs: Arc<Semaphore>,
}

impl Agent {
    /// Open the root and start the reaper. Call inside a tokio runtime.
    pub fn new(config: AgentConfig) -> std::io::Result<Arc<Self>> {
        let root = fsys::open_root(&config.root)?;
        Ok(Arc::new(Self {
            reaper: Reaper::new(config.reap)?,
            root,
            config,
            execs: Arc::new(Semaphore::new(EXECS_MAX)),
        }))
    }

    /// The owner of files written: the sandbox's user, or the agent's own.
    fn owner(&self) -> (u32, u32) {
        self.config.user.unwrap_or_else(|| {
            // SAFETY: getuid and getgid only return this process's ids; they cannot fail.
            unsafe { (libc::getuid(), libc::getgid()) }
        })
    }

    /// Run the sandbox's command (see `exec::run_main`); its exit code.
    pub async fn run_command(&self, argv: &[String]) -> std::io::Result<i32> {
        exec::run_main(self, argv).await
    }

    /// Serve one connection until the peer closes it. Every request still running then is
    /// cancelled (its processes killed).
    pub async fn serve<S>(self: Arc<Self>, stream: S) -> Result<(), ProtoError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel::<Frame>(OUTGOING_FRAMES_MAX);
        let writer = tokio::spawn(write_all(wr, rx));
        let hello = match read_frame(&mut rd).await {
            Ok(Some(Frame {
                header: Header::Hello { version },
                ..
            })) => check_version(version),
            Ok(Some(f)) => Err(ProtoError::Malformed(format!(
                "the first frame must be a hello, not {:?}",
                f.header
            ))),
            Ok(None) => Err(ProtoError::Closed),
            Err(e) => Err(e),
        };
        if let Err(e) = hello {
            let _ = tx
                .send(Frame::error(0, ErrorKind::Protocol, e.to_string()))
                .await;
            drop(tx);
            let _ = writer.await;
            return Err(e);
        }
        let _ = tx
            .send(Frame::new(Header::Hello {
                version: PROTOCOL_VERSION,
            }))
            .await;
        let slots = Slots::default();
        let result = loop {
            let frame = match read_frame(&mut rd).await {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(()),
                Err(e) => {
                    let _ = tx
                        .send(Frame::error(0, ErrorKind::Protocol, e.to_string()))
                        .await;
                    break Err(e);
                }
            };
            let id = frame.header.id();
            if is_request(&frame.header) {
                let refusal = {
                    let open = slots.lock();
                    if open.contains_key(&id) || id == 0 {
                        Some((ErrorKind::Protocol, format!("request id {id} is in use")))
                    } else if open.len() >= REQUESTS_PER_CONNECTION_MAX {
                        Some((
                            ErrorKind::Busy,
                            format!(
                                "{REQUESTS_PER_CONNECTION_MAX} requests are open on this connection"
                            ),
                        ))
                    } else {
                        None
                    }
                };
                if let Some((kind, message)) = refusal {
                    let _ = tx.send(Frame::error(id, kind, message)).await;
                    continue;
                }
                let (inbound, credits) = slots.open(id);
                let out = Outbox {
                    id,
                    tx: tx.clone(),
                    credits,
                };
                let agent = self.clone();
                let slots = slots.clone();
                tokio::spawn(async move {
                    agent.handle(frame.header, inbound, out).await;
                    slots.close(id);
                });
                continue;
            }
            if matches!(frame.header, Header::Hello { .. }) {
                let _ = tx
                    .send(Frame::error(0, ErrorKind::Protocol, "a second hello"))
                    .await;
                break Err(ProtoError::Malformed("a second hello".into()));
            }
            if slots.route(frame) == Route::Overrun {
                // Dropping the slot closes the request's inbound: it is cancelled.
                slots.close(id);
                let _ = tx
                    .send(Frame::error(
                        id,
                        ErrorKind::Protocol,
                        "the client sent past its window; request cancelled",
                    ))
                    .await;
            }
        };
        slots.lock().clear();
        drop(tx);
        let _ = writer.await;
        result
    }

    async fn handle(self: Arc<Self>, header: Header, inbound: mpsc::Receiver<Frame>, out: Outbox) {
        match header {
            Header::Exec { spec, .. } => exec::run(&self, spec, inbound, out).await,
            Header::ReadFile { path, .. } => files::read(&self, path, inbound, out).await,
            Header::WriteFile { spec, .. } => files::write(&self, spec, inbound, out).await,
            Header::ListDir { path, .. } => files::list(&self, path, out).await,
            Header::Download { path, .. } => files::download(&self, path, inbound, out).await,
            Header::Upload { path, .. } => files::upload(&self, path, inbound, out).await,
            other => {
                out.error(ErrorKind::Protocol, format!("{other:?} is not a request"))
                    .await
            }
        }
    }
}

fn is_request(h: &Header) -> bool {
    matches!(
        h,
        Header::Exec { .. }
            | Header::ReadFile { .. }
            | Header::WriteFile { .. }
            | Header::ListDir { .. }
            | Header::Download { .. }
            | Header::Upload { .. }
    )
}
