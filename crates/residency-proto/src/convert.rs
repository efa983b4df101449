//! Conversions between generated messages and domain types. Incoming messages are validated
//! here, field by field, into domain types; a failure names the field and its reason code.

use std::collections::BTreeSet;

use residency_types::{
    AccessOperation, AssignItem, CallerId, Change, Consistency, Decision, DenyReason, Event,
    Jurisdiction, Labels, Location, LocationId, LocationState, Placement, PlacementState, Policy,
    ReasonCode, ReasonText, RequestId, Revision, UserId, ValidationError,
};

use crate::pb;

/// The caller recorded when a request names none.
pub const ANONYMOUS_CALLER: &str = "anonymous";

impl From<&Placement> for pb::Placement {
    fn from(placement: &Placement) -> Self {
        let state = match placement.state {
            PlacementState::Active => pb::PlacementState::Active,
            PlacementState::Moving { .. } => pb::PlacementState::Moving,
        };
        pb::Placement {
            user_id: placement.user_id.to_string(),
            residency: placement.residency.to_string(),
            location_id: placement.location_id.to_string(),
            state: state as i32,
            epoch: placement.epoch,
            create_revision: placement.create_revision.0,
            mod_revision: placement.mod_revision.0,
            updated_at_ms: placement.updated_at_ms,
            updated_by: placement.updated_by.to_string(),
            reason: placement.reason.as_str().to_string(),
            move_target_location_id: placement
                .state
                .move_target()
                .map(ToString::to_string)
                .unwrap_or_default(),
            updated_by_authenticated: placement.updated_by_authenticated,
        }
    }
}

impl TryFrom<pb::Placement> for Placement {
    type Error = ValidationError;

    fn try_from(placement: pb::Placement) -> Result<Self, ValidationError> {
        let state = match pb::PlacementState::try_from(placement.state) {
            Ok(pb::PlacementState::Active) => PlacementState::Active,
            Ok(pb::PlacementState::Moving) => PlacementState::Moving {
                target: LocationId::parse(placement.move_target_location_id)?,
            },
            _ => {
                return Err(ValidationError::new(
                    ReasonCode::InvalidArgument,
                    "state",
                    format!("unknown placement state {}", placement.state),
                ));
            }
        };
        Ok(Placement {
            user_id: UserId::parse(placement.user_id)?,
            residency: Jurisdiction::parse(&placement.residency)?,
            location_id: LocationId::parse(placement.location_id)?,
            state,
            epoch: placement.epoch,
            create_revision: Revision(placement.create_revision),
            mod_revision: Revision(placement.mod_revision),
            updated_at_ms: placement.updated_at_ms,
            updated_by: CallerId::parse(placement.updated_by)?,
            updated_by_authenticated: placement.updated_by_authenticated,
            reason: ReasonText::parse(placement.reason)?,
        })
    }
}

fn location_state_to_pb(state: LocationState) -> pb::LocationState {
    match state {
        LocationState::Active => pb::LocationState::Active,
        LocationState::Draining => pb::LocationState::Draining,
        LocationState::Retired => pb::LocationState::Retired,
    }
}

pub fn location_state_from_pb(state: i32) -> Result<LocationState, ValidationError> {
    match pb::LocationState::try_from(state) {
        Ok(pb::LocationState::Active) => Ok(LocationState::Active),
        Ok(pb::LocationState::Draining) => Ok(LocationState::Draining),
        Ok(pb::LocationState::Retired) => Ok(LocationState::Retired),
        _ => Err(ValidationError::new(
            ReasonCode::InvalidArgument,
            "state",
            format!("{state} is not ACTIVE, DRAINING or RETIRED"),
        )),
    }
}

impl From<&Location> for pb::Location {
    fn from(location: &Location) -> Self {
        pb::Location {
            location_id: location.id.to_string(),
            jurisdiction: location.jurisdiction.to_string(),
            labels: Some(pb::Labels {
                provider: location.labels.provider.clone(),
                region: location.labels.region.clone(),
                zone: location.labels.zone.clone(),
            }),
            state: location_state_to_pb(location.state) as i32,
            create_revision: location.create_revision.0,
            mod_revision: location.mod_revision.0,
        }
    }
}

