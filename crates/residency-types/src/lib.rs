//! The registry's vocabulary: validated identifiers, placements, write commands, their outcomes,
//! read consistency and the stable reason codes every error carries.
//!
//! Everything here is plain data. Constructors validate, so a value of these types is always
//! well formed; nothing here does IO, is async, or reads a clock.
//!
//! - [`ids`]: `UserId`, `LocationId`, `RequestId`, `Jurisdiction`, `CallerId`, `ReasonText`.
//! - [`placement`]: the user record and the `Revision` it is versioned by.
//! - [`catalog`]: storage locations and residency policies.
//! - [`access`]: the access check's operation and decision.
//! - [`command`]: what the leader proposes (`Command`) and what apply answers (`Outcome`).
//! - [`identity`]: SPIFFE-style identities from certificates, roles and the role table.
//! - [`consistency`]: how fresh a read must be.
//! - [`reason`]: the stable machine-readable reason codes and the validation error.
//! - [`limits`]: every size limit of the domain, named.

pub mod access;
pub mod catalog;
pub mod command;
pub mod consistency;
pub mod event;
pub mod identity;
pub mod ids;
pub mod limits;
pub mod placement;
pub mod reason;

pub use access::{AccessOperation, Decision, DecisionAt, DenyReason};
pub use catalog::{Labels, Location, LocationState, Policy};
pub use command::{
    AnswerTag, ApplyResult, AssignItem, Command, Outcome, Proposal, ProposalResult, Rejection,
    WriteBody,
};
pub use consistency::Consistency;
pub use event::{Change, Event};
pub use identity::{Identity, Principal, Role, RoleTable};
pub use ids::{CallerId, Jurisdiction, LocationId, ReasonText, RequestId, UserId};
pub use placement::{Placement, PlacementState, Revision};
pub use reason::{ReasonCode, ValidationError};
