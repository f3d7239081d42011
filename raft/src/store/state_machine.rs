//! The state machine side of the storage: the applied state, its snapshots and their restore.

use crate::metrics::RaftMetrics;
use crate::types::{
    Entry, LogId, Reply, Snapshot, SnapshotMeta, StateMachine, StorageError, StoredMembership,
    TypeConfig,
};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::sync::watch;

use super::{OpenError, Storage, StoredSnapshot};

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
                app.restore(&s.data).map_err(|e| OpenError::Restore {
                    path: storage.path.clone(),
                    reason: e.to_string(),
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
            state.app.restore(&stored.data).map_err(|e| {
                StorageError::from(StorageIOError::read_snapshot(
                    Some(meta.signature()),
                    &std::io::Error::other(e),
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
