//! A snapshot built on one store installs on another and gives it the same state; a damaged or
//! mislabelled one is refused and leaves the receiving store exactly as it was.

use std::path::Path;

use openraft::RaftSnapshotBuilder;
use openraft::storage::{RaftStateMachine, Snapshot};
use residency_types::{Outcome, Revision};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    SEEDED, Store, assert_accepted, assign, log_id, open_store, seeded_history, stored_membership,
    user, write_entry,
};
use crate::{SnapshotMeta, StorageError, StoredMembership};

/// The index of `source_store`'s last entry: the next leader's write that moves alice.
const ALICE_MOVED: u64 = SEEDED + 2;
/// The index of the write `apply_one_more_write` adds.
const CARLA: u64 = ALICE_MOVED + 1;

/// Store A's history: a membership, the catalog, then writes, one of which moves a user to
/// another location of her residency.
async fn source_store(dir: &Path) -> Store {
    let mut store = open_store(dir).await;
    let mut entries = seeded_history(&[1, 2, 3]);
    entries.extend([
        write_entry(1, SEEDED, assign("req-1", "alice", "US", "us-east-1/pg-1")),
        write_entry(
            1,
            SEEDED + 1,
            assign("req-2", "bruno", "CA", "ca-central-1/pg-7"),
        ),
        write_entry(
            2,
            ALICE_MOVED,
            assign("req-3", "alice", "US", "us-west-2/pg-2"),
        ),
    ]);
    let results = store
        .state_machine
        .apply(entries)
        .await
        .expect("entries applied");
    assert_accepted(&results);
    let moved = &results.last().expect("one result per entry").results[0].outcome;
    assert!(
        matches!(moved, Some(Outcome::Assigned { created: false, .. })),
        "alice's second assign updates her placement: {moved:?}"
    );
    store
}

async fn build_snapshot(store: &mut Store) -> (SnapshotMeta, Vec<u8>) {
    let mut builder = store.state_machine.get_snapshot_builder().await;
    let snapshot = builder.build_snapshot().await.expect("snapshot built");
    (snapshot.meta.clone(), snapshot_bytes(snapshot).await)
}

async fn snapshot_bytes(mut snapshot: Snapshot<crate::TypeConfig>) -> Vec<u8> {
    let mut bytes = Vec::new();
    snapshot
        .snapshot
        .read_to_end(&mut bytes)
        .await
        .expect("snapshot file reads");
    bytes
}

/// Receives `bytes` the way openraft does (into the file `begin_receiving_snapshot` made),
/// then installs them as the snapshot `meta` describes.
pub(super) async fn receive(
    store: &mut Store,
    meta: &SnapshotMeta,
    bytes: &[u8],
) -> Result<(), StorageError> {
    let mut file = store.state_machine.begin_receiving_snapshot().await?;
    file.write_all(bytes).await.expect("snapshot bytes written");
    file.flush().await.expect("snapshot bytes flushed");
    store.state_machine.install_snapshot(meta, file).await
}

#[tokio::test]
async fn a_snapshot_installs_on_another_store_with_the_same_digest() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let mut store_a = source_store(dir_a.path()).await;
    let (meta, bytes) = build_snapshot(&mut store_a).await;
    assert_eq!(meta.last_log_id, Some(log_id(2, ALICE_MOVED)));
    assert_eq!(meta.last_membership, stored_membership(0, 0, &[1, 2, 3]));
    let digest_a = store_a.reader.digest().await.expect("digest");

    let mut store_b = open_store(dir_b.path()).await;
    receive(&mut store_b, &meta, &bytes)
        .await
        .expect("snapshot installed");
    assert_eq!(store_b.reader.digest().await.expect("digest"), digest_a);
    assert_eq!(
        store_b
            .state_machine
            .applied_state()
            .await
            .expect("applied state"),
        (meta.last_log_id, meta.last_membership.clone())
    );
    let (alice, revision) = store_b.reader.lookup(&user("alice")).await.expect("lookup");
    let alice = alice.expect("alice is in the snapshot");
    assert_eq!(
        (
            alice.residency.as_str(),
            alice.location_id.as_str(),
            alice.mod_revision
        ),
        ("US", "us-west-2/pg-2", Revision(ALICE_MOVED))
    );
    assert_eq!(revision, Revision(ALICE_MOVED));
    drop(store_b);

    let mut store_b = open_store(dir_b.path()).await;
    assert_eq!(store_b.reader.digest().await.expect("digest"), digest_a);
    let current = store_b
        .state_machine
        .get_current_snapshot()
        .await
        .expect("current snapshot")
        .expect("the installed snapshot is the current one after a restart");
    assert_eq!(current.meta, meta);
    assert_eq!(snapshot_bytes(current).await, bytes);
}

