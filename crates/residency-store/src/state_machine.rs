//! The replicated state machine on sled: apply, snapshot build and install.
//!
//! The state lives in one sled tree (named by the `sm_pointer` tree, so that installing a
//! snapshot can build a whole new tree and switch to it in one durable step). Each `apply` call
//! decides its entries through `residency_core::apply` over an overlay, then writes all their
//! mutations *and* the applied log id atomically (key by key behind a redo record that a crash
//! cannot leave half-made, `redo.rs`): the applied revision is always
//! exactly the revision of the data beside it.
//!
//! Apply does not fsync: after a crash the node re-applies from its durable log. Before a
//! snapshot is written (after which the log may be purged) the state is synced.
//!
//! A snapshot build holds the state lock only while it starts: it reads the applied log id and
//! the membership, and starts a capture (`capture.rs`), so that it can then stream the state as
//! of that revision while applies go on. An install waits for a running build (the build lock).
//! Reads never take the state lock: they use the `change_seq` seqlock, see `reader.rs`.

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

use crate::base::BaseWriter;
use crate::capture::{AsOfStart, Capture};
use crate::error::{sm_error, snapshot_error};
use crate::reader::StateReader;
use crate::snapshot::{SnapshotPairs, open_snapshot};
use crate::{
    Durable, Entry, LogId, SnapshotMeta, StorageError, StoreError, StoredMembership, TypeConfig,
};

const POINTER_TREE: &str = "sm_pointer";
const CURRENT_TREE_KEY: &str = "current";
const NEXT_SEQ_KEY: &str = "next_seq";
const STATE_TREE_PREFIX: &str = "state-";
/// The state tree of a store no snapshot was ever installed into.
pub(crate) const INITIAL_STATE_TREE: &str = "state-0";
const SNAPSHOT_SUFFIX: &str = ".snap";
const PARTIAL_SUFFIX: &str = ".partial";
/// The most changes one apply writes behind a redo record (`redo.rs`); more go in one sled
/// batch. A batch costs about the same whatever its size (two rolls of sled's IO buffer, each
/// waking all of sled's pool threads), a redo costs each change once more: past a few hundred
/// changes the batch is the cheaper of the two atomic writes.
const REDO_CHANGES_MAX: usize = 512;

pub(crate) fn applied_key() -> Vec<u8> {
    keys::meta_key("applied")
}

pub(crate) fn membership_key() -> Vec<u8> {
    keys::meta_key("membership")
}

/// A read view of the live state tree, for the core's queries.
#[derive(Debug)]
pub struct TreeView<'a>(pub(crate) &'a sled::Tree);

impl KvRead for TreeView<'_> {
    type Error = sled::Error;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, sled::Error> {
        Ok(self.0.get(key)?.map(|value| value.to_vec()))
    }
}

impl residency_core::KvScan for TreeView<'_> {
    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, sled::Error> {
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after.to_vec()),
            None => std::ops::Bound::Included(prefix.to_vec()),
        };
        self.0
            .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded))
            .take_while(|item| {
                item.as_ref()
                    .map_or(true, |(key, _)| key.starts_with(prefix))
            })
            .take(limit)
            .map(|item| item.map(|(key, value)| (key.to_vec(), value.to_vec())))
            .collect()
    }
}

/// The tree plus the not yet written mutations of the entries applied so far in this call.
/// The tree does not change during the call (the state lock is held), so what was read from it
/// is remembered: the entries of one call read their catalog and counters from sled once.
struct Overlay<'a> {
    tree: &'a sled::Tree,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    seen: std::cell::RefCell<BTreeMap<Vec<u8>, Option<sled::IVec>>>,
    /// The request index, with the changes of the entries applied so far in this call.
    requests: &'a mut HashedRequestIndex,
}

