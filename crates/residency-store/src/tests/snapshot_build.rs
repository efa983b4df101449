//! A snapshot build streams the state as of the revision it started at, while applies go on
//! and change, create and delete keys on both sides of where the walk is.

use openraft::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use residency_types::WriteBody;
use tokio::task::JoinHandle;

use super::{
    SEEDED, Store, assert_accepted, assign, command, open_store, seeded_history, user, write_entry,
};
use crate::capture::AsOfStart;
use crate::snapshot::{StatePair, open_snapshot};
use crate::{Entry, LogId, StateMachineStore};

/// Users the source store starts with.
const USERS: u64 = 300;

fn user_name(number: u64) -> String {
    format!("user-{number:05}")
}

/// A write of the test's history: assigns (new users and moves of existing ones) and forgets,
/// chosen by `seed` so that the changes land before and after any walk position.
fn varied_write(index: u64, seed: &mut u64) -> Entry {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let pick = *seed >> 33;
    let number = pick % (USERS * 2);
    let request = format!("req-{index}");
    let name = user_name(number);
    let body = match pick % 3 {
        0 => WriteBody::Forget {
            user_id: user(&name),
            expected_mod_revision: None,
        },
        _ => {
            let location = ["us-east-1/pg-1", "us-west-2/pg-2"][(pick % 2) as usize];
            return write_entry(1, index, assign(&request, &name, "US", location));
        }
    };
    write_entry(1, index, command(&request, body))
}

/// A store holding the catalog and `USERS` users; returns the index of its next entry.
async fn source_store(store: &mut Store) -> u64 {
    let mut entries = seeded_history(&[1]);
    let mut index = SEEDED;
    for number in 0..USERS {
        let name = user_name(number);
        entries.push(write_entry(
            1,
            index,
            assign(&format!("seed-{number}"), &name, "US", "us-east-1/pg-1"),
        ));
        index += 1;
    }
    let results = store.state_machine.apply(entries).await.expect("applied");
    assert_accepted(&results);
    index
}

/// Every pair of the state, its layers merged.
async fn all_pairs(store: &Store) -> Vec<StatePair> {
    let lock = store.state_machine.state_lock();
    let layers = lock.read().await;
    let mut merged = layers.pairs_from(b"", false);
    let mut pairs = Vec::new();
    while let Some(pair) = merged.next_pair().expect("the state reads") {
        pairs.push(pair);
    }
    pairs
}

/// The live tree's pairs as stored (tagged).
async fn live_pairs(store: &Store) -> Vec<StatePair> {
    let lock = store.state_machine.state_lock();
    let layers = lock.read().await;
    layers
        .live
        .iter()
        .map(|item| item.map(|(key, value)| (key.to_vec(), value.to_vec())))
        .collect::<Result<_, _>>()
        .expect("tree reads")
}

/// Applies each entry alone (a forget of an unplaced user is refused, which is fine: it is
/// still an entry, and moves the applied log id).
async fn apply_each(state_machine: &mut StateMachineStore, entries: Vec<Entry>) {
    for entry in entries {
        state_machine.apply([entry]).await.expect("applied");
    }
}

#[tokio::test]
async fn a_walk_sees_the_state_at_its_start_while_writes_land_around_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let mut index = source_store(&mut store).await;
    let at_start = live_pairs(&store).await;
    let tree = store.state_machine.state_lock().read().await.live.clone();

    store.state_machine.capture().start();
    let mut writer = store.state_machine.clone();
    let mut seed = 42_u64;
    let mut walked = Vec::new();
    {
        let capture = store.state_machine.capture();
        let mut walk = AsOfStart::new(capture, &tree);
        let mut step = 0_u64;
        loop {
            // Between every few pairs of the walk, a few writes anywhere in the key space.
            if step.is_multiple_of(7) {
                let writes = (0..3)
                    .map(|_| {
                        index += 1;
                        varied_write(index - 1, &mut seed)
                    })
                    .collect();
                apply_each(&mut writer, writes).await;
            }
            step += 1;
            match walk.next_pair().expect("walk reads") {
                Some(pair) => walked.push(pair),
                None => break,
            }
        }
    }
    let captured = store.state_machine.capture().stop();
    assert!(
        captured.total > 0,
        "the writes changed keys ahead of the walk"
    );
    assert!(
        captured.peak < captured.total,
        "entries the walk passed were dropped: {captured:?}"
    );
    assert_ne!(
        live_pairs(&store).await,
        at_start,
        "the writes changed the live state"
    );
    assert_eq!(walked.len(), at_start.len(), "pairs walked");
    assert!(
        walked == at_start,
        "the walk differs from the state at its start"
    );
}

/// The snapshot's pairs, and its meta's revision.
fn snapshot_pairs(file: std::fs::File) -> (Option<LogId>, Vec<StatePair>) {
    let (mut reader, meta) = open_snapshot(file).expect("snapshot opens");
    let mut pairs = Vec::new();
    while let Some(pair) = reader.next_pair().expect("snapshot reads") {
        pairs.push(pair);
    }
    (meta.last_log_id, pairs)
}

/// Writes 600 entries of history to `store` on another task, as fast as applies go.
fn stream_of_writes(store: &Store, first: u64, mut seed: u64) -> (Vec<Entry>, JoinHandle<()>) {
    let history: Vec<Entry> = (first..first + 600)
        .map(|index| varied_write(index, &mut seed))
        .collect();
    let mut writer = store.state_machine.clone();
    let writes = history.clone();
    let writing = tokio::spawn(async move {
        for entry in writes {
            writer.apply([entry]).await.expect("applied");
            tokio::task::yield_now().await;
        }
    });
    (history, writing)
}

/// A second store given the source's history up to `revision`, with nothing else going on.
async fn replay_upto(dir: &std::path::Path, history: Vec<Entry>, revision: u64) -> Store {
    let mut replay = open_store(dir).await;
    source_store(&mut replay).await;
    let upto = history
        .into_iter()
        .take_while(|entry| entry.log_id.index <= revision)
        .collect();
    apply_each(&mut replay.state_machine, upto).await;
    replay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_under_a_stream_of_writes_is_the_state_at_its_revision() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let first = source_store(&mut store).await;
    let (history, writing) = stream_of_writes(&store, first, 7);
    let mut builder = store.state_machine.get_snapshot_builder().await;
    let snapshot = builder.build_snapshot().await.expect("snapshot built");
    writing.await.expect("writer task");
    let file = snapshot.snapshot.into_std().await;
    let (revision, pairs) = tokio::task::spawn_blocking(move || snapshot_pairs(file))
        .await
        .expect("reader task");
    let revision = revision.expect("the snapshot has a revision").index;

    let replay_dir = tempfile::tempdir().expect("temp dir");
    let replay = replay_upto(replay_dir.path(), history, revision).await;
    let expected = all_pairs(&replay).await;
    assert_eq!(pairs.len(), expected.len(), "pairs in the snapshot");
    assert!(
        pairs == expected,
        "the snapshot at revision {revision} differs from the state at that revision"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_taken_under_a_stream_of_writes_is_the_digest_at_its_revision() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let first = source_store(&mut store).await;
    let (history, writing) = stream_of_writes(&store, first, 11);
    let digest = store.reader.digest().await.expect("digest");
    writing.await.expect("writer task");

    let replay_dir = tempfile::tempdir().expect("temp dir");
    let replay = replay_upto(replay_dir.path(), history, digest.revision.0).await;
    let expected = replay.reader.digest().await.expect("digest");
    assert_eq!(
        digest, expected,
        "the digest differs from the state at its revision"
    );
}
