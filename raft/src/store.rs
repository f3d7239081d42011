//! RocksDB storage for the Raft log and the state machine's snapshots.
//!
//! This is the only module that knows RocksDB. One database per replica, three named column
//! families:
//!
//! | column family | key | value |
//! |---|---|---|
//! | `meta` | `vote`, `committed`, `last_purged`, `identity` | framed bincode ([`crate::codec`]) |
//! | `logs` | log index, big-endian u64 (so iteration order is log order) | framed bincode `Entry` |
//! | `snapshot` | `current` | framed bincode `StoredSnapshot` (meta + the application's bytes) |
//!
//! The state machine itself lives in memory (the scheduler's state is run-length encoded and
//! small); durability comes from the log plus the newest snapshot. On start the snapshot is
//! restored and openraft re-applies the committed log after it. Every write that Raft's safety
//! depends on (vote, truncation, purge, snapshot) is a synced write. Appended entries are either
//! synced in `append` (one fsync per batch of entries) or, in a server, written at once and
//! acknowledged by the flusher thread after a WAL sync. openraft 0.9's core still awaits each
//! append's flush (its `append_to_log` wraps the callback into a wait), so this does not
//! pipeline appends; it keeps the fsync off the runtime's worker threads, which also serve gRPC
//! and replication. Should openraft stop waiting, the flusher already syncs once for every
//! append queued since its last sync.

// openraft's traits fix the error type (StorageError, ~200 bytes); the helpers share it so `?`
// composes. It only travels on the failure path.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageIOError, Vote,
};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::codec;
use crate::metrics::RaftMetrics;
use crate::types::{
    Entry, LogId, NodeId, Reply, Snapshot, SnapshotMeta, StateMachine, StorageError,
    StoredMembership, TypeConfig,
};

const CF_META: &str = "meta";
const CF_LOGS: &str = "logs";
const CF_SNAPSHOT: &str = "snapshot";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_IDENTITY: &[u8] = b"identity";
const KEY_SNAPSHOT: &[u8] = b"current";

/// Which cluster and which replica a data dir belongs to; written once, checked at every start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: NodeId,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data dir {path}: RocksDB refused to open it ({source}); the data dir is damaged or not a surge data dir")]
    Rocks {
        path: String,
        source: rocksdb::Error,
    },
    #[error("data dir {path}: files are there but RocksDB's CURRENT file is missing; the database is damaged (restore it, or wipe the dir and re-join the cluster)")]
    Missing { path: String },
    #[error("data dir {path}: {what} is corrupt ({source})")]
    Corrupt {
        path: String,
        what: &'static str,
        source: codec::CodecError,
    },
    #[error("data dir {path}: log entry {index} is corrupt ({reason}); the log cannot be trusted: restore the data dir from a backup, or wipe it and re-join the cluster")]
    CorruptEntry {
        path: String,
        index: u64,
        reason: String,
    },
    #[error("data dir {path}: snapshot does not restore: {reason}")]
    Restore { path: String, reason: String },
    #[error("data dir {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The opened database, shared by the log store and the state-machine store.
#[derive(Clone)]
pub struct Storage {
    db: Arc<DB>,
    path: String,
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn io_read<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::read(&e).into()
}

fn io_write<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::write(&e).into()
}

