//! The location catalog and the residency policies: what the registry checks every placement
//! against.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{Jurisdiction, LocationId};
use crate::limits::LABEL_BYTES_MAX;
use crate::placement::Revision;
use crate::reason::{ReasonCode, ValidationError};

/// Where a location stands in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocationState {
    /// Takes new placements.
    Active,
    /// Keeps its placements, takes no new ones (moves towards it included).
    Draining,
    /// Holds nothing and never will again. Final.
    Retired,
}

impl LocationState {
    pub fn as_str(self) -> &'static str {
        match self {
            LocationState::Active => "active",
            LocationState::Draining => "draining",
            LocationState::Retired => "retired",
        }
    }
}

/// Descriptive labels of a location: each 0..=64 bytes of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    pub provider: String,
    pub region: String,
    pub zone: String,
}

impl Labels {
    pub fn parse(provider: &str, region: &str, zone: &str) -> Result<Labels, ValidationError> {
        for (field, value) in [
            ("labels.provider", provider),
            ("labels.region", region),
            ("labels.zone", zone),
        ] {
            let allowed =
                |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-');
            if value.len() > LABEL_BYTES_MAX || !value.bytes().all(allowed) {
                return Err(ValidationError::new(
                    ReasonCode::InvalidArgument,
                    field,
                    format!("must be at most {LABEL_BYTES_MAX} bytes of [A-Za-z0-9._-]"),
                ));
            }
        }
        Ok(Labels {
            provider: provider.to_string(),
            region: region.to_string(),
            zone: zone.to_string(),
        })
    }
}

/// A registered storage location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub id: LocationId,
    /// Where the location physically is. Fixed at registration: never changes.
    pub jurisdiction: Jurisdiction,
    pub labels: Labels,
    pub state: LocationState,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// The rule for data whose residency is `residency`: where it may be stored, and from which
/// jurisdictions it may be accessed. What a policy does not name is denied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub residency: Jurisdiction,
    pub storage: BTreeSet<Jurisdiction>,
    pub access: BTreeSet<Jurisdiction>,
    pub mod_revision: Revision,
}

impl Policy {
    pub fn allows_storage_in(&self, jurisdiction: Jurisdiction) -> bool {
        self.storage.contains(&jurisdiction)
    }

    pub fn allows_access_from(&self, jurisdiction: Jurisdiction) -> bool {
        self.access.contains(&jurisdiction)
    }
}
