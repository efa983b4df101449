//! The layout of the state key space. One flat ordered space, prefixes keep kinds apart:
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `p/` | user id | a `Placement` |
//! | `L/` | location id | a `Location` |
//! | `P/` | residency jurisdiction | a `Policy` |
//! | `c/` | location id | u64: placements at the location or moving to it |
//! | `j/` | residency `/` location jurisdiction | u64: placements of that residency stored (or moving) there |
//! | `i/` | location id, NUL, user id | empty: only in states written before 2026-12-07, which indexed the users of each location; no longer read or written |
//! | `r/` | request id | a `RequestRecord`: the write's body and its first result: only in states written before records were kept per entry; pruned with their entry or revision |
//! | `Q/` | revision (BE u64), chunk (BE u32) | the request ids that entry remembered, in order, in chunks (for the in-memory index and for pruning) |
//! | `R/` | revision (BE u64), chunk (BE u32) | `RequestRecords`: for each id that entry remembered, a SHA-256 of the write's body and its first result, in chunks |
//! | `n/requests` | | a `RequestWindow`: how many ids are remembered, and from which revision on |
//! | `q/` | revision, big-endian u64 | the request id applied at that revision: only in states written before writes were grouped into entries; pruned by revision |
//! | `n/placements` | | u64: how many placements exist (for the placements metric) |
//! | `n/events` | | an `EventWindow`: how many events (and bytes) the watch history holds, and from which revision on |
//! | `e/` | node id, big-endian u64 | empty: the node has been a member (its id is never reused) |
//! | `w/` | revision (BE u64), chunk (BE u32) | an `EventChunk`: some of the `Event`s of one entry for watchers, in order, and whether another chunk follows |
//! | `x/` | revision (BE u64), index (BE u32) | one `Event`: only in states written before events were kept per entry; pruned by revision |
//! | `X/` | revision (BE u64) | u32: how many `x/` events that revision made (for pruning) |
//! | `m/` | name | the store's own metadata (applied log id, membership) |
//!
//! A placement is one pair (`p/`): what else a write leaves is kept per entry (`Q/`, `R/`,
//! `w/`) or is a counter shared by many placements (`c/`, `j/`, `n/placements`).

use residency_types::{Jurisdiction, LocationId, RequestId, Revision, UserId};

pub const PLACEMENT_PREFIX: &[u8] = b"p/";
pub const LOCATION_PREFIX: &[u8] = b"L/";
pub const POLICY_PREFIX: &[u8] = b"P/";
pub const LOCATION_COUNT_PREFIX: &[u8] = b"c/";
pub const RESIDENCY_COUNT_PREFIX: &[u8] = b"j/";
pub const REQUEST_PREFIX: &[u8] = b"r/";
pub const REQUEST_IDS_PREFIX: &[u8] = b"Q/";
pub const REQUEST_RECORDS_PREFIX: &[u8] = b"R/";
pub const REQUEST_WINDOW_KEY: &[u8] = b"n/requests";
/// Only in states written before writes were grouped into log entries (see `apply.rs`).
pub const REQUEST_BY_REVISION_PREFIX: &[u8] = b"q/";
pub const META_PREFIX: &[u8] = b"m/";
pub const PLACEMENT_COUNT_KEY: &[u8] = b"n/placements";
pub const EVENT_WINDOW_KEY: &[u8] = b"n/events";
pub const FORMER_MEMBER_PREFIX: &[u8] = b"e/";
pub const EVENT_CHUNK_PREFIX: &[u8] = b"w/";
/// Only in states written before events were kept per entry (see `apply.rs`).
pub const EVENT_PREFIX: &[u8] = b"x/";
pub const EVENT_COUNT_PREFIX: &[u8] = b"X/";

pub fn event_chunk_key(revision: Revision, chunk: u32) -> Vec<u8> {
    prefixed(
        EVENT_CHUNK_PREFIX,
        &[&revision.0.to_be_bytes(), &chunk.to_be_bytes()],
    )
}

/// The first event chunk key at or after `revision`.
pub fn event_chunk_start_key(revision: Revision) -> Vec<u8> {
    prefixed(EVENT_CHUNK_PREFIX, &[&revision.0.to_be_bytes()])
}

pub fn event_key(revision: Revision, index: u32) -> Vec<u8> {
    prefixed(
        EVENT_PREFIX,
        &[&revision.0.to_be_bytes(), &index.to_be_bytes()],
    )
}

/// The first event key at or after `revision`.
pub fn event_start_key(revision: Revision) -> Vec<u8> {
    prefixed(EVENT_PREFIX, &[&revision.0.to_be_bytes()])
}

pub fn event_count_key(revision: Revision) -> Vec<u8> {
    prefixed(EVENT_COUNT_PREFIX, &[&revision.0.to_be_bytes()])
}

pub fn former_member_key(node_id: u64) -> Vec<u8> {
    prefixed(FORMER_MEMBER_PREFIX, &[&node_id.to_be_bytes()])
}

fn prefixed(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut key = prefix.to_vec();
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

pub fn placement_key(user_id: &UserId) -> Vec<u8> {
    prefixed(PLACEMENT_PREFIX, &[user_id.as_str().as_bytes()])
}

pub fn location_key(location_id: &LocationId) -> Vec<u8> {
    prefixed(LOCATION_PREFIX, &[location_id.as_str().as_bytes()])
}

pub fn policy_key(residency: Jurisdiction) -> Vec<u8> {
    prefixed(POLICY_PREFIX, &[residency.as_str().as_bytes()])
}

pub fn location_count_key(location_id: &LocationId) -> Vec<u8> {
    prefixed(LOCATION_COUNT_PREFIX, &[location_id.as_str().as_bytes()])
}

pub fn residency_count_key(
    residency: Jurisdiction,
    location_jurisdiction: Jurisdiction,
) -> Vec<u8> {
    prefixed(
        RESIDENCY_COUNT_PREFIX,
        &[
            residency.as_str().as_bytes(),
            b"/",
            location_jurisdiction.as_str().as_bytes(),
        ],
    )
}

pub fn request_key(request_id: &RequestId) -> Vec<u8> {
    prefixed(REQUEST_PREFIX, &[request_id.as_str().as_bytes()])
}

pub fn request_ids_key(revision: Revision, chunk: u32) -> Vec<u8> {
    prefixed(
        REQUEST_IDS_PREFIX,
        &[&revision.0.to_be_bytes(), &chunk.to_be_bytes()],
    )
}

pub fn request_records_key(revision: Revision, chunk: u32) -> Vec<u8> {
    prefixed(
        REQUEST_RECORDS_PREFIX,
        &[&revision.0.to_be_bytes(), &chunk.to_be_bytes()],
    )
}

pub fn request_by_revision_key(revision: Revision) -> Vec<u8> {
    prefixed(REQUEST_BY_REVISION_PREFIX, &[&revision.0.to_be_bytes()])
}

pub fn meta_key(name: &str) -> Vec<u8> {
    prefixed(META_PREFIX, &[name.as_bytes()])
}
