//! Building a new node's data from a backup: the state of the backup, under a new membership.
//!
//! A backup is a snapshot file of either format (a base file, `base.rs`, or the older stream,
//! `snapshot.rs`), verified whole (every block, or the trailer's count and CRC) before anything
//! is kept. Restoring writes the backup's pairs as the node's base file, with the membership it
//! recorded replaced by the new cluster's, and starts the Raft log just after the
//! backup's revision, with a vote for this node in the backup's term, so that the new
//! cluster's first election happens in a later term than any entry the state covers. Every node
//! of the new cluster restores the same file with the same member list, so all start from the
//! same bytes, and the new cluster needs no `cluster init`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use openraft::Membership;
use residency_core::codec;

use crate::log_store::LogStore;
use crate::snapshot::open_snapshot;
use crate::state_machine::{applied_key, membership_key};
use crate::{
    Durable, LogId, NodeId, NodeInfo, SnapshotMeta, StoreError, StoreOptions, StoredMembership,
    Vote,
};

/// What a restore produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The log id the restored state stands at: its revision is the backup's.
    pub applied: LogId,
    /// How many state pairs were loaded.
    pub pairs: u64,
}

/// Reads a whole backup file and checks it: returns the log id it stands at and its pair count.
pub fn verify_backup(backup: &Path) -> Result<Restored, StoreError> {
    let (mut reader, meta) = open_snapshot(File::open(backup)?)?;
    let mut pairs = 0;
    let mut applied = None;
    while let Some((key, value)) = reader.next_pair()? {
        if key == applied_key() {
            applied = Some(codec::decode::<LogId>(&value)?);
        }
        pairs += 1;
    }
    let applied =
        applied.ok_or_else(|| StoreError::corrupt("the backup records no applied revision"))?;
    if meta.last_log_id != Some(applied) {
        return Err(StoreError::corrupt(
            "the backup's header and state disagree on its revision",
        ));
    }
    Ok(Restored { applied, pairs })
}

/// Creates node `node_id`'s data under `dir` from `backup`, for a new cluster of `members`
/// (all voters). Refuses a directory that already holds a store.
pub fn restore(
    dir: &Path,
    options: StoreOptions,
    backup: &Path,
    node_id: NodeId,
    members: BTreeMap<NodeId, NodeInfo>,
) -> Result<Restored, StoreError> {
    if !members.contains_key(&node_id) {
        return Err(StoreError::corrupt(format!(
            "node {node_id} is not among the restored cluster's members"
        )));
    }
    if dir.join("sled").exists() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} already holds a store; restore builds a new node's data",
                dir.display()
            ),
        )));
    }
    // Verify the whole file before writing anything.
    let verified = verify_backup(backup)?;
    let durable = Durable::open(dir, options)?;
    let applied = verified.applied;
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    let membership = Membership::new(vec![voters], members);
    let stored = StoredMembership::new(Some(applied), membership);
    let meta = SnapshotMeta {
        last_log_id: Some(applied),
        last_membership: stored.clone(),
        snapshot_id: format!("restored-{}-{}", applied.leader_id.term, applied.index),
    };
    let (mut reader, _) = open_snapshot(File::open(backup)?)?;
    let membership_key = membership_key();
    let membership_value = codec::encode(&stored);
    crate::state_machine::create_layers(&durable, &meta, |writer| {
        // The pairs as backed up, in order, with the new membership in its place.
        let mut membership_written = false;
        let mut pairs = 0;
        while let Some((key, value)) = reader.next_pair()? {
            if !membership_written && key >= membership_key {
                writer.pair(&membership_key, &membership_value)?;
                membership_written = true;
                if key == membership_key {
                    pairs += 1;
                    continue;
                }
            }
            writer.pair(&key, &value)?;
            pairs += 1;
        }
        if !membership_written {
            writer.pair(&membership_key, &membership_value)?;
        }
        assert_eq!(
            pairs, verified.pairs,
            "the backup changed between its check and its load"
        );
        Ok(())
    })?;

    let log = LogStore::open(durable.clone())?;
    log.mark_restored(applied, Vote::new(applied.leader_id.term, node_id))?;
    durable.sync_blocking();
    tracing::info!(
        index = applied.index,
        pairs = verified.pairs,
        "state restored from a backup"
    );
    Ok(verified)
}
