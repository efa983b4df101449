//! The write path: decide one log entry's writes against the state, in order, deterministically.

use residency_types::command::AssignedItem;
use residency_types::limits::{
    REQUEST_DEDUP_WINDOW_REQUESTS, REQUEST_RECORD_BYTES_MAX, WATCH_HISTORY_REVISIONS,
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

/// The answers for one entry (one per write, in order) and the mutations that make them so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub results: Vec<ApplyResult>,
    pub mutations: Vec<Mutation>,
}

/// Who wrote, and when: the parts of a command every rule records.
#[derive(Debug, Clone, Copy)]
pub struct WriteContext<'a> {
    pub command: &'a Command,
    pub revision: Revision,
}

/// Applies the log entry at `revision`: its writes in order, each deciding on the state the
/// ones before it left and each answered on its own. Blank and membership entries carry no
/// write (`commands` is empty); they still age the watch history.
pub fn apply<V: KvRead>(
    view: &V,
    revision: Revision,
    commands: &[Command],
) -> Result<Applied, CoreError<V::Error>> {
    let mut staged = Staged::new(view);
    forget_expired_events(&mut staged, revision)?;
    let mut journal = EntryJournal {
        revision,
        events: Some(Vec::new()),
        remembered: Vec::new(),
    };
    let results = decide_entry(&mut staged, &mut journal, commands)?;
    journal.finish(&mut staged)?;
    Ok(Applied {
        results,
        mutations: staged.into_mutations(),
    })
}

/// What `apply` would answer for each write if `commands` were the entry at `revision`, without
/// the bookkeeping that decides nothing: no watch events are made, no request ids indexed or
/// aged out (each write's request record is still staged, so a retry later in the same entry
/// is answered as `apply` would answer it). The leader's check before proposing.
pub fn check<V: KvRead>(
    view: &V,
    revision: Revision,
    commands: &[Command],
) -> Result<Vec<ApplyResult>, CoreError<V::Error>> {
    let mut staged = Staged::new(view);
    let mut journal = EntryJournal {
        revision,
        events: None,
        remembered: Vec::new(),
    };
    decide_entry(&mut staged, &mut journal, commands)
}

/// Decides the writes of an entry in order, on one staged state.
fn decide_entry<V: KvRead>(
    staged: &mut Staged<'_, V>,
    journal: &mut EntryJournal,
    commands: &[Command],
) -> Result<Vec<ApplyResult>, CoreError<V::Error>> {
    // The id a state from before grouping remembered exactly 1,000,000 revisions ago is gone
    // before this entry's writes look.
    forget_expired_legacy_request(staged, journal.revision)?;
    let mut results = Vec::with_capacity(commands.len());
    for command in commands {
        results.push(apply_write(staged, journal, command)?);
    }
    Ok(results)
}

/// One write of the entry at `journal.revision`.
fn apply_write<V: KvRead>(
    staged: &mut Staged<'_, V>,
    journal: &mut EntryJournal,
    command: &Command,
) -> Result<ApplyResult, CoreError<V::Error>> {
    let revision = journal.revision;
    // A record is present exactly while its id is within the window (`remember_request`
    // deletes it as it ages out), so its presence alone decides.
    let remembered: Option<RequestRecord> = staged.read(&keys::request_key(&command.request_id))?;
    if let Some(record) = remembered {
        return Ok(if record.body == command.body {
            record.result.answer(&record.body)
        } else {
            ApplyResult {
                revision,
                outcome: Some(Outcome::Rejected(Rejection::RequestIdReused)),
            }
        });
    }

    // A forget's event says where the data was; the rule deletes that, so read it first.
    let forgotten_location = match &command.body {
        WriteBody::Forget { user_id, .. } => staged
            .placement(user_id)?
            .map(|placement| placement.location_id),
        _ => None,
    };
    // A rule decides inside a decision: a refusal puts back everything it staged.
    let context = WriteContext { command, revision };
    staged.begin_decision();
    let verdict = match decide(staged, context) {
        Ok(verdict) => verdict,
        Err(error) => {
            staged.discard_decision();
            return Err(error);
        }
    };
    let outcome = match verdict {
        Ok(outcome) => {
            staged.keep_decision();
            if journal.events.is_some() {
                journal.record(changes_of(&outcome, forgotten_location));
            }
            outcome
        }
        Err(rejection) => {
            staged.discard_decision();
            Outcome::Rejected(rejection)
        }
    };
    let result = ApplyResult {
        revision,
        outcome: Some(outcome),
    };
    if remember_request(staged, command, &result) {
        journal.remembered.push(command.request_id.clone());
    }
    Ok(result)
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

/// What one entry leaves besides its writes' own changes: their events, numbered in order
/// across all its writes and counted once at the end (so a watcher gets them together and the
/// window drops them together), and the request ids it remembered, indexed once at the end.
struct EntryJournal {
    revision: Revision,
    /// `None` for a check, which makes no events.
    events: Option<Vec<Event>>,
    remembered: Vec<RequestId>,
}

/// One `w/` key: some of the events of one entry, in order, and whether another chunk of the
/// same entry follows (so the window finds them all without a count of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventChunk {
    pub events: Vec<Event>,
    pub more: bool,
}

