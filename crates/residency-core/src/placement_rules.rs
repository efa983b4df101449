//! The rules for placements: assign, batch assign, forget, and moves (invariants I1, I2).
//!
//! I1: a placement's location exists, is active when placed, and lies in a jurisdiction the
//! policy for the user's residency allows for storage. Every path that puts a user somewhere
//! goes through `placeable`.

use residency_types::command::{AssignedItem, ItemRejection};
use residency_types::{
    AssignItem, Jurisdiction, Location, LocationId, LocationState, Outcome, Placement,
    PlacementState, Rejection, Revision, UserId,
};

use crate::apply::{Verdict, WriteContext};
use crate::staged::{Result, Staged};
use crate::{KvRead, keys};

fn revision_mismatch(expected: Option<Revision>, current: Option<&Placement>) -> Option<Rejection> {
    let expected = expected?;
    let actual = current.map_or(Revision(0), |placement| placement.mod_revision);
    (actual != expected).then_some(Rejection::RevisionMismatch { expected, actual })
}

/// The location, if data of `residency` may be newly placed there (I1).
pub fn placeable<V: KvRead>(
    staged: &Staged<'_, V>,
    residency: Jurisdiction,
    location_id: &LocationId,
) -> Result<std::result::Result<Location, Rejection>, V> {
    let Some(location) = staged.location(location_id)? else {
        return Ok(Err(Rejection::LocationNotFound {
            location_id: location_id.clone(),
        }));
    };
    if location.state != LocationState::Active {
        return Ok(Err(Rejection::LocationNotActive {
            location_id: location_id.clone(),
            state: location.state,
        }));
    }
    Ok(storage_allowed(staged, residency, &location)?.map(|()| location))
}

/// Whether the policy for `residency` allows storage in `location`'s jurisdiction.
fn storage_allowed<V: KvRead>(
    staged: &Staged<'_, V>,
    residency: Jurisdiction,
    location: &Location,
) -> Result<std::result::Result<(), Rejection>, V> {
    let Some(policy) = staged.policy(residency)? else {
        return Ok(Err(Rejection::NoPolicy { residency }));
    };
    if !policy.allows_storage_in(location.jurisdiction) {
        return Ok(Err(Rejection::StorageJurisdictionNotAllowed {
            residency,
            location_jurisdiction: location.jurisdiction,
        }));
    }
    Ok(Ok(()))
}

/// A location a placement refers to; its absence is a broken invariant, reported as a refusal
/// rather than a crash so that one bad record cannot stop every replica.
fn referenced_location<V: KvRead>(
    staged: &Staged<'_, V>,
    location_id: &LocationId,
) -> Result<std::result::Result<Location, Rejection>, V> {
    Ok(staged
        .location(location_id)?
        .ok_or_else(|| Rejection::LocationNotFound {
            location_id: location_id.clone(),
        }))
}

fn stamped(mut placement: Placement, context: WriteContext<'_>) -> Placement {
    placement.mod_revision = context.revision;
    placement.updated_at_ms = context.command.stamped_at_ms;
    placement.updated_by = context.command.caller.clone();
    placement.updated_by_authenticated = context.command.caller_authenticated;
    placement.reason = context.command.reason.clone();
    placement
}

