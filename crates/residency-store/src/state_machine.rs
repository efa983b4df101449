//! The replicated state machine: apply, snapshot build and install, over the state's layers
//! (`layers.rs`): sled trees of the changes since the last snapshot over that snapshot's base
//! file (`base.rs`).
//!
//! Each `apply` call decides its entries through `residency_core::apply` over an overlay, then
//! writes all their mutations *and* the applied log id into the live tree atomically (key by
//! key behind a redo record that a crash cannot leave half-made, `redo.rs`): the applied
//! revision is always exactly the revision of the data beside it. Apply does not fsync: after a
//! crash the node re-applies from its durable log.
//!
//! A snapshot build freezes the live tree and starts a new one (holding the state lock only for
//! that), merges the frozen changes with the base into a new base file while applies go on, and
//! switches to it in one durable step; the frozen tree and the old base are then dropped. So a
//! build walks no live tree and holds nothing aside. An install verifies the received base file
//! and adopts it as it is, with an empty live tree, in one durable step: nothing is loaded
//! pair by pair. A digest walks the layers as of its start while applies go on, through a
//! capture of the live tree (`capture.rs`). Reads never take the state lock: they use the
//! `change_seq` seqlock, see `reader.rs`.
//!
//! Durable steps, in order, and what a crash between two of them leaves (docs/storage.md):
//! a build renames its fsynced base into place, then records the new layers in `sm_pointer`
//! and syncs sled, then drops the frozen trees and deletes the old base; an install does the
//! same with the received file. Until the pointer is synced the old layers are whole, and on
//! open every tree and file the pointer does not name is removed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorVerb, RaftSnapshotBuilder};
use residency_core::{HashedRequestIndex, KvRead, Mutation, codec, keys};
use residency_types::{ProposalResult, Revision};
use tokio::sync::RwLock;

use crate::base::{Base, BaseWriter};
use crate::capture::Capture;
use crate::error::{sm_error, snapshot_error};
use crate::layers::{LayerNames, Layers, Merged, tagged};
use crate::reader::StateReader;
use crate::snapshot::open_snapshot;
use crate::{
    Durable, Entry, LogId, SnapshotMeta, StorageError, StoreError, StoredMembership, TypeConfig,
};

const POINTER_TREE: &str = "sm_pointer";
/// The layers of the state (`LayerNames`, JSON).
const LAYERS_KEY: &str = "layers";
/// Before the state was layered: the one sled tree that held the whole state, untagged.
const LEGACY_CURRENT_TREE_KEY: &str = "current";
const NEXT_SEQ_KEY: &str = "next_seq";
const DELTA_TREE_PREFIX: &str = "delta-";
/// The prefix of the whole-state trees of stores written before the state was layered.
const LEGACY_STATE_TREE_PREFIX: &str = "state-";
/// The state tree of such a store no snapshot was ever installed into.
const LEGACY_INITIAL_STATE_TREE: &str = "state-0";
const SNAPSHOT_SUFFIX: &str = ".snap";
const PARTIAL_SUFFIX: &str = ".partial";

/// The durable steps of a build, an install and the switch both end with, in order; a test
/// can stop the store right after any of them (`Shared::step_done`), as a crash would.
pub(crate) mod step {
    /// A build: the live tree frozen under a new one, recorded in `sm_pointer`.
    pub(crate) const LIVE_FROZEN: &str = "live tree frozen";
    /// A build: the merged base file written, fsynced and renamed into place.
    pub(crate) const BASE_WRITTEN: &str = "base written";
    /// An install: the received file verified and in place as a base file.
    pub(crate) const BASE_RECEIVED: &str = "base received";
    /// The switch: the new layers recorded in `sm_pointer` and sled synced.
    pub(crate) const LAYERS_SWITCHED: &str = "layers switched";
    /// The switch: the replaced base file deleted (the replaced trees are dropped next).
    pub(crate) const OLD_BASE_DELETED: &str = "old base deleted";
}

pub(crate) fn applied_key() -> Vec<u8> {
    keys::meta_key("applied")
}

pub(crate) fn membership_key() -> Vec<u8> {
    keys::meta_key("membership")
}

/// A read view of the state's layers, for the core's queries.
#[derive(Debug)]
pub struct StateView<'a>(pub(crate) &'a Layers);

impl KvRead for StateView<'_> {
    type Error = StoreError;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }
}

impl residency_core::KvScan for StateView<'_> {
    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let start = after.unwrap_or(prefix);
        let mut merged = self.0.pairs_from(start, false);
        let mut found = Vec::new();
        while found.len() < limit {
            let Some((key, value)) = merged.next_pair()? else {
                break;
            };
            if !key.starts_with(prefix) {
                break;
            }
            if after.is_some_and(|after| key.as_slice() <= after) {
                continue;
            }
            found.push((key, value));
        }
        Ok(found)
    }
}

/// The layers plus the not yet written mutations of the entries applied so far in this call.
/// The layers do not change during the call (the state lock is held), so what was read from
/// them is remembered: the entries of one call read their catalog and counters once.
struct Overlay<'a> {
    layers: &'a Layers,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    seen: std::cell::RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// The request index, with the changes of the entries applied so far in this call.
    requests: &'a mut HashedRequestIndex,
}

