//! The write path: decide one command against the state, deterministically.

use residency_types::limits::REQUEST_DEDUP_WINDOW_REVISIONS;
use residency_types::{
    ApplyResult, CallerId, Command, Jurisdiction, LocationId, Outcome, Placement, PlacementState,
    ReasonText, Rejection, RequestId, Revision, UserId, WriteBody,
};
use serde::{Deserialize, Serialize};

use crate::query::lookup;
use crate::{CoreError, KvRead, codec, keys};

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

/// Applies the log entry at `revision`. `command` is `None` for entries that carry no write
/// (blank and membership entries); they still age the request-id window.
pub fn apply<V: KvRead>(
    view: &V,
    revision: Revision,
    command: Option<&Command>,
) -> Result<Applied, CoreError<V::Error>> {
    let mut mutations = Vec::new();
    forget_expired_request(view, revision, &mut mutations)?;
    let Some(command) = command else {
        return Ok(Applied {
            result: ApplyResult {
                revision,
                outcome: None,
            },
            mutations,
        });
    };

    let request_key = keys::request_key(&command.request_id);
    let remembered = match view.get(&request_key).map_err(CoreError::Read)? {
        Some(bytes) => Some(codec::decode::<RequestRecord>(&bytes)?),
        None => None,
    };
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
        return Ok(Applied { result, mutations });
    }

    let outcome = match &command.body {
        WriteBody::Assign {
            user_id,
            residency,
            location_id,
            expected_mod_revision,
        } => {
            let assign = Assign {
                user_id,
                residency: *residency,
                location_id,
                expected_mod_revision: *expected_mod_revision,
                caller: &command.caller,
                reason: &command.reason,
                stamped_at_ms: command.stamped_at_ms,
            };
            assign.decide(view, revision, &mut mutations)?
        }
        WriteBody::Forget {
            user_id,
            expected_mod_revision,
        } => forget(view, user_id, *expected_mod_revision, &mut mutations)?,
    };
    let result = ApplyResult {
        revision,
        outcome: Some(outcome),
    };
    remember_request(&command.request_id, &command.body, &result, &mut mutations);
    Ok(Applied { result, mutations })
}

fn is_expired(applied_at: Revision, now: Revision) -> bool {
    applied_at.0.saturating_add(REQUEST_DEDUP_WINDOW_REVISIONS) <= now.0
}

/// Drops the request id applied exactly `REQUEST_DEDUP_WINDOW_REVISIONS` ago, if any. Every
/// revision passes through here once, so every id is dropped exactly when it ages out.
fn forget_expired_request<V: KvRead>(
    view: &V,
    revision: Revision,
    mutations: &mut Vec<Mutation>,
) -> Result<(), CoreError<V::Error>> {
    let Some(expired) = revision.0.checked_sub(REQUEST_DEDUP_WINDOW_REVISIONS) else {
        return Ok(());
    };
    let index_key = keys::request_by_revision_key(Revision(expired));
    if let Some(bytes) = view.get(&index_key).map_err(CoreError::Read)? {
        let request_id: RequestId = codec::decode(&bytes)?;
        mutations.push(Mutation::Delete {
            key: keys::request_key(&request_id),
        });
        mutations.push(Mutation::Delete { key: index_key });
    }
    Ok(())
}

fn remember_request(
    request_id: &RequestId,
    body: &WriteBody,
    result: &ApplyResult,
    mutations: &mut Vec<Mutation>,
) {
    let record = RequestRecord {
        body: body.clone(),
        result: result.clone(),
    };
    mutations.push(Mutation::Put {
        key: keys::request_key(request_id),
        value: codec::encode(&record),
    });
    mutations.push(Mutation::Put {
        key: keys::request_by_revision_key(result.revision),
        value: codec::encode(request_id),
    });
}

fn revision_mismatch(expected: Option<Revision>, current: Option<&Placement>) -> Option<Rejection> {
    let expected = expected?;
    let actual = current.map_or(Revision(0), |placement| placement.mod_revision);
    (actual != expected).then_some(Rejection::RevisionMismatch { expected, actual })
}

struct Assign<'a> {
    user_id: &'a UserId,
    residency: Jurisdiction,
    location_id: &'a LocationId,
    expected_mod_revision: Option<Revision>,
    caller: &'a CallerId,
    reason: &'a ReasonText,
    stamped_at_ms: u64,
}

impl Assign<'_> {
    fn decide<V: KvRead>(
        &self,
        view: &V,
        revision: Revision,
        mutations: &mut Vec<Mutation>,
    ) -> Result<Outcome, CoreError<V::Error>> {
        let current = lookup(view, self.user_id)?;
        if let Some(rejection) = revision_mismatch(self.expected_mod_revision, current.as_ref()) {
            return Ok(Outcome::Rejected(rejection));
        }
        let placement = Placement {
            user_id: self.user_id.clone(),
            residency: self.residency,
            location_id: self.location_id.clone(),
            state: PlacementState::Active,
            epoch: current.as_ref().map_or(1, |placement| placement.epoch),
            create_revision: current
                .as_ref()
                .map_or(revision, |placement| placement.create_revision),
            mod_revision: revision,
            updated_at_ms: self.stamped_at_ms,
            updated_by: self.caller.clone(),
            reason: self.reason.clone(),
        };
        mutations.push(Mutation::Put {
            key: keys::placement_key(self.user_id),
            value: codec::encode(&placement),
        });
        Ok(Outcome::Assigned {
            placement,
            created: current.is_none(),
        })
    }
}

fn forget<V: KvRead>(
    view: &V,
    user_id: &UserId,
    expected_mod_revision: Option<Revision>,
    mutations: &mut Vec<Mutation>,
) -> Result<Outcome, CoreError<V::Error>> {
    let current = lookup(view, user_id)?;
    if let Some(rejection) = revision_mismatch(expected_mod_revision, current.as_ref()) {
        return Ok(Outcome::Rejected(rejection));
    }
    if current.is_none() {
        return Ok(Outcome::Rejected(Rejection::UserNotFound));
    }
    mutations.push(Mutation::Delete {
        key: keys::placement_key(user_id),
    });
    Ok(Outcome::Forgotten {
        user_id: user_id.clone(),
    })
}

#[cfg(test)]
mod tests;
