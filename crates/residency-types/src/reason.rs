//! Stable, machine-readable reason codes, and the error that validation returns.
//!
//! The codes are part of the API: clients match on their strings, so a code is never renamed or
//! reused, only added.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a request was refused or failed. The string form (`as_str`) is what goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReasonCode {
    InvalidUserId,
    InvalidJurisdiction,
    InvalidLocationId,
    InvalidRequestId,
    InvalidCallerId,
    InvalidReasonText,
    InvalidConsistency,
    InvalidArgument,
    BatchTooLarge,
    RevisionMismatch,
    UserNotFound,
    RequestIdReused,
    NotLeader,
    NoLeader,
    RevisionNotReached,
    QuorumUnavailable,
    ClusterNotInitialized,
    AlreadyInitialized,
    MemberUnreachable,
    ShuttingDown,
    Internal,
    Overloaded,
    DeadlineExceeded,
    NoPolicy,
    LocationNotFound,
    LocationNotActive,
    StorageJurisdictionNotAllowed,
    ResidencyChangeRefused,
    UserMoving,
    UserNotMoving,
    MoveTargetIsCurrent,
    LocationJurisdictionImmutable,
    LocationRetired,
    LocationInUse,
    PolicyBreach,
    BatchRefused,
    DuplicateUserInBatch,
    PolicyNotFound,
    InvalidAccessor,
    AdminOperationInProgress,
    MemberExists,
    MemberNotFound,
    LearnerNotCaughtUp,
    MemberJurisdictionNotAllowed,
    LastVoter,
    MembershipChangeInProgress,
    MemberIdReused,
    WatchCompacted,
    WatcherTooSlow,
    Unauthenticated,
    PermissionDenied,
    PeerNotAllowed,
    RateLimited,
}

