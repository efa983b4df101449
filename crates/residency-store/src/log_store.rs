//! The Raft log and vote on disk: append, fsync, truncate, purge. No residency rules here.
//!
//! The entries live in append-only segment files (`log_file.rs`) with their own group commit;
//! `append` writes the batch and hands openraft's callback to that sync thread, so the callback
//! fires only once the entries are fsynced. The sled tree `raft_meta` holds the vote, the
//! committed log id and the last purged log id; `save_vote` returns only once the vote is
//! durable. A store written before the log moved out of sled has its entries in the sled tree
//! `raft_log`: they are moved into segment files when it opens.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorVerb, RaftLogReader};

use crate::error::log_error;
use crate::log_file::LogFiles;
use crate::record::{seal, unseal, unseal_entry};
use crate::{Durable, Entry, LogId, StorageError, StoreError, TypeConfig, Vote};

/// Where entries lived before they moved to segment files; read once, to move them.
const LEGACY_LOG_TREE: &str = "raft_log";
/// The directory of segment files, beside sled's.
const LOG_DIR: &str = "raft-log";
const META_TREE: &str = "raft_meta";
const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const LAST_PURGED_KEY: &str = "last_purged";
/// Entries per append while moving a legacy log out of sled.
const LEGACY_MOVE_BATCH_ENTRIES: usize = 1_000;

#[derive(Debug, Clone)]
pub struct LogStore {
    durable: Durable,
    files: Arc<LogFiles>,
    meta: sled::Tree,
    committed: CommittedIndex,
    /// This node's id once `lead_as` has named it (0 until then: ids start at 1).
    own_id: Arc<AtomicU64>,
    /// The vote as last saved (or read), to tell the leader's own appends from a follower's.
    vote: Arc<std::sync::Mutex<Option<Vote>>>,
}

/// Where the log ends and how far it is durable: for the leader's proposer, which sends the
/// next group of writes once the entry before it is on disk, and for the replication messages,
/// whose commit index never runs ahead of what the leader has on disk (see `LogStore::append`).
#[derive(Debug, Clone)]
pub struct LogProgress(Arc<LogFiles>);

impl LogProgress {
    /// The commit index a follower may be told: `committed`, or, if this node's log is not yet
    /// durable that far, the last entry it is. A leader counts its own entries as written
    /// before they are synced (`LogStore::append`), so its committed index can run ahead of its
    /// disk by one sync; no follower applies, and so no reader sees, an entry before it is on
    /// the disks of a majority, the leader's included.
    pub fn commit_bound(&self, committed: Option<LogId>) -> Option<LogId> {
        let committed = committed?;
        let (durable_next, durable_last) = self.0.durable();
        if committed.index < durable_next {
            return Some(committed);
        }
        durable_last.filter(|last| last.index <= committed.index)
    }

    /// The index the next appended entry will have, at least.
    pub fn next_index(&self) -> u64 {
        self.0.next_index()
    }

    /// One more than the last durable index, as it changes.
    pub fn durable(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.durable_watch()
    }
}

/// The committed index as last saved by openraft, readable by the server for status and
/// readiness (openraft 0.9's metrics do not report it).
#[derive(Debug, Clone, Default)]
pub struct CommittedIndex(Arc<AtomicU64>);

impl CommittedIndex {
    /// The committed index, or `None` before anything was committed.
    pub fn get(&self) -> Option<u64> {
        self.0.load(Ordering::SeqCst).checked_sub(1)
    }

    fn set(&self, committed: Option<LogId>) {
        self.0.store(
            committed.map_or(0, |log_id| log_id.index + 1),
            Ordering::SeqCst,
        );
    }
}

/// A vote as a restarted node may resume it: its term and candidate, never as committed.
///
/// openraft 0.9 restarts a node whose saved vote is committed for itself as the leader of that
/// term, at once, and takes that term's first entry as the barrier of linearizable reads
/// (`max(first entry of the term, committed)`). The committed index it then knows is the one
/// saved before the crash, which is saved lazily and may lag the writes the node acknowledged
/// before it: a fault-suite run had a leader killed and restarted within the followers'
/// election timeout answer linearizable reads two entries below writes it had acknowledged.
/// Not committed, the vote makes the node start as a follower. It still votes for no one else
/// in that term, and it leads again only after winning an election in a later term, whose
/// blank entry is then the read barrier, as for any new leader (Raft §6.4). A follower's
/// vote for another leader loses nothing by it either: that leader's next message carries the
/// committed vote, which openraft takes as greater and saves.
fn resumable_vote(vote: Vote) -> Vote {
    Vote {
        committed: false,
        ..vote
    }
}

