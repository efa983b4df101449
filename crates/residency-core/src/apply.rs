//! The write path: decide one command against the state, deterministically.

use residency_types::limits::REQUEST_DEDUP_WINDOW_REVISIONS;
use residency_types::{ApplyResult, Command, Outcome, Rejection, RequestId, Revision, WriteBody};
use serde::{Deserialize, Serialize};

use crate::staged::Staged;
use crate::{CoreError, KvRead, catalog_rules, keys, placement_rules};

/// What the registry remembers of an applied request id: the write, and its first result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub body: WriteBody,
    pub result: ApplyResult,
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
    let remembered = remembered.filter(|record| !is_expired(record.result.revision, revision));
    if let Some(record) = remembered {
        let result = if record.body == command.body {
            record.result
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

    // A rule decides on a fork: a refusal discards everything it staged.
    let context = WriteContext { command, revision };
    let mut decision = staged.fork();
    let outcome = match decide(&mut decision, context)? {
        Ok(outcome) => {
            staged.adopt(decision);
            outcome
        }
        Err(rejection) => Outcome::Rejected(rejection),
    };
    let result = ApplyResult {
        revision,
        outcome: Some(outcome),
    };
    remember_request(&mut staged, &command.request_id, &command.body, &result);
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
    request_id: &RequestId,
    body: &WriteBody,
    result: &ApplyResult,
) {
    let record = RequestRecord {
        body: body.clone(),
        result: result.clone(),
    };
    staged.put(keys::request_key(request_id), &record);
    staged.put(keys::request_by_revision_key(result.revision), request_id);
}

#[cfg(test)]
mod tests;
