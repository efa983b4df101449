//! The read path of the core: placements, the access decision, the catalog and policy dry runs.

use std::collections::{BTreeMap, BTreeSet};

use residency_types::limits::{POLICY_DRY_RUN_SAMPLE_MAX, WATCH_HISTORY_REVISIONS};
use residency_types::{
    AccessOperation, Decision, DenyReason, Event, Jurisdiction, Location, LocationId,
    LocationState, Placement, PlacementState, Policy, Revision, UserId,
};

use crate::staged::Staged;
use crate::{CoreError, KvRead, KvScan, catalog_rules, codec, keys};

/// Placements a dry run may read while looking for sample placements in breach, at most.
const DRY_RUN_SCANNED_PLACEMENTS_MAX: usize = 100_000;
/// Keys read per scan call.
const SCAN_BATCH_KEYS: usize = 1_000;

pub fn lookup<V: KvRead>(
    view: &V,
    user_id: &UserId,
) -> Result<Option<Placement>, CoreError<V::Error>> {
    let Some(bytes) = view
        .get(&keys::placement_key(user_id))
        .map_err(CoreError::Read)?
    else {
        return Ok(None);
    };
    let placement: Placement = codec::decode(&bytes)?;
    assert_eq!(
        &placement.user_id, user_id,
        "placement stored under another user's key"
    );
    Ok(Some(placement))
}

/// The newest revision whose events watchers can no longer get, in a state at `applied` whose
/// `history_floor` is `floor`: past the revision bound, or dropped by the event and byte
/// bounds of the history.
pub fn compacted_revision(applied: Revision, floor: Revision) -> Revision {
    Revision(applied.0.saturating_sub(WATCH_HISTORY_REVISIONS)).max(floor)
}

/// The newest revision whose events the history's event and byte bounds dropped (0 if none).
pub fn history_floor<V: KvRead>(view: &V) -> Result<Revision, CoreError<V::Error>> {
    let window: Option<crate::apply::EventWindow> =
        Staged::new(view).read(keys::EVENT_WINDOW_KEY)?;
    Ok(Revision(
        window.map_or(0, |window| window.oldest.0.saturating_sub(1)),
    ))
}

/// Where a page of events ended: the (revision, index) of its last event.
pub type EventCursor = (Revision, u32);

/// Up to `limit` events from `from` on, after `after` if given (to resume a page), in revision
/// then index order. Events are kept per entry, in chunks (`w/`); a state from before that keeps
/// one key per event (`x/`) for its older revisions, all below the first chunked one.
pub fn events<V: KvScan>(
    view: &V,
    from: Revision,
    after: Option<EventCursor>,
    limit: usize,
) -> Result<Vec<Event>, CoreError<V::Error>> {
    let after_event =
        |event: &Event| after.is_none_or(|cursor| (event.revision, event.index) > cursor);
    let start = match after {
        Some((revision, _)) if revision >= from => revision,
        _ => from,
    };
    let mut page = Vec::new();
    // Before per-entry chunks: one key per event. No event key equals the 10-byte start key.
    let legacy_start = match after {
        Some((revision, index)) if revision >= from => keys::event_key(revision, index),
        _ => keys::event_start_key(from),
    };
    let pairs = view
        .scan_prefix(keys::EVENT_PREFIX, Some(&legacy_start), limit)
        .map_err(CoreError::Read)?;
    for (_, value) in pairs {
        page.push(codec::decode::<Event>(&value)?);
    }
    // Per entry, in chunks: the chunk that holds the cursor is read again and skipped to it.
    let mut cursor = Some(keys::event_chunk_start_key(start));
    while page.len() < limit {
        let Some(after_key) = cursor.take() else {
            break;
        };
        let pairs = view
            .scan_prefix(keys::EVENT_CHUNK_PREFIX, Some(&after_key), SCAN_BATCH_KEYS)
            .map_err(CoreError::Read)?;
        let full = pairs.len() == SCAN_BATCH_KEYS;
        for (key, value) in pairs {
            let chunk: crate::apply::EventChunk = codec::decode(&value)?;
            page.extend(
                chunk
                    .events
                    .into_iter()
                    .filter(|event| after_event(event))
                    .take(limit - page.len()),
            );
            if page.len() == limit {
                break;
            }
            cursor = Some(key);
        }
        if !full {
            break;
        }
    }
    Ok(page)
}

