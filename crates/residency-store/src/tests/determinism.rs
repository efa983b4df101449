//! Replaying the same log on a fresh store reaches the same state, byte for byte (I7), whether
//! the entries arrive one per apply call or in batches.

use openraft::storage::RaftStateMachine;
use residency_types::{LocationId, WriteBody};

use super::{
    SEEDED, Store, assert_accepted, assign, command, open_store, seeded_history, write_entry,
};
use crate::Entry;

/// A log with assigns, a move begun and completed, a refused write and a forget.
fn history() -> Vec<Entry> {
    let mut entries = seeded_history(&[1, 2, 3]);
    let mut index = SEEDED;
    let mut push = |body: WriteBody, entries: &mut Vec<Entry>| {
        entries.push(write_entry(
            1,
            index,
            command(&format!("req-{index}"), body),
        ));
        index += 1;
    };
    for n in 0..40 {
        let location = if n % 2 == 0 {
            "us-east-1/pg-1"
        } else {
            "us-west-2/pg-2"
        };
        let body = assign(&format!("r-{n}"), &format!("user-{n}"), "US", location).body;
        push(body, &mut entries);
    }
    let target = LocationId::parse("us-west-2/pg-2").expect("valid location");
    let user = super::user("user-0");
    push(
        WriteBody::BeginMove {
            user_id: user.clone(),
            target,
            expected_mod_revision: None,
        },
        &mut entries,
    );
    push(
        WriteBody::CompleteMove {
            user_id: user.clone(),
            expected_mod_revision: None,
        },
        &mut entries,
    );
    // Refused: the user is not moving any more. A refusal is a committed outcome all the same.
    push(
        WriteBody::AbortMove {
            user_id: user,
            expected_mod_revision: None,
        },
        &mut entries,
    );
    push(
        WriteBody::Forget {
            user_id: super::user("user-1"),
            expected_mod_revision: None,
        },
        &mut entries,
    );
    entries
}

async fn replay(store: &mut Store, entries: Vec<Entry>, per_call: usize) {
    let mut entries = entries.into_iter().peekable();
    while entries.peek().is_some() {
        let chunk: Vec<Entry> = entries.by_ref().take(per_call).collect();
        store.state_machine.apply(chunk).await.expect("applied");
    }
}

#[tokio::test]
async fn the_same_log_replayed_on_fresh_stores_gives_the_same_digest() {
    let mut digests = Vec::new();
    for per_call in [1, 7, 1_000] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open_store(dir.path()).await;
        replay(&mut store, history(), per_call).await;
        digests.push(store.reader.digest().await.expect("digest"));
    }
    assert!(
        digests.windows(2).all(|pair| pair[0] == pair[1]),
        "replicas diverged: {digests:?}"
    );

    // And the digest does see the state: one entry fewer gives another.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut shorter = open_store(dir.path()).await;
    let mut entries = history();
    entries.pop();
    let seeded = seeded_history(&[1, 2, 3]).len();
    let results = shorter
        .state_machine
        .apply(entries.clone())
        .await
        .expect("applied");
    assert_accepted(&results[seeded..results.len() - 1]);
    assert_ne!(
        shorter.reader.digest().await.expect("digest").sha256_hex,
        digests[0].sha256_hex
    );
}
