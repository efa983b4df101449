//! A log or vote record damaged on disk stops the store from opening, with a message that says
//! which record and how; the store never serves from it.

use std::path::Path;

use openraft::RaftLogReader;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};

use super::{assign, blank_entry, membership_entry, open_store, test_options, write_entry};
use crate::{StoreError, Vote};

/// The store's sled tree and key of the vote, as `log_store.rs` lays them out.
const META_TREE: &str = "raft_meta";
const VOTE_KEY: &[u8] = b"vote";
/// The checksummed record header: a format byte and a CRC32.
const RECORD_HEADER_BYTES: usize = 5;
/// The segment `write_log`'s entries land in: the first, starting at index 0.
const SEGMENT: &str = "raft-log/segment-00000000000000000000.log";

/// Writes a vote and log entries 0..=3 to a new store in `dir`, then closes it.
async fn write_log(dir: &Path) {
    let mut store = open_store(dir).await;
    store
        .log
        .save_vote(&Vote::new_committed(1, 1))
        .await
        .expect("vote saved");
    store
        .log
        .blocking_append(history())
        .await
        .expect("log appended");
}

fn history() -> [crate::Entry; 4] {
    [
        membership_entry(0, 0, &[1]),
        blank_entry(1, 1),
        write_entry(1, 2, assign("req-1", "alice", "US", "us-east-1/pg-1")),
        write_entry(1, 3, assign("req-2", "bruno", "CA", "ca-central-1/pg-7")),
    ]
}

/// Rewrites one stored sled record behind the store's back, as a bad disk would.
fn damage_record(dir: &Path, tree: &str, key: &[u8], damage: impl FnOnce(&mut Vec<u8>)) {
    let db = crate::durable::open_sled(&dir.join("sled"), 16 * 1024 * 1024)
        .expect("the closed store's database opens");
    let tree = db.open_tree(tree).expect("tree opens");
    let mut record = tree
        .get(key)
        .expect("read")
        .expect("the record exists")
        .to_vec();
    damage(&mut record);
    tree.insert(key, record).expect("damaged record written");
    db.flush().expect("damage flushed");
}

/// A frame's header: the record's length and a CRC32 of it.
const FRAME_HEADER_BYTES: usize = 8;

/// Where entry `index`'s frame starts in the segment, and how long its record is.
fn frame_of(segment: &[u8], index: usize) -> (usize, usize) {
    let mut offset = 0;
    for _ in 0..index {
        let length = u32::from_be_bytes(segment[offset..offset + 4].try_into().expect("4 bytes"));
        offset += FRAME_HEADER_BYTES + length as usize;
    }
    let length = u32::from_be_bytes(segment[offset..offset + 4].try_into().expect("4 bytes"));
    (offset, length as usize)
}

/// Rewrites the segment file behind the store's back, as a bad disk or a crash would.
fn damage_segment(dir: &Path, damage: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(SEGMENT);
    let mut bytes = std::fs::read(&path).expect("segment reads");
    damage(&mut bytes);
    std::fs::write(&path, bytes).expect("damaged segment written");
}

/// How a crash left a segment, given where the last frame starts.
type Cut = fn(&mut Vec<u8>, usize);

/// Which byte of a record, given the record's length.
type BytePosition = fn(usize) -> usize;

/// Opens the store in `dir` and returns why it refused to.
async fn refusal(dir: &Path) -> String {
    match crate::open(dir, test_options()).await {
        Err(StoreError::Corrupt(message)) => message,
        Err(other) => panic!("refused for a reason other than corruption: {other}"),
        Ok(_) => panic!("a store with a damaged record opened"),
    }
}

#[tokio::test]
async fn a_corrupt_log_record_stops_the_store_from_opening() {
    // (which byte of entry 2's record flips; what the refusal says)
    let cases: [(BytePosition, &str); 5] = [
        (|_| 0, "log entry 2: unknown record format"),
        (|_| 1, "log entry 2: checksum mismatch"),
        (|_| RECORD_HEADER_BYTES, "log entry 2: checksum mismatch"),
        (|len| len / 2, "log entry 2: checksum mismatch"),
        (|len| len - 1, "log entry 2: checksum mismatch"),
    ];
    for (position, expected) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        write_log(dir.path()).await;
        damage_segment(dir.path(), |segment| {
            let (frame, length) = frame_of(segment, 2);
            segment[frame + FRAME_HEADER_BYTES + position(length)] ^= 0x10;
        });
        let message = refusal(dir.path()).await;
        assert!(
            message.contains(expected),
            "expected {expected:?}, refused with {message:?}"
        );
    }
}

