//! The rules for the catalog and policies (invariants I3 and I4): a location's jurisdiction is
//! fixed, a location in use cannot be retired, a retired one stays retired, and a policy that
//! would leave placements stored where it does not allow is refused.

use std::collections::BTreeSet;

use residency_types::{
    Jurisdiction, Labels, Location, LocationId, LocationState, Outcome, Policy, Rejection,
};

use crate::apply::{Verdict, WriteContext};
use crate::staged::{Result, Staged};
use crate::{KvRead, keys};

pub fn put_location<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    location_id: &LocationId,
    jurisdiction: Jurisdiction,
    labels: &Labels,
) -> Result<Verdict, V> {
    let (location, created) = match staged.location(location_id)? {
        Some(existing) if existing.state == LocationState::Retired => {
            return Ok(Err(Rejection::LocationRetired {
                location_id: location_id.clone(),
            }));
        }
        Some(existing) if existing.jurisdiction != jurisdiction => {
            return Ok(Err(Rejection::LocationJurisdictionImmutable {
                location_id: location_id.clone(),
                current: existing.jurisdiction,
                requested: jurisdiction,
            }));
        }
        Some(existing) => (
            Location {
                labels: labels.clone(),
                mod_revision: context.revision,
                ..existing
            },
            false,
        ),
        None => (
            Location {
                id: location_id.clone(),
                jurisdiction,
                labels: labels.clone(),
                state: LocationState::Active,
                create_revision: context.revision,
                mod_revision: context.revision,
            },
            true,
        ),
    };
    staged.put(keys::location_key(location_id), &location);
    Ok(Ok(Outcome::LocationWritten { location, created }))
}

pub fn set_location_state<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    location_id: &LocationId,
    state: LocationState,
) -> Result<Verdict, V> {
    let Some(existing) = staged.location(location_id)? else {
        return Ok(Err(Rejection::LocationNotFound {
            location_id: location_id.clone(),
        }));
    };
    if existing.state == LocationState::Retired {
        return Ok(Err(Rejection::LocationRetired {
            location_id: location_id.clone(),
        }));
    }
    if state == LocationState::Retired {
        let placements = staged.counter(&keys::location_count_key(location_id))?;
        if placements > 0 {
            return Ok(Err(Rejection::LocationInUse {
                location_id: location_id.clone(),
                placements,
            }));
        }
    }
    let location = Location {
        state,
        mod_revision: context.revision,
        ..existing
    };
    staged.put(keys::location_key(location_id), &location);
    Ok(Ok(Outcome::LocationWritten {
        location,
        created: false,
    }))
}

/// How many placements of `residency` are stored (or moving) in jurisdictions `storage` does
/// not name, and which jurisdictions those are. Reads one counter per assigned ISO code, a
/// fixed and ordered set, so the answer is the same on every replica.
pub fn breaches<V: KvRead>(
    staged: &Staged<'_, V>,
    residency: Jurisdiction,
    storage: &BTreeSet<Jurisdiction>,
) -> Result<(u64, Vec<Jurisdiction>), V> {
    let mut placements = 0;
    let mut jurisdictions = Vec::new();
    for jurisdiction in Jurisdiction::all().filter(|jurisdiction| !storage.contains(jurisdiction)) {
        let count = staged.counter(&keys::residency_count_key(residency, jurisdiction))?;
        if count > 0 {
            placements += count;
            jurisdictions.push(jurisdiction);
        }
    }
    Ok((placements, jurisdictions))
}

pub fn put_policy<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
    residency: Jurisdiction,
    storage: &BTreeSet<Jurisdiction>,
    access: &BTreeSet<Jurisdiction>,
) -> Result<Verdict, V> {
    let (placements, jurisdictions) = breaches(staged, residency, storage)?;
    if placements > 0 {
        return Ok(Err(Rejection::PolicyBreach {
            residency,
            placements,
            jurisdictions,
        }));
    }
    let created = staged.policy(residency)?.is_none();
    let policy = Policy {
        residency,
        storage: storage.clone(),
        access: access.clone(),
        mod_revision: context.revision,
    };
    staged.put(keys::policy_key(residency), &policy);
    Ok(Ok(Outcome::PolicyWritten { policy, created }))
}
