//! Entries that carry several writes: each answered on its own, kept and read back whole, and
//! a log written when an entry held one write still read and applied.

use openraft::RaftLogReader;
use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
use residency_types::{Outcome, Rejection, Revision};

use super::{
    SEEDED, assert_accepted, assign, blank_entry, group_entry, open_store, seeded_history, user,
    write_entry,
};

#[tokio::test]
async fn an_entry_of_several_writes_answers_each_and_reads_back_whole_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let mut entries = seeded_history(&[1]);
    let group = group_entry(
        1,
        SEEDED,
        vec![
            assign("g-1", "ann", "US", "us-east-1/pg-1"),
            // A US user in Canada: refused, and only it.
            assign("g-2", "ben", "US", "ca-central-1/pg-7"),
            assign("g-3", "cat", "CA", "ca-central-1/pg-7"),
            // The same request id again: the first result, applied once.
            assign("g-1", "ann", "US", "us-east-1/pg-1"),
        ],
    );
    entries.push(group.clone());
    store
        .log
        .blocking_append(entries.clone())
        .await
        .expect("log appended");
    let mut results = store.state_machine.apply(entries).await.expect("applied");
    let grouped = results.pop().expect("one answer per entry");
    assert_accepted(&results);
    let outcomes: Vec<&Outcome> = grouped
        .results
        .iter()
        .map(|result| result.outcome.as_ref().expect("a write has an outcome"))
        .collect();
    assert!(matches!(
        outcomes[0],
        Outcome::Assigned { created: true, .. }
    ));
    assert!(matches!(
        outcomes[1],
        Outcome::Rejected(Rejection::StorageJurisdictionNotAllowed { .. })
    ));
    assert!(matches!(
        outcomes[2],
        Outcome::Assigned { created: true, .. }
    ));
    assert_eq!(
        grouped.results[3], grouped.results[0],
        "a retry in the same entry"
    );
    assert!(
        grouped
            .results
            .iter()
            .all(|result| result.revision == Revision(SEEDED)),
        "the entry's writes share its revision"
    );
    let (placement, revision) = store.reader.lookup(&user("ann")).await.expect("lookup");
    assert_eq!(revision, Revision(SEEDED));
    assert_eq!(placement.expect("placed").epoch, 1, "applied once");
    assert_eq!(
        store.reader.lookup(&user("ben")).await.expect("lookup").0,
        None
    );
    let digest = store.reader.digest().await.expect("digest");
    drop(store);

    let mut store = open_store(dir.path()).await;
    let read = store
        .log
        .try_get_log_entries(SEEDED..=SEEDED)
        .await
        .expect("read back");
    assert_eq!(read, vec![group], "the entry reads back whole");
    assert_eq!(store.reader.digest().await.expect("digest"), digest);
}

/// A frame of the log's segment files around `record` (length, CRC32 of the length).
fn frame(record: &[u8]) -> Vec<u8> {
    let length = u32::try_from(record.len())
        .expect("a small record")
        .to_be_bytes();
    let mut frame = length.to_vec();
    frame.extend_from_slice(&crc32fast::hash(&length).to_be_bytes());
    frame.extend_from_slice(record);
    frame
}