/// The encoded events one `w/` key holds, at most (a single larger event stands alone): far
/// below sled's inline value bound, and a few keys per entry instead of one per event.
const EVENT_CHUNK_BYTES_MAX: usize = 32 * 1024;

impl EntryJournal {
    fn record(&mut self, changes: Vec<Change>) {
        let events = self.events.get_or_insert_with(Vec::new);
        for change in changes {
            let index =
                u32::try_from(events.len()).expect("an entry makes fewer than 2^32 changes");
            events.push(Event {
                revision: self.revision,
                index,
                change,
            });
        }
    }

    fn finish<V: KvRead>(self, staged: &mut Staged<'_, V>) -> Result<(), CoreError<V::Error>> {
        let mut chunks: Vec<Vec<Event>> = Vec::new();
        let mut bytes = 0;
        for event in self.events.unwrap_or_default() {
            let size = crate::codec::encoded_len(&event);
            match chunks.last_mut() {
                Some(chunk) if bytes + size <= EVENT_CHUNK_BYTES_MAX => chunk.push(event),
                _ => {
                    bytes = 0;
                    chunks.push(vec![event]);
                }
            }
            bytes += size;
        }
        let count = u32::try_from(chunks.len()).expect("fewer than 2^32 chunks");
        for (chunk, events) in (0..count).zip(chunks) {
            staged.put(
                keys::event_chunk_key(self.revision, chunk),
                &EventChunk {
                    events,
                    more: chunk + 1 < count,
                },
            );
        }
        index_remembered(staged, self.revision, self.remembered)
    }
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
    let mut chunk = 0;
    loop {
        let key = keys::event_chunk_key(expired, chunk);
        let Some(stored) = staged.read::<EventChunk>(&key)? else {
            break;
        };
        staged.delete(key);
        if !stored.more {
            break;
        }
        chunk += 1;
    }
    // A state from before events were kept per entry keeps one key per event.
    let count_key = keys::event_count_key(expired);
    if let Some(count) = staged.read::<u32>(&count_key)? {
        for index in 0..count {
            staged.delete(keys::event_key(expired, index));
        }
        staged.delete(count_key);
    }
    Ok(())
}

/// How many revisions a request id was remembered for in states written before writes were
/// grouped into entries, when one revision was one write. Such a state's ids are indexed by
/// revision under `q/` and still age out that way; every id remembered since is indexed by
/// sequence under `Q/` and ages out by count (`REQUEST_DEDUP_WINDOW_REQUESTS`).
const LEGACY_REQUEST_DEDUP_WINDOW_REVISIONS: u64 = 1_000_000;

/// Drops the request id a state from before grouping applied exactly
/// `LEGACY_REQUEST_DEDUP_WINDOW_REVISIONS` ago, if any. Every revision passes through here
/// once, so every such id is dropped exactly when it ages out; a state without `q/` keys reads
/// one absent key per entry.
fn forget_expired_legacy_request<V: KvRead>(
    staged: &mut Staged<'_, V>,
    revision: Revision,
) -> Result<(), CoreError<V::Error>> {
    let Some(expired) = revision
        .0
        .checked_sub(LEGACY_REQUEST_DEDUP_WINDOW_REVISIONS)
    else {
        return Ok(());
    };
    let index_key = keys::request_by_revision_key(Revision(expired));
    if let Some(request_id) = staged.read::<RequestId>(&index_key)? {
        staged.delete(keys::request_key(&request_id));
        staged.delete(index_key);
    }
    Ok(())
}

