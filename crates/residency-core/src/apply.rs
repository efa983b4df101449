//! The write path: decide one command against the state, deterministically.

use residency_types::command::AssignedItem;
use residency_types::limits::{
    REQUEST_DEDUP_WINDOW_REVISIONS, REQUEST_RECORD_BYTES_MAX, WATCH_HISTORY_REVISIONS,
};
use residency_types::{
    ApplyResult, CallerId, Change, Command, Event, LocationId, Outcome, Placement, PlacementState,
    ReasonText, Rejection, RequestId, Revision, WriteBody,
};
use serde::{Deserialize, Serialize};

use crate::staged::Staged;
use crate::{CoreError, KvRead, catalog_rules, keys, placement_rules};

/// What the registry remembers of an applied request id: the write, and its first result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub body: WriteBody,
    pub result: StoredResult,
}

/// A first result as kept for retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredResult {
    /// Most answers are small: kept whole.
    Whole(ApplyResult),
    /// A batch's answer repeats every placement; kept as only what its body does not say, and
    /// rebuilt exactly on a retry (see `answer`).
    Batch {
        revision: Revision,
        stamped_at_ms: u64,
        caller: CallerId,
        caller_authenticated: bool,
        reason: ReasonText,
        items: Vec<BatchItemResult>,
    },
}

/// What a batch item's placement had that its request did not say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItemResult {
    pub created: bool,
    pub epoch: u64,
    pub create_revision: Revision,
}

impl StoredResult {
    fn of(command: &Command, result: &ApplyResult) -> StoredResult {
        let Some(Outcome::BatchAssigned { items }) = &result.outcome else {
            return StoredResult::Whole(result.clone());
        };
        StoredResult::Batch {
            revision: result.revision,
            stamped_at_ms: command.stamped_at_ms,
            caller: command.caller.clone(),
            caller_authenticated: command.caller_authenticated,
            reason: command.reason.clone(),
            items: items
                .iter()
                .map(|item| BatchItemResult {
                    created: item.created,
                    epoch: item.placement.epoch,
                    create_revision: item.placement.create_revision,
                })
                .collect(),
        }
    }

    fn revision(&self) -> Revision {
        match self {
            StoredResult::Whole(result) => result.revision,
            StoredResult::Batch { revision, .. } => *revision,
        }
    }

    /// The first result, as it was answered.
    fn answer(&self, body: &WriteBody) -> ApplyResult {
        let (
            StoredResult::Batch {
                revision,
                stamped_at_ms,
                caller,
                caller_authenticated,
                reason,
                items,
            },
            WriteBody::BatchAssign { items: requested },
        ) = (self, body)
        else {
            let StoredResult::Whole(result) = self else {
                unreachable!("a batch result is only ever stored for a batch body");
            };
            return result.clone();
        };
        assert_eq!(
            items.len(),
            requested.len(),
            "a batch record does not match its body"
        );
        let items = requested
            .iter()
            .zip(items)
            .map(|(request, kept)| AssignedItem {
                placement: Placement {
                    user_id: request.user_id.clone(),
                    residency: request.residency,
                    location_id: request.location_id.clone(),
                    state: PlacementState::Active,
                    epoch: kept.epoch,
                    create_revision: kept.create_revision,
                    mod_revision: *revision,
                    updated_at_ms: *stamped_at_ms,
                    updated_by: caller.clone(),
                    updated_by_authenticated: *caller_authenticated,
                    reason: reason.clone(),
                },
                created: kept.created,
            })
            .collect();
        ApplyResult {
            revision: *revision,
            outcome: Some(Outcome::BatchAssigned { items }),
        }
    }
}

/// One change to the key space, applied by the store in order and atomically with the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// The answer for one entry and the mutations that make it so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub result: ApplyResult,
    pub mutations: Vec<Mutation>,
}

/// Who wrote, and when: the parts of a command every rule records.
#[derive(Debug, Clone, Copy)]
pub struct WriteContext<'a> {
    pub command: &'a Command,
    pub revision: Revision,
}

