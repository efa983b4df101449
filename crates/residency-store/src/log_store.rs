//! The Raft log and vote on disk: append, fsync, truncate, purge. No residency rules here.
//!
//! Two sled trees: `raft_log` maps a big-endian u64 index to a checksummed entry record, and
//! `raft_meta` holds the vote, the committed log id and the last purged log id. `append` inserts
//! the batch and hands openraft's callback to the group-commit flusher, so the callback fires
//! only once the entries are fsynced; `save_vote` returns only once the vote is.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorVerb, RaftLogReader};

use crate::error::log_error;
use crate::record::{seal, unseal};
use crate::{Durable, Entry, LogId, StorageError, StoreError, TypeConfig, Vote};

const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";
const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const LAST_PURGED_KEY: &str = "last_purged";

#[derive(Debug, Clone)]
pub struct LogStore {
    durable: Durable,
    log: sled::Tree,
    meta: sled::Tree,
    committed: CommittedIndex,
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

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| StoreError::corrupt(format!("log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

impl LogStore {
    /// Opens the log and verifies every record: checksum, index, and no gaps after the last
    /// purged entry. A node with a corrupt log refuses to start rather than serve from it.
    pub fn open(durable: Durable) -> Result<LogStore, StoreError> {
        let log = durable.db().open_tree(LOG_TREE)?;
        let meta = durable.db().open_tree(META_TREE)?;
        let store = LogStore {
            durable,
            log,
            meta,
            committed: CommittedIndex::default(),
        };
        store.verify()?;
        store.committed.set(store.read_meta(COMMITTED_KEY)?);
        Ok(store)
    }

    /// Starts an empty log just after a restored state: purged and committed up to `applied`,
    /// with `vote` saved (see `restore.rs`).
    pub(crate) fn mark_restored(&self, applied: LogId, vote: Vote) -> Result<(), StoreError> {
        assert!(self.log.is_empty(), "a restore starts from an empty log");
        self.write_meta(LAST_PURGED_KEY, &applied)?;
        self.write_meta(COMMITTED_KEY, &applied)?;
        self.write_meta(VOTE_KEY, &vote)?;
        Ok(())
    }

    pub fn committed_index(&self) -> CommittedIndex {
        self.committed.clone()
    }

    fn verify(&self) -> Result<(), StoreError> {
        self.read_meta::<Vote>(VOTE_KEY)?;
        self.read_meta::<LogId>(COMMITTED_KEY)?;
        let last_purged: Option<LogId> = self.read_meta(LAST_PURGED_KEY)?;
        let mut expected_index = last_purged.map(|log_id| log_id.index + 1);
        for item in self.log.iter() {
            let (key, value) = item?;
            let index = key_index(&key)?;
            if last_purged.is_some_and(|purged| index <= purged.index) {
                // Left behind by a crash inside `purge`; never read, removed by the next purge.
                continue;
            }
            let entry: Entry = unseal(&value, &format!("log entry {index}"))?;
            if entry.log_id.index != index {
                return Err(StoreError::corrupt(format!(
                    "log entry stored at {index} says it is {}",
                    entry.log_id.index
                )));
            }
            if let Some(expected) = expected_index
                && index != expected
            {
                return Err(StoreError::corrupt(format!(
                    "log gap: expected {expected}, found {index}"
                )));
            }
            expected_index = Some(index + 1);
        }
        Ok(())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.meta.get(key)? {
            Some(bytes) => Ok(Some(unseal(&bytes, key)?)),
            None => Ok(None),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.meta.insert(key, seal(value))?;
        Ok(())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let Some((key, value)) = self.log.last()? else {
            return Ok(None);
        };
        let index = key_index(&key)?;
        let entry: Entry = unseal(&value, &format!("log entry {index}"))?;
        Ok(Some(entry.log_id))
    }

    fn entries_in(&self, start: u64, end_exclusive: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let start_key = index_key(start);
        let iter = match end_exclusive {
            Some(end) => self.log.range(start_key..index_key(end)),
            None => self.log.range(start_key..),
        };
        let mut entries = Vec::new();
        let mut expected: Option<u64> = None;
        for item in iter {
            let (key, value) = item?;
            let index = key_index(&key)?;
            let entry: Entry = unseal(&value, &format!("log entry {index}"))?;
            assert_eq!(
                entry.log_id.index, index,
                "log entry stored under another index"
            );
            if let Some(expected) = expected
                && index != expected
            {
                return Err(StoreError::corrupt(format!(
                    "log gap: expected {expected}, found {index}"
                )));
            }
            expected = Some(index + 1);
            entries.push(entry);
        }
        Ok(entries)
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

    fn remove_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), StoreError> {
        let range = (start.map(index_key), end.map(index_key));
        let mut batch = sled::Batch::default();
        for item in self.log.range::<[u8; 8], _>(range) {
            let (key, _) = item?;
            batch.remove(key);
        }
        self.log.apply_batch(batch)?;
        Ok(())
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
        let last_log_id = self
            .last_entry_log_id()
            .map_err(log_error(ErrorVerb::Read))?;
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
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE_KEY)
            .map_err(|error| error.into_storage(openraft::ErrorSubject::Vote, ErrorVerb::Read))
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

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.read_meta(COMMITTED_KEY)
            .map_err(log_error(ErrorVerb::Read))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        let mut appended = 0_u64;
        for entry in entries {
            let record = seal(&entry);
            assert!(
                record.len() <= crate::durable::SLED_INLINE_VALUE_BYTES_MAX,
                "a log record of {} bytes would go to sled's unsynced blob files",
                record.len()
            );
            batch.insert(&index_key(entry.log_id.index), record);
            appended += 1;
        }
        self.log
            .apply_batch(batch)
            .map_err(|error| log_error(ErrorVerb::Write)(error.into()))?;
        metrics::counter!("residency_log_entries_appended_total").increment(appended);
        self.durable
            .after_sync(Box::new(move || callback.log_io_completed(Ok(()))));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(index = log_id.index, "truncating the log");
        self.remove_range(Bound::Included(log_id.index), Bound::Unbounded)
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
        let mut held_back = self
            .durable
            .held_back_purge
            .lock()
            .expect("purge lock poisoned");
        let purge_to = self
            .purge_point(log_id)
            .map_err(log_error(ErrorVerb::Read))?;
        if purge_to != Some(log_id) {
            tracing::info!(
                asked = log_id.index,
                purged = purge_to.map(|purged| purged.index),
                "log purge held back until the snapshot that covers it is installed"
            );
            *held_back = held_back.max(Some(log_id));
        }
        match purge_to {
            Some(purge_to) => {
                purge_trees(&self.log, &self.meta, purge_to).map_err(log_error(ErrorVerb::Delete))
            }
            None => Ok(()),
        }
    }
}

/// Deletes the log up to and including `log_id` and records it as purged, unless the log is
/// purged that far already. Callers hold `Durable::held_back_purge`.
fn purge_trees(log: &sled::Tree, meta: &sled::Tree, log_id: LogId) -> Result<(), StoreError> {
    let purged: Option<LogId> = match meta.get(LAST_PURGED_KEY)? {
        Some(bytes) => Some(unseal(&bytes, LAST_PURGED_KEY)?),
        None => None,
    };
    if purged.is_some_and(|purged| purged.index >= log_id.index) {
        return Ok(());
    }
    // Record the purge point first: a crash between the two steps leaves extra entries, which
    // are harmless, never a purge point below entries that are gone.
    meta.insert(LAST_PURGED_KEY, seal(&log_id))?;
    let mut batch = sled::Batch::default();
    for item in log.range(..=index_key(log_id.index)) {
        let (key, _) = item?;
        batch.remove(key);
    }
    log.apply_batch(batch)?;
    Ok(())
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
    let log = durable.db().open_tree(LOG_TREE)?;
    let meta = durable.db().open_tree(META_TREE)?;
    purge_trees(&log, &meta, log_id)?;
    *held_back = None;
    tracing::info!(index = log_id.index, "held-back log purge done");
    Ok(())
}
