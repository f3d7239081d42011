//! The Raft log in the `logs` column family, and the flusher thread that syncs its WAL.

use crate::codec;
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{
    index_key, io_read, io_write, synced, Storage, CF_LOGS, CF_META, KEY_COMMITTED,
    KEY_LAST_PURGED, KEY_VOTE,
};

/// The Raft log in the `logs` column family.
#[derive(Clone)]
pub struct LogStore {
    storage: Storage,
    /// Last committed index this replica learnt of (for status and metrics).
    committed_index: Arc<AtomicU64>,
    /// Where appends wait for their fsync; `None` syncs inside `append` itself.
    flusher: Option<Flusher>,
}

impl LogStore {
    /// A log whose appends fsync before `append` returns. Deterministic: the simulator uses it.
    pub fn new(storage: Storage) -> Self {
        LogStore {
            storage,
            committed_index: Arc::new(AtomicU64::new(0)),
            flusher: None,
        }
    }

    /// A log whose appends return once written and are acknowledged to openraft by a flusher
    /// thread after one WAL sync for every append queued meanwhile. The sync blocks that thread,
    /// not one of the runtime's workers (openraft 0.9's core awaits the acknowledgement).
    pub fn with_background_flush(storage: Storage) -> std::io::Result<Self> {
        let flusher = Flusher::start(storage.clone())?;
        Ok(LogStore {
            flusher: Some(flusher),
            ..LogStore::new(storage)
        })
    }

    /// Shared view of the committed index, updated as openraft saves it.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
    }

    fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut iter = self
            .storage
            .db
            .iterator_cf(self.storage.cf(CF_LOGS), IteratorMode::End);
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item.map_err(io_read)?;
                let entry: Entry = codec::decode(&v).map_err(io_read)?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let key = index_key(start);
        let iter = self.storage.db.iterator_cf(
            self.storage.cf(CF_LOGS),
            IteratorMode::From(&key, Direction::Forward),
        );
        let mut entries = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(io_read)?;
            let index = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| io_read(std::io::Error::other("log key is not 8 bytes")))?,
            );
            if !range.contains(&index) {
                break;
            }
            entries.push(codec::decode(&v).map_err(io_read)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.storage.get_meta(KEY_LAST_PURGED)?.flatten();
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.storage.put_meta(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.storage.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if let Some(c) = committed {
            self.committed_index.fetch_max(c.index, Ordering::Relaxed);
        }
        // Not synced: losing it only means re-applying committed entries after a crash.
        self.storage
            .db
            .put_cf(
                self.storage.cf(CF_META),
                KEY_COMMITTED,
                codec::encode(&committed),
            )
            .map_err(io_write)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<LogId> = self.storage.get_meta(KEY_COMMITTED)?.flatten();
        if let Some(c) = committed {
            self.committed_index.fetch_max(c.index, Ordering::Relaxed);
        }
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.storage.cf(CF_LOGS);
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(cf, index_key(entry.log_id.index), codec::encode(&entry));
        }
        if let Some(flusher) = &self.flusher {
            // Readable once written (openraft's contract for `append`); durable when the
            // flusher's next WAL sync completes. Writes reach the WAL in order, so that sync
            // also covers every earlier write, and a later synced write (vote, truncate, purge)
            // covers this one.
            self.storage.db.write(batch).map_err(io_write)?;
            return flusher.queue(callback);
        }
        let result = self.storage.db.write_opt(batch, &synced());
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_write(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.storage.cf(CF_LOGS),
            index_key(log_id.index),
            index_key(u64::MAX),
        );
        // delete_range's end is exclusive: remove the very last possible key too.
        batch.delete_cf(self.storage.cf(CF_LOGS), index_key(u64::MAX));
        self.storage
            .db
            .write_opt(batch, &synced())
            .map_err(io_write)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two writes leaves extra entries
        // below it, which get_log_state and readers tolerate, never a gap above it.
        self.storage.put_meta(KEY_LAST_PURGED, &Some(log_id))?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.storage.cf(CF_LOGS),
            index_key(0),
            index_key(log_id.index.saturating_add(1)),
        );
        self.storage
            .db
            .write_opt(batch, &synced())
            .map_err(io_write)
    }
}

/// Appends queued for the flusher before it refuses more (openraft has far fewer in flight).
const FLUSH_QUEUE_MAX: usize = 4_096;

/// The owner of the log's WAL syncs: one thread that takes every append queued since its last
/// sync, syncs the WAL once, and reports all of them flushed. It ends when the last
/// [`LogStore`] holding it is dropped.
#[derive(Clone)]
struct Flusher {
    queue: std::sync::mpsc::SyncSender<LogFlushed<TypeConfig>>,
}

impl Flusher {
    fn start(storage: Storage) -> std::io::Result<Self> {
        let (queue, waiting) = std::sync::mpsc::sync_channel(FLUSH_QUEUE_MAX);
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || Self::run(&storage, &waiting))?;
        Ok(Flusher { queue })
    }

    fn run(storage: &Storage, waiting: &std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
        let mut batch = Vec::new();
        while let Ok(first) = waiting.recv() {
            batch.push(first);
            batch.extend(waiting.try_iter());
            let synced = storage.db.flush_wal(true).map_err(|e| e.to_string());
            for callback in batch.drain(..) {
                callback.log_io_completed(synced.clone().map_err(std::io::Error::other));
            }
        }
    }

    fn queue(&self, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError> {
        self.queue.send(callback).map_err(|_| {
            io_write(std::io::Error::other(
                "the raft log's flusher thread has stopped",
            ))
        })
    }
}
