//! Checksummed records for the Raft log and vote: a format byte, a CRC32 of the body, then the
//! body (postcard). A record whose checksum fails is corruption, reported, never served.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::StoreError;

const RECORD_FORMAT_V1: u8 = 1;
const RECORD_HEADER_BYTES: usize = 5;

pub fn seal<T: Serialize>(value: &T) -> Vec<u8> {
    // Our own types and openraft's always serialize; a failure is a bug, not the world's fault.
    let body = postcard::to_stdvec(value).expect("raft records always serialize");
    let mut bytes = Vec::with_capacity(RECORD_HEADER_BYTES + body.len());
    bytes.push(RECORD_FORMAT_V1);
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    bytes
}

pub fn unseal<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(StoreError::corrupt(format!(
            "{what}: record of {} bytes is torn",
            bytes.len()
        )));
    }
    if bytes[0] != RECORD_FORMAT_V1 {
        return Err(StoreError::corrupt(format!(
            "{what}: unknown record format {}",
            bytes[0]
        )));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let body = &bytes[RECORD_HEADER_BYTES..];
    let actual = crc32fast::hash(body);
    if stored != actual {
        return Err(StoreError::corrupt(format!(
            "{what}: checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    postcard::from_bytes(body).map_err(|error| StoreError::corrupt(format!("{what}: {error}")))
}
