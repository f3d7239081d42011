//! `surge cert` and `surge token`, and the `--tls-dir` / `--token` every command shares.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use surge_client::Credentials;
use surge_security::certs::{self, CA_CERT_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE};
use surge_security::{Access, Role, TlsDir};

/// Credentials shared by `surge server`, `surge node` and the client commands.
#[derive(clap::Args, Clone)]
pub struct SecurityArgs {
    /// Directory with ca.pem, cert.pem and key.pem (from `surge cert issue`): mutual TLS with
    /// the cluster. Servers then refuse peers without a certificate of the same CA.
    #[arg(long, global = true, env = "SURGE_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Bearer token for the job API (from `surge token new`), when the cluster has --tokens.
    #[arg(long, global = true, env = "SURGE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl SecurityArgs {
    pub fn tls(&self) -> anyhow::Result<Option<TlsDir>> {
        self.tls_dir
            .as_deref()
            .map(TlsDir::load)
            .transpose()
            .map_err(anyhow::Error::from)
    }

    /// What a client command presents.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        Ok(Credentials {
            tls: self.tls()?,
            token: self.token.clone().filter(|t| !t.is_empty()),
        })
    }
}

#[derive(clap::Subcommand)]
pub enum CertCmd {
    /// Make a new cluster CA: DIR/ca.pem and DIR/ca-key.pem (keep the key off the hosts).
    Ca {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A name for this cluster, shown in the CA's subject.
        #[arg(long, default_value = "surge")]
        name: String,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Issue a host certificate: DIR/ca.pem, DIR/cert.pem, DIR/key.pem, ready for --tls-dir.
    Issue {
        /// The CA's directory (from `surge cert ca`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The host's name (the certificate's CN).
        #[arg(long)]
        name: String,
        /// replica (scheduler servers), node (node daemons) or client (CLI, programs).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// An IP address or DNS name the host is reached at (repeatable; replicas need the
        /// address in their --advertise / --bootstrap entry).
        #[arg(long = "san", value_name = "IP_OR_DNS")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = certs::LEAF_DAYS_DEFAULT)]
        days: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?}: use replica, node or client"))
}

pub fn cert(cmd: CertCmd) -> anyhow::Result<()> {
    match cmd {
        CertCmd::Ca { out, name, force } => {
            let ca = certs::new_ca(&name)?;
            certs::write_files(
                &out,
                &[
                    (CA_CERT_FILE, &ca.cert_pem, false),
                    (CA_KEY_FILE, &ca.key_pem, true),
                ],
                force,
            )?;
            println!(
                "cluster CA written: {} and {} (0600; keep it off the cluster's hosts)",
                out.join(CA_CERT_FILE).display(),
                out.join(CA_KEY_FILE).display()
            );
        }
        CertCmd::Issue {
            ca,
            out,
            name,
            role,
            sans,
            days,
            force,
        } => {
            let authority = certs::load_ca(&ca)
                .with_context(|| format!("--ca {}: run `surge cert ca` first", ca.display()))?;
            if role != Role::Client && sans.is_empty() {
                bail!("--san: a {role} certificate needs the address(es) it is reached at");
            }
            let leaf = certs::issue(&authority, &name, role, &sans, days)?;
            certs::write_files(
                &out,
                &[
                    (CA_CERT_FILE, &authority.cert_pem, false),
                    (CERT_FILE, &leaf.cert_pem, false),
                    (KEY_FILE, &leaf.key_pem, true),
                ],
                force,
            )?;
            println!(
                "{role} certificate for {name} written to {} (use --tls-dir {})",
                out.display(),
                out.display()
            );
        }
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum TokenCmd {
    /// Make a new token. It is printed once; the server's tokens file keeps only its hash.
    New {
        /// A token for this tenant's jobs.
        #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
        tenant: Option<String>,
        /// The admin token: all tenants, membership, drain, quotas.
        #[arg(long)]
        admin: bool,
        /// Append the hash line to this tokens file (created 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        append: Option<PathBuf>,
    },
}

pub fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    let TokenCmd::New {
        tenant,
        admin,
        append,
    } = cmd;
    let access = match (tenant, admin) {
        (_, true) => Access::Admin,
        (Some(t), false) => {
            surge_security::tokens::check_tenant(&t)?;
            Access::Tenant(t)
        }
        (None, false) => bail!("give --tenant NAME or --admin"),
    };
    let (token, line) = surge_security::tokens::new_token(&access)?;
    match append {
        Some(path) => {
            append_line(&path, &line)?;
            eprintln!(
                "added to {} ({}); the servers read it at start",
                path.display(),
                access.grant()
            );
        }
        None => {
            eprintln!("add this line to the servers' --tokens file:");
            println!("{line}");
            eprintln!("the token (shown once; give it to its holder as SURGE_TOKEN):");
        }
    }
    println!("{token}");
    Ok(())
}

fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("{}", path.display()))?;
    Ok(())
}
