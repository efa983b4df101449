//! What watchers see: one event per change a write made, in revision order.

use serde::{Deserialize, Serialize};

use crate::catalog::{Location, Policy};
use crate::ids::{LocationId, UserId};
use crate::placement::{Placement, Revision};

/// One change, at `revision`; `index` orders the changes of one write (a batch makes several).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub revision: Revision,
    pub index: u32,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A placement as a write left it: assigned, moved, or a move begun or aborted.
    Placed(Placement),
    /// A placement deleted, and where its data was.
    Forgotten {
        user_id: UserId,
        location_id: LocationId,
    },
    /// A location registered, relabelled, drained, reactivated or retired.
    Location(Location),
    /// A policy created or replaced.
    Policy(Policy),
}

impl Event {
    /// The user the event is about, if it is about one.
    pub fn user_id(&self) -> Option<&UserId> {
        match &self.change {
            Change::Placed(placement) => Some(&placement.user_id),
            Change::Forgotten { user_id, .. } => Some(user_id),
            Change::Location(_) | Change::Policy(_) => None,
        }
    }

    /// Whether the event concerns `location_id`: a placement there or moving there, its
    /// deletion from there, or the location itself.
    pub fn concerns_location(&self, location_id: &LocationId) -> bool {
        match &self.change {
            Change::Placed(placement) => {
                &placement.location_id == location_id
                    || placement.state.move_target() == Some(location_id)
            }
            Change::Forgotten {
                location_id: at, ..
            } => at == location_id,
            Change::Location(location) => &location.id == location_id,
            Change::Policy(_) => false,
        }
    }
}
