//! The node's API errors and the one table that turns them into gRPC statuses.
//!
//! | error | gRPC code | reason |
//! |---|---|---|
//! | `Invalid` | INVALID_ARGUMENT | the field's code (`INVALID_USER_ID`, `BATCH_TOO_LARGE`, ...) |
//! | `Rejected(UserNotFound)`, `UserNotFound` | NOT_FOUND | `USER_NOT_FOUND` |
//! | `Rejected(any other rule)` | FAILED_PRECONDITION | the rule's code (`REVISION_MISMATCH`, `STORAGE_JURISDICTION_NOT_ALLOWED`, `POLICY_BREACH`, ...); `BATCH_REFUSED` carries a `BatchRefusal` in the status details |
//! | `LocationNotFound` (a read) | NOT_FOUND | `LOCATION_NOT_FOUND` |
//! | `PolicyNotFound` (a read) | NOT_FOUND | `POLICY_NOT_FOUND` |
//! | `NotLeader` | UNAVAILABLE + leader id and address | `NOT_LEADER` |
//! | `NoLeader` | UNAVAILABLE | `NO_LEADER` |
//! | `QuorumUnavailable` | UNAVAILABLE | `QUORUM_UNAVAILABLE` |
//! | `RevisionNotReached` | UNAVAILABLE | `REVISION_NOT_REACHED` |
//! | `MemberUnreachable` | UNAVAILABLE | `MEMBER_UNREACHABLE` |
//! | `ShuttingDown` | UNAVAILABLE | `SHUTTING_DOWN` |
//! | `ClusterNotInitialized` | FAILED_PRECONDITION | `CLUSTER_NOT_INITIALIZED` |
//! | `AlreadyInitialized` | FAILED_PRECONDITION | `ALREADY_INITIALIZED` |
//! | `Overloaded` | RESOURCE_EXHAUSTED | `OVERLOADED` |
//! | `DeadlineExceeded` | DEADLINE_EXCEEDED (a write may or may not have applied) | `DEADLINE_EXCEEDED` |
//! | `Internal` | INTERNAL | `INTERNAL` |
//! | `WatchCompacted` | OUT_OF_RANGE + the compaction revision in `residency-revision` | `WATCH_COMPACTED` |
//! | `WatcherTooSlow` | RESOURCE_EXHAUSTED | `WATCHER_TOO_SLOW` |
//! | `Unauthenticated` (no certificate where the call needs one) | UNAUTHENTICATED | `UNAUTHENTICATED` |
//! | `PermissionDenied` (the caller's role does not cover the call, or it has none) | PERMISSION_DENIED | `PERMISSION_DENIED` |
//! | `PeerNotAllowed` (not a node of this cluster's trust domain and jurisdiction, on the peer port) | PERMISSION_DENIED | `PEER_NOT_ALLOWED` |
//! | `RateLimited` (one caller over its rate) | RESOURCE_EXHAUSTED | `RATE_LIMITED` |
//! | `Membership` | FAILED_PRECONDITION | `MEMBER_JURISDICTION_NOT_ALLOWED`, `MEMBER_EXISTS`, `MEMBER_NOT_FOUND`, `LEARNER_NOT_CAUGHT_UP`, `LAST_VOTER`, `ADMIN_OPERATION_IN_PROGRESS`, `MEMBERSHIP_CHANGE_IN_PROGRESS` |

use residency_proto::metadata::{LEADER_ADDR_KEY, LEADER_ID_KEY, REASON_KEY, REVISION_KEY};
use residency_types::{ReasonCode, Rejection, Revision, ValidationError};
use serde::{Deserialize, Serialize};
use tonic::Code;
use tonic::metadata::MetadataValue;