impl KvRead for Overlay<'_> {
    type Error = StoreError;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = self.pending.get(key) {
            return Ok(value.clone());
        }
        if let Some(value) = self.seen.borrow().get(key) {
            return Ok(value.clone());
        }
        let value = self.layers.get(key)?;
        self.seen.borrow_mut().insert(key.to_vec(), value.clone());
        Ok(value)
    }
}

impl Overlay<'_> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    fn extend(&mut self, mutations: Vec<Mutation>) {
        for mutation in mutations {
            match mutation {
                Mutation::Put { key, value } => self.pending.insert(key, Some(value)),
                Mutation::Delete { key } => self.pending.insert(key, None),
            };
        }
    }

    /// The changes to make in the live tree, tagged (a delete is a tombstone there), each
    /// checked against sled's inline bound.
    fn into_changes(self) -> crate::redo::Changes {
        self.pending
            .into_iter()
            .map(|(key, value)| {
                let stored = tagged(value.as_deref());
                assert!(
                    stored.len() <= crate::durable::SLED_INLINE_VALUE_BYTES_MAX,
                    "a state value of {} bytes would go to sled's unsynced blob files",
                    stored.len()
                );
                (key, Some(stored))
            })
            .collect()
    }
}

/// Marks a change of the readers' state (odd `change_seq`) for as long as it lives, so that an
/// error in the middle cannot leave the sequence odd.
struct StateChange<'a> {
    shared: &'a Shared,
}

impl<'a> StateChange<'a> {
    fn begin(shared: &'a Shared) -> StateChange<'a> {
        let before = shared.change_seq.fetch_add(1, Ordering::SeqCst);
        assert!(
            before.is_multiple_of(2),
            "state changes overlap: the state write lock must serialise them"
        );
        StateChange { shared }
    }
}

impl Drop for StateChange<'_> {
    fn drop(&mut self) {
        self.shared.change_seq.fetch_add(1, Ordering::SeqCst);
    }
}

pub(crate) struct Shared {
    pub(crate) durable: Durable,
    pointer: sled::Tree,
    /// Where an apply records its changes before it makes them (`redo.rs`).
    redo: sled::Tree,
    pub(crate) state: Arc<RwLock<Layers>>,
    /// Where the state's remembered request ids are (`residency_core::requests`): derived from
    /// the state's `Q/` and `q/` keys when it is opened or replaced, and changed by each apply
    /// under the state write lock, so that it always describes the layers in `state`.
    pub(crate) requests: std::sync::RwLock<HashedRequestIndex>,
    /// One more than the index of the last applied entry (0 before any: index 0 is a real
    /// entry, the initial membership). Updated under the state write lock.
    pub(crate) applied_next: AtomicU64,
    /// The layers as readers see them. Readers take no part in the `state` lock, so a
    /// digest (which holds it only to start) or an install never delays a read.
    pub(crate) read_layers: std::sync::RwLock<Layers>,
    /// A seqlock over (layers, applied revision): odd while an apply, a build's switch or an
    /// install changes them. A reader that saw the same even value before and after its reads
    /// saw one applied state.
    pub(crate) change_seq: AtomicU64,
    /// The applied revision, for watchers to wait on (sent after the state holds it).
    pub(crate) applied_notify: tokio::sync::watch::Sender<u64>,
    snapshot_dir: PathBuf,
    /// The base file: the current snapshot, with its meta.
    current_snapshot: Mutex<Option<(SnapshotMeta, PathBuf)>>,
    incoming: Mutex<Vec<PathBuf>>,
    /// What a running digest must see of keys that applies change in the live tree under it.
    pub(crate) capture: Capture,
    /// Held by a build, a digest and an install from start to end: one at a time.
    build_lock: Arc<tokio::sync::Mutex<()>>,
    /// The proposer's callbacks for its own entries (`answers.rs`).
    pub(crate) answers: crate::AnswerBoard,
    /// Changes written into the live tree since it was made (counted from 0 after a restart):
    /// the server asks for a snapshot build past a bound, so sled stays small.
    pub(crate) live_changes: AtomicU64,
    /// The step after which a test stops the store (`step_done`); never set outside tests.
    crash_after: Mutex<Option<&'static str>>,
}

#[derive(Clone)]
pub struct StateMachineStore {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore").finish_non_exhaustive()
    }
}

pub(crate) fn read_applied(
    view: &impl KvRead<Error = StoreError>,
) -> Result<Option<LogId>, StoreError> {
    match view.get(&applied_key())? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

fn read_membership(view: &impl KvRead<Error = StoreError>) -> Result<StoredMembership, StoreError> {
    match view.get(&membership_key())? {
        Some(bytes) => Ok(codec::decode(&bytes)?),
        None => Ok(StoredMembership::default()),
    }
}

/// A sled tree read as it is stored, untagged (a legacy whole-state tree).
struct PlainTree<'a>(&'a sled::Tree);

impl KvRead for PlainTree<'_> {
    type Error = StoreError;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.get(key)?.map(|value| value.to_vec()))
    }
}