/// Decides one assign on `staged`, staging its changes when it is allowed.
fn assign_one<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    item: &AssignItem,
) -> Result<std::result::Result<AssignedItem, Rejection>, V> {
    let current = staged.placement(&item.user_id)?;
    if let Some(rejection) = revision_mismatch(item.expected_mod_revision, current.as_ref()) {
        return Ok(Err(rejection));
    }
    if let Some(current) = &current {
        if current.state != PlacementState::Active {
            return Ok(Err(Rejection::UserMoving));
        }
        if current.residency != item.residency {
            return Ok(Err(Rejection::ResidencyChangeRefused {
                current: current.residency,
                requested: item.residency,
            }));
        }
    }
    let staying = current
        .as_ref()
        .is_some_and(|current| current.location_id == item.location_id);
    let location = if staying {
        // Not a new placement (a draining location keeps it), but the policy must still allow it.
        let location = match referenced_location(staged, &item.location_id)? {
            Ok(location) => location,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if let Err(rejection) = storage_allowed(staged, item.residency, &location)? {
            return Ok(Err(rejection));
        }
        location
    } else {
        match placeable(staged, item.residency, &item.location_id)? {
            Ok(location) => location,
            Err(rejection) => return Ok(Err(rejection)),
        }
    };
    let placement = match current {
        Some(current) if staying => stamped(current, context),
        Some(current) => {
            let old = match referenced_location(staged, &current.location_id)? {
                Ok(old) => old,
                Err(rejection) => return Ok(Err(rejection)),
            };
            staged.reference(current.residency, &old, false)?;
            staged.reference(item.residency, &location, true)?;
            // The data now belongs elsewhere: storage services holding the old epoch must stop.
            let epoch = current.epoch + 1;
            stamped(
                Placement {
                    location_id: item.location_id.clone(),
                    epoch,
                    ..current
                },
                context,
            )
        }
        None => {
            staged.reference(item.residency, &location, true)?;
            staged.count_placements(1)?;
            let created = Placement {
                user_id: item.user_id.clone(),
                residency: item.residency,
                location_id: item.location_id.clone(),
                state: PlacementState::Active,
                epoch: 1,
                create_revision: context.revision,
                mod_revision: context.revision,
                updated_at_ms: 0,
                updated_by: context.command.caller.clone(),
                updated_by_authenticated: false,
                reason: context.command.reason.clone(),
            };
            let placement = stamped(created, context);
            staged.put(keys::placement_key(&item.user_id), &placement);
            return Ok(Ok(AssignedItem {
                placement,
                created: true,
            }));
        }
    };
    staged.put(keys::placement_key(&item.user_id), &placement);
    Ok(Ok(AssignedItem {
        placement,
        created: false,
    }))
}

pub fn assign<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    item: &AssignItem,
) -> Result<Verdict, V> {
    Ok(assign_one(staged, context, item)?
        .map(|AssignedItem { placement, created }| Outcome::Assigned { placement, created }))
}

/// All items or none. Every item is decided (against the state the earlier ones leave), so a
/// refusal reports every item at fault, not just the first.
pub fn batch_assign<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    items: &[AssignItem],
) -> Result<Verdict, V> {
    // The server refuses a batch that names a user twice before proposing it. Should one reach
    // the log anyway, its items are decided in order like any others: apply stays total.
    let mut assigned = Vec::with_capacity(items.len());
    let mut refused = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match assign_one(staged, context, item)? {
            Ok(done) => assigned.push(done),
            Err(rejection) => refused.push(ItemRejection {
                index: index as u32,
                rejection,
            }),
        }
    }
    if refused.is_empty() {
        Ok(Ok(Outcome::BatchAssigned { items: assigned }))
    } else {
        Ok(Err(Rejection::BatchRefused { items: refused }))
    }
}

pub fn forget<V: KvRead>(
    staged: &mut Staged<'_, V>,
    user_id: &UserId,
    expected: Option<Revision>,
) -> Result<Verdict, V> {
    let current = staged.placement(user_id)?;
    if let Some(rejection) = revision_mismatch(expected, current.as_ref()) {
        return Ok(Err(rejection));
    }
    let Some(current) = current else {
        return Ok(Err(Rejection::UserNotFound));
    };
    if current.state != PlacementState::Active {
        return Ok(Err(Rejection::UserMoving));
    }
    let location = match referenced_location(staged, &current.location_id)? {
        Ok(location) => location,
        Err(rejection) => return Ok(Err(rejection)),
    };
    staged.reference(current.residency, &location, false)?;
    staged.count_placements(-1)?;
    staged.delete(keys::placement_key(user_id));
    Ok(Ok(Outcome::Forgotten {
        user_id: user_id.clone(),
    }))
}

