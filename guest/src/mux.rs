//! What both ends share to run many requests over one connection: the writer task, the table
//! of open requests, routing of incoming frames to them, and credit-limited sending.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, Semaphore};

use crate::proto::{write_frame, Entry, Frame, Header, Stream, WINDOW_CHUNKS};

/// Frames queued for the writer of one connection.
pub const OUTGOING_FRAMES_MAX: usize = 64;
/// Frames queued for one request: its window of data plus control frames.
pub const INBOUND_FRAMES_MAX: usize = WINDOW_CHUNKS as usize + 8;

/// The connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection closed")]
pub struct Gone;

/// One open request: where its frames go, and how many data frames it may still send.
pub struct Slot {
    pub inbound: mpsc::Sender<Frame>,
    pub credits: Arc<Semaphore>,
}

/// The open requests of a connection.
#[derive(Clone, Default)]
pub struct Slots(Arc<Mutex<HashMap<u64, Slot>>>);

/// What became of an incoming frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Delivered,
    /// No open request has this id (it ended; late frames are dropped).
    Unknown,
    /// The request's queue is full: the peer sent past its window.
    Overrun,
}

impl Slots {
    pub fn lock(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open request `id`: its inbound frames and its sending credits.
    pub fn open(&self, id: u64) -> (mpsc::Receiver<Frame>, Arc<Semaphore>) {
        let (tx, rx) = mpsc::channel(INBOUND_FRAMES_MAX);
        let credits = Arc::new(Semaphore::new(WINDOW_CHUNKS as usize));
        self.lock().insert(
            id,
            Slot {
                inbound: tx,
                credits: credits.clone(),
            },
        );
        (rx, credits)
    }

    pub fn close(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Hand `frame` to its request; a `Credit` refills the request's sending window (never past
    /// [`WINDOW_CHUNKS`], whatever the peer claims).
    pub fn route(&self, frame: Frame) -> Route {
        let id = frame.header.id();
        let map = self.lock();
        let Some(slot) = map.get(&id) else {
            return Route::Unknown;
        };
        if let Header::Credit { chunks, .. } = frame.header {
            let room = (WINDOW_CHUNKS as usize).saturating_sub(slot.credits.available_permits());
            slot.credits
                .add_permits(usize::try_from(chunks).unwrap_or(usize::MAX).min(room));
            return Route::Delivered;
        }
        match slot.inbound.try_send(frame) {
            Ok(()) => Route::Delivered,
            Err(mpsc::error::TrySendError::Closed(_)) => Route::Unknown,
            Err(mpsc::error::TrySendError::Full(_)) => Route::Overrun,
        }
    }
}

/// Write every queued frame to `w` until all senders are gone or the connection breaks.
pub async fn write_all<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Frame>) {
    while let Some(frame) = rx.recv().await {
        if write_frame(&mut w, &frame).await.is_err() {
            break;
        }
    }
}

/// The sending side of one request.
#[derive(Clone)]
pub struct Outbox {
    pub id: u64,
    pub tx: mpsc::Sender<Frame>,
    pub credits: Arc<Semaphore>,
}

impl Outbox {
    pub async fn send(&self, header: Header) -> Result<(), Gone> {
        self.tx.send(Frame::new(header)).await.map_err(|_| Gone)
    }

    /// Send a frame that costs a credit (waits for one).
    async fn send_counted(&self, frame: Frame) -> Result<(), Gone> {
        let permit = self.credits.acquire().await.map_err(|_| Gone)?;
        permit.forget();
        self.tx.send(frame).await.map_err(|_| Gone)
    }

    pub async fn data(&self, stream: Stream, bytes: Bytes) -> Result<(), Gone> {
        self.send_counted(Frame::data(self.id, stream, bytes)).await
    }

    pub async fn entries(&self, entries: Vec<Entry>) -> Result<(), Gone> {
        self.send_counted(Frame::new(Header::Entries {
            id: self.id,
            entries,
        }))
        .await
    }

    /// Give one credit back: a data frame of the peer's was consumed.
    pub async fn credit(&self) -> Result<(), Gone> {
        self.send(Header::Credit {
            id: self.id,
            chunks: 1,
        })
        .await
    }

    pub async fn error(&self, kind: crate::proto::ErrorKind, message: impl Into<String>) {
        let _ = self.tx.send(Frame::error(self.id, kind, message)).await;
    }
}