fn pointer_layers(pointer: &sled::Tree) -> Result<Option<LayerNames>, StoreError> {
    match pointer.get(LAYERS_KEY)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| StoreError::corrupt(format!("state layer pointer: {error}"))),
        None => Ok(None),
    }
}

fn set_pointer_layers(pointer: &sled::Tree, names: &LayerNames) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(names).expect("layer names always serialize");
    pointer.insert(LAYERS_KEY, bytes)?;
    Ok(())
}

/// A number never handed out before on this node, for file and tree names. Kept in sled so
/// that a restart cannot reuse the name of a live tree or file.
fn next_seq(pointer: &sled::Tree) -> Result<u64, StoreError> {
    let bumped = pointer.update_and_fetch(NEXT_SEQ_KEY, |old| {
        let old = old
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(1, u64::from_be_bytes);
        Some((old + 1).to_be_bytes().to_vec())
    })?;
    let bytes = bumped.expect("update_and_fetch always stores a value here");
    let bytes: [u8; 8] = bytes.as_ref().try_into().expect("the counter is 8 bytes");
    Ok(u64::from_be_bytes(bytes))
}

fn snapshot_name(seq: u64) -> String {
    format!("snapshot-{seq:020}{SNAPSHOT_SUFFIX}")
}

/// Writes a base file named by a new sequence number into `dir` from `fill`, fsynced, and
/// renamed into place with the directory fsynced. Returns its name.
pub(crate) fn write_base(
    pointer: &sled::Tree,
    dir: &Path,
    meta: &SnapshotMeta,
    fill: impl FnOnce(&mut BaseWriter) -> Result<(), StoreError>,
) -> Result<(String, crate::base::BaseSummary), StoreError> {
    let seq = next_seq(pointer)?;
    let partial = dir.join(format!("build-{seq:020}{PARTIAL_SUFFIX}"));
    let written = File::create(&partial)
        .map_err(StoreError::from)
        .and_then(|file| {
            let mut writer = BaseWriter::new(file, meta)?;
            fill(&mut writer)?;
            writer.finish()
        });
    let summary = match written {
        Ok(summary) => summary,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    let name = snapshot_name(seq);
    std::fs::rename(&partial, dir.join(&name))?;
    crate::durable::sync_directory(dir)?;
    Ok((name, summary))
}

/// Makes the layers of a new store: the base file `fill` writes (at `meta`) under an empty live
/// tree. For `restore`, before any node runs on the store; the caller syncs.
pub(crate) fn create_layers(
    durable: &Durable,
    meta: &SnapshotMeta,
    fill: impl FnOnce(&mut BaseWriter) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let pointer = durable.db().open_tree(POINTER_TREE)?;
    assert!(
        pointer_layers(&pointer)?.is_none(),
        "layers created over an existing store"
    );
    let snapshot_dir = durable.dir().join("snapshots");
    std::fs::create_dir_all(&snapshot_dir)?;
    let (base, _) = write_base(&pointer, &snapshot_dir, meta, fill)?;
    let names = LayerNames {
        base: Some(base),
        deltas: vec![format!("{DELTA_TREE_PREFIX}{}", next_seq(&pointer)?)],
    };
    set_pointer_layers(&pointer, &names)
}

/// The snapshot id of a base at `applied`, with sequence number `seq`.
fn snapshot_id(applied: Option<LogId>, seq: u64) -> String {
    match applied {
        Some(log_id) => format!("{}-{}-{seq}", log_id.leader_id.term, log_id.index),
        None => format!("empty-{seq}"),
    }
}

/// Turns the whole-state tree of a store written before the state was layered into a base
/// file under empty layers, once, on its first open by this version. Returns the new names
/// (not yet synced: the caller syncs before it removes the old tree).
fn migrate_legacy_state(
    db: &sled::Db,
    pointer: &sled::Tree,
    snapshot_dir: &Path,
) -> Result<LayerNames, StoreError> {
    let legacy_name = match pointer.get(LEGACY_CURRENT_TREE_KEY)? {
        Some(name) => Some(
            String::from_utf8(name.to_vec())
                .map_err(|_| StoreError::corrupt("state tree pointer is not UTF-8"))?,
        ),
        None => db
            .tree_names()
            .iter()
            .any(|name| name == LEGACY_INITIAL_STATE_TREE.as_bytes())
            .then(|| LEGACY_INITIAL_STATE_TREE.to_string()),
    };
    let mut base = None;
    if let Some(legacy_name) = legacy_name {
        // An apply a crash cut short is finished before the state is read.
        crate::redo::finish_interrupted(db, &legacy_name)?;
        let tree = db.open_tree(&legacy_name)?;
        if !tree.is_empty() {
            let started = std::time::Instant::now();
            let applied = read_applied(&PlainTree(&tree))?;
            let meta = SnapshotMeta {
                last_log_id: applied,
                last_membership: read_membership(&PlainTree(&tree))?,
                snapshot_id: snapshot_id(applied, 0),
            };
            let (name, summary) = write_base(pointer, snapshot_dir, &meta, |writer| {
                for pair in tree.iter() {
                    let (key, value) = pair?;
                    writer.pair(&key, &value)?;
                }
                Ok(())
            })?;
            tracing::info!(
                pairs = summary.pairs,
                bytes = summary.bytes,
                seconds = started.elapsed().as_secs_f64(),
                "the state of an earlier version became a base file"
            );
            base = Some(name);
        }
    }
    let names = LayerNames {
        base,
        deltas: vec![format!("{DELTA_TREE_PREFIX}{}", next_seq(pointer)?)],
    };
    set_pointer_layers(pointer, &names)?;
    pointer.remove(LEGACY_CURRENT_TREE_KEY)?;
    Ok(names)
}

impl StateMachineStore {
    pub async fn open(durable: Durable) -> Result<StateMachineStore, StoreError> {
        let db = durable.db().clone();
        let pointer = db.open_tree(POINTER_TREE)?;
        let snapshot_dir = durable.dir().join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)?;
        let names = match pointer_layers(&pointer)? {
            Some(names) => names,
            None => {
                let names = migrate_legacy_state(&db, &pointer, &snapshot_dir)?;
                durable.sync_blocking();
                names
            }
        };
        let live_name = names
            .deltas
            .first()
            .ok_or_else(|| StoreError::corrupt("the state's layers name no live tree"))?;
        // An apply a crash cut short is finished before anything reads the state.
        crate::redo::finish_interrupted(&db, live_name)?;
        let redo = db.open_tree(crate::redo::REDO_TREE)?;
        for name in db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            let state_tree =
                name.starts_with(DELTA_TREE_PREFIX) || name.starts_with(LEGACY_STATE_TREE_PREFIX);
            if state_tree && !names.deltas.contains(&name) {
                // Left by a build or an install that crashed before or after its switch.
                db.drop_tree(name.as_bytes())?;
            }
        }
        remove_unnamed_files(&snapshot_dir, names.base.as_deref())?;
        let base = match &names.base {
            Some(name) => {
                let path = snapshot_dir.join(name);
                if !path.exists() {
                    return Err(StoreError::corrupt(format!(
                        "the state's base file {} is missing",
                        path.display()
                    )));
                }
                Some(Arc::new(Base::open(&path)?))
            }
            None => None,
        };
        let layers = Layers {
            live: db.open_tree(live_name)?,
            frozen: names.deltas[1..]
                .iter()
                .map(|name| db.open_tree(name))
                .collect::<Result<_, _>>()?,
            base_name: names.base.clone(),
            base,
        };
        let applied = read_applied(&StateView(&layers))?;
        let requests = load_request_index(&layers)?;
        let current_snapshot = match (&layers.base, &names.base) {
            (Some(base), Some(name)) => Some((base.meta().clone(), snapshot_dir.join(name))),
            _ => None,
        };
        raise_seq_past_existing_names(&pointer, &db, names.base.as_deref())?;
        if let Some(log_id) = current_snapshot
            .as_ref()
            .and_then(|(meta, _)| meta.last_log_id)
        {
            durable.set_snapshot_floor(log_id.index);
        }
        let shared = Shared {
            durable,
            pointer,
            redo,
            read_layers: std::sync::RwLock::new(layers.clone()),
            change_seq: AtomicU64::new(0),
            state: Arc::new(RwLock::new(layers)),
            requests: std::sync::RwLock::new(requests),
            applied_next: AtomicU64::new(applied.map_or(0, |log_id| log_id.index + 1)),
            applied_notify: tokio::sync::watch::Sender::new(
                applied.map_or(0, |log_id| log_id.index),
            ),
            snapshot_dir,
            current_snapshot: Mutex::new(current_snapshot),
            incoming: Mutex::new(Vec::new()),
            capture: Capture::default(),
            build_lock: Arc::default(),
            answers: crate::AnswerBoard::default(),
            live_changes: AtomicU64::new(0),
            crash_after: Mutex::new(None),
        };
        Ok(StateMachineStore {
            shared: Arc::new(shared),
        })
    }

    /// The lock applies and installs take; tests hold it to stand in for either.
    #[cfg(test)]
    pub(crate) fn state_lock(&self) -> Arc<RwLock<Layers>> {
        self.shared.state.clone()
    }

    /// Makes the next build or install stop right after `step` with an error, as a crash
    /// there would (the test then drops the store and opens it again).
    #[cfg(test)]
    pub(crate) fn crash_after(&self, step: &'static str) {
        *self.shared.crash_after.lock().expect("crash hook lock") = Some(step);
    }

    /// The capture a digest starts; tests drive it step by step.
    #[cfg(test)]
    pub(crate) fn capture(&self) -> &Capture {
        &self.shared.capture
    }

    pub fn reader(&self) -> StateReader {
        StateReader::new(self.shared.clone())
    }

    async fn apply_entries(&self, entries: Vec<Entry>) -> Result<Vec<ProposalResult>, StoreError> {
        // The state is synced on its own schedule, apart from the log: it must never hold an
        // entry the log could lose in a crash.
        if let (Some(files), Some(last)) = (self.shared.durable.log_files(), entries.last()) {
            files.wait_durable(last.log_id.index).await;
        }
        // A capture at its bound holds applies off until its walk ends (see `capture.rs`).
        self.shared.capture.wait_for_room().await;
        let layers = self.shared.state.write().await;
        let mut requests = self
            .shared
            .requests
            .write()
            .expect("request index lock poisoned");
        let applied = self.apply_locked(&layers, &mut requests, entries);
        if applied.is_err() {
            // The index may hold changes the state does not: derive it again from the state.
            *requests = load_request_index(&layers)?;
        }
        applied
    }

    /// `apply_entries` under the state write lock and the request index's.
    fn apply_locked(
        &self,
        layers: &Layers,
        requests: &mut HashedRequestIndex,
        entries: Vec<Entry>,
    ) -> Result<Vec<ProposalResult>, StoreError> {
        let mut overlay = Overlay {
            layers,
            pending: BTreeMap::new(),
            seen: std::cell::RefCell::default(),
            requests,
        };
        let mut results = Vec::with_capacity(entries.len());
        let mut last_applied = None;
        let mut writes = 0_u64;
        // (tag, position in `results`) of this node's own proposals (`answers.rs`).
        let mut tagged_entries = Vec::new();
        for entry in entries {
            let revision = Revision(entry.log_id.index);
            let applied = match &entry.payload {
                EntryPayload::Blank => {
                    residency_core::apply(&overlay, &*overlay.requests, revision, &[])?
                }
                EntryPayload::Normal(proposal) => {
                    writes += proposal.commands.len() as u64;
                    if let Some(tag) = proposal.answer_tag.0 {
                        tagged_entries.push((tag, results.len()));
                    }
                    residency_core::apply(
                        &overlay,
                        &*overlay.requests,
                        revision,
                        &proposal.commands,
                    )?
                }
                EntryPayload::Membership(membership) => {
                    // Every id ever in a membership is remembered: a wiped node must rejoin under a new id.
                    for (node_id, _) in membership.nodes() {
                        overlay.put(keys::former_member_key(*node_id), Vec::new());
                    }
                    let stored = StoredMembership::new(Some(entry.log_id), membership.clone());
                    overlay.put(membership_key(), codec::encode(&stored));
                    residency_core::apply(&overlay, &*overlay.requests, revision, &[])?
                }
            };
            overlay.requests.apply(&applied.index_changes);
            overlay.extend(applied.mutations);
            overlay.put(applied_key(), codec::encode(&entry.log_id));
            results.push(ProposalResult {
                results: applied.results,
            });
            last_applied = Some(entry.log_id);
        }
        let live = &layers.live;
        self.shared.capture.record(live, overlay.pending.keys())?;
        let _change = StateChange::begin(&self.shared);
        let changes = overlay.into_changes();
        self.shared
            .live_changes
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        // Decided: the proposer may answer its writes now, inside the change (`answers.rs`).
        for (tag, position) in tagged_entries {
            let decided: &ProposalResult = &results[position];
            self.shared.answers.answer(tag, &decided.results);
        }
        // Key by key behind a redo record, whatever the apply's size: as atomic as a sled
        // batch, cheaper for a small apply, and never under sled's global write lock, which a
        // batch holds while it may wait for sled's flusher: a batch that had to read back a page
        // still in an unwritten IO buffer hung the whole node (the flusher waits for that lock;
        // docs/storage.md).
        let tree_name = String::from_utf8_lossy(&live.name()).into_owned();
        crate::redo::write(&self.shared.redo, live, &tree_name, &changes)?;
        if let Some(log_id) = last_applied {
            let previous = self
                .shared
                .applied_next
                .swap(log_id.index + 1, Ordering::SeqCst);
            assert!(previous <= log_id.index, "applied index went backwards");
            self.shared.applied_notify.send_replace(log_id.index);
        }
        metrics::counter!("residency_entries_applied_total").increment(results.len() as u64);
        metrics::counter!("residency_writes_applied_total").increment(writes);
        Ok(results)
    }
}

