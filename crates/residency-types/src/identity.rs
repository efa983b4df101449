//! Who is calling: SPIFFE-style identities taken from certificates, the three roles, and the
//! role table that maps one to the other.
//!
//! An identity is `spiffe://<trust domain>/<kind>/<name>` with kind `node` (name: the node id),
//! `service` or `operator`. The certificate's URI SAN carries it; the server parses it here after
//! the TLS handshake has verified the chain, so a value of `Identity` is always well formed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::CallerId;
use crate::limits::CALLER_ID_BYTES_MAX;

/// The trust domain of identities when the configuration names none.
pub const TRUST_DOMAIN_DEFAULT: &str = "residency.local";
/// Longest trust domain, in bytes (a DNS name).
pub const TRUST_DOMAIN_BYTES_MAX: usize = 253;
/// Longest service or operator name, in bytes.
pub const PRINCIPAL_NAME_BYTES_MAX: usize = 64;
/// Most entries in a role table.
pub const ROLE_TABLE_ENTRIES_MAX: usize = 1_024;

const SCHEME: &str = "spiffe://";

/// Why a text is not an identity, a pattern or a role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {message}")]
pub struct IdentityError {
    pub text: String,
    pub message: String,
}

fn refuse(text: &str, message: impl Into<String>) -> IdentityError {
    IdentityError {
        // Bounded, so an error about hostile input stays small.
        text: text.chars().take(80).collect(),
        message: message.into(),
    }
}

/// What kind of party an identity names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// A registry node, by its node id.
    Node(u64),
    /// A microservice that asks the registry.
    Service(String),
    /// A person who runs the cluster.
    Operator(String),
}

/// A parsed SPIFFE-style identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    uri: String,
    trust_domain: String,
    principal: Principal,
}

/// A trust domain: lowercase letters, digits, `.`, `-` and `_`, not empty.
pub fn check_trust_domain(text: &str) -> Result<(), IdentityError> {
    if text.is_empty() || text.len() > TRUST_DOMAIN_BYTES_MAX {
        return Err(refuse(
            text,
            format!("a trust domain has 1 to {TRUST_DOMAIN_BYTES_MAX} bytes"),
        ));
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(refuse(
            text,
            "a trust domain holds only [a-z0-9._-] (SPIFFE)",
        ));
    }
    Ok(())
}