impl Storage {
    /// Open (creating if needed) the database under `path`, verifying what is already there.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let shown = path.display().to_string();
        std::fs::create_dir_all(path).map_err(|source| OpenError::Io {
            path: shown.clone(),
            source,
        })?;
        // A database that lost its CURRENT file would be silently re-created empty by
        // create_if_missing: refuse a non-empty dir without it instead.
        let has_files = std::fs::read_dir(path)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if has_files && !path.join("CURRENT").exists() {
            return Err(OpenError::Missing { path: shown });
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.set_max_open_files(256);
        let cfs = [CF_META, CF_LOGS, CF_SNAPSHOT]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| OpenError::Rocks {
            path: shown.clone(),
            source,
        })?;
        let storage = Storage {
            db: Arc::new(db),
            path: shown,
        };
        storage.verify()?;
        Ok(storage)
    }

    /// Decode every metadata value and the snapshot, and check the log, so damage is refused
    /// at start with a clear error instead of surfacing later inside Raft.
    fn verify(&self) -> Result<(), OpenError> {
        let corrupt = |what, source| OpenError::Corrupt {
            path: self.path.clone(),
            what,
            source,
        };
        let rocks = |source| OpenError::Rocks {
            path: self.path.clone(),
            source,
        };
        let meta = self.cf(CF_META);
        if let Some(v) = self.db.get_cf(meta, KEY_VOTE).map_err(rocks)? {
            codec::decode::<Vote<NodeId>>(&v).map_err(|e| corrupt("the saved vote", e))?;
        }
        for (key, what) in [
            (KEY_COMMITTED, "the committed index"),
            (KEY_LAST_PURGED, "the purge marker"),
        ] {
            if let Some(v) = self.db.get_cf(meta, key).map_err(rocks)? {
                codec::decode::<Option<LogId>>(&v).map_err(|e| corrupt(what, e))?;
            }
        }
        if let Some(v) = self.db.get_cf(meta, KEY_IDENTITY).map_err(rocks)? {
            codec::decode::<Identity>(&v).map_err(|e| corrupt("the identity record", e))?;
        }
        if let Some(v) = self
            .db
            .get_cf(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT)
            .map_err(rocks)?
        {
            codec::decode::<StoredSnapshot>(&v).map_err(|e| corrupt("the snapshot", e))?;
        }
        self.verify_log()
    }

    /// Check every log entry's checksum and that it sits under its own index; decode the last
    /// one in full. A damaged entry in the middle of the log would otherwise surface only when
    /// Raft reads it — for a follower's catch-up, or when re-applying after a restart.
    fn verify_log(&self) -> Result<(), OpenError> {
        let corrupt = |index, reason: String| OpenError::CorruptEntry {
            path: self.path.clone(),
            index,
            reason,
        };
        let mut last: Option<u64> = None;
        for item in self.db.iterator_cf(self.cf(CF_LOGS), IteratorMode::Start) {
            let (k, v) = item.map_err(|source| OpenError::Rocks {
                path: self.path.clone(),
                source,
            })?;
            let index = match <[u8; 8]>::try_from(k.as_ref()) {
                Ok(b) => u64::from_be_bytes(b),
                Err(_) => return Err(corrupt(0, format!("a log key is {} bytes, not 8", k.len()))),
            };
            let id: LogId = codec::decode_prefix(&v).map_err(|e| corrupt(index, e.to_string()))?;
            if id.index != index {
                return Err(corrupt(
                    index,
                    format!("it holds entry {} instead", id.index),
                ));
            }
            last = Some(index);
        }
        if let Some(index) = last {
            let v = self
                .db
                .get_cf(self.cf(CF_LOGS), index_key(index))
                .map_err(|source| OpenError::Rocks {
                    path: self.path.clone(),
                    source,
                })?
                .ok_or_else(|| corrupt(index, "it vanished while being read".into()))?;
            codec::decode::<Entry>(&v).map_err(|e| corrupt(index, e.to_string()))?;
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created when the database is opened")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self.db.get_cf(self.cf(CF_META), key).map_err(io_read)? {
            None => Ok(None),
            Some(v) => codec::decode(&v).map(Some).map_err(io_read),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        self.db
            .put_cf_opt(self.cf(CF_META), key, codec::encode(value), &synced())
            .map_err(io_write)
    }

    /// The identity recorded in this data dir, if any.
    pub fn identity(&self) -> Result<Option<Identity>, StorageError> {
        self.get_meta(KEY_IDENTITY)
    }

    pub fn set_identity(&self, identity: &Identity) -> Result<(), StorageError> {
        self.put_meta(KEY_IDENTITY, identity)
    }

    /// True when this replica has never taken part in a cluster (no vote, no log, no snapshot).
    pub fn is_pristine(&self) -> Result<bool, StorageError> {
        let vote: Option<Vote<NodeId>> = self.get_meta(KEY_VOTE)?;
        let has_log = self
            .db
            .iterator_cf(self.cf(CF_LOGS), IteratorMode::Start)
            .next()
            .is_some();
        let has_snapshot = self
            .db
            .get_cf(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT)
            .map_err(io_read)?
            .is_some();
        Ok(vote.is_none() && !has_log && !has_snapshot)
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        match self
            .db
            .get_cf(self.cf(CF_SNAPSHOT), KEY_SNAPSHOT)
            .map_err(io_read)?
        {
            None => Ok(None),
            Some(v) => codec::decode(&v).map(Some).map_err(io_read),
        }
    }

    fn write_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        self.db
            .put_cf_opt(
                self.cf(CF_SNAPSHOT),
                KEY_SNAPSHOT,
                codec::encode(snapshot),
                &synced(),
            )
            .map_err(io_write)
    }
}

