//! Request ids: what the registry remembers of each applied write so that a retry gets the
//! first answer, for the newest `REQUEST_DEDUP_WINDOW_REQUESTS` writes.
//!
//! An entry keeps its writes' records together, in a few keys per entry rather than one per
//! write: `Q/` (revision, chunk) holds the ids it remembered, `R/` (revision, chunk) the records
//! (the id, a SHA-256 of the write's body, its first result). Finding an id's entry is the job
//! of a [`RequestIndex`] the store keeps in memory, rebuilt from the `Q/` keys when the state is
//! opened or replaced (`load_index`) and kept up to date from each entry's [`IndexChange`]s.
//! The index may name places an id is not (a hash collision): the records decide.
//!
//! States written before this layout keep one `r/` key per id (the record with the whole body):
//! ids indexed under `q/` (one write per revision) or under a `Q/` key without `R/` records.
//! They are read, and age out, as before.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use residency_types::command::AssignedItem;
use residency_types::limits::{REQUEST_DEDUP_WINDOW_REQUESTS, REQUEST_RECORD_BYTES_MAX};
use residency_types::{
    ApplyResult, CallerId, Command, Outcome, Placement, PlacementState, ReasonText, Rejection,
    RequestId, Revision, WriteBody,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::staged::Staged;
use crate::{CoreError, KvRead, KvScan, codec, keys};

/// Where a remembered id's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequestPlace {
    /// Among the `R/` records of the entry at this revision (or, for an entry written before
    /// records were kept per entry, under `r/`).
    Entry(Revision),
    /// Under `r/` only: an id indexed under `q/`, from before writes were grouped.
    Legacy,
}

/// A change an entry makes to the request index, in the order it makes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexChange {
    Remember {
        request_id: RequestId,
        place: RequestPlace,
    },
    Forget {
        request_id: RequestId,
        place: RequestPlace,
    },
}

/// Where remembered request ids are. Implementations may name places an id is not; they must
/// never leave out a place it is.
pub trait RequestIndex {
    fn places(&self, request_id: &RequestId) -> Vec<RequestPlace>;
}

/// A request index in memory: a 64-bit hash of each id to its place, so about 20 bytes per
/// remembered id whatever the id's length. Ids whose hashes collide share a list.
#[derive(Debug, Clone, Default)]
pub struct HashedRequestIndex<S = RandomState> {
    hasher: S,
    /// Hash → place, for hashes of exactly one remembered id.
    one: HashMap<u64, u64, BuildHasherDefault<PassThrough>>,
    /// Hash → places, for hashes that more than one remembered id share.
    many: HashMap<u64, Vec<u64>>,
}

/// The hasher of a map whose keys are hashes already.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

const LEGACY_PLACE: u64 = u64::MAX;

fn place_code(place: RequestPlace) -> u64 {
    match place {
        RequestPlace::Entry(revision) => {
            assert_ne!(revision.0, LEGACY_PLACE, "a revision at u64::MAX");
            revision.0
        }
        RequestPlace::Legacy => LEGACY_PLACE,
    }
}

fn place_of(code: u64) -> RequestPlace {
    if code == LEGACY_PLACE {
        RequestPlace::Legacy
    } else {
        RequestPlace::Entry(Revision(code))
    }
}

impl<S: BuildHasher> HashedRequestIndex<S> {
    pub fn with_hasher(hasher: S) -> Self {
        HashedRequestIndex {
            hasher,
            one: HashMap::default(),
            many: HashMap::new(),
        }
    }

    fn hash(&self, request_id: &RequestId) -> u64 {
        self.hasher.hash_one(request_id.as_str())
    }

    /// How many ids it holds.
    pub fn len(&self) -> usize {
        self.one.len() + self.many.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.one.clear();
        self.many.clear();
    }

    pub fn insert(&mut self, request_id: &RequestId, place: RequestPlace) {
        let hash = self.hash(request_id);
        let code = place_code(place);
        if let Some(places) = self.many.get_mut(&hash) {
            places.push(code);
        } else if let Some(other) = self.one.insert(hash, code) {
            self.one.remove(&hash);
            self.many.insert(hash, vec![other, code]);
        }
    }

