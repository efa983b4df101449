//! The state as layers: reads see sled's changes over the base (placed, moved, forgotten); a
//! build, an install and a restart keep the digest; a crash after any durable step of a build
//! or an install leaves one whole state; a damaged or missing base file stops the store.

use std::path::Path;

use openraft::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use residency_types::{Revision, WriteBody};
use tokio::io::AsyncReadExt;

use super::snapshot_install::receive;
use super::{
    SEEDED, Store, assign, command, open_store, seeded_history, test_options, user, write_entry,
};
use crate::state_machine::step;
use crate::{DigestAt, Entry, SnapshotMeta, StoreError};

/// Users the history places before its first snapshot.
const USERS: u64 = 40;

fn name(number: u64) -> String {
    format!("user-{number:03}")
}

/// The catalog, then `USERS` users placed in us-east-1.
fn first_history() -> Vec<Entry> {
    let mut entries = seeded_history(&[1, 2, 3]);
    for number in 0..USERS {
        entries.push(write_entry(
            1,
            SEEDED + number,
            assign(
                &format!("first-{number}"),
                &name(number),
                "US",
                "us-east-1/pg-1",
            ),
        ));
    }
    entries
}

/// After `first_history`, from index `from`: every third user moved, every fifth forgotten, and
/// as many new users placed, `round` making the request ids unique.
fn later_writes(from: u64, round: u64) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut index = from;
    let mut push = |body: WriteBody, request: String| {
        entries.push(write_entry(2, index, command(&request, body)));
        index += 1;
    };
    for number in 0..USERS {
        if number % 5 == 0 {
            push(
                WriteBody::Forget {
                    user_id: user(&name(number)),
                    expected_mod_revision: None,
                },
                format!("forget-{round}-{number}"),
            );
        } else if number % 3 == 0 {
            let moved = assign(
                &format!("move-{round}-{number}"),
                &name(number),
                "US",
                "us-west-2/pg-2",
            );
            push(moved.body, moved.request_id.as_str().to_string());
        }
        let new_user = assign(
            &format!("new-{round}-{number}"),
            &name(USERS * (round + 1) + number),
            "US",
            "us-west-2/pg-2",
        );
        push(new_user.body, new_user.request_id.as_str().to_string());
    }
    entries
}

async fn apply(store: &mut Store, entries: Vec<Entry>) {
    store
        .state_machine
        .apply(entries)
        .await
        .expect("entries applied");
}

async fn build(store: &mut Store) -> Result<(SnapshotMeta, Vec<u8>), crate::StorageError> {
    let mut builder = store.state_machine.get_snapshot_builder().await;
    let mut snapshot = builder.build_snapshot().await?;
    let mut bytes = Vec::new();
    snapshot
        .snapshot
        .read_to_end(&mut bytes)
        .await
        .expect("snapshot reads");
    Ok((snapshot.meta, bytes))
}

async fn digest(store: &Store) -> DigestAt {
    store.reader.digest().await.expect("digest")
}

/// The digest of `entries` applied to a fresh store that never built a snapshot.
async fn replayed_digest(entries: Vec<Entry>) -> DigestAt {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    apply(&mut store, entries).await;
    digest(&store).await
}

/// The files in the store's snapshot directory and its state trees in sled.
fn leftovers(dir: &Path) -> (usize, usize) {
    let files = std::fs::read_dir(dir.join("snapshots"))
        .expect("snapshot dir")
        .count();
    let db = crate::durable::open_sled(&dir.join("sled"), 16 * 1024 * 1024).expect("sled opens");
    let trees = db
        .tree_names()
        .iter()
        .filter(|name| name.starts_with(b"delta-") || name.starts_with(b"state-"))
        .count();
    (files, trees)
}

#[tokio::test]
async fn reads_see_the_changes_over_the_base_and_every_path_keeps_the_digest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    let first = first_history();
    let next = SEEDED + USERS;
    apply(&mut store, first.clone()).await;
    build(&mut store).await.expect("first build");
    let later = later_writes(next, 0);
    let end = next + later.len() as u64 - 1;
    apply(&mut store, later.clone()).await;

    // Placed, moved, forgotten and untouched, over the base.
    let lookup = |number: u64| {
        let reader = store.reader.clone();
        async move { reader.lookup(&user(&name(number))).await.expect("lookup") }
    };
    let (forgotten, revision) = lookup(0).await;
    assert_eq!((forgotten, revision), (None, Revision(end)));
    let moved = lookup(3).await.0.expect("moved user");
    assert_eq!(moved.location_id.as_str(), "us-west-2/pg-2");
    let untouched = lookup(1).await.0.expect("untouched user");
    assert_eq!(untouched.location_id.as_str(), "us-east-1/pg-1");
    let placed = lookup(USERS + 7).await.0.expect("new user");
    assert_eq!(placed.location_id.as_str(), "us-west-2/pg-2");

    let mut all = first;
    all.extend(later);
    let expected = replayed_digest(all.clone()).await;
    assert_eq!(digest(&store).await, expected, "layers over the base");
    drop(store);
    let mut store = open_store(dir.path()).await;
    assert_eq!(digest(&store).await, expected, "after a restart");
    let (meta, bytes) = build(&mut store).await.expect("second build");
    assert_eq!(meta.last_log_id.map(|id| id.index), Some(end));
    assert_eq!(digest(&store).await, expected, "after the second build");
    drop(store);
    assert_eq!(leftovers(dir.path()), (1, 1), "one base, one live tree");

    // The base installs elsewhere with the same digest, and survives a restart there.
    let other_dir = tempfile::tempdir().expect("temp dir");
    let mut other = open_store(other_dir.path()).await;
    receive(&mut other, &meta, &bytes).await.expect("installed");
    assert_eq!(digest(&other).await, expected, "installed");
    drop(other);
    let other = open_store(other_dir.path()).await;
    assert_eq!(digest(&other).await, expected, "installed, after a restart");
}

