//! The snapshot file format on its own: what is written reads back, and a file that lost its
//! end or had any single bit flipped is refused as corrupt, never read as a state.

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
    let (path, damaged) = (
        dir.path().join("good.snap"),
        dir.path().join("damaged.snap"),
    );
    write_file(&path, &sample_meta(), &sample_pairs());
    let read_back = read_file(&path).expect("an intact file reads");
    assert_eq!(read_back, (sample_meta(), sample_pairs()));
    let bytes = std::fs::read(&path).expect("file bytes");

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
            let mut flipped = bytes.clone();
            flipped[at] ^= 1 << bit;
            if let Err(read_as) = refused_as_corrupt(&damaged, &flipped) {
                panic!("with bit {bit} of byte {at} flipped, the file read as {read_as}");
            }
        }
    }
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
