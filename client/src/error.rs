//! What can go wrong talking to a cluster, as one line a person can act on.
//!
//! A failed call is either the caller's own connection (the replica is down, or one side speaks
//! TLS and the other does not) or an answer from a replica. The two must not be confused: a
//! replica that answers "the leader at B went away" is healthy, and naming it as unreachable
//! sends the operator to the wrong host.

use std::error::Error as _;

use crate::connect::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(
        "cannot reach a surge replica at {addr} (is it running? set --server or SURGE_SERVER)"
    )]
    Unreachable { addr: String },
    #[error("the replica at {addr} requires TLS: pass --tls-dir or set SURGE_TLS_DIR")]
    TlsRequired { addr: String },
    #[error(
        "the replica at {addr} does not speak TLS: drop --tls-dir (SURGE_TLS_DIR) for this \
         cluster, or give the address of a cluster started with --tls-dir"
    )]
    TlsUnexpected { addr: String },
    #[error("the replica at {addr} is unavailable: {message}")]
    Unavailable { addr: String, message: String },
    #[error("{message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("{0}")]
    Input(String),
}

impl ClientError {
    /// Classify a failed call to `addr`; `tls` says whether the caller dialled with TLS.
    pub fn from_status(addr: &str, tls: bool, status: tonic::Status) -> ClientError {
        let addr = addr.to_string();
        let local = is_local(&status);
        let text = chain_text(&status).to_ascii_lowercase();
        if local {
            // A plaintext HTTP/2 client reads a TLS alert as a broken HTTP/2 frame.
            if !tls && (text.contains("h2 protocol error") || text.contains("http2 error")) {
                return ClientError::TlsRequired { addr };
            }
            // A TLS client reads a plaintext HTTP/2 server's bytes as a broken TLS record.
            if tls
                && (text.contains("invalidcontenttype")
                    || text.contains("corrupt message")
                    || text.contains("invalid content type")
                    || text.contains("tls handshake eof")
                    || text.contains("invalidmessage"))
            {
                return ClientError::TlsUnexpected { addr };
            }
            // Whatever code the transport's failure got (unavailable, unknown, or "operation
            // was canceled" when the connection dropped mid-handshake), no replica answered:
            // the caller probes the port to tell a TLS mismatch from a dead replica.
            return ClientError::Unreachable { addr };
        }
        match status.code() {
            tonic::Code::Unavailable => ClientError::Unavailable {
                addr,
                message: status.message().to_string(),
            },
            code => ClientError::Rpc {
                code,
                message: status.message().to_string(),
            },
        }
    }

    /// True when another attempt, at the same or another replica, may succeed: the replica
    /// could not be reached or was between leaders. Never true for an answer that refused the
    /// request on its merits.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. } | ClientError::Unavailable { .. }
        )
    }

    /// The gRPC code of an answer, where there was one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            ClientError::Unavailable { .. } => Some(tonic::Code::Unavailable),
            _ => None,
        }
    }
}

/// A status made on this side of the connection (tonic wraps the transport's error as the
/// source) rather than received from a replica (which carries no source).
fn is_local(status: &tonic::Status) -> bool {
    status.source().is_some()
}

/// The status's message and every source under it, for recognising transport failures.
fn chain_text(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut next = status.source();
    let mut depth = 0;
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        text.push_str(&format!(" {e:?}"));
        next = e.source();
        depth += 1;
        if depth > 16 {
            break;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_from_a_replica_is_never_called_unreachable() {
        // What a healthy replica answers when the leader it forwarded to went away.
        let s = tonic::Status::unavailable(
            "replica at 10.250.0.12:7070 failed: status: Unavailable, message: \"transport error\"",
        );
        let e = ClientError::from_status("10.250.0.11:7070", false, s);
        assert!(
            matches!(&e, ClientError::Unavailable { addr, .. } if addr == "10.250.0.11:7070"),
            "{e:?}"
        );
        assert!(e.to_string().contains("10.250.0.12:7070"), "{e}");
        assert!(e.is_retryable());
    }

    #[test]
    fn a_refusal_is_not_retryable() {
        let e = ClientError::from_status(
            "a:1",
            false,
            tonic::Status::invalid_argument("count must be at least 1"),
        );
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "count must be at least 1");
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    }
}
