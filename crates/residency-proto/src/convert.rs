//! Conversions between generated messages and domain types. Incoming messages are validated
//! here, field by field, into domain types; a failure names the field and its reason code.

use residency_types::{
    CallerId, Consistency, Jurisdiction, LocationId, Placement, PlacementState, ReasonCode,
    ReasonText, RequestId, Revision, UserId, ValidationError,
};

use crate::pb;

/// The caller recorded when a request names none.
pub const ANONYMOUS_CALLER: &str = "anonymous";

impl From<&Placement> for pb::Placement {
    fn from(placement: &Placement) -> Self {
        pb::Placement {
            user_id: placement.user_id.to_string(),
            residency: placement.residency.to_string(),
            location_id: placement.location_id.to_string(),
            state: match placement.state {
                PlacementState::Active => pb::PlacementState::Active as i32,
            },
            epoch: placement.epoch,
            create_revision: placement.create_revision.0,
            mod_revision: placement.mod_revision.0,
            updated_at_ms: placement.updated_at_ms,
            updated_by: placement.updated_by.to_string(),
            reason: placement.reason.as_str().to_string(),
        }
    }
}

impl TryFrom<pb::Placement> for Placement {
    type Error = ValidationError;

    fn try_from(placement: pb::Placement) -> Result<Self, ValidationError> {
        let state = match pb::PlacementState::try_from(placement.state) {
            Ok(pb::PlacementState::Active) => PlacementState::Active,
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
            reason: ReasonText::parse(placement.reason)?,
        })
    }
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
            reason: ReasonText::parse("move").expect("valid"),
        };
        let wire = pb::Placement::from(&placement);
        assert_eq!(Placement::try_from(wire), Ok(placement));
    }
}
