//! A small cluster CA and the per-host certificates it signs (`surge cert ca|issue`).
//!
//! Keys are ECDSA P-256 (rcgen on ring). The CA signs leaves only (path length 0); every leaf
//! carries its [`Role`] as a SAN URI and the host's addresses as IP or DNS SANs, which is what
//! a client checks the server's certificate against.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;

use crate::role::Role;

/// The CA's files in its directory (`surge cert ca --out DIR`).
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// A host's files in its `--tls-dir`.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// How long a new CA is valid.
pub const CA_DAYS: u32 = 3_650;
/// Bounds on a leaf certificate's validity.
pub const LEAF_DAYS_DEFAULT: u32 = 825;
pub const LEAF_DAYS_MAX: u32 = 3_650;
/// Most subject alternative names on one certificate.
pub const SANS_MAX: usize = 32;
/// Longest name (CN or DNS SAN) accepted.
pub const NAME_BYTES_MAX: usize = 253;
/// Largest PEM file read (a certificate chain or a key is a few kilobytes).
pub const PEM_BYTES_MAX: u64 = 256 * 1024;
/// Backdating of `not_before`, for hosts whose clocks run a little behind the CA's.
const CLOCK_SKEW: Duration = Duration::from_secs(3_600);

/// A certificate and its private key, PEM encoded.
#[derive(Clone)]
pub struct Pems {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Pems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pems").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the system random source failed")]
    Random,
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {PEM_BYTES_MAX} bytes; not a PEM certificate or key")]
    TooLarge { path: PathBuf },
    #[error("{what}: no PEM certificate in it")]
    NoCertificate { what: String },
}

fn check_name(what: &str, name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '*'));
    if ok {
        Ok(())
    } else {
        Err(CertError::Invalid(format!(
            "{what} {name:?}: use 1 to {NAME_BYTES_MAX} letters, digits, '-', '.', '_'"
        )))
    }
}

fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Random)?;
    // A positive DER integer: clear the top bit.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
}

/// A new self-signed cluster CA named `name`.
pub fn new_ca(name: &str) -> Result<Pems, CertError> {
    check_name("CA name", name)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("surge cluster CA {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key)?;
    Ok(Pems {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A certificate for host `name` with `role`, valid for `days`, reachable at `sans` (IP
/// addresses or DNS names), signed by `ca`.
pub fn issue(
    ca: &Pems,
    name: &str,
    role: Role,
    sans: &[String],
    days: u32,
) -> Result<Pems, CertError> {
    check_name("name", name)?;
    if sans.len() > SANS_MAX {
        return Err(CertError::Invalid(format!(
            "{} --san given; at most {SANS_MAX}",
            sans.len()
        )));
    }
    if days == 0 || days > LEAF_DAYS_MAX {
        return Err(CertError::Invalid(format!(
            "--days {days}: from 1 to {LEAF_DAYS_MAX}"
        )));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    let mut alt = vec![SanType::URI(role.uri().try_into()?)];
    for san in sans {
        match IpAddr::from_str(san) {
            Ok(ip) => alt.push(SanType::IpAddress(ip)),
            Err(_) => {
                check_name("--san", san)?;
                alt.push(SanType::DnsName(san.clone().try_into()?));
            }
        }
    }
    params.subject_alt_names = alt;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        // A replica serves every link and also calls the other replicas; a node calls the
        // replicas and serves its exec-and-files port to them.
        Role::Replica | Role::Node => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pems {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The DER bytes of the first certificate in a PEM text.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, CertError> {
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| CertError::NoCertificate {
            what: "PEM text".into(),
        })?;
    if parsed.label != "CERTIFICATE" {
        return Err(CertError::NoCertificate {
            what: format!("PEM block {:?}", parsed.label),
        });
    }
    Ok(parsed.contents)
}

/// Read a PEM file of at most [`PEM_BYTES_MAX`] bytes.
pub fn read_pem(path: &Path) -> Result<String, CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > PEM_BYTES_MAX {
        return Err(CertError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// The CA written by `surge cert ca --out dir`.
pub fn load_ca(dir: &Path) -> Result<Pems, CertError> {
    Ok(Pems {
        cert_pem: read_pem(&dir.join(CA_CERT_FILE))?,
        key_pem: read_pem(&dir.join(CA_KEY_FILE))?,
    })
}

/// Files to write into one directory: name, contents, private (0600) or not (0644).
pub type Files<'a> = [(&'a str, &'a str, bool)];

/// Write `files` into `dir` (created 0700 if missing). Without `force`, nothing is written
/// when any of them exists. Each file is written beside its target and renamed over it, with
/// its mode set at creation, so a key is never readable by others, not even for a moment.
pub fn write_files(dir: &Path, files: &Files<'_>, force: bool) -> Result<(), CertError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    if !force {
        for (name, _, _) in files {
            let path = dir.join(name);
            if path.exists() {
                return Err(CertError::Exists { path });
            }
        }
    }
    for (name, contents, private) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if *private { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_private_and_nothing_is_overwritten_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca("t").expect("ca");
        let files = [
            (CA_CERT_FILE, ca.cert_pem.as_str(), false),
            (CA_KEY_FILE, ca.key_pem.as_str(), true),
        ];
        write_files(dir.path(), &files, false).expect("first write");
        let mode = |n: &str| {
            std::fs::metadata(dir.path().join(n))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        let again = write_files(dir.path(), &files, false);
        assert!(matches!(again, Err(CertError::Exists { .. })), "{again:?}");
        write_files(dir.path(), &files, true).expect("forced");
        let loaded = load_ca(dir.path()).expect("load");
        assert_eq!(loaded.cert_pem, ca.cert_pem);
    }

    #[test]
    fn bad_names_and_validity_are_refused() {
        let ca = new_ca("t").expect("ca");
        assert!(issue(&ca, "a b", Role::Node, &[], 30).is_err());
        assert!(issue(&ca, "h", Role::Node, &["bad host".into()], 30).is_err());
        assert!(issue(&ca, "h", Role::Node, &[], 0).is_err());
        assert!(issue(&ca, "h", Role::Node, &[], LEAF_DAYS_MAX + 1).is_err());
        let many: Vec<String> = (0..=SANS_MAX).map(|i| format!("h{i}")).collect();
        assert!(issue(&ca, "h", Role::Node, &many, 30).is_err());
        assert!(issue(
            &ca,
            "h",
            Role::Node,
            &["10.0.0.1".into(), "h.example".into()],
            30
        )
        .is_ok());
    }
}
