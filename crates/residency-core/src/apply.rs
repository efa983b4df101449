//! The write path: decide one log entry's writes against the state, in order, deterministically.

use residency_types::limits::{
    WATCH_HISTORY_BYTES_MAX, WATCH_HISTORY_EVENTS_MAX, WATCH_HISTORY_REVISIONS,
};
use residency_types::{
    ApplyResult, Change, Command, Event, LocationId, Outcome, Rejection, Revision, WriteBody,
};
use serde::{Deserialize, Serialize};

use crate::requests::{EntryRequests, IndexChange, RequestIndex};
use crate::staged::Staged;
use crate::{CoreError, KvRead, catalog_rules, keys, placement_rules};

/// One change to the key space, applied by the store in order and atomically with the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// The answers for one entry (one per write, in order), the mutations that make them so, and
/// what changes in the index of remembered request ids (`requests.rs`) once they are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub results: Vec<ApplyResult>,
    pub mutations: Vec<Mutation>,
    pub index_changes: Vec<IndexChange>,
}

/// Who wrote, and when: the parts of a command every rule records.
#[derive(Debug, Clone, Copy)]
pub struct WriteContext<'a> {
    pub command: &'a Command,
    pub revision: Revision,
}

/// Applies the log entry at `revision`: its writes in order, each deciding on the state the
/// ones before it left and each answered on its own. Blank and membership entries carry no
/// write (`commands` is empty); they still age the watch history. `requests` says where the
/// state's remembered request ids are; it must not yet hold this entry's.
pub fn apply<V: KvRead, I: RequestIndex>(
    view: &V,
    requests: &I,
    revision: Revision,
    commands: &[Command],
) -> Result<Applied, CoreError<V::Error>> {
    let mut staged = Staged::new(view);
    let expired = forget_events_at(&mut staged, expired_revision(revision))?;
    let mut journal = EntryJournal {
        revision,
        events: Some(Vec::new()),
        requests: EntryRequests::new(revision),
    };
    let results = decide_entry(&mut staged, requests, &mut journal, commands)?;
    let index_changes = journal.finish(&mut staged, expired)?;
    Ok(Applied {
        results,
        mutations: staged.into_mutations(),
        index_changes,
    })
}

/// What `apply` would answer for each write if `commands` were the entry at `revision`, without
/// the bookkeeping that decides nothing: no watch events are made, no request ids stored or
/// aged out (each write's record is still kept in memory, so a retry later in the same entry
/// is answered as `apply` would answer it). The leader's check before proposing.
pub fn check<V: KvRead, I: RequestIndex>(
    view: &V,
    requests: &I,
    revision: Revision,
    commands: &[Command],
) -> Result<Vec<ApplyResult>, CoreError<V::Error>> {
    let mut staged = Staged::new(view);
    let mut journal = EntryJournal {
        revision,
        events: None,
        requests: EntryRequests::new(revision),
    };
    decide_entry(&mut staged, requests, &mut journal, commands)
}

/// Decides the writes of an entry in order, on one staged state.
fn decide_entry<V: KvRead, I: RequestIndex>(
    staged: &mut Staged<'_, V>,
    requests: &I,
    journal: &mut EntryJournal,
    commands: &[Command],
) -> Result<Vec<ApplyResult>, CoreError<V::Error>> {
    // The id a state from before grouping remembered exactly 1,000,000 revisions ago is gone
    // before this entry's writes look.
    journal.requests.forget_expired_legacy(staged)?;
    let mut results = Vec::with_capacity(commands.len());
    for command in commands {
        results.push(apply_write(staged, requests, journal, command)?);
    }
    Ok(results)
}

