//! What the leader proposes to the Raft log, and what applying it answers.
//!
//! A `Command` is complete: it carries the time the leader stamped and the caller, so that apply
//! reads nothing but the command and the state. A refused write is an `Outcome::Rejected`, a
//! committed and deterministic result, never an apply error.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::catalog::{Labels, Location, LocationState, Policy};
use crate::ids::{CallerId, Jurisdiction, LocationId, ReasonText, RequestId, UserId};
use crate::placement::{Placement, Revision};
use crate::reason::ReasonCode;

/// One placement to create or update. With `expected_mod_revision`, only if the placement's
/// current `mod_revision` is that value (`Revision(0)` means "must not exist yet").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignItem {
    pub user_id: UserId,
    pub residency: Jurisdiction,
    pub location_id: LocationId,
    pub expected_mod_revision: Option<Revision>,
}

/// The part of a write the client chose; a retry with the same request id must repeat it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteBody {
    /// Create or update a user's placement.
    Assign(AssignItem),
    /// Several placements, all applied or none (each user at most once).
    BatchAssign { items: Vec<AssignItem> },
    /// Delete a user's placement, optionally only at an expected `mod_revision`.
    Forget {
        user_id: UserId,
        expected_mod_revision: Option<Revision>,
    },
    /// Start moving a user's data to `target`, which must satisfy the same rules as an assign.
    BeginMove {
        user_id: UserId,
        target: LocationId,
        expected_mod_revision: Option<Revision>,
    },
    /// Finish a move: the placement flips to the target and its epoch rises, in one step.
    CompleteMove {
        user_id: UserId,
        expected_mod_revision: Option<Revision>,
    },
    /// Give up a move: the placement stays where it was, epoch unchanged.
    AbortMove {
        user_id: UserId,
        expected_mod_revision: Option<Revision>,
    },
    /// Register a location, or update its labels. Its jurisdiction can never change.
    PutLocation {
        location_id: LocationId,
        jurisdiction: Jurisdiction,
        labels: Labels,
    },
    /// Drain, reactivate or retire a location.
    SetLocationState {
        location_id: LocationId,
        state: LocationState,
    },
    /// Create or replace the policy for one residency jurisdiction.
    PutPolicy {
        residency: Jurisdiction,
        storage: BTreeSet<Jurisdiction>,
        access: BTreeSet<Jurisdiction>,
    },
}

/// One replicated write, as proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub request_id: RequestId,
    pub caller: CallerId,
    /// Whether `caller` was authenticated (mutual TLS) or only stated by the client.
    pub caller_authenticated: bool,
    pub reason: ReasonText,
    /// Milliseconds since the Unix epoch, read from the leader's clock before proposing.
    pub stamped_at_ms: u64,
    pub body: WriteBody,
}

/// One refused item of a batch, by its position in the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRejection {
    pub index: u32,
    pub rejection: Rejection,
}

/// A write the state machine refused. Committed like any other outcome; changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// The placement's `mod_revision` was not the expected one (`actual` is 0 if absent).
    RevisionMismatch {
        expected: Revision,
        actual: Revision,
    },
    /// The write names a user that has no placement.
    UserNotFound,
    /// The request id was first used for a different write.
    RequestIdReused,
    /// No policy covers this residency, so nothing may be stored for it.
    NoPolicy {
        residency: Jurisdiction,
    },
    LocationNotFound {
        location_id: LocationId,
    },
    /// The location is draining or retired: it takes no new placements.
    LocationNotActive {
        location_id: LocationId,
        state: LocationState,
    },
    /// The residency's policy does not allow storage in the location's jurisdiction (I1).
    StorageJurisdictionNotAllowed {
        residency: Jurisdiction,
        location_jurisdiction: Jurisdiction,
    },
    /// An assign tried to change a user's residency; forget the user and assign anew instead.
    ResidencyChangeRefused {
        current: Jurisdiction,
        requested: Jurisdiction,
    },
    /// The user's data is being moved: complete or abort the move first.
    UserMoving,
    /// Complete or abort named a user that is not moving.
    UserNotMoving,
    /// A move to the location the data is already in.
    MoveTargetIsCurrent,
    /// A location's jurisdiction is fixed at registration.
    LocationJurisdictionImmutable {
        location_id: LocationId,
        current: Jurisdiction,
        requested: Jurisdiction,
    },
    /// The location is retired: final.
    LocationRetired {
        location_id: LocationId,
    },
    /// The location still holds (or is the target of) placements.
    LocationInUse {
        location_id: LocationId,
        placements: u64,
    },
    /// The policy would leave existing placements stored where it does not allow.
    PolicyBreach {
        residency: Jurisdiction,
        placements: u64,
        jurisdictions: Vec<Jurisdiction>,
    },
    /// A batch was refused as a whole; these items were the reasons.
    BatchRefused {
        items: Vec<ItemRejection>,
    },
}