/// A node upgraded with entries in its log from before grouping (one write each, format 1)
/// reads them as entries of one write, and applies them to the same state as entries written
/// now.
#[tokio::test]
async fn a_log_from_before_grouping_reads_as_entries_of_one_write() {
    let history = {
        let mut entries = seeded_history(&[1]);
        entries.push(write_entry(
            1,
            SEEDED,
            assign("req-1", "alice", "US", "us-east-1/pg-1"),
        ));
        entries
    };
    let legacy = tempfile::tempdir().expect("temp dir");
    {
        let store = open_store(legacy.path()).await;
        drop(store);
        let segment = legacy
            .path()
            .join("raft-log/segment-00000000000000000000.log");
        let bytes: Vec<u8> = history
            .iter()
            .flat_map(|entry| frame(&crate::record::seal_legacy_entry(entry)))
            .collect();
        std::fs::write(&segment, bytes).expect("segment written");
    }
    let mut store = open_store(legacy.path()).await;
    let read = store
        .log
        .try_get_log_entries(0..)
        .await
        .expect("the old records read");
    assert_eq!(
        read, history,
        "each old entry is a proposal of its one write"
    );
    let results = store.state_machine.apply(read).await.expect("applied");
    assert_accepted(&results);
    let legacy_digest = store.reader.digest().await.expect("digest");
    drop(store);

    let current = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(current.path()).await;
    store
        .log
        .blocking_append(history.clone())
        .await
        .expect("appended");
    store.state_machine.apply(history).await.expect("applied");
    assert_eq!(
        store.reader.digest().await.expect("digest"),
        legacy_digest,
        "the same state either way"
    );
    // A record of a format this version does not know is refused, not guessed at.
    let mut unknown = crate::record::seal_entry(&blank_entry(1, 1));
    unknown[0] = 9;
    let refused =
        crate::record::unseal_entry(&unknown, "log entry 1").expect_err("an unknown format");
    assert!(refused.to_string().contains("unknown record format 9"));
}

/// The leader's own entry, tagged by its proposer, is answered from apply with exactly what
/// apply returns, while the change is under way (so no read that starts after the answer can
/// miss it); an entry whose registration is gone, or that carries no tag, calls nothing.
#[tokio::test]
async fn a_tagged_entry_is_answered_from_apply_inside_the_change() {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let board = store.reader.answer_board();
    // Each answer heard, and whether the state change was under way when it came.
    type Heard = Vec<(Vec<residency_types::ApplyResult>, bool)>;
    let heard: Arc<Mutex<Heard>> = Arc::default();
    let mut entries = seeded_history(&[1]);
    let tagged_entry = |index, tag, commands| {
        let mut entry = group_entry(1, index, commands);
        let openraft::EntryPayload::Normal(proposal) = &mut entry.payload else {
            unreachable!("a group entry carries a proposal")
        };
        proposal.answer_tag = residency_types::AnswerTag(Some(tag));
        entry
    };
    let shared = store.state_machine.shared.clone();
    let registration = board.register({
        let heard = heard.clone();
        Box::new(move |results| {
            let in_change = !shared.change_seq.load(Ordering::SeqCst).is_multiple_of(2);
            heard
                .lock()
                .expect("lock")
                .push((results.to_vec(), in_change));
        })
    });
    let dropped = board.register(Box::new(|_| panic!("a dropped registration was called")));
    let dropped_tag = dropped.tag();
    drop(dropped);
    entries.push(tagged_entry(
        SEEDED,
        registration.tag(),
        vec![
            assign("t-1", "ann", "US", "us-east-1/pg-1"),
            assign("t-2", "ben", "US", "ca-central-1/pg-7"),
        ],
    ));
    entries.push(tagged_entry(
        SEEDED + 1,
        dropped_tag,
        vec![assign("t-3", "cat", "CA", "ca-central-1/pg-7")],
    ));
    entries.push(group_entry(
        1,
        SEEDED + 2,
        vec![assign("t-4", "dan", "US", "us-east-1/pg-1")],
    ));
    store
        .log
        .blocking_append(entries.clone())
        .await
        .expect("log appended");
    let results = store.state_machine.apply(entries).await.expect("applied");
    let heard = heard.lock().expect("lock").clone();
    assert_eq!(heard.len(), 1, "one tagged entry with a live registration");
    let (answered, in_change) = &heard[0];
    assert_eq!(
        answered, &results[SEEDED as usize].results,
        "the answer is what apply returns"
    );
    assert!(*in_change, "answered while the state change is under way");
    assert_eq!(board.waiting(), 0, "an answered callback leaves the board");
    drop(registration);
    assert_eq!(board.waiting(), 0);
}