/// The number in a name such as `snapshot-00000000000000000042.snap`, `delta-42` or `state-42`.
fn seq_in_name(name: &str) -> Option<u64> {
    let stem = name
        .strip_suffix(SNAPSHOT_SUFFIX)
        .or_else(|| name.strip_suffix(PARTIAL_SUFFIX))
        .unwrap_or(name);
    stem.rsplit('-').next()?.parse().ok()
}

/// The sequence counter is bumped without a sync, so a crash can leave it behind names that
/// did reach the disk (a renamed base file, a tree). Handing such a number out again would
/// make a new file overwrite, then delete, the current one. So on open the counter is raised
/// past every number in use.
fn raise_seq_past_existing_names(
    pointer: &sled::Tree,
    db: &sled::Db,
    base_name: Option<&str>,
) -> Result<(), StoreError> {
    let tree_seqs = db
        .tree_names()
        .into_iter()
        .filter_map(|name| String::from_utf8(name.to_vec()).ok())
        .filter(|name| {
            name.starts_with(DELTA_TREE_PREFIX) || name.starts_with(LEGACY_STATE_TREE_PREFIX)
        })
        .filter_map(|name| seq_in_name(&name));
    let floor = tree_seqs
        .chain(base_name.and_then(seq_in_name))
        .max()
        .unwrap_or(0);
    pointer.update_and_fetch(NEXT_SEQ_KEY, |old| {
        let old = old
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(0, u64::from_be_bytes);
        Some(old.max(floor).to_be_bytes().to_vec())
    })?;
    Ok(())
}