/// Whether node `node_id` has ever been a member of this cluster.
pub fn was_member<V: KvRead>(view: &V, node_id: u64) -> Result<bool, CoreError<V::Error>> {
    Ok(view
        .get(&keys::former_member_key(node_id))
        .map_err(CoreError::Read)?
        .is_some())
}

/// How many placements exist.
pub fn placements_count<V: KvRead>(view: &V) -> Result<u64, CoreError<V::Error>> {
    Staged::new(view).counter(keys::PLACEMENT_COUNT_KEY)
}

pub fn location<V: KvRead>(
    view: &V,
    location_id: &LocationId,
) -> Result<Option<Location>, CoreError<V::Error>> {
    Staged::new(view).location(location_id)
}

pub fn policy<V: KvRead>(
    view: &V,
    residency: Jurisdiction,
) -> Result<Option<Policy>, CoreError<V::Error>> {
    Staged::new(view).policy(residency)
}

/// May a caller in `accessor_jurisdiction` perform `operation` on `user_id`'s data? Fails
/// closed: whatever the registry does not know, or finds inconsistent, is a deny.
pub fn check_access<V: KvRead>(
    view: &V,
    user_id: &UserId,
    accessor_jurisdiction: Jurisdiction,
    operation: AccessOperation,
) -> Result<Decision, CoreError<V::Error>> {
    let staged = Staged::new(view);
    let Some(placement) = staged.placement(user_id)? else {
        return Ok(decide(None, None, None, accessor_jurisdiction, operation));
    };
    let policy = staged.policy(placement.residency)?;
    let location = staged.location(&placement.location_id)?;
    Ok(decide(
        Some(PlacementFacts::from(&placement)),
        policy.as_ref(),
        location.as_ref(),
        accessor_jurisdiction,
        operation,
    ))
}

/// What the access rule needs to know of a placement (the client's cache keeps only this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementFacts<'a> {
    pub residency: Jurisdiction,
    pub location_id: &'a LocationId,
    pub move_target: Option<&'a LocationId>,
    pub epoch: u64,
}

impl<'a> From<&'a Placement> for PlacementFacts<'a> {
    fn from(placement: &'a Placement) -> Self {
        PlacementFacts {
            residency: placement.residency,
            location_id: &placement.location_id,
            move_target: placement.state.move_target(),
            epoch: placement.epoch,
        }
    }
}

/// The access rule over values already read: the user's placement, the policy of its
/// residency and the location that holds it (each `None` if missing). The one rule behind both
/// the nodes' `CheckAccess` and the client library's cache, so the two cannot disagree.
pub fn decide(
    placement: Option<PlacementFacts<'_>>,
    policy: Option<&Policy>,
    location: Option<&Location>,
    accessor_jurisdiction: Jurisdiction,
    operation: AccessOperation,
) -> Decision {
    let deny = |reason| Decision::Deny { reason };
    let Some(placement) = placement else {
        return deny(DenyReason::UnknownUser);
    };
    let Some(policy) = policy else {
        return deny(DenyReason::NoPolicy);
    };
    assert_eq!(
        policy.residency, placement.residency,
        "decide() was given another residency's policy"
    );
    if !policy.allows_access_from(accessor_jurisdiction) {
        return deny(DenyReason::AccessorJurisdictionNotAllowed);
    }
    let location = match location {
        Some(location) if location.state != LocationState::Retired => location,
        _ => return deny(DenyReason::LocationUnavailable),
    };
    assert_eq!(
        &location.id, placement.location_id,
        "decide() was given another location than the placement's"
    );
    if !policy.allows_storage_in(location.jurisdiction) {
        return deny(DenyReason::StorageJurisdictionNotAllowed);
    }
    if placement.move_target.is_some() && operation == AccessOperation::Write {
        return deny(DenyReason::UserMoving);
    }
    let move_target = placement.move_target.cloned();
    Decision::Allow {
        location_id: placement.location_id.clone(),
        location_jurisdiction: location.jurisdiction,
        epoch: placement.epoch,
        move_target,
    }
}