/// The store that installed a snapshot knows the request ids the snapshot remembers: a retry
/// of a write the source applied gets its first answer, in the check before proposing and in
/// the apply, and changes nothing; a reuse of the id for another write is refused.
#[tokio::test]
async fn an_installed_snapshot_remembers_its_request_ids() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let mut store_a = source_store(dir_a.path()).await;
    let (meta, bytes) = build_snapshot(&mut store_a).await;
    let retry = assign("req-2", "bruno", "CA", "ca-central-1/pg-7");
    let first = store_a
        .reader
        .evaluate(std::slice::from_ref(&retry))
        .await
        .expect("evaluated")
        .pop()
        .expect("one answer");
    assert_eq!(
        first.revision,
        Revision(SEEDED + 1),
        "the source remembers it"
    );

    let mut store_b = open_store(dir_b.path()).await;
    receive(&mut store_b, &meta, &bytes)
        .await
        .expect("snapshot installed");
    let checked = store_b
        .reader
        .evaluate(std::slice::from_ref(&retry))
        .await
        .expect("evaluated");
    assert_eq!(
        checked,
        vec![first.clone()],
        "the check answers the first result"
    );
    let reused = assign("req-2", "dora", "US", "us-east-1/pg-1");
    let applied = store_b
        .state_machine
        .apply([super::group_entry(2, CARLA, vec![retry, reused])])
        .await
        .expect("entry applied");
    assert_eq!(
        applied[0].results[0], first,
        "the apply answers the first result"
    );
    assert!(matches!(
        applied[0].results[1].outcome,
        Some(Outcome::Rejected(
            residency_types::Rejection::RequestIdReused
        ))
    ));
    let (dora, _) = store_b.reader.lookup(&user("dora")).await.expect("lookup");
    assert_eq!(dora, None, "the reused id wrote nothing");
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_and_changes_nothing() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (meta, bytes) = build_snapshot(&mut source_store(dir_a.path()).await).await;
    let middle = bytes.len() / 2;
    let flipped_in_the_middle = flip(&bytes, middle);
    let flipped_in_the_header = flip(&bytes, 20);
    let flipped_in_the_trailer = flip(&bytes, bytes.len() - 1);
    let cut_short = &bytes[..bytes.len() - 6];
    let other_log_id = SnapshotMeta {
        last_log_id: Some(log_id(2, CARLA)),
        ..meta.clone()
    };
    // (what went wrong, the announced meta, the bytes received)
    let cases: [(&str, &SnapshotMeta, &[u8]); 6] = [
        (
            "a byte flipped in the middle",
            &meta,
            &flipped_in_the_middle,
        ),
        (
            "a byte flipped in the header",
            &meta,
            &flipped_in_the_header,
        ),
        (
            "a byte flipped in the checksum",
            &meta,
            &flipped_in_the_trailer,
        ),
        ("the end cut off", &meta, cut_short),
        ("nothing received", &meta, &[]),
        ("a file for another log id", &other_log_id, &bytes),
    ];

    let mut store_b = open_store(dir_b.path()).await;
    let empty = store_b.reader.digest().await.expect("digest");
    for (what, announced, received) in cases {
        let refused = receive(&mut store_b, announced, received).await;
        assert!(refused.is_err(), "{what}: the snapshot was installed");
        assert_eq!(
            store_b.reader.digest().await.expect("digest"),
            empty,
            "{what}"
        );
        assert_eq!(
            store_b
                .state_machine
                .applied_state()
                .await
                .expect("applied state"),
            (None, StoredMembership::default()),
            "{what}"
        );
        let current = store_b
            .state_machine
            .get_current_snapshot()
            .await
            .expect("current");
        assert!(
            current.is_none(),
            "{what}: a refused snapshot became the current one"
        );
        let left_behind = std::fs::read_dir(dir_b.path().join("snapshots"))
            .expect("dir")
            .count();
        assert_eq!(left_behind, 0, "{what}: the refused file was left behind");
    }
    drop(store_b);
    let store_b = open_store(dir_b.path()).await;
    assert_eq!(store_b.reader.digest().await.expect("digest"), empty);
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut flipped = bytes.to_vec();
    flipped[at] ^= 0x01;
    flipped
}

