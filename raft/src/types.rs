//! openraft's type configuration and the contract between the replicated log and the application.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// Replica ids are small integers chosen by the operator (`surge server --id 2`).
pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;

/// An application command as the log stores it: already encoded by the application, opaque here.
/// Keeping it opaque is what makes `raft/` generic: it moves and persists bytes, the
/// [`StateMachine`] gives them meaning.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(pub Vec<u8>);

/// What applying a [`Command`] returned, encoded by the application.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply(pub Vec<u8>);

openraft::declare_raft_types!(
    /// The one Raft type configuration of surge.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Why [`StateMachine::restore`] refused a snapshot.
#[derive(Debug, thiserror::Error)]
#[error("{what} does not decode: {source}")]
pub struct RestoreError {
    /// What the snapshot should have held ("scheduler state").
    pub what: &'static str,
    #[source]
    pub source: crate::codec::CodecError,
}

/// The application's replicated state machine.
///
/// Every replica applies the same commands in the same order, so `apply` must be deterministic:
/// it may use only `index` and `command` — no clock, no randomness, no I/O. Time and ids that the
/// application needs travel inside the command (or are derived from `index`). A command the
/// application cannot decode (written by a newer version, say) must still produce the same reply
/// on every replica: return an error reply, leave the state unchanged, never panic.
pub trait StateMachine: Send + Sync + 'static {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;

    /// The whole state in a canonical binary encoding (equal states give equal bytes).
    fn snapshot(&self) -> Vec<u8>;

    /// Replace the whole state by a [`StateMachine::snapshot`] of another replica.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError>;

    /// A digest of the state, equal on replicas that applied the same log prefix.
    fn state_hash(&self) -> String;
}
