//! `surge dev --secure`: the local cluster as production runs it — mutual TLS on every link and
//! tenant tokens — with the certificates and tokens made for the run under its data dir.
//!
//! ```text
//!   ROOT/pki/ca        the run's CA (its key stays here; a real cluster keeps it off its hosts)
//!   ROOT/pki/replica   the replicas' certificate (127.0.0.1, localhost)
//!   ROOT/pki/node      the node daemons' certificate (they serve exec and files on 127.0.0.1)
//!   ROOT/pki/client    a client certificate: what SURGE_TLS_DIR points at
//!   ROOT/pki/tokens    the servers' --tokens file (hashes only)
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use surge_security::certs::{self, CA_CERT_FILE, CERT_FILE, KEY_FILE};
use surge_security::{Access, Role, TlsDir};

/// Tenants the run makes a token for, besides the admin.
pub const DEV_TENANTS: [&str; 2] = ["alpha", "beta"];
/// Validity of the run's certificates (a dev cluster lives for hours, not years).
const LEAF_DAYS: u32 = 30;

/// Certificates and tokens of one secured dev run.
#[derive(Clone, Debug)]
pub struct DevSecurity {
    pub replica_dir: PathBuf,
    pub node_dir: PathBuf,
    /// A client certificate dir (`--tls-dir` / `SURGE_TLS_DIR`).
    pub client_dir: PathBuf,
    pub tokens_file: PathBuf,
    /// The admin token (every tenant, quotas, nodes).
    pub admin: String,
    /// `(tenant, token)` for each of [`DEV_TENANTS`].
    pub tenants: Vec<(String, String)>,
}

impl DevSecurity {
    /// Make a CA, the replica, node and client certificates and the tokens under `root/pki`.
    /// Refuses a `root` that already holds a `pki` dir: a run never reuses another's keys.
    pub fn create(root: &Path) -> anyhow::Result<DevSecurity> {
        let pki = root.join("pki");
        let ca = certs::new_ca("surge-dev").context("cannot make the dev CA")?;
        certs::write_files(
            &pki.join("ca"),
            &[
                (CA_CERT_FILE, &ca.cert_pem, false),
                (certs::CA_KEY_FILE, &ca.key_pem, true),
            ],
            false,
        )
        .with_context(|| format!("{}: a data dir takes one --secure run", pki.display()))?;
        let loopback = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let leaf = |name: &str, role: Role, dir: &str| -> anyhow::Result<PathBuf> {
            let sans = if role == Role::Client {
                Vec::new()
            } else {
                loopback.clone()
            };
            let pems = certs::issue(&ca, name, role, &sans, LEAF_DAYS)?;
            let out = pki.join(dir);
            certs::write_files(
                &out,
                &[
                    (CA_CERT_FILE, &ca.cert_pem, false),
                    (CERT_FILE, &pems.cert_pem, false),
                    (KEY_FILE, &pems.key_pem, true),
                ],
                false,
            )?;
            TlsDir::load(&out).with_context(|| format!("{} does not load", out.display()))?;
            Ok(out)
        };
        let replica_dir = leaf("dev-replicas", Role::Replica, "replica")?;
        let node_dir = leaf("dev-nodes", Role::Node, "node")?;
        let client_dir = leaf("dev-client", Role::Client, "client")?;

        let mut lines = Vec::new();
        let mut token = |access: Access| -> anyhow::Result<String> {
            let (token, line) = surge_security::tokens::new_token(&access)?;
            lines.push(line);
            Ok(token)
        };
        let admin = token(Access::Admin)?;
        let mut tenants = Vec::new();
        for t in DEV_TENANTS {
            tenants.push((t.to_string(), token(Access::Tenant(t.to_string()))?));
        }
        let tokens_file = pki.join("tokens");
        write_private(&tokens_file, &(lines.join("\n") + "\n"))?;
        Ok(DevSecurity {
            replica_dir,
            node_dir,
            client_dir,
            tokens_file,
            admin,
            tenants,
        })
    }

    /// The harness's own credentials: the client certificate and the admin token.
    pub fn admin_credentials(&self) -> anyhow::Result<surge_client::Credentials> {
        Ok(surge_client::Credentials {
            tls: Some(TlsDir::load(&self.client_dir)?),
            token: Some(self.admin.clone()),
        })
    }
}

/// Write `text` to a new file only its owner can read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_run_gets_loadable_certificates_and_distinct_tokens_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = DevSecurity::create(dir.path()).expect("create");
        assert_eq!(
            TlsDir::load(&s.client_dir).expect("client").role(),
            Role::Client
        );
        assert_eq!(
            TlsDir::load(&s.replica_dir).expect("replica").role(),
            Role::Replica
        );
        let tokens = surge_security::Tokens::load(&s.tokens_file).expect("tokens file");
        assert_eq!(tokens.resolve(&s.admin), Some(Access::Admin));
        for (tenant, token) in &s.tenants {
            assert_eq!(tokens.resolve(token), Some(Access::Tenant(tenant.clone())));
        }
        let mode = std::fs::metadata(&s.tokens_file)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = DevSecurity::create(dir.path()).expect_err("a second run in the same dir");
        assert!(
            format!("{again:#}").contains("one --secure run"),
            "{again:#}"
        );
    }
}
