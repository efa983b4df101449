//! Reads see one applied state at a time, and never wait for the state lock.

use std::time::Duration;

use openraft::storage::RaftStateMachine;
use residency_types::Revision;

use super::{SEEDED, assert_accepted, assign, open_store, seeded_history, user, write_entry};

/// Every entry rewrites the same user, so a read is consistent exactly when the placement it
/// returns was written at the revision it reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_reports_the_revision_of_the_state_it_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let seeded = store
        .state_machine
        .apply(seeded_history(&[1]))
        .await
        .expect("membership and catalog");
    assert_accepted(&seeded);
    let reader = store.reader.clone();
    let readers = tokio::spawn(async move {
        let mut checked = 0_u32;
        while checked < 2_000 {
            let (placement, revision) = reader.lookup(&user("hot")).await.expect("lookup");
            if let Some(placement) = placement {
                assert_eq!(
                    placement.mod_revision, revision,
                    "a read mixed two applied states"
                );
                checked += 1;
            }
            tokio::task::yield_now().await;
        }
    });
    for index in SEEDED..SEEDED + 500 {
        // Back and forth between two locations: every write changes the placement.
        let location = ["us-east-1/pg-1", "us-west-2/pg-2"][index as usize % 2];
        let command = assign(&format!("req-{index}"), "hot", "US", location);
        let results = store
            .state_machine
            .apply([write_entry(1, index, command)])
            .await
            .expect("applied");
        assert_accepted(&results);
    }
    // The writer is done; the reader finishes its count on the final state.
    readers.await.expect("reader task");
}

/// Applies, an install and the start of a snapshot build take the state lock; a read must not
/// wait for it (an install can hold it for a while). Here a test holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_answered_while_the_state_lock_is_held() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let mut entries = seeded_history(&[1]);
    entries.push(write_entry(
        1,
        SEEDED,
        assign("r1", "ann", "US", "us-east-1/pg-1"),
    ));
    let results = store.state_machine.apply(entries).await.expect("applied");
    assert_accepted(&results);

    let held = store.state_machine.state_lock().read_owned().await;
    let mut applier = store.state_machine.clone();
    let apply = tokio::spawn(async move {
        applier
            .apply([write_entry(
                1,
                SEEDED + 1,
                assign("r2", "ann", "US", "us-west-2/pg-2"),
            )])
            .await
    });
    // Let the apply queue up behind the holder: from here on tokio's fair lock would make any
    // reader that asks for the state lock wait behind it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!apply.is_finished(), "the apply waits for the lock");

    let read =
        tokio::time::timeout(Duration::from_secs(5), store.reader.lookup(&user("ann"))).await;
    let (placement, revision) = read
        .expect("a read is not held up by the state lock")
        .expect("lookup");
    assert_eq!(revision, Revision(SEEDED));
    assert_eq!(
        placement.expect("ann is placed").location_id.as_str(),
        "us-east-1/pg-1"
    );

    drop(held);
    let results = apply
        .await
        .expect("apply task")
        .expect("applied after the lock is released");
    assert_accepted(&results);
    let (placement, revision) = store.reader.lookup(&user("ann")).await.expect("lookup");
    assert_eq!(revision, Revision(SEEDED + 1));
    assert_eq!(
        placement.expect("ann is placed").location_id.as_str(),
        "us-west-2/pg-2"
    );
}
