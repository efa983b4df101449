//! A digest of the whole state: SHA-256 over every (key, value) pair in key order, each
//! length-prefixed so that no two different states hash the same stream of bytes. Replicas at
//! the same revision must have the same digest.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Default)]
pub struct StateDigest {
    hasher: Sha256,
    pairs: u64,
    last_key: Option<Vec<u8>>,
}

impl StateDigest {
    pub fn new() -> Self {
        StateDigest::default()
    }

    /// Feeds one pair. Keys must come in strictly increasing order: the caller's bug otherwise.
    pub fn update(&mut self, key: &[u8], value: &[u8]) {
        if let Some(last) = &self.last_key {
            assert!(last.as_slice() < key, "digest fed keys out of order");
        }
        self.last_key = Some(key.to_vec());
        self.hasher.update((key.len() as u64).to_be_bytes());
        self.hasher.update(key);
        self.hasher.update((value.len() as u64).to_be_bytes());
        self.hasher.update(value);
        self.pairs += 1;
    }

    /// The digest as lower-case hex, and how many pairs went into it.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.pairs)
    }
}