impl TryFrom<pb::Location> for Location {
    type Error = ValidationError;

    fn try_from(location: pb::Location) -> Result<Self, ValidationError> {
        Ok(Location {
            id: LocationId::parse(location.location_id)?,
            jurisdiction: Jurisdiction::parse(&location.jurisdiction)?,
            labels: labels_from_pb(location.labels)?,
            state: location_state_from_pb(location.state)?,
            create_revision: Revision(location.create_revision),
            mod_revision: Revision(location.mod_revision),
        })
    }
}

pub fn labels_from_pb(labels: Option<pb::Labels>) -> Result<Labels, ValidationError> {
    let labels = labels.unwrap_or_default();
    Labels::parse(&labels.provider, &labels.region, &labels.zone)
}

fn codes(jurisdictions: &BTreeSet<Jurisdiction>) -> Vec<String> {
    jurisdictions.iter().map(ToString::to_string).collect()
}

/// A set of jurisdictions from the wire; duplicates are harmless, unknown codes are refused.
pub fn jurisdictions_from_pb(
    field: &'static str,
    codes: &[String],
) -> Result<BTreeSet<Jurisdiction>, ValidationError> {
    codes
        .iter()
        .map(|code| {
            Jurisdiction::parse(code)
                .map_err(|error| ValidationError::new(error.code, field, error.message))
        })
        .collect()
}

impl From<&Policy> for pb::Policy {
    fn from(policy: &Policy) -> Self {
        pb::Policy {
            residency: policy.residency.to_string(),
            storage: codes(&policy.storage),
            access: codes(&policy.access),
            mod_revision: policy.mod_revision.0,
        }
    }
}

impl TryFrom<pb::Policy> for Policy {
    type Error = ValidationError;

    fn try_from(policy: pb::Policy) -> Result<Self, ValidationError> {
        Ok(Policy {
            residency: Jurisdiction::parse(&policy.residency)?,
            storage: jurisdictions_from_pb("storage", &policy.storage)?,
            access: jurisdictions_from_pb("access", &policy.access)?,
            mod_revision: Revision(policy.mod_revision),
        })
    }
}

pub fn assign_item_from_pb(item: pb::AssignItem) -> Result<AssignItem, ValidationError> {
    Ok(AssignItem {
        user_id: UserId::parse(item.user_id)?,
        residency: Jurisdiction::parse(&item.residency)?,
        location_id: LocationId::parse(item.location_id)?,
        expected_mod_revision: item.expected_mod_revision.map(Revision),
    })
}

pub fn access_operation_from_pb(operation: i32) -> Result<AccessOperation, ValidationError> {
    match pb::AccessOperation::try_from(operation) {
        Ok(pb::AccessOperation::Read) => Ok(AccessOperation::Read),
        Ok(pb::AccessOperation::Write) => Ok(AccessOperation::Write),
        _ => Err(ValidationError::new(
            ReasonCode::InvalidArgument,
            "operation",
            "must be ACCESS_OPERATION_READ or ACCESS_OPERATION_WRITE",
        )),
    }
}

pub fn access_operation_to_pb(operation: AccessOperation) -> pb::AccessOperation {
    match operation {
        AccessOperation::Read => pb::AccessOperation::Read,
        AccessOperation::Write => pb::AccessOperation::Write,
    }
}

/// The decision fields of a CheckAccess answer (the header is the server's to fill).
pub fn decision_to_pb(decision: &Decision) -> pb::CheckAccessResponse {
    match decision {
        Decision::Allow {
            location_id,
            location_jurisdiction,
            epoch,
            move_target,
        } => pb::CheckAccessResponse {
            header: None,
            allowed: true,
            deny_reason: String::new(),
            location_id: location_id.to_string(),
            location_jurisdiction: location_jurisdiction.to_string(),
            epoch: *epoch,
            move_target_location_id: move_target
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        },
        Decision::Deny { reason } => pb::CheckAccessResponse {
            header: None,
            allowed: false,
            deny_reason: reason.as_str().to_string(),
            location_id: String::new(),
            location_jurisdiction: String::new(),
            epoch: 0,
            move_target_location_id: String::new(),
        },
    }
}

