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

/// Where a placement stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementState {
    /// The data is at `location_id`.
    Active,
    /// The data is being copied from `location_id` to `target`. Reads are served from the
    /// source; writes are refused until the move completes (the epoch then rises) or aborts.
    Moving { target: LocationId },
}

impl PlacementState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PlacementState::Active => "active",
            PlacementState::Moving { .. } => "moving",
        }
    }

    pub fn move_target(&self) -> Option<&LocationId> {
        match self {
            PlacementState::Active => None,
            PlacementState::Moving { target } => Some(target),
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
    /// A fencing token for storage services: starts at 1, raised whenever the data's location
    /// changes (a completed move, or an assign to another location).
    pub epoch: u64,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// Milliseconds since the Unix epoch, stamped by the leader into the command that wrote it.
    pub updated_at_ms: u64,
    pub updated_by: CallerId,
    /// False while callers state their own identity (before mutual TLS): `updated_by` is then
    /// a claim, not a proof.
    pub updated_by_authenticated: bool,
    pub reason: ReasonText,
}