/// Removes every file of the snapshot directory but the base the layers name: partial builds
/// and receptions from before a crash, a base a crash left unnamed, snapshots of an earlier
/// version.
fn remove_unnamed_files(dir: &Path, base_name: Option<&str>) -> Result<(), StoreError> {
    for item in std::fs::read_dir(dir)? {
        let path = item?.path();
        let name = path.file_name().and_then(|name| name.to_str());
        if name != base_name {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

impl Shared {
    /// `step` is done and durable: stops here if a test asked for it.
    fn step_done(&self, step: &'static str) -> Result<(), StoreError> {
        let mut crash_after = self.crash_after.lock().expect("crash hook lock");
        if *crash_after == Some(step) {
            *crash_after = None;
            return Err(StoreError::corrupt(format!("test crash after: {step}")));
        }
        Ok(())
    }

    fn next_path(&self, stem: &str, suffix: &str) -> Result<PathBuf, StoreError> {
        let seq = next_seq(&self.pointer)?;
        Ok(self.snapshot_dir.join(format!("{stem}-{seq:020}{suffix}")))
    }

    /// The current snapshot, opened under the lock that deletes replaced ones.
    pub(crate) fn open_current_snapshot(&self) -> Result<Option<(SnapshotMeta, File)>, StoreError> {
        let current = self
            .current_snapshot
            .lock()
            .expect("snapshot lock poisoned");
        match current.as_ref() {
            Some((meta, path)) => Ok(Some((meta.clone(), File::open(path)?))),
            None => Ok(None),
        }
    }

    /// Makes `base` (named `name`, at `meta`) the state's base under `live`, with no frozen
    /// tree, in one durable step; then drops the trees and the base file it replaces.
    /// `inside_change` runs inside the readers' state change, with the new layers in place.
    ///
    /// The caller holds the build lock, so nothing else changes which layers make up the state;
    /// the sync is made before the state lock is taken, so applies (into `live`, the live tree
    /// before and after) wait only for the swap in memory.
    fn switch_base(
        &self,
        base: Arc<Base>,
        name: String,
        meta: &SnapshotMeta,
        live: sled::Tree,
        inside_change: impl FnOnce(),
    ) -> Result<(), StoreError> {
        let new_layers = Layers {
            live,
            frozen: Vec::new(),
            base: Some(base),
            base_name: Some(name.clone()),
        };
        set_pointer_layers(&self.pointer, &new_layers.names())?;
        self.durable.sync_blocking();
        self.step_done(step::LAYERS_SWITCHED)?;
        let mut state = self.state.blocking_write();
        let old = {
            let _change = StateChange::begin(self);
            *self.read_layers.write().expect("read layers lock poisoned") = new_layers.clone();
            let old = std::mem::replace(&mut *state, new_layers);
            if old.live.name() != state.live.name() {
                self.live_changes.store(0, Ordering::Relaxed);
            }
            inside_change();
            old
        };
        let live_name = state.live.name();
        drop(state);
        {
            let mut current = self
                .current_snapshot
                .lock()
                .expect("snapshot lock poisoned");
            *current = Some((meta.clone(), self.snapshot_dir.join(&name)));
            if let Some(log_id) = meta.last_log_id {
                self.durable.set_snapshot_floor(log_id.index);
            }
            // Deleted under the lock that opens the current snapshot: a reader that opened the
            // old one keeps reading it through its handle.
            if let Some(old_name) = &old.base_name
                && *old_name != name
            {
                std::fs::remove_file(self.snapshot_dir.join(old_name))?;
            }
        }
        self.step_done(step::OLD_BASE_DELETED)?;
        let db = self.durable.db();
        for tree in std::iter::once(&old.live).chain(&old.frozen) {
            if tree.name() != live_name {
                db.drop_tree(tree.name())?;
            }
        }
        Ok(())
    }

    /// Merges the frozen trees of `frozen` with its base into a new base file and switches to
    /// it. Runs on a blocking thread while applies go on into the live tree.
    fn write_snapshot(&self, start: &BuildStart) -> Result<(SnapshotMeta, File), StoreError> {
        let started = std::time::Instant::now();
        let seq = next_seq(&self.pointer)?;
        let meta = SnapshotMeta {
            last_log_id: start.last_log_id,
            last_membership: start.last_membership.clone(),
            snapshot_id: snapshot_id(start.last_log_id, seq),
        };
        let mut merged: Merged<'static> = start.layers.below_live();
        let (name, summary) = write_base(&self.pointer, &self.snapshot_dir, &meta, |writer| {
            while let Some((key, value)) = merged.next_pair()? {
                writer.pair(&key, &value)?;
            }
            Ok(())
        })?;
        self.step_done(step::BASE_WRITTEN)?;
        let path = self.snapshot_dir.join(&name);
        let base = Arc::new(Base::open(&path)?);
        let live = self.state.blocking_read().live.clone();
        self.switch_base(base, name, &meta, live, || {})?;
        let file = self
            .open_current_snapshot()?
            .expect("the base just switched to is the current snapshot")
            .1;
        metrics::histogram!("residency_snapshot_build_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("residency_snapshot_bytes").set(summary.bytes as f64);
        metrics::gauge!("residency_snapshot_pairs").set(summary.pairs as f64);
        tracing::info!(
            pairs = summary.pairs,
            bytes = summary.bytes,
            blocks = summary.blocks,
            frozen_trees = start.layers.frozen.len(),
            seconds = started.elapsed().as_secs_f64(),
            index = meta.last_log_id.map(|log_id| log_id.index),
            "snapshot built: a new base file"
        );
        Ok((meta, file))
    }

    /// The path of a received snapshot file: the one `begin_receiving_snapshot` made for it, or,
    /// for a snapshot handed over some other way, a copy of it in the snapshot directory.
    fn claim_received(&self, mut file: File) -> Result<PathBuf, StoreError> {
        file.sync_all()?;
        let inode = file.metadata()?.ino();
        let mut incoming = self.incoming.lock().expect("incoming lock poisoned");
        let position = incoming
            .iter()
            .position(|path| std::fs::metadata(path).is_ok_and(|found| found.ino() == inode));
        if let Some(position) = position {
            return Ok(incoming.remove(position));
        }
        drop(incoming);
        let path = self.next_path("copied", PARTIAL_SUFFIX)?;
        let mut copy = File::create(&path)?;
        file.seek(SeekFrom::Start(0))?;
        std::io::copy(&mut file, &mut copy)?;
        copy.sync_all()?;
        Ok(path)
    }

    /// Verifies a received snapshot file and makes it the state's base, under a new empty live
    /// tree. A base file is adopted as it is; one in the older stream format is first written
    /// out as a base.
    fn install_snapshot_file(&self, meta: &SnapshotMeta, partial: &Path) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let announced = |header: &SnapshotMeta| {
            if header.last_log_id == meta.last_log_id {
                return Ok(());
            }
            Err(StoreError::corrupt(format!(
                "snapshot file is for {:?}, the leader announced {:?}",
                header.last_log_id, meta.last_log_id
            )))
        };
        let file = File::open(partial)?;
        let mut prefix = [0_u8; 8];
        let read = std::os::unix::fs::FileExt::read_at(&file, &mut prefix, 0)?;
        let (base, name) = if Base::is_base(&prefix[..read]) {
            // Opened once: its checksums when opened, every block decoded by `verify`; the
            // handle stays good across the rename.
            let base = Base::from_file(file)?;
            announced(base.meta())?;
            base.verify()?;
            let name = snapshot_name(next_seq(&self.pointer)?);
            std::fs::rename(partial, self.snapshot_dir.join(&name))?;
            crate::durable::sync_directory(&self.snapshot_dir)?;
            (base, name)
        } else {
            // The older stream, checked as it is read: written out as a base first.
            let (mut pairs, header) = open_snapshot(file)?;
            announced(&header)?;
            let (name, _) = write_base(&self.pointer, &self.snapshot_dir, &header, |writer| {
                while let Some((key, value)) = pairs.next_pair()? {
                    writer.pair(&key, &value)?;
                }
                Ok(())
            })?;
            std::fs::remove_file(partial)?;
            let base = Base::open(&self.snapshot_dir.join(&name))?;
            (base, name)
        };
        self.step_done(step::BASE_RECEIVED)?;
        let path = self.snapshot_dir.join(&name);
        let db = self.durable.db();
        let live_name = format!("{DELTA_TREE_PREFIX}{}", next_seq(&self.pointer)?);
        let checked = db
            .open_tree(&live_name)
            .map_err(StoreError::from)
            .and_then(|live| {
                let adopted = Layers {
                    live,
                    frozen: Vec::new(),
                    base: Some(Arc::new(base)),
                    base_name: Some(name.clone()),
                };
                let applied = read_applied(&StateView(&adopted))?;
                if applied != meta.last_log_id {
                    return Err(StoreError::corrupt(
                        "snapshot state disagrees with its header",
                    ));
                }
                let requests = load_request_index(&adopted)?;
                Ok((adopted, applied, requests))
            });
        let (adopted, applied, requests) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                let _ = std::fs::remove_file(&path);
                let _ = db.drop_tree(live_name.as_bytes());
                return Err(error);
            }
        };
        {
            // openraft's state machine worker runs an install and applies one at a time, so no
            // apply writes into the live tree this replaces while it is switched.
            let base = adopted.base.expect("set above");
            let mut requests = Some(requests);
            self.switch_base(base, name, meta, adopted.live, || {
                *self.requests.write().expect("request index lock poisoned") =
                    requests.take().expect("switched once");
                self.applied_next.store(
                    applied.map_or(0, |log_id| log_id.index + 1),
                    Ordering::SeqCst,
                );
                self.applied_notify
                    .send_replace(applied.map_or(0, |log_id| log_id.index));
            })?;
        }
        crate::log_store::finish_held_back_purge(&self.durable)?;
        metrics::histogram!("residency_snapshot_install_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            index = applied.map(|log_id| log_id.index),
            seconds = started.elapsed().as_secs_f64(),
            "snapshot installed: its base file adopted"
        );
        Ok(())
    }
}

/// The request index of the state in `layers`.
fn load_request_index(layers: &Layers) -> Result<HashedRequestIndex, StoreError> {
    let started = std::time::Instant::now();
    let mut index = HashedRequestIndex::default();
    residency_core::requests::load_index(&StateView(layers), |request_id, place| {
        index.insert(&request_id, place);
    })?;
    tracing::debug!(
        ids = index.len(),
        seconds = started.elapsed().as_secs_f64(),
        "request index loaded"
    );
    Ok(index)
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let layers = self.shared.state.read().await;
        let view = StateView(&layers);
        let applied = read_applied(&view).map_err(sm_error(ErrorVerb::Read))?;
        let membership = read_membership(&view).map_err(sm_error(ErrorVerb::Read))?;
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ProposalResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.apply_entries(entries)
            .await
            .map_err(sm_error(ErrorVerb::Write))
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self
            .shared
            .next_path("incoming", PARTIAL_SUFFIX)
            .map_err(snapshot_error(ErrorVerb::Write))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|error| snapshot_error(ErrorVerb::Write)(error.into()))?;
        self.shared
            .incoming
            .lock()
            .expect("incoming lock poisoned")
            .push(path);
        self.shared.durable.set_installing(true);
        tracing::info!("receiving a snapshot from the leader");
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let file = snapshot.into_std().await;
        let shared = self.shared.clone();
        let meta = meta.clone();
        // A running build or digest reads the layers this install replaces.
        let building = self.shared.build_lock.clone().lock_owned().await;
        // Syncing (and maybe copying) a large file must not hold up an async worker thread.
        tokio::task::spawn_blocking(move || {
            let _building = building;
            let partial = shared.claim_received(file)?;
            let result = shared.install_snapshot_file(&meta, &partial);
            if result.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            // Installed and durable (the snapshot floor moved with it), or failed: either way
            // the log may purge again by the floor alone.
            shared.durable.set_installing(false);
            result
        })
        .await
        .expect("snapshot install thread panicked")
        .map_err(snapshot_error(ErrorVerb::Write))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self
            .shared
            .open_current_snapshot()
            .map_err(snapshot_error(ErrorVerb::Read))?;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

#[derive(Clone)]
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SnapshotBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotBuilder").finish_non_exhaustive()
    }
}

