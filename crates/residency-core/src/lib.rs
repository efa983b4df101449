//! The deterministic state machine of the registry, over an abstract key-value view.
//!
//! `apply` is a pure function of (state, revision, command): it reads the state through
//! [`KvRead`], decides, and returns the mutations to make plus the answer. It reads no clock, no
//! randomness and no configuration, and it iterates nothing whose order is not fixed, so every
//! replica that applies the same log reaches the same bytes (invariant I7). The store turns the
//! mutations atomically together with the applied revision (behind a redo record).
//!
//! - [`keys`]: the layout of the state key space, shared with the store and the digest.
//! - [`codec`]: the versioned disk encoding of values (not the wire format).
//! - [`apply`]: the write path, deciding through [`placement_rules`] and [`catalog_rules`]
//!   over a [`staged`] view; [`query`]: the read path, the access decision and dry runs.
//! - [`requests`]: what is remembered of each request id for retries, and the index of where.
//! - [`digest`]: a SHA-256 over the whole key space in key order, to compare replicas.
//! - [`memory`]: an in-memory state for tests and for checking histories against a model.

pub mod apply;
pub mod catalog_rules;
pub mod codec;
pub mod digest;
pub mod keys;
pub mod memory;
pub mod placement_rules;
pub mod query;
pub mod requests;
pub mod staged;

pub use apply::{Applied, Mutation, apply, check};
pub use codec::CodecError;
pub use digest::StateDigest;
pub use query::{
    DryRun, PlacementFacts, check_access, decide, dry_run_policy, list_locations, list_policies,
    lookup,
};
pub use requests::{HashedRequestIndex, IndexChange, RequestIndex, RequestPlace};

/// Reads the current state. The store implements it over sled; tests over a `BTreeMap`.
pub trait KvRead {
    type Error: std::error::Error + Send + Sync + 'static;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error>;
}

/// Reads ranges of the state, for listings and dry runs (never needed by `apply`).
pub trait KvScan: KvRead {
    /// Up to `limit` pairs whose keys start with `prefix`, in key order, after `after` if given.
    #[allow(clippy::type_complexity)]
    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Self::Error>;
}

/// Why the core could not read the state: the view failed, or held bytes it cannot decode.
#[derive(Debug, thiserror::Error)]
pub enum CoreError<E: std::error::Error + 'static> {
    #[error("reading the state failed: {0}")]
    Read(#[source] E),
    #[error("the state holds a value that does not decode: {0}")]
    Corrupt(#[from] CodecError),
}