fn list(jurisdictions: &[Jurisdiction]) -> String {
    jurisdictions
        .iter()
        .map(Jurisdiction::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

impl Rejection {
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Rejection::RevisionMismatch { .. } => ReasonCode::RevisionMismatch,
            Rejection::UserNotFound => ReasonCode::UserNotFound,
            Rejection::RequestIdReused => ReasonCode::RequestIdReused,
            Rejection::NoPolicy { .. } => ReasonCode::NoPolicy,
            Rejection::LocationNotFound { .. } => ReasonCode::LocationNotFound,
            Rejection::LocationNotActive { .. } => ReasonCode::LocationNotActive,
            Rejection::StorageJurisdictionNotAllowed { .. } => {
                ReasonCode::StorageJurisdictionNotAllowed
            }
            Rejection::ResidencyChangeRefused { .. } => ReasonCode::ResidencyChangeRefused,
            Rejection::UserMoving => ReasonCode::UserMoving,
            Rejection::UserNotMoving => ReasonCode::UserNotMoving,
            Rejection::MoveTargetIsCurrent => ReasonCode::MoveTargetIsCurrent,
            Rejection::LocationJurisdictionImmutable { .. } => {
                ReasonCode::LocationJurisdictionImmutable
            }
            Rejection::LocationRetired { .. } => ReasonCode::LocationRetired,
            Rejection::LocationInUse { .. } => ReasonCode::LocationInUse,
            Rejection::PolicyBreach { .. } => ReasonCode::PolicyBreach,
            Rejection::BatchRefused { .. } => ReasonCode::BatchRefused,
        }
    }

    /// Names the rule and the values involved; never a user id (messages may reach logs).
    pub fn message(&self) -> String {
        match self {
            Rejection::RevisionMismatch { expected, actual } => {
                format!("expected mod_revision {expected}, the placement is at {actual}")
            }
            Rejection::UserNotFound => "the user has no placement".to_string(),
            Rejection::RequestIdReused => {
                "the request id was already used for a different write".to_string()
            }
            Rejection::NoPolicy { residency } => {
                format!("no policy covers residency {residency}: nothing may be stored for it")
            }
            Rejection::LocationNotFound { location_id } => {
                format!("location {location_id} is not registered")
            }
            Rejection::LocationNotActive { location_id, state } => {
                format!(
                    "location {location_id} is {}: it takes no new placements",
                    state.as_str()
                )
            }
            Rejection::StorageJurisdictionNotAllowed {
                residency,
                location_jurisdiction,
            } => format!(
                "the policy for residency {residency} does not allow storage in {location_jurisdiction}"
            ),
            Rejection::ResidencyChangeRefused { current, requested } => format!(
                "the user's residency is {current}, not {requested}; a residency is not changed by assign (forget, then assign)"
            ),
            Rejection::UserMoving => {
                "the user's data is being moved: complete or abort the move first".to_string()
            }
            Rejection::UserNotMoving => "the user's data is not being moved".to_string(),
            Rejection::MoveTargetIsCurrent => {
                "the move target is the location the data is already in".to_string()
            }
            Rejection::LocationJurisdictionImmutable {
                location_id,
                current,
                requested,
            } => format!(
                "location {location_id} is registered in {current}; its jurisdiction cannot become {requested}"
            ),
            Rejection::LocationRetired { location_id } => {
                format!("location {location_id} is retired, which is final")
            }
            Rejection::LocationInUse {
                location_id,
                placements,
            } => {
                format!("location {location_id} still holds or awaits {placements} placements")
            }
            Rejection::PolicyBreach {
                residency,
                placements,
                jurisdictions,
            } => format!(
                "the policy for residency {residency} would leave {placements} placements stored in {}, which it does not allow",
                list(jurisdictions)
            ),
            Rejection::BatchRefused { items } => {
                let first = items.first().map(|item| {
                    format!(
                        "item {}: {} ({})",
                        item.index,
                        item.rejection.reason_code(),
                        item.rejection.message()
                    )
                });
                format!(
                    "{} of the batch's items were refused, so none applied; first {}",
                    items.len(),
                    first.unwrap_or_default()
                )
            }
        }
    }
}

/// One applied item of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedItem {
    pub placement: Placement,
    pub created: bool,
}

/// What applying a write produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Assigned {
        placement: Placement,
        created: bool,
    },
    BatchAssigned {
        items: Vec<AssignedItem>,
    },
    Forgotten {
        user_id: UserId,
    },
    /// A move began, completed or was aborted; the placement as it now stands.
    Moved {
        placement: Placement,
    },
    LocationWritten {
        location: Location,
        created: bool,
    },
    PolicyWritten {
        policy: Policy,
        created: bool,
    },
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

/// The writes one log entry carries, applied in order, each deciding on the state its
/// predecessors in the entry left and each answered on its own: one refused write does not
/// touch its neighbours (a `BatchAssign` among them stays all-or-nothing within itself). They
/// share the entry's revision, as the items of a batch do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub commands: Vec<Command>,
    /// Set by the node that proposes the entry, for itself alone: never written to the log or
    /// sent to a peer, so an entry read back or received has none.
    #[serde(skip)]
    pub answer_tag: AnswerTag,
}

impl Proposal {
    /// A proposal of `commands`, with no answer tag.
    pub fn new(commands: Vec<Command>) -> Proposal {
        Proposal {
            commands,
            answer_tag: AnswerTag::default(),
        }
    }
}

/// Which of its own proposals the leader's apply should answer as soon as it has decided
/// them (the server's proposer waits on it). Not part of what an entry says: every tag equals
/// every other, so two proposals of the same writes are equal whoever tagged them.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerTag(pub Option<u64>);

impl PartialEq for AnswerTag {
    fn eq(&self, _other: &AnswerTag) -> bool {
        true
    }
}

impl Eq for AnswerTag {}

/// What applying one log entry answered: one result per write of its `Proposal`, in the same
/// order; none for an entry that carries no write (blank and membership entries).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalResult {
    pub results: Vec<ApplyResult>,
}
