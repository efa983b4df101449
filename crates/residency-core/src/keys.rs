//! The layout of the state key space. One flat ordered space, prefixes keep kinds apart:
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `p/` | user id | a `Placement` |
//! | `r/` | request id | a `RequestRecord`: the write's body and its first result |
//! | `q/` | revision, big-endian u64 | the request id applied at that revision (for pruning) |
//! | `m/` | name | the store's own metadata (applied log id, membership) |

use residency_types::{RequestId, Revision, UserId};

pub const PLACEMENT_PREFIX: &[u8] = b"p/";
pub const REQUEST_PREFIX: &[u8] = b"r/";
pub const REQUEST_BY_REVISION_PREFIX: &[u8] = b"q/";
pub const META_PREFIX: &[u8] = b"m/";

fn prefixed(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest);
    key
}

pub fn placement_key(user_id: &UserId) -> Vec<u8> {
    prefixed(PLACEMENT_PREFIX, user_id.as_str().as_bytes())
}

pub fn request_key(request_id: &RequestId) -> Vec<u8> {
    prefixed(REQUEST_PREFIX, request_id.as_str().as_bytes())
}

pub fn request_by_revision_key(revision: Revision) -> Vec<u8> {
    prefixed(REQUEST_BY_REVISION_PREFIX, &revision.0.to_be_bytes())
}

pub fn meta_key(name: &str) -> Vec<u8> {
    prefixed(META_PREFIX, name.as_bytes())
}
