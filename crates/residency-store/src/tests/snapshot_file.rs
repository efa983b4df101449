//! The snapshot file format on its own: what is written reads back, and a file that lost its
//! end or had any single bit flipped is refused as corrupt, never read as another state.

use std::fs::File;
use std::path::Path;

use super::{log_id, stored_membership};
use crate::snapshot::{SnapshotReader, SnapshotWriter, StatePair};
use crate::{SnapshotMeta, StoreError, StoredMembership};

fn sample_meta() -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: Some(log_id(3, 42)),
        last_membership: stored_membership(1, 7, &[1, 2, 3]),
        snapshot_id: "3-42-9".to_string(),
    }
}

/// A few pairs, including an empty value and a value of every byte.
fn sample_pairs() -> Vec<StatePair> {
    let pairs: [(&[u8], &[u8]); 4] = [
        (b"m/applied", b"\x01\x03\x01\x2a"),
        (b"p/alice", b"US us-east-1/pg-1"),
        (b"p/bruno", b""),
        (b"r/req-1", &[0_u8, 1, 127, 128, 254, 255]),
    ];
    pairs
        .iter()
        .map(|(key, value)| (key.to_vec(), value.to_vec()))
        .collect()
}

fn write_file(path: &Path, meta: &SnapshotMeta, pairs: &[StatePair]) {
    let file = File::create(path).expect("snapshot file created");
    let mut writer = SnapshotWriter::new(file, meta).expect("header written");
    for (key, value) in pairs {
        writer.pair(key, value).expect("pair written");
    }
    let written = writer.finish().expect("trailer written");
    assert_eq!(written, pairs.len() as u64);
}

/// Reads a whole snapshot file: its header and every pair, through the trailer check.
fn read_file(path: &Path) -> Result<(SnapshotMeta, Vec<StatePair>), StoreError> {
    let (mut reader, meta) = SnapshotReader::open(File::open(path)?)?;
    let mut pairs = Vec::new();
    while let Some(pair) = reader.next_pair()? {
        pairs.push(pair);
    }
    Ok((meta, pairs))
}

/// Whether `bytes`, read as a snapshot file, are refused as corrupt (else what they read as).
fn refused_as_corrupt(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).expect("damaged file written");
    match read_file(path) {
        Err(StoreError::Corrupt(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn snapshot_file_format_detects_truncation_and_bit_flips() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("good.snap");
    write_file(&path, &sample_meta(), &sample_pairs());
    let read_back = read_file(&path).expect("an intact file reads");
    assert_eq!(read_back, (sample_meta(), sample_pairs()));
    let bytes = std::fs::read(&path).expect("file bytes");
    assert!(
        bytes.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]),
        "a snapshot is written as a zstd frame"
    );
    let equivalent = every_truncation_and_bit_flip_is_refused(dir.path(), &bytes);
    // A few bits of zstd's frame and block headers (an unused flag, the window size) change
    // nothing that this small a file decodes to: flipped, the file still holds the same state
    // and reads as it. Every other flip is refused.
    assert!(
        equivalent.len() * 50 < bytes.len() * 8,
        "{} of {} bit flips read as the same state: {equivalent:?}",
        equivalent.len(),
        bytes.len() * 8
    );
}

/// Files written before snapshots were compressed (old backups among them) hold the stream
/// itself: they read back, and damage to them is refused the same way.
#[test]
fn an_uncompressed_snapshot_file_still_reads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (compressed, plain) = (dir.path().join("new.snap"), dir.path().join("old.snap"));
    write_file(&compressed, &sample_meta(), &sample_pairs());
    let stream = zstd::decode_all(File::open(&compressed).expect("opened")).expect("decodes");
    assert!(stream.starts_with(b"RRSNAP01"));
    std::fs::write(&plain, &stream).expect("old file written");
    assert_eq!(
        read_file(&plain).expect("an old file reads"),
        (sample_meta(), sample_pairs())
    );
    let equivalent = every_truncation_and_bit_flip_is_refused(dir.path(), &stream);
    assert_eq!(equivalent, Vec::new(), "flips that read as the same state");
}

/// Checks that every truncation of `bytes` and every single bit flipped in them is refused as
/// corrupt or, for a bit that does not change what the file holds, reads back as the sample
/// state; returns those bits as (byte, bit).
fn every_truncation_and_bit_flip_is_refused(dir: &Path, bytes: &[u8]) -> Vec<(usize, u32)> {
    let damaged = dir.join("damaged.snap");
    let mut equivalent = Vec::new();

    for kept in 0..bytes.len() {
        if let Err(read_as) = refused_as_corrupt(&damaged, &bytes[..kept]) {
            panic!(
                "the first {kept} of {} bytes read as {read_as}",
                bytes.len()
            );
        }
    }
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.to_vec();
            flipped[at] ^= 1 << bit;
            if refused_as_corrupt(&damaged, &flipped).is_err() {
                let read_as = read_file(&damaged).expect("read before");
                assert_eq!(
                    read_as,
                    (sample_meta(), sample_pairs()),
                    "with bit {bit} of byte {at} flipped, the file read as another state"
                );
                equivalent.push((at, bit));
            }
        }
    }
    equivalent
}

#[test]
fn a_snapshot_of_an_empty_state_reads_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("empty.snap");
    let meta = SnapshotMeta {
        last_log_id: None,
        last_membership: StoredMembership::default(),
        snapshot_id: "empty-2".to_string(),
    };
    write_file(&path, &meta, &[]);
    assert_eq!(
        read_file(&path).expect("an empty snapshot reads"),
        (meta, Vec::new())
    );
}