/// Remembers a write's first result under its request id; `false` if it was too large to
/// keep (see below), so nothing was remembered.
fn remember_request<V: KvRead>(
    staged: &mut Staged<'_, V>,
    command: &Command,
    result: &ApplyResult,
) -> bool {
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
        return false;
    }
    staged.put_raw(keys::request_key(&command.request_id), encoded);
    true
}

/// How many remembered ids one `Q/` key holds at most, so that an entry's index stays far
/// below sled's inline value bound whatever the number of writes per entry (256 ids of at most
/// 128 bytes: about 33 KiB).
const REQUEST_IDS_PER_KEY: usize = 256;
/// How many revisions the window's start moves past in one entry, at most: a bounded number
/// of reads per entry even after a long stretch of entries that remembered nothing (it then
/// catches up over the next entries).
const REQUEST_WINDOW_STEPS_MAX: u64 = 4_096;

/// The request-id window: how many ids it holds, and the first revision whose ids it may still
/// hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestWindow {
    pub remembered: u64,
    pub oldest: Revision,
}

/// One `Q/` key: a chunk of the ids an entry remembered, and whether another chunk follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RequestIds {
    ids: Vec<RequestId>,
    more: bool,
}

/// Indexes the ids the entry at `revision` remembered, under that revision (a few keys per
/// entry, not one per write), then ages out whole entries' ids from the oldest on while the
/// window still holds at least `REQUEST_DEDUP_WINDOW_REQUESTS` without them: the newest
/// `REQUEST_DEDUP_WINDOW_REQUESTS` ids are always remembered, and at most one entry's more.
fn index_remembered<V: KvRead>(
    staged: &mut Staged<'_, V>,
    revision: Revision,
    remembered: Vec<RequestId>,
) -> Result<(), CoreError<V::Error>> {
    let stored: Option<RequestWindow> = staged.read(keys::REQUEST_WINDOW_KEY)?;
    if remembered.is_empty() && stored.is_none() {
        return Ok(());
    }
    let mut window = stored.unwrap_or(RequestWindow {
        remembered: 0,
        oldest: revision,
    });
    window.remembered += remembered.len() as u64;
    let chunks: Vec<&[RequestId]> = remembered.chunks(REQUEST_IDS_PER_KEY).collect();
    for (chunk, ids) in chunks.iter().enumerate() {
        let chunk = u32::try_from(chunk).expect("an entry has fewer than 2^32 chunks");
        staged.put(
            keys::request_ids_key(revision, chunk),
            &RequestIds {
                ids: ids.to_vec(),
                more: (chunk as usize) + 1 < chunks.len(),
            },
        );
    }
    let mut steps = 0;
    while window.remembered > REQUEST_DEDUP_WINDOW_REQUESTS
        && window.oldest < revision
        && steps < REQUEST_WINDOW_STEPS_MAX
    {
        let (ids, keys_read) = entry_ids(staged, window.oldest)?;
        let count = ids.len() as u64;
        if window.remembered - count < REQUEST_DEDUP_WINDOW_REQUESTS {
            break;
        }
        for id in &ids {
            staged.delete(keys::request_key(id));
        }
        for chunk in 0..keys_read {
            staged.delete(keys::request_ids_key(window.oldest, chunk));
        }
        window.remembered -= count;
        window.oldest = Revision(window.oldest.0 + 1);
        steps += 1;
    }
    staged.put(keys::REQUEST_WINDOW_KEY.to_vec(), &window);
    Ok(())
}

/// The ids the entry at `revision` remembered (none if it has no index), and how many keys
/// hold them.
fn entry_ids<V: KvRead>(
    staged: &Staged<'_, V>,
    revision: Revision,
) -> Result<(Vec<RequestId>, u32), CoreError<V::Error>> {
    let mut ids = Vec::new();
    let mut chunk = 0;
    while let Some(stored) = staged.read::<RequestIds>(&keys::request_ids_key(revision, chunk))? {
        ids.extend(stored.ids);
        chunk += 1;
        if !stored.more {
            break;
        }
    }
    Ok((ids, chunk))
}

#[cfg(test)]
mod tests;
