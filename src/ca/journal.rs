//! The journal of authorities: every root and intermediate citadel has made or loaded, with
//! its status. It is the CA's single source of truth and is written to the store *before* an
//! authority is used, so a crash never leaves a certificate signed by an unrecorded key.

use serde::{Deserialize, Serialize};

/// Bumped when the on-disk shape changes incompatibly.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Journal {
    pub format: u32,
    pub trust_domain: String,
    pub authorities: Vec<AuthorityRecord>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Root,
    Intermediate,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Prepared,
    Active,
    Retiring,
    Retired,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthorityRecord {
    /// The certificate serial, hex. Unique within the journal.
    pub id: String,
    pub role: Role,
    pub status: Status,
    pub cert_pem: String,
    pub key_pem: Secret,
    /// The id of the authority that signed this one; `None` for a self-signed root.
    pub issuer: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub activated_at: Option<i64>,
    pub retired_at: Option<i64>,
}

/// A string that never prints: keys live in the journal but must not reach logs.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Journal {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            format: FORMAT,
            trust_domain: trust_domain.to_string(),
            authorities: Vec::new(),
        }
    }

    pub fn get(&self, id: &str) -> Option<&AuthorityRecord> {
        self.authorities.iter().find(|a| a.id == id)
    }

    /// The active intermediate: the one that signs workloads.
    pub fn active_signer(&self) -> Option<&AuthorityRecord> {
        self.authorities
            .iter()
            .find(|a| a.role == Role::Intermediate && a.status == Status::Active)
    }

    /// Roots in the trust bundle: every root not yet retired, oldest first.
    pub fn trusted_roots(&self) -> impl Iterator<Item = &AuthorityRecord> {
        self.authorities
            .iter()
            .filter(|a| a.role == Role::Root && a.status != Status::Retired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("-----BEGIN PRIVATE KEY-----abc".into());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("abc"),
            "serialized form keeps the key for the store"
        );
    }
}
