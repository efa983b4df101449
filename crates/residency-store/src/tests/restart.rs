//! What a reopened store keeps: its vote, log, committed id, applied state and request dedup,
//! after a clean close and after its process dies without closing anything.

use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{LogState, RaftLogReader};
use residency_types::{Outcome, ProposalResult, Revision};

use super::{
    SEEDED, assert_accepted, assign, blank_entry, log_id, open_store, seeded_history,
    stored_membership, user, write_entry,
};
use crate::{Entry, Vote};

/// The index of `history`'s last entry, bruno's assign (alice's is the one before).
const LAST: u64 = SEEDED + 1;

/// A short history: the initial membership, a leader's blank entry, the catalog, then two
/// assigns.
fn history() -> Vec<Entry> {
    let mut entries = seeded_history(&[1, 2, 3]);
    entries.extend([
        write_entry(1, SEEDED, assign("req-1", "alice", "US", "us-east-1/pg-1")),
        write_entry(1, LAST, assign("req-2", "bruno", "CA", "ca-central-1/pg-7")),
    ]);
    entries
}

#[tokio::test]
async fn a_reopened_store_keeps_its_vote_log_and_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let vote = Vote::new_committed(1, 1);
    let mut store = open_store(dir.path()).await;
    store.log.save_vote(&vote).await.expect("vote saved");
    store
        .log
        .blocking_append(history())
        .await
        .expect("log appended");
    store
        .log
        .save_committed(Some(log_id(1, LAST)))
        .await
        .expect("committed saved");
    let results = store
        .state_machine
        .apply(history())
        .await
        .expect("entries applied");
    assert_accepted(&results);
    assert_eq!(results.len() as u64, LAST + 1, "one answer per entry");
    for (index, entry) in (0..=LAST).zip(&results) {
        assert!(
            entry
                .results
                .iter()
                .all(|result| result.revision == Revision(index)),
            "each entry's writes apply at its log index"
        );
    }
    assert!(results.iter().any(|entry| !entry.results.is_empty()));
    let digest = store.reader.digest().await.expect("digest");
    drop(store);

    let mut store = open_store(dir.path()).await;
    assert_eq!(
        store.log.read_vote().await.expect("vote read"),
        Some(Vote::new(1, 1)),
        "the vote's term and candidate come back, not as committed"
    );
    assert_eq!(
        store.log.get_log_state().await.expect("log state"),
        LogState {
            last_purged_log_id: None,
            last_log_id: Some(log_id(1, LAST)),
        }
    );
    assert_eq!(
        store.log.try_get_log_entries(..).await.expect("entries"),
        history()
    );
    assert_eq!(
        store.log.try_get_log_entries(1..3).await.expect("entries"),
        history()[1..3]
    );
    assert_eq!(
        store.log.read_committed().await.expect("committed"),
        Some(log_id(1, LAST))
    );
    assert_eq!(store.log.committed_index().get(), Some(LAST));
    assert_eq!(
        store
            .state_machine
            .applied_state()
            .await
            .expect("applied state"),
        (Some(log_id(1, LAST)), stored_membership(0, 0, &[1, 2, 3]))
    );
    let (placement, revision) = store.reader.lookup(&user("bruno")).await.expect("lookup");
    let placement = placement.expect("bruno was assigned before the restart");
    assert_eq!(placement.residency.as_str(), "CA");
    assert_eq!(placement.location_id.as_str(), "ca-central-1/pg-7");
    assert_eq!(placement.mod_revision, Revision(LAST));
    assert_eq!(revision, Revision(LAST));
    assert_eq!(store.reader.digest().await.expect("digest"), digest);
}

#[tokio::test]
async fn the_request_dedup_survives_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = assign("req-1", "alice", "US", "us-east-1/pg-1");
    let mut store = open_store(dir.path()).await;
    let mut entries = seeded_history(&[1]);
    entries.push(write_entry(1, SEEDED, write.clone()));
    let mut results = store
        .state_machine
        .apply(entries)
        .await
        .expect("entries applied");
    assert_accepted(&results);
    let mut first = results.pop().expect("one result per entry");
    let first = first.results.pop().expect("one result per write");
    assert_eq!(first.revision, Revision(SEEDED));
    assert!(matches!(
        first.outcome,
        Some(Outcome::Assigned { created: true, .. })
    ));
    drop(store);

    let mut store = open_store(dir.path()).await;
    let retried = store
        .state_machine
        .apply([write_entry(1, SEEDED + 1, write)])
        .await
        .expect("entry applied");
    assert_eq!(
        retried,
        [ProposalResult {
            results: vec![first]
        }],
        "a retry answers with the first result"
    );
    let (placement, revision) = store.reader.lookup(&user("alice")).await.expect("lookup");
    let placement = placement.expect("alice was assigned");
    assert_eq!(
        placement.mod_revision,
        Revision(SEEDED),
        "the retry wrote nothing"
    );
    assert_eq!(
        revision,
        Revision(SEEDED + 1),
        "the retry still advanced the applied revision"
    );
}