/// The placement a move step acts on, after the checks every step shares.
fn moving_placement<V: KvRead>(
    staged: &Staged<'_, V>,
    user_id: &UserId,
    expected: Option<Revision>,
) -> Result<std::result::Result<Placement, Rejection>, V> {
    let current = staged.placement(user_id)?;
    if let Some(rejection) = revision_mismatch(expected, current.as_ref()) {
        return Ok(Err(rejection));
    }
    Ok(current.ok_or(Rejection::UserNotFound))
}

pub fn begin_move<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    user_id: &UserId,
    target: &LocationId,
    expected: Option<Revision>,
) -> Result<Verdict, V> {
    let current = match moving_placement(staged, user_id, expected)? {
        Ok(current) => current,
        Err(rejection) => return Ok(Err(rejection)),
    };
    if current.state != PlacementState::Active {
        return Ok(Err(Rejection::UserMoving));
    }
    if &current.location_id == target {
        return Ok(Err(Rejection::MoveTargetIsCurrent));
    }
    let location = match placeable(staged, current.residency, target)? {
        Ok(location) => location,
        Err(rejection) => return Ok(Err(rejection)),
    };
    // The target is reserved from now on: it cannot be retired, nor its jurisdiction dropped
    // from the policy, while the move is under way.
    staged.reference(current.residency, &location, true)?;
    let placement = stamped(
        Placement {
            state: PlacementState::Moving {
                target: target.clone(),
            },
            ..current
        },
        context,
    );
    staged.put(keys::placement_key(user_id), &placement);
    Ok(Ok(Outcome::Moved { placement }))
}

/// The placement of a user whose data is moving, and the location it is moving to.
fn move_under_way<V: KvRead>(
    staged: &Staged<'_, V>,
    user_id: &UserId,
    expected: Option<Revision>,
) -> Result<std::result::Result<(Placement, Location), Rejection>, V> {
    let current = match moving_placement(staged, user_id, expected)? {
        Ok(current) => current,
        Err(rejection) => return Ok(Err(rejection)),
    };
    let PlacementState::Moving { target } = &current.state else {
        return Ok(Err(Rejection::UserNotMoving));
    };
    Ok(referenced_location(staged, target)?.map(|location| (current, location)))
}

pub fn complete_move<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    user_id: &UserId,
    expected: Option<Revision>,
) -> Result<Verdict, V> {
    let (current, target_location) = match move_under_way(staged, user_id, expected)? {
        Ok(found) => found,
        Err(rejection) => return Ok(Err(rejection)),
    };
    // The reservation made at begin keeps the target registered and allowed; check it again
    // all the same (I2: the target satisfies I1 when the move completes).
    if let Err(rejection) = storage_allowed(staged, current.residency, &target_location)? {
        return Ok(Err(rejection));
    }
    let source = match referenced_location(staged, &current.location_id)? {
        Ok(location) => location,
        Err(rejection) => return Ok(Err(rejection)),
    };
    staged.reference(current.residency, &source, false)?;
    let epoch = current.epoch + 1;
    let placement = stamped(
        Placement {
            location_id: target_location.id.clone(),
            state: PlacementState::Active,
            epoch,
            ..current
        },
        context,
    );
    staged.put(keys::placement_key(user_id), &placement);
    Ok(Ok(Outcome::Moved { placement }))
}

pub fn abort_move<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    user_id: &UserId,
    expected: Option<Revision>,
) -> Result<Verdict, V> {
    let (current, target_location) = match move_under_way(staged, user_id, expected)? {
        Ok(found) => found,
        Err(rejection) => return Ok(Err(rejection)),
    };
    staged.reference(current.residency, &target_location, false)?;
    let placement = stamped(
        Placement {
            state: PlacementState::Active,
            ..current
        },
        context,
    );
    staged.put(keys::placement_key(user_id), &placement);
    Ok(Ok(Outcome::Moved { placement }))
}
