//! The leader's own entries count as saved once written, and are synced behind; the commit
//! index a follower is told never passes what the leader has synced, and a committed hint left
//! past the log by a power cut reads back as the log's end.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload};

use super::{blank_entry, log_id, open_store};
use crate::{Entry, LogId, Vote};

fn entry_by(term: u64, leader: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, leader), index),
        payload: EntryPayload::Blank,
    }
}

#[tokio::test]
async fn only_the_leaders_own_entries_of_its_term_count_before_their_sync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let log = store.log.clone();
    let mine = [entry_by(2, 1, 5), entry_by(2, 1, 6)];
    store
        .log
        .save_vote(&Vote::new_committed(2, 1))
        .await
        .expect("vote saved");
    assert!(!log.own_entries(&mine), "not before the node is named");
    log.lead_as(1);
    assert!(log.own_entries(&mine), "the leader's entries of its term");
    assert!(
        !log.own_entries(&[entry_by(1, 1, 4)]),
        "an entry this node made in an earlier term comes as a follower's would"
    );
    assert!(
        !log.own_entries(&[entry_by(2, 1, 5), entry_by(1, 1, 4)]),
        "all of them or none"
    );
    store
        .log
        .save_vote(&Vote::new(3, 1))
        .await
        .expect("vote saved");
    assert!(
        !log.own_entries(&[entry_by(3, 1, 7)]),
        "a candidate's vote is not yet granted by a quorum"
    );
    store
        .log
        .save_vote(&Vote::new_committed(3, 2))
        .await
        .expect("vote saved");
    assert!(
        !log.own_entries(&[entry_by(3, 2, 7)]),
        "another leader's entries are a follower's"
    );
}

#[tokio::test]
async fn a_follower_is_never_told_a_commit_past_the_leaders_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    store
        .log
        .blocking_append((0..=3).map(|index| blank_entry(1, index)))
        .await
        .expect("appended and synced");
    let progress = store.log.progress();
    assert_eq!(
        progress.commit_bound(Some(log_id(1, 3))),
        Some(log_id(1, 3))
    );
    // Written, not yet synced: as the leader's own entries are between append and sync.
    store
        .log
        .files()
        .append([blank_entry(1, 4), blank_entry(1, 5)])
        .expect("written");
    assert_eq!(
        progress.commit_bound(Some(log_id(1, 5))),
        Some(log_id(1, 3)),
        "cut back to the last synced entry"
    );
    assert_eq!(
        progress.commit_bound(Some(log_id(1, 2))),
        Some(log_id(1, 2))
    );
    assert_eq!(progress.commit_bound(None), None);
    store.log.files().sync_blocking();
    assert_eq!(
        progress.commit_bound(Some(log_id(1, 5))),
        Some(log_id(1, 5))
    );
}

#[tokio::test]
async fn a_committed_hint_past_the_log_reads_back_as_the_logs_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let mut store = open_store(dir.path()).await;
        store
            .log
            .blocking_append((0..=3).map(|index| blank_entry(1, index)))
            .await
            .expect("appended");
        // What a leader may have saved before a power cut took entries 4.. from its disk.
        store
            .log
            .save_committed(Some(log_id(1, 9)))
            .await
            .expect("saved");
        store
            .log
            .save_vote(&Vote::new_committed(1, 1))
            .await
            .expect("synced");
    }
    let mut store = open_store(dir.path()).await;
    assert_eq!(
        store.log.read_committed().await.expect("read"),
        Some(log_id(1, 3))
    );
}