/// What a build merges: the layers as they were frozen, and the revision and membership the
/// frozen state is at.
struct BuildStart {
    layers: Layers,
    last_log_id: Option<LogId>,
    last_membership: StoredMembership,
}

/// A running walk of the state as of its start: ends the capture and releases the build lock
/// when dropped, also when the walk fails or is cancelled.
pub(crate) struct Walking {
    shared: Arc<Shared>,
    _building: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Walking {
    fn drop(&mut self) {
        let counts = self.shared.capture.stop();
        metrics::gauge!("residency_snapshot_captured_keys").set(counts.peak as f64);
    }
}

impl Shared {
    /// Starts a walk of the state as it is now (see `capture.rs`): waits for any build, digest
    /// or install, and holds off applies only while `at_start` reads what the walk needs.
    pub(crate) async fn start_walk<T>(
        self: &Arc<Self>,
        at_start: impl FnOnce(&Layers) -> Result<T, StoreError>,
    ) -> Result<(Walking, Layers, T), StoreError> {
        let building = self.build_lock.clone().lock_owned().await;
        let layers = self.state.read().await;
        let read = at_start(&layers)?;
        self.capture.start();
        let walking = Walking {
            shared: self.clone(),
            _building: building,
        };
        Ok((walking, layers.clone(), read))
    }