fn check_name(uri: &str, name: &str) -> Result<(), IdentityError> {
    if name.is_empty() || name.len() > PRINCIPAL_NAME_BYTES_MAX {
        return Err(refuse(
            uri,
            format!("a name has 1 to {PRINCIPAL_NAME_BYTES_MAX} bytes"),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        || name == "."
        || name == ".."
    {
        return Err(refuse(uri, "a name holds only [A-Za-z0-9._-]"));
    }
    Ok(())
}

impl Identity {
    /// Parses `spiffe://<trust domain>/<node|service|operator>/<name>`.
    pub fn parse(text: &str) -> Result<Identity, IdentityError> {
        if text.len() > CALLER_ID_BYTES_MAX {
            return Err(refuse(
                text,
                format!("an identity has at most {CALLER_ID_BYTES_MAX} bytes"),
            ));
        }
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| refuse(text, "an identity starts with spiffe://"))?;
        let mut parts = rest.split('/');
        let (Some(domain), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse(
                text,
                "an identity is spiffe://<trust domain>/<node|service|operator>/<name>",
            ));
        };
        check_trust_domain(domain)?;
        let principal = match kind {
            "node" => {
                let valid = !name.is_empty()
                    && name.len() <= 20
                    && name.bytes().all(|b| b.is_ascii_digit())
                    && !name.starts_with('0');
                let id =
                    name.parse::<u64>().ok().filter(|_| valid).ok_or_else(|| {
                        refuse(text, "a node's name is its id: 1 or more, decimal")
                    })?;
                Principal::Node(id)
            }
            "service" => {
                check_name(text, name)?;
                Principal::Service(name.to_string())
            }
            "operator" => {
                check_name(text, name)?;
                Principal::Operator(name.to_string())
            }
            _ => {
                return Err(refuse(text, "the kind is one of node, service, operator"));
            }
        };
        Ok(Identity {
            uri: text.to_string(),
            trust_domain: domain.to_string(),
            principal,
        })
    }

    /// The identity of node `id` in `trust_domain`.
    pub fn node(trust_domain: &str, id: u64) -> Result<Identity, IdentityError> {
        Identity::parse(&format!("{SCHEME}{trust_domain}/node/{id}"))
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The identity as the caller recorded with a write.
    pub fn caller_id(&self) -> CallerId {
        CallerId::parse(self.uri.clone()).expect("a parsed identity is a valid caller id")
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// What a caller may do on the client listener. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Lookups, access checks, listings, status, watch.
    Reader,
    /// Plus writes to placements: assign, batch assign, forget, moves.
    Writer,
    /// Plus the catalog, policies, membership, backup and export.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Role, IdentityError> {
        match text {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "admin" => Ok(Role::Admin),
            _ => Err(refuse(text, "a role is one of reader, writer, admin")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identities, or families of them, and their roles. A key is a whole identity
/// (`spiffe://residency.local/service/payments`) or a prefix ending in `/*`
/// (`spiffe://residency.local/service/*`). The most specific entry wins: a whole identity over
/// any prefix, a longer prefix over a shorter one. An identity no entry matches has no role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleTable {
    exact: BTreeMap<String, Role>,
    /// Prefixes without their `*`, longest first.
    prefixes: Vec<(String, Role)>,
}

impl RoleTable {
    pub fn new<'a>(
        entries: impl IntoIterator<Item = (&'a str, Role)>,
    ) -> Result<RoleTable, IdentityError> {
        let mut table = RoleTable::default();
        let mut count = 0;
        for (pattern, role) in entries {
            count += 1;
            if count > ROLE_TABLE_ENTRIES_MAX {
                return Err(refuse(
                    pattern,
                    format!("a role table has at most {ROLE_TABLE_ENTRIES_MAX} entries"),
                ));
            }
            match pattern.strip_suffix('*') {
                Some(prefix) => {
                    // The prefix must be a trust domain, or a trust domain and a kind.
                    let rest = prefix
                        .strip_prefix(SCHEME)
                        .ok_or_else(|| refuse(pattern, "a pattern starts with spiffe://"))?;
                    let segments: Vec<&str> = rest.split('/').collect();
                    match segments.as_slice() {
                        [domain, ""] => check_trust_domain(domain)?,
                        [domain, kind, ""] if ["node", "service", "operator"].contains(kind) => {
                            check_trust_domain(domain)?;
                        }
                        _ => {
                            return Err(refuse(
                                pattern,
                                "a pattern is a whole identity, spiffe://<domain>/* or spiffe://<domain>/<kind>/*",
                            ));
                        }
                    }
                    table.prefixes.push((prefix.to_string(), role));
                }
                None => {
                    let identity = Identity::parse(pattern)?;
                    table.exact.insert(identity.uri, role);
                }
            }
        }
        table
            .prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let mut seen = std::collections::BTreeSet::new();
        for (prefix, _) in &table.prefixes {
            if !seen.insert(prefix.clone()) {
                return Err(refuse(prefix, "the pattern is listed twice"));
            }
        }
        Ok(table)
    }

    /// The role of `identity`, if any entry grants one.
    pub fn role_of(&self, identity: &Identity) -> Option<Role> {
        if let Some(role) = self.exact.get(identity.uri()) {
            return Some(*role);
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| identity.uri().starts_with(prefix.as_str()))
            .map(|(_, role)| *role)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_by_kind() {
        let node = Identity::parse("spiffe://residency.local/node/2").expect("node");
        assert_eq!(node.principal(), &Principal::Node(2));
        assert_eq!(node.trust_domain(), "residency.local");
        let service = Identity::parse("spiffe://residency.local/service/payments").expect("svc");
        assert_eq!(
            service.principal(),
            &Principal::Service("payments".to_string())
        );
        assert_eq!(
            service.caller_id().as_str(),
            "spiffe://residency.local/service/payments"
        );
        assert_eq!(
            Identity::node("residency.local", 3).expect("node").uri(),
            "spiffe://residency.local/node/3"
        );
    }

    #[test]
    fn malformed_identities_are_refused() {
        for text in [
            "",
            "https://residency.local/service/a",
            "spiffe://residency.local/service",
            "spiffe://residency.local/service/",
            "spiffe://residency.local/service/a/b",
            "spiffe://Residency.local/service/a",
            "spiffe:///service/a",
            "spiffe://residency.local/robot/a",
            "spiffe://residency.local/node/0",
            "spiffe://residency.local/node/02",
            "spiffe://residency.local/node/x",
            "spiffe://residency.local/node/99999999999999999999",
            "spiffe://residency.local/service/..",
            "spiffe://residency.local/service/a b",
            "spiffe://residency.local/service/caf\u{e9}",
            "spiffe://residency.local/service/a\nb",
        ] {
            assert!(Identity::parse(text).is_err(), "{text:?} was accepted");
        }
        let long = format!("spiffe://residency.local/service/{}", "a".repeat(65));
        assert!(Identity::parse(&long).is_err());
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let table = RoleTable::new([
            ("spiffe://residency.local/*", Role::Reader),
            ("spiffe://residency.local/operator/*", Role::Admin),
            ("spiffe://residency.local/service/onboarding", Role::Writer),
            ("spiffe://residency.local/operator/intern", Role::Reader),
        ])
        .expect("table");
        let role = |text: &str| table.role_of(&Identity::parse(text).expect("identity"));
        assert_eq!(
            role("spiffe://residency.local/service/onboarding"),
            Some(Role::Writer)
        );
        assert_eq!(
            role("spiffe://residency.local/service/payments"),
            Some(Role::Reader)
        );
        assert_eq!(
            role("spiffe://residency.local/operator/alice"),
            Some(Role::Admin)
        );
        assert_eq!(
            role("spiffe://residency.local/operator/intern"),
            Some(Role::Reader)
        );
        assert_eq!(role("spiffe://other.domain/operator/alice"), None);
        assert!(Role::Admin > Role::Writer && Role::Writer > Role::Reader);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for pattern in [
            "spiffe://residency.local/serv*",
            "spiffe://residency.local/service/pay*",
            "residency.local/*",
            "spiffe://residency.local/robot/*",
            "spiffe://residency.local/service/a/b",
        ] {
            assert!(
                RoleTable::new([(pattern, Role::Reader)]).is_err(),
                "{pattern:?} was accepted"
            );
        }
        assert!(Role::parse("root").is_err());
        assert_eq!(Role::parse("writer"), Ok(Role::Writer));
    }
}