/// Applies the log entry at `revision`. `command` is `None` for entries that carry no write
/// (blank and membership entries); they still age the request-id window.
pub fn apply<V: KvRead>(
    view: &V,
    revision: Revision,
    command: Option<&Command>,
) -> Result<Applied, CoreError<V::Error>> {
    let mut staged = Staged::new(view);
    forget_expired_request(&mut staged, revision)?;
    forget_expired_events(&mut staged, revision)?;
    let Some(command) = command else {
        return Ok(Applied {
            result: ApplyResult {
                revision,
                outcome: None,
            },
            mutations: staged.into_mutations(),
        });
    };

    let remembered: Option<RequestRecord> = staged.read(&keys::request_key(&command.request_id))?;
    // The record aging out at this very revision is being deleted above: it no longer counts.
    let remembered = remembered.filter(|record| !is_expired(record.result.revision(), revision));
    if let Some(record) = remembered {
        let result = if record.body == command.body {
            record.result.answer(&record.body)
        } else {
            let outcome = Outcome::Rejected(Rejection::RequestIdReused);
            ApplyResult {
                revision,
                outcome: Some(outcome),
            }
        };
        return Ok(Applied {
            result,
            mutations: staged.into_mutations(),
        });
    }

    // A forget's event says where the data was; the rule deletes that, so read it first.
    let forgotten_location = match &command.body {
        WriteBody::Forget { user_id, .. } => staged
            .placement(user_id)?
            .map(|placement| placement.location_id),
        _ => None,
    };
    // A rule decides on a fork: a refusal discards everything it staged.
    let context = WriteContext { command, revision };
    let mut decision = staged.fork();
    let outcome = match decide(&mut decision, context)? {
        Ok(outcome) => {
            staged.adopt(decision);
            record_events(
                &mut staged,
                revision,
                changes_of(&outcome, forgotten_location),
            );
            outcome
        }
        Err(rejection) => Outcome::Rejected(rejection),
    };
    let result = ApplyResult {
        revision,
        outcome: Some(outcome),
    };
    remember_request(&mut staged, command, &result);
    Ok(Applied {
        result,
        mutations: staged.into_mutations(),
    })
}

/// A rule's verdict: the outcome, or the rejection that leaves the state as it was.
pub type Verdict = Result<Outcome, Rejection>;

fn decide<V: KvRead>(
    staged: &mut Staged<'_, V>,
    context: WriteContext<'_>,
) -> Result<Verdict, CoreError<V::Error>> {
    match &context.command.body {
        WriteBody::Assign(item) => placement_rules::assign(staged, context, item),
        WriteBody::BatchAssign { items } => placement_rules::batch_assign(staged, context, items),
        WriteBody::Forget {
            user_id,
            expected_mod_revision,
        } => placement_rules::forget(staged, user_id, *expected_mod_revision),
        WriteBody::BeginMove {
            user_id,
            target,
            expected_mod_revision,
        } => placement_rules::begin_move(staged, context, user_id, target, *expected_mod_revision),
        WriteBody::CompleteMove {
            user_id,
            expected_mod_revision,
        } => placement_rules::complete_move(staged, context, user_id, *expected_mod_revision),
        WriteBody::AbortMove {
            user_id,
            expected_mod_revision,
        } => placement_rules::abort_move(staged, context, user_id, *expected_mod_revision),
        WriteBody::PutLocation {
            location_id,
            jurisdiction,
            labels,
        } => catalog_rules::put_location(staged, context, location_id, *jurisdiction, labels),
        WriteBody::SetLocationState { location_id, state } => {
            catalog_rules::set_location_state(staged, context, location_id, *state)
        }
        WriteBody::PutPolicy {
            residency,
            storage,
            access,
        } => catalog_rules::put_policy(staged, context, *residency, storage, access),
    }
}

