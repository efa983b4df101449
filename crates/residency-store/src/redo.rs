//! Writing an apply's changes to sled key by key, and finishing one that a crash cut short.
//!
//! sled makes a `Batch` atomic by rolling its IO buffer twice per batch, and each roll is a
//! write handed to sled's thread pool, which wakes every waiting pool thread: at one write per
//! entry that cost more CPU than the write itself (docs/performance.md). And a batch holds
//! sled's global write lock while it may wait for sled's flusher, which needs that lock: a
//! large batch during a snapshot build hung a node (docs/storage.md). Instead every apply first
//! records its whole change set, the *redo*, in the `sm_redo` tree, then makes the changes key
//! by key, then drops the redo.
//!
//! Why that is as atomic as a batch: sled recovers a prefix of its log, in the order the writes
//! were made (it stops at the first torn or missing segment). So after a crash either the redo's
//! header is not there, and neither is any change made after it (stray chunks are dropped), or
//! the redo is there whole, and `finish_interrupted` makes every change again before the state
//! is read. Each change is a put of a final value or a delete, so making one twice is the same
//! as making it once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::durable::SLED_INLINE_VALUE_BYTES_MAX;

/// The sled tree the redo lives in, apart from the state (no digest or snapshot sees it).
pub(crate) const REDO_TREE: &str = "sm_redo";
const HEADER_KEY: &[u8] = b"header";
const CHUNK_PREFIX: &[u8] = b"chunk/";
/// The encoded changes one chunk holds, about: a single larger change stands alone, and even
/// the largest (a request record, at most 100 KiB) stays below sled's inline value bound.
const CHUNK_BYTES_TARGET: usize = 64 * 1024;

/// A key's new value, or `None` for a delete.
pub(crate) type Changes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// A key's new value, borrowed, or `None` for a delete.
type Pair<'a> = (&'a [u8], Option<&'a [u8]>);

/// Written after every other chunk: the redo is whole once this is there. It carries the
/// first chunk itself, so an apply whose changes fit one chunk (the usual one) costs one insert
/// and one delete besides its changes.
#[derive(Debug, Serialize)]
struct Header<'a> {
    /// The state tree the changes are for.
    tree: &'a str,
    /// Chunks besides the first, under `chunk/1..`.
    more_chunks: u32,
    first: &'a [Pair<'a>],
}

/// `Header` as read back.
#[derive(Debug, Deserialize)]
struct StoredHeader {
    tree: String,
    more_chunks: u32,
    first: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn chunk_key(chunk: u32) -> Vec<u8> {
    let mut key = CHUNK_PREFIX.to_vec();
    key.extend_from_slice(&chunk.to_be_bytes());
    key
}

/// The changes cut into chunks of about `CHUNK_BYTES_TARGET` encoded bytes, in key order (at
/// least one chunk, perhaps empty).
fn chunks(changes: &Changes) -> Vec<Vec<Pair<'_>>> {
    let mut chunks: Vec<Vec<Pair<'_>>> = vec![Vec::new()];
    let mut bytes = 0;
    for (key, value) in changes {
        let size = key.len() + value.as_ref().map_or(0, Vec::len) + 8;
        if bytes + size > CHUNK_BYTES_TARGET && chunks.last().is_some_and(|last| !last.is_empty()) {
            chunks.push(Vec::new());
            bytes = 0;
        }
        chunks
            .last_mut()
            .expect("at least one chunk")
            .push((key.as_slice(), value.as_deref()));
        bytes += size;
    }
    chunks
}

fn sealed<T: Serialize>(value: &T) -> Vec<u8> {
    let bytes = crate::record::seal(value);
    assert!(
        bytes.len() <= SLED_INLINE_VALUE_BYTES_MAX,
        "a redo record of {} bytes would go to sled's unsynced blob files",
        bytes.len()
    );
    bytes
}

/// Writes the redo of `changes` for `state_name`: every chunk but the first, then (if asked)
/// the header with the first. Returns how many chunk keys besides the header it wrote.
fn write_redo(
    redo: &sled::Tree,
    state_name: &str,
    changes: &Changes,
    with_header: bool,
) -> Result<u32, StoreError> {
    let chunks = chunks(changes);
    let more_chunks = u32::try_from(chunks.len() - 1).expect("fewer than 2^32 redo chunks");
    for (chunk, pairs) in (1..=more_chunks).zip(&chunks[1..]) {
        redo.insert(chunk_key(chunk), sealed(pairs))?;
    }
    if with_header {
        let header = Header {
            tree: state_name,
            more_chunks,
            first: &chunks[0],
        };
        redo.insert(HEADER_KEY, sealed(&header))?;
    }
    Ok(more_chunks)
}

/// Makes `changes` in `state` (named `state_name`), recording them in `redo` first.
pub(crate) fn write(
    redo: &sled::Tree,
    state: &sled::Tree,
    state_name: &str,
    changes: &Changes,
) -> Result<(), StoreError> {
    let more_chunks = write_redo(redo, state_name, changes, true)?;
    for (key, value) in changes {
        match value {
            Some(value) => state.insert(key.as_slice(), value.as_slice())?,
            None => state.remove(key.as_slice())?,
        };
    }
    redo.remove(HEADER_KEY)?;
    for chunk in 1..=more_chunks {
        redo.remove(chunk_key(chunk))?;
    }
    Ok(())
}

/// On open, before the state is read: finishes the apply a crash cut short, if its redo is
/// whole, and drops whatever is left of a redo. Returns how many changes it made again.
pub(crate) fn finish_interrupted(db: &sled::Db, current_tree: &str) -> Result<usize, StoreError> {
    let redo = db.open_tree(REDO_TREE)?;
    let mut made = 0;
    if let Some(bytes) = redo.get(HEADER_KEY)? {
        let header: StoredHeader = crate::record::unseal(&bytes, "redo header")?;
        if header.tree != current_tree {
            return Err(StoreError::corrupt(format!(
                "an interrupted apply was for state tree {}, but the current one is {current_tree}",
                header.tree
            )));
        }
        let mut chunks = vec![header.first];
        for chunk in 1..=header.more_chunks {
            let bytes = redo
                .get(chunk_key(chunk))?
                .ok_or_else(|| StoreError::corrupt(format!("redo chunk {chunk} is missing")))?;
            chunks.push(crate::record::unseal(
                &bytes,
                &format!("redo chunk {chunk}"),
            )?);
        }
        let state = db.open_tree(&header.tree)?;
        for (key, value) in chunks.into_iter().flatten() {
            made += 1;
            match value {
                Some(value) => state.insert(key, value)?,
                None => state.remove(key)?,
            };
        }
        tracing::warn!(
            changes = made,
            "finished an apply that a crash had cut short"
        );
    }
    let left: Vec<sled::IVec> = redo.iter().keys().collect::<Result<_, _>>()?;
    for key in left {
        redo.remove(key)?;
    }
    Ok(made)
}

/// What `write` leaves before it makes the changes (with the header) or before its header
/// (without): for tests of a crash in between.
#[cfg(test)]
pub(crate) fn write_redo_only(
    redo: &sled::Tree,
    state_name: &str,
    changes: &Changes,
    with_header: bool,
) -> Result<(), StoreError> {
    write_redo(redo, state_name, changes, with_header).map(drop)
}
