//! The user record (a placement) and the revision that versions every answer.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{CallerId, Jurisdiction, LocationId, ReasonText, UserId};

/// A cluster-wide counter that rises with every applied write: the Raft log index of the entry
/// that produced a state. Every answer carries the revision it was read at.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a placement stands. Moves (issue "Residency rules") add a `Moving` state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementState {
    Active,
}

impl PlacementState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PlacementState::Active => "active",
        }
    }
}

/// Which jurisdiction a user's data belongs to and which storage location holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub user_id: UserId,
    pub residency: Jurisdiction,
    pub location_id: LocationId,
    pub state: PlacementState,
    /// A fencing token for storage services: starts at 1, raised on every completed move.
    pub epoch: u64,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// Milliseconds since the Unix epoch, stamped by the leader into the command that wrote it.
    pub updated_at_ms: u64,
    pub updated_by: CallerId,
    pub reason: ReasonText,
}