/// The changes an applied outcome made, in the order watchers see them.
fn changes_of(outcome: &Outcome, forgotten_location: Option<LocationId>) -> Vec<Change> {
    match outcome {
        Outcome::Assigned { placement, .. } | Outcome::Moved { placement } => {
            vec![Change::Placed(placement.clone())]
        }
        Outcome::BatchAssigned { items } => items
            .iter()
            .map(|item| Change::Placed(item.placement.clone()))
            .collect(),
        Outcome::Forgotten { user_id } => {
            let location_id = forgotten_location.expect("a forgotten placement had a location");
            vec![Change::Forgotten {
                user_id: user_id.clone(),
                location_id,
            }]
        }
        Outcome::LocationWritten { location, .. } => vec![Change::Location(location.clone())],
        Outcome::PolicyWritten { policy, .. } => vec![Change::Policy(policy.clone())],
        Outcome::Rejected(_) => Vec::new(),
    }
}

fn record_events<V: KvRead>(staged: &mut Staged<'_, V>, revision: Revision, changes: Vec<Change>) {
    if changes.is_empty() {
        return;
    }
    let count = u32::try_from(changes.len()).expect("a write makes fewer than 2^32 changes");
    for (index, change) in changes.into_iter().enumerate() {
        let index = u32::try_from(index).expect("counted above");
        staged.put(
            keys::event_key(revision, index),
            &Event {
                revision,
                index,
                change,
            },
        );
    }
    staged.put(keys::event_count_key(revision), &count);
}

/// Drops the events made exactly `WATCH_HISTORY_REVISIONS` ago: like request ids, every
/// revision passes here once, so the history is always exactly that window.
fn forget_expired_events<V: KvRead>(
    staged: &mut Staged<'_, V>,
    revision: Revision,
) -> Result<(), CoreError<V::Error>> {
    let Some(expired) = revision.0.checked_sub(WATCH_HISTORY_REVISIONS) else {
        return Ok(());
    };
    let expired = Revision(expired);
    let count_key = keys::event_count_key(expired);
    if let Some(count) = staged.read::<u32>(&count_key)? {
        for index in 0..count {
            staged.delete(keys::event_key(expired, index));
        }
        staged.delete(count_key);
    }
    Ok(())
}

fn is_expired(applied_at: Revision, now: Revision) -> bool {
    applied_at.0.saturating_add(REQUEST_DEDUP_WINDOW_REVISIONS) <= now.0
}

/// Drops the request id applied exactly `REQUEST_DEDUP_WINDOW_REVISIONS` ago, if any. Every
/// revision passes through here once, so every id is dropped exactly when it ages out.
fn forget_expired_request<V: KvRead>(
    staged: &mut Staged<'_, V>,
    revision: Revision,
) -> Result<(), CoreError<V::Error>> {
    let Some(expired) = revision.0.checked_sub(REQUEST_DEDUP_WINDOW_REVISIONS) else {
        return Ok(());
    };
    let index_key = keys::request_by_revision_key(Revision(expired));
    if let Some(request_id) = staged.read::<RequestId>(&index_key)? {
        staged.delete(keys::request_key(&request_id));
        staged.delete(index_key);
    }
    Ok(())
}

fn remember_request<V: KvRead>(
    staged: &mut Staged<'_, V>,
    command: &Command,
    result: &ApplyResult,
) {
    let record = RequestRecord {
        body: command.body.clone(),
        result: StoredResult::of(command, result),
    };
    let encoded = crate::codec::encode(&record);
    if encoded.len() > REQUEST_RECORD_BYTES_MAX {
        // Only a refused batch naming many long ids gets here (the size is the same on every
        // replica, so so is this choice): its retry is decided afresh, which is safe.
        assert!(
            matches!(result.outcome, Some(Outcome::Rejected(_))),
            "an applied write's record is over its bound"
        );
        return;
    }
    staged.put_raw(keys::request_key(&command.request_id), encoded);
    staged.put(
        keys::request_by_revision_key(result.revision),
        &command.request_id,
    );
}

#[cfg(test)]
mod tests;
