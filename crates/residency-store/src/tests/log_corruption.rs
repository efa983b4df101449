//! A log or vote record damaged on disk stops the store from opening, with a message that says
//! which record and how; the store never serves from it.

use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};

use super::{assign, blank_entry, membership_entry, open_store, test_options, write_entry};
use crate::{StoreError, Vote};

/// The store's sled trees and keys, as `log_store.rs` lays them out.
const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";
const VOTE_KEY: &[u8] = b"vote";
/// The checksummed record header: a format byte and a CRC32.
const RECORD_HEADER_BYTES: usize = 5;

/// Writes a vote and log entries 0..=3 to a new store in `dir`, then closes it.
async fn write_log(dir: &Path) {
    let mut store = open_store(dir).await;
    store
        .log
        .save_vote(&Vote::new_committed(1, 1))
        .await
        .expect("vote saved");
    let entries = [
        membership_entry(0, 0, &[1]),
        blank_entry(1, 1),
        write_entry(1, 2, assign("req-1", "alice", "US", "us-east-1/pg-1")),
        write_entry(1, 3, assign("req-2", "bruno", "CA", "ca-central-1/pg-7")),
    ];
    store
        .log
        .blocking_append(entries)
        .await
        .expect("log appended");
}

/// Rewrites one stored record behind the store's back, as a bad disk would.
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

/// Which byte of a record, given the record's length.
type BytePosition = fn(usize) -> usize;

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

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
        damage_record(dir.path(), LOG_TREE, &log_key(2), |record| {
            let at = position(record.len());
            record[at] ^= 0x10;
        });
        let message = refusal(dir.path()).await;
        assert!(
            message.contains(expected),
            "expected {expected:?}, refused with {message:?}"
        );
    }
}

#[tokio::test]
async fn a_torn_log_record_stops_the_store_from_opening() {
    // (bytes of the record that survive; what the refusal says)
    let cases: [(usize, &str); 4] = [
        (0, "log entry 3: record of 0 bytes is torn"),
        (3, "log entry 3: record of 3 bytes is torn"),
        (RECORD_HEADER_BYTES, "log entry 3: checksum mismatch"),
        (RECORD_HEADER_BYTES + 10, "log entry 3: checksum mismatch"),
    ];
    for (kept, expected) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        write_log(dir.path()).await;
        damage_record(dir.path(), LOG_TREE, &log_key(3), |record| {
            record.truncate(kept)
        });
        let message = refusal(dir.path()).await;
        assert!(
            message.contains(expected),
            "{kept} bytes kept: refused with {message:?}"
        );
    }
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
