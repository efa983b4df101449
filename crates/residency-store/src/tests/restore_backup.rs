//! Restoring a backup: a sound file becomes a node's data under the new membership; a damaged
//! one, or a directory that already holds a store, is refused with nothing written.

use std::collections::BTreeMap;
use std::path::Path;

use openraft::RaftSnapshotBuilder;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use tokio::io::AsyncReadExt;

use super::{
    SEEDED, assert_accepted, assign, node, open_store, seeded_history, test_options, write_entry,
};
use crate::restore::{restore, verify_backup};
use crate::{NodeId, NodeInfo};

/// A seeded store with one user, snapshotted into a backup file at `path`.
async fn make_backup(dir: &Path, path: &Path) -> crate::LogId {
    let mut store = open_store(dir).await;
    let mut entries = seeded_history(&[1, 2, 3]);
    entries.push(write_entry(
        1,
        SEEDED,
        assign("req-1", "alice", "US", "us-east-1/pg-1"),
    ));
    let results = store.state_machine.apply(entries).await.expect("applied");
    assert_accepted(&results);
    let mut snapshot = store
        .state_machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("built");
    let mut bytes = Vec::new();
    snapshot
        .snapshot
        .read_to_end(&mut bytes)
        .await
        .expect("read");
    std::fs::write(path, bytes).expect("backup written");
    snapshot
        .meta
        .last_log_id
        .expect("a snapshot of applied entries")
}

fn new_members() -> BTreeMap<NodeId, NodeInfo> {
    [7, 8, 9].into_iter().map(|id| (id, node(id))).collect()
}

#[tokio::test]
async fn a_sound_backup_becomes_a_new_members_data() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let backup = scratch.path().join("registry.backup");
    let at = make_backup(&scratch.path().join("source"), &backup).await;
    assert_eq!(verify_backup(&backup).expect("sound").applied, at);

    let target = scratch.path().join("node8");
    let restored = restore(&target, test_options(), &backup, 8, new_members()).expect("restored");
    assert_eq!(restored.applied, at);
    let mut store = open_store(&target).await;
    let (applied, membership) = store.state_machine.applied_state().await.expect("state");
    assert_eq!(applied, Some(at));
    let voters: Vec<NodeId> = membership.membership().voter_ids().collect();
    assert_eq!(voters, vec![7, 8, 9], "the old membership was replaced");
    let log_state = store.log.get_log_state().await.expect("log state");
    assert_eq!(
        (log_state.last_purged_log_id, log_state.last_log_id),
        (Some(at), Some(at))
    );
    let vote = store
        .log
        .read_vote()
        .await
        .expect("vote")
        .expect("a vote is saved");
    assert_eq!(
        vote.leader_id().term,
        at.leader_id.term,
        "the first election comes after the backup's term"
    );
    let (placement, _) = store
        .reader
        .lookup(&super::user("alice"))
        .await
        .expect("lookup");
    assert!(placement.is_some());

    // A second restore into the same directory is refused.
    drop(store);
    let again = restore(&target, test_options(), &backup, 8, new_members());
    assert!(
        again.is_err(),
        "a directory holding a store was overwritten"
    );
}

#[tokio::test]
async fn a_damaged_backup_or_a_stranger_node_is_refused_and_writes_nothing() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let backup = scratch.path().join("registry.backup");
    make_backup(&scratch.path().join("source"), &backup).await;
    let mut bytes = std::fs::read(&backup).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let damaged = scratch.path().join("damaged.backup");
    std::fs::write(&damaged, &bytes).expect("written");
    assert!(verify_backup(&damaged).is_err());
    let target = scratch.path().join("node7");
    assert!(restore(&target, test_options(), &damaged, 7, new_members()).is_err());
    assert!(
        !target.join("sled").exists(),
        "a refused restore left a store behind"
    );
    assert!(
        restore(&target, test_options(), &backup, 42, new_members()).is_err(),
        "node 42 is not a member"
    );
    assert!(!target.join("sled").exists());
}
