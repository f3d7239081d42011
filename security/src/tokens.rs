//! Tenant and admin bearer tokens, stored hashed.
//!
//! The tokens file (`surge server --tokens FILE`) holds one token per line as its SHA-256 and
//! what it grants; the tokens themselves are shown once by `surge token new` and never stored:
//!
//! ```text
//! # comment
//! sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 tenant:eval
//! sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752 admin
//! ```
//!
//! A presented token is hashed and compared with *every* line in constant time, so neither
//! the comparison nor the position of a match tells an attacker anything.

use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use sha2::{Digest, Sha256};

/// Largest tokens file read.
pub const FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Most tokens one file may hold.
pub const TOKENS_MAX: usize = 10_000;
/// Longest token accepted from a request (ours are 70 bytes).
pub const TOKEN_BYTES_MAX: usize = 256;
/// Longest tenant name (the scheduler's own name limit is checked when a job is submitted).
pub const TENANT_BYTES_MAX: usize = 128;
/// Prefix of the tokens `surge token new` makes, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "surge_";
/// Random bytes in a new token.
const TOKEN_RANDOM_BYTES: usize = 32;

/// What a valid token allows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Everything: all tenants' jobs, membership, drain, quotas.
    Admin,
    /// The job API for this tenant's jobs only.
    Tenant(String),
}

impl Access {
    /// The file form: `admin` or `tenant:NAME`.
    pub fn grant(&self) -> String {
        match self {
            Access::Admin => "admin".to_string(),
            Access::Tenant(t) => format!("tenant:{t}"),
        }
    }

    pub fn parse_grant(s: &str) -> Result<Access, GrantError> {
        match s {
            "admin" => Ok(Access::Admin),
            _ => match s.strip_prefix("tenant:") {
                Some(t) => {
                    check_tenant(t)?;
                    Ok(Access::Tenant(t.to_string()))
                }
                None => Err(GrantError::Grant(s.to_string())),
            },
        }
    }
}

/// A grant of a token that is not `admin` or `tenant:NAME` with a valid name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("{0:?}: expected admin or tenant:NAME")]
    Grant(String),
    #[error("tenant {0:?}: use 1 to {TENANT_BYTES_MAX} letters, digits and . _ - : /")]
    Tenant(String),
}

/// A tenant name usable in a token: what the scheduler accepts as a tenant.
pub fn check_tenant(t: &str) -> Result<(), GrantError> {
    let ok = !t.is_empty()
        && t.len() <= TENANT_BYTES_MAX
        && !t.contains("..")
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'));
    if ok {
        Ok(())
    } else {
        Err(GrantError::Tenant(t.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("tokens file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokens file {path}: larger than {FILE_BYTES_MAX} bytes")]
    TooLarge { path: PathBuf },
    #[error("tokens file line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("tokens file: more than {TOKENS_MAX} tokens")]
    TooMany,
    #[error("tokens file: no tokens in it; every job-API call would be refused")]
    Empty,
    #[error("the system random source failed")]
    Random,
}

/// The parsed tokens file.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], Access)>,
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Equal without an early exit: the time taken does not depend on where two digests differ.
fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Tokens {
    /// Parse the file's text (pure).
    pub fn parse(text: &str) -> Result<Tokens, TokensError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| TokensError::Line {
                line: i + 1,
                reason,
            };
            let mut fields = line.split_whitespace();
            let (Some(hash), Some(grant), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(
                    "expected `sha256:HEX admin` or `sha256:HEX tenant:NAME`".into(),
                ));
            };
            let digest = hash
                .strip_prefix("sha256:")
                .and_then(unhex)
                .ok_or_else(|| bad(format!("{hash:.16}...: expected sha256: and 64 hex digits")))?;
            let access = Access::parse_grant(grant).map_err(|e| bad(e.to_string()))?;
            if entries.len() >= TOKENS_MAX {
                return Err(TokensError::TooMany);
            }
            entries.push((digest, access));
        }
        if entries.is_empty() {
            return Err(TokensError::Empty);
        }
        Ok(Tokens { entries })
    }

    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let io = |source| TokensError::Io {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::metadata(path).map_err(io)?.len() > FILE_BYTES_MAX {
            return Err(TokensError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Tokens::parse(&std::fs::read_to_string(path).map_err(io)?)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What `token` grants, if it is one of ours. Every entry is compared, match or not.
    pub fn resolve(&self, token: &str) -> Option<Access> {
        if token.is_empty() || token.len() > TOKEN_BYTES_MAX {
            return None;
        }
        let digest = sha256(token);
        let mut found = None;
        for (d, access) in &self.entries {
            if digest_eq(d, &digest) && found.is_none() {
                found = Some(access.clone());
            }
        }
        found
    }
}

/// The token of an `authorization: Bearer TOKEN` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A new random token and its line for the tokens file.
pub fn new_token(access: &Access) -> Result<(String, String), TokensError> {
    let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokensError::Random)?;
    let token = format!("{TOKEN_PREFIX}{}", hex(&bytes));
    let line = format!("sha256:{} {}", hex(&sha256(&token)), access.grant());
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_errors_say_what_is_accepted() {
        assert_eq!(
            check_tenant("").expect_err("empty").to_string(),
            "tenant \"\": use 1 to 128 letters, digits and . _ - : /"
        );
        assert_eq!(
            Access::parse_grant("root")
                .expect_err("unknown")
                .to_string(),
            "\"root\": expected admin or tenant:NAME"
        );
        assert_eq!(
            Access::parse_grant("tenant:a b").expect_err("bad name"),
            GrantError::Tenant("a b".into())
        );
    }

    #[test]
    fn new_tokens_resolve_to_their_grant_and_nothing_else_does() {
        let (admin, admin_line) = new_token(&Access::Admin).expect("token");
        let (eval, eval_line) = new_token(&Access::Tenant("eval".into())).expect("token");
        assert_ne!(admin, eval);
        assert!(
            !admin_line.contains(&admin),
            "the file must not hold the token"
        );
        let tokens =
            Tokens::parse(&format!("# ops\n\n{admin_line}\n  {eval_line}  \n")).expect("parse");
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.resolve(&admin), Some(Access::Admin));
        assert_eq!(tokens.resolve(&eval), Some(Access::Tenant("eval".into())));
        assert_eq!(tokens.resolve(""), None);
        assert_eq!(tokens.resolve(&format!("{eval}x")), None);
        assert_eq!(tokens.resolve(&"a".repeat(TOKEN_BYTES_MAX + 1)), None);
    }

    #[test]
    fn malformed_files_are_refused_with_the_line() {
        for (text, line) in [
            ("sha256:00 admin", 1),
            ("\nmd5:00 admin", 2),
            (&format!("sha256:{} root", "0".repeat(64)), 1),
            (&format!("sha256:{} tenant:a b", "0".repeat(64)), 1),
            (&format!("sha256:{} tenant:", "0".repeat(64)), 1),
        ] {
            match Tokens::parse(text) {
                Err(TokensError::Line { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        assert!(matches!(
            Tokens::parse("# nothing\n"),
            Err(TokensError::Empty)
        ));
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