    /// Forgets one remembrance of `request_id` at `place` (none if it holds none).
    pub fn remove(&mut self, request_id: &RequestId, place: RequestPlace) {
        let hash = self.hash(request_id);
        let code = place_code(place);
        if self.one.get(&hash) == Some(&code) {
            self.one.remove(&hash);
        } else if let Some(places) = self.many.get_mut(&hash) {
            if let Some(at) = places.iter().position(|candidate| *candidate == code) {
                places.swap_remove(at);
            }
            if places.len() == 1 {
                let last = places[0];
                self.many.remove(&hash);
                self.one.insert(hash, last);
            }
        }
    }

    pub fn apply(&mut self, changes: &[IndexChange]) {
        for change in changes {
            match change {
                IndexChange::Remember { request_id, place } => self.insert(request_id, *place),
                IndexChange::Forget { request_id, place } => self.remove(request_id, *place),
            }
        }
    }
}

impl<S: BuildHasher> RequestIndex for HashedRequestIndex<S> {
    fn places(&self, request_id: &RequestId) -> Vec<RequestPlace> {
        let hash = self.hash(request_id);
        if let Some(code) = self.one.get(&hash) {
            return vec![place_of(*code)];
        }
        self.many
            .get(&hash)
            .map(|codes| codes.iter().map(|code| place_of(*code)).collect())
            .unwrap_or_default()
    }
}

/// Keys read per scan call while loading the index.
const LOAD_SCAN_KEYS: usize = 1_000;

/// Calls `remember` with every remembered id of the state and its place: what a
/// [`RequestIndex`] must hold for `view`.
pub fn load_index<V: KvScan>(
    view: &V,
    mut remember: impl FnMut(RequestId, RequestPlace),
) -> Result<(), CoreError<V::Error>> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let pairs = view
            .scan_prefix(keys::REQUEST_IDS_PREFIX, after.as_deref(), LOAD_SCAN_KEYS)
            .map_err(CoreError::Read)?;
        let Some((last, _)) = pairs.last() else { break };
        after = Some(last.clone());
        for (key, value) in pairs {
            let revision = revision_in_key(&key, keys::REQUEST_IDS_PREFIX)?;
            let chunk: RequestIds = codec::decode(&value)?;
            for id in chunk.ids {
                remember(id, RequestPlace::Entry(revision));
            }
        }
    }
    let mut after: Option<Vec<u8>> = None;
    loop {
        let pairs = view
            .scan_prefix(
                keys::REQUEST_BY_REVISION_PREFIX,
                after.as_deref(),
                LOAD_SCAN_KEYS,
            )
            .map_err(CoreError::Read)?;
        let Some((last, _)) = pairs.last() else { break };
        after = Some(last.clone());
        for (_, value) in pairs {
            remember(codec::decode(&value)?, RequestPlace::Legacy);
        }
    }
    Ok(())
}

fn revision_in_key(key: &[u8], prefix: &[u8]) -> Result<Revision, codec::CodecError> {
    key.get(prefix.len()..prefix.len() + 8)
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map(|bytes| Revision(u64::from_be_bytes(bytes)))
        .ok_or_else(|| {
            codec::CodecError::Malformed("a request index key without a revision".into())
        })
}

/// What the registry remembered of a request id before records were kept per entry (`r/`):
/// the write, and its first result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub body: WriteBody,
    pub result: StoredResult,
}

/// What an entry remembers of one of its writes (in its `R/` records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedRequest {
    pub request_id: RequestId,
    /// SHA-256 of the write's body as the state encodes it: a retry with the same id and
    /// another body is refused (`REQUEST_ID_REUSED`).
    pub body_sha256: [u8; 32],
    pub result: StoredResult,
}

/// One `R/` key: some of the records of one entry, in order, and whether another chunk follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecords {
    pub records: Vec<RememberedRequest>,
    pub more: bool,
}