#[tokio::test]
async fn a_crash_after_any_step_of_a_build_leaves_the_state_whole() {
    for crash in [
        step::LIVE_FROZEN,
        step::BASE_WRITTEN,
        step::LAYERS_SWITCHED,
        step::OLD_BASE_DELETED,
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open_store(dir.path()).await;
        let mut all = first_history();
        apply(&mut store, all.clone()).await;
        build(&mut store).await.expect("first build");
        let later = later_writes(SEEDED + USERS, 0);
        let next = SEEDED + USERS + later.len() as u64;
        apply(&mut store, later.clone()).await;
        all.extend(later);
        let before = digest(&store).await;

        store.state_machine.crash_after(crash);
        assert!(
            build(&mut store).await.is_err(),
            "{crash}: the build stopped"
        );
        drop(store);
        let mut store = open_store(dir.path()).await;
        assert_eq!(digest(&store).await, before, "{crash}: reopened");

        // The store goes on: more writes, a build, a restart, the same state as a replay.
        let more = later_writes(next, 1);
        apply(&mut store, more.clone()).await;
        all.extend(more);
        build(&mut store).await.expect("the next build");
        drop(store);
        assert_eq!(leftovers(dir.path()), (1, 1), "{crash}: nothing left over");
        let store = open_store(dir.path()).await;
        assert_eq!(
            digest(&store).await,
            replayed_digest(all).await,
            "{crash}: after the next build and a restart"
        );
    }
}

#[tokio::test]
async fn a_crash_after_any_step_of_an_install_leaves_one_state_or_the_other() {
    let source_dir = tempfile::tempdir().expect("temp dir");
    let mut source = open_store(source_dir.path()).await;
    let mut history = first_history();
    history.extend(later_writes(SEEDED + USERS, 0));
    apply(&mut source, history).await;
    let (meta, bytes) = build(&mut source).await.expect("source build");
    let installed = digest(&source).await;

    for (crash, switched) in [
        (step::BASE_RECEIVED, false),
        (step::LAYERS_SWITCHED, true),
        (step::OLD_BASE_DELETED, true),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open_store(dir.path()).await;
        apply(&mut store, first_history()).await;
        build(&mut store).await.expect("the receiver's own build");
        let own = digest(&store).await;

        store.state_machine.crash_after(crash);
        let result = receive(&mut store, &meta, &bytes).await;
        assert!(result.is_err(), "{crash}: the install stopped");
        drop(store);
        let store = open_store(dir.path()).await;
        let expected = if switched { &installed } else { &own };
        assert_eq!(&digest(&store).await, expected, "{crash}: reopened");
        drop(store);
        assert_eq!(leftovers(dir.path()), (1, 1), "{crash}: nothing left over");
    }
}

#[tokio::test]
async fn a_damaged_or_missing_base_file_stops_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open_store(dir.path()).await;
    apply(&mut store, first_history()).await;
    build(&mut store).await.expect("build");
    drop(store);
    let base = std::fs::read_dir(dir.path().join("snapshots"))
        .expect("snapshot dir")
        .next()
        .expect("the base file")
        .expect("entry")
        .path();
    let good = std::fs::read(&base).expect("base reads");
    let mut damaged = good.clone();
    damaged[good.len() / 2] ^= 0x10;
    std::fs::write(&base, &damaged).expect("damaged");
    match crate::open(dir.path(), test_options()).await {
        Err(StoreError::Corrupt(what)) => assert!(what.contains("base file"), "{what}"),
        other => panic!("a damaged base opened: {other:?}"),
    }
    std::fs::remove_file(&base).expect("removed");
    match crate::open(dir.path(), test_options()).await {
        Err(StoreError::Corrupt(what)) => assert!(what.contains("missing"), "{what}"),
        other => panic!("a missing base opened: {other:?}"),
    }
    std::fs::write(&base, &good).expect("put back");
    let store = open_store(dir.path()).await;
    assert_eq!(digest(&store).await, replayed_digest(first_history()).await);
}