/// Everything a request can fail with. Serializable so that a leader's answer to a forwarded
/// write reaches the client unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {message}")]
    Invalid {
        code: ReasonCode,
        field: String,
        message: String,
    },
    #[error("{}", .0.message())]
    Rejected(Rejection),
    #[error("the user has no placement (read at revision {revision})")]
    UserNotFound { revision: Revision },
    #[error("location {location_id} is not registered (read at revision {revision})")]
    LocationNotFound {
        location_id: String,
        revision: Revision,
    },
    #[error("no policy covers residency {residency} (read at revision {revision})")]
    PolicyNotFound {
        residency: String,
        revision: Revision,
    },
    #[error("this node is not the leader")]
    NotLeader {
        leader_id: Option<u64>,
        leader_addr: Option<String>,
    },
    #[error("no leader is known; the cluster may be electing one or may have lost its quorum")]
    NoLeader,
    #[error("leadership could not be confirmed with a quorum: {0}")]
    QuorumUnavailable(String),
    #[error(
        "this node has applied revision {applied}, the read needs {wanted}; try another node or later"
    )]
    RevisionNotReached { wanted: Revision, applied: Revision },
    #[error("member unreachable: {0}")]
    MemberUnreachable(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("this node has not joined a cluster yet")]
    ClusterNotInitialized,
    #[error("this node already belongs to a cluster")]
    AlreadyInitialized,
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("the deadline passed after {0} ms; a write may or may not have been applied")]
    DeadlineExceeded(u64),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the change history before revision {} is compacted; re-list, then watch from after it", .compacted.0 + 1)]
    WatchCompacted { compacted: Revision },
    #[error("the watcher read too slowly and was cut off; resume from the last revision it saw")]
    WatcherTooSlow,
    /// A membership change refused by a rule; `code` says which, `message` the values involved.
    #[error("{message}")]
    Membership { code: ReasonCode, message: String },
    /// No certificate where the call needs one.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known caller whose role does not cover the call.
    #[error("{0}")]
    PermissionDenied(String),
    /// A certificate that may not talk on the peer port (not a node, or not of this cluster).
    #[error("{0}")]
    PeerNotAllowed(String),
    /// One caller sent more than its share; the others are served.
    #[error("{0}")]
    RateLimited(String),
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        ApiError::Invalid {
            code: error.code,
            field: error.field.to_string(),
            message: error.message,
        }
    }
}

impl ApiError {
    pub fn invalid(code: ReasonCode, field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            code,
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        ApiError::Internal(error.to_string())
    }

    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ApiError::Invalid { code, .. } => *code,
            ApiError::Rejected(rejection) => rejection.reason_code(),
            ApiError::UserNotFound { .. } => ReasonCode::UserNotFound,
            ApiError::LocationNotFound { .. } => ReasonCode::LocationNotFound,
            ApiError::PolicyNotFound { .. } => ReasonCode::PolicyNotFound,
            ApiError::NotLeader { .. } => ReasonCode::NotLeader,
            ApiError::NoLeader => ReasonCode::NoLeader,
            ApiError::QuorumUnavailable(_) => ReasonCode::QuorumUnavailable,
            ApiError::RevisionNotReached { .. } => ReasonCode::RevisionNotReached,
            ApiError::MemberUnreachable(_) => ReasonCode::MemberUnreachable,
            ApiError::ShuttingDown => ReasonCode::ShuttingDown,
            ApiError::ClusterNotInitialized => ReasonCode::ClusterNotInitialized,
            ApiError::AlreadyInitialized => ReasonCode::AlreadyInitialized,
            ApiError::Overloaded(_) => ReasonCode::Overloaded,
            ApiError::DeadlineExceeded(_) => ReasonCode::DeadlineExceeded,
            ApiError::Internal(_) => ReasonCode::Internal,
            ApiError::Membership { code, .. } => *code,
            ApiError::WatchCompacted { .. } => ReasonCode::WatchCompacted,
            ApiError::WatcherTooSlow => ReasonCode::WatcherTooSlow,
            ApiError::Unauthenticated(_) => ReasonCode::Unauthenticated,
            ApiError::PermissionDenied(_) => ReasonCode::PermissionDenied,
            ApiError::PeerNotAllowed(_) => ReasonCode::PeerNotAllowed,
            ApiError::RateLimited(_) => ReasonCode::RateLimited,
        }
    }

    pub fn grpc_code(&self) -> Code {
        match self {
            ApiError::Invalid { .. } => Code::InvalidArgument,
            ApiError::Rejected(Rejection::UserNotFound)
            | ApiError::UserNotFound { .. }
            | ApiError::LocationNotFound { .. }
            | ApiError::PolicyNotFound { .. } => Code::NotFound,
            ApiError::Rejected(_)
            | ApiError::ClusterNotInitialized
            | ApiError::AlreadyInitialized => Code::FailedPrecondition,
            ApiError::NotLeader { .. }
            | ApiError::NoLeader
            | ApiError::QuorumUnavailable(_)
            | ApiError::RevisionNotReached { .. }
            | ApiError::MemberUnreachable(_)
            | ApiError::ShuttingDown => Code::Unavailable,
            ApiError::Overloaded(_) => Code::ResourceExhausted,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::Internal(_) => Code::Internal,
            ApiError::Membership { .. } => Code::FailedPrecondition,
            ApiError::WatchCompacted { .. } => Code::OutOfRange,
            ApiError::WatcherTooSlow | ApiError::RateLimited(_) => Code::ResourceExhausted,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) | ApiError::PeerNotAllowed(_) => Code::PermissionDenied,
        }
    }
}

