//! What the leader proposes to the Raft log, and what applying it answers.
//!
//! A `Command` is complete: it carries the time the leader stamped and the caller, so that apply
//! reads nothing but the command and the state. A refused write is an `Outcome::Rejected`, a
//! committed and deterministic result, never an apply error.

use serde::{Deserialize, Serialize};

use crate::ids::{CallerId, Jurisdiction, LocationId, ReasonText, RequestId, UserId};
use crate::placement::{Placement, Revision};
use crate::reason::ReasonCode;

/// The part of a write the client chose; a retry with the same request id must repeat it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteBody {
    /// Create or update a user's placement. With `expected_mod_revision`, only if the placement's
    /// current `mod_revision` is that value (`Revision(0)` means "must not exist yet").
    Assign {
        user_id: UserId,
        residency: Jurisdiction,
        location_id: LocationId,
        expected_mod_revision: Option<Revision>,
    },
    /// Delete a user's placement, optionally only at an expected `mod_revision`.
    Forget {
        user_id: UserId,
        expected_mod_revision: Option<Revision>,
    },
}

impl WriteBody {
    pub fn user_id(&self) -> &UserId {
        match self {
            WriteBody::Assign { user_id, .. } | WriteBody::Forget { user_id, .. } => user_id,
        }
    }
}

/// One replicated write, as proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub request_id: RequestId,
    pub caller: CallerId,
    pub reason: ReasonText,
    /// Milliseconds since the Unix epoch, read from the leader's clock before proposing.
    pub stamped_at_ms: u64,
    pub body: WriteBody,
}

/// A write the state machine refused. Committed like any other outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// The placement's `mod_revision` was not the expected one (`actual` is 0 if absent).
    RevisionMismatch {
        expected: Revision,
        actual: Revision,
    },
    /// Forget named a user that has no placement.
    UserNotFound,
    /// The request id was first used for a different write.
    RequestIdReused,
}

impl Rejection {
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Rejection::RevisionMismatch { .. } => ReasonCode::RevisionMismatch,
            Rejection::UserNotFound => ReasonCode::UserNotFound,
            Rejection::RequestIdReused => ReasonCode::RequestIdReused,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Rejection::RevisionMismatch { expected, actual } => {
                format!("expected mod_revision {expected}, the placement is at {actual}")
            }
            Rejection::UserNotFound => "the user has no placement".to_string(),
            Rejection::RequestIdReused => {
                "the request id was already used for a different write".to_string()
            }
        }
    }
}

/// What applying a write produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Assigned { placement: Placement, created: bool },
    Forgotten { user_id: UserId },
    Rejected(Rejection),
}

/// The answer for one applied log entry: the revision it was applied at, and for a write its
/// outcome (membership changes and blank entries have none). When a write was a retry, this is
/// the first result, including the revision it was first applied at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    pub revision: Revision,
    pub outcome: Option<Outcome>,
}
