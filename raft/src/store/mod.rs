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

use crate::codec;
use crate::types::{Entry, LogId, NodeId, SnapshotMeta, StorageError};
use openraft::{StorageIOError, Vote};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

mod log_store;
mod state_machine;

pub use log_store::LogStore;
pub use state_machine::{Applied, Opened, SnapshotBuilder, StateMachineStore};

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