fn insert(status: &mut tonic::Status, key: &'static str, value: &str) {
    if let Ok(value) = MetadataValue::try_from(value) {
        status.metadata_mut().insert(key, value);
    }
}

/// The per-item reasons of a refused batch, as the status details clients decode.
fn batch_refusal(rejection: &Rejection) -> Option<Vec<u8>> {
    let Rejection::BatchRefused { items } = rejection else {
        return None;
    };
    let refusal = residency_proto::pb::BatchRefusal {
        items: items
            .iter()
            .map(|item| residency_proto::pb::ItemRefusal {
                index: item.index,
                reason: item.rejection.reason_code().as_str().to_string(),
                message: item.rejection.message(),
            })
            .collect(),
    };
    Some(prost::Message::encode_to_vec(&refusal))
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        let details = match &error {
            ApiError::Rejected(rejection) => batch_refusal(rejection),
            _ => None,
        };
        let mut status = match details {
            Some(details) => {
                tonic::Status::with_details(error.grpc_code(), error.to_string(), details.into())
            }
            None => tonic::Status::new(error.grpc_code(), error.to_string()),
        };
        insert(&mut status, REASON_KEY, error.reason_code().as_str());
        match &error {
            ApiError::NotLeader {
                leader_id,
                leader_addr,
            } => {
                if let Some(leader_id) = leader_id {
                    insert(&mut status, LEADER_ID_KEY, &leader_id.to_string());
                }
                if let Some(leader_addr) = leader_addr {
                    insert(&mut status, LEADER_ADDR_KEY, leader_addr);
                }
            }
            ApiError::UserNotFound { revision }
            | ApiError::LocationNotFound { revision, .. }
            | ApiError::PolicyNotFound { revision, .. }
            | ApiError::WatchCompacted {
                compacted: revision,
            } => insert(&mut status, REVISION_KEY, &revision.to_string()),
            _ => {}
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_carries_its_reason_and_the_leader_hint_when_known() {
        let status = tonic::Status::from(ApiError::NotLeader {
            leader_id: Some(2),
            leader_addr: Some("127.0.0.1:7102".to_string()),
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            residency_proto::metadata::reason(&status),
            Some(ReasonCode::NotLeader)
        );
        assert_eq!(
            residency_proto::metadata::leader_hint(&status),
            (Some(2), Some("127.0.0.1:7102".to_string()))
        );
        let mismatch = ApiError::Rejected(Rejection::RevisionMismatch {
            expected: Revision(1),
            actual: Revision(2),
        });
        assert_eq!(
            tonic::Status::from(mismatch).code(),
            Code::FailedPrecondition
        );
        let invalid = ApiError::from(ValidationError::new(
            ReasonCode::InvalidUserId,
            "user_id",
            "bad",
        ));
        let status = tonic::Status::from(invalid);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            residency_proto::metadata::reason(&status),
            Some(ReasonCode::InvalidUserId)
        );
    }
}
