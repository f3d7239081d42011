//! The role of a peer, carried in its certificate as the SAN URI `urn:surge:role:ROLE`.
//!
//! A SAN URI rather than the subject's OU: the subject alternative names are what rustls and
//! every other verifier already parse and check, and a URI cannot be mistaken for a host name.

use x509_parser::extensions::GeneralName;

/// Prefix of the SAN URI that names a certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:surge:role:";

/// What a certificate lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A scheduler replica: the Raft transport, forwarding, and anything a node may do.
    Replica,
    /// A node daemon: register, heartbeat, watch its assignments, report.
    Node,
    /// An operator's or a program's client: the job API, status, and (with the admin token)
    /// membership, drain and quotas.
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Replica => "replica",
            Role::Node => "node",
            Role::Client => "client",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "replica" => Some(Role::Replica),
            "node" => Some(Role::Node),
            "client" => Some(Role::Client),
            _ => None,
        }
    }

    /// The SAN URI that encodes this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoleError {
    #[error("the peer certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the peer certificate names no surge role (a SAN URI {ROLE_URI_PREFIX}replica|node|client); issue it with `surge cert issue --role`")]
    Missing,
    #[error("the peer certificate names more than one surge role")]
    Ambiguous,
    #[error("the peer certificate names an unknown surge role {0:?}")]
    Unknown(String),
}

/// The one role a DER certificate carries. The chain was verified by the TLS handshake; this
/// only reads the leaf.
pub fn role_of(cert_der: &[u8]) -> Result<Role, RoleError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| RoleError::Unparsable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| RoleError::Unparsable(e.to_string()))?;
    let mut found = None;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) else {
            continue;
        };
        let role = Role::parse(role).ok_or_else(|| RoleError::Unknown(role.to_string()))?;
        if found.replace(role).is_some() {
            return Err(RoleError::Ambiguous);
        }
    }
    found.ok_or(RoleError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    #[test]
    fn the_issued_role_is_read_back() {
        let ca = certs::new_ca("test").expect("ca");
        for role in [Role::Replica, Role::Node, Role::Client] {
            let leaf = certs::issue(&ca, "h1", role, &["127.0.0.1".into()], 30).expect("issue");
            let der = certs::first_cert_der(&leaf.cert_pem).expect("der");
            assert_eq!(role_of(&der), Ok(role));
        }
    }

    #[test]
    fn a_certificate_without_a_role_is_refused() {
        let ca = certs::new_ca("test").expect("ca");
        let der = certs::first_cert_der(&ca.cert_pem).expect("der");
        assert_eq!(role_of(&der), Err(RoleError::Missing));
        assert!(matches!(role_of(b"junk"), Err(RoleError::Unparsable(_))));
    }
}
