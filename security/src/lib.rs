//! Who may talk to a surge cluster: mutual TLS on every gRPC link and tenant bearer tokens.
//!
//! ```text
//!   surge cert ca ──► ca.pem + ca-key.pem (kept by the operator)
//!   surge cert issue --role replica|node|client ──► DIR/{ca.pem, cert.pem, key.pem}  (--tls-dir DIR)
//!
//!   client ──mTLS (client cert)──► replica ◄──mTLS (replica cert)──► replica
//!   node   ──mTLS (node cert)────► replica
//!              │
//!              └─ authorization: Bearer <token> ─► tokens file (sha256 only) ─► admin | tenant:T
//! ```
//!
//! A certificate says *what kind of peer* is calling ([`Role`], a SAN URI
//! `urn:surge:role:ROLE` the CA put in it); a token says *on whose behalf* a job-API call is
//! made ([`Access`]). Both checks are pure functions over bytes here; the scheduler applies them
//! to each request, and the clients only load files.
//!
//! - [`certs`]: a small cluster CA and per-host certificates (rcgen on ring);
//! - [`tls`]: a `--tls-dir` turned into tonic's server and client TLS settings;
//! - [`role`]: the role a peer certificate carries;
//! - [`tokens`]: the hashed tokens file, constant-time lookup, new random tokens.

pub mod certs;
pub mod role;
pub mod tls;
pub mod tokens;

pub use role::Role;
pub use tls::TlsDir;
pub use tokens::{Access, Tokens};