/// The encoded records one `R/` key holds, at most (a single larger record stands alone, and
/// a record is at most `REQUEST_RECORD_BYTES_MAX`): far below sled's inline value bound.
const REQUEST_RECORDS_CHUNK_BYTES_MAX: usize = 32 * 1024;

fn body_sha256(body: &WriteBody) -> [u8; 32] {
    Sha256::digest(codec::encode(body)).into()
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

    /// The first result, as it was answered, for a write whose body is `body`.
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

/// The request ids one entry remembers, with their records, and the index changes it makes.
#[derive(Debug)]
pub(crate) struct EntryRequests {
    revision: Revision,
    records: Vec<RememberedRequest>,
    /// Where each id remembered by this entry is in `records`.
    positions: BTreeMap<RequestId, usize>,
    pub(crate) changes: Vec<IndexChange>,
}

impl EntryRequests {
    pub(crate) fn new(revision: Revision) -> Self {
        EntryRequests {
            revision,
            records: Vec::new(),
            positions: BTreeMap::new(),
            changes: Vec::new(),
        }
    }

    /// The first answer to `command`'s request id if it is remembered (or, if it was
    /// remembered for another body, the refusal); `None` if the write is new.
    pub(crate) fn answer_retry<V: KvRead, I: RequestIndex>(
        &self,
        staged: &Staged<'_, V>,
        index: &I,
        command: &Command,
    ) -> Result<Option<ApplyResult>, CoreError<V::Error>> {
        let id = &command.request_id;
        let reused = || ApplyResult {
            revision: self.revision,
            outcome: Some(Outcome::Rejected(Rejection::RequestIdReused)),
        };
        let hashed = |record: &RememberedRequest| {
            if record.body_sha256 == body_sha256(&command.body) {
                record.result.answer(&command.body)
            } else {
                reused()
            }
        };
        if let Some(at) = self.positions.get(id) {
            return Ok(Some(hashed(&self.records[*at])));
        }
        for place in index.places(id) {
            let legacy = match place {
                RequestPlace::Legacy => true,
                RequestPlace::Entry(revision) => match entry_records(staged, revision)? {
                    Some(records) => {
                        if let Some(record) = records.iter().find(|record| &record.request_id == id)
                        {
                            return Ok(Some(hashed(record)));
                        }
                        false
                    }
                    // An entry from before records were kept per entry.
                    None => true,
                },
            };
            if legacy {
                // A record is present exactly while its id is within the window, so its
                // presence alone decides.
                if let Some(record) = staged.read::<RequestRecord>(&keys::request_key(id))? {
                    return Ok(Some(if record.body == command.body {
                        record.result.answer(&record.body)
                    } else {
                        reused()
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Remembers a write's first result under its request id, unless it is too large to keep
    /// (then a retry is decided afresh).
    pub(crate) fn remember(&mut self, command: &Command, result: &ApplyResult) {
        let record = RememberedRequest {
            request_id: command.request_id.clone(),
            body_sha256: body_sha256(&command.body),
            result: StoredResult::of(command, result),
        };
        if codec::encoded_len(&record) > REQUEST_RECORD_BYTES_MAX {
            // Only a refused batch naming many long ids gets here (the size is the same on
            // every replica, so so is this choice): its retry is decided afresh, which is safe.
            assert!(
                matches!(result.outcome, Some(Outcome::Rejected(_))),
                "an applied write's record is over its bound"
            );
            return;
        }
        self.positions
            .insert(command.request_id.clone(), self.records.len());
        self.records.push(record);
    }

    /// Stages the entry's records and ids, then ages out whole entries' ids from the oldest on
    /// while the window still holds at least `REQUEST_DEDUP_WINDOW_REQUESTS` without them: the
    /// newest `REQUEST_DEDUP_WINDOW_REQUESTS` ids are always remembered, and at most one
    /// entry's more.
    pub(crate) fn finish<V: KvRead>(
        mut self,
        staged: &mut Staged<'_, V>,
    ) -> Result<Vec<IndexChange>, CoreError<V::Error>> {
        let revision = self.revision;
        let stored: Option<RequestWindow> = staged.read(keys::REQUEST_WINDOW_KEY)?;
        if self.records.is_empty() && stored.is_none() {
            return Ok(self.changes);
        }
        let mut window = stored.unwrap_or(RequestWindow {
            remembered: 0,
            oldest: revision,
        });
        window.remembered += self.records.len() as u64;
        let ids: Vec<RequestId> = self
            .records
            .iter()
            .map(|record| record.request_id.clone())
            .collect();
        let id_chunks: Vec<&[RequestId]> = ids.chunks(REQUEST_IDS_PER_KEY).collect();
        for (chunk, part) in (0..).zip(&id_chunks) {
            staged.put(
                keys::request_ids_key(revision, chunk),
                &RequestIds {
                    ids: part.to_vec(),
                    more: (chunk as usize) + 1 < id_chunks.len(),
                },
            );
        }
        for id in ids {
            self.changes.push(IndexChange::Remember {
                request_id: id,
                place: RequestPlace::Entry(revision),
            });
        }
        stage_record_chunks(staged, revision, std::mem::take(&mut self.records));

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
            self.forget_entry(staged, window.oldest, ids, keys_read)?;
            window.remembered -= count;
            window.oldest = Revision(window.oldest.0 + 1);
            steps += 1;
        }
        staged.put(keys::REQUEST_WINDOW_KEY.to_vec(), &window);
        Ok(self.changes)
    }

    fn forget_entry<V: KvRead>(
        &mut self,
        staged: &mut Staged<'_, V>,
        revision: Revision,
        ids: Vec<RequestId>,
        id_keys: u32,
    ) -> Result<(), CoreError<V::Error>> {
        let record_keys = staged
            .read_chunks(
                |chunk| keys::request_records_key(revision, chunk),
                |stored: &RequestRecords| stored.more,
            )?
            .len();
        let has_records = record_keys > 0;
        for chunk in 0..record_keys as u32 {
            staged.delete(keys::request_records_key(revision, chunk));
        }
        for chunk in 0..id_keys {
            staged.delete(keys::request_ids_key(revision, chunk));
        }
        for id in ids {
            if !has_records {
                // An entry from before records were kept per entry: one `r/` key per id.
                staged.delete(keys::request_key(&id));
            }
            self.changes.push(IndexChange::Forget {
                request_id: id,
                place: RequestPlace::Entry(revision),
            });
        }
        Ok(())
    }

    /// Drops the request id a state from before grouping applied exactly
    /// `LEGACY_REQUEST_DEDUP_WINDOW_REVISIONS` ago, if any. Every revision passes through here
    /// once, so every such id is dropped exactly when it ages out; a state without `q/` keys
    /// reads one absent key per entry. Runs before the entry's writes look.
    pub(crate) fn forget_expired_legacy<V: KvRead>(
        &mut self,
        staged: &mut Staged<'_, V>,
    ) -> Result<(), CoreError<V::Error>> {
        let Some(expired) = self
            .revision
            .0
            .checked_sub(LEGACY_REQUEST_DEDUP_WINDOW_REVISIONS)
        else {
            return Ok(());
        };
        let index_key = keys::request_by_revision_key(Revision(expired));
        if let Some(request_id) = staged.read::<RequestId>(&index_key)? {
            staged.delete(keys::request_key(&request_id));
            staged.delete(index_key);
            self.changes.push(IndexChange::Forget {
                request_id,
                place: RequestPlace::Legacy,
            });
        }
        Ok(())
    }
}

/// Stages an entry's records in chunks of at most `REQUEST_RECORDS_CHUNK_BYTES_MAX`.
fn stage_record_chunks<V: KvRead>(
    staged: &mut Staged<'_, V>,
    revision: Revision,
    records: Vec<RememberedRequest>,
) {
    let (chunks, _) = codec::split_by_encoded_bytes(records, REQUEST_RECORDS_CHUNK_BYTES_MAX);
    let count = u32::try_from(chunks.len()).expect("fewer than 2^32 chunks");
    for (chunk, records) in (0..count).zip(chunks) {
        staged.put(
            keys::request_records_key(revision, chunk),
            &RequestRecords {
                records,
                more: chunk + 1 < count,
            },
        );
    }
}

/// The records of the entry at `revision`; `None` if it has none (an entry written before
/// records were kept per entry, or one that remembered nothing).
fn entry_records<V: KvRead>(
    staged: &Staged<'_, V>,
    revision: Revision,
) -> Result<Option<Vec<RememberedRequest>>, CoreError<V::Error>> {
    let chunks = staged.read_chunks(
        |chunk| keys::request_records_key(revision, chunk),
        |stored: &RequestRecords| stored.more,
    )?;
    Ok((!chunks.is_empty()).then(|| {
        chunks
            .into_iter()
            .flat_map(|stored| stored.records)
            .collect()
    }))
}

/// How many revisions a request id was remembered for in states written before writes were
/// grouped into entries, when one revision was one write. Such a state's ids are indexed by
/// revision under `q/` and still age out that way; every id remembered since is indexed by
/// entry under `Q/` and ages out by count (`REQUEST_DEDUP_WINDOW_REQUESTS`).
const LEGACY_REQUEST_DEDUP_WINDOW_REVISIONS: u64 = 1_000_000;

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
pub(crate) struct RequestIds {
    pub(crate) ids: Vec<RequestId>,
    pub(crate) more: bool,
}

/// The ids the entry at `revision` remembered (none if it has no index), and how many keys
/// hold them.
fn entry_ids<V: KvRead>(
    staged: &Staged<'_, V>,
    revision: Revision,
) -> Result<(Vec<RequestId>, u32), CoreError<V::Error>> {
    let chunks = staged.read_chunks(
        |chunk| keys::request_ids_key(revision, chunk),
        |stored: &RequestIds| stored.more,
    )?;
    let keys = chunks.len() as u32;
    Ok((
        chunks.into_iter().flat_map(|stored| stored.ids).collect(),
        keys,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> RequestId {
        RequestId::parse(text).expect("valid id")
    }

    /// A hasher that sends every id to one hash: every insert collides.
    #[derive(Debug, Clone, Default)]
    struct Constant;
    struct Seven;
    impl Hasher for Seven {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }
    impl BuildHasher for Constant {
        type Hasher = Seven;
        fn build_hasher(&self) -> Seven {
            Seven
        }
    }

    #[test]
    fn colliding_ids_keep_every_place_and_lose_only_the_one_removed() {
        let mut index = HashedRequestIndex::with_hasher(Constant);
        index.insert(&id("a"), RequestPlace::Entry(Revision(3)));
        index.insert(&id("b"), RequestPlace::Legacy);
        index.insert(&id("c"), RequestPlace::Entry(Revision(5)));
        assert_eq!(index.len(), 3);
        let mut places = index.places(&id("anything"));
        places.sort();
        assert_eq!(
            places,
            vec![
                RequestPlace::Entry(Revision(3)),
                RequestPlace::Entry(Revision(5)),
                RequestPlace::Legacy
            ]
        );
        index.remove(&id("b"), RequestPlace::Legacy);
        index.remove(&id("a"), RequestPlace::Entry(Revision(3)));
        assert_eq!(
            index.places(&id("c")),
            vec![RequestPlace::Entry(Revision(5))]
        );
        index.remove(&id("c"), RequestPlace::Entry(Revision(4)));
        assert_eq!(index.len(), 1, "a place it does not hold removes nothing");
        index.remove(&id("c"), RequestPlace::Entry(Revision(5)));
        assert!(index.is_empty());
    }

    #[test]
    fn distinct_ids_each_find_their_own_place() {
        let mut index: HashedRequestIndex = HashedRequestIndex::default();
        for n in 0..1_000_u64 {
            index.insert(&id(&format!("req-{n}")), RequestPlace::Entry(Revision(n)));
        }
        for n in 0..1_000_u64 {
            assert!(
                index
                    .places(&id(&format!("req-{n}")))
                    .contains(&RequestPlace::Entry(Revision(n)))
            );
        }
        assert!(index.places(&id("never")).len() <= 1);
    }
}