/// Up to `limit` values whose keys start with `prefix`, after the key `after` if given.
fn page<V: KvScan, T: serde::de::DeserializeOwned>(
    view: &V,
    prefix: &[u8],
    after: Option<Vec<u8>>,
    limit: usize,
) -> Result<Vec<T>, CoreError<V::Error>> {
    let pairs = view
        .scan_prefix(prefix, after.as_deref(), limit)
        .map_err(CoreError::Read)?;
    pairs
        .iter()
        .map(|(_, value)| Ok(codec::decode(value)?))
        .collect()
}

/// Locations in id order, after `after` if given.
pub fn list_locations<V: KvScan>(
    view: &V,
    after: Option<&LocationId>,
    limit: usize,
) -> Result<Vec<Location>, CoreError<V::Error>> {
    page(
        view,
        keys::LOCATION_PREFIX,
        after.map(keys::location_key),
        limit,
    )
}

/// Policies in residency order.
pub fn list_policies<V: KvScan>(
    view: &V,
    limit: usize,
) -> Result<Vec<Policy>, CoreError<V::Error>> {
    page(view, keys::POLICY_PREFIX, None, limit)
}

/// What a policy change would do to existing placements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    /// Placements (moves under way included) the new policy would leave in breach.
    pub placements_in_breach: u64,
    /// The storage jurisdictions they are in.
    pub jurisdictions: Vec<Jurisdiction>,
    /// Up to `POLICY_DRY_RUN_SAMPLE_MAX` of those users, in user id order.
    pub sample: Vec<UserId>,
    /// Whether the sample search stopped at its bound (`DRY_RUN_SCANNED_PLACEMENTS_MAX`
    /// placements read) before looking everywhere.
    pub sample_truncated: bool,
}

/// The effect of setting `storage` as the policy for `residency`, without setting it.
pub fn dry_run_policy<V: KvScan>(
    view: &V,
    residency: Jurisdiction,
    storage: &BTreeSet<Jurisdiction>,
) -> Result<DryRun, CoreError<V::Error>> {
    let (placements_in_breach, jurisdictions) =
        catalog_rules::breaches(&Staged::new(view), residency, storage)?;
    let mut sample = Vec::new();
    let mut truncated = false;
    if placements_in_breach > 0 {
        // The jurisdiction of each location met, read once per location.
        let mut location_jurisdictions: BTreeMap<LocationId, Option<Jurisdiction>> =
            BTreeMap::new();
        let mut in_breach_at = |location_id: &LocationId| -> Result<bool, CoreError<V::Error>> {
            if !location_jurisdictions.contains_key(location_id) {
                let found = location(view, location_id)?.map(|location| location.jurisdiction);
                location_jurisdictions.insert(location_id.clone(), found);
            }
            Ok(location_jurisdictions[location_id]
                .is_some_and(|jurisdiction| jurisdictions.contains(&jurisdiction)))
        };
        let mut scanned = 0;
        let mut after: Option<Vec<u8>> = None;
        'placements: loop {
            let pairs = view
                .scan_prefix(keys::PLACEMENT_PREFIX, after.as_deref(), SCAN_BATCH_KEYS)
                .map_err(CoreError::Read)?;
            let Some((last_key, _)) = pairs.last() else {
                break;
            };
            after = Some(last_key.clone());
            for (_, value) in &pairs {
                if scanned == DRY_RUN_SCANNED_PLACEMENTS_MAX {
                    truncated = true;
                    break 'placements;
                }
                scanned += 1;
                let placement: Placement = codec::decode(value)?;
                if placement.residency != residency {
                    continue;
                }
                // A moving placement counts where it is and where it is going.
                let in_breach = in_breach_at(&placement.location_id)?
                    || match &placement.state {
                        PlacementState::Moving { target } => in_breach_at(target)?,
                        PlacementState::Active => false,
                    };
                if in_breach {
                    sample.push(placement.user_id);
                    if sample.len() == POLICY_DRY_RUN_SAMPLE_MAX {
                        break 'placements;
                    }
                }
            }
        }
    }
    Ok(DryRun {
        placements_in_breach,
        jurisdictions,
        sample,
        sample_truncated: truncated,
    })
}