    /// Freezes the live tree under a new empty one (not synced: sled keeps its writes in order,
    /// so after a crash the new tree's changes are there only if the pointer naming it is).
    /// Returns what the build merges.
    async fn freeze_live(&self) -> Result<BuildStart, StoreError> {
        let mut state = self.state.write().await;
        let view = StateView(&state);
        let last_log_id = read_applied(&view)?;
        let last_membership = read_membership(&view)?;
        let fresh = self
            .durable
            .db()
            .open_tree(format!("{DELTA_TREE_PREFIX}{}", next_seq(&self.pointer)?))?;
        let mut frozen = vec![state.live.clone()];
        frozen.extend(state.frozen.iter().cloned());
        let layers = Layers {
            live: fresh,
            frozen,
            base: state.base.clone(),
            base_name: state.base_name.clone(),
        };
        set_pointer_layers(&self.pointer, &layers.names())?;
        {
            let _change = StateChange::begin(self);
            *self.read_layers.write().expect("read layers lock poisoned") = layers.clone();
            *state = layers.clone();
            self.live_changes.store(0, Ordering::Relaxed);
        }
        self.step_done(step::LIVE_FROZEN)?;
        Ok(BuildStart {
            layers,
            last_log_id,
            last_membership,
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let building = self.shared.build_lock.clone().lock_owned().await;
        let start = self
            .shared
            .freeze_live()
            .await
            .map_err(snapshot_error(ErrorVerb::Read))?;
        let shared = self.shared.clone();
        let (meta, file) = tokio::task::spawn_blocking(move || {
            let _building = building;
            shared.write_snapshot(&start)
        })
        .await
        .expect("snapshot build thread panicked")
        .map_err(snapshot_error(ErrorVerb::Write))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}
