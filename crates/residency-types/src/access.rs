//! The access check every service makes before touching a user's data, and its answer.

use serde::{Deserialize, Serialize};

use crate::ids::{Jurisdiction, LocationId};
use crate::placement::Revision;

/// What the caller wants to do with the user's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessOperation {
    Read,
    Write,
}

/// Why an access is denied. The string form is part of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    /// The user has no placement.
    UnknownUser,
    /// No policy covers the user's residency.
    NoPolicy,
    /// The policy does not allow access from the caller's jurisdiction.
    AccessorJurisdictionNotAllowed,
    /// A write while the user's data is being moved.
    UserMoving,
    /// The placement's location is missing or retired (never expected: a broken invariant).
    LocationUnavailable,
    /// The placement's location is in a jurisdiction the policy does not allow for storage
    /// (never expected: a broken invariant).
    StorageJurisdictionNotAllowed,
    /// Only from the client library's cache, never from a node: the cache cannot prove that
    /// what it holds was the registry's state within its staleness bound, so it will not say.
    CacheNotFresh,
}

impl DenyReason {
    pub const ALL: [DenyReason; 7] = [
        DenyReason::UnknownUser,
        DenyReason::NoPolicy,
        DenyReason::AccessorJurisdictionNotAllowed,
        DenyReason::UserMoving,
        DenyReason::LocationUnavailable,
        DenyReason::StorageJurisdictionNotAllowed,
        DenyReason::CacheNotFresh,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::UnknownUser => "UNKNOWN_USER",
            DenyReason::NoPolicy => "NO_POLICY",
            DenyReason::AccessorJurisdictionNotAllowed => "ACCESSOR_JURISDICTION_NOT_ALLOWED",
            DenyReason::UserMoving => "USER_MOVING",
            DenyReason::LocationUnavailable => "LOCATION_UNAVAILABLE",
            DenyReason::StorageJurisdictionNotAllowed => "STORAGE_JURISDICTION_NOT_ALLOWED",
            DenyReason::CacheNotFresh => "CACHE_NOT_FRESH",
        }
    }

    pub fn parse(text: &str) -> Option<DenyReason> {
        DenyReason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == text)
    }
}

/// The answer to an access check. Anything the registry does not know is a deny.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Allow {
        location_id: LocationId,
        location_jurisdiction: Jurisdiction,
        /// The fencing token storage services compare before writing.
        epoch: u64,
        /// While the data moves: where it is going (reads only are allowed then).
        move_target: Option<LocationId>,
    },
    Deny {
        reason: DenyReason,
    },
}

/// A decision and the revision of the state it was made at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionAt {
    pub decision: Decision,
    pub revision: Revision,
}
