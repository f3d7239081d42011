//! The replicated log of surge: openraft on RocksDB with a gRPC transport, generic over the
//! application's state machine. It knows nothing about jobs, nodes or sandboxes.
//!
//! ```text
//!  client ─► any replica ── RaftNode::propose ──(not leader)── Cluster.Propose ─► leader
//!                                                                   │
//!            leader: openraft client_write ─► LogStore::append (RocksDB, fsync on the flusher)
//!                                                                   │ RaftTransport.AppendEntries
//!                                                                   ▼
//!            quorum acks ─► committed ─► StateMachineStore::apply ─► S::apply(index, bytes)
//! ```
//!
//! Drive it like this: [`RaftNode::open`] the data dir with a [`Start`] mode and the application's
//! [`StateMachine`]; serve [`service::services`] on the replica's gRPC address; call
//! [`RaftNode::join_cluster`]; then [`RaftNode::propose`] writes and [`RaftNode::linearizable_read`]
//! + [`RaftNode::read`] reads from any replica.
//!
//! **Why openraft 0.9.** 0.9.25 is the newest *stable* release: bug-fix only, an API that does not
//! move under us, and the storage-v2 traits with openraft's own conformance suite
//! (`openraft::testing::Suite`), which our RocksDB stores pass. 0.10 is still alpha (its API
//! changes between alphas); moving to it when it is released is confined to this crate.
//!
//! **Why system RocksDB.** See the README's build notes: Debian's `librocksdb-dev` linked through
//! the `rocksdb` crate 0.20 saves ~45 CPU-minutes of C++ per cold build.

pub mod codec;
pub mod metrics;
pub mod network;
pub mod node;
pub mod service;
pub mod store;
pub mod types;

pub use node::{ClusterError, PeerError, Proposed, RaftConfig, RaftNode, Start, StartError};
pub use types::{NodeId, RestoreError, StateMachine};
