//! An in-memory state: the same `apply` over a `BTreeMap`. Tests use it as the reference model.

use std::collections::BTreeMap;
use std::convert::Infallible;

use residency_types::{ApplyResult, Command, Placement, RequestId, Revision, UserId};

use crate::requests::{IndexChange, RequestIndex, RequestPlace, load_index};
use crate::{KvRead, KvScan, Mutation, StateDigest, apply, lookup};

#[derive(Debug, Clone, Default)]
pub struct MemoryState {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Where each remembered request id is, kept from each entry's index changes as the store
    /// keeps its own; exact (no hashing), so that it can be compared with one loaded afresh.
    requests: ExactRequestIndex,
}

/// Two states are equal when their pairs are: the index is derived from them.
impl PartialEq for MemoryState {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for MemoryState {}

/// A request index with every id spelled out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExactRequestIndex(BTreeMap<RequestId, Vec<RequestPlace>>);

impl RequestIndex for ExactRequestIndex {
    fn places(&self, request_id: &RequestId) -> Vec<RequestPlace> {
        self.0.get(request_id).cloned().unwrap_or_default()
    }
}

impl ExactRequestIndex {
    fn insert(&mut self, request_id: RequestId, place: RequestPlace) {
        let places = self.0.entry(request_id).or_default();
        places.push(place);
        places.sort();
    }

    fn apply(&mut self, changes: Vec<IndexChange>) {
        for change in changes {
            match change {
                IndexChange::Remember { request_id, place } => self.insert(request_id, place),
                IndexChange::Forget { request_id, place } => {
                    let places = self.0.get_mut(&request_id).unwrap_or_else(|| {
                        panic!("an entry forgot {request_id:?}, which the index does not hold")
                    });
                    let at = places
                        .iter()
                        .position(|held| *held == place)
                        .expect("an entry forgot an id at a place the index does not hold");
                    places.remove(at);
                    if places.is_empty() {
                        self.0.remove(&request_id);
                    }
                }
            }
        }
    }
}

impl KvRead for MemoryState {
    type Error = Infallible;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Infallible> {
        Ok(self.entries.get(key).cloned())
    }
}

impl KvScan for MemoryState {
    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Infallible> {
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after.to_vec()),
            None => std::ops::Bound::Included(prefix.to_vec()),
        };
        Ok(self
            .entries
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }
}

impl MemoryState {
    pub fn new() -> Self {
        MemoryState::default()
    }

    /// Applies one entry of one write (or, with `None`, of none) and returns its answer.
    pub fn apply(&mut self, revision: Revision, command: Option<&Command>) -> ApplyResult {
        let commands = command.map(std::slice::from_ref).unwrap_or_default();
        let mut results = self.apply_entry(revision, commands);
        match command {
            Some(_) => results.pop().expect("one write, one answer"),
            None => ApplyResult {
                revision,
                outcome: None,
            },
        }
    }

    /// Applies one entry of several writes and its mutations; the model of what the store does
    /// atomically. One answer per write, in order.
    pub fn apply_entry(&mut self, revision: Revision, commands: &[Command]) -> Vec<ApplyResult> {
        let applied = apply(self, &self.requests, revision, commands)
            .expect("memory state never fails to read");
        self.requests.apply(applied.index_changes);
        for mutation in applied.mutations {
            match mutation {
                Mutation::Put { key, value } => {
                    self.entries.insert(key, value);
                }
                Mutation::Delete { key } => {
                    self.entries.remove(&key);
                }
            }
        }
        applied.results
    }

    /// What `check` would answer for `commands` as the entry at `revision`.
    pub fn check(&self, revision: Revision, commands: &[Command]) -> Vec<ApplyResult> {
        crate::check(self, &self.requests, revision, commands)
            .expect("memory state never fails to read")
    }

    /// The request index kept entry by entry.
    pub fn request_index(&self) -> &ExactRequestIndex {
        &self.requests
    }

    /// The request index as loaded afresh from the pairs (as a store does when it opens or
    /// installs a state): always equal to `request_index`, or the index changes are wrong.
    pub fn loaded_request_index(&self) -> ExactRequestIndex {
        let mut index = ExactRequestIndex::default();
        load_index(self, |request_id, place| index.insert(request_id, place))
            .expect("memory state never fails to read");
        index
    }

    pub fn lookup(&self, user_id: &UserId) -> Option<Placement> {
        lookup(self, user_id).expect("memory state holds only values it wrote")
    }

    pub fn digest(&self) -> (String, u64) {
        let mut digest = StateDigest::new();
        for (key, value) in &self.entries {
            digest.update(key, value);
        }
        digest.finish()
    }

    /// The digest of the registry's data only: placements, catalog, policies and their counters,
    /// without the request-id records that every write (refused ones included) leaves behind.
    pub fn data_digest(&self) -> (String, u64) {
        let mut digest = StateDigest::new();
        let bookkeeping = [
            crate::keys::REQUEST_PREFIX,
            crate::keys::REQUEST_IDS_PREFIX,
            crate::keys::REQUEST_RECORDS_PREFIX,
            crate::keys::REQUEST_WINDOW_KEY,
            crate::keys::REQUEST_BY_REVISION_PREFIX,
        ];
        for (key, value) in &self.entries {
            if !bookkeeping.iter().any(|prefix| key.starts_with(prefix)) {
                digest.update(key, value);
            }
        }
        digest.finish()
    }

    /// The raw value at `key`, for tests that look at the encoding.
    #[cfg(test)]
    pub fn get_for_test(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.entries.get(key).cloned()
    }

    /// Writes a key behind the rules' back, to stand in for a long history; the request
    /// index is loaded afresh, as a store would on opening such a state.
    #[cfg(test)]
    pub fn put_for_test(&mut self, key: &[u8], value: Vec<u8>) {
        self.entries.insert(key.to_vec(), value);
        self.requests = self.loaded_request_index();
    }

    /// Deletes a key behind the rules' back, to test how reads behave on a damaged state.
    #[cfg(test)]
    pub fn remove_for_test(&mut self, key: &[u8]) {
        self.entries.remove(key);
        self.requests = self.loaded_request_index();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
