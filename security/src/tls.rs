//! A `--tls-dir`: the cluster CA, this host's certificate and its key, as tonic TLS settings.
//!
//! Every process of a cluster (replica, node daemon, CLI) is configured with one directory:
//!
//! ```text
//! DIR/ca.pem     the cluster CA: the only issuer trusted, for servers and for clients
//! DIR/cert.pem   this host's certificate (its role in a SAN URI, its addresses as SANs)
//! DIR/key.pem    its private key (0600)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::certs::{self, CertError, CA_CERT_FILE, CERT_FILE, KEY_FILE};
use crate::role::{self, Role, RoleError};

/// Longest a TLS handshake on the server may take (a peer that stalls it holds a connection).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-dir {dir}: {source}")]
    Files { dir: PathBuf, source: CertError },
    #[error("--tls-dir {dir}: {file}: {source}")]
    Role {
        dir: PathBuf,
        file: &'static str,
        source: RoleError,
    },
    #[error("--tls-dir {dir}: the key in {KEY_FILE} is not a PEM private key")]
    Key { dir: PathBuf },
    #[error("--tls-dir {dir}: cannot build the HTTPS settings: {why}")]
    Https { dir: PathBuf, why: String },
}

/// The loaded contents of a `--tls-dir`.
#[derive(Clone)]
pub struct TlsDir {
    dir: PathBuf,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    role: Role,
}

impl std::fmt::Debug for TlsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDir")
            .field("dir", &self.dir)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl TlsDir {
    /// Read and check the three files: each one present and small, the certificates parse, the
    /// host certificate names a role, the key is PEM.
    pub fn load(dir: &Path) -> Result<TlsDir, TlsError> {
        let files = |source| TlsError::Files {
            dir: dir.to_path_buf(),
            source,
        };
        let ca_pem = certs::read_pem(&dir.join(CA_CERT_FILE)).map_err(files)?;
        let cert_pem = certs::read_pem(&dir.join(CERT_FILE)).map_err(files)?;
        let key_pem = certs::read_pem(&dir.join(KEY_FILE)).map_err(files)?;
        certs::first_cert_der(&ca_pem).map_err(files)?;
        let der = certs::first_cert_der(&cert_pem).map_err(files)?;
        let role = role::role_of(&der).map_err(|source| TlsError::Role {
            dir: dir.to_path_buf(),
            file: CERT_FILE,
            source,
        })?;
        if !key_pem.contains("PRIVATE KEY-----") {
            return Err(TlsError::Key {
                dir: dir.to_path_buf(),
            });
        }
        Ok(TlsDir {
            dir: dir.to_path_buf(),
            ca_pem,
            cert_pem,
            key_pem,
            role,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The role this host's certificate carries.
    pub fn role(&self) -> Role {
        self.role
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// Serve with this host's certificate and require every client to present one signed by
    /// the cluster CA (no certificate, or one of another CA, fails the handshake).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(self.ca())
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The HTTP port's TLS settings (rustls on ring, HTTP/1.1): this host's certificate, and,
    /// as on the gRPC port, a client certificate signed by the cluster CA required on every
    /// connection (`/metrics` and `/healthz` included: Prometheus presents one through its
    /// `tls_config`, and a port that is half open is one more thing to get wrong).
    pub fn https_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let fail = |why: String| TlsError::Https {
            dir: self.dir.clone(),
            why,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let ca = ca.map_err(|e| fail(format!("{CA_CERT_FILE}: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| fail(format!("{CA_CERT_FILE}: {e}")))?;
        }
        let clients =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| fail(format!("client verifier: {e}")))?;
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(format!("{CERT_FILE}: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| fail(format!("{KEY_FILE}: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain, key)
            .map_err(|e| fail(format!("{CERT_FILE} and {KEY_FILE}: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Connect presenting this host's certificate, trusting only the cluster CA. The server's
    /// certificate must name the address dialled (an IP or DNS SAN).
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(self.identity())
            .ca_certificate(self.ca())
            .assume_http2(true)
    }
}

/// `http://HOST:PORT` or, with TLS, `https://HOST:PORT` (a scheme already given is kept only
/// when it matches).
pub fn uri_for(addr: &str, tls: bool) -> String {
    let hostport = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    if tls {
        format!("https://{hostport}")
    } else {
        format!("http://{hostport}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_loaded_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = certs::new_ca("t").expect("ca");
        let leaf = certs::issue(&ca, "r1", Role::Replica, &["127.0.0.1".into()], 30).expect("leaf");
        assert!(matches!(
            TlsDir::load(dir.path()),
            Err(TlsError::Files { .. })
        ));
        certs::write_files(
            dir.path(),
            &[
                (CA_CERT_FILE, &ca.cert_pem, false),
                (CERT_FILE, &leaf.cert_pem, false),
                (KEY_FILE, &leaf.key_pem, true),
            ],
            false,
        )
        .expect("write");
        let tls = TlsDir::load(dir.path()).expect("load");
        assert_eq!(tls.role(), Role::Replica);
        let https = tls.https_server_config().expect("https settings");
        assert_eq!(https.alpn_protocols, vec![b"http/1.1".to_vec()]);
        // The CA itself names no role: it is not a host certificate.
        certs::write_files(dir.path(), &[(CERT_FILE, &ca.cert_pem, false)], true).expect("w");
        assert!(matches!(
            TlsDir::load(dir.path()),
            Err(TlsError::Role { .. })
        ));
    }

    #[test]
    fn uris() {
        assert_eq!(uri_for("h:1", false), "http://h:1");
        assert_eq!(uri_for("h:1", true), "https://h:1");
        assert_eq!(uri_for("http://h:1", true), "https://h:1");
    }
}