/// Reopening is possible the moment the last handle is dropped: nothing of the store lingers
/// on a background thread holding sled's file lock.
#[tokio::test]
async fn a_store_can_be_reopened_as_soon_as_its_handles_are_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    for index in 0..20 {
        let mut store = open_store(dir.path()).await;
        store
            .log
            .blocking_append([blank_entry(1, index)])
            .await
            .expect("log appended");
        drop(store);
    }
    let mut store = open_store(dir.path()).await;
    let last = store
        .log
        .get_log_state()
        .await
        .expect("log state")
        .last_log_id;
    assert_eq!(last, Some(log_id(1, 19)));
}

/// Set in the child processes of `an_acknowledged_append_and_vote_survive_a_killed_process`:
/// the store's directory, and which write the child makes before it dies.
const CHILD_DIR: &str = "RESIDENCY_STORE_TEST_CHILD_DIR";
const CHILD_WRITE: &str = "RESIDENCY_STORE_TEST_CHILD_WRITE";
/// Written by a child once the store acknowledged its write.
const ACKNOWLEDGED_MARKER: &str = "acknowledged";

fn child_vote() -> Vote {
    Vote::new_committed(7, 2)
}

/// Whatever `append` or `save_vote` acknowledged is on disk even if the process then dies
/// without dropping anything, so sled's own flush on drop never runs. Each child makes one
/// write and exits at once: any later sled write could carry the earlier one to disk and hide
/// a missing sync.
#[tokio::test]
async fn an_acknowledged_append_and_vote_survive_a_killed_process() {
    if let (Some(dir), Ok(write)) = (std::env::var_os(CHILD_DIR), std::env::var(CHILD_WRITE)) {
        write_then_die(Path::new(&dir), &write).await;
    }
    let dir = run_child("log");
    let mut store = open_store(dir.path()).await;
    assert_eq!(
        store.log.try_get_log_entries(..).await.expect("entries"),
        history()
    );
    drop(store);

    let dir = run_child("vote");
    let mut store = open_store(dir.path()).await;
    assert_eq!(
        store.log.read_vote().await.expect("vote"),
        Some(Vote::new(
            child_vote().leader_id.term,
            child_vote().leader_id.node_id
        ))
    );
}

/// openraft 0.9 makes a node whose vote reads back committed for itself the leader of that
/// term at once, with the commit index it saved before it stopped, which may lag what it
/// acknowledged; its linearizable reads could then miss those writes. So a vote always reads
/// back not committed, whoever it names, and a later committed vote is taken and kept as
/// usual.
#[tokio::test]
async fn a_restarted_node_never_resumes_leading_in_its_old_term() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    store
        .log
        .save_vote(&Vote::new_committed(4, 1))
        .await
        .expect("vote saved");
    drop(store);

    let mut store = open_store(dir.path()).await;
    let vote = store.log.read_vote().await.expect("vote read");
    assert_eq!(vote, Some(Vote::new(4, 1)));
    assert!(!vote.expect("a vote").is_committed());
    store
        .log
        .save_vote(&Vote::new_committed(5, 2))
        .await
        .expect("a later leader's vote saved");
    assert_eq!(
        store.log.read_vote().await.expect("vote read"),
        Some(Vote::new(5, 2)),
        "read back in the same process it is not committed either"
    );
}

/// Runs this test again in a child process that makes `write` in a new store, then dies.
fn run_child(write: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let test = concat!(
        module_path!(),
        "::an_acknowledged_append_and_vote_survive_a_killed_process"
    );
    let (_crate, test) = test
        .split_once("::")
        .expect("a module path starts with its crate");
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_DIR, dir.path())
        .env(CHILD_WRITE, write)
        .output()
        .expect("the child test process runs");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the {write} child failed: {}: {said}",
        output.status
    );
    let ran = dir.path().join(ACKNOWLEDGED_MARKER).exists();
    assert!(ran, "the {write} child never made its write: {said}");
    dir
}

/// The child's half: one acknowledged write, then exit without running any destructor, as a
/// killed process would.
async fn write_then_die(dir: &Path, write: &str) -> ! {
    let mut store = open_store(dir).await;
    match write {
        "log" => store
            .log
            .blocking_append(history())
            .await
            .expect("log appended"),
        "vote" => store
            .log
            .save_vote(&child_vote())
            .await
            .expect("vote saved"),
        other => panic!("no such child write: {other}"),
    }
    std::fs::write(dir.join(ACKNOWLEDGED_MARKER), b"").expect("marker written");
    std::process::exit(0);
}