/// Reads a CheckAccess answer, failing closed: anything not clearly an allow is a deny.
pub fn decision_from_pb(response: &pb::CheckAccessResponse) -> Decision {
    let allow = || -> Option<Decision> {
        if !response.allowed {
            return None;
        }
        let move_target = match response.move_target_location_id.as_str() {
            "" => None,
            target => Some(LocationId::parse(target).ok()?),
        };
        Some(Decision::Allow {
            location_id: LocationId::parse(response.location_id.clone()).ok()?,
            location_jurisdiction: Jurisdiction::parse(&response.location_jurisdiction).ok()?,
            epoch: response.epoch,
            move_target,
        })
    };
    allow().unwrap_or_else(|| Decision::Deny {
        reason: DenyReason::parse(&response.deny_reason).unwrap_or(DenyReason::UnknownUser),
    })
}

/// A missing `consistency` means linearizable, the safe default.
pub fn consistency_from_pb(
    consistency: Option<pb::Consistency>,
) -> Result<Consistency, ValidationError> {
    let Some(consistency) = consistency else {
        return Ok(Consistency::Linearizable);
    };
    let invalid = |message: String| {
        Err(ValidationError::new(
            ReasonCode::InvalidConsistency,
            "consistency",
            message,
        ))
    };
    match pb::ConsistencyMode::try_from(consistency.mode) {
        Ok(pb::ConsistencyMode::Unspecified | pb::ConsistencyMode::Linearizable) => {
            if consistency.at_least_revision != 0 {
                return invalid("at_least_revision is only for CONSISTENCY_MODE_AT_LEAST".into());
            }
            Ok(Consistency::Linearizable)
        }
        Ok(pb::ConsistencyMode::AtLeast) => Ok(Consistency::AtLeast(Revision(
            consistency.at_least_revision,
        ))),
        Ok(pb::ConsistencyMode::Stale) => {
            if consistency.at_least_revision != 0 {
                return invalid("at_least_revision is only for CONSISTENCY_MODE_AT_LEAST".into());
            }
            Ok(Consistency::Stale)
        }
        Err(_) => invalid(format!("unknown consistency mode {}", consistency.mode)),
    }
}

pub fn consistency_to_pb(consistency: Consistency) -> pb::Consistency {
    match consistency {
        Consistency::Linearizable => pb::Consistency {
            mode: pb::ConsistencyMode::Linearizable as i32,
            at_least_revision: 0,
        },
        Consistency::AtLeast(revision) => pb::Consistency {
            mode: pb::ConsistencyMode::AtLeast as i32,
            at_least_revision: revision.0,
        },
        Consistency::Stale => pb::Consistency {
            mode: pb::ConsistencyMode::Stale as i32,
            at_least_revision: 0,
        },
    }
}

pub fn consistency_mode(consistency: Consistency) -> pb::ConsistencyMode {
    match consistency {
        Consistency::Linearizable => pb::ConsistencyMode::Linearizable,
        Consistency::AtLeast(_) => pb::ConsistencyMode::AtLeast,
        Consistency::Stale => pb::ConsistencyMode::Stale,
    }
}

/// The validated parts of a write's context.
#[derive(Debug, Clone)]
pub struct WriteContext {
    pub request_id: RequestId,
    pub caller: CallerId,
    pub reason: ReasonText,
}

pub fn write_context_from_pb(
    context: Option<pb::WriteContext>,
) -> Result<WriteContext, ValidationError> {
    let context = context.ok_or_else(|| {
        ValidationError::new(
            ReasonCode::InvalidRequestId,
            "context",
            "a write needs a context with a request_id",
        )
    })?;
    let caller = if context.caller.is_empty() {
        ANONYMOUS_CALLER.to_string()
    } else {
        context.caller
    };
    Ok(WriteContext {
        request_id: RequestId::parse(context.request_id)?,
        caller: CallerId::parse(caller)?,
        reason: ReasonText::parse(context.reason)?,
    })
}

