//! How fresh a read must be, chosen per request.

use serde::{Deserialize, Serialize};

use crate::placement::Revision;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Confirmed with a quorum through a read index: never stale. The default.
    #[default]
    Linearizable,
    /// Any node, once it has applied at least this revision (a consistency token).
    AtLeast(Revision),
    /// Any node, at whatever it has applied; the answer says how old that may be.
    Stale,
}