impl ReasonCode {
    /// Every code, for tables and round-trip tests.
    pub const ALL: [ReasonCode; 53] = [
        ReasonCode::InvalidUserId,
        ReasonCode::InvalidJurisdiction,
        ReasonCode::InvalidLocationId,
        ReasonCode::InvalidRequestId,
        ReasonCode::InvalidCallerId,
        ReasonCode::InvalidReasonText,
        ReasonCode::InvalidConsistency,
        ReasonCode::InvalidArgument,
        ReasonCode::BatchTooLarge,
        ReasonCode::RevisionMismatch,
        ReasonCode::UserNotFound,
        ReasonCode::RequestIdReused,
        ReasonCode::NotLeader,
        ReasonCode::NoLeader,
        ReasonCode::RevisionNotReached,
        ReasonCode::QuorumUnavailable,
        ReasonCode::ClusterNotInitialized,
        ReasonCode::AlreadyInitialized,
        ReasonCode::MemberUnreachable,
        ReasonCode::ShuttingDown,
        ReasonCode::Internal,
        ReasonCode::Overloaded,
        ReasonCode::DeadlineExceeded,
        ReasonCode::NoPolicy,
        ReasonCode::LocationNotFound,
        ReasonCode::LocationNotActive,
        ReasonCode::StorageJurisdictionNotAllowed,
        ReasonCode::ResidencyChangeRefused,
        ReasonCode::UserMoving,
        ReasonCode::UserNotMoving,
        ReasonCode::MoveTargetIsCurrent,
        ReasonCode::LocationJurisdictionImmutable,
        ReasonCode::LocationRetired,
        ReasonCode::LocationInUse,
        ReasonCode::PolicyBreach,
        ReasonCode::BatchRefused,
        ReasonCode::DuplicateUserInBatch,
        ReasonCode::PolicyNotFound,
        ReasonCode::InvalidAccessor,
        ReasonCode::AdminOperationInProgress,
        ReasonCode::MemberExists,
        ReasonCode::MemberNotFound,
        ReasonCode::LearnerNotCaughtUp,
        ReasonCode::MemberJurisdictionNotAllowed,
        ReasonCode::LastVoter,
        ReasonCode::MembershipChangeInProgress,
        ReasonCode::MemberIdReused,
        ReasonCode::WatchCompacted,
        ReasonCode::WatcherTooSlow,
        ReasonCode::Unauthenticated,
        ReasonCode::PermissionDenied,
        ReasonCode::PeerNotAllowed,
        ReasonCode::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::InvalidUserId => "INVALID_USER_ID",
            ReasonCode::InvalidJurisdiction => "INVALID_JURISDICTION",
            ReasonCode::InvalidLocationId => "INVALID_LOCATION_ID",
            ReasonCode::InvalidRequestId => "INVALID_REQUEST_ID",
            ReasonCode::InvalidCallerId => "INVALID_CALLER_ID",
            ReasonCode::InvalidReasonText => "INVALID_REASON_TEXT",
            ReasonCode::InvalidConsistency => "INVALID_CONSISTENCY",
            ReasonCode::InvalidArgument => "INVALID_ARGUMENT",
            ReasonCode::BatchTooLarge => "BATCH_TOO_LARGE",
            ReasonCode::RevisionMismatch => "REVISION_MISMATCH",
            ReasonCode::UserNotFound => "USER_NOT_FOUND",
            ReasonCode::RequestIdReused => "REQUEST_ID_REUSED",
            ReasonCode::NotLeader => "NOT_LEADER",
            ReasonCode::NoLeader => "NO_LEADER",
            ReasonCode::RevisionNotReached => "REVISION_NOT_REACHED",
            ReasonCode::QuorumUnavailable => "QUORUM_UNAVAILABLE",
            ReasonCode::ClusterNotInitialized => "CLUSTER_NOT_INITIALIZED",
            ReasonCode::AlreadyInitialized => "ALREADY_INITIALIZED",
            ReasonCode::MemberUnreachable => "MEMBER_UNREACHABLE",
            ReasonCode::ShuttingDown => "SHUTTING_DOWN",
            ReasonCode::Internal => "INTERNAL",
            ReasonCode::Overloaded => "OVERLOADED",
            ReasonCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ReasonCode::NoPolicy => "NO_POLICY",
            ReasonCode::LocationNotFound => "LOCATION_NOT_FOUND",
            ReasonCode::LocationNotActive => "LOCATION_NOT_ACTIVE",
            ReasonCode::StorageJurisdictionNotAllowed => "STORAGE_JURISDICTION_NOT_ALLOWED",
            ReasonCode::ResidencyChangeRefused => "RESIDENCY_CHANGE_REFUSED",
            ReasonCode::UserMoving => "USER_MOVING",
            ReasonCode::UserNotMoving => "USER_NOT_MOVING",
            ReasonCode::MoveTargetIsCurrent => "MOVE_TARGET_IS_CURRENT",
            ReasonCode::LocationJurisdictionImmutable => "LOCATION_JURISDICTION_IMMUTABLE",
            ReasonCode::LocationRetired => "LOCATION_RETIRED",
            ReasonCode::LocationInUse => "LOCATION_IN_USE",
            ReasonCode::PolicyBreach => "POLICY_BREACH",
            ReasonCode::BatchRefused => "BATCH_REFUSED",
            ReasonCode::DuplicateUserInBatch => "DUPLICATE_USER_IN_BATCH",
            ReasonCode::PolicyNotFound => "POLICY_NOT_FOUND",
            ReasonCode::InvalidAccessor => "INVALID_ACCESSOR",
            ReasonCode::AdminOperationInProgress => "ADMIN_OPERATION_IN_PROGRESS",
            ReasonCode::MemberExists => "MEMBER_EXISTS",
            ReasonCode::MemberNotFound => "MEMBER_NOT_FOUND",
            ReasonCode::LearnerNotCaughtUp => "LEARNER_NOT_CAUGHT_UP",
            ReasonCode::MemberJurisdictionNotAllowed => "MEMBER_JURISDICTION_NOT_ALLOWED",
            ReasonCode::LastVoter => "LAST_VOTER",
            ReasonCode::MembershipChangeInProgress => "MEMBERSHIP_CHANGE_IN_PROGRESS",
            ReasonCode::MemberIdReused => "MEMBER_ID_REUSED",
            ReasonCode::WatchCompacted => "WATCH_COMPACTED",
            ReasonCode::WatcherTooSlow => "WATCHER_TOO_SLOW",
            ReasonCode::Unauthenticated => "UNAUTHENTICATED",
            ReasonCode::PermissionDenied => "PERMISSION_DENIED",
            ReasonCode::PeerNotAllowed => "PEER_NOT_ALLOWED",
            ReasonCode::RateLimited => "RATE_LIMITED",
        }
    }

    pub fn parse(text: &str) -> Option<ReasonCode> {
        ReasonCode::ALL
            .into_iter()
            .find(|code| code.as_str() == text)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Input that does not meet the domain's rules. Never proposed, never changes state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub code: ReasonCode,
    pub field: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(code: ReasonCode, field: &'static str, message: impl Into<String>) -> Self {
        ValidationError {
            code,
            field,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_code_round_trips_through_its_string() {
        for code in ReasonCode::ALL {
            assert_eq!(ReasonCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ReasonCode::parse("NOT_A_CODE"), None);
    }
}