impl From<&Event> for pb::WatchEvent {
    fn from(event: &Event) -> Self {
        let change = match &event.change {
            Change::Placed(placement) => pb::watch_event::Change::Placed(placement.into()),
            Change::Forgotten {
                user_id,
                location_id,
            } => pb::watch_event::Change::Forgotten(pb::Forgotten {
                user_id: user_id.to_string(),
                location_id: location_id.to_string(),
            }),
            Change::Location(location) => pb::watch_event::Change::Location(location.into()),
            Change::Policy(policy) => pb::watch_event::Change::Policy(policy.into()),
        };
        pb::WatchEvent {
            revision: event.revision.0,
            index: event.index,
            change: Some(change),
        }
    }
}

impl TryFrom<pb::WatchEvent> for Event {
    type Error = ValidationError;

    fn try_from(event: pb::WatchEvent) -> Result<Self, ValidationError> {
        let change = match event.change {
            Some(pb::watch_event::Change::Placed(placement)) => {
                Change::Placed(Placement::try_from(placement)?)
            }
            Some(pb::watch_event::Change::Forgotten(forgotten)) => Change::Forgotten {
                user_id: UserId::parse(forgotten.user_id)?,
                location_id: LocationId::parse(forgotten.location_id)?,
            },
            Some(pb::watch_event::Change::Location(location)) => {
                Change::Location(Location::try_from(location)?)
            }
            Some(pb::watch_event::Change::Policy(policy)) => {
                Change::Policy(Policy::try_from(policy)?)
            }
            None => {
                return Err(ValidationError::new(
                    ReasonCode::InvalidArgument,
                    "change",
                    "an event without a change",
                ));
            }
        };
        Ok(Event {
            revision: Revision(event.revision),
            index: event.index,
            change,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_defaults_to_linearizable_and_rejects_unknown_modes() {
        assert_eq!(consistency_from_pb(None), Ok(Consistency::Linearizable));
        let at_least = pb::Consistency {
            mode: pb::ConsistencyMode::AtLeast as i32,
            at_least_revision: 9,
        };
        assert_eq!(
            consistency_from_pb(Some(at_least)),
            Ok(Consistency::AtLeast(Revision(9)))
        );
        let unknown = pb::Consistency {
            mode: 42,
            at_least_revision: 0,
        };
        let refused = consistency_from_pb(Some(unknown)).expect_err("unknown mode refused");
        assert_eq!(refused.code, ReasonCode::InvalidConsistency);
        let stray = pb::Consistency {
            mode: pb::ConsistencyMode::Stale as i32,
            at_least_revision: 3,
        };
        assert!(consistency_from_pb(Some(stray)).is_err());
    }

    #[test]
    fn a_write_without_request_id_is_refused() {
        let refused = write_context_from_pb(None).expect_err("no context");
        assert_eq!(refused.code, ReasonCode::InvalidRequestId);
        let empty = pb::WriteContext {
            request_id: String::new(),
            caller: String::new(),
            reason: String::new(),
        };
        assert_eq!(
            write_context_from_pb(Some(empty))
                .expect_err("empty id")
                .code,
            ReasonCode::InvalidRequestId
        );
    }

    #[test]
    fn placements_round_trip_through_the_wire_format() {
        let placement = Placement {
            user_id: UserId::parse("u-1").expect("valid"),
            residency: Jurisdiction::US,
            location_id: LocationId::parse("us-east-1/pg-1").expect("valid"),
            state: PlacementState::Active,
            epoch: 1,
            create_revision: Revision(3),
            mod_revision: Revision(8),
            updated_at_ms: 12,
            updated_by: CallerId::parse("ops").expect("valid"),
            updated_by_authenticated: false,
            reason: ReasonText::parse("move").expect("valid"),
        };
        let wire = pb::Placement::from(&placement);
        assert_eq!(Placement::try_from(wire), Ok(placement));
    }
}