/// What a crash before sled's background flush can leave: the name counter rolled back.
fn roll_back_name_counter(store_dir: &Path) {
    let db =
        crate::durable::open_sled(&store_dir.join("sled"), 16 * 1024 * 1024).expect("sled opens");
    let pointer = db.open_tree("sm_pointer").expect("pointer tree");
    pointer.remove("next_seq").expect("counter reset");
    db.flush().expect("flushed");
}

/// Applies revision `CARLA` (carla's assign) on top of `source_store`'s history.
async fn apply_one_more_write(store: &mut Store) {
    let entry = write_entry(2, CARLA, assign("req-4", "carla", "US", "us-west-2/pg-2"));
    let results = store.state_machine.apply([entry]).await.expect("applied");
    assert_accepted(&results);
}

/// A crash can lose the bump of the file-name counter while the renamed snapshot file survives.
/// Reopening must not hand that name out again: the next build would overwrite, then delete,
/// the current snapshot, and the node would stop on the missing file.
#[tokio::test]
async fn a_snapshot_built_after_a_lost_counter_bump_keeps_its_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = source_store(dir.path()).await;
    let (first, _) = build_snapshot(&mut store).await;
    drop(store);
    roll_back_name_counter(dir.path());
    let mut store = open_store(dir.path()).await;
    apply_one_more_write(&mut store).await;
    let (second, bytes) = build_snapshot(&mut store).await;
    assert_ne!(second.snapshot_id, first.snapshot_id);
    assert_eq!(second.last_log_id, Some(log_id(2, CARLA)));
    let current = store
        .state_machine
        .get_current_snapshot()
        .await
        .expect("current snapshot readable");
    let current = current.expect("a current snapshot exists");
    assert_eq!(current.meta.snapshot_id, second.snapshot_id);
    assert_eq!(snapshot_bytes(current).await, bytes);
    assert_eq!(
        store.reader.lookup(&user("carla")).await.expect("lookup").1,
        Revision(CARLA)
    );
}

/// The same lost counter bump on a node that installed a snapshot: the next install must not
/// reuse the live state tree's name (dropping it, and then the state just loaded).
#[tokio::test]
async fn a_snapshot_installed_after_a_lost_counter_bump_keeps_the_state() {
    let source_dir = tempfile::tempdir().expect("temp dir");
    let mut source = source_store(source_dir.path()).await;
    let (first_meta, first_bytes) = build_snapshot(&mut source).await;
    let target_dir = tempfile::tempdir().expect("temp dir");
    let mut target = open_store(target_dir.path()).await;
    receive(&mut target, &first_meta, &first_bytes)
        .await
        .expect("first install");
    drop(target);
    roll_back_name_counter(target_dir.path());
    apply_one_more_write(&mut source).await;
    let (second_meta, second_bytes) = build_snapshot(&mut source).await;
    let mut target = open_store(target_dir.path()).await;
    receive(&mut target, &second_meta, &second_bytes)
        .await
        .expect("second install");
    assert_eq!(
        target.reader.digest().await.expect("digest"),
        source.reader.digest().await.expect("digest")
    );
    drop(target);
    let target = open_store(target_dir.path()).await;
    let (placement, revision) = target.reader.lookup(&user("carla")).await.expect("lookup");
    assert!(placement.is_some(), "the installed state survived a reopen");
    assert_eq!(revision, Revision(CARLA));
}