fn key_index(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| StoreError::corrupt(format!("log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

impl LogStore {
    /// Opens the log and verifies every record: checksum, index, and no gaps after the last
    /// purged entry (committed entries by checksum and log id, the rest decoded whole). A node with a corrupt log refuses to start rather than serve from it.
    pub fn open(durable: Durable) -> Result<LogStore, StoreError> {
        let meta = durable.db().open_tree(META_TREE)?;
        read_sealed::<Vote>(&meta, VOTE_KEY)?;
        let committed: Option<LogId> = read_sealed(&meta, COMMITTED_KEY)?;
        let last_purged: Option<LogId> = read_sealed(&meta, LAST_PURGED_KEY)?;
        let files = LogFiles::open(&durable.dir().join(LOG_DIR), last_purged, committed)?;
        durable.attach_log_files(files.clone());
        let store = LogStore {
            durable,
            files,
            meta,
            committed: CommittedIndex::default(),
            own_id: Arc::default(),
            vote: Arc::default(),
        };
        store.move_legacy_entries(last_purged)?;
        store.committed.set(store.read_meta(COMMITTED_KEY)?);
        Ok(store)
    }

    /// Moves the entries of a store written before the log left sled into segment files,
    /// checking each record and that none is missing, then drops the old tree.
    fn move_legacy_entries(&self, last_purged: Option<LogId>) -> Result<(), StoreError> {
        let db = self.durable.db();
        if !db
            .tree_names()
            .iter()
            .any(|name| name == LEGACY_LOG_TREE.as_bytes())
        {
            return Ok(());
        }
        let legacy = db.open_tree(LEGACY_LOG_TREE)?;
        if !legacy.is_empty() {
            if !self.files.is_empty() {
                return Err(StoreError::corrupt(
                    "log entries both in sled and in segment files",
                ));
            }
            let mut moved = 0_u64;
            let mut batch = Vec::new();
            for item in legacy.iter() {
                let (key, value) = item?;
                let index = key_index(&key)?;
                if last_purged.is_some_and(|purged| index <= purged.index) {
                    continue;
                }
                batch.push(unseal_entry(&value, &format!("log entry {index}"))?);
                if batch.len() == LEGACY_MOVE_BATCH_ENTRIES {
                    moved += self.files.append(std::mem::take(&mut batch))?;
                }
            }
            moved += self.files.append(batch)?;
            self.files.sync_blocking();
            tracing::info!(
                entries = moved,
                "moved the Raft log out of sled into segment files"
            );
        }
        drop(legacy);
        db.drop_tree(LEGACY_LOG_TREE)?;
        self.durable.sync_blocking();
        Ok(())
    }

    /// Starts an empty log just after a restored state: purged and committed up to `applied`,
    /// with `vote` saved (see `restore.rs`).
    pub(crate) fn mark_restored(&self, applied: LogId, vote: Vote) -> Result<(), StoreError> {
        assert!(self.files.is_empty(), "a restore starts from an empty log");
        self.write_meta(LAST_PURGED_KEY, &applied)?;
        self.write_meta(COMMITTED_KEY, &applied)?;
        self.write_meta(VOTE_KEY, &vote)?;
        self.files.purge(applied.index)
    }

    pub fn committed_index(&self) -> CommittedIndex {
        self.committed.clone()
    }

    /// The segment files, for tests that append without syncing.
    #[cfg(test)]
    pub(crate) fn files(&self) -> &LogFiles {
        &self.files
    }

    pub fn progress(&self) -> LogProgress {
        LogProgress(self.files.clone())
    }

    /// Names this node, so that its own entries, appended while it leads, are acknowledged to
    /// openraft once written and synced in the background (see `append`). Without it every
    /// append waits for its sync.
    pub fn lead_as(&self, node_id: crate::NodeId) {
        assert!(node_id > 0, "node ids start at 1");
        self.own_id.store(node_id, Ordering::SeqCst);
    }

    /// Whether `entries` are this node's own, appended while it leads in their term: the vote
    /// is committed (granted by a quorum) for this node, and the entries were made under it.
    /// A follower's entries, even ones this node made as an earlier leader, never are: its
    /// vote then names another leader or another term.
    pub(crate) fn own_entries(&self, entries: &[Entry]) -> bool {
        let own_id = self.own_id.load(Ordering::SeqCst);
        if own_id == 0 || entries.is_empty() {
            return false;
        }
        let vote = *self.vote.lock().expect("vote lock poisoned");
        let Some(vote) = vote.filter(|vote| vote.committed && vote.leader_id.node_id == own_id)
        else {
            return false;
        };
        entries
            .iter()
            .all(|entry| entry.log_id.leader_id == vote.leader_id)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        read_sealed(&self.meta, key)
    }

    fn write_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.meta.insert(key, seal(value))?;
        Ok(())
    }

    fn entries_in(&self, start: u64, end_exclusive: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        self.files.read(start, end_exclusive)
    }

    /// How far a purge asked up to `log_id` may go: to `log_id` if the durable snapshot covers
    /// it, else to the entry at the snapshot's index; `None` if nothing new may go.
    ///
    /// Without any snapshot, the purge goes ahead unless one is being installed (openraft
    /// purges without a snapshot only on paths that then build one).
    fn purge_point(&self, log_id: LogId) -> Result<Option<LogId>, StoreError> {
        let Some(floor) = self.durable.snapshot_floor() else {
            return Ok((!self.durable.installing()).then_some(log_id));
        };
        if log_id.index <= floor {
            return Ok(Some(log_id));
        }
        let purged: Option<LogId> = self.read_meta(LAST_PURGED_KEY)?;
        if purged.is_some_and(|purged| purged.index >= floor) {
            return Ok(None);
        }
        Ok(self
            .entries_in(floor, Some(floor + 1))?
            .first()
            .map(|entry| entry.log_id))
    }
}

fn start_of<RB: RangeBounds<u64>>(range: &RB) -> u64 {
    match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start + 1,
        Bound::Unbounded => 0,
    }
}

fn end_of<RB: RangeBounds<u64>>(range: &RB) -> Option<u64> {
    match range.end_bound() {
        Bound::Included(&end) => Some(end + 1),
        Bound::Excluded(&end) => Some(end),
        Bound::Unbounded => None,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.entries_in(start_of(&range), end_of(&range))
            .map_err(log_error(ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self
            .read_meta(LAST_PURGED_KEY)
            .map_err(log_error(ErrorVerb::Read))?;
        let last_log_id = self.files.last_log_id();
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last_log_id.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE_KEY, vote)
            .map_err(|error| error.into_storage(openraft::ErrorSubject::Vote, ErrorVerb::Write))?;
        self.durable.sync().await;
        *self.vote.lock().expect("vote lock poisoned") = Some(*vote);
        Ok(())
    }

    /// The saved vote, always handed back as not committed (`resumable_vote`).
    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let vote: Option<Vote> = self
            .read_meta(VOTE_KEY)
            .map_err(|error| error.into_storage(openraft::ErrorSubject::Vote, ErrorVerb::Read))?;
        let vote = vote.map(resumable_vote);
        *self.vote.lock().expect("vote lock poisoned") = vote;
        Ok(vote)
    }

    /// The committed id is a hint that lets a restarted node re-apply without waiting for the
    /// leader; it becomes durable with the next sync, which is all it needs.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.committed.set(committed);
        match committed {
            Some(log_id) => self.write_meta(COMMITTED_KEY, &log_id),
            None => self
                .meta
                .remove(COMMITTED_KEY)
                .map(drop)
                .map_err(StoreError::from),
        }
        .map_err(log_error(ErrorVerb::Write))
    }

    /// Never past the log's last entry: a leader's committed id can run ahead of its disk by one
    /// sync (see `append`), and a power cut may then leave the hint past what the log kept.
    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<LogId> = self
            .read_meta(COMMITTED_KEY)
            .map_err(log_error(ErrorVerb::Read))?;
        let last_purged: Option<LogId> = self
            .read_meta(LAST_PURGED_KEY)
            .map_err(log_error(ErrorVerb::Read))?;
        let last = self.files.last_log_id().or(last_purged);
        Ok(match (committed, last) {
            (Some(committed), Some(last)) if committed.index > last.index => Some(last),
            (Some(_), None) => None,
            (committed, _) => committed,
        })
    }

    /// Writes the entries, then tells openraft they are saved: on a follower (and for anything
    /// not this leader's own) only once they are synced, since a follower's acknowledgement
    /// counts towards a quorum; for the leader's own entries as soon as they are written, while
    /// the sync thread syncs them, so that replication to the followers runs alongside the
    /// leader's own sync instead of after it (the leader may count itself in a quorum before
    /// its sync ends, as etcd's does). That stays safe because nothing observes an entry before
    /// the leader's copy is durable too: the leader applies (and so answers a write, or a read
    /// at that index) only what its log has synced (`StateMachineStore::apply_entries` waits
    /// for it), and the commit index it sends followers never passes its durable log
    /// (`LogProgress::commit_bound`), so no follower applies it either. An entry a power cut
    /// takes from the leader before its sync was never seen by anyone.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let own = self.own_entries(&entries);
        let appended = self
            .files
            .append(entries)
            .map_err(log_error(ErrorVerb::Write))?;
        metrics::counter!("residency_log_entries_appended_total").increment(appended);
        if own {
            callback.log_io_completed(Ok(()));
            self.files.sync_soon();
        } else {
            self.files
                .after_sync(Box::new(move || callback.log_io_completed(Ok(()))));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(index = log_id.index, "truncating the log");
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.truncate(log_id.index))
            .await
            .expect("log truncate thread panicked")
            .map_err(log_error(ErrorVerb::Delete))
    }

    /// Deletes the log up to `log_id`, but never past the durable snapshot: openraft 0.9 asks
    /// for the purge of a snapshot it is installing before the state machine has finished (and
    /// made durable) the install. A node that crashed in between came back with its log gone up
    /// to the new snapshot and its state and snapshot still at the old one, which openraft
    /// refuses to start from (found by the fault suite's crash-during-snapshot-install). What is
    /// held back is purged when the install is durable (`finish_held_back_purge`), before
    /// openraft appends past the snapshot: the log never has a gap.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // It syncs the purge point before deleting files: off the async workers.
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.purge_blocking(log_id))
            .await
            .expect("log purge thread panicked")
            .map_err(log_error(ErrorVerb::Delete))
    }
}

