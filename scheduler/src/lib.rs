//! The scheduler: surge's replicated cluster state and the APIs around it.
//!
//! ```text
//!   gRPC (service/) ── validate + convert ──► Command ──► surge_raft::RaftNode::propose
//!                                                                  │ committed
//!                                                                  ▼
//!                               ClusterState::apply_command (state.rs, pure, deterministic)
//!   reads: RaftNode::linearizable_read ──► RaftNode::read(|state| ...)
//! ```
//!
//! The state (`state.rs`) is plain data in ordered maps: nodes, jobs (arrays of identical
//! sandboxes), and the idempotency index. Commands (`command.rs`) carry the proposer's clock and
//! take their ids from the log index, so every replica computes the same state, and the state
//! hash proves it. `server.rs` wires one replica: Raft, the gRPC services, `/metrics`.

pub mod api_json;
pub mod capacity;
pub mod capacity_metrics;
pub mod command;
pub mod convert;
pub mod http;
pub mod http_io;
mod http_lid;
mod http_life;
pub mod https;
pub mod leader;
pub mod lifetime;
pub mod model;
pub mod outcomes;
pub mod placement;
pub mod runs;
pub mod server;
pub mod service;
pub mod state;
pub mod ui;
pub mod ui_api;
pub mod validate;

pub use state::ClusterState;