/// openraft 0.9 asks the log to purge up to a snapshot it is installing before the install is
/// done. The log holds back to the durable snapshot, so a crash in between leaves a log that
/// still reaches the state; once the install is durable the held-back purge is done, so the log
/// has no gap when entries past the snapshot arrive. The fault suite's
/// crash-during-snapshot-install found a node unable to start in each case.
#[tokio::test]
async fn the_log_is_not_purged_past_a_snapshot_still_being_installed() {
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
    let source_dir = tempfile::tempdir().expect("tempdir");
    let mut source = source_store(source_dir.path()).await;
    let (meta, bytes) = build_snapshot(&mut source).await;
    let receiver_dir = tempfile::tempdir().expect("tempdir");
    let mut receiver = open_store(receiver_dir.path()).await;
    // The receiver has the seeded history in its log and state, and a snapshot of it.
    let history = seeded_history(&[1, 2, 3]);
    receiver
        .log
        .blocking_append(history.clone())
        .await
        .expect("log appended");
    let results = receiver
        .state_machine
        .apply(history)
        .await
        .expect("applied");
    assert_accepted(&results);
    let (own, _) = build_snapshot(&mut receiver).await;
    let floor = own.last_log_id.expect("a snapshot of applied entries");

    // The leader's snapshot arrives; before its install completes, openraft purges to it.
    let mut file = receiver
        .state_machine
        .begin_receiving_snapshot()
        .await
        .expect("receiving");
    let asked = meta
        .last_log_id
        .expect("the source snapshot covers entries");
    receiver.log.purge(asked).await.expect("purge");
    let state = receiver.log.get_log_state().await.expect("log state");
    assert_eq!(
        state.last_purged_log_id,
        Some(floor),
        "the purge went past the durable snapshot"
    );

    // The install completes and, with it durable, the held-back purge is done: the log has no
    // gap when openraft appends past the snapshot, and a restart opens it.
    file.write_all(&bytes)
        .await
        .expect("snapshot bytes written");
    file.flush().await.expect("flushed");
    receiver
        .state_machine
        .install_snapshot(&meta, file)
        .await
        .expect("installed");
    let state = receiver.log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(asked));
    let next = super::blank_entry(asked.leader_id.term, asked.index + 1);
    receiver
        .log
        .blocking_append([next])
        .await
        .expect("appended past the snapshot");
    drop(receiver);
    let mut reopened = open_store(receiver_dir.path()).await;
    let state = reopened.log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(asked));
    assert_eq!(
        state.last_log_id.map(|log_id| log_id.index),
        Some(asked.index + 1)
    );
}

/// A snapshot is built as a base file; one in the older stream format (sent by a node not yet
/// upgraded, or restored from an old backup) installs to the same state.
#[tokio::test]
async fn a_snapshot_in_the_older_stream_format_installs_as_well() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let mut store_a = source_store(dir_a.path()).await;
    let (meta, bytes) = build_snapshot(&mut store_a).await;
    assert!(
        crate::base::Base::is_base(&bytes),
        "a build writes a base file"
    );
    let digest_a = store_a.reader.digest().await.expect("digest");

    let (mut pairs, header) =
        crate::snapshot::snapshot_from_bytes(&bytes).expect("the base file reads");
    assert_eq!(header, meta);
    let stream_path = dir_a.path().join("stream.snap");
    let mut writer = crate::snapshot::SnapshotWriter::new(
        std::fs::File::create(&stream_path).expect("file"),
        &meta,
    )
    .expect("stream header");
    let mut count = 0;
    while let Some((key, value)) = pairs.next_pair().expect("pair") {
        writer.pair(&key, &value).expect("pair written");
        count += 1;
    }
    assert_eq!(writer.finish().expect("stream finished"), count);
    let stream = std::fs::read(&stream_path).expect("stream reads");
    assert!(!crate::base::Base::is_base(&stream));

    let mut store_b = open_store(dir_b.path()).await;
    receive(&mut store_b, &meta, &stream)
        .await
        .expect("the stream installs");
    assert_eq!(store_b.reader.digest().await.expect("digest"), digest_a);
}