#[tokio::test]
async fn a_damaged_frame_before_the_end_stops_the_store_from_opening() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_log(dir.path()).await;
    damage_segment(dir.path(), |segment| {
        let (frame, _) = frame_of(segment, 2);
        segment[frame..frame + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    });
    let message = refusal(dir.path()).await;
    assert!(
        message.contains("log entry 2: damaged record frame"),
        "refused with {message:?}"
    );
}

/// A crash in the middle of an append leaves its last record short, or zeroes where the file
/// grew: that write was never synced, so never acknowledged. The store cuts it off and opens
/// with the entries before it, and the log takes the entry again.
#[tokio::test]
async fn a_record_cut_short_at_the_end_of_the_log_is_cut_off() {
    // How the end of entry 3's frame looks after the crash.
    let cases: [(&str, Cut); 4] = [
        ("nothing of it", |segment, frame| segment.truncate(frame)),
        ("part of its header", |segment, frame| {
            segment.truncate(frame + 5)
        }),
        ("its header and part of its record", |segment, frame| {
            segment.truncate(frame + FRAME_HEADER_BYTES + RECORD_HEADER_BYTES + 3)
        }),
        ("zeroes in its place", |segment, frame| {
            let end = segment.len();
            segment[frame..end].fill(0)
        }),
    ];
    for (kept, cut) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        write_log(dir.path()).await;
        damage_segment(dir.path(), |segment| {
            let (frame, _) = frame_of(segment, 3);
            cut(segment, frame)
        });
        let mut store = open_store(dir.path()).await;
        let state = store.log.get_log_state().await.expect("log state");
        assert_eq!(
            state.last_log_id.map(|log_id| log_id.index),
            Some(2),
            "{kept}: the entries before the cut stay"
        );
        let entries = store
            .log
            .try_get_log_entries(0..3)
            .await
            .expect("entries read");
        assert_eq!(entries.len(), 3, "{kept}");
        let [.., again] = history();
        store
            .log
            .blocking_append([again])
            .await
            .expect("the log takes entry 3 again");
        drop(store);
        let mut store = open_store(dir.path()).await;
        let state = store.log.get_log_state().await.expect("log state");
        assert_eq!(
            state.last_log_id.map(|log_id| log_id.index),
            Some(3),
            "{kept}: entry 3 is back after a reopen"
        );
    }
}

/// A store written when the log lived in sled (and held one write per entry) opens with its
/// entries moved into segment files.
#[tokio::test]
async fn a_log_kept_in_sled_by_an_older_version_is_moved_to_segment_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let db = crate::durable::open_sled(&dir.path().join("sled"), 16 * 1024 * 1024)
            .expect("database opens");
        let log = db.open_tree("raft_log").expect("tree opens");
        for entry in history() {
            log.insert(
                entry.log_id.index.to_be_bytes(),
                crate::record::seal_legacy_entry(&entry),
            )
            .expect("entry written");
        }
        db.flush().expect("flushed");
    }
    let mut store = open_store(dir.path()).await;
    let entries = store
        .log
        .try_get_log_entries(0..4)
        .await
        .expect("entries read");
    assert_eq!(entries, history().to_vec(), "every entry moved, unchanged");
    drop(store);
    assert!(
        dir.path().join(SEGMENT).exists(),
        "the segment file holds them"
    );
    let mut store = open_store(dir.path()).await;
    let state = store.log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id.map(|log_id| log_id.index), Some(3));
}

#[tokio::test]
async fn a_corrupt_vote_stops_the_store_from_opening() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_log(dir.path()).await;
    damage_record(dir.path(), META_TREE, VOTE_KEY, |record| {
        let last = record.len() - 1;
        record[last] ^= 0x01;
    });
    let message = refusal(dir.path()).await;
    assert!(
        message.contains("vote: checksum mismatch"),
        "refused with {message:?}"
    );
}