/// A snapshot at rest: openraft's metadata and the application's bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// Log store

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

// ---------------------------------------------------------------------------------------------
// State machine store

/// What the replica has applied: the application's state plus Raft's own bookkeeping.
pub struct Applied<S> {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub app: S,
}

/// The state machine side of openraft's storage: applies committed entries to the in-memory
/// application state, builds and installs snapshots, and persists the newest snapshot.
pub struct StateMachineStore<S: StateMachine> {
    storage: Storage,
    state: Arc<RwLock<Applied<S>>>,
    applied_tx: watch::Sender<u64>,
    metrics: Arc<RaftMetrics>,
    snapshot_seq: Arc<AtomicU64>,
}

impl<S: StateMachine> StateMachineStore<S> {
    /// Restore the application from the stored snapshot, if any.
    pub fn open(
        storage: Storage,
        mut app: S,
        metrics: Arc<RaftMetrics>,
    ) -> Result<Opened<S>, OpenError> {
        let stored = storage.read_snapshot().map_err(|e| OpenError::Restore {
            path: storage.path.clone(),
            reason: e.to_string(),
        })?;
        let (last_applied, membership) = match stored {
            Some(s) => {
                app.restore(&s.data).map_err(|reason| OpenError::Restore {
                    path: storage.path.clone(),
                    reason,
                })?;
                (s.meta.last_log_id, s.meta.last_membership)
            }
            None => (None, StoredMembership::default()),
        };
        let applied_index = last_applied.map(|l| l.index).unwrap_or(0);
        let state = Arc::new(RwLock::new(Applied {
            last_applied,
            membership,
            app,
        }));
        let (applied_tx, applied_rx) = watch::channel(applied_index);
        let store = StateMachineStore {
            storage,
            state: state.clone(),
            applied_tx,
            metrics,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        };
        Ok((store, state, applied_rx))
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, Applied<S>> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An opened state-machine store, the state it shares with readers, and the applied-index feed.
pub type Opened<S> = (
    StateMachineStore<S>,
    Arc<RwLock<Applied<S>>>,
    watch::Receiver<u64>,
);

/// Builds a snapshot from the shared in-memory state.
pub struct SnapshotBuilder<S: StateMachine> {
    storage: Storage,
    state: Arc<RwLock<Applied<S>>>,
    metrics: Arc<RaftMetrics>,
    snapshot_seq: Arc<AtomicU64>,
}

impl<S: StateMachine> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let started = Instant::now();
        let (last_log_id, last_membership, data) = {
            let state = self
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (
                state.last_applied,
                state.membership.clone(),
                state.app.snapshot(),
            )
        };
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, seq),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot { meta, data };
        self.storage.write_snapshot(&stored)?;
        self.metrics
            .snapshot_built(stored.data.len(), started.elapsed());
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(std::io::Cursor::new(stored.data)),
        })
    }
}

impl<S: StateMachine> RaftStateMachine<TypeConfig> for StateMachineStore<S> {
    type SnapshotBuilder = SnapshotBuilder<S>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let state = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let last = {
            let mut state = self.write_state();
            for entry in entries {
                state.last_applied = Some(entry.log_id);
                let reply = match entry.payload {
                    EntryPayload::Blank => Vec::new(),
                    EntryPayload::Normal(command) => {
                        state.app.apply(entry.log_id.index, &command.0)
                    }
                    EntryPayload::Membership(m) => {
                        state.membership = StoredMembership::new(Some(entry.log_id), m);
                        Vec::new()
                    }
                };
                replies.push(Reply(reply));
            }
            state.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.applied_tx.send_replace(last);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            storage: self.storage.clone(),
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            snapshot_seq: self.snapshot_seq.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<std::io::Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(std::io::Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        {
            let mut state = self.write_state();
            state.app.restore(&stored.data).map_err(|reason| {
                StorageError::from(StorageIOError::read_snapshot(
                    Some(meta.signature()),
                    &std::io::Error::other(reason),
                ))
            })?;
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
        }
        self.storage.write_snapshot(&stored)?;
        self.metrics.snapshot_installed();
        self.applied_tx
            .send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.storage.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(std::io::Cursor::new(s.data)),
        }))
    }
}