/// One write of the entry at `journal.revision`.
fn apply_write<V: KvRead, I: RequestIndex>(
    staged: &mut Staged<'_, V>,
    requests: &I,
    journal: &mut EntryJournal,
    command: &Command,
) -> Result<ApplyResult, CoreError<V::Error>> {
    let revision = journal.revision;
    if let Some(first) = journal.requests.answer_retry(staged, requests, command)? {
        return Ok(first);
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
            journal.record(changes_of(&outcome, forgotten_location));
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
    journal.requests.remember(command, &result);
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
/// window drops them together), and the request ids it remembered, stored once at the end.
struct EntryJournal {
    revision: Revision,
    /// `None` for a check, which makes no events.
    events: Option<Vec<Event>>,
    requests: EntryRequests,
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
        let Some(events) = &mut self.events else {
            return;
        };
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

    /// Stages the entry's events and request records, and keeps the watch history within its
    /// bounds, given what the revision bound already dropped from it in this entry.
    fn finish<V: KvRead>(
        self,
        staged: &mut Staged<'_, V>,
        expired: HistoryHeld,
    ) -> Result<Vec<IndexChange>, CoreError<V::Error>> {
        let events = self.events.unwrap_or_default();
        let made_events = events.len() as u64;
        let (chunks, bytes) = crate::codec::split_by_encoded_bytes(events, EVENT_CHUNK_BYTES_MAX);
        let made = HistoryHeld {
            events: made_events,
            bytes,
        };
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
        keep_history_bounded(staged, self.revision, made, expired)?;
        self.requests.finish(staged)
    }
}

/// Events and their encoded bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryHeld {
    pub events: u64,
    pub bytes: u64,
}

/// The watch history (`n/events`): what it holds, counted from `counted_from` on (events of
/// older entries, written before the history was counted, are not in `held`), and the oldest
/// revision whose events it may still hold. Watchers can resume after `oldest - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventWindow {
    pub held: HistoryHeld,
    pub counted_from: Revision,
    pub oldest: Revision,
}

/// How many revisions the history's start moves past in one entry, at most: a bounded number
/// of reads per entry (it catches up over the next entries).
const HISTORY_STEPS_MAX: u64 = 4_096;

/// The revision whose events age out by the revision bound when `revision` is applied.
fn expired_revision(revision: Revision) -> Option<Revision> {
    revision
        .0
        .checked_sub(WATCH_HISTORY_REVISIONS)
        .map(Revision)
}

/// Adds the entry's events to the history's count, then drops whole entries' events from the
/// oldest on while it holds more than `WATCH_HISTORY_EVENTS_MAX` events or
/// `WATCH_HISTORY_BYTES_MAX` bytes (the entry's own are never dropped). The revision bound was
/// applied first (`expired` is what it dropped); a state written before the history was counted
/// starts counting here, with its older events left to that bound.
fn keep_history_bounded<V: KvRead>(
    staged: &mut Staged<'_, V>,
    revision: Revision,
    made: HistoryHeld,
    expired: HistoryHeld,
) -> Result<(), CoreError<V::Error>> {
    let by_revisions = Revision(expired_revision(revision).map_or(0, |expired| expired.0 + 1));
    let mut window = staged
        .read::<EventWindow>(keys::EVENT_WINDOW_KEY)?
        .unwrap_or(EventWindow {
            held: HistoryHeld::default(),
            counted_from: revision,
            oldest: by_revisions,
        });
    let counted = |at: Revision, window: &EventWindow| at >= window.counted_from;
    if expired_revision(revision).is_some_and(|at| counted(at, &window)) {
        window.held.events -= expired.events;
        window.held.bytes -= expired.bytes;
    }
    window.held.events += made.events;
    window.held.bytes += made.bytes;
    window.oldest = window.oldest.max(by_revisions);
    let mut steps = 0;
    while (window.held.events > WATCH_HISTORY_EVENTS_MAX
        || window.held.bytes > WATCH_HISTORY_BYTES_MAX)
        && window.oldest < revision
        && steps < HISTORY_STEPS_MAX
    {
        let dropped = forget_events_at(staged, Some(window.oldest))?;
        if counted(window.oldest, &window) {
            window.held.events -= dropped.events;
            window.held.bytes -= dropped.bytes;
        }
        window.oldest = Revision(window.oldest.0 + 1);
        steps += 1;
    }
    staged.put(keys::EVENT_WINDOW_KEY.to_vec(), &window);
    Ok(())
}

/// Drops the events of the entry at `at` (none if `None`), and returns what they were.
fn forget_events_at<V: KvRead>(
    staged: &mut Staged<'_, V>,
    at: Option<Revision>,
) -> Result<HistoryHeld, CoreError<V::Error>> {
    let mut dropped = HistoryHeld::default();
    let Some(at) = at else {
        return Ok(dropped);
    };
    let chunks = staged.read_chunks(
        |chunk| keys::event_chunk_key(at, chunk),
        |stored: &EventChunk| stored.more,
    )?;
    for (chunk, stored) in (0..).zip(&chunks) {
        for event in &stored.events {
            dropped.events += 1;
            dropped.bytes += crate::codec::encoded_len(event) as u64;
        }
        staged.delete(keys::event_chunk_key(at, chunk));
    }
    // A state from before events were kept per entry keeps one key per event (never counted).
    let count_key = keys::event_count_key(at);
    if let Some(count) = staged.read::<u32>(&count_key)? {
        for index in 0..count {
            staged.delete(keys::event_key(at, index));
        }
        staged.delete(count_key);
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests;