impl KvRead for Overlay<'_> {
    type Error = sled::Error;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, sled::Error> {
        if let Some(value) = self.pending.get(key) {
            return Ok(value.clone());
        }
        if let Some(value) = self.seen.borrow().get(key) {
            return Ok(value.as_deref().map(<[u8]>::to_vec));
        }
        let value = self.tree.get(key)?;
        let found = value.as_deref().map(<[u8]>::to_vec);
        self.seen.borrow_mut().insert(key.to_vec(), value);
        Ok(found)
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

    /// The changes to make, each value checked against sled's inline bound.
    fn into_changes(self) -> crate::redo::Changes {
        for value in self.pending.values().flatten() {
            assert!(
                value.len() <= crate::durable::SLED_INLINE_VALUE_BYTES_MAX,
                "a state value of {} bytes would go to sled's unsynced blob files",
                value.len()
            );
        }
        self.pending
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
    pub(crate) state: Arc<RwLock<sled::Tree>>,
    /// Where the state's remembered request ids are (`residency_core::requests`): derived from
    /// the state's `Q/` and `q/` keys when it is opened or replaced, and changed by each apply
    /// under the state write lock, so that it always describes the tree in `state`.
    pub(crate) requests: std::sync::RwLock<HashedRequestIndex>,
    /// One more than the index of the last applied entry (0 before any: index 0 is a real
    /// entry, the initial membership). Updated under the state write lock.
    pub(crate) applied_next: AtomicU64,
    /// The live tree as readers see it. Readers take no part in the `state` lock, so a snapshot
    /// build (which holds it for as long as it streams the tree) delays applies, never reads.
    pub(crate) read_tree: std::sync::RwLock<sled::Tree>,
    /// A seqlock over (tree, applied revision): odd while an apply or install changes them. A
    /// reader that saw the same even value before and after its reads saw one applied state.
    pub(crate) change_seq: AtomicU64,
    /// The applied revision, for watchers to wait on (sent after the state holds it).
    pub(crate) applied_notify: tokio::sync::watch::Sender<u64>,
    snapshot_dir: PathBuf,
    current_snapshot: Mutex<Option<(SnapshotMeta, PathBuf)>>,
    incoming: Mutex<Vec<PathBuf>>,
    /// What the running snapshot build must see of keys that applies change under it.
    pub(crate) capture: Capture,
    /// Held by a walk over the capture (a snapshot build, a digest) from its start to its end,
    /// and by an install, which replaces the tree a walk reads.
    build_lock: Arc<tokio::sync::Mutex<()>>,
    /// The proposer's callbacks for its own entries (`answers.rs`).
    pub(crate) answers: crate::AnswerBoard,
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

pub(crate) fn read_applied(tree: &sled::Tree) -> Result<Option<LogId>, StoreError> {
    match tree.get(applied_key())? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

fn read_membership(tree: &sled::Tree) -> Result<StoredMembership, StoreError> {
    match tree.get(membership_key())? {
        Some(bytes) => Ok(codec::decode(&bytes)?),
        None => Ok(StoredMembership::default()),
    }
}

impl StateMachineStore {
    pub async fn open(durable: Durable) -> Result<StateMachineStore, StoreError> {
        let db = durable.db().clone();
        let pointer = db.open_tree(POINTER_TREE)?;
        let current_name = match pointer.get(CURRENT_TREE_KEY)? {
            Some(name) => String::from_utf8(name.to_vec())
                .map_err(|_| StoreError::corrupt("state tree pointer is not UTF-8"))?,
            None => INITIAL_STATE_TREE.to_string(),
        };
        // An apply a crash cut short is finished before anything reads the state.
        crate::redo::finish_interrupted(&db, &current_name)?;
        let redo = db.open_tree(crate::redo::REDO_TREE)?;
        for name in db.tree_names() {
            let stale =
                name.starts_with(STATE_TREE_PREFIX.as_bytes()) && name != current_name.as_bytes();
            if stale {
                // Left by an install that crashed before switching to it.
                db.drop_tree(&name)?;
            }
        }
        let tree = db.open_tree(&current_name)?;
        let applied = read_applied(&tree)?;
        let requests = load_request_index(&tree)?;
        let snapshot_dir = durable.dir().join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)?;
        let current_snapshot = find_current_snapshot(&snapshot_dir, applied)?;
        raise_seq_past_existing_names(&pointer, &db, current_snapshot.as_ref())?;
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
            read_tree: std::sync::RwLock::new(tree.clone()),
            change_seq: AtomicU64::new(0),
            state: Arc::new(RwLock::new(tree)),
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
        };
        Ok(StateMachineStore {
            shared: Arc::new(shared),
        })
    }

    /// The lock applies and installs take; tests hold it to stand in for either.
    #[cfg(test)]
    pub(crate) fn state_lock(&self) -> Arc<RwLock<sled::Tree>> {
        self.shared.state.clone()
    }

    /// The capture a snapshot build starts; tests drive it step by step.
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
        let tree = self.shared.state.write().await;
        let mut requests = self
            .shared
            .requests
            .write()
            .expect("request index lock poisoned");
        let applied = self.apply_locked(&tree, &mut requests, entries);
        if applied.is_err() {
            // The index may hold changes the tree does not: derive it again from the tree.
            *requests = load_request_index(&tree)?;
        }
        applied
    }

    /// `apply_entries` under the state write lock and the request index's.
    fn apply_locked(
        &self,
        tree: &sled::Tree,
        requests: &mut HashedRequestIndex,
        entries: Vec<Entry>,
    ) -> Result<Vec<ProposalResult>, StoreError> {
        let mut overlay = Overlay {
            tree,
            pending: BTreeMap::new(),
            seen: std::cell::RefCell::default(),
            requests,
        };
        let mut results = Vec::with_capacity(entries.len());
        let mut last_applied = None;
        let mut writes = 0_u64;
        // (tag, position in `results`) of this node's own proposals (`answers.rs`).
        let mut tagged = Vec::new();
        for entry in entries {
            let revision = Revision(entry.log_id.index);
            let applied = match &entry.payload {
                EntryPayload::Blank => {
                    residency_core::apply(&overlay, &*overlay.requests, revision, &[])?
                }
                EntryPayload::Normal(proposal) => {
                    writes += proposal.commands.len() as u64;
                    if let Some(tag) = proposal.answer_tag.0 {
                        tagged.push((tag, results.len()));
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
        self.shared.capture.record(tree, overlay.pending.keys())?;
        let _change = StateChange::begin(&self.shared);
        let changes = overlay.into_changes();
        // Decided: the proposer may answer its writes now, inside the change (`answers.rs`).
        for (tag, position) in tagged {
            let decided: &ProposalResult = &results[position];
            self.shared.answers.answer(tag, &decided.results);
        }
        if changes.len() <= REDO_CHANGES_MAX {
            // Key by key behind a redo record: as atomic as a sled batch, and for a small
            // apply far cheaper (`redo.rs`).
            let tree_name = String::from_utf8_lossy(&tree.name()).into_owned();
            crate::redo::write(&self.shared.redo, tree, &tree_name, &changes)?;
        } else {
            // A large apply: the batch's fixed cost is shared by many changes, while a redo
            // would write each of them twice.
            let mut batch = sled::Batch::default();
            for (key, value) in changes {
                match value {
                    Some(value) => batch.insert(key, value),
                    None => batch.remove(key),
                }
            }
            tree.apply_batch(batch)?;
        }
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

/// The number in a name such as `snapshot-00000000000000000042.snap` or `state-42`.
fn seq_in_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SNAPSHOT_SUFFIX).unwrap_or(name);
    stem.rsplit('-').next()?.parse().ok()
}

/// The sequence counter is bumped without a sync, so a crash can leave it behind names that
/// did reach the disk (a renamed snapshot file). Handing such a number out again would make a
/// new snapshot overwrite, then delete, the current one. So on open the counter is raised past
/// every number in use.
fn raise_seq_past_existing_names(
    pointer: &sled::Tree,
    db: &sled::Db,
    current_snapshot: Option<&(SnapshotMeta, PathBuf)>,
) -> Result<(), StoreError> {
    let snapshot_seq =
        current_snapshot.and_then(|(_, path)| path.file_name()?.to_str().and_then(seq_in_name));
    let tree_seqs = db
        .tree_names()
        .into_iter()
        .filter_map(|name| String::from_utf8(name.to_vec()).ok())
        .filter(|name| name.starts_with(STATE_TREE_PREFIX))
        .filter_map(|name| seq_in_name(&name));
    let floor = tree_seqs.chain(snapshot_seq).max().unwrap_or(0);
    pointer.update_and_fetch(NEXT_SEQ_KEY, |old| {
        let old = old
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(0, u64::from_be_bytes);
        Some(old.max(floor).to_be_bytes().to_vec())
    })?;
    Ok(())
}

/// A received snapshot that the state was switched to before a crash kept it from becoming
/// the current snapshot (the install switches the state first, then adopts the file): whole,
/// and at exactly the state's applied log id. Adopted under a `.snap` name of its own, so
/// that openraft never sees the state ahead of the snapshot that produced it.
fn adopt_installed_partial(
    dir: &Path,
    path: &Path,
    name: &str,
    applied: Option<LogId>,
) -> Result<Option<PathBuf>, StoreError> {
    let received = name.starts_with("incoming-") || name.starts_with("copied-");
    let Some(seq) = name
        .strip_suffix(PARTIAL_SUFFIX)
        .and_then(|stem| stem.rsplit('-').next())
    else {
        return Ok(None);
    };
    if !received || applied.is_none() {
        return Ok(None);
    }
    let Ok((mut reader, meta)) = open_snapshot(File::open(path)?) else {
        return Ok(None);
    };
    if meta.last_log_id != applied {
        return Ok(None);
    }
    loop {
        match reader.next_pair() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => return Ok(None),
        }
    }
    let adopted = dir.join(format!("snapshot-{seq}{SNAPSHOT_SUFFIX}"));
    std::fs::rename(path, &adopted)?;
    crate::durable::sync_directory(dir)?;
    tracing::info!(
        index = applied.map(|log_id| log_id.index),
        "adopted the snapshot an interrupted install had switched the state to"
    );
    Ok(Some(adopted))
}

fn find_current_snapshot(
    dir: &Path,
    applied: Option<LogId>,
) -> Result<Option<(SnapshotMeta, PathBuf)>, StoreError> {
    let mut newest: Option<(SnapshotMeta, PathBuf)> = None;
    for item in std::fs::read_dir(dir)? {
        let mut path = item?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.ends_with(SNAPSHOT_SUFFIX) {
            match adopt_installed_partial(dir, &path, &name, applied)? {
                Some(adopted) => path = adopted,
                None => {
                    // Partial builds and receptions from before a crash.
                    std::fs::remove_file(&path)?;
                    continue;
                }
            }
        }
        let (_, meta) = open_snapshot(File::open(&path)?)?;
        let newer = newest
            .as_ref()
            .is_none_or(|(best, _)| meta.last_log_id > best.last_log_id);
        if newer {
            if let Some((_, older)) = newest.take() {
                std::fs::remove_file(older)?;
            }
            newest = Some((meta, path));
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(newest)
}

impl Shared {
    /// A number never handed out before on this node, for file and tree names. Kept in sled so
    /// that a restart cannot reuse the name of the live state tree or snapshot.
    fn next_seq(&self) -> Result<u64, StoreError> {
        let bumped = self.pointer.update_and_fetch(NEXT_SEQ_KEY, |old| {
            let old = old
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map_or(1, u64::from_be_bytes);
            Some((old + 1).to_be_bytes().to_vec())
        })?;
        let bytes = bumped.expect("update_and_fetch always stores a value here");
        let bytes: [u8; 8] = bytes.as_ref().try_into().expect("the counter is 8 bytes");
        Ok(u64::from_be_bytes(bytes))
    }

    fn next_path(&self, stem: &str, suffix: &str) -> Result<PathBuf, StoreError> {
        let seq = self.next_seq()?;
        Ok(self.snapshot_dir.join(format!("{stem}-{seq:020}{suffix}")))
    }

    /// Makes `path` the current snapshot and deletes the one it replaces.
    /// Returns the new snapshot opened: opened under the same lock that deletes replaced
    /// snapshots, so a concurrent build or install cannot delete it before it is read.
    fn adopt_snapshot(&self, meta: SnapshotMeta, partial: &Path) -> Result<File, StoreError> {
        let path = self.next_path("snapshot", SNAPSHOT_SUFFIX)?;
        std::fs::rename(partial, &path)?;
        crate::durable::sync_directory(&self.snapshot_dir)?;
        let mut current = self
            .current_snapshot
            .lock()
            .expect("snapshot lock poisoned");
        let opened = File::open(&path)?;
        if let Some(log_id) = meta.last_log_id {
            self.durable.set_snapshot_floor(log_id.index);
        }
        if let Some((_, old_path)) = current.replace((meta, path.clone()))
            && old_path != path
        {
            std::fs::remove_file(old_path)?;
        }
        Ok(opened)
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

    /// Streams the state as of `start` to a new snapshot file, while applies go on.
    fn write_snapshot(&self, start: &BuildStart) -> Result<(SnapshotMeta, File), StoreError> {
        let started = std::time::Instant::now();
        // The log may be purged up to this snapshot, so the state it covers must be durable.
        // It is once this returns: it was applied before the build started.
        self.durable.sync_blocking();
        let seq = self.next_seq()?;
        let snapshot_id = match start.last_log_id {
            Some(log_id) => format!("{}-{}-{seq}", log_id.leader_id.term, log_id.index),
            None => format!("empty-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: start.last_log_id,
            last_membership: start.last_membership.clone(),
            snapshot_id,
        };
        let partial = self.next_path("build", PARTIAL_SUFFIX)?;
        let file = File::create(&partial)?;
        let mut writer = BaseWriter::new(file, &meta)?;
        let mut walk = AsOfStart::new(&self.capture, &start.tree);
        while let Some((key, value)) = walk.next_pair()? {
            writer.pair(&key, &value)?;
        }
        let captured = self.capture.counts();
        let pairs = writer.finish()?.pairs;
        let file = self.adopt_snapshot(meta.clone(), &partial)?;
        let bytes = file.metadata()?.len();
        metrics::histogram!("residency_snapshot_build_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("residency_snapshot_bytes").set(bytes as f64);
        metrics::gauge!("residency_snapshot_pairs").set(pairs as f64);
        metrics::gauge!("residency_snapshot_captured_keys").set(captured.peak as f64);
        tracing::info!(
            pairs,
            bytes,
            captured = captured.total,
            captured_peak = captured.peak,
            seconds = started.elapsed().as_secs_f64(),
            index = meta.last_log_id.map(|log_id| log_id.index),
            "snapshot built"
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

    /// Loads a received snapshot file into a fresh tree, verifies it, then switches to it.
    fn install_snapshot_file(&self, meta: &SnapshotMeta, partial: &Path) -> Result<(), StoreError> {
        let (mut reader, header) = open_snapshot(File::open(partial)?)?;
        if header.last_log_id != meta.last_log_id {
            return Err(StoreError::corrupt(format!(
                "snapshot file is for {:?}, the leader announced {:?}",
                header.last_log_id, meta.last_log_id
            )));
        }
        let started = std::time::Instant::now();
        let db = self.durable.db();
        let name = format!("{STATE_TREE_PREFIX}{}", self.next_seq()?);
        let live = self.pointer.get(CURRENT_TREE_KEY)?;
        assert_ne!(
            live.as_deref(),
            Some(name.as_bytes()),
            "a new state tree reuses the live one's name"
        );
        db.drop_tree(&name)?;
        let tree = db.open_tree(&name)?;
        let loaded = load_pairs(&mut reader, &tree).and_then(|()| {
            let applied = read_applied(&tree)?;
            if applied != meta.last_log_id {
                return Err(StoreError::corrupt(
                    "snapshot state disagrees with its header",
                ));
            }
            Ok(applied)
        });
        let loaded = loaded.and_then(|applied| Ok((applied, load_request_index(&tree)?)));
        let (applied, requests) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                db.drop_tree(&name)?;
                return Err(error);
            }
        };
        self.durable.sync_blocking();
        let old_name = {
            let mut current = self.state.blocking_write();
            self.pointer.insert(CURRENT_TREE_KEY, name.as_bytes())?;
            self.durable.sync_blocking();
            let _change = StateChange::begin(self);
            *self.read_tree.write().expect("read tree lock poisoned") = tree.clone();
            let old = std::mem::replace(&mut *current, tree);
            *self.requests.write().expect("request index lock poisoned") = requests;
            self.applied_next.store(
                applied.map_or(0, |log_id| log_id.index + 1),
                Ordering::SeqCst,
            );
            self.applied_notify
                .send_replace(applied.map_or(0, |log_id| log_id.index));
            old.name()
        };
        db.drop_tree(&old_name)?;
        self.adopt_snapshot(meta.clone(), partial)?;
        crate::log_store::finish_held_back_purge(&self.durable)?;
        metrics::histogram!("residency_snapshot_install_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            index = applied.map(|log_id| log_id.index),
            "snapshot installed"
        );
        Ok(())
    }
}

/// The request index of the state in `tree`.
fn load_request_index(tree: &sled::Tree) -> Result<HashedRequestIndex, StoreError> {
    let started = std::time::Instant::now();
    let mut index = HashedRequestIndex::default();
    residency_core::requests::load_index(&TreeView(tree), |request_id, place| {
        index.insert(&request_id, place);
    })?;
    tracing::debug!(
        ids = index.len(),
        seconds = started.elapsed().as_secs_f64(),
        "request index loaded"
    );
    Ok(index)
}

/// Loads every pair of a snapshot into `tree`, a tree nothing reads until the caller switches
/// to it (or, for a restore, a store no node runs yet): so the pairs go in one by one, not in
/// batches. Applied as 10,000-pair sled batches, ten million pairs held 21 GiB of memory at
/// the peak and went in at under a fifth of the speed (docs/performance.md).
pub(crate) fn load_pairs(reader: &mut SnapshotPairs, tree: &sled::Tree) -> Result<(), StoreError> {
    while let Some((key, value)) = reader.next_pair()? {
        tree.insert(key, value)?;
    }
    Ok(())
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let tree = self.shared.state.read().await;
        let applied = read_applied(&tree).map_err(sm_error(ErrorVerb::Read))?;
        let membership = read_membership(&tree).map_err(sm_error(ErrorVerb::Read))?;
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
        // A running build walks the tree this install replaces.
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

/// What a build reads while applies are held off: the tree, the revision and membership it is at.
struct BuildStart {
    tree: sled::Tree,
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
        self.shared.capture.stop();
    }
}

impl Shared {
    /// Starts a walk of the state as it is now (see `capture.rs`): waits for any other walk or
    /// install, and holds off applies only while `at_start` reads what the walk needs.
    pub(crate) async fn start_walk<T>(
        self: &Arc<Self>,
        at_start: impl FnOnce(&sled::Tree) -> Result<T, StoreError>,
    ) -> Result<(Walking, sled::Tree, T), StoreError> {
        let building = self.build_lock.clone().lock_owned().await;
        let tree = self.state.read().await;
        let read = at_start(&tree)?;
        self.capture.start();
        let walking = Walking {
            shared: self.clone(),
            _building: building,
        };
        Ok((walking, tree.clone(), read))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (walking, tree, (last_log_id, last_membership)) = self
            .shared
            .start_walk(|tree| Ok((read_applied(tree)?, read_membership(tree)?)))
            .await
            .map_err(snapshot_error(ErrorVerb::Read))?;
        let start = BuildStart {
            tree,
            last_log_id,
            last_membership,
        };
        let shared = self.shared.clone();
        let (meta, file) = tokio::task::spawn_blocking(move || {
            let _walking = walking;
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
