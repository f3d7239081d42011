//! What a replica's port speaks, asked directly, for telling a TLS mismatch from a dead replica.
//!
//! When one side speaks TLS and the other does not, the failure the caller sees is whatever the
//! HTTP/2 or TLS stack made of the other side's bytes ("h2 protocol error", "operation was
//! canceled", "corrupt message"): nothing a person can act on. So after a call failed on this
//! side of a connection that did open, the client opens one more and sends the HTTP/2 client
//! preface in the clear: a TLS server answers with a TLS alert record, a plaintext HTTP/2 server
//! with its SETTINGS frame.

use std::time::Duration;

use std::os::fd::AsRawFd;

use tokio::io::AsyncReadExt;

/// Longest the probe takes, connect and answer together.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 §3.4, §6.5).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaks {
    Tls,
    PlainHttp2,
}

/// Classify the first bytes a server sent back to the preface.
pub fn classify(answer: &[u8]) -> Option<Speaks> {
    match answer {
        // A TLS record: alert (21) or handshake (22), protocol version 3.x.
        [21 | 22, 3, ..] => Some(Speaks::Tls),
        // An HTTP/2 frame header: 24-bit length, type 4 (SETTINGS), on stream 0.
        [_, _, _, 4, _, 0, 0, 0, 0, ..] => Some(Speaks::PlainHttp2),
        _ => None,
    }
}

/// Ask the server at `addr` (`HOST:PORT`) what it speaks; `None` when it cannot be told.
pub async fn speaks(addr: &str) -> Option<Speaks> {
    let hostport = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await.ok()?;
        send_without_sigpipe(&s).await?;
        let mut buf = [0u8; 16];
        let mut got = 0;
        while got < 9 {
            let n = s.read(&mut buf[got..]).await.ok()?;
            if n == 0 {
                break;
            }
            got += n;
            if classify(&buf[..got]) == Some(Speaks::Tls) {
                break;
            }
        }
        classify(&buf[..got])
    };
    tokio::time::timeout(PROBE_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

/// Send the preface with `MSG_NOSIGNAL`: a TLS server may close the connection before the
/// write, and the CLI keeps SIGPIPE's default action (so `surge jobs | head` ends quietly), which
/// a plain write to a closed socket would turn into a silent death with nothing said.
async fn send_without_sigpipe(s: &tokio::net::TcpStream) -> Option<()> {
    s.writable().await.ok()?;
    let fd = s.as_raw_fd();
    // SAFETY: `fd` is the open socket `s` owns for the whole call; the pointer and length
    // describe the static PREFACE; send(2) only reads them. A fresh connection's send buffer
    // takes the 33 bytes whole, so a short or would-block send is treated as "cannot tell".
    let sent = unsafe {
        libc::send(
            fd,
            PREFACE.as_ptr().cast(),
            PREFACE.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    (usize::try_from(sent).ok() == Some(PREFACE.len())).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_records_and_settings_frames_are_told_apart() {
        assert_eq!(classify(&[21, 3, 3, 0, 2, 2, 70]), Some(Speaks::Tls));
        assert_eq!(classify(&[22, 3, 1]), Some(Speaks::Tls));
        assert_eq!(
            classify(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3]),
            Some(Speaks::PlainHttp2)
        );
        assert_eq!(classify(b"HTTP/1.1 400 Bad Request"), None);
        assert_eq!(classify(&[]), None);
    }
}