impl LogStore {
    fn purge_blocking(&self, log_id: LogId) -> Result<(), StoreError> {
        let mut held_back = self
            .durable
            .held_back_purge
            .lock()
            .expect("purge lock poisoned");
        let purge_to = self.purge_point(log_id)?;
        if purge_to != Some(log_id) {
            tracing::info!(
                asked = log_id.index,
                purged = purge_to.map(|purged| purged.index),
                "log purge held back until the snapshot that covers it is installed"
            );
            *held_back = held_back.max(Some(log_id));
        }
        match purge_to {
            Some(purge_to) => purge_log(&self.durable, &self.files, &self.meta, purge_to),
            None => Ok(()),
        }
    }
}

/// Deletes the log up to and including `log_id` and records it as purged, unless the log is
/// purged that far already. Callers hold `Durable::held_back_purge`.
fn purge_log(
    durable: &Durable,
    files: &LogFiles,
    meta: &sled::Tree,
    log_id: LogId,
) -> Result<(), StoreError> {
    let purged: Option<LogId> = read_sealed(meta, LAST_PURGED_KEY)?;
    if purged.is_some_and(|purged| purged.index >= log_id.index) {
        return Ok(());
    }
    // The purge point is durable before any file goes: a crash between the two steps leaves
    // extra entries, which are harmless, never a purge point below entries that are gone.
    meta.insert(LAST_PURGED_KEY, seal(&log_id))?;
    durable.sync_blocking();
    files.purge(log_id.index)
}

fn read_sealed<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        Some(bytes) => Ok(Some(unseal(&bytes, key)?)),
        None => Ok(None),
    }
}

/// Called by the state machine once an installed snapshot is durable (and the snapshot floor
/// has moved): does the purge openraft asked for during the install.
pub(crate) fn finish_held_back_purge(durable: &Durable) -> Result<(), StoreError> {
    let mut held_back = durable.held_back_purge.lock().expect("purge lock poisoned");
    let Some(log_id) = *held_back else {
        return Ok(());
    };
    if durable
        .snapshot_floor()
        .is_none_or(|floor| floor < log_id.index)
    {
        return Ok(());
    }
    let files = durable
        .log_files()
        .expect("an install runs on a store whose log is open");
    let meta = durable.db().open_tree(META_TREE)?;
    purge_log(durable, files, &meta, log_id)?;
    *held_back = None;
    tracing::info!(index = log_id.index, "held-back log purge done");
    Ok(())
}
